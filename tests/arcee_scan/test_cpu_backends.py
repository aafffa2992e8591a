"""The CPU backends ("torch", "numba") against the naive reference: values and every gradient."""

from __future__ import annotations

import importlib

import pytest
import torch
from scan_testing import assert_all_close, detached_copy, make_inputs, outputs_and_grads
from torch._subclasses.fake_tensor import FakeTensorMode

from arcee_scan import interface

CPU_BACKENDS = ("torch", "numba")

# fp32: a clean implementation agrees with the reference to ~1e-6, so test well inside mamba's 6e-4/2e-3
RTOL, ATOL = 1e-4, 1e-5

# (batch, dim, L, N, groups, time_major, chunk_size): a pairwise cover of the lengths, state sizes, channel
# counts that are not multiples of a block, batch 1 and 3, ungrouped / grouped B/C and time-major layouts
GRID = [
    (1, 24, 1, 1, None, False, 16),
    (3, 24, 2, 2, 2, True, 16),
    (1, 100, 7, 3, 4, False, 16),
    (3, 24, 16, 8, None, True, 16),
    (1, 100, 17, 16, 2, False, 16),
    (3, 24, 63, 17, 4, True, 5),
    (1, 24, 64, 64, None, False, 16),
    (3, 100, 65, 8, 4, True, 16),
    (1, 24, 256, 16, 2, True, 16),
    (1, 24, 257, 256, None, False, 16),
    (3, 100, 64, 1, 1, False, 64),
    (1, 12, 257, 3, 4, True, 1),
    (3, 12, 20, 2, None, False, 100),
]


@pytest.fixture(params=CPU_BACKENDS)
def backend(request) -> str:
    return request.param


def compare_to_reference(
    inputs: dict, backend: str, rtol: float = RTOL, atol: float = ATOL, **kwargs
) -> None:
    expected = outputs_and_grads(detached_copy(inputs), "reference", **kwargs)
    actual = outputs_and_grads(inputs, backend, **kwargs)
    assert_all_close(actual, expected, rtol, atol)


@pytest.mark.parametrize("batch, dim, length, d_state, groups, time_major, chunk_size", GRID)
def test_matches_reference(backend, batch, dim, length, d_state, groups, time_major, chunk_size):
    inputs = make_inputs(batch, dim, length, d_state, groups, time_major=time_major)
    compare_to_reference(inputs, backend, chunk_size=chunk_size)


OPTIONS = ("D", "z", "delta_bias", "delta_softplus", "initial_state")


@pytest.mark.parametrize(
    "absent", [(), OPTIONS, *[(name,) for name in OPTIONS]], ids=lambda a: "-".join(a) or "all"
)
@pytest.mark.parametrize("loss_on", ["both", "y", "h_T"])
def test_optional_inputs(backend, absent, loss_on):
    inputs = make_inputs(2, 12, 21, 5, 2, **{name: False for name in absent})
    compare_to_reference(inputs, backend, loss_on=loss_on, chunk_size=8)


def test_state_gradient_alone_reaches_initial_state(backend):
    # a loss on h_T only: dout = 0, so dh0 comes from dh_T through the decays alone
    inputs = make_inputs(2, 8, 19, 4)
    result = outputs_and_grads(inputs, backend, loss_on="h_T", chunk_size=4)
    expected = outputs_and_grads(detached_copy(inputs), "reference", loss_on="h_T")
    assert result["dinitial_state"].abs().max() > 0
    assert_all_close(result, expected, RTOL, ATOL)


def test_underflowing_decay(backend):
    # delta*A far below -87 / -745: a underflows to exactly 0 in fp32, which must stay harmless
    inputs = make_inputs(2, 8, 33, 16, delta_softplus=False)
    with torch.no_grad():
        inputs["A"].mul_(400.0)
        inputs["delta"].add_(1.0)
    compare_to_reference(inputs, backend, chunk_size=16)


