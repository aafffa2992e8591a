"""timm models of the Arcee/ZigMa backbone (arXiv 2511.11243): the diffusers blocks as an isotropic model.

``ArceeZigma`` runs the patch embedding, position table and adaLN Mamba blocks of ``ArceeZigmaTransformer``
under the same state-dict keys, without a timestep or a label: one learned conditioning vector stands in for
``t_emb(t) + y_emb(y)``. It follows timm's ViT contract (``forward_features``, ``forward_head``,
``forward_intermediates``, ``prune_intermediate_layers``, ``features_only=True``), and its
``pretrained_filter_fn`` converts a diffusers checkpoint, so a trained generator loads as a backbone offline::

    model = timm.create_model(
        "arcee_zigma_b_p2_k4",
        pretrained=True,
        pretrained_cfg_overlay=dict(file="transformer/diffusion_pytorch_model.safetensors"),
    )

Importing ``arcee_diffusers`` registers the ``arcee_zigma_*`` names (timm has no entry-point discovery).
"""

from __future__ import annotations

import json
import re
from functools import partial
from pathlib import Path

import torch
import torch.utils.checkpoint
from timm.models import build_model_with_cfg, generate_default_cfgs, register_model
from timm.models._features import feature_take_indices
from torch import Tensor, nn

from .models.embeddings import PatchEmbed, TimestepEmbedder, init_position_table, position_table
from .models.mamba_blocks import build_mamba_blocks, init_mamba_blocks, run_mamba_blocks
from .models.scan_orders import validate_scan_config
from .models.variants import VARIANTS, Variant, layout_of

__all__ = ["ArceeZigma", "checkpoint_filter_fn", "diffusers_conditioning"]

POOL_TYPES = ("", "avg", "max")
# SiT's flow-time convention: t = 0 is noise, t = 1 is data.
DATA_END_TIME = 1.0
# Parts of an ArceeZigmaTransformer checkpoint that the timm model does not have.
_DIFFUSERS_ONLY_PREFIXES = ("time_embed.", "label_embed.", "final_layer.")
# diffusers config entry -> timm model argument, for the architecture (input size and channels aside)
_ARCHITECTURE_ARGS = {
    "patch_size": "patch_size",
    "hidden_size": "embed_dim",
    "num_layers": "depth",
    "d_state": "d_state",
    "scan_pattern": "scan_pattern",
    "num_scan_orders": "num_scan_orders",
    "state_chain": "state_chain",
    "d_conv": "d_conv",
    "expand": "expand",
    "position_embedding": "position_embedding",
    "final_norm": "final_norm",
    "legacy_unpermute": "legacy_unpermute",
    "timestep_scale": "timestep_scale",
}
# the config entries a checkpoint's config.json must agree on with the model (the weights cannot tell)
_CHECKED_KEYS = (
    "patch_size",
    "scan_pattern",
    "num_scan_orders",
    "state_chain",
    "legacy_unpermute",
    "timestep_scale",
)
_CONFIG_TO_MODEL_ARGS = {"sample_size": "img_size", **{key: _ARCHITECTURE_ARGS[key] for key in _CHECKED_KEYS}}

_checkpoint = partial(torch.utils.checkpoint.checkpoint, use_reentrant=False)


def _square_size(img_size: int | tuple[int, int] | list[int]) -> int:
    if isinstance(img_size, int) and not isinstance(img_size, bool):
        size = (img_size, img_size)
    elif isinstance(img_size, (tuple, list)) and len(img_size) == 2:
        size = tuple(img_size)
    else:
        raise TypeError(f"img_size must be an int or a (height, width) pair, got {img_size!r}")
    if size[0] != size[1] or not isinstance(size[0], int) or size[0] < 1:
        raise ValueError(
            f"img_size must be square and positive (2-D sin-cos position table), got {img_size!r}"
        )
    return size[0]


