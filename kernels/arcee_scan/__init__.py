"""Stateful selective scan (Mamba-1 S6) with an initial state in and the final state out, and the Mamba
mixer's causal depthwise convolution, both on the layouts the mixer uses."""

from .causal_conv import causal_conv1d
from .interface import (
    BACKENDS,
    DEFAULT_CHUNK_SIZE,
    compile_cpu_kernels_in_background,
    resolve_backend,
    selective_scan,
)
from .reference import selective_scan_reference

__all__ = [
    "BACKENDS",
    "DEFAULT_CHUNK_SIZE",
    "causal_conv1d",
    "compile_cpu_kernels_in_background",
    "resolve_backend",
    "selective_scan",
    "selective_scan_reference",
]
