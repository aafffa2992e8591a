"""Building blocks of the Arcee/ZigMa backbone: Mamba-1 mixers with a state in and out, adaLN blocks, head.

Shared by the diffusers model (``ArceeZigmaTransformer``) and the timm registration, so the state-dict keys
defined here are the checkpoint format of both.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from arcee_scan import causal_conv1d, selective_scan

from .scan_orders import inverse_permutation, layer_scan_path, zigzag_paths

# One direction's scan state (batch, d_inner, d_state), float32; a (forward, backward) pair for Vision Mamba.
ScanState = Tensor | tuple[Tensor, Tensor]
# Vision Mamba's backward dt_proj: "zero" bias (the published code's plain Linear) or "mamba" (the dt init).
BACKWARD_DT_INITS = ("zero", "mamba")


def inverse_softplus(x: Tensor) -> Tensor:
    return x + torch.log(-torch.expm1(-x))


class MambaMixer(nn.Module):
    """Mamba-1 mixer (selective scan, "S6") whose scan takes an initial state and returns its final state.

    ``scan_path`` (a permutation of the token axis, see ``scan_orders``) makes the scan visit the tokens in
    that order; everything else in the mixer is per-token, so the mixer permutes its input, scans, projects
    and un-permutes. The permutation lives in non-persistent buffers: it is not part of the state dict.
    ``legacy_unpermute`` un-permutes with the path itself instead of its inverse (ZigMa's 2024-04 code).
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        scan_path: Tensor | None = None,
        scan_backend: str | None = None,
        legacy_unpermute: bool = False,
    ):
        super().__init__()
        self.d_model = d_model
        self.d_state = d_state
        self.d_inner = expand * d_model
        self.dt_rank = math.ceil(d_model / 16)
        self.scan_backend = scan_backend

        self.in_proj = nn.Linear(d_model, 2 * self.d_inner, bias=False)
        self.conv1d, self.x_proj, self.dt_proj = self._make_ssm_layers(d_conv)
        self.A_log = nn.Parameter(self._s4d_real_log_a())
        self.D = nn.Parameter(torch.ones(self.d_inner))
        self.out_proj = nn.Linear(self.d_inner, d_model, bias=False)
        self._init_dt_proj(self.dt_proj, dt_min, dt_max, dt_init_floor)

        if scan_path is None:
            self.scan_path = self.scan_path_inverse = None
        else:
            # ZigMa's code of 2024-04-08 to 2024-05-24 put tokens back with the path instead of its inverse;
            # checkpoints trained under it only work the same way.
            unpermute = scan_path if legacy_unpermute else inverse_permutation(scan_path)
            self.register_buffer("scan_path", scan_path.clone(), persistent=False)
            self.register_buffer("scan_path_inverse", unpermute.clone(), persistent=False)

    def _make_ssm_layers(self, d_conv: int) -> tuple[nn.Conv1d, nn.Linear, nn.Linear]:
        conv1d = nn.Conv1d(
            self.d_inner, self.d_inner, kernel_size=d_conv, groups=self.d_inner, padding=d_conv - 1
        )
        x_proj = nn.Linear(self.d_inner, self.dt_rank + 2 * self.d_state, bias=False)
        dt_proj = nn.Linear(self.dt_rank, self.d_inner)
        return conv1d, x_proj, dt_proj

    def _s4d_real_log_a(self) -> Tensor:
        # S4D-real: A[d, n] = -(n + 1) for every channel d
        return torch.log(torch.arange(1, self.d_state + 1, dtype=torch.float32)).repeat(self.d_inner, 1)

    @torch.no_grad()
    def _init_dt_proj(self, dt_proj: nn.Linear, dt_min: float, dt_max: float, dt_init_floor: float) -> None:
        nn.init.uniform_(dt_proj.weight, -(self.dt_rank**-0.5), self.dt_rank**-0.5)
        # softplus(bias) = dt with dt log-uniform in [dt_min, dt_max]
        log_dt = torch.rand(self.d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min)
        dt_proj.bias.copy_(inverse_softplus(log_dt.exp().clamp(min=dt_init_floor)))
        dt_proj.bias._no_reinit = True  # the model-wide init zeroes every other Linear bias

    def _scan(
        self,
        x: Tensor,
        z: Tensor,
        conv1d: nn.Conv1d,
        x_proj: nn.Linear,
        dt_proj: nn.Linear,
        A_log: Tensor,
        D: Tensor,
        initial_state: Tensor | None,
        output_final_state: bool,
    ) -> tuple[Tensor, Tensor | None]:
        """One direction: causal conv, input-dependent (delta, B, C), selective scan.

        Time-major throughout, the layout the linear layers read and write: x, z (B, L, d_inner) -> y (B, L,
        d_inner). The scan takes (B, d_inner, L) views of them; the numba backend reads and returns the
        time-major buffers as they are.
        """
        x = causal_conv1d(x, conv1d.weight, conv1d.bias, silu=True, backend=self.scan_backend)
        x_dbl = x_proj(x)  # (B, L, dt_rank + 2 * d_state)
        dt, B, C = x_dbl.split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.linear(dt, dt_proj.weight)  # (B, L, d_inner); the scan adds the bias in fp32
        y, final_state = selective_scan(
            x.transpose(1, 2),
            delta.transpose(1, 2),
            -torch.exp(A_log.float()),
            B.transpose(1, 2),
            C.transpose(1, 2),
            D=D.float(),
            z=z.transpose(1, 2),
            delta_bias=dt_proj.bias.float(),
            delta_softplus=True,
            initial_state=initial_state,
            output_final_state=output_final_state,
            backend=self.scan_backend,
        )
        return y.transpose(1, 2), final_state

    def _in_proj(self, hidden_states: Tensor) -> tuple[Tensor, Tensor]:
        """x and z, (B, L, d_inner) each: in_proj's two halves as two products, so that each is a
        contiguous tensor rather than a strided half of one. The weight is cast to the input's dtype
        because in_proj's own forward does not run: diffusers' layerwise casting, which stores it in
        another dtype, upcasts it in a hook of that forward."""
        weight = self.in_proj.weight.to(hidden_states.dtype)
        return F.linear(hidden_states, weight[: self.d_inner]), F.linear(
            hidden_states, weight[self.d_inner :]
        )

    def _to_scan_order(self, hidden_states: Tensor) -> Tensor:
        # Gathering the d_model-wide input instead of in_proj's 2*d_inner-wide output is the same
        # (in_proj is per token) and moves 4x less data.
        return hidden_states if self.scan_path is None else hidden_states.index_select(1, self.scan_path)

    def _to_row_major(self, hidden_states: Tensor) -> Tensor:
        return (
            hidden_states if self.scan_path is None else hidden_states.index_select(1, self.scan_path_inverse)
        )

    def forward(
        self, hidden_states: Tensor, initial_state: Tensor | None = None, output_final_state: bool = False
    ) -> tuple[Tensor, Tensor | None]:
        """``(B, L, d_model)`` row-major tokens -> ``(B, L, d_model)``, final scan state or None."""
        x, z = self._in_proj(self._to_scan_order(hidden_states))
        y, final_state = self._scan(
            x,
            z,
            self.conv1d,
            self.x_proj,
            self.dt_proj,
            self.A_log,
            self.D,
            initial_state,
            output_final_state,
        )
        return self._to_row_major(self.out_proj(y)), final_state


