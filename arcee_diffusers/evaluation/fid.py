"""FID and KID×10³ with clean-fid (``mode="clean"``), reference features cached by folder content.

The published code caches reference statistics under a fixed name inside clean-fid's site-packages folder,
so two different "real" folders silently share statistics. Here the cache key is a hash of the folder's file
names and bytes plus the feature extractor's name, and the cache lives in a user cache folder.
clean-fid downloads its Inception network on first use; offline, pass ``feature_extractor`` (any callable
mapping a float batch ``(B, 3, 299, 299)`` in [0, 255] to ``(B, D)`` features) and ``extractor_name``.
"""

from __future__ import annotations

import hashlib
import importlib
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
from cleanfid import fid as cleanfid

from ..files import atomic_path

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp", ".npy"}


def default_cache_dir() -> Path:
    """``$ARCEE_DIFFUSERS_CACHE``, else ``$XDG_CACHE_HOME/arcee_diffusers`` (``~/.cache/arcee_diffusers``)."""
    if "ARCEE_DIFFUSERS_CACHE" in os.environ:
        return Path(os.environ["ARCEE_DIFFUSERS_CACHE"])
    return Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "arcee_diffusers"


def image_files(folder: str | os.PathLike) -> list[Path]:
    """Image files below ``folder`` (recursively), sorted; raises if the folder is missing or has none."""
    root = Path(folder)
    if not root.is_dir():
        raise FileNotFoundError(f"image folder {str(root)!r} does not exist")
    files = sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
    if not files:
        raise ValueError(f"image folder {str(root)!r} contains no images")
    return files


def folder_content_key(folder: str | os.PathLike) -> str:
    """SHA-256 over every image's relative path and bytes: equal folders share it, any edit changes it."""
    root = Path(folder)
    digest = hashlib.sha256()
    for path in image_files(root):
        digest.update(path.relative_to(root).as_posix().encode() + b"\0")
        digest.update(hashlib.sha256(path.read_bytes()).digest())
    return digest.hexdigest()


def folder_features(
    folder: str | os.PathLike | list,
    feature_extractor: Callable | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> np.ndarray:
    """clean-fid features (``mode="clean"``: PIL bicubic resize to 299) of every image in ``folder`` (or of
    a list of image files)."""
    device = torch.device(device)
    files = folder if isinstance(folder, list) else image_files(folder)
    model = feature_extractor or cleanfid.build_feature_extractor("clean", device, use_dataparallel=False)
    return cleanfid.get_files_features(
        [str(f) for f in files],
        model,
        num_workers=0,
        batch_size=batch_size,
        device=device,
        mode="clean",
        verbose=False,
    )


def reference_features(
    folder: str | os.PathLike,
    feature_extractor: Callable | None = None,
    extractor_name: str = "inception_v3",
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
) -> np.ndarray:
    """Features of a real-image folder, cached as ``<cache_dir>/fid_stats/<extractor>-<content hash>.npy``."""
    if feature_extractor is not None and extractor_name == "inception_v3":
        raise ValueError("extractor_name must name the custom feature_extractor (it keys the feature cache)")
    key = f"{extractor_name}-clean-{folder_content_key(folder)[:32]}"
    path = Path(cache_dir or default_cache_dir()) / "fid_stats" / f"{key}.npy"
    if path.exists():
        return np.load(path)
    feats = folder_features(folder, feature_extractor, device, batch_size)
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_path(path) as tmp, open(tmp, "wb") as file:  # a file object: np.save adds no ".npy"
        np.save(file, feats)
    return feats


def load_feature_extractor(spec: str) -> Callable:
    """``"module:function"``: import ``module`` and call ``function()``, which returns the extractor."""
    module_name, _, function = spec.partition(":")
    if not function:
        raise ValueError(f'feature_extractor must look like "module:function", got {spec!r}')
    return getattr(importlib.import_module(module_name), function)()


def fid_kid_from_features(gen_feats: np.ndarray, real_feats: np.ndarray) -> dict[str, float]:
    """FID and KID×10³ (clean-fid's formulas: Fréchet distance; unbiased polynomial-kernel MMD over subsets).

    clean-fid draws KID's subsets from numpy's global RNG; it is seeded here (and restored) so that equal
    features always give equal scores.
    """
    state = np.random.get_state()
    try:
        np.random.seed(0)
        kid = float(cleanfid.kernel_distance(gen_feats, real_feats))
    finally:
        np.random.set_state(state)
    return {"fid": float(cleanfid.fid_from_feats(gen_feats, real_feats)), "kid_x1e3": kid * 1e3}


def compute_fid_kid(
    generated: str | os.PathLike | list,
    reference_folder: str | os.PathLike,
    feature_extractor: Callable | None = None,
    extractor_name: str = "inception_v3",
    cache_dir: str | os.PathLike | None = None,
    device: torch.device | str = "cpu",
    batch_size: int = 64,
    real_folder: str | os.PathLike | None = None,
) -> dict[str, float]:
    """FID and KID×10³ of ``generated`` (a folder or a list of image files) against ``reference_folder``,
    whose features are cached.

    With ``real_folder`` (real images outside the reference, as many as generated; features cached too) also
    their FID and KID×10³ against the reference (``fid_real``, ``kid_x1e3_real``: what a perfect generator
    would score with as many samples) and ``frechet_ratio``, the samples' FID over ``fid_real``.
    """
    options = (feature_extractor, extractor_name, cache_dir, device, batch_size)
    reference = reference_features(reference_folder, *options)
    generated = folder_features(generated, feature_extractor, device, batch_size)
    metrics = {
        **fid_kid_from_features(generated, reference),
        "num_generated": len(generated),
        "num_reference": len(reference),
        "feature_extractor": extractor_name,
    }
    if real_folder is not None:
        real = reference_features(real_folder, *options)
        floor = fid_kid_from_features(real, reference)
        metrics.update(
            fid_real=floor["fid"],
            kid_x1e3_real=floor["kid_x1e3"],
            num_real=len(real),
            frechet_ratio=metrics["fid"] / floor["fid"],
        )
    return metrics
