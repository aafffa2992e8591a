"""State chaining: a split sequence and a chain of layers linked by their states, gradients included."""

from __future__ import annotations

import pytest
import torch
from scan_testing import INPUT_NAMES, assert_all_close, make_inputs

from arcee_scan import selective_scan

SEQUENCE_INPUTS = ("u", "delta", "z")


def split_at(inputs: dict, start: int, stop: int) -> dict:
    part = dict(inputs)
    for name in SEQUENCE_INPUTS:
        part[name] = inputs[name][..., start:stop]
    for name in ("B", "C"):
        part[name] = inputs[name][..., start:stop]
    return part


def grads_of(loss: torch.Tensor, inputs: dict) -> dict:
    names = [name for name in INPUT_NAMES if inputs[name] is not None]
    return dict(zip(names, torch.autograd.grad(loss, [inputs[name] for name in names])))


@pytest.mark.parametrize("backend", ["torch", "numba", "reference"])
@pytest.mark.parametrize("split", [1, 13, 16])
def test_split_sequence_equals_full_scan(backend, split):
    inputs = make_inputs(2, 12, 37, 6, 2, seed=3)
    gen = torch.Generator().manual_seed(0)
    dy = torch.randn(2, 12, 37, generator=gen)
    dh = torch.randn(2, 12, 6, generator=gen)

    y_full, h_full = selective_scan(**inputs, backend=backend, chunk_size=8)
    full_grads = grads_of((y_full * dy).sum() + (h_full * dh).sum(), inputs)

    y1, h1 = selective_scan(**split_at(inputs, 0, split), backend=backend, chunk_size=8)
    second = split_at(inputs, split, 37) | {"initial_state": h1}
    y2, h2 = selective_scan(**second, backend=backend, chunk_size=8)
    y_split = torch.cat([y1, y2], dim=-1)
    split_grads = grads_of((y_split * dy).sum() + (h2 * dh).sum(), inputs)

    assert_all_close({"y": y_split, "h_T": h2}, {"y": y_full, "h_T": h_full}, 1e-5, 1e-6)
    assert_all_close(split_grads, full_grads, 1e-5, 1e-6)


def three_link_chain(links: list[dict], h0: torch.Tensor, u: torch.Tensor, backend: str):
    """Scan k's output is scan k+1's input and its final state scan k+1's initial state."""
    state = h0
    for link in links:
        u, state = selective_scan(u=u, initial_state=state, **link, backend=backend, chunk_size=4)
    return u, state


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_depth_chain_gradients_of_every_link(backend):
    batch, dim, length, d_state = 2, 8, 11, 4
    link_names = ("delta", "A", "B", "C", "D", "z", "delta_bias")
    base = [make_inputs(batch, dim, length, d_state, 2, seed=seed) for seed in range(3)]
    h0 = base[0]["initial_state"]
    u = base[0]["u"]
    gen = torch.Generator().manual_seed(7)
    dy = torch.randn(batch, dim, length, generator=gen)
    dh = torch.randn(batch, dim, d_state, generator=gen)

    results = {}
    for scan_backend in (backend, "reference"):
        links = [{name: inputs[name] for name in link_names} | {"delta_softplus": True} for inputs in base]
        y, h_T = three_link_chain(links, h0, u, scan_backend)
        leaves = [h0, u] + [link[name] for link in links for name in link_names]
        grads = torch.autograd.grad((y * dy).sum() + (h_T * dh).sum(), leaves)
        results[scan_backend] = {"y": y, "h_T": h_T} | {f"grad{i}": g for i, g in enumerate(grads)}

    # the published kernel test's fp32 tolerances are 6e-4 / 2e-3 (dh0 1e-3 / 2e-3); ours are far tighter
    assert_all_close(results[backend], results["reference"], 1e-4, 1e-5)


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_depth_chain_initial_state_gradient_of_each_link(backend):
    # what each link's backward returns for its initial_state: an identity node used by that link only
    base = [make_inputs(1, 6, 9, 3, seed=seed) for seed in range(3)]
    link_grads = {}
    for scan_backend in (backend, "reference"):
        state = base[0]["initial_state"].detach().clone().requires_grad_()
        u, link_inputs = base[0]["u"].detach(), []
        for inputs in base:
            link = {name: inputs[name].detach() for name in ("delta", "A", "B", "C", "D", "z")}
            state_in = state.view_as(state)
            state_in.retain_grad()
            link_inputs.append(state_in)
            u, state = selective_scan(
                u=u, initial_state=state_in, **link, delta_softplus=True, backend=scan_backend, chunk_size=4
            )
        (u.square().sum() + state.sum()).backward()
        link_grads[scan_backend] = [s.grad for s in link_inputs]
    for got, want in zip(link_grads[backend], link_grads["reference"]):
        assert got.abs().max() > 0
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)