def _check_pool(global_pool: str) -> None:
    if global_pool not in POOL_TYPES:
        raise ValueError(f"global_pool must be one of {POOL_TYPES}, got {global_pool!r}")


class ArceeZigma(nn.Module):
    """Zigzag-Mamba / Vision Mamba image backbone with Arcee's state chain, as an isotropic timm model.

    Patches plus a 2-D sin-cos position table go through ``depth`` adaLN Mamba blocks, all modulated by one
    learned ``conditioning`` vector; the tokens are normalised by the diffusers head's LayerNorm (no affine,
    so no new parameters), average-pooled and classified. With ``state_chain=True`` (Arcee) block k+1's scan
    starts from block k's final state; ``state_chain=False`` is the ZigMa / Vim baseline, same parameters.

    Args:
        img_size: Input height and width (square; the position table is not resampled).
        patch_size: Side of the square patches; must divide ``img_size``. Also the feature reduction.
        in_chans: Input channels (4 for SD-VAE latents, the paper's input).
        num_classes: Classifier outputs; 0 for no classifier.
        global_pool: Token pooling before the classifier: ``"avg"``, ``"max"`` or ``""`` (none).
        embed_dim: Token width ``d_model``.
        depth: Number of Mamba blocks.
        d_state: SSM state size (256 in every paper run).
        scan_pattern: ``"zigzag"`` (ZigMa's paths) or ``"bidirectional"`` (Vision Mamba).
        num_scan_orders: ``k`` of Zigma-k / Arcee-k (1, 2, 4 or 8): block ``i`` scans along path ``i mod k``.
        state_chain: Arcee's state chain between blocks.
        d_conv: Kernel size of the mixers' causal depthwise convolution.
        expand: ``d_inner = expand * embed_dim``.
        drop_rate: Dropout before the classifier.
        backward_dt_init: Initialisation of the bidirectional mixers' backward ``dt_proj_b``: ``"zero"``
            (the published code's zero bias) or ``"mamba"`` (the forward direction's dt init), as in
            ``ArceeZigmaTransformer``.
        scan_backend: Backend passed to ``arcee_scan.selective_scan`` (None = automatic).
        position_embedding, final_norm, legacy_unpermute: As in ``ArceeZigmaTransformer`` (ZigMa's released
            models: ``"learned"`` or ``"none"``, True, and the 2024-04 rule when needed).
        timestep_scale: The generator's time scale, used only to convert its checkpoint's conditioning.
    """

    def __init__(
        self,
        img_size: int | tuple[int, int] = 32,
        patch_size: int = 2,
        in_chans: int = 4,
        num_classes: int = 1000,
        global_pool: str = "avg",
        embed_dim: int = 768,
        depth: int = 24,
        d_state: int = 256,
        scan_pattern: str = "zigzag",
        num_scan_orders: int = 1,
        state_chain: bool = True,
        d_conv: int = 4,
        expand: int = 2,
        drop_rate: float = 0.0,
        backward_dt_init: str = "zero",
        scan_backend: str | None = None,
        position_embedding: str = "sincos",
        final_norm: bool = False,
        legacy_unpermute: bool = False,
        timestep_scale: float = 1.0,
    ):
        super().__init__()
        validate_scan_config(scan_pattern, num_scan_orders)
        _check_pool(global_pool)
        img_size = _square_size(img_size)
        if img_size % patch_size != 0:
            raise ValueError(f"img_size ({img_size}) must be divisible by patch_size ({patch_size})")
        self.img_size = img_size
        self.patch_size = patch_size
        self.grid_size = img_size // patch_size
        self.in_chans = in_chans
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_features = self.head_hidden_size = self.embed_dim = embed_dim
        self.scan_pattern = scan_pattern
        self.num_scan_orders = num_scan_orders
        self.state_chain = state_chain
        self.position_embedding = position_embedding
        self.legacy_unpermute = legacy_unpermute
        self.timestep_scale = timestep_scale
        self.grad_checkpointing = False

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim)
        self.pos_embed = position_table(position_embedding, self.grid_size, embed_dim)
        # Replaces the generator's t_emb(t) + y_emb(y); see `checkpoint_filter_fn` for its converted value.
        self.conditioning = nn.Parameter(torch.zeros(1, embed_dim))

        self.blocks = build_mamba_blocks(
            embed_dim, depth, self.grid_size, scan_pattern, num_scan_orders, backward_dt_init,
            legacy_unpermute, d_state=d_state, d_conv=d_conv, expand=expand, scan_backend=scan_backend,
        )  # fmt: skip
        self.norm_out = nn.RMSNorm(embed_dim, eps=1e-5) if final_norm else None
        self.feature_info = [
            dict(module=f"blocks.{i}", num_chs=embed_dim, reduction=patch_size) for i in range(depth)
        ]

        self.norm = nn.LayerNorm(embed_dim, elementwise_affine=False, eps=1e-6)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
        self.init_weights()

    @torch.no_grad()
    def init_weights(self) -> None:
        """``ArceeZigmaTransformer``'s initialisation of the shared parts (zero adaLN gates included);
        conditioning N(0, 0.02); the classifier keeps PyTorch's default weights and a zero bias."""
        for module in self.modules():
            bias = module.bias if isinstance(module, nn.Linear) else None
            if bias is not None and not getattr(bias, "_no_reinit", False):
                nn.init.zeros_(bias)
        init_mamba_blocks(self.blocks)
        init_position_table(self.pos_embed, self.position_embedding, self.grid_size)
        self.patch_embed.reset_parameters()
        nn.init.normal_(self.conditioning, std=0.02)

    @torch.jit.ignore
    def no_weight_decay(self) -> set[str]:
        scan_decay_rates = {name for name, _ in self.named_parameters() if re.search(r"\.A(_b)?_log$", name)}
        return {"pos_embed", "conditioning"} | scan_decay_rates

    @torch.jit.ignore
    def group_matcher(self, coarse: bool = False) -> dict:
        return dict(
            stem=r"^pos_embed|^patch_embed|^conditioning",
            blocks=[(r"^blocks\.(\d+)", None), (r"^norm", (99999,))],
        )

    @torch.jit.ignore
    def set_grad_checkpointing(self, enable: bool = True) -> None:
        self.grad_checkpointing = enable

    @torch.jit.ignore
    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        if num_classes > 0:
            reference = self.patch_embed.proj.weight
            self.head = nn.Linear(
                self.num_features, num_classes, device=reference.device, dtype=reference.dtype
            )
        else:
            self.head = nn.Identity()

    def _embed(self, x: Tensor) -> Tensor:
        expected = (self.in_chans, self.img_size, self.img_size)
        if x.ndim != 4 or tuple(x.shape[1:]) != expected:
            raise ValueError(
                f"x must have shape (batch, {', '.join(map(str, expected))}), got {tuple(x.shape)}"
            )
        tokens = self.patch_embed(x)  # (B, T, D), row-major
        return tokens if self.pos_embed is None else tokens + self.pos_embed

    def _run_blocks(
        self, tokens: Tensor, blocks: nn.ModuleList, return_intermediates: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        conditioning = self.conditioning.expand(tokens.shape[0], -1)  # (B, D)
        checkpoint_fn = _checkpoint if self.grad_checkpointing and torch.is_grad_enabled() else None
        return run_mamba_blocks(
            blocks, tokens, conditioning, self.state_chain, checkpoint_fn, return_intermediates, self.norm_out
        )

    def forward_intermediates(
        self,
        x: Tensor,
        indices: int | list[int] | None = None,
        norm: bool = False,
        stop_early: bool = False,
        output_fmt: str = "NCHW",
        intermediates_only: bool = False,
    ) -> list[Tensor] | tuple[Tensor, list[Tensor]]:
        """Block outputs as ``(B, C, H/p, W/p)`` maps (``"NCHW"``) or ``(B, T, C)`` tokens (``"NLC"``).

        Args:
            x: Input images or latents ``(B, in_chans, img_size, img_size)``.
            indices: Last n blocks if an int, all if None, these blocks if a list (negative from the end).
            norm: Apply the final norm to every intermediate.
            stop_early: Run only up to the last requested block (the state chain only flows forward).
            output_fmt: ``"NCHW"`` or ``"NLC"``.
            intermediates_only: Return only the intermediates.

        Returns:
            The intermediates, or ``(forward_features output, intermediates)``.
        """
        if output_fmt not in ("NCHW", "NLC"):
            raise ValueError(f"output_fmt must be 'NCHW' or 'NLC', got {output_fmt!r}")
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        blocks = self.blocks[: max_index + 1] if stop_early else self.blocks

        x, intermediates = self._run_blocks(self._embed(x), blocks, return_intermediates=True)
        intermediates = [intermediates[i] for i in take_indices]
        if norm:
            intermediates = [self.norm(y) for y in intermediates]
        if output_fmt == "NCHW":
            batch, grid = x.shape[0], self.grid_size
            intermediates = [
                y.reshape(batch, grid, grid, -1).permute(0, 3, 1, 2).contiguous() for y in intermediates
            ]
        if intermediates_only:
            return intermediates
        return self.norm(x), intermediates

    def prune_intermediate_layers(
        self, indices: int | list[int] = 1, prune_norm: bool = False, prune_head: bool = True
    ) -> list[int]:
        """Drop the blocks after the last of ``indices`` (and norm / classifier); return the kept indices."""
        take_indices, max_index = feature_take_indices(len(self.blocks), indices)
        self.blocks = self.blocks[: max_index + 1]
        if prune_norm:
            self.norm = nn.Identity()
        if prune_head:
            self.reset_classifier(0, "")
        return take_indices

    def forward_features(self, x: Tensor) -> Tensor:
        x = self._run_blocks(self._embed(x), self.blocks)  # (B, T, D)
        return self.norm(x)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        if self.global_pool == "avg":
            x = x.mean(dim=1)  # (B, D)
        elif self.global_pool == "max":
            x = x.amax(dim=1)
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        x = self.forward_features(x)
        return self.forward_head(x)


@torch.no_grad()
def diffusers_conditioning(
    state_dict: dict[str, Tensor], timestep: float = DATA_END_TIME, timestep_scale: float = 1.0
) -> Tensor:
    """The conditioning ``t_emb(timestep_scale * timestep) + y_emb(null)`` of an ``ArceeZigmaTransformer``
    state dict.

    The label row is the table's last: the only row of an unconditional model, the null (classifier-free
    guidance) row of a conditional one; a model without a label table (``num_classes=0``) adds nothing. The
    default time is the data end of the flow (t = 1), where the generator sees clean inputs, as a backbone
    does. Returns ``(1, hidden_size)``, float32.
    """
    hidden_size, frequency_size = state_dict["time_embed.mlp.0.weight"].shape
    time_embed = TimestepEmbedder(hidden_size, frequency_size)
    time_embed.load_state_dict(
        {
            k.removeprefix("time_embed."): v.float()
            for k, v in state_dict.items()
            if k.startswith("time_embed.")
        }
    )
    conditioning = time_embed(torch.tensor([float(timestep) * timestep_scale]), torch.float32)
    label_table = state_dict.get("label_embed.embedding_table.weight")
    return conditioning if label_table is None else conditioning + label_table[-1:].float()


def _checkpoint_depth(keys: set[str]) -> int:
    indices = [int(m.group(1)) for k in keys if (m := re.match(r"blocks\.(\d+)\.", k))]
    return max(indices) + 1 if indices else 0


def _scan_pattern(keys: set[str]) -> str:
    return "bidirectional" if any(k.endswith(".mixer.A_b_log") for k in keys) else "zigzag"


def _check_diffusers_config(model: ArceeZigma) -> None:
    """Compare the ``config.json`` saved beside the checkpoint file with the model: the scan order, the
    state chain and the input size change what the weights compute but not their shapes."""
    file = (getattr(model, "pretrained_cfg", None) or {}).get("file")
    config_path = Path(file).with_name("config.json") if file else None
    if config_path is None or not config_path.is_file():
        return
    config = json.loads(config_path.read_text())
    if config.get("_class_name") != "ArceeZigmaTransformer":
        raise ValueError(
            f"{config_path} describes a {config.get('_class_name')!r}, not an ArceeZigmaTransformer"
        )
    mismatches = [
        f"{key}={config[key]!r} (model {arg}={getattr(model, arg)!r})"
        for key, arg in _CONFIG_TO_MODEL_ARGS.items()
        if key in config and config[key] != getattr(model, arg)
    ]
    if mismatches:
        raise ValueError(
            f"The checkpoint's {config_path} does not match the model: {', '.join(mismatches)}. Create the "
            f"matching arcee_zigma_* variant or pass the model arguments named in brackets."
        )


def _convert_diffusers(state_dict: dict[str, Tensor], model: ArceeZigma) -> dict[str, Tensor]:
    required = ("time_embed.mlp.0.weight",) + (("pos_embed",) if model.pos_embed is not None else ())
    missing = [key for key in required if key not in state_dict]
    if missing:
        raise ValueError(
            f"Not an ArceeZigmaTransformer (diffusers) or ArceeZigma (timm) state dict: no {missing}. "
            f"Pass the transformer's diffusion_pytorch_model.safetensors."
        )
    _check_diffusers_config(model)
    converted = {k: v for k, v in state_dict.items() if not k.startswith(_DIFFUSERS_ONLY_PREFIXES)}
    conditioning = diffusers_conditioning(state_dict, timestep_scale=model.timestep_scale)
    converted["conditioning"] = conditioning.to(model.conditioning.dtype)
    # A generator has no classifier: keep the model's own initialisation of it.
    converted.update({k: v for k, v in model.state_dict().items() if k.startswith("head.")})
    return converted


def _check_compatible(state_dict: dict[str, Tensor], model: ArceeZigma) -> None:
    expected = {k: v for k, v in model.state_dict().items() if not k.startswith("head.")}
    found = {k for k in state_dict if not k.startswith("head.")}
    if _checkpoint_depth(found) != len(model.blocks):
        raise ValueError(
            f"The checkpoint has {_checkpoint_depth(found)} blocks, the model {len(model.blocks)} (depth)"
        )
    if _scan_pattern(found) != model.scan_pattern:
        raise ValueError(
            f"The checkpoint is a {_scan_pattern(found)!r} model, the model has scan_pattern="
            f"{model.scan_pattern!r}"
        )
    missing, unexpected = sorted(expected.keys() - found), sorted(found - expected.keys())
    if missing or unexpected:
        raise ValueError(f"Checkpoint keys do not match: missing {missing[:5]}, unexpected {unexpected[:5]}")

    grid_tokens = state_dict["pos_embed"].shape[1] if model.pos_embed is not None else model.grid_size**2
    if grid_tokens != model.grid_size**2:
        raise ValueError(
            f"The checkpoint's position table has {grid_tokens} tokens, the model {model.grid_size**2} "
            f"(img_size {model.img_size} / patch_size {model.patch_size}). Position tables are not "
            f"resampled: use the checkpoint's input size"
        )
    for name, tensor in expected.items():
        shape = state_dict[name].shape
        if name == "patch_embed.proj.weight":
            # timm's loader adapts the input channels (in_chans) itself.
            shape, target = shape[:1] + shape[2:], tensor.shape[:1] + tensor.shape[2:]
        else:
            target = tensor.shape
        if shape != target:
            raise ValueError(
                f"Checkpoint tensor {name} has shape {tuple(state_dict[name].shape)}, the model "
                f"{tuple(tensor.shape)}: check embed_dim, d_state, expand, d_conv and patch_size"
            )


def checkpoint_filter_fn(state_dict: dict[str, Tensor], model: ArceeZigma) -> dict[str, Tensor]:
    """Fit a checkpoint to ``model``: an ``ArceeZigmaTransformer`` (diffusers) state dict is converted, an
    ``ArceeZigma`` (timm) one passes through. Raises ValueError when it cannot fit.

    Conversion keeps the patch embedding, position table and blocks under their keys, drops the time and
    label embedders and the generator's head, sets ``conditioning`` to ``diffusers_conditioning`` (t = 1 and
    the null label row) and keeps the model's freshly initialised classifier. When the file named by the
    model's ``pretrained_cfg`` has the diffusers ``config.json`` beside it, its scan order, state chain and
    sizes must match the model's.
    """
    if "conditioning" not in state_dict:
        state_dict = _convert_diffusers(state_dict, model)
    _check_compatible(state_dict, model)
    return state_dict


def _create_arcee_zigma(variant: str, pretrained: bool = False, **kwargs) -> ArceeZigma:
    out_indices = kwargs.pop("out_indices", 3)
    return build_model_with_cfg(
        ArceeZigma,
        variant,
        pretrained,
        pretrained_filter_fn=checkpoint_filter_fn,
        feature_cfg=dict(out_indices=out_indices, feature_cls="getter"),
        **kwargs,
    )


def _cfg(config: dict) -> dict:
    # Inputs are SD-VAE latents scaled by 0.18215 (roughly unit variance): no normalisation.
    channels, size = config.get("in_channels", 4), config.get("sample_size", 32)
    return {
        "url": "",
        "num_classes": 1000,
        "input_size": (channels, size, size),
        "pool_size": None,
        "fixed_input_size": True,
        "crop_pct": 1.0,
        "interpolation": "bicubic",
        "mean": (0.0,) * channels,
        "std": (1.0,) * channels,
        "first_conv": "patch_embed.proj",
        "classifier": "head",
        "license": "apache-2.0",
        "paper_ids": "arXiv:2511.11243",
        "paper_name": (
            "Arcee: Differentiable Recurrent State Chain for Generative Vision Modeling with Mamba SSMs"
        ),
    }


def model_args(config: dict) -> dict:
    """``ArceeZigma`` arguments of an ``ArceeZigmaTransformer`` config's architecture (the input size and
    channels come from the pretrained cfg, ``_cfg``)."""
    return {arg: config[key] for key, arg in _ARCHITECTURE_ARGS.items() if key in config}


def _describe(variant: Variant) -> str:
    config = variant.config
    scan_pattern, num_scan_orders, state_chain = layout_of(config)
    scan = f"zigzag, block i scans path i mod {num_scan_orders}" if scan_pattern == "zigzag" else scan_pattern
    chain = "state chain" if state_chain else "no state chain (baseline)"
    return (
        f"{variant.display_name} {variant.preset}: depth {config['num_layers']}, width "
        f"{config['hidden_size']}, patch {config['patch_size']}, {scan}, {chain}."
    )


def _register(variant: Variant) -> None:
    """Register ``variant.timm_name`` as a timm model (an entry point function of this module)."""

    def create(pretrained: bool = False, **kwargs) -> ArceeZigma:
        args = model_args(variant.config)
        return _create_arcee_zigma(variant.timm_name, pretrained=pretrained, **dict(args, **kwargs))

    create.__name__ = create.__qualname__ = variant.timm_name
    create.__doc__ = _describe(variant)
    globals()[variant.timm_name] = register_model(create)


default_cfgs = generate_default_cfgs({variant.timm_name: _cfg(variant.config) for variant in VARIANTS})
for _variant in VARIANTS:
    _register(_variant)
