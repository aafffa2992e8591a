"""Encode a dataset with a VAE once and train on the cached latent distributions.

The published trainer re-encodes every image at every step. We store each image's diagonal-Gaussian
posterior (mean and std) once, for the image and, with random flips, for its mirror image too, and draw
``z = mean + std * eps`` per step (in the training step, with the view drawn there too, so that the
checkpointed RNG state covers it), so training sees the same distribution as on-the-fly encoding.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path

import torch
from filelock import FileLock
from safetensors.torch import load_file, save_file
from torch.utils.data import DataLoader, Dataset

from ..files import atomic_path
from .data import collate


def latent_cache_key(dataset_fingerprint: str, vae_config: dict, **settings) -> str:
    """A short hash of what the latents depend on: the data, the VAE and the preprocessing settings."""
    blob = json.dumps(
        {"data": dataset_fingerprint, "vae": dict(vae_config), **settings}, sort_keys=True, default=str
    )
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


@torch.no_grad()
def encode_dataset(
    vae: torch.nn.Module,
    dataset: Dataset,
    batch_size: int = 32,
    with_flips: bool = False,
    device: torch.device | str = "cpu",
) -> dict[str, torch.Tensor]:
    """``mean``/``std`` ``(N, V, C, h, w)`` (V = 2 with flips: original, mirrored) and ``class_labels``."""
    means, stds, labels = [], [], []
    for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False, collate_fn=collate):
        pixels = batch["pixel_values"].to(device=device, dtype=vae.dtype)
        views = [pixels, pixels.flip(-1)] if with_flips else [pixels]
        posteriors = [vae.encode(view).latent_dist for view in views]
        means.append(torch.stack([p.mean.float().cpu() for p in posteriors], dim=1))
        stds.append(torch.stack([p.std.float().cpu() for p in posteriors], dim=1))
        if "class_labels" in batch:
            labels.append(batch["class_labels"])
    cache = {"mean": torch.cat(means), "std": torch.cat(stds)}
    if labels:
        cache["class_labels"] = torch.cat(labels)
    return cache


def load_or_encode(path: str | os.PathLike, encode: callable) -> dict[str, torch.Tensor]:
    """Load ``path`` if present, else ``encode()`` and write it atomically (temp file, then rename).

    Under a lock file beside it: runs that share a cache folder (the recipes' rows) encode the data once,
    the others wait for it and load it."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(path.with_name(f"{path.name}.lock")):
        if path.exists():
            return load_file(path)
        cache = encode()
        with atomic_path(path) as tmp:
            save_file({k: v.contiguous() for k, v in cache.items()}, tmp)
    return cache


class CachedLatentDataset(Dataset):
    """The cached posteriors, one item per image: ``latent_mean``/``latent_std`` ``(V, C, h, w)``."""

    def __init__(self, cache: dict[str, torch.Tensor]):
        self.mean, self.std = cache["mean"], cache["std"]
        self.class_labels = cache.get("class_labels")

    def __len__(self) -> int:
        return self.mean.shape[0]

    def __getitem__(self, index: int) -> dict:
        item = {"latent_mean": self.mean[index], "latent_std": self.std[index]}
        if self.class_labels is not None:
            item["class_labels"] = int(self.class_labels[index])
        return item


def sample_latents(
    mean: torch.Tensor, std: torch.Tensor, scaling_factor: float, shift_factor: float | None = None
) -> torch.Tensor:
    """A scaled latent per item of ``(B, V, C, h, w)`` posteriors, from a random view (global torch RNG)."""
    view = torch.randint(mean.shape[1], (mean.shape[0],), device=mean.device)
    rows = torch.arange(mean.shape[0], device=mean.device)
    mean, std = mean[rows, view], std[rows, view]
    return (mean + std * torch.randn_like(mean) - (shift_factor or 0.0)) * scaling_factor
