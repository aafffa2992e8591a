"""Input builders and comparisons shared by the selective-scan tests (torch, reference, triton backends).

Test files in this directory import it as ``import scan_testing`` (pytest puts the directory on sys.path).
"""

from __future__ import annotations

import torch

from arcee_scan import selective_scan

LOW_PRECISION = (torch.float16, torch.bfloat16)
INPUT_NAMES = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "initial_state")


def make_inputs(
    batch: int,
    dim: int,
    length: int,
    d_state: int,
    groups: int | None = None,
    *,
    dtype: torch.dtype = torch.float32,
    D: bool = True,
    z: bool = True,
    delta_bias: bool = True,
    delta_softplus: bool = True,
    initial_state: bool = True,
    time_major: bool = False,
    seed: int = 0,
    device: str | torch.device = "cpu",
) -> dict:
    """Realistic random scan inputs as a ``selective_scan`` keyword dict (leaves with requires_grad).

    A follows the S4D-real init (``A[:, n] = -(n + 1)``, times a random factor); delta is a raw pre-softplus
    value around softplus^-1(0.05) when ``delta_softplus`` else a positive step. ``groups=None`` gives 3-D
    B/C (batch, N, L). ``time_major`` builds B/C/delta/u as transposed views of (batch, L, ...) buffers, the
    layout the Mamba mixer produces. A, D, delta_bias and the initial state are float32 (float64 when
    ``dtype`` is float64); u/delta/B/C/z use ``dtype``.
    """
    gen = torch.Generator().manual_seed(seed)
    param_dtype = torch.float64 if dtype == torch.float64 else torch.float32

    def randn(*shape, scale=1.0, shift=0.0, dtype=dtype):
        return (torch.randn(*shape, generator=gen, dtype=torch.float64) * scale + shift).to(dtype)

    def sequence(*leading, scale=1.0, shift=0.0):
        # (..., L): either contiguous or a transposed view of a time-major (batch, L, ...) buffer
        if not time_major:
            return randn(*leading, length, scale=scale, shift=shift)
        return randn(leading[0], length, *leading[1:], scale=scale, shift=shift).movedim(1, -1)

    bc_shape = (batch, d_state) if groups is None else (batch, groups, d_state)
    if delta_softplus:
        delta = sequence(batch, dim, scale=0.5, shift=-3.0)
    else:
        delta = sequence(batch, dim, scale=0.05).abs() + 0.01
    A = -torch.arange(1, d_state + 1, dtype=torch.float64).repeat(dim, 1)
    A = (A * torch.empty(dim, 1, dtype=torch.float64).uniform_(0.5, 1.5, generator=gen)).to(param_dtype)
    inputs = {
        "u": sequence(batch, dim),
        "delta": delta,
        "A": A,
        "B": sequence(*bc_shape),
        "C": sequence(*bc_shape),
        "D": randn(dim, dtype=param_dtype) if D else None,
        "z": sequence(batch, dim) if z else None,
        "delta_bias": randn(dim, scale=0.2, dtype=param_dtype).abs() * (1 if delta_softplus else 0.1)
        if delta_bias
        else None,
        "initial_state": randn(batch, dim, d_state, dtype=param_dtype) if initial_state else None,
    }
    for name, t in inputs.items():
        if t is not None:
            inputs[name] = t.to(device).requires_grad_()
    inputs["delta_softplus"] = delta_softplus
    return inputs


def detached_copy(inputs: dict, dtype: torch.dtype | None = None) -> dict:
    """Fresh leaves with the same values (optionally cast, e.g. rounded low-precision -> float32)."""
    copy = dict(inputs)
    for name in INPUT_NAMES:
        t = inputs[name]
        if t is not None:
            cast = t.detach().to(dtype) if dtype is not None and t.dtype != dtype else t.detach().clone()
            copy[name] = cast.requires_grad_()
    return copy


def outputs_and_grads(
    inputs: dict,
    backend: str,
    *,
    loss_on: str = "both",
    seed: int = 1,
    output_dtype: torch.dtype | None = None,
    **knobs,
) -> dict:
    """Run the scan, backpropagate random cotangents into y and/or h_T, return outputs and input grads.

    ``loss_on`` is "both", "y" or "h_T". Cotangents depend only on ``seed`` and the output shapes (drawn in
    float64, then cast to ``output_dtype`` or the output's dtype) so two backends see the same ones.
    """
    y, h_T = selective_scan(**inputs, backend=backend, **knobs)
    gen = torch.Generator().manual_seed(seed)
    dy = torch.randn(y.shape, generator=gen, dtype=torch.float64).to(output_dtype or y.dtype)
    dh = torch.randn(h_T.shape, generator=gen, dtype=torch.float64).to(h_T.dtype)
    loss = 0
    if loss_on in ("both", "y"):
        loss = loss + (y * dy.to(y.device, y.dtype)).sum()
    if loss_on in ("both", "h_T"):
        loss = loss + (h_T * dh.to(h_T.device)).sum()
    leaves = [inputs[name] for name in INPUT_NAMES if inputs[name] is not None]
    grads = torch.autograd.grad(loss, leaves, allow_unused=True)
    result = {"y": y.detach(), "h_T": h_T.detach()}
    names = [name for name in INPUT_NAMES if inputs[name] is not None]
    result.update({f"d{name}": g for name, g in zip(names, grads)})
    return result


def assert_all_close(actual: dict, expected: dict, rtol: float, atol: float, scale_atol: bool = True) -> None:
    """Compare every entry; ``atol`` is relative to the reference's max magnitude when ``scale_atol``."""
    assert actual.keys() == expected.keys()
    for name, want in expected.items():
        got = actual[name]
        if want is None:
            assert got is None or not got.any(), name
            continue
        assert got is not None, name
        want, got = want.double(), got.double()
        assert torch.isfinite(got).all(), name
        tol = atol * max(want.abs().max().item(), 1.0) if scale_atol else atol
        torch.testing.assert_close(got, want, rtol=rtol, atol=tol, msg=lambda m, n=name: f"{n}: {m}")
