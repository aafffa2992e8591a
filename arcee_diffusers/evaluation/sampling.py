"""Sample generation for evaluation: one seed per sample, resumable folders, image grids.

Sample ``i`` always uses seed ``seed + i`` (its own ``torch.Generator``) and, for a class-conditional
model, label ``i % num_classes``: a sample's content depends on its index only, never on the batch it was
made in or on how often the run was interrupted. A resumed run lists the PNGs already written and makes only
the missing indices; ``generation.json`` records the settings (the weights' digest and the solver among
them) and a resume with different ones is refused.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from ..files import atomic_path, write_atomically

SETTINGS_FILE = "generation.json"
MODEL_CALLS_FILE = "model_calls.json"


def sample_label(index: int, num_classes: int | None) -> int | None:
    return index % num_classes if num_classes else None


def sample_images(
    pipeline,
    indices: list[int] | range,
    seed: int = 0,
    guidance_scale: float = 1.0,
    num_inference_steps: int | None = None,
    batch_size: int = 64,
) -> tuple[np.ndarray, np.ndarray | None, list[int]]:
    """Images ``(N, H, W, C)`` in [0, 1] for sample ``indices``, their labels (None for unconditional
    models) and, per sample, the true number of model calls that made it (adaptive solvers vary)."""
    num_classes = pipeline.transformer.config.num_classes
    device = pipeline._execution_device
    indices = list(indices)
    images, model_calls = [], []
    for start in range(0, len(indices), batch_size):
        chunk = indices[start : start + batch_size]
        generators = [torch.Generator(device).manual_seed(seed + i) for i in chunk]
        labels = [sample_label(i, num_classes) for i in chunk] if num_classes else None
        output = pipeline(
            batch_size=len(chunk),
            class_labels=labels,
            guidance_scale=guidance_scale,
            num_inference_steps=num_inference_steps,
            generator=generators,
            output_type="np",
        )
        images.append(output.images)
        model_calls += [output.nfe] * len(chunk)
    labels = np.array([sample_label(i, num_classes) for i in indices]) if num_classes else None
    return np.concatenate(images), labels, model_calls


def to_uint8(images: np.ndarray) -> np.ndarray:
    return np.rint(np.clip(images, 0, 1) * 255).astype(np.uint8)


def _to_pil(image: np.ndarray) -> Image.Image:
    image = to_uint8(image)
    return Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image)


def save_image_grid(
    images: np.ndarray,
    path: str | os.PathLike,
    num_columns: int | None = None,
    scale: int = 1,
    gutter: int = 2,
    gutter_value: float = 0.5,
) -> Image.Image:
    """Tile ``(N, H, W, C)`` images in [0, 1] into one PNG, each ``scale``× nearest-neighbour upsampled,
    with ``gutter`` pixels of grey ``gutter_value`` between and around the tiles so that neighbours never
    touch (8×8 digits on black would otherwise run into each other)."""
    images = np.repeat(np.repeat(images, scale, axis=1), scale, axis=2)
    count, height, width, channels = images.shape
    num_columns = num_columns or math.ceil(math.sqrt(count))
    num_rows = math.ceil(count / num_columns)
    step_y, step_x = height + gutter, width + gutter
    grid = np.full(
        (num_rows * step_y + gutter, num_columns * step_x + gutter, channels), gutter_value, images.dtype
    )
    for i, image in enumerate(images):
        row, col = divmod(i, num_columns)
        top, left = gutter + row * step_y, gutter + col * step_x
        grid[top : top + height, left : left + width] = image
    picture = _to_pil(grid)
    picture.save(path)
    return picture


def generate_samples(
    pipeline,
    folder: str | os.PathLike,
    num_samples: int,
    seed: int = 0,
    guidance_scale: float = 1.0,
    num_inference_steps: int | None = None,
    batch_size: int = 64,
) -> list[Path]:
    """Write samples ``0 .. num_samples-1`` to ``folder/<index>.png``, skipping those already there.

    Returns the paths of the ``num_samples`` samples (without the extras of a larger earlier run). Each PNG
    is written to a temporary name and renamed, so an interrupted run never leaves a truncated sample that a
    resume would keep.
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    settings = {
        "seed": seed,
        "guidance_scale": guidance_scale,
        "num_inference_steps": num_inference_steps,
        "solver": describe_solver(pipeline, num_inference_steps),
        "weights": weights_digest(pipeline.transformer),
        "num_classes": pipeline.transformer.config.num_classes,
        "label_rule": "index % num_classes",
        "seed_rule": "seed + index",
    }
    settings_path = folder / SETTINGS_FILE
    if settings_path.exists():
        previous = json.loads(settings_path.read_text())
        if previous != settings:
            raise ValueError(
                f"{str(folder)!r} holds samples made with {previous}, not {settings}; use a new folder"
            )
    else:
        settings_path.write_text(json.dumps(settings, indent=2))

    existing = {int(p.stem) for p in folder.glob("*.png") if p.stem.isdigit()}
    missing = [i for i in range(num_samples) if i not in existing]
    calls_path = folder / MODEL_CALLS_FILE
    calls = json.loads(calls_path.read_text()) if calls_path.exists() else {}
    for start in range(0, len(missing), batch_size):
        chunk = missing[start : start + batch_size]
        images, _, chunk_calls = sample_images(
            pipeline, chunk, seed, guidance_scale, num_inference_steps, batch_size
        )
        for index, image in zip(chunk, images):
            with atomic_path(sample_path(folder, index)) as tmp:
                _to_pil(image).save(tmp, format="PNG")
        calls.update({str(index): count for index, count in zip(chunk, chunk_calls)})
        write_atomically(calls_path, json.dumps(calls))
    return [sample_path(folder, i) for i in range(num_samples)]


def weights_digest(model: torch.nn.Module) -> str:
    """A short SHA-256 of ``model``'s state dict (names, dtypes, shapes and bytes): samples from other
    weights, such as the raw ones instead of the EMA, never join a folder."""
    digest = hashlib.sha256()
    for name, tensor in model.state_dict().items():
        digest.update(f"{name} {tensor.dtype} {tuple(tensor.shape)}".encode())
        digest.update(tensor.detach().cpu().contiguous().flatten().view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()[:16]


def describe_solver(pipeline, num_inference_steps: int | None) -> str:
    """How ``pipeline(num_inference_steps=...)`` integrates the ODE, for metric reports and model cards."""
    scheduler, config = pipeline.scheduler, pipeline.scheduler.config
    if num_inference_steps is None or config.get("solver") == "dopri5":
        atol, rtol = config.get("atol", 1e-6), config.get("rtol", 1e-3)
        return f"dopri5 (adaptive, atol {atol:g}, rtol {rtol:g})"
    solver = f" {config['solver']}" if "solver" in config else ""
    return f"{type(scheduler).__name__}{solver}, {num_inference_steps} steps"


def mean_model_calls(folder: str | os.PathLike, num_samples: int) -> float | None:
    """Mean true model calls per sample over samples ``0 .. num_samples-1`` (None if not all recorded)."""
    calls_path = Path(folder) / MODEL_CALLS_FILE
    calls = json.loads(calls_path.read_text()) if calls_path.exists() else {}
    recorded = [calls.get(str(i)) for i in range(num_samples)]
    return None if None in recorded or not recorded else float(np.mean(recorded))


def sample_path(folder: Path, index: int) -> Path:
    return folder / f"{index:06d}.png"