class BidirectionalMambaMixer(MambaMixer):
    """Vision Mamba's mixer: a forward scan over the row-major tokens and a backward scan over the flipped
    sequence, each with its own conv1d, x_proj, dt_proj, A and D, sharing in_proj and out_proj;
    ``out = out_proj(y_fwd + flip(y_bwd))``. The state is a ``(forward, backward)`` pair: two chains.

    ``backward_dt_init="zero"`` (the published one): ``dt_proj_b`` is a plain Linear there, whose bias the
    model-wide init zeroes, so every backward channel starts at ``softplus(0) = ln 2``; its weight keeps
    PyTorch's default, U(+-dt_rank^-0.5), the same as the dt init's. ``"mamba"``: the forward branch's dt
    init, ``softplus(bias)`` log-uniform in ``[dt_min, dt_max]``.
    """

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_init_floor: float = 1e-4,
        scan_backend: str | None = None,
        backward_dt_init: str = "zero",
    ):
        if backward_dt_init not in BACKWARD_DT_INITS:
            raise ValueError(f"backward_dt_init must be one of {BACKWARD_DT_INITS}, got {backward_dt_init!r}")
        super().__init__(
            d_model, d_state, d_conv, expand, dt_min, dt_max, dt_init_floor, scan_backend=scan_backend
        )
        self.conv1d_b, self.x_proj_b, self.dt_proj_b = self._make_ssm_layers(d_conv)
        self.A_b_log = nn.Parameter(self._s4d_real_log_a())
        self.D_b = nn.Parameter(torch.ones(self.d_inner))
        if backward_dt_init == "mamba":
            self._init_dt_proj(self.dt_proj_b, dt_min, dt_max, dt_init_floor)
        else:
            nn.init.zeros_(self.dt_proj_b.bias)

    def forward(
        self,
        hidden_states: Tensor,
        initial_state: tuple[Tensor, Tensor] | None = None,
        output_final_state: bool = False,
    ) -> tuple[Tensor, tuple[Tensor, Tensor] | None]:
        x, z = self._in_proj(hidden_states)  # (B, L, d_inner) each
        state_fwd, state_bwd = (None, None) if initial_state is None else initial_state
        y_fwd, final_fwd = self._scan(
            x, z, self.conv1d, self.x_proj, self.dt_proj, self.A_log, self.D, state_fwd, output_final_state
        )
        y_bwd, final_bwd = self._scan(
            x.flip(1),
            z.flip(1),
            self.conv1d_b,
            self.x_proj_b,
            self.dt_proj_b,
            self.A_b_log,
            self.D_b,
            state_bwd,
            output_final_state,
        )
        out = self.out_proj(y_fwd + y_bwd.flip(1))
        return out, ((final_fwd, final_bwd) if output_final_state else None)


