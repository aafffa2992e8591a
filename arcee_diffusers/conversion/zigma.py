"""Convert ZigMa's released checkpoints (CompVis/zigma, Hub repo ``taohu/zigma``) into an
``ArceeZigmaTransformer`` pipeline folder that computes exactly what ZigMa's model computes.

ZigMa's ``train_acc.py`` saves a dict: ``model`` and ``ema`` state dicts, ``opt``, ``args`` (a pickled
OmegaConf ``DictConfig``), ``train_steps``, ``best_fid``. The file is read by
``torch.load(weights_only=True)`` with inert stand-ins admitted for exactly the globals a pickled
``DictConfig`` names (``ZIGMA_ARGS_GLOBALS``), so no code from the file runs and omegaconf need not be
installed. The model's configuration comes from ``args.model.params`` and is cross-checked against the
tensors.

ZigMa's weights differ from ours (docs/model.md has the full list) by names (``x_embedder.proj``,
``t_embedder``, ``norm_f``), two row/column orders that are permuted here (time features ``[cos, sin]``
against our ``[sin, cos]``; block adaLN chunks ``shift, scale, gate`` against ``scale, gate, shift``), and
architecture options that the config switches on (``ZIGMA_RELEASE`` in the variant table).
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Any

import torch
from huggingface_hub import ModelCard
from torch import Tensor

from ..models.variants import SD_VAE_NAME, ZIGMA_HUB_REPO, ZIGMA_PAPER, ZIGMA_RELEASE
from ..pipelines import ArceeZigmaPipeline
from ..pipelines.model_card import model_card
from .core import (
    ConversionError,
    Renames,
    SafeGlobals,
    load_vae,
    map_state_dict,
    read_training_checkpoint,
    strip_wrapper_prefixes,
    write_pipeline,
)

ZIGMA_RENAMES: Renames = (
    ("x_embedder.proj.", "patch_embed.proj."),
    ("t_embedder.mlp.", "time_embed.mlp."),
    ("norm_f.", "norm_out."),
)
# ZigMa's scan types that we run: zigzagN<k>, block i scanning path i mod k
ZIGMA_SCAN_TYPES = {f"zigzagN{k}": k for k in (1, 2, 4, 8)}
# use_pe -> our position_embedding: 1 (a frozen sin-cos table) is stored like 2, so both load as "learned"
ZIGMA_POSITION_TABLES = {0: "none", 1: "learned", 2: "learned"}
# ZigMa's constructor arguments whose other values change what the weights compute
ZIGMA_FIXED_PARAMS = {
    "rms_norm": True,
    "residual_in_fp32": True,
    "norm_epsilon": 1e-5,
    "has_text": False,
    "video_frames": 0,
    "tpe": False,
}
ZIGMA_FLOW_PATH = "linear"
ZIGMA_CITATION = (
    "Vincent Tao Hu, Stefan Andreas Baumann, Ming Gui, Olga Grebenkova, Pingchuan Ma, Johannes Fischer and "
    "Björn Ommer, *ZigMa: A DiT-style Zigzag Mamba Diffusion Model*, ECCV 2024 (arXiv:2403.13802)"
)
_TEXT_KEY = re.compile(r"^(y_embedder\.|blocks\.\d+\.(msa|norm_msa)\.)")
_BLOCK_ADALN = re.compile(r"^blocks\.\d+\.adaLN_modulation\.1\.(weight|bias)$")
_TIME_FEATURES = "time_embed.mlp.0.weight"


class _OmegaConfStandIn:
    """An inert object for a pickled omegaconf object: BUILD fills its ``__dict__``, nothing else runs."""


class _DictConfig(_OmegaConfStandIn):
    pass


class _AnyNode(_OmegaConfStandIn):
    pass


def _plain_dict(default_factory: Any = None) -> dict:
    """Stands in for ``collections.defaultdict``: a pickled one only needs to hold its items."""
    return {}


# the globals a pickled DictConfig names (omegaconf 2.3 and 2.4 pickle alike), each mapped to an inert
# stand-in, as (stand-in, "module.name") pairs: the form torch.serialization.safe_globals takes
ZIGMA_ARGS_GLOBALS: SafeGlobals = [
    (dict, "builtins.dict"),
    (_plain_dict, "collections.defaultdict"),
    (_OmegaConfStandIn, "omegaconf.base.ContainerMetadata"),
    (_OmegaConfStandIn, "omegaconf.base.Metadata"),
    (_DictConfig, "omegaconf.dictconfig.DictConfig"),
    (_AnyNode, "omegaconf.nodes.AnyNode"),
    (object(), "typing.Any"),
]


def plain_args(value: Any) -> Any:
    """A stored ``args`` (stand-ins of a ``DictConfig``) as plain dicts, lists and values."""
    if isinstance(value, _DictConfig):
        content = value.__dict__.get("_content")
        return {key: plain_args(item) for key, item in content.items()} if isinstance(content, dict) else None
    if isinstance(value, _AnyNode):
        return plain_args(value.__dict__.get("_val"))
    if isinstance(value, dict):
        return {key: plain_args(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [plain_args(item) for item in value]
    return value


def load_zigma_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a ZigMa ``train_acc.py`` checkpoint without running pickled code.

    Returns the dict with ``args`` as plain dicts (see ``plain_args``) and ``ema`` (and ``model`` when there)
    checked to be state dicts of tensors, their wrapper prefixes (``module.``, ``_orig_mod.``) removed.
    """
    checkpoint = read_training_checkpoint(
        path, ZIGMA_ARGS_GLOBALS, "a pickled OmegaConf DictConfig", "ZigMa's train_acc.py"
    )
    for name in ("ema", "model"):
        if name in checkpoint:
            checkpoint[name] = strip_wrapper_prefixes(checkpoint[name])
    checkpoint["args"] = plain_args(checkpoint.get("args"))
    return checkpoint


