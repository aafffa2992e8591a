"""The mixer's causal depthwise convolution: the numba kernels against F.conv1d, gradients, bad input."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from arcee_scan import causal_conv1d


def conv1d_reference(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor, silu: bool) -> torch.Tensor:
    """nn.Conv1d(E, E, K, groups=E, padding=K - 1) over time, cut to L steps, as the mixer had it."""
    channels, width = weight.shape
    out = F.conv1d(x.transpose(1, 2), weight[:, None], bias, padding=width - 1, groups=channels)
    out = out[..., : x.shape[1]].transpose(1, 2)
    return F.silu(out) if silu else out


def leaves(batch: int, length: int, channels: int, width: int, dtype=torch.float32, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    tensors = (
        torch.randn(batch, length, channels, generator=gen, dtype=torch.float64),
        torch.randn(channels, width, generator=gen, dtype=torch.float64) * 0.5,
        torch.randn(channels, generator=gen, dtype=torch.float64),
    )
    return [t.to(dtype).requires_grad_() for t in tensors]


def outputs_and_grads(function, x, weight, bias, silu):
    out = function(x, weight, bias, silu)
    cotangent = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    return (out, *torch.autograd.grad((out * cotangent).sum(), (x, weight, bias)))


@pytest.mark.parametrize("silu", [True, False])
@pytest.mark.parametrize(
    "batch, length, channels, width",
    [(2, 9, 5, 4), (3, 1, 16, 4), (1, 2, 33, 4), (2, 17, 24, 3), (1, 5, 7, 1)],
)
def test_matches_conv1d(batch, length, channels, width, silu):
    x, weight, bias = leaves(batch, length, channels, width)
    numba = outputs_and_grads(lambda *a: causal_conv1d(*a, backend="numba"), x, weight, bias, silu)
    expected = outputs_and_grads(conv1d_reference, x, weight, bias, silu)
    for name, got, want in zip(("out", "dx", "dweight", "dbias"), numba, expected):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5, msg=lambda m, n=name: f"{n}: {m}")


def test_torch_backend_is_conv1d_on_a_view():
    x, weight, bias = leaves(2, 9, 5, 4)
    torch.testing.assert_close(
        causal_conv1d(x, weight, bias, True, backend="torch"), conv1d_reference(x, weight, bias, True)
    )


def test_strided_input_and_conv1d_weight_layout():
    # a time-major half of a wider tensor (what slicing in_proj's output gives) and nn.Conv1d's (E, 1, K)
    x, weight, bias = leaves(2, 9, 10, 4)
    half = x[..., :5]
    out = causal_conv1d(half, weight[:5, None], bias[:5], True, backend="numba")
    torch.testing.assert_close(out, conv1d_reference(half, weight[:5], bias[:5], True), rtol=1e-5, atol=1e-5)


def test_gradcheck_float64():
    x, weight, bias = leaves(2, 7, 3, 4, dtype=torch.float64)
    assert torch.autograd.gradcheck(lambda *a: causal_conv1d(*a, True, backend="numba"), (x, weight, bias))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_low_precision_computes_in_float32(dtype):
    x, weight, bias = leaves(2, 9, 8, 4, dtype=dtype)
    out = causal_conv1d(x, weight, bias, True, backend="numba")
    assert out.dtype == dtype
    expected = conv1d_reference(x.float(), weight.float(), bias.float(), True)
    torch.testing.assert_close(out.float(), expected, rtol=2 * torch.finfo(dtype).eps, atol=1e-3)


def test_bitwise_repeatable_and_the_default_on_cpu():
    x, weight, bias = leaves(3, 20, 12, 4)
    first = outputs_and_grads(lambda *a: causal_conv1d(*a), x, weight, bias, True)
    second = outputs_and_grads(lambda *a: causal_conv1d(*a, backend="numba"), x, weight, bias, True)
    for got, want in zip(first, second):
        assert torch.equal(got, want)


def test_opcheck():
    x, weight, bias = (t.detach() for t in leaves(2, 5, 4, 4))
    op = torch.ops.arcee_scan.causal_conv1d_fwd.default
    torch.library.opcheck(op, (x, weight.t().contiguous().requires_grad_(), bias.requires_grad_(), True))


@pytest.mark.parametrize(
    "x, weight, bias, match",
    [
        (torch.randn(2, 5), torch.randn(5, 4), None, r"x must be 3-D \(batch, L, E\)"),
        (torch.randn(2, 5, 3), torch.randn(4, 4), None, r"weight must be \(E, K\) or \(E, 1, K\) with E = 3"),
        (torch.randn(2, 5, 3), torch.randn(3, 4), torch.randn(2), r"bias must have shape \(E,\)"),
    ],
)
def test_bad_input(x, weight, bias, match):
    with pytest.raises(ValueError, match=match):
        causal_conv1d(x, weight, bias)
