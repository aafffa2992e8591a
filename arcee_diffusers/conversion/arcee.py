"""Convert checkpoints of the published Arcee code into an ``ArceeZigmaPipeline`` folder.

The published trainer (JiteshChavan/Arcee-Mamba-for-Generative-Vision-Modeling, ``Arcee/train.py``) saves
``content.pth`` and ``epoch<E>_step<S>.pt``: a dict with the raw weights under ``model``, their EMA under
``ema``, and ``opt``, ``epoch``, ``step``, ``args`` (its ``argparse.Namespace``), ``data_loader_state``.
Its state dicts differ from ours only in

- the embedders' names: ``x_embedder.proj`` / ``t_embedder`` / ``y_embedder`` here are ``patch_embed.proj``
  / ``time_embed`` / ``label_embed``;
- the head's adaLN rows: ``[scale, shift]`` there, ``[shift, scale]`` here;
- the scan paths, stored there as buffers (``blocks.<i>.mixer.zigzag_paths`` and ``..._reverse``, or the
  model-level ``locked_permutation_path`` and ``..._r`` of Arcee_1, which permutes once outside the blocks),
  recomputed from the config here: they are checked against our zigzag paths, then dropped.

Arcee and its ZigMa baseline have the same tensors, so the state chain comes from the published scan-type
name (``PUBLISHED_SCAN_TYPES``); everything else (depth, width, patch, d_state, input size, channels,
labels, Vision Mamba's second branch) is read from the tensors and checked against the given names.
"""

from __future__ import annotations

import argparse
import math
import os
import re
from typing import Any

import torch
from torch import Tensor

from ..models import PRESETS, VARIANTS
from ..models.scan_orders import inverse_permutation, zigzag_paths
from ..models.variants import DEMO_PRESET, LAYOUT_KEYS, SD_VAE_NAME, layout_of
from ..pipelines import ArceeZigmaPipeline
from .core import (
    ConversionError,
    Renames,
    load_vae,
    map_state_dict,
    read_training_checkpoint,
    strip_wrapper_prefixes,
    write_pipeline,
)

# published --scan-type -> our scan layout (the variant table's published_scan_type column)
PUBLISHED_SCAN_TYPES: dict[str, dict[str, Any]] = {
    variant.published_scan_type: dict(zip(LAYOUT_KEYS, layout_of(variant.config)))
    for variant in VARIANTS
    if variant.published_scan_type is not None
}
# published --model -> (depth, width, patch): "Arcee-" / "Zigma-" + each published size (one architecture,
# named after the mixer the scan type picks), and Vision Mamba's Vim-B/2
_SHAPES = {
    size: (preset["num_layers"], preset["hidden_size"], preset["patch_size"])
    for size, preset in PRESETS.items()
    if size != DEMO_PRESET
}
_VIM_SHAPE = _SHAPES.pop("Vim-B/2")
PUBLISHED_MODELS: dict[str, tuple[int, int, int]] = {
    **{f"{family}-{size}": shape for size, shape in _SHAPES.items() for family in ("Arcee", "Zigma")},
    "Vim-B/2": _VIM_SHAPE,
}
# the scan-type prefix each model family runs with
_FAMILY_SCAN_TYPES = {"Arcee": ("Arcee_",), "Zigma": ("Zigma_",), "Vim": ("V2",)}
_RENAMES: Renames = (
    ("x_embedder.proj.", "patch_embed.proj."),
    ("t_embedder.mlp.", "time_embed.mlp."),
    ("y_embedder.embedding_table.", "label_embed.embedding_table."),
)
_HEAD_MODULATION = ("final_layer.adaLN_modulation.1.weight", "final_layer.adaLN_modulation.1.bias")
_LOCKED_PATHS = ("locked_permutation_path", "locked_permutation_path_r")
_BLOCK_PATHS = ("zigzag_paths", "zigzag_paths_reverse")
_BLOCK_PATH_KEY = re.compile(r"^blocks\.\d+\.mixer\.zigzag_paths(_reverse)?$")
# published training flags whose other values change the architecture or the prediction
_SUPPORTED_ARGS = {
    "rms_norm": (True,),
    "pe_type": ("ape",),
    "learn_sigma": (False,),
    "use_final_norm": (False,),
    "block_type": ("normal",),
    "is_moe": (False,),
    "use_attn_every_k_layers": (-1, 0),
    "prediction": ("velocity",),
    "path_type": ("GVP", "Linear"),
}