class ArceeMambaBlock(nn.Module):
    """adaLN Mamba block (ZigMa/DiT style, no MLP) with the residual stream kept in float32.

    ``residual <- residual + x``; ``h = RMSNorm(residual)``;
    ``x = h + gate * Mixer(h * (1 + scale) + shift)``.
    The output adds the mixer to the *normalised* stream ``h``, ZigMa's quirk, kept for faithfulness.
    """

    def __init__(self, hidden_size: int, mixer: MambaMixer, norm_eps: float = 1e-5):
        super().__init__()
        self.norm = nn.RMSNorm(hidden_size, eps=norm_eps)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size))
        self.mixer = mixer

    def forward(
        self,
        hidden_states: Tensor,
        residual: Tensor | None,
        conditioning: Tensor,
        initial_state: ScanState | None = None,
        output_final_state: bool = False,
    ) -> tuple[Tensor, Tensor, ScanState | None]:
        residual = hidden_states.float() if residual is None else residual + hidden_states
        hidden_states = self.norm(residual.to(self.norm.weight.dtype))
        scale, gate, shift = self.adaLN_modulation(conditioning).unsqueeze(1).chunk(3, dim=-1)
        out, final_state = self.mixer(hidden_states * (1 + scale) + shift, initial_state, output_final_state)
        return hidden_states + gate * out, residual, final_state


