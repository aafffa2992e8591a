"""Flow-matching samplers on an analytic target: Gaussian data has an exact velocity field for every path.

Data ``x1 ~ N(MU, STD^2)``, noise ``x0 ~ N(0, 1)``. On a path ``x_t = alpha x1 + sigma x0`` the marginal of
``x_t`` is ``N(alpha MU, V)`` with ``V = alpha^2 STD^2 + sigma^2`` and the exact velocity is
``d_alpha MU + (d_alpha alpha STD^2 + d_sigma sigma) / V * (x - alpha MU)``. The ODE from noise ``z`` then
ends exactly at ``MU + STD z``, so every sampler's error can be measured sample by sample.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from arcee_diffusers.schedulers.flow_paths import get_flow_path
from arcee_diffusers.schedulers.sampling import RectifiedFlowAdapter, check_scheduler, sample_flow
from arcee_diffusers.schedulers.scheduling_gvp_flow import FlowMatchGVPScheduler

MU, STD = 0.7, 0.5
PATHS = ["gvp", "linear"]
FLOW_SIGMAS = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}


def exact_velocity(path_name: str):
    path = get_flow_path(path_name)

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma, d_alpha, d_sigma = path.coefficients(t.double())
        variance = alpha**2 * STD**2 + sigma**2
        slope = (d_alpha * alpha * STD**2 + d_sigma * sigma) / variance
        return (d_alpha * MU + slope * (x.double() - alpha * MU)).to(x.dtype)

    return velocity


@pytest.fixture(scope="module")
def noise() -> torch.Tensor:
    # (batch, channels): UniPC stacks model outputs on dim 1, so it needs at least two dimensions
    return torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))


def run(path_name: str, scheduler, noise: torch.Tensor, steps: int | None = None):
    """``(max |sample - exact endpoint|, samples, model calls)`` for the exact velocity on `path_name`."""
    out, calls = sample_flow(
        exact_velocity(path_name), noise.clone(), scheduler, get_flow_path(path_name), steps
    )
    exact = MU + STD * noise
    return (out - exact).abs().max().item(), out, calls


def order_of_convergence(path_name: str, make_scheduler, noise: torch.Tensor, steps=(8, 16, 32, 64)) -> float:
    errors = [run(path_name, make_scheduler(), noise, n)[0] for n in steps]
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    return -slope


# ---- FlowMatchGVPScheduler (native convention) -----------------------------------------------------------


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize(("solver", "steps", "tolerance"), [("euler", 100, 0.05), ("heun", 25, 0.01)])
def test_fixed_step_solvers_sample_the_gaussian(path_name, solver, steps, tolerance, noise):
    error, out, calls = run(path_name, FlowMatchGVPScheduler(path=path_name, solver=solver), noise, steps)
    assert calls == steps * (2 if solver == "heun" else 1)
    assert error < tolerance
    # 8192 values: the sample mean has standard error STD / sqrt(8192) ~ 0.0055
    assert abs(out.mean().item() - MU) < 0.03
    assert abs(out.std().item() - STD) < 0.02


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize(("solver", "expected_order"), [("euler", 1.0), ("heun", 2.0)])
def test_error_shrinks_at_the_solver_order(path_name, solver, expected_order, noise):
    order = order_of_convergence(
        path_name, lambda: FlowMatchGVPScheduler(path=path_name, solver=solver), noise
    )
    assert abs(order - expected_order) < 0.25, order


@pytest.mark.parametrize("path_name", PATHS)
def test_dopri5_reports_the_true_number_of_model_calls(path_name, noise):
    error, out, calls = run(path_name, FlowMatchGVPScheduler(path=path_name, solver="dopri5"), noise)
    assert error < 0.02
    assert abs(out.std().item() - STD) < 0.02
    # dopri5 in torchdiffeq: 2 calls to choose the first step, then 6 per step (first-same-as-last)
    assert calls > 2 and (calls - 2) % 6 == 0
    tight_error, _, tight_calls = run(
        path_name, FlowMatchGVPScheduler(path=path_name, solver="dopri5", rtol=1e-6), noise
    )
    assert tight_calls > calls and tight_error < error / 10


def test_heun_timesteps_list_every_model_call():
    scheduler = FlowMatchGVPScheduler(solver="heun")
    scheduler.set_timesteps(4)
    expected = [0.0, 0.25, 0.25, 0.5, 0.5, 0.75, 0.75, 1.0]
    torch.testing.assert_close(scheduler.timesteps, torch.tensor(expected))
    assert scheduler.order == 2 and scheduler.init_noise_sigma == 1.0
    euler = FlowMatchGVPScheduler(solver="euler", t_start=0.2)
    euler.set_timesteps(4)
    torch.testing.assert_close(euler.timesteps, torch.tensor([0.2, 0.4, 0.6, 0.8]))


def test_config_round_trip_and_solver_swap(tmp_path):
    scheduler = FlowMatchGVPScheduler(path="linear", solver="heun", rtol=1e-4)
    scheduler.save_pretrained(tmp_path)
    assert (tmp_path / "scheduler_config.json").is_file()
    loaded = FlowMatchGVPScheduler.from_pretrained(tmp_path)
    public = {key for key in scheduler.config if not key.startswith("_")}
    assert {key: loaded.config[key] for key in public} == {key: scheduler.config[key] for key in public}
    swapped = FlowMatchGVPScheduler.from_config(loaded.config, solver="dopri5")
    assert swapped.config.path == "linear" and swapped.is_adaptive and swapped.config.rtol == 1e-4


def test_bad_arguments_raise():
    with pytest.raises(ValueError, match="solver"):
        FlowMatchGVPScheduler(solver="rk4")
    with pytest.raises(ValueError, match="path"):
        FlowMatchGVPScheduler(path="vp")
    with pytest.raises(ValueError, match="t_start"):
        FlowMatchGVPScheduler(t_start=1.0)
    scheduler = FlowMatchGVPScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1), 0.0, torch.zeros(1))
    with pytest.raises(ValueError, match="num_inference_steps"):
        scheduler.set_timesteps(0)
    with pytest.raises(ValueError, match="solve"):
        FlowMatchGVPScheduler(solver="dopri5").set_timesteps(10)
    with pytest.raises(ValueError, match="dopri5"):
        scheduler.solve(lambda x, t: x, torch.zeros(1))
    with pytest.raises(ValueError, match="path"):
        sample_flow(exact_velocity("gvp"), torch.zeros(2, 2), scheduler, get_flow_path("linear"), 4)
    with pytest.raises(ValueError, match="flow-match"):
        check_scheduler(DPMSolverMultistepScheduler())


# ---- diffusers' flow-match schedulers, unchanged ---------------------------------------------------------


DIFFUSERS_SCHEDULERS = {
    "euler": lambda: FlowMatchEulerDiscreteScheduler(),
    "heun": lambda: FlowMatchHeunDiscreteScheduler(),
    "dpmsolver++": lambda: DPMSolverMultistepScheduler(**FLOW_SIGMAS),
    "unipc": lambda: UniPCMultistepScheduler(**FLOW_SIGMAS),
}


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize(
    ("name", "steps", "calls", "tolerance"),
    [
        ("euler", 200, 200, 0.02),
        ("heun", 25, 49, 0.01),
        ("dpmsolver++", 50, 50, 0.02),
        ("unipc", 50, 50, 0.01),
    ],
)
def test_diffusers_flow_schedulers_sample_the_gaussian(path_name, name, steps, calls, tolerance, noise):
    error, out, used_calls = run(path_name, DIFFUSERS_SCHEDULERS[name](), noise, steps)
    assert used_calls == calls
    assert error < tolerance
    assert abs(out.mean().item() - MU) < 0.03
    assert abs(out.std().item() - STD) < 0.02


@pytest.mark.parametrize("path_name", PATHS)
@pytest.mark.parametrize(("name", "expected_order"), [("euler", 1.0), ("heun", 2.0)])
def test_diffusers_flow_schedulers_converge_at_their_order(path_name, name, expected_order, noise):
    assert abs(order_of_convergence(path_name, DIFFUSERS_SCHEDULERS[name], noise) - expected_order) < 0.25


@pytest.mark.parametrize("name", ["dpmsolver++", "unipc"])
def test_diffusers_multistep_flow_schedulers_converge(name, noise):
    # Their last step, onto sigma = 0, limits them to about first order in diffusers 0.42: check convergence.
    errors = [run("gvp", DIFFUSERS_SCHEDULERS[name](), noise, n)[0] for n in (20, 80)]
    assert errors[1] < errors[0] / 2


# ---- the change of variables between paths and diffusers' convention -------------------------------------


@pytest.mark.parametrize("path_name", PATHS)
def test_path_maps_onto_the_rectified_flow_convention(path_name):
    path = get_flow_path(path_name)
    data, noise = torch.randn(2, 5, 3, dtype=torch.float64).unbind(0)
    rectified_sigma = torch.tensor([1.0, 0.9, 0.5, 0.1, 0.0], dtype=torch.float64)
    t = path.time_from_rectified_sigma(rectified_sigma)
    assert t[0].item() == 0.0 and math.isclose(t[-1].item(), 1.0)
    alpha, sigma, _, _ = path.coefficients(t[:, None])
    rescaled = path.interpolate(data, noise, t) / (alpha + sigma)
    s = rectified_sigma[:, None]
    torch.testing.assert_close(rescaled, s * noise + (1 - s) * data)
    velocity = path.velocity(data, noise, t)
    predicted_data, predicted_noise = path.predict_endpoints(path.interpolate(data, noise, t), velocity, t)
    torch.testing.assert_close(predicted_data, data)
    torch.testing.assert_close(predicted_noise, noise)


def test_adapter_hands_diffusers_the_true_data_prediction():
    """Through the change of variables, ``sample - s * output`` is the model's posterior mean of the data.

    Any time mapping integrates the same ODE; this one also makes the scheduler's quantities mean what it
    assumes (its ``s`` is the model's noise fraction, its data prediction is E[x1 | x_t]).
    """
    path = get_flow_path("gvp")
    scheduler = FlowMatchEulerDiscreteScheduler()
    scheduler.set_timesteps(10)
    adapter = RectifiedFlowAdapter(scheduler, path)
    sample = torch.randn(64, 2, dtype=torch.float64)
    for index in (1, 4, 8):
        x_t, t = adapter.model_inputs(sample, index)
        output = adapter.scheduler_output(exact_velocity("gvp")(x_t, t), x_t, t)
        alpha, sigma, _, _ = path.coefficients(t.double())
        posterior_mean = MU + alpha * STD**2 / (alpha**2 * STD**2 + sigma**2) * (x_t - alpha * MU)
        rectified_sigma = scheduler.sigmas[index].double()
        torch.testing.assert_close(sample - rectified_sigma * output, posterior_mean, rtol=1e-5, atol=1e-5)