def resolve_scan_type(name: str) -> str:
    """The canonical published scan-type name (``"arcee_4"`` -> ``"Arcee_4"``)."""
    for canonical in PUBLISHED_SCAN_TYPES:
        if canonical.lower() == str(name).lower():
            return canonical
    raise ConversionError(f"scan_type must be one of {list(PUBLISHED_SCAN_TYPES)}, got {name!r}")


def load_published_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a published ``content.pth`` / ``epoch*_step*.pt`` without running pickled code.

    ``torch.load(weights_only=True)`` admits tensors and plain containers; ``argparse.Namespace`` (the
    stored ``args``, a bag of attributes) is the one class added. Returns the dict, with ``ema`` (and
    ``model``, when present) checked to be state dicts.
    """
    return read_training_checkpoint(
        path, [argparse.Namespace], "argparse.Namespace", "the published train.py"
    )


def infer_config(state_dict: dict[str, Tensor], scan_type: str, model: str | None = None) -> dict[str, Any]:
    """Our transformer config for a published state dict, its ``--scan-type`` and (optionally) ``--model``."""
    scan_type = resolve_scan_type(scan_type)
    needed = (
        "pos_embed",
        "x_embedder.proj.weight",
        "y_embedder.embedding_table.weight",
        "blocks.0.mixer.in_proj.weight",
        "blocks.0.mixer.conv1d.weight",
        "blocks.0.mixer.A_log",
        "final_layer.linear.weight",
    )
    missing = [key for key in needed if key not in state_dict]
    if missing:
        raise ConversionError(
            f"cannot infer the model configuration: missing keys {missing} (is this a checkpoint of the "
            "published Arcee/ZigMa/Vim model?)"
        )
    patch_weight = state_dict["x_embedder.proj.weight"]
    if patch_weight.ndim != 4 or patch_weight.shape[2] != patch_weight.shape[3]:
        raise ConversionError(
            f"x_embedder.proj.weight must be a square conv kernel (width, channels, patch, patch), "
            f"got shape {tuple(patch_weight.shape)}"
        )
    hidden_size, in_channels, patch_size, _ = patch_weight.shape
    num_tokens = state_dict["pos_embed"].shape[1]
    grid_size = math.isqrt(num_tokens)
    if grid_size * grid_size != num_tokens:
        raise ConversionError(f"pos_embed has {num_tokens} tokens, not a square grid")
    out_rows = state_dict["final_layer.linear.weight"].shape[0]
    if out_rows != patch_size * patch_size * in_channels:
        raise ConversionError(
            f"final_layer.linear.weight has {out_rows} rows, not patch² × {in_channels} input channels: "
            "learn-sigma checkpoints (twice the channels) are not supported"
        )
    d_inner = state_dict["blocks.0.mixer.in_proj.weight"].shape[0] // 2
    if d_inner % hidden_size != 0:
        raise ConversionError(
            f"blocks.0.mixer.in_proj.weight: d_inner {d_inner} is not a multiple of {hidden_size}"
        )
    label_rows = state_dict["y_embedder.embedding_table.weight"].shape[0]
    block_indices = {int(m.group(1)) for key in state_dict if (m := re.match(r"blocks\.(\d+)\.", key))}
    config = {
        "sample_size": grid_size * patch_size,
        "patch_size": patch_size,
        "in_channels": in_channels,
        "out_channels": in_channels,
        "num_layers": 1 + max(block_indices),
        "hidden_size": hidden_size,
        "d_state": state_dict["blocks.0.mixer.A_log"].shape[1],
        # the published table's last row is the null label (the only row of an unconditional model)
        "num_classes": None if label_rows == 1 else label_rows - 1,
        "d_conv": state_dict["blocks.0.mixer.conv1d.weight"].shape[-1],
        "expand": d_inner // hidden_size,
        **PUBLISHED_SCAN_TYPES[scan_type],
    }

    bidirectional = "blocks.0.mixer.dt_proj_b.weight" in state_dict
    if bidirectional != (config["scan_pattern"] == "bidirectional"):
        has = "has" if bidirectional else "has no"
        raise ConversionError(
            f"scan_type {scan_type} is {config['scan_pattern']}, but the checkpoint {has} Vision Mamba's "
            "backward branch (blocks.0.mixer.dt_proj_b.*): give its own scan type"
        )
    if model is not None:
        _check_model_name(model, scan_type, config)
    return config


def _check_model_name(model: str, scan_type: str, config: dict[str, Any]) -> None:
    if model not in PUBLISHED_MODELS:
        raise ConversionError(f"model must be one of {list(PUBLISHED_MODELS)} (or omitted), got {model!r}")
    family = model.split("-")[0]
    if not scan_type.startswith(_FAMILY_SCAN_TYPES[family]):
        raise ConversionError(f"model {model} does not run scan_type {scan_type}")
    expected = PUBLISHED_MODELS[model]
    found = (config["num_layers"], config["hidden_size"], config["patch_size"])
    if found != expected:
        raise ConversionError(
            f"model {model} has depth, width, patch {expected}; the checkpoint's tensors have {found}"
        )


def training_args(checkpoint: dict[str, Any]) -> dict[str, Any]:
    """The checkpoint's stored training arguments as a dict (empty when it has none)."""
    args = checkpoint.get("args")
    if isinstance(args, argparse.Namespace):
        return vars(args)
    return dict(args) if isinstance(args, dict) else {}


