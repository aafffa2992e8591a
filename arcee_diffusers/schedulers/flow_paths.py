"""Probability paths for flow matching, in SiT's convention: t = 0 is noise, t = 1 is data.

``x_t = alpha(t) * x1 + sigma(t) * x0`` with ``x1`` data and ``x0 ~ N(0, I)``; the model learns the velocity
``dx_t/dt = alpha'(t) * x1 + sigma'(t) * x0``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor


def _expand(t: Tensor | float, like: Tensor) -> Tensor:
    t = torch.as_tensor(t, dtype=like.dtype, device=like.device)
    return t.reshape(-1, *([1] * (like.dim() - 1))) if t.dim() else t


@dataclass(frozen=True)
class FlowPath:
    """One interpolation path between noise (t = 0) and data (t = 1)."""

    name: str

    def coefficients(self, t: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(alpha, sigma, d_alpha, d_sigma)`` at time ``t``."""
        if self.name == "gvp":
            half_pi = math.pi / 2
            return (
                torch.sin(half_pi * t),
                torch.cos(half_pi * t),
                half_pi * torch.cos(half_pi * t),
                -half_pi * torch.sin(half_pi * t),
            )
        return t, 1 - t, torch.ones_like(t), -torch.ones_like(t)

    def interpolate(self, x1: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
        """``x_t`` for data ``x1``, noise ``x0`` and times ``t`` of shape ``(batch,)`` or scalar."""
        alpha, sigma, _, _ = self.coefficients(_expand(t, x1))
        return alpha * x1 + sigma * x0

    def velocity(self, x1: Tensor, x0: Tensor, t: Tensor | float) -> Tensor:
        """The regression target ``dx_t/dt``."""
        _, _, d_alpha, d_sigma = self.coefficients(_expand(t, x1))
        return d_alpha * x1 + d_sigma * x0

    def predict_endpoints(self, x_t: Tensor, velocity: Tensor, t: Tensor | float) -> tuple[Tensor, Tensor]:
        """The data ``x1`` and noise ``x0`` that a predicted ``velocity`` at ``(x_t, t)`` implies.

        Solves ``x_t = alpha * x1 + sigma * x0`` and ``velocity = d_alpha * x1 + d_sigma * x0``; the
        determinant is -1 (linear) or -pi/2 (gvp), never zero.
        """
        alpha, sigma, d_alpha, d_sigma = self.coefficients(_expand(t, x_t))
        det = alpha * d_sigma - sigma * d_alpha
        return (d_sigma * x_t - sigma * velocity) / det, (alpha * velocity - d_alpha * x_t) / det

    def time_from_rectified_sigma(self, rectified_sigma: Tensor) -> Tensor:
        """The time ``t`` on this path that matches the noise level of diffusers' rectified-flow convention.

        diffusers' flow-match schedulers move ``x = s * x0 + (1 - s) * x1`` from ``s = 1`` (noise) to 0. Any
        path maps onto it by ``x = x_t / (alpha + sigma)`` at the ``t`` where ``sigma / (alpha + sigma) = s``.
        """
        if self.name == "gvp":
            return torch.atan2(1 - rectified_sigma, rectified_sigma) * (2 / math.pi)
        return 1 - rectified_sigma


PATHS = {"gvp": FlowPath("gvp"), "linear": FlowPath("linear")}


def get_flow_path(name: str) -> FlowPath:
    """``"gvp"`` (SiT's trigonometric path, the paper's) or ``"linear"`` (rectified flow)."""
    key = name.lower()
    if key not in PATHS:
        raise ValueError(f"path must be one of {sorted(PATHS)}, got {name!r}")
    return PATHS[key]
