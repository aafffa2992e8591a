"""One sampling loop for a velocity model and any flow-matching scheduler: ours or diffusers'.

Our models predict the velocity ``dx_t/dt`` on a path in SiT's convention (t = 0 noise, t = 1 data).

- [`FlowMatchGVPScheduler`] works in that convention: the model sees the scheduler's sample and its timestep
  (the flow time) and its output goes to ``step`` unchanged.
- diffusers' flow-match schedulers (``FlowMatch*Scheduler``, and DPM-Solver++/UniPC/... with
  ``use_flow_sigmas=True, prediction_type="flow_prediction"``) move ``x = s * noise + (1 - s) * data`` from
  ``s = 1`` to 0 and expect ``noise - data``. Their timestep values are ``s * 1000`` (integers for the
  multistep ones), so the noise level is read from ``scheduler.sigmas[i]`` instead. For the linear path
  ``t = 1 - s``: the model sees the scheduler's sample and the scheduler gets ``-velocity``. For GVP the
  change of variables ``x = x_t / (alpha + sigma)``, ``s = sigma / (alpha + sigma)`` maps the model exactly
  onto that convention (the scheduler gets ``noise - data`` from the model's own data and noise predictions).

Every such mapping integrates the same ODE, so all samplers converge to the same samples; the mapping only
decides which coordinates the scheduler discretises, so that its ``s`` and its data prediction mean what it
assumes (which DPM-Solver++/UniPC's high-order updates and ``shift`` rely on).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch
from torch import Tensor

from .flow_paths import FlowPath
from .scheduling_gvp_flow import FlowMatchGVPScheduler, sample_ode

VelocityFn = Callable[[Tensor, Tensor], Tensor]
StepCallback = Callable[[int, Tensor, Tensor], Tensor]


def is_native_scheduler(scheduler) -> bool:
    """True when the scheduler works in our convention (flow time, velocity used directly)."""
    return isinstance(scheduler, FlowMatchGVPScheduler)


def is_rectified_flow_scheduler(scheduler) -> bool:
    """True for diffusers' flow-match schedulers: ``sigmas`` from 1 (noise) to 0, output ``noise - data``."""
    config = scheduler.config
    if type(scheduler).__name__.startswith("FlowMatch") and not is_native_scheduler(scheduler):
        return True
    return bool(config.get("use_flow_sigmas")) and config.get("prediction_type") == "flow_prediction"


def check_scheduler(scheduler) -> None:
    """Raise a ValueError for a scheduler that is not a flow-matching ODE scheduler."""
    if not (is_native_scheduler(scheduler) or is_rectified_flow_scheduler(scheduler)):
        raise ValueError(
            "scheduler must be FlowMatchGVPScheduler or a diffusers flow-match scheduler "
            "(FlowMatch*Scheduler, or one with use_flow_sigmas=True, prediction_type='flow_prediction'), "
            f"got {type(scheduler).__name__}"
        )


class RectifiedFlowAdapter:
    """Maps a diffusers flow-match scheduler's state to a velocity model on `flow_path`, and back."""

    def __init__(self, scheduler, flow_path: FlowPath):
        self.scheduler = scheduler
        self.flow_path = flow_path

    def model_inputs(self, sample: Tensor, index: int) -> tuple[Tensor, Tensor]:
        """``(x_t, t)`` for the model at schedule position `index`; `t` has shape ``(1,)``."""
        rectified_sigma = (
            self.scheduler.sigmas[index].to(device=sample.device, dtype=torch.float32).reshape(1)
        )
        t = self.flow_path.time_from_rectified_sigma(rectified_sigma)
        alpha, sigma, _, _ = self.flow_path.coefficients(t)
        return sample * (alpha + sigma).to(sample.dtype), t

    def scheduler_output(self, velocity: Tensor, x_t: Tensor, t: Tensor) -> Tensor:
        """The ``noise - data`` prediction that the scheduler's ``step`` expects."""
        if self.flow_path.name == "linear":
            return -velocity
        data, noise = self.flow_path.predict_endpoints(x_t.float(), velocity.float(), t)
        return (noise - data).to(velocity.dtype)


def sample_flow(
    velocity_fn: VelocityFn,
    latents: Tensor,
    scheduler,
    flow_path: FlowPath,
    num_inference_steps: int | None = None,
    *,
    step_callback: StepCallback | None = None,
    progress_bar: Callable[[Iterable], Iterable] | None = None,
) -> tuple[Tensor, int]:
    """Integrate `latents` (pure noise) to data with `scheduler`; returns the samples and the model calls.

    Args:
        velocity_fn: the model's velocity ``velocity_fn(x_t, t)``, ``t`` a float tensor of shape ``(1,)``.
        latents: initial noise, already multiplied by the scheduler's ``init_noise_sigma``.
        scheduler: a [`FlowMatchGVPScheduler`] or a diffusers flow-match scheduler.
        flow_path: the path the model was trained on.
        num_inference_steps: steps of a fixed-step scheduler. None integrates adaptively with dopri5 in the
            model's own convention (the tolerances of a ``FlowMatchGVPScheduler``, else 1e-6 / 1e-3); an
            adaptive ``FlowMatchGVPScheduler`` ignores it.
        step_callback: ``step_callback(i, timestep, latents) -> latents`` after every scheduler step.
        progress_bar: wraps the iterable of timesteps (e.g. ``pipeline.progress_bar``).
    """
    check_scheduler(scheduler)
    native = is_native_scheduler(scheduler)
    if native and scheduler.flow_path.name != flow_path.name:
        raise ValueError(
            f"the scheduler's path {scheduler.config.path!r} differs from the model's path {flow_path.name!r}"
        )
    if num_inference_steps is None or (native and scheduler.is_adaptive):
        if step_callback is not None:
            raise ValueError("callback_on_step_end is not supported by the adaptive solver (dopri5)")
        if native:
            config = scheduler.config
            return sample_ode(velocity_fn, latents, config.t_start, config.t_end, config.atol, config.rtol)
        return sample_ode(velocity_fn, latents)

    scheduler.set_timesteps(num_inference_steps, device=latents.device)
    adapter = None if is_native_scheduler(scheduler) else RectifiedFlowAdapter(scheduler, flow_path)
    timesteps = scheduler.timesteps
    calls = 0
    for i, timestep in enumerate(progress_bar(timesteps) if progress_bar else timesteps):
        if adapter is None:
            x_t = scheduler.scale_model_input(latents, timestep)
            t = timestep.reshape(1).float()
        else:
            x_t, t = adapter.model_inputs(latents, i)
        velocity = velocity_fn(x_t, t)
        calls += 1
        model_output = velocity if adapter is None else adapter.scheduler_output(velocity, x_t, t)
        latents = scheduler.step(model_output, timestep, latents, return_dict=False)[0]
        if step_callback is not None:
            latents = step_callback(i, timestep, latents)
    return latents, calls