def test_large_delta_above_softplus_threshold(backend):
    inputs = make_inputs(2, 8, 23, 4)
    with torch.no_grad():
        inputs["delta"][:, ::2].add_(30.0)  # delta + bias > 20: softplus is the identity there
        inputs["A"].mul_(0.001)
    compare_to_reference(inputs, backend, chunk_size=8)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_against_fp32_reference(backend, dtype):
    inputs = make_inputs(2, 16, 37, 8, 2, dtype=dtype)
    result = outputs_and_grads(inputs, backend, chunk_size=16)
    # the reference sees the same rounded values in fp32 and the same (rounded) cotangents
    expected = outputs_and_grads(detached_copy(inputs, torch.float32), "reference", output_dtype=dtype)
    assert result["y"].dtype == dtype and result["du"].dtype == dtype and result["ddelta"].dtype == dtype
    assert result["h_T"].dtype == torch.float32 and result["dinitial_state"].dtype == torch.float32
    eps = torch.finfo(dtype).eps
    # fp32 state and accumulators: h_T and the fp32 gradients only differ by fp32 rounding
    for name in ("h_T", "dA", "dD", "ddelta_bias", "dinitial_state"):
        assert_all_close({name: result[name]}, {name: expected[name]}, RTOL, ATOL)
    # outputs in dtype: one rounding of the fp32 result
    for name in ("y", "du", "ddelta", "dz", "dB", "dC"):
        assert_all_close({name: result[name].float()}, {name: expected[name]}, 2 * eps, 2 * eps)


def test_float64_computes_in_float64(backend):
    inputs = make_inputs(2, 6, 9, 3, dtype=torch.float64)
    result = outputs_and_grads(inputs, backend, chunk_size=4)
    assert result["h_T"].dtype == torch.float64 and result["dA"].dtype == torch.float64
    compare_to_reference(inputs, backend, rtol=1e-10, atol=1e-12, chunk_size=4)


def test_deterministic_mode_is_bitwise_repeatable(backend):
    inputs = make_inputs(2, 24, 40, 8, 2)
    first = outputs_and_grads(inputs, backend, deterministic=True)
    second = outputs_and_grads(inputs, backend, deterministic=True)
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


@pytest.mark.parametrize("time_major", [False, True])
def test_outputs_are_laid_out_as_the_fakes_say(backend, time_major):
    # torch.compile plans with the fake implementations' strides, whatever the inputs' strides were
    module = importlib.import_module(f"arcee_scan.{backend}_scan")
    inputs = make_inputs(2, 12, 9, 4, 2, time_major=time_major)
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")
    args = [inputs[name].detach() for name in names]
    real = module.scan_forward(*args[:8], True, args[8], 4)
    with FakeTensorMode() as mode:
        fake_args = [mode.from_tensor(t) for t in args]
        fake = interface._selective_scan_fwd(*fake_args[:8], True, fake_args[8], 4, False, backend)
    for name, got, want in zip(("out", "h_T", "checkpoints", "y_pregate"), real, fake):
        assert got.shape == want.shape and got.stride() == want.stride(), name
    out, h_T, checkpoints, y_pregate = real
    cotangents = [torch.randn_like(out), torch.randn_like(h_T)]
    grads = module.scan_backward(*cotangents, *args[:8], True, args[8], checkpoints, y_pregate, 4, False)
    with FakeTensorMode() as mode:
        fake_bwd_args = [mode.from_tensor(t) for t in (*cotangents, *args, checkpoints, y_pregate)]
        dout, dh_T, *inputs_fake, checkpoints_fake, y_pregate_fake = fake_bwd_args
        fake_grads = interface._selective_scan_bwd(
            dout, dh_T, *inputs_fake[:8], True, inputs_fake[8], checkpoints_fake, y_pregate_fake, 4, False,
            backend,
        )  # fmt: skip
    for name, got, want in zip(names, grads, fake_grads):
        assert got.shape == want.shape and got.stride() == want.stride(), name


def test_flush_to_zero_is_left_as_it_was(backend):
    # both flush denormals to zero while they run (decay products underflow through the denormal range,
    # ~10x slower on x86) and restore the calling thread's own setting afterwards
    inputs = make_inputs(2, 8, 9, 4)
    for flush in (False, True):
        if not torch.set_flush_denormal(flush):
            pytest.skip("flush-to-zero is not supported on this CPU")
        outputs_and_grads(inputs, backend)
        denormal = (torch.tensor([1e-30]) * 1e-9).item()
        assert (denormal == 0.0) == flush
    torch.set_flush_denormal(False)
