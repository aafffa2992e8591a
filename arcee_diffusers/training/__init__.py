"""Training for ``train_scripts/train_fm.py``: its command line (``cli``), the run itself (``trainer``), data,
latent caching, the loss, the EMA, checkpoints. The entry points of a run are exported here; ``trainer``'s
docstring shows the order a run calls them in."""

from .checkpointing import list_checkpoints, load_checkpoint, resolve_checkpoint, save_checkpoint
from .cli import parse_args
from .data import collate, image_transform, load_digits_dataset, load_train_dataset, with_image_transform
from .flow_matching import flow_matching_loss, sample_flow_times
from .latents import CachedLatentDataset, encode_dataset
from .trainer import (
    TrainData,
    TrainStep,
    build_model,
    build_train_dataset,
    finish,
    make_accelerator,
    save_final_pipeline,
    train,
)

__all__ = [
    "CachedLatentDataset",
    "TrainData",
    "TrainStep",
    "build_model",
    "build_train_dataset",
    "collate",
    "encode_dataset",
    "finish",
    "flow_matching_loss",
    "image_transform",
    "list_checkpoints",
    "load_checkpoint",
    "load_digits_dataset",
    "load_train_dataset",
    "make_accelerator",
    "parse_args",
    "resolve_checkpoint",
    "sample_flow_times",
    "save_checkpoint",
    "save_final_pipeline",
    "train",
    "with_image_transform",
]