def model_params(args: Any) -> dict[str, Any]:
    """``args.model.params`` of a stored ZigMa config (a plain dict, see ``plain_args``)."""
    params = ((args or {}).get("model") or {}).get("params") if isinstance(args, dict) else None
    if not isinstance(params, dict):
        raise ConversionError(
            "the checkpoint has no args.model.params (ZigMa's model configuration): cannot tell its input "
            "size or scan type"
        )
    return params


def _check_params(params: dict[str, Any], state_dict: dict[str, Tensor]) -> None:
    text_keys = sorted(key for key in state_dict if _TEXT_KEY.match(key))
    if text_keys or params.get("has_text") or (params.get("num_classes") or -1) > 0:
        named = ", ".join(text_keys[:4]) or "args.model.params"
        raise ConversionError(
            f"the checkpoint is text- or label-conditioned ({named}); only ZigMa's unconditional models "
            "convert (this package has no text path)"
        )
    for name, value in ZIGMA_FIXED_PARAMS.items():
        if name in params and params[name] != value:
            raise ConversionError(f"args.model.params.{name} is {params[name]!r}; only {value!r} converts")
    for name in ("img_dim", "in_channels", "patch_size", "embed_dim", "depth", "scan_type"):
        if name not in params:
            raise ConversionError(f"args.model.params has no {name!r}")
    if params["scan_type"] not in ZIGMA_SCAN_TYPES:
        raise ConversionError(
            f"args.model.params.scan_type is {params['scan_type']!r}; only {list(ZIGMA_SCAN_TYPES)} convert"
        )
    if params.get("use_pe", 0) not in ZIGMA_POSITION_TABLES:
        raise ConversionError(
            f"args.model.params.use_pe is {params['use_pe']!r}; only {list(ZIGMA_POSITION_TABLES)} convert"
        )


def infer_zigma_config(params: dict[str, Any], state_dict: dict[str, Tensor]) -> dict[str, Any]:
    """Our transformer config for ZigMa's ``args.model.params``, every value checked against the tensors."""
    _check_params(params, state_dict)
    patch_weight = state_dict.get("x_embedder.proj.weight")
    a_log = state_dict.get("blocks.0.mixer.A_log")
    in_proj = state_dict.get("blocks.0.mixer.in_proj.weight")
    conv = state_dict.get("blocks.0.mixer.conv1d.weight")
    if any(tensor is None for tensor in (patch_weight, a_log, in_proj, conv)):
        raise ConversionError(
            "missing keys x_embedder.proj.weight or blocks.0.mixer.{A_log,in_proj.weight,conv1d.weight}: "
            "is this a ZigMa checkpoint?"
        )
    position_embedding = ZIGMA_POSITION_TABLES[params.get("use_pe", 0)]
    grid = params["img_dim"] // params["patch_size"]
    depth = 1 + max(int(m.group(1)) for key in state_dict if (m := re.match(r"blocks\.(\d+)\.", key)))
    found = {
        "embed_dim": patch_weight.shape[0],
        "in_channels": patch_weight.shape[1],
        "patch_size": patch_weight.shape[2],
        "depth": depth,
    }
    if "pos_embed" in state_dict:
        found["img_dim"] = math.isqrt(state_dict["pos_embed"].shape[1]) * patch_weight.shape[2]
    mismatches = [
        f"{name} {params[name]!r} (tensors: {value!r})"
        for name, value in found.items()
        if params[name] != value
    ]
    if ("pos_embed" in state_dict) != (position_embedding != "none"):
        has = "has" if "pos_embed" in state_dict else "has no"
        mismatches.append(f"use_pe {params.get('use_pe', 0)} (the state dict {has} pos_embed)")
    if params["img_dim"] % params["patch_size"]:
        mismatches.append(f"img_dim {params['img_dim']} (not a multiple of patch_size)")
    if mismatches:
        raise ConversionError(f"args.model.params disagree with the tensors: {'; '.join(mismatches)}")
    hidden_size = params["embed_dim"]
    return {
        **ZIGMA_RELEASE,
        "sample_size": grid * params["patch_size"],
        "patch_size": params["patch_size"],
        "in_channels": params["in_channels"],
        "out_channels": params["in_channels"],
        "num_layers": params["depth"],
        "hidden_size": hidden_size,
        "d_state": a_log.shape[1],
        "d_conv": conv.shape[-1],
        "expand": in_proj.shape[0] // 2 // hidden_size,
        "num_scan_orders": ZIGMA_SCAN_TYPES[params["scan_type"]],
        "position_embedding": position_embedding,
    }