class LayerNormHead(nn.Module):
    """ZigMa's final layer: LayerNorm (no affine) and Linear to ``patch**2 * out_channels``, no modulation."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, hidden_states: Tensor, conditioning: Tensor) -> Tensor:
        return self.linear(self.norm(hidden_states))


class AdaLNHead(nn.Module):
    """DiT's final layer: LayerNorm (no affine), adaLN shift/scale, Linear to ``patch**2 * out_channels``."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)

    def forward(self, hidden_states: Tensor, conditioning: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(conditioning).unsqueeze(1).chunk(2, dim=-1)
        return self.linear(self.norm(hidden_states) * (1 + scale) + shift)


def build_mamba_blocks(
    hidden_size: int,
    num_layers: int,
    grid_size: int,
    scan_pattern: str,
    num_scan_orders: int,
    backward_dt_init: str = "zero",
    legacy_unpermute: bool = False,
    **mixer_kwargs,
) -> nn.ModuleList:
    """``num_layers`` adaLN Mamba blocks; zigzag block ``i`` scans path ``i mod num_scan_orders``.
    ``backward_dt_init`` is the bidirectional mixers' (see ``BidirectionalMambaMixer``),
    ``legacy_unpermute`` the zigzag mixers' (see ``MambaMixer``)."""
    paths = zigzag_paths(grid_size) if scan_pattern == "zigzag" else None
    blocks = nn.ModuleList()
    for index in range(num_layers):
        if scan_pattern == "bidirectional":
            mixer = BidirectionalMambaMixer(hidden_size, backward_dt_init=backward_dt_init, **mixer_kwargs)
        else:
            path = layer_scan_path(paths, index, num_scan_orders)
            mixer = MambaMixer(hidden_size, scan_path=path, legacy_unpermute=legacy_unpermute, **mixer_kwargs)
        blocks.append(ArceeMambaBlock(hidden_size, mixer))
    return blocks


@torch.no_grad()
def init_mamba_blocks(blocks: nn.ModuleList) -> None:
    """The published block initialisation on top of the mixers' own (dt_proj, A_log, D)."""
    for block in blocks:
        # GPT-2 style: the residual branch's output projection scaled by 1/sqrt(depth)
        nn.init.kaiming_uniform_(block.mixer.out_proj.weight, a=math.sqrt(5))
        block.mixer.out_proj.weight /= math.sqrt(len(blocks))
        # adaLN-Zero: every block starts as the identity on its gated branch
        nn.init.zeros_(block.adaLN_modulation[-1].weight)
        nn.init.zeros_(block.adaLN_modulation[-1].bias)


def run_mamba_blocks(
    blocks: nn.ModuleList,
    hidden_states: Tensor,
    conditioning: Tensor,
    state_chain: bool,
    checkpoint_fn: Callable | None = None,
    return_intermediates: bool = False,
    final_norm: nn.Module | None = None,
) -> Tensor | tuple[Tensor, list[Tensor]]:
    """Run the block stack on ``(B, L, d_model)`` tokens given a ``(B, d_model)`` conditioning vector.

    With ``state_chain`` (Arcee) block 0 starts from a zero state and block k+1 starts from block k's final
    scan state, passed on as is (no detach): gradients flow back through the chain. The last block's final
    state is not computed. ``checkpoint_fn(block, *args)`` (e.g. diffusers' ``_gradient_checkpointing_func``)
    recomputes each block in the backward; the state goes in and out of it like any other tensor.
    ``final_norm`` (ZigMa's ``norm_f``): the last block's output is added to the residual stream and
    normalised. Returns the last block's output (after ``final_norm``), and each block's output when
    ``return_intermediates``.
    """
    residual = None
    state = None
    intermediates = []
    last_index = len(blocks) - 1
    for index, block in enumerate(blocks):
        output_final_state = state_chain and index < last_index
        if checkpoint_fn is None:
            hidden_states, residual, state = block(
                hidden_states, residual, conditioning, state, output_final_state
            )
        else:
            hidden_states, residual, state = checkpoint_fn(
                block, hidden_states, residual, conditioning, state, output_final_state
            )
        if return_intermediates:
            intermediates.append(hidden_states)
    if final_norm is not None:
        hidden_states = final_norm((residual + hidden_states).to(final_norm.weight.dtype))
    return (hidden_states, intermediates) if return_intermediates else hidden_states