def check_published_args(stored: dict[str, Any], scan_type: str, model: str | None = None) -> None:
    """Compare stored training arguments with the given names and the options that convert."""
    trained_scan_type = stored.get("scan_type")
    if trained_scan_type is not None and str(trained_scan_type).lower() != scan_type.lower():
        raise ConversionError(
            f"scan_type {scan_type}, but the checkpoint was trained with --scan-type {trained_scan_type}"
        )
    trained_model = stored.get("model")
    if model is not None and trained_model is not None and trained_model != model:
        raise ConversionError(f"model {model}, but the checkpoint was trained with --model {trained_model}")
    for name, supported in _SUPPORTED_ARGS.items():
        if name in stored and stored[name] not in supported:
            flag = "--" + name.replace("_", "-")
            raise ConversionError(
                f"the checkpoint was trained with {flag} {stored[name]!r}; only {list(supported)} convert"
            )


def _describe_paths(locked: bool, block_orders: int | None) -> str:
    if locked:
        return "one model-level zigzag path (locked_permutation_path: Arcee_1)"
    if block_orders is not None:
        return (
            f"{block_orders} zigzag path(s) in each block (blocks.*.mixer.zigzag_paths: Zigma_k, Arcee_k>1)"
        )
    return "no scan-path buffers (Vision Mamba: V2 or V2RC)"


