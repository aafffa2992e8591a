"""Atomic Accelerate checkpoints, `latest` resolution and the diffusers-style model/EMA save hooks.

A checkpoint is written by every rank into ``.checkpoint-<step>.partial``; the main process then fsyncs
every file and renames the folder to ``checkpoint-<step>``. A crash at any point leaves either a complete
``checkpoint-<step>`` or a ``.partial`` folder that ``latest`` never matches (and that the next save removes).
"""

from __future__ import annotations

import os
import re
import shutil
from collections.abc import Collection
from pathlib import Path

from accelerate import Accelerator
from diffusers.training_utils import EMAModel
from diffusers.utils import SAFETENSORS_WEIGHTS_NAME
from safetensors.torch import load_file

CHECKPOINT_PATTERN = re.compile(r"^checkpoint-(\d+)$")
MODEL_FOLDER = "transformer"
EMA_FOLDER = "transformer_ema"


def list_checkpoints(output_dir: str | os.PathLike) -> list[Path]:
    """Complete checkpoints in ``output_dir``, oldest first."""
    root = Path(output_dir)
    if not root.is_dir():
        return []
    found = [(int(m.group(1)), p) for p in root.iterdir() if (m := CHECKPOINT_PATTERN.match(p.name))]
    return [p for _, p in sorted(found)]


def checkpoint_step(path: str | os.PathLike) -> int:
    match = CHECKPOINT_PATTERN.match(Path(path).name)
    if match is None:
        raise ValueError(f"resume_from_checkpoint {str(path)!r} is not a folder named checkpoint-<step>")
    return int(match.group(1))


def resolve_checkpoint(output_dir: str | os.PathLike, resume_from_checkpoint: str | None) -> Path | None:
    """``"latest"`` → newest complete checkpoint (None if there is none); a name or path → that folder."""
    if resume_from_checkpoint is None:
        return None
    if resume_from_checkpoint == "latest":
        checkpoints = list_checkpoints(output_dir)
        return checkpoints[-1] if checkpoints else None
    path = Path(resume_from_checkpoint)
    if not path.is_absolute() and not path.exists():
        path = Path(output_dir) / path
    if not path.is_dir():
        raise FileNotFoundError(f"resume_from_checkpoint {resume_from_checkpoint!r} does not exist")
    checkpoint_step(path)
    return path


def _fsync_tree(root: Path) -> None:
    for directory, _, files in os.walk(root):
        for name in files:
            with open(os.path.join(directory, name), "rb") as f:
                os.fsync(f.fileno())
        _fsync_dir(Path(directory))


def _fsync_dir(directory: Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_checkpoint(
    accelerator: Accelerator,
    output_dir: str | os.PathLike,
    step: int,
    total_limit: int | None = None,
    keep_steps: Collection[int] = (),
) -> Path:
    """``accelerator.save_state`` on every rank, made atomic; prunes to ``total_limit`` checkpoints, not
    counting those of ``keep_steps``, which are never pruned."""
    root = Path(output_dir)
    final, partial = root / f"checkpoint-{step}", root / f".checkpoint-{step}.partial"
    if accelerator.is_main_process:
        for stale in root.glob(".checkpoint-*.partial"):
            shutil.rmtree(stale)
        existing = [p for p in list_checkpoints(root) if p != final and checkpoint_step(p) not in keep_steps]
        if total_limit is not None and step not in keep_steps and len(existing) >= total_limit:
            for old in existing[: len(existing) - total_limit + 1]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        _fsync_tree(partial)
        if final.exists():
            shutil.rmtree(final)
        os.replace(partial, final)
        _fsync_dir(root)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator: Accelerator, path: str | os.PathLike) -> int:
    """Restore everything ``save_checkpoint`` stored; returns the step. Damage → one-line ``ValueError``."""
    step = checkpoint_step(path)
    try:
        accelerator.load_state(str(path))
    except Exception as err:  # torch, safetensors and pickle raise unrelated types for damaged files
        reason = " ".join(str(err).split())[:300]
        raise ValueError(f"corrupt checkpoint {str(path)!r}: {type(err).__name__}: {reason}") from None
    return step


def register_model_hooks(accelerator: Accelerator, model_cls: type, ema: EMAModel | None = None) -> None:
    """Save the model (and EMA) with ``save_pretrained`` (safetensors) inside each checkpoint, as diffusers'
    example scripts do, and load them back on ``load_state``."""

    def save_hook(models, weights, output_dir):
        if accelerator.is_main_process:
            for model in models:
                accelerator.unwrap_model(model).save_pretrained(os.path.join(output_dir, MODEL_FOLDER))
            if ema is not None:
                ema.save_pretrained(os.path.join(output_dir, EMA_FOLDER))
        weights.clear()

    def load_hook(models, input_dir):
        loaded = model_cls.from_pretrained(input_dir, subfolder=MODEL_FOLDER)
        while models:  # emptied: Accelerate would load them again otherwise
            accelerator.unwrap_model(models.pop()).load_state_dict(loaded.state_dict())
        if ema is not None:
            # EMAModel.save_pretrained stores its counters in the config next to the averaged weights; the
            # weights are read by name (from_pretrained would warn that the counters are no model options)
            ema_dir = os.path.join(input_dir, EMA_FOLDER)
            config = model_cls.load_config(ema_dir)
            state = {key: config[key] for key in ema.state_dict() if key != "shadow_params"}
            weights = load_file(os.path.join(ema_dir, SAFETENSORS_WEIGHTS_NAME))
            shadow = [weights[name] for name, _ in loaded.named_parameters()]
            ema.load_state_dict({**state, "shadow_params": shadow})

    accelerator.register_save_state_pre_hook(save_hook)
    accelerator.register_load_state_pre_hook(load_hook)
