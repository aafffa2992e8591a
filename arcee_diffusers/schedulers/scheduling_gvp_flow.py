"""A flow-matching ODE scheduler in SiT's native convention, for the GVP (paper) and linear paths.

Time runs from ``t_start`` (0, noise) to ``t_end`` (1, data); the model's output is the velocity ``dx_t/dt``
and is used as it is, with no sign or time conversion. ``timesteps`` hold the raw flow times the model is
called at.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput
from torch import Tensor

from .flow_paths import get_flow_path

SOLVERS = ("euler", "heun", "dopri5")
# the paper's evaluation sampler: FlowMatchGVPScheduler(path=..., **PAPER_SOLVER)
PAPER_SOLVER = {"solver": "dopri5", "atol": 1e-6, "rtol": 1e-3}

VelocityFn = Callable[[Tensor, Tensor], Tensor]


@dataclass
class FlowMatchGVPSchedulerOutput(BaseOutput):
    """Output of [`FlowMatchGVPScheduler.step`].

    Args:
        prev_sample (`torch.Tensor`): the sample at the next time of the schedule.
    """

    prev_sample: Tensor


def sample_ode(
    velocity_fn: VelocityFn,
    sample: Tensor,
    t_start: float = 0.0,
    t_end: float = 1.0,
    atol: float = 1e-6,
    rtol: float = 1e-3,
    method: str = "dopri5",
) -> tuple[Tensor, int]:
    """Integrate ``dx/dt = velocity_fn(x, t)`` from ``t_start`` to ``t_end`` with torchdiffeq's `method`.

    The defaults are the paper's evaluation protocol (dopri5, atol 1e-6, rtol 1e-3). The state is integrated
    in float32 whatever the model's dtype. Returns the final sample and the TRUE number of ``velocity_fn``
    calls, including the solver's initial step-size probes and rejected steps. The error norm, hence the step
    sequence, spans the whole batch: a batch reproduces its samples run one by one only to the tolerances.
    """
    from torchdiffeq import odeint

    calls = 0

    def func(t: Tensor, x: Tensor) -> Tensor:
        nonlocal calls
        calls += 1
        return velocity_fn(x, t.reshape(1)).float()

    times = torch.tensor([t_start, t_end], dtype=torch.float32, device=sample.device)
    trajectory = odeint(func, sample.float(), times, method=method, atol=atol, rtol=rtol)
    return trajectory[-1], calls


class FlowMatchGVPScheduler(SchedulerMixin, ConfigMixin):
    """ODE sampler for flow-matching models trained in SiT's convention (t = 0 noise, t = 1 data).

    The model output is the velocity and is used directly. Fixed-step solvers (`"euler"`, one model call per
    step; `"heun"`, two) run through [`~FlowMatchGVPScheduler.step`] like any diffusers scheduler.
    `"dopri5"` is adaptive: no `step`; [`~FlowMatchGVPScheduler.solve`] (for a hand-written loop) and the
    pipeline integrate with [`sample_ode`] instead. With its defaults it is the paper's evaluation protocol.

    Args:
        path (`str`, defaults to `"gvp"`): the path the model was trained on, `"gvp"` or `"linear"`. The
            native ODE does not depend on it; it tells the pipeline how to map the model onto diffusers'
            schedulers if one is swapped in.
        solver (`str`, defaults to `"euler"`): `"euler"`, `"heun"` or `"dopri5"`.
        t_start (`float`, defaults to 0.0): the flow time sampling starts from (noise).
        t_end (`float`, defaults to 1.0): the flow time sampling ends at (data).
        atol (`float`, defaults to 1e-6): absolute tolerance of `"dopri5"`.
        rtol (`float`, defaults to 1e-3): relative tolerance of `"dopri5"`.
    """

    order = 1

    @register_to_config
    def __init__(
        self,
        path: str = "gvp",
        solver: str = "euler",
        t_start: float = 0.0,
        t_end: float = 1.0,
        atol: float = 1e-6,
        rtol: float = 1e-3,
    ):
        self.flow_path = get_flow_path(path)
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if not 0.0 <= t_start < t_end <= 1.0:
            raise ValueError(f"need 0 <= t_start < t_end <= 1, got t_start={t_start}, t_end={t_end}")
        self.order = 2 if solver == "heun" else 1
        self.init_noise_sigma = 1.0
        self.timesteps: Tensor | None = None
        self.num_inference_steps: int | None = None
        self._grid: Tensor | None = None
        self._step_index: int | None = None
        self._heun_sample: Tensor | None = None
        self._heun_velocity: Tensor | None = None

    @property
    def is_adaptive(self) -> bool:
        """True for `"dopri5"`: no fixed schedule, it samples with [`~FlowMatchGVPScheduler.solve`]."""
        return self.config.solver == "dopri5"

    @property
    def step_index(self) -> int | None:
        """The number of `step` calls since `set_timesteps`."""
        return self._step_index

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Make a uniform grid of `num_inference_steps` steps from `t_start` to `t_end`.

        `timesteps` lists the flow time of every model call: `num_inference_steps` for Euler, twice that for
        Heun (each step's start, then its end). An adaptive solver has no fixed schedule and raises.
        """
        if self.is_adaptive:
            raise ValueError(
                "solver='dopri5' is adaptive: call `solve(velocity_fn, sample)` instead of stepping"
            )
        if not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive int, got {num_inference_steps!r}")
        grid = torch.linspace(
            self.config.t_start, self.config.t_end, num_inference_steps + 1, dtype=torch.float64
        )
        if self.config.solver == "heun":
            timesteps = torch.stack([grid[:-1], grid[1:]], dim=1).flatten()
        else:
            timesteps = grid[:-1]
        self._grid = grid.to(device=device, dtype=torch.float32)
        self.timesteps = timesteps.to(device=device, dtype=torch.float32)
        self.num_inference_steps = num_inference_steps
        self._step_index = 0
        self._heun_sample = self._heun_velocity = None

    def scale_model_input(self, sample: Tensor, timestep: Tensor | float | None = None) -> Tensor:
        """The identity: the model sees ``x_t`` itself."""
        return sample

    def step(
        self,
        model_output: Tensor,
        timestep: Tensor | float,
        sample: Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> FlowMatchGVPSchedulerOutput | tuple[Tensor]:
        """Advance `sample` by one model call, given the velocity `model_output` at `timestep`.

        `timestep` is accepted for the diffusers signature; the position in the schedule comes from the number
        of calls since `set_timesteps`, which must be called first.
        """
        if self._step_index is None or self.timesteps is None:
            raise ValueError("call `set_timesteps` before `step`")
        if self._step_index >= len(self.timesteps):
            raise ValueError(f"all {len(self.timesteps)} steps of the schedule were already taken")
        velocity = model_output.float()
        if self.config.solver == "heun":
            interval = self._step_index // 2
            dt = self._grid[interval + 1] - self._grid[interval]
            if self._step_index % 2 == 0:
                # predictor: an Euler step to the interval's end, where the model is called next
                self._heun_sample, self._heun_velocity = sample, velocity
                prev_sample = sample.float() + dt * velocity
            else:
                prev_sample = self._heun_sample.float() + dt * (self._heun_velocity + velocity) / 2
                self._heun_sample = self._heun_velocity = None
        else:
            dt = self._grid[self._step_index + 1] - self._grid[self._step_index]
            prev_sample = sample.float() + dt * velocity
        self._step_index += 1
        prev_sample = prev_sample.to(model_output.dtype)
        if not return_dict:
            return (prev_sample,)
        return FlowMatchGVPSchedulerOutput(prev_sample=prev_sample)

    def solve(self, velocity_fn: VelocityFn, sample: Tensor) -> tuple[Tensor, int]:
        """Integrate from `t_start` to `t_end` adaptively; returns the sample and the number of model calls.

        `velocity_fn(x, t)` gets `t` as a 1-element float32 tensor; see [`sample_ode`].
        """
        if not self.is_adaptive:
            raise ValueError(
                f"`solve` needs solver='dopri5', this scheduler has solver={self.config.solver!r}"
            )
        return sample_ode(
            velocity_fn,
            sample,
            t_start=self.config.t_start,
            t_end=self.config.t_end,
            atol=self.config.atol,
            rtol=self.config.rtol,
        )
