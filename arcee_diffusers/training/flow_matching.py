"""The flow-matching objective in SiT's convention (t = 0 noise, t = 1 data), the paper's by default."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.training_utils import compute_density_for_timestep_sampling
from torch import Tensor

from ..schedulers.flow_paths import FlowPath

TIME_SAMPLINGS = ("uniform", "logit_normal", "mode")


def sample_flow_times(
    batch_size: int,
    weighting_scheme: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
    mode_scale: float = 1.29,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> Tensor:
    """Times ``t``: uniform on [0, 1) (the paper's draw), or diffusers' SD3 logit-normal / mode densities.

    Uniform times are the published trainer's draw itself: ``torch.rand(batch)`` from the CPU generator
    (``generator``, if given, must be a CPU one), then moved to ``device``. diffusers draws a *noise level*
    ``u`` (1 = pure noise) on ``device``; for its other densities ``t = 1 - u`` in our convention.
    """
    if weighting_scheme not in TIME_SAMPLINGS:
        raise ValueError(f"weighting_scheme must be one of {TIME_SAMPLINGS}, got {weighting_scheme!r}")
    if weighting_scheme == "uniform":
        return torch.rand(batch_size, generator=generator).to(device)
    u = compute_density_for_timestep_sampling(
        weighting_scheme,
        batch_size,
        logit_mean=logit_mean,
        logit_std=logit_std,
        mode_scale=mode_scale,
        device=device,
        generator=generator,
    )
    return 1 - u


def flow_matching_loss(
    model: torch.nn.Module,
    x1: Tensor,
    t: Tensor,
    path: FlowPath,
    class_labels: Tensor | None = None,
    noise: Tensor | None = None,
) -> Tensor:
    """Unweighted MSE between the predicted and the path's velocity at ``x_t``, averaged over everything."""
    x0 = torch.randn_like(x1) if noise is None else noise
    x_t = path.interpolate(x1, x0, t)
    target = path.velocity(x1, x0, t)
    prediction = model(x_t, t, class_labels=class_labels, return_dict=False)[0]
    return F.mse_loss(prediction.float(), target.float())
