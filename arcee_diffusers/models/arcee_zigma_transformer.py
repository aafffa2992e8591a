"""ArceeZigmaTransformer: the Zigzag-Mamba (ZigMa) flow-matching backbone with Arcee's state chain."""

from __future__ import annotations

from typing import Any

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_outputs import Transformer2DModelOutput
from diffusers.models.modeling_utils import ModelMixin
from torch import Tensor, nn

from .embeddings import (
    POSITION_EMBEDDINGS,
    LabelEmbedder,
    PatchEmbed,
    TimestepEmbedder,
    init_position_table,
    position_table,
)
from .mamba_blocks import (
    BACKWARD_DT_INITS,
    AdaLNHead,
    LayerNormHead,
    build_mamba_blocks,
    init_mamba_blocks,
    run_mamba_blocks,
)
from .scan_orders import validate_scan_config
from .variants import get_variant, preset_config


class ArceeZigmaTransformer(ModelMixin, ConfigMixin):
    r"""
    Zigzag-Mamba image backbone (ZigMa / Vision Mamba) with Arcee's differentiable state chain
    (arXiv 2511.11243), predicting the flow-matching velocity.

    Patches plus a learnable 2-D sin-cos position table go through ``num_layers`` adaLN Mamba blocks
    conditioned on ``c = t_emb(t) + y_emb(y)``, then an adaLN head, zero-initialised like the adaLN gates, so
    the untrained model outputs exactly 0. The ``position_embedding``, ``timestep_scale``, ``final_norm``,
    ``head_modulation``, ``legacy_unpermute`` and ``num_classes=0`` options build ZigMa's released models.
    With ``state_chain=True`` (Arcee) block k+1's scan starts from
    block k's final scan state instead of zero; the chain adds no parameters.

    Parameters:
        sample_size (`int`, defaults to 32): Height and width of the (square) input.
        patch_size (`int`, defaults to 2): Side of the square patches; must divide ``sample_size``.
        in_channels (`int`, defaults to 4): Input channels (4 for SD-VAE latents).
        out_channels (`int`, defaults to 4): Output (velocity) channels.
        num_layers (`int`, defaults to 24): Number of Mamba blocks.
        hidden_size (`int`, defaults to 768): Token width ``d_model``.
        d_state (`int`, defaults to 256): SSM state size ``N`` (256 in every paper run).
        num_classes (`int`, *optional*): Number of classes; None builds an unconditional model (one learned
            label row), 0 an unconditional model without a label embedding (``c = t_emb(t)``, ZigMa's). A
            conditional model always has a null row, label ``num_classes``, used for dropped labels and for
            the unconditional branch of classifier-free guidance, whatever ``class_dropout_prob`` is, so any
            conditional model can be sampled with guidance.
        class_dropout_prob (`float`, defaults to 0.0): Training-mode probability of replacing a label by the
            null label.
        scan_pattern (`str`, defaults to `"zigzag"`): ``"zigzag"`` (ZigMa's boustrophedon paths) or
            ``"bidirectional"`` (Vision Mamba: row-major forward and backward scans in every block).
        num_scan_orders (`int`, defaults to 1): ``k`` in Zigma-k / Arcee-k, one of 1, 2, 4, 8: block ``i``
            scans along zigzag path ``i mod k``. Must be 1 for ``"bidirectional"``.
        state_chain (`bool`, defaults to `True`): Arcee's state chain (False = the ZigMa / Vim baseline).
        d_conv (`int`, defaults to 4): Kernel size of the mixers' causal depthwise convolution.
        expand (`int`, defaults to 2): ``d_inner = expand * hidden_size``.
        scan_backend (`str`, *optional*): Backend passed to ``arcee_scan.selective_scan`` (None = automatic).
        backward_dt_init (`str`, defaults to `"zero"`): Initialisation of Vision Mamba's backward
            ``dt_proj_b`` (bidirectional only): ``"zero"`` bias, so ``softplus(0) = ln 2`` on every channel,
            as the published code's plain Linear gets; ``"mamba"``: the forward branch's dt init
            (``softplus`` in [1e-3, 1e-1]).
        position_embedding (`str`, defaults to `"sincos"`): The position table added to the patch tokens:
            ``"sincos"`` (learnable, initialised with 2-D sin-cos), ``"learned"`` (learnable,
            zero-initialised: ZigMa's ``use_pe: 2``) or ``"none"`` (no table: ZigMa's ``use_pe: 0``).
        timestep_scale (`float`, defaults to 1.0): Factor applied to ``t`` before its sinusoidal features
            (ZigMa's is 1000); the model still takes the raw flow time.
        final_norm (`bool`, defaults to `False`): Add the last block's output to the residual stream and
            RMS-normalise it (eps 1e-5) before the head, as ZigMa's ``norm_f`` does.
        head_modulation (`bool`, defaults to `True`): adaLN shift/scale in the head (DiT's); False gives
            ZigMa's head, LayerNorm and Linear only.
        legacy_unpermute (`bool`, defaults to `False`): Put tokens back after each zigzag scan with the path
            instead of its inverse, as ZigMa's code of 2024-04-08 to 2024-05-24 did (docs/model.md).
    """

    _supports_gradient_checkpointing = True
    _no_split_modules = ["ArceeMambaBlock"]
    _repeated_blocks = ["ArceeMambaBlock"]
    _keep_in_fp32_modules = ["A_log", "D", "A_b_log", "D_b"]
    # dt_proj's weight is read outside its forward (its bias goes into the scan), so it keeps its dtype.
    _skip_layerwise_casting_patterns = ["patch_embed", "pos_embed", "label_embed", "norm", "dt_proj"]

    @register_to_config
    def __init__(
        self,
        sample_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        out_channels: int = 4,
        num_layers: int = 24,
        hidden_size: int = 768,
        d_state: int = 256,
        num_classes: int | None = None,
        class_dropout_prob: float = 0.0,
        scan_pattern: str = "zigzag",
        num_scan_orders: int = 1,
        state_chain: bool = True,
        d_conv: int = 4,
        expand: int = 2,
        scan_backend: str | None = None,
        backward_dt_init: str = "zero",
        position_embedding: str = "sincos",
        timestep_scale: float = 1.0,
        final_norm: bool = False,
        head_modulation: bool = True,
        legacy_unpermute: bool = False,
    ):
        super().__init__()
        self._validate_config()
        self.gradient_checkpointing = False
        grid_size = sample_size // patch_size

        self.patch_embed = PatchEmbed(patch_size, in_channels, hidden_size)
        self.pos_embed = position_table(position_embedding, grid_size, hidden_size)
        self.time_embed = TimestepEmbedder(hidden_size)
        has_labels = num_classes != 0
        self.label_embed = LabelEmbedder(num_classes, hidden_size, class_dropout_prob) if has_labels else None

        self.blocks = build_mamba_blocks(
            hidden_size, num_layers, grid_size, scan_pattern, num_scan_orders, backward_dt_init,
            legacy_unpermute, d_state=d_state, d_conv=d_conv, expand=expand, scan_backend=scan_backend,
        )  # fmt: skip
        self.norm_out = nn.RMSNorm(hidden_size, eps=1e-5) if final_norm else None
        head = AdaLNHead if head_modulation else LayerNormHead
        self.final_layer = head(hidden_size, patch_size, out_channels)

        self.initialize_weights()

    def _validate_config(self) -> None:
        config = self.config
        validate_scan_config(config.scan_pattern, config.num_scan_orders)
        if config.backward_dt_init not in BACKWARD_DT_INITS:
            raise ValueError(
                f"backward_dt_init must be one of {BACKWARD_DT_INITS}, got {config.backward_dt_init!r}"
            )
        for name in ("sample_size", "patch_size", "in_channels", "out_channels", "num_layers", "hidden_size"):
            value = getattr(config, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if config.sample_size % config.patch_size != 0:
            raise ValueError(
                f"sample_size ({config.sample_size}) must be divisible by patch_size ({config.patch_size})"
            )
        if config.hidden_size % 4 != 0:
            raise ValueError(
                f"hidden_size must be divisible by 4 (2-D sin-cos positions), got {config.hidden_size}"
            )
        if config.num_classes is not None and (
            not isinstance(config.num_classes, int) or config.num_classes < 0
        ):
            raise ValueError(
                "num_classes must be None (unconditional), 0 (unconditional, no label embedding) or a "
                f"positive int, got {config.num_classes!r}"
            )
        if not 0.0 <= config.class_dropout_prob < 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1), got {config.class_dropout_prob!r}")
        if config.position_embedding not in POSITION_EMBEDDINGS:
            raise ValueError(
                f"position_embedding must be one of {POSITION_EMBEDDINGS}, got {config.position_embedding!r}"
            )
        if not isinstance(config.timestep_scale, (int, float)) or config.timestep_scale <= 0:
            raise ValueError(f"timestep_scale must be a positive number, got {config.timestep_scale!r}")
        if config.legacy_unpermute and config.scan_pattern != "zigzag":
            raise ValueError("legacy_unpermute needs scan_pattern='zigzag' (it changes how zigzag scans end)")
        if config.class_dropout_prob > 0 and not config.num_classes:
            raise ValueError(
                "class_dropout_prob > 0 needs num_classes (an unconditional model has no labels)"
            )

    @torch.no_grad()
    def initialize_weights(self) -> None:
        """The published initialisation: mamba_ssm's ``_init_weights`` plus DiT's zero-init adaLN and head."""
        for module in self.modules():
            if isinstance(module, nn.Linear) and module.bias is not None:
                if not getattr(module.bias, "_no_reinit", False):
                    nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=0.02)
        init_mamba_blocks(self.blocks)

        grid_size = self.config.sample_size // self.config.patch_size
        init_position_table(self.pos_embed, self.config.position_embedding, grid_size)
        self.patch_embed.reset_parameters()
        nn.init.normal_(self.time_embed.mlp[0].weight, std=0.02)
        nn.init.normal_(self.time_embed.mlp[2].weight, std=0.02)
        if self.config.head_modulation:
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
            nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    @classmethod
    def from_preset(cls, name: str, **overrides: Any) -> ArceeZigmaTransformer:
        """Build a model of a size preset, e.g. ``from_preset("B/2", num_scan_orders=4, state_chain=False)``.

        The presets (``models/variants.py``'s ``PRESETS``, tabled in docs/model.md) default to 4 x 32 x 32
        latents, d_state 256, unconditional, Arcee state chain on; any config argument can be overridden.
        """
        return cls(**preset_config(name, **overrides))

    @classmethod
    def from_variant(cls, name: str, **overrides: Any) -> ArceeZigmaTransformer:
        """Build a named variant, e.g. ``from_variant("zigma-4-b2")`` (see ``models/variants.py`` and the
        table in docs/model.md); any config argument can be overridden."""
        return cls(**{**get_variant(name).config, **overrides})

    def embed(
        self, hidden_states: Tensor, timestep: Tensor | float, class_labels: Tensor | None = None
    ) -> tuple[Tensor, Tensor]:
        """Images to row-major tokens ``(B, T, hidden_size)`` and the conditioning ``(B, hidden_size)``."""
        batch, _, height, width = hidden_states.shape
        if (height, width) != (self.config.sample_size, self.config.sample_size):
            raise ValueError(
                f"hidden_states must be {self.config.sample_size} x {self.config.sample_size} (sample_size), "
                f"got {height} x {width}"
            )
        timestep = torch.as_tensor(timestep, device=hidden_states.device)
        if timestep.numel() == 1:
            timestep = timestep.reshape(1).expand(batch)
        elif timestep.shape != (batch,):
            raise ValueError(
                f"timestep must be a scalar or have shape ({batch},), got {tuple(timestep.shape)}"
            )

        tokens = self.patch_embed(hidden_states)
        if self.pos_embed is not None:
            tokens = tokens + self.pos_embed
        conditioning = self.time_embed(timestep * self.config.timestep_scale, tokens.dtype)
        if self.label_embed is not None:
            conditioning = conditioning + self.label_embed(class_labels, batch)
        elif class_labels is not None:
            raise ValueError("class_labels must be None for an unconditional model (num_classes=0)")
        return tokens, conditioning

    def forward_blocks(
        self, tokens: Tensor, conditioning: Tensor, return_intermediates: bool = False
    ) -> Tensor | tuple[Tensor, list[Tensor]]:
        """The trunk: all blocks on ``(B, T, hidden_size)`` tokens, with the state chain and the final norm
        when configured."""
        checkpoint_fn = (
            self._gradient_checkpointing_func
            if torch.is_grad_enabled() and self.gradient_checkpointing
            else None
        )
        return run_mamba_blocks(
            self.blocks,
            tokens,
            conditioning,
            self.config.state_chain,
            checkpoint_fn,
            return_intermediates,
            self.norm_out,
        )

    def unpatchify(self, patches: Tensor) -> Tensor:
        """``(B, T, p * p * C)`` -> ``(B, C, H, W)``, DiT's patch layout."""
        batch = patches.shape[0]
        patch, channels = self.config.patch_size, self.config.out_channels
        grid = self.config.sample_size // patch
        patches = patches.reshape(batch, grid, grid, patch, patch, channels)
        return torch.einsum("nhwpqc->nchpwq", patches).reshape(batch, channels, grid * patch, grid * patch)

    def forward(
        self,
        hidden_states: Tensor,
        timestep: Tensor | float,
        class_labels: Tensor | None = None,
        return_dict: bool = True,
    ) -> Transformer2DModelOutput | tuple[Tensor]:
        r"""
        Args:
            hidden_states (`torch.Tensor` of shape `(batch, in_channels, sample_size, sample_size)`):
                Noisy images or latents ``x_t``.
            timestep (`torch.Tensor` or `float`):
                Raw flow time ``t`` in [0, 1], SiT convention (0 = noise, 1 = data): shape ``(batch,)`` or a
                scalar broadcast to the batch. Not scaled by 1000.
            class_labels (`torch.LongTensor` of shape `(batch,)`, *optional*):
                Labels in ``[0, num_classes]``, ``num_classes`` being the null label; None on a conditional
                model means the null label for every sample. Must be None for an unconditional model.
            return_dict (`bool`, defaults to `True`):
                Return a `Transformer2DModelOutput` rather than a tuple.

        Returns:
            The velocity, `(batch, out_channels, sample_size, sample_size)`, in `.sample` or as a 1-tuple.
        """
        tokens, conditioning = self.embed(hidden_states, timestep, class_labels)  # (B, T, D), (B, D)
        tokens = self.forward_blocks(tokens, conditioning)
        patches = self.final_layer(tokens, conditioning)  # (B, T, p * p * out_channels)
        sample = self.unpatchify(patches)
        if not return_dict:
            return (sample,)
        return Transformer2DModelOutput(sample=sample)
