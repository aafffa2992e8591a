"""Stateful selective scan (Mamba-1 S6) with an initial state in and the final state out."""

from .interface import BACKENDS, DEFAULT_CHUNK_SIZE, resolve_backend, selective_scan
from .reference import selective_scan_reference

__all__ = ["BACKENDS", "DEFAULT_CHUNK_SIZE", "resolve_backend", "selective_scan", "selective_scan_reference"]
