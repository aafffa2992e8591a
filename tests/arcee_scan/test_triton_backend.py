"""The Triton backend against the naive reference, through the public ``selective_scan``.

Without a GPU the kernels run on CPU tensors under ``TRITON_INTERPRET=1`` (set in the root conftest.py),
which executes one program at a time with numpy: it proves the math and the masking, not speed or races.
The interpreter calls a custom scan combine once per element, so shapes here are tiny. On a CUDA machine the
same tests run on the GPU, plus the CUDA-only ones at larger shapes.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from scan_testing import assert_all_close, detached_copy, make_inputs, outputs_and_grads

from arcee_scan import selective_scan, triton_scan

pytestmark = pytest.mark.triton

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
RTOL, ATOL = 1e-4, 1e-5
LOW_PRECISION_TOLERANCES = [(torch.float16, 3e-3, 5e-3), (torch.bfloat16, 3e-2, 5e-2)]


def compare_to_reference(inputs: dict, rtol: float = RTOL, atol: float = ATOL, **kwargs) -> None:
    expected = outputs_and_grads(detached_copy(inputs, torch.float32), "reference", **kwargs)
    actual = outputs_and_grads(inputs, "triton", **kwargs)
    assert_all_close(actual, expected, rtol, atol)


# (batch, dim, L, N, groups, time_major, chunk_size): L not a multiple of the chunk, non-power-of-two chunks,
# one step, one partial chunk, a channel count that is not a power of two, N over one backward state block
GRID = [
    (2, 4, 11, 3, 2, False, 4),
    (1, 6, 1, 1, None, True, 16),
    (3, 5, 7, 2, 1, True, 1),
    (1, 4, 10, 3, 4, False, 3),
    (2, 4, 17, 5, None, True, 16),
    (1, 3, 5, 17, None, False, 8),
]


@pytest.mark.parametrize("batch, dim, length, d_state, groups, time_major, chunk_size", GRID)
def test_matches_reference(batch, dim, length, d_state, groups, time_major, chunk_size):
    inputs = make_inputs(batch, dim, length, d_state, groups, time_major=time_major, device=DEVICE)
    compare_to_reference(inputs, chunk_size=chunk_size)


OPTIONS = ("D", "z", "delta_bias", "delta_softplus", "initial_state")


@pytest.mark.parametrize("absent", [OPTIONS, *[(name,) for name in OPTIONS]], ids="-".join)
def test_optional_inputs(absent):
    inputs = make_inputs(2, 4, 9, 3, 2, device=DEVICE, **dict.fromkeys(absent, False))
    compare_to_reference(inputs, chunk_size=4)


@pytest.mark.parametrize("loss_on", ["y", "h_T"])
def test_loss_on_one_output(loss_on):
    # h_T alone: every gradient, dh0 included, comes from dh_T (dout = 0); y alone: dh_T = 0
    inputs = make_inputs(1, 4, 9, 3, 2, device=DEVICE)
    compare_to_reference(inputs, loss_on=loss_on, chunk_size=4)


@pytest.fixture
def small_tiles(monkeypatch):
    """Tiles so small that several programs share every sum: the atomic and partial-sum paths run."""
    monkeypatch.setattr(triton_scan, "FORWARD_TILE", 8)
    monkeypatch.setattr(triton_scan, "BACKWARD_TILE", 16)
    monkeypatch.setattr(triton_scan, "DETERMINISTIC_BACKWARD_TILE", 16)
    monkeypatch.setattr(triton_scan, "DETERMINISTIC_BACKWARD_BLOCK_N", 2)
    monkeypatch.setattr(triton_scan, "BACKWARD_BLOCK_N", 2)


@pytest.mark.parametrize("deterministic", [False, True])
@pytest.mark.parametrize("dim, groups", [(6, None), (8, 2)])
def test_multi_block_reductions(small_tiles, dim, groups, deterministic):
    # dim 6 leaves a partial channel block; N = 5 spans three state blocks of 2
    inputs = make_inputs(2, dim, 7, 5, groups, device=DEVICE)
    compare_to_reference(inputs, chunk_size=4, deterministic=deterministic)


def test_deterministic_is_bitwise_repeatable(small_tiles):
    inputs = make_inputs(1, 8, 7, 5, 2, device=DEVICE)
    first, second = (
        outputs_and_grads(detached_copy(inputs), "triton", chunk_size=4, deterministic=True) for _ in range(2)
    )
    for name, value in first.items():
        assert torch.equal(value, second[name]), name


class _CountingLaunches:
    """Stands in for a kernel and counts its launches."""

    def __init__(self, kernel):
        self.kernel, self.grids = kernel, []

    def __getitem__(self, grid):
        self.grids.append(grid)
        return self.kernel[grid]


def test_partial_sums_a_few_samples_at_a_time(small_tiles, monkeypatch):
    # with PARTIAL_SUM_BYTES too small for even one sample's partials, the backward runs one sample per
    # launch: the same bits as one launch over the whole batch
    inputs = make_inputs(3, 8, 7, 5, 2, device=DEVICE)
    whole = outputs_and_grads(detached_copy(inputs), "triton", chunk_size=4, deterministic=True)
    launches = _CountingLaunches(triton_scan._scan_bwd_kernel)
    monkeypatch.setattr(triton_scan, "_scan_bwd_kernel", launches)
    monkeypatch.setattr(triton_scan, "PARTIAL_SUM_BYTES", 1)
    sliced = outputs_and_grads(detached_copy(inputs), "triton", chunk_size=4, deterministic=True)
    assert [grid[0] for grid in launches.grids] == [1, 1, 1]
    for name, value in whole.items():
        assert torch.equal(value, sliced[name]), name


@pytest.mark.parametrize("use_flip", [True, False], ids=["flip", "reverse"])
def test_reverse_scan_variants(monkeypatch, use_flip):
    # tl.flip + forward scan (the default) and associative_scan(reverse=True) must both be right
    monkeypatch.setattr(triton_scan, "REVERSE_SCAN_WITH_FLIP", use_flip)
    inputs = make_inputs(1, 4, 10, 3, 2, device=DEVICE)
    compare_to_reference(inputs, chunk_size=4)


@pytest.mark.parametrize("choice", ["CHANNEL_BLOCKS_FIRST", "FLOAT32_B_C"])
def test_launch_choices_change_no_bit(small_tiles, monkeypatch, choice):
    # the grid order and fp32 copies of half B/C change which program runs when and what it loads, not a
    # single result (deterministic mode: no atomics, whose order the grid order would change)
    inputs = make_inputs(3, 6, 9, 3, 2, dtype=torch.bfloat16, device=DEVICE)
    default = outputs_and_grads(detached_copy(inputs), "triton", chunk_size=4, deterministic=True)
    monkeypatch.setattr(triton_scan, choice, True)
    changed = outputs_and_grads(inputs, "triton", chunk_size=4, deterministic=True)
    for name, value in default.items():
        assert torch.equal(value, changed[name]), name


@pytest.mark.parametrize("dtype, rtol, atol", LOW_PRECISION_TOLERANCES, ids=["fp16", "bf16"])
def test_low_precision_inputs(dtype, rtol, atol):
    # against the fp32 reference on the same rounded inputs; states and accumulators stay fp32
    inputs = make_inputs(2, 4, 9, 3, 2, dtype=dtype, device=DEVICE)
    expected = outputs_and_grads(detached_copy(inputs, torch.float32), "reference", output_dtype=dtype)
    actual = outputs_and_grads(inputs, "triton", chunk_size=4)
    assert actual["y"].dtype == dtype and actual["h_T"].dtype == torch.float32
    assert actual["du"].dtype == dtype and actual["dinitial_state"].dtype == torch.float32
    assert_all_close(actual, expected, rtol, atol)


def test_extreme_decay_and_large_delta():
    # delta + bias > 20 takes softplus's linear branch; delta*A near -400 underflows the decay to zero
    inputs = make_inputs(1, 4, 12, 4, 1, device=DEVICE)
    with torch.no_grad():
        inputs["delta"].mul_(8.0)
        inputs["delta_bias"].copy_(torch.tensor([25.0, 10.0, 0.0, -10.0]))
        inputs["A"].mul_(64.0)
    compare_to_reference(inputs, chunk_size=8)


def test_split_equals_full_scan():
    # scan(x[:6], h0) -> h1, then scan(x[6:], h1): outputs, final state and every gradient equal one scan
    inputs = make_inputs(1, 4, 13, 3, 2, device=DEVICE)
    time_sliced = ("u", "delta", "B", "C", "z")
    loss_weights = torch.randn(1, 4, 13, device=DEVICE)

    def run(split: int | None) -> dict:
        leaves = detached_copy(inputs)
        if split is None:
            y, h_T = selective_scan(**leaves, backend="triton", chunk_size=4)
        else:
            first = {k: v[..., :split] if k in time_sliced else v for k, v in leaves.items()}
            second = {k: v[..., split:] if k in time_sliced else v for k, v in leaves.items()}
            y1, h1 = selective_scan(**first, backend="triton", chunk_size=4)
            y2, h_T = selective_scan(**{**second, "initial_state": h1}, backend="triton", chunk_size=4)
            y = torch.cat([y1, y2], dim=-1)
        ((y * loss_weights).sum() + h_T.square().sum()).backward()
        grads = {f"d{k}": v.grad for k, v in leaves.items() if isinstance(v, torch.Tensor)}
        return {"y": y.detach(), "h_T": h_T.detach(), **grads}

    assert_all_close(run(6), run(None), RTOL, ATOL)


def test_matches_torch_backend():
    inputs = make_inputs(2, 4, 11, 5, 2, device=DEVICE)
    expected = outputs_and_grads(detached_copy(inputs), "torch", chunk_size=4)
    assert_all_close(outputs_and_grads(inputs, "triton", chunk_size=4), expected, RTOL, ATOL)


def test_kernels_compile_for_nvidia_gpus():
    # lowering to PTX and cubin for sm_90 (no GPU needed) catches what the interpreter never compiles
    script = Path(__file__).with_name("compile_triton_kernels.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, str(script), "90"], env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stdout + result.stderr[-4000:]


def test_rejects_float64():
    inputs = make_inputs(1, 2, 3, 2, dtype=torch.float64, device=DEVICE)
    with pytest.raises(TypeError, match="float64"):
        selective_scan(**inputs, backend="triton")


# ---- CUDA only: model-sized channels and states, real parallelism (races, atomics) ----

requires_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("d_state", [16, 64, 256])
@pytest.mark.parametrize("dtype, rtol, atol", [(torch.float32, RTOL, ATOL), LOW_PRECISION_TOLERANCES[1]])
def test_cuda_matches_torch_backend(d_state, dtype, rtol, atol):
    inputs = make_inputs(2, 96, 300, d_state, 2, dtype=dtype, time_major=True, device="cuda")
    expected = outputs_and_grads(detached_copy(inputs, torch.float32), "torch", output_dtype=dtype)
    assert_all_close(outputs_and_grads(inputs, "triton"), expected, rtol, atol)


@requires_cuda
@pytest.mark.cuda
@pytest.mark.parametrize("use_flip", [True, False], ids=["flip", "reverse"])
def test_cuda_matches_reference(monkeypatch, use_flip):
    monkeypatch.setattr(triton_scan, "REVERSE_SCAN_WITH_FLIP", use_flip)
    compare_to_reference(make_inputs(2, 32, 70, 64, None, device="cuda"))


@requires_cuda
@pytest.mark.cuda
def test_cuda_deterministic_is_bitwise_repeatable():
    inputs = make_inputs(4, 128, 200, 64, 1, dtype=torch.bfloat16, device="cuda")
    runs = [outputs_and_grads(detached_copy(inputs), "triton", deterministic=True) for _ in range(3)]
    for other in runs[1:]:
        for name, value in runs[0].items():
            assert torch.equal(value, other[name]), name
    atomic = outputs_and_grads(detached_copy(inputs), "triton", deterministic=False)
    # gradients come back in bf16: a different summation order may round a value one bf16 step (2^-8) apart
    assert_all_close(atomic, runs[0], 1e-2, 1e-3)
