"""Naive sequential selective scan: the oracle the other backends are tested against.

Written the way mamba_ssm's ``selective_scan_ref`` is: materialise the discretised ``exp(delta*A)`` and
``delta*u*B`` for every step as ``(batch, dim, L, N)`` tensors, then run the recurrence one step at a time
under autograd, everything in float32 (float64 when ``u`` is float64, for gradcheck). Small shapes only:
memory is O(batch*dim*L*N) and the backward keeps every step's graph alive.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

SOFTPLUS_THRESHOLD = 20.0  # torch's default, and mamba_ssm's: softplus is the identity above it


def compute_dtype(u: Tensor) -> torch.dtype:
    """The scan's arithmetic and state dtype: float64 for float64 ``u`` (gradcheck), float32 otherwise."""
    return torch.float64 if u.dtype == torch.float64 else torch.float32


def biased_delta(delta: Tensor, delta_bias: Tensor | None, dtype: torch.dtype) -> Tensor:
    """``delta + delta_bias`` (the pre-softplus step) in ``dtype``."""
    delta = delta.to(dtype)
    return delta if delta_bias is None else delta + delta_bias.to(dtype)[:, None]


def softplus(x: Tensor) -> Tensor:
    return F.softplus(x, threshold=SOFTPLUS_THRESHOLD)


def selective_scan_reference(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
) -> tuple[Tensor, Tensor]:
    """Returns ``(out, h_T)``; ``B``/``C`` are grouped ``(batch, G, N, L)``; ``out`` has ``u``'s dtype."""
    dtype_in = u.dtype
    batch, dim, _ = u.shape
    groups, d_state = B.shape[1], B.shape[2]
    dtype = compute_dtype(u)
    u, A = u.to(dtype), A.to(dtype)
    delta = biased_delta(delta, delta_bias, dtype)
    if delta_softplus:
        delta = softplus(delta)
    # (batch, G, N, L) -> (batch, dim, N, L): channel d reads group d // (dim / G)
    B = B.to(dtype).repeat_interleave(dim // groups, dim=1)
    C = C.to(dtype).repeat_interleave(dim // groups, dim=1)
    h = u.new_zeros(batch, dim, d_state) if initial_state is None else initial_state.to(dtype)
    decay = torch.exp(torch.einsum("bdl,dn->bdln", delta, A))  # a_t
    drive = torch.einsum("bdl,bdnl->bdln", delta * u, B)  # b_t
    ys = []
    for a_t, b_t, c_t in zip(decay.unbind(2), drive.unbind(2), C.unbind(3)):
        h = a_t * h + b_t
        ys.append((h * c_t).sum(-1))
    y = torch.stack(ys, dim=-1)
    if D is not None:
        y = y + D.to(dtype)[:, None] * u
    if z is not None:
        y = y * F.silu(z.to(dtype))
    return y.to(dtype_in), h