def convert_zigma_state_dict(
    state_dict: dict[str, Tensor], config: dict[str, Any], name: str = "ema"
) -> dict[str, Tensor]:
    """A ZigMa state dict under our names and orders, for a model of ``config``; every unmapped, missing
    or mis-shaped key is named in one ``ConversionError``."""
    converted = map_state_dict(strip_wrapper_prefixes(state_dict), config, ZIGMA_RENAMES, name)
    # ZigMa's time features are [cos, sin], ours [sin, cos]: swap the halves of the first layer's columns
    cos_columns, sin_columns = converted[_TIME_FEATURES].chunk(2, dim=1)
    converted[_TIME_FEATURES] = torch.cat([sin_columns, cos_columns], dim=1)
    for key in [key for key in converted if _BLOCK_ADALN.match(key)]:
        shift, scale, gate = converted[key].chunk(3, dim=0)
        converted[key] = torch.cat([scale, gate, shift], dim=0)
    return converted


def zigma_model_card(pipeline: ArceeZigmaPipeline, source_file: str, legacy_unpermute: bool) -> ModelCard:
    """The card of a converted folder: its source file, the authors, the license and the sampler."""
    rule = (
        "ZigMa's 2024-04 un-permutation rule (`legacy_unpermute=True`)"
        if legacy_unpermute
        else "the fixed un-permutation rule of ZigMa's code since 2024-05-24"
    )
    source = (
        f"Converted with `scripts/convert_zigma_checkpoint.py` from `{source_file}` of "
        f"[{ZIGMA_HUB_REPO}](https://huggingface.co/{ZIGMA_HUB_REPO}), the released weights of "
        f"{ZIGMA_CITATION}; "
        "code [CompVis/zigma](https://github.com/CompVis/zigma), Apache-2.0. Sampled as ZigMa samples: "
        "linear flow path, dopri5 (atol 1e-6, rtol 1e-3), SD-VAE latents x 0.18215, no guidance. The "
        f"conversion uses {rule}."
    )
    return model_card(
        pipeline,
        repo_id=Path(source_file).stem,
        license="apache-2.0",
        tags=["zigma", "converted"],
        vae_name=SD_VAE_NAME,
        source=source,
        paper=ZIGMA_PAPER,
    )


def convert_zigma_checkpoint(
    checkpoint: str | os.PathLike,
    output_dir: str | os.PathLike,
    weights: str = "ema",
    vae: str | os.PathLike | None = SD_VAE_NAME,
    legacy_unpermute: bool = False,
) -> ArceeZigmaPipeline:
    """Write a pipeline folder from a ZigMa checkpoint; returns the ``ArceeZigmaPipeline``.

    ``weights``: ``"ema"`` (default) or ``"model"`` (the raw weights) becomes the transformer; the other,
    when stored, is its ``raw`` / ``ema`` variant. The scheduler is ZigMa's sampler (linear path, dopri5,
    atol 1e-6, rtol 1e-3); ``vae`` an ``AutoencoderKL`` folder or repo id (sd-vae-ft-ema by default).
    ``legacy_unpermute``: for checkpoints trained under ZigMa's 2024-04 code (docs/model.md).
    """
    if weights not in ("ema", "model"):
        raise ConversionError(f"weights must be 'ema' or 'model', got {weights!r}")
    contents = load_zigma_checkpoint(checkpoint)
    if weights not in contents:
        raise ConversionError(f"checkpoint {str(checkpoint)!r} has no {weights!r} weights")
    config = infer_zigma_config(model_params(contents["args"]), contents[weights])
    config["legacy_unpermute"] = legacy_unpermute
    other = "model" if weights == "ema" else "ema"
    variants = {}
    if other in contents:  # the raw weights are diffusers' "raw" variant, the EMA ones its "ema" variant
        variant = "raw" if other == "model" else "ema"
        variants[variant] = convert_zigma_state_dict(contents[other], config, other)
    pipeline = write_pipeline(
        output_dir,
        config,
        convert_zigma_state_dict(contents[weights], config, weights),
        ZIGMA_FLOW_PATH,
        load_vae(vae, config["in_channels"]),
        variants,
    )
    zigma_model_card(pipeline, Path(checkpoint).name, legacy_unpermute).save(Path(output_dir) / "README.md")
    return pipeline
