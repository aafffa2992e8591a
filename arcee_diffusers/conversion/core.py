"""What converting any published checkpoint shares: the one key-mapping mechanism (prefix renames, checked
against the target model's keys and shapes), the VAE and the pipeline folder it writes."""

from __future__ import annotations

import argparse
import os
import pickle
import re
from pathlib import Path
from typing import Any

import torch
from diffusers import AutoencoderKL
from torch import Tensor

from ..models import ArceeZigmaTransformer
from ..models.variants import SD_VAE_NAME
from ..pipelines import ArceeZigmaPipeline
from ..schedulers import PAPER_SOLVER, FlowMatchGVPScheduler

# (their prefix, our prefix) pairs; every other key has the same name in both
Renames = tuple[tuple[str, str], ...]
# globals a weights-only load admits besides torch's own: objects, or (object, "module.name") pairs
SafeGlobals = list[Any]
# wrappers' prefixes in front of every key: DistributedDataParallel / Accelerate, torch.compile
WRAPPER_PREFIXES = ("module.", "_orig_mod.")


class ConversionError(ValueError):
    """A checkpoint that cannot be converted; the message names the file, the keys or the argument."""


def add_vae_argument(parser: argparse.ArgumentParser) -> None:
    """The converters' ``--vae``: a folder or repo id (default sd-vae-ft-ema), or ``none`` (read as None)."""
    parser.add_argument(
        "--vae",
        default=SD_VAE_NAME,
        type=lambda value: None if value.lower() == "none" else value,
        help=f'AutoencoderKL folder or repo id to include (default {SD_VAE_NAME}); "none" for no VAE.',
    )


def one_line(error: BaseException, limit: int = 300) -> str:
    return " ".join(str(error).split())[:limit]


def _refused_global(error: Exception) -> str | None:
    """The global that ``torch.load(weights_only=True)`` refused, None for any other error, such as the
    ``UnpicklingError`` of a truncated or foreign file."""
    found = re.search(r"GLOBAL ([\w.]+)", str(error)) if isinstance(error, pickle.UnpicklingError) else None
    return found.group(1) if found else None


