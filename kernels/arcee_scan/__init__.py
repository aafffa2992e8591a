"""Stateful selective scan (Mamba-1 S6) with an initial state in and the final state out.

PROVISIONAL: the dispatching interface (torch / triton backends, custom op, validation) replaces this file.
"""

from __future__ import annotations

from torch import Tensor

from .reference import selective_scan_reference

__all__ = ["selective_scan", "selective_scan_reference"]


def selective_scan(
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
    output_final_state: bool = True,
    backend: str | None = None,
) -> tuple[Tensor, Tensor | None]:
    if B.dim() == 3:
        B = B.unsqueeze(1)
    if C.dim() == 3:
        C = C.unsqueeze(1)
    y, h_T = selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    return y, (h_T if output_final_state else None)
