"""The Mamba mixer's causal depthwise convolution over time, on time-major activations.

``causal_conv1d(x, weight, bias, silu)`` is ``nn.Conv1d(E, E, K, groups=E, padding=K - 1)`` over the time
axis of ``x`` (batch, L, E), cut to the first L steps, optionally followed by SiLU: what mamba_ssm's
``causal_conv1d_fn`` computes, but time-major, the layout the mixer's linear layers produce and read, so
that no activation is transposed on the way. Backends: ``"numba"`` (compiled CPU kernels, the default for
CPU tensors when numba imports) and ``"torch"`` (``F.conv1d`` on a transposed view, any device).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from . import interface
from .reference import compute_dtype

__all__ = ["causal_conv1d"]


@torch.library.custom_op("arcee_scan::causal_conv1d_fwd", mutates_args=())
def _causal_conv1d_fwd(x: Tensor, weight: Tensor, bias: Tensor, silu: bool) -> Tensor:
    from .numba_scan import conv_forward

    return conv_forward(x, weight, bias, silu)


@_causal_conv1d_fwd.register_fake
def _(x, weight, bias, silu):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


@torch.library.custom_op("arcee_scan::causal_conv1d_bwd", mutates_args=())
def _causal_conv1d_bwd(
    dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor, silu: bool
) -> tuple[Tensor, Tensor, Tensor]:
    from .numba_scan import conv_backward

    return conv_backward(dout, x, weight, bias, silu)


@_causal_conv1d_bwd.register_fake
def _(dout, x, weight, bias, silu):
    contiguous = torch.contiguous_format
    return (
        torch.empty_like(x, memory_format=contiguous),
        weight.new_empty(weight.shape),
        bias.new_empty(bias.shape),
    )


def _setup_context(ctx, inputs, output) -> None:
    x, weight, bias, silu = inputs
    ctx.save_for_backward(x, weight, bias)
    ctx.silu = silu


def _backward(ctx, dout):
    x, weight, bias = ctx.saved_tensors
    dx, dweight, dbias = _causal_conv1d_bwd(dout, x, weight, bias, ctx.silu)
    return dx, dweight, dbias, None


torch.library.register_autograd("arcee_scan::causal_conv1d_fwd", _backward, setup_context=_setup_context)


def causal_conv1d(
    x: Tensor, weight: Tensor, bias: Tensor | None = None, silu: bool = False, backend: str | None = None
) -> Tensor:
    """Causal depthwise convolution over time of time-major ``x``.

    Args:
        x: (batch, L, E), any strides.
        weight: (E, K) or ``nn.Conv1d``'s (E, 1, K); bias: (E,) or None.
        silu: apply SiLU to the result.
        backend: ``"numba"``, ``"torch"`` or None: as :func:`arcee_scan.selective_scan` resolves it (the
            numba kernels for CPU tensors, ``F.conv1d`` otherwise and for the other scan backends).

    Returns:
        (batch, L, E) in x's dtype (contiguous from the numba backend).
    """
    if x.dim() != 3:
        raise ValueError(f"x must be 3-D (batch, L, E), got shape {tuple(x.shape)}")
    channels = x.shape[2]
    weight = weight.reshape(weight.shape[0], weight.shape[-1]) if weight.dim() == 3 else weight
    if weight.dim() != 2 or weight.shape[0] != channels:
        raise ValueError(f"weight must be (E, K) or (E, 1, K) with E = {channels}, got {tuple(weight.shape)}")
    if bias is not None and tuple(bias.shape) != (channels,):
        raise ValueError(f"bias must have shape (E,) = ({channels},), got {tuple(bias.shape)}")
    # the scan's choice (argument, $ARCEE_SCAN_BACKEND, automatic): numba, or else torch
    if interface.resolve_backend(backend, x) != "numba":
        width = weight.shape[1]
        out = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=width - 1, groups=channels)
        out = out[..., : x.shape[1]].transpose(1, 2)
        return F.silu(out) if silu else out
    dtype = compute_dtype(x)
    bias = x.new_zeros(channels, dtype=dtype) if bias is None else bias.to(dtype)
    out = _causal_conv1d_fwd(x.to(dtype), weight.to(dtype).t().contiguous(), bias.contiguous(), silu)
    return out.to(x.dtype)
