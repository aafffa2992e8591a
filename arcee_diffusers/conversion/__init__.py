"""Checkpoints of published code to ``ArceeZigmaPipeline`` folders: the Arcee paper's (``arcee``) and
ZigMa's released weights (``zigma``), over one shared mapping mechanism (``core``)."""

from .arcee import (
    PUBLISHED_MODELS,
    PUBLISHED_SCAN_TYPES,
    check_published_args,
    convert_checkpoint,
    convert_state_dict,
    infer_config,
    load_published_checkpoint,
    resolve_scan_type,
    training_args,
)
from .core import ConversionError, add_vae_argument
from .zigma import (
    convert_zigma_checkpoint,
    convert_zigma_state_dict,
    infer_zigma_config,
    load_zigma_checkpoint,
)

__all__ = [
    "PUBLISHED_MODELS",
    "PUBLISHED_SCAN_TYPES",
    "ConversionError",
    "add_vae_argument",
    "check_published_args",
    "convert_checkpoint",
    "convert_state_dict",
    "convert_zigma_checkpoint",
    "convert_zigma_state_dict",
    "infer_config",
    "infer_zigma_config",
    "load_published_checkpoint",
    "load_zigma_checkpoint",
    "resolve_scan_type",
    "training_args",
]