def read_training_checkpoint(
    path: str | os.PathLike, safe_globals: SafeGlobals, admitted: str, made_by: str
) -> dict[str, Any]:
    """A training script's checkpoint, read by ``torch.load(weights_only=True)`` with ``safe_globals``
    admitted (``torch.serialization.safe_globals``' form) and no pickled code run: a dict whose ``ema``
    (and ``model``, when present) are state dicts of tensors.

    The errors are one line each, naming the file, the global a refused file needed, what ``admitted``
    (besides tensors and plain containers) and ``made_by`` (the script that writes such files).
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"checkpoint {str(path)!r} does not exist")
    try:
        with torch.serialization.safe_globals(safe_globals):
            checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # zip, EOF and storage errors of a damaged file come in unrelated types
        culprit = _refused_global(err)
        if culprit is not None:
            raise ConversionError(
                f"checkpoint {str(path)!r} needs pickled code to load ({culprit}); refusing it: only "
                f"tensors, plain containers and {admitted} are read"
            ) from None
        raise ConversionError(
            f"cannot read checkpoint {str(path)!r} (truncated or damaged?): {type(err).__name__}: "
            f"{one_line(err)}"
        ) from None

    if not isinstance(checkpoint, dict) or "ema" not in checkpoint:
        found = sorted(map(str, checkpoint)) if isinstance(checkpoint, dict) else type(checkpoint).__name__
        raise ConversionError(
            f"checkpoint {str(path)!r} is not one of {made_by}: expected a dict with 'ema' (and 'model') "
            f"state dicts, found {found}"
        )
    for name in ("ema", "model"):
        weights = checkpoint.get(name)
        if name in checkpoint and not (
            isinstance(weights, dict) and all(isinstance(v, Tensor) for v in weights.values())
        ):
            raise ConversionError(f"checkpoint {str(path)!r}: {name!r} is not a state dict of tensors")
    return checkpoint


def strip_wrapper_prefixes(state_dict: dict[str, Tensor]) -> dict[str, Tensor]:
    """Keys without the ``module.`` / ``_orig_mod.`` prefixes that training wrappers put in front."""
    stripped = {}
    for key, value in state_dict.items():
        while key.startswith(WRAPPER_PREFIXES):
            key = key.split(".", 1)[1]
        stripped[key] = value
    return stripped


def rename(key: str, renames: Renames, reverse: bool = False) -> str:
    for theirs, ours in renames:
        source, target = (ours, theirs) if reverse else (theirs, ours)
        if key.startswith(source):
            return target + key[len(source) :]
    return key


def map_state_dict(
    state_dict: dict[str, Tensor], config: dict[str, Any], renames: Renames, name: str
) -> dict[str, Tensor]:
    """``state_dict`` under our key names, checked key by key against an ``ArceeZigmaTransformer`` of
    ``config``: one ``ConversionError`` names every unmapped key, missing key and shape mismatch (under the
    checkpoint's names; ``name`` says which of its state dicts it is)."""
    converted = {rename(key, renames): value for key, value in state_dict.items()}
    with torch.device("meta"):  # the expected keys and shapes only
        expected = ArceeZigmaTransformer.from_config(config).state_dict()

    def theirs(key: str) -> str:
        return rename(key, renames, reverse=True)

    unmapped = sorted(theirs(key) for key in converted.keys() - expected.keys())
    missing = sorted(theirs(key) for key in expected.keys() - converted.keys())
    mismatched = [
        f"{theirs(key)} {tuple(converted[key].shape)} (expected {tuple(value.shape)})"
        for key, value in expected.items()
        if key in converted and converted[key].shape != value.shape
    ]
    problems = [
        f"{label}: {', '.join(keys)}"
        for label, keys in (
            ("unmapped keys", unmapped),
            ("missing keys", missing),
            ("shape mismatches", mismatched),
        )
        if keys
    ]
    if problems:
        summary = (
            f"{config['num_layers']} layers, width {config['hidden_size']}, patch {config['patch_size']}, "
            f"d_state {config['d_state']}, {config.get('scan_pattern', 'zigzag')}"
        )
        raise ConversionError(
            f"state dict {name!r} does not match the model ({summary}): " + "; ".join(problems)
        )
    return converted


def load_vae(vae: str | os.PathLike | None, in_channels: int) -> AutoencoderKL | None:
    """The ``AutoencoderKL`` folder or repo id ``vae`` (None: no VAE), checked against the model's input."""
    if vae is None:
        return None
    try:
        model = AutoencoderKL.from_pretrained(vae)
    except (OSError, ValueError) as err:
        raise ConversionError(f"cannot load vae {str(vae)!r}: {one_line(err)}") from None
    if model.config.latent_channels != in_channels:
        raise ConversionError(
            f"vae has {model.config.latent_channels} latent channels; the model takes {in_channels}"
        )
    return model


def write_pipeline(
    output_dir: str | os.PathLike,
    config: dict[str, Any],
    weights: dict[str, Tensor],
    path: str,
    vae: AutoencoderKL | None,
    variants: dict[str, dict[str, Tensor]] | None = None,
) -> ArceeZigmaPipeline:
    """Save a pipeline folder: ``weights`` as the transformer, each of ``variants`` as a weight variant of
    it (e.g. ``{"raw": ...}``), the paper's dopri5 sampler on flow ``path``, and the VAE."""
    transformer = ArceeZigmaTransformer.from_config(config)
    transformer.load_state_dict(weights)
    scheduler = FlowMatchGVPScheduler(path=path, **PAPER_SOLVER)
    pipeline = ArceeZigmaPipeline(transformer, scheduler, vae=vae)
    pipeline.save_pretrained(output_dir)
    for variant, variant_weights in (variants or {}).items():
        other = ArceeZigmaTransformer.from_config(config)
        other.load_state_dict(variant_weights)
        other.save_pretrained(Path(output_dir) / "transformer", variant=variant)
    return pipeline