def _pop_scan_paths(state_dict: dict[str, Tensor], config: dict[str, Any]) -> None:
    """Remove the published scan-path buffers after checking them against ``config``'s zigzag paths."""
    locked = {key: state_dict.pop(key) for key in _LOCKED_PATHS if key in state_dict}
    in_blocks = {key: state_dict.pop(key) for key in list(state_dict) if _BLOCK_PATH_KEY.match(key)}
    num_orders, zigzag = config["num_scan_orders"], config["scan_pattern"] == "zigzag"
    expect_locked = zigzag and num_orders == 1 and config["state_chain"]
    expect_blocks = zigzag and not expect_locked
    block_orders = next(iter(in_blocks.values())).shape[0] if in_blocks else None
    expected = _describe_paths(expect_locked, num_orders if expect_blocks else None)
    found = _describe_paths(bool(locked), block_orders)
    if expected != found:
        raise ConversionError(f"the scan type has {expected}, but the checkpoint has {found}")
    if expect_blocks:
        wanted = {f"blocks.{i}.mixer.{name}" for i in range(config["num_layers"]) for name in _BLOCK_PATHS}
        if in_blocks.keys() != wanted:
            raise ConversionError(f"missing scan-path buffers {sorted(wanted - in_blocks.keys())}")

    grid_size = config["sample_size"] // config["patch_size"]
    paths = zigzag_paths(grid_size)[:num_orders]
    reverse = torch.stack([inverse_permutation(path) for path in paths])
    pairs = [(locked[_LOCKED_PATHS[0]], locked[_LOCKED_PATHS[1]])] if locked else []
    pairs += [
        (in_blocks[key], in_blocks[key + "_reverse"]) for key in in_blocks if key.endswith("zigzag_paths")
    ]
    for forward, backward in pairs:
        if not (torch.equal(forward.long(), paths) and torch.equal(backward.long(), reverse)):
            raise ConversionError(
                "the checkpoint's scan paths differ from the zigzag paths of its token grid"
            )


def convert_state_dict(
    state_dict: dict[str, Tensor], config: dict[str, Any], name: str = "ema"
) -> dict[str, Tensor]:
    """A published state dict in our key names and head layout, for a model of ``config``.

    Raises one ``ConversionError`` naming every unmapped key, missing key and shape mismatch (``name`` says
    which of the checkpoint's state dicts it is).
    """
    state_dict = strip_wrapper_prefixes(state_dict)
    _pop_scan_paths(state_dict, config)
    converted = map_state_dict(state_dict, config, _RENAMES, name)
    for key in _HEAD_MODULATION:
        scale, shift = converted[key].chunk(2, dim=0)
        converted[key] = torch.cat([shift, scale], dim=0)
    return converted


def convert_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    scan_type: str,
    model: str | None = None,
    vae: str | os.PathLike | None = SD_VAE_NAME,
    path: str | None = None,
) -> ArceeZigmaPipeline:
    """Write a pipeline folder from a published checkpoint; returns the ``ArceeZigmaPipeline``.

    The EMA weights become the transformer, the raw weights (``model``) its ``raw`` variant. The scheduler
    is the paper's sampler (dopri5, atol 1e-6, rtol 1e-3) on ``path`` (default: the checkpoint's
    ``--path-type``, else GVP). ``vae``: an ``AutoencoderKL`` folder or repo id saved into the folder (the
    paper's SD-VAE by default); None writes no VAE (then pass ``vae=`` to ``from_pretrained``).
    """
    scan_type = resolve_scan_type(scan_type)
    contents = load_published_checkpoint(checkpoint)
    stored = training_args(contents)
    check_published_args(stored, scan_type, model)
    config = infer_config(strip_wrapper_prefixes(contents["ema"]), scan_type, model)
    weights = {
        name: convert_state_dict(contents[name], config, name)
        for name in ("ema", "model")
        if name in contents
    }

    trained_path = str(stored["path_type"]).lower() if "path_type" in stored else None
    if path is not None and trained_path is not None and path != trained_path:
        raise ConversionError(
            f"path {path!r}, but the checkpoint was trained with --path-type {stored['path_type']}"
        )
    path = path or trained_path or "gvp"
    raw = {"raw": weights["model"]} if "model" in weights else {}
    return write_pipeline(output_dir, config, weights["ema"], path, load_vae(vae, config["in_channels"]), raw)
