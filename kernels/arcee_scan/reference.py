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
    dtype = torch.float64 if dtype_in == torch.float64 else torch.float32
    u, delta, A = u.to(dtype), delta.to(dtype), A.to(dtype)
    if delta_bias is not None:
        delta = delta + delta_bias.to(dtype)[:, None]
    if delta_softplus:
        delta = F.softplus(delta)  # threshold 20, as in torch and mamba_ssm
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
