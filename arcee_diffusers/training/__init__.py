"""Training for ``train_scripts/train_fm.py``: its command line (``cli``), the run itself (``trainer``), data,
latent caching, the loss, the EMA, checkpoints."""

from .checkpointing import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .data import collate, image_transform, load_digits_dataset, load_train_dataset, with_image_transform
from .flow_matching import flow_matching_loss, sample_flow_times
from .latents import CachedLatentDataset, encode_dataset

__all__ = [
    "CachedLatentDataset",
    "collate",
    "encode_dataset",
    "flow_matching_loss",
    "image_transform",
    "list_checkpoints",
    "load_checkpoint",
    "load_digits_dataset",
    "load_train_dataset",
    "resolve_checkpoint",
    "sample_flow_times",
    "save_checkpoint",
    "with_image_transform",
]
