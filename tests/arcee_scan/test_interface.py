"""Public interface: gradcheck, dispatch, the custom op under torch.compile, input validation."""

from __future__ import annotations

import types

import pytest
import torch
from scan_testing import INPUT_NAMES, assert_all_close, detached_copy, make_inputs, outputs_and_grads

import arcee_scan
from arcee_scan import interface, numba_scan, resolve_backend, selective_scan


@pytest.mark.parametrize("backend", ["torch", "numba", "reference"])
def test_gradcheck_float64(backend):
    inputs = make_inputs(2, 4, 7, 3, 2, dtype=torch.float64)
    names = [name for name in INPUT_NAMES if inputs[name] is not None]

    def scan(*tensors):
        kwargs = dict(zip(names, tensors))
        return selective_scan(**kwargs, delta_softplus=True, backend=backend, chunk_size=3)

    assert torch.autograd.gradcheck(scan, [inputs[name] for name in names])


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_gradcheck_float64_without_options(backend):
    inputs = make_inputs(
        1, 3, 5, 2, dtype=torch.float64, D=False, z=False, delta_bias=False, delta_softplus=False
    )
    names = ["u", "delta", "A", "B", "C", "initial_state"]

    def scan(*tensors):
        return selective_scan(**dict(zip(names, tensors)), backend=backend, chunk_size=2)

    assert torch.autograd.gradcheck(scan, [inputs[name] for name in names])


def test_output_final_state_false_returns_none():
    inputs = make_inputs(2, 6, 5, 3)
    y, h_T = selective_scan(**inputs, output_final_state=False)
    y_ref, _ = selective_scan(**inputs, backend="reference")
    assert h_T is None
    torch.testing.assert_close(y, y_ref, rtol=1e-5, atol=1e-6)
    y.sum().backward()
    assert inputs["initial_state"].grad is not None


def test_inference_mode_then_autograd():
    # the CPU backend reuses a scratch workspace between calls; inference tensors must not leak into it
    inputs = make_inputs(2, 6, 9, 3)
    with torch.inference_mode():
        y_inference, _ = selective_scan(**inputs)
    expected = outputs_and_grads(detached_copy(inputs), "reference")
    assert_all_close(outputs_and_grads(inputs, "torch"), expected, 1e-4, 1e-5)
    torch.testing.assert_close(y_inference, expected["y"], rtol=1e-5, atol=1e-6)


def test_ungrouped_equals_one_group():
    inputs = make_inputs(2, 6, 9, 3)
    grouped = detached_copy(inputs)
    grouped["B"] = grouped["B"].detach().unsqueeze(1).requires_grad_()
    grouped["C"] = grouped["C"].detach().unsqueeze(1).requires_grad_()
    ungrouped_result = outputs_and_grads(inputs, "torch")
    grouped_result = outputs_and_grads(grouped, "torch")
    for name in ("dB", "dC"):
        grouped_result[name] = grouped_result[name].squeeze(1)
    assert_all_close(ungrouped_result, grouped_result, 0, 0)


def test_default_knobs_match_reference():
    inputs = make_inputs(2, 10, 30, 4, 2)
    expected = outputs_and_grads(detached_copy(inputs), "reference")
    assert_all_close(outputs_and_grads(inputs, None), expected, 1e-4, 1e-5)


# --- dispatch ------------------------------------------------------------------------------------------


def fake_tensor(device: str, dtype: torch.dtype = torch.float32):
    return types.SimpleNamespace(
        is_cuda=device == "cuda", is_cpu=device == "cpu", device=torch.device(device), dtype=dtype
    )


def test_dispatch_defaults(monkeypatch):
    monkeypatch.delenv("ARCEE_SCAN_BACKEND", raising=False)
    monkeypatch.setattr(interface, "_triton_available", lambda: True)
    monkeypatch.setattr(interface, "_numba_available", lambda: True)
    assert resolve_backend(None, fake_tensor("cpu")) == "numba"
    assert resolve_backend(None, fake_tensor("cpu", torch.float64)) == "numba"
    assert resolve_backend(None, fake_tensor("cuda")) == "triton"
    assert resolve_backend(None, fake_tensor("cuda", torch.float64)) == "torch"
    assert resolve_backend(None, fake_tensor("mps")) == "torch"  # numba runs CPU tensors only
    monkeypatch.setattr(interface, "_triton_available", lambda: False)
    monkeypatch.setattr(interface, "_numba_available", lambda: False)
    assert resolve_backend(None, fake_tensor("cuda")) == "torch"
    assert resolve_backend(None, fake_tensor("cpu")) == "torch"


def test_numba_is_the_default_on_cpu_here():
    # numba is a dependency, so on this machine it must import: a broken install is a failure, not a skip
    assert interface._numba_available()
    assert resolve_backend(None, make_inputs(1, 2, 3, 2)["u"]) == "numba"


def test_numba_refuses_non_cpu_tensors():
    with pytest.raises(ValueError, match="'numba' runs on CPU tensors only"):
        resolve_backend("numba", fake_tensor("cuda"))


def test_dispatch_env_override_and_explicit_backend(monkeypatch):
    monkeypatch.setenv("ARCEE_SCAN_BACKEND", "reference")
    assert resolve_backend(None, fake_tensor("cpu")) == "reference"
    assert resolve_backend("torch", fake_tensor("cpu")) == "torch"
    monkeypatch.setenv("ARCEE_SCAN_BACKEND", "torch")
    assert resolve_backend("numba", fake_tensor("cpu")) == "numba"
    monkeypatch.setenv("ARCEE_SCAN_BACKEND", "cuda-please")
    with pytest.raises(ValueError, match="ARCEE_SCAN_BACKEND"):
        resolve_backend(None, fake_tensor("cpu"))


def test_env_override_reaches_the_backend(monkeypatch):
    calls = []
    reference = interface.selective_scan_reference
    monkeypatch.setattr(interface, "selective_scan_reference", lambda *a: calls.append(1) or reference(*a))
    inputs = make_inputs(1, 4, 3, 2)
    monkeypatch.setenv("ARCEE_SCAN_BACKEND", "reference")
    selective_scan(**inputs)
    assert calls == [1]
    monkeypatch.delenv("ARCEE_SCAN_BACKEND")
    selective_scan(**inputs)
    assert calls == [1]


def test_deterministic_knob_follows_torch_setting(monkeypatch):
    seen = []
    forward = interface._selective_scan_fwd
    monkeypatch.setattr(interface, "_selective_scan_fwd", lambda *a: seen.append(a[11]) or forward(*a))
    inputs = make_inputs(1, 4, 3, 2)
    selective_scan(**inputs)
    previous = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        selective_scan(**inputs)
    finally:
        torch.use_deterministic_algorithms(previous)
    selective_scan(**inputs, deterministic=True)
    assert seen == [False, True, True]


# --- custom op and torch.compile -----------------------------------------------------------------------


class TinyMixer(torch.nn.Module):
    def __init__(self, dim: int = 8, d_state: int = 4):
        super().__init__()
        self.proj = torch.nn.Linear(dim, 3 * dim)
        self.bc = torch.nn.Linear(dim, 2 * d_state)
        self.A_log = torch.nn.Parameter(torch.randn(dim, d_state))
        self.D = torch.nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (batch, L, dim)
        u, delta, z = self.proj(x).transpose(1, 2).chunk(3, dim=1)
        B, C = self.bc(x).transpose(1, 2).chunk(2, dim=1)  # time-major views (batch, N, L)
        A = -torch.exp(self.A_log)
        y, h_T = selective_scan(u, delta, A, B, C, self.D, z, None, True, state)
        return y.transpose(1, 2), h_T


def test_torch_compile_fullgraph_matches_eager():
    torch.manual_seed(0)
    model = TinyMixer()
    x, state = torch.randn(2, 5, 8), torch.randn(2, 8, 4)
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)  # fullgraph: a break raises
    grads = []
    for module in (compiled, model):
        model.zero_grad()
        y, h_T = module(x, state)
        (y.square().sum() + h_T.sum()).backward()
        grads.append([p.grad.clone() for p in model.parameters()])
    for got, want in zip(*grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_dynamo_explain_reports_no_graph_break():
    model = TinyMixer()
    explanation = torch._dynamo.explain(model)(torch.randn(2, 5, 8), torch.randn(2, 8, 4))
    assert explanation.graph_break_count == 0
    assert explanation.graph_count == 1


@pytest.mark.parametrize("backend", ["torch", "numba"])
def test_opcheck_custom_op(backend):
    inputs = make_inputs(2, 4, 5, 3, 2)
    args = [inputs[name] for name in ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")]
    args += [True, inputs["initial_state"], 2, False, backend]
    torch.library.opcheck(torch.ops.arcee_scan.selective_scan_fwd.default, args)


@pytest.mark.parametrize(
    "env, cuda, expected",
    [
        ({}, False, True),
        ({"ARCEE_SCAN_BACKGROUND_COMPILE": "0"}, False, False),
        ({"ARCEE_SCAN_BACKEND": "torch"}, False, False),
        ({"ARCEE_SCAN_BACKEND": "numba"}, False, True),
        ({"LOCAL_RANK": "1"}, False, False),
        ({"LOCAL_RANK": "0"}, False, True),
        ({}, True, False),
    ],
)
def test_background_compile_starts_only_for_a_cpu_numba_run(monkeypatch, env, cuda, expected):
    for name in ("ARCEE_SCAN_BACKGROUND_COMPILE", "ARCEE_SCAN_BACKEND", "LOCAL_RANK"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: cuda)
    started = []
    monkeypatch.setattr(numba_scan, "compile_in_background", lambda: started.append(1) or True)
    assert arcee_scan.compile_cpu_kernels_in_background() is expected
    assert started == ([1] if expected else [])


def test_package_exports():
    assert set(arcee_scan.__all__) >= {
        "selective_scan",
        "selective_scan_reference",
        "compile_cpu_kernels_in_background",
    }


# --- bad input -----------------------------------------------------------------------------------------


def bad(**changes):
    inputs = make_inputs(2, 4, 5, 3, 2)
    for name, change in changes.items():
        inputs[name] = change(inputs[name]) if callable(change) else change
    return inputs


BAD_INPUTS = [
    ("u rank", bad(u=lambda t: t[0]), ValueError, r"u must be 3-D \(batch, dim, L\)"),
    ("empty sequence", bad(u=lambda t: t[..., :0], delta=lambda t: t[..., :0]), ValueError, "L >= 1"),
    ("integer u", bad(u=lambda t: t.detach().long()), TypeError, "u must be a floating-point"),
    ("integer B", bad(B=lambda t: t.detach().int()), TypeError, "B must be a floating-point"),
    ("delta shape", bad(delta=lambda t: t[:, :3]), ValueError, r"delta must have shape \(batch, dim, L\)"),
    ("A shape", bad(A=lambda t: t[:3]), ValueError, r"A must have shape \(dim, N\)"),
    ("B state size", bad(B=lambda t: t[:, :, :2]), ValueError, r"B must have shape \(batch, G, N, L\)"),
    ("C rank", bad(C=lambda t: t[0, 0]), ValueError, r"C must be \(batch, N, L\) or grouped"),
    ("groups", bad(B=lambda t: t.repeat(1, 2, 1, 1)[:, :3]), ValueError, "B has 3 groups"),
    ("B/C groups", bad(C=lambda t: t[:, 0]), ValueError, "B and C must have the same number of groups"),
    ("D shape", bad(D=lambda t: t[:2]), ValueError, r"D must have shape \(dim,\)"),
    ("z shape", bad(z=lambda t: t[:1]), ValueError, r"z must have shape \(batch, dim, L\)"),
    ("bias shape", bad(delta_bias=lambda t: t[None]), ValueError, r"delta_bias must have shape \(dim,\)"),
    ("h0 shape", bad(initial_state=lambda t: t[:, :, :2]), ValueError, r"initial_state must have shape"),
    (
        "h0 dtype",
        bad(initial_state=lambda t: t.detach().half()),
        TypeError,
        "initial_state must be torch.float32",
    ),
    ("not a tensor", bad(A=[[1.0]]), TypeError, "A must be a torch.Tensor"),
    ("device mix", bad(D=lambda t: t.detach().to("meta")), ValueError, "all tensors must be on one device"),
]


@pytest.mark.parametrize(
    "inputs, error, match", [case[1:] for case in BAD_INPUTS], ids=[c[0] for c in BAD_INPUTS]
)
def test_bad_inputs_raise(inputs, error, match):
    with pytest.raises(error, match=match):
        selective_scan(**inputs)


def test_bad_backend_and_chunk_size():
    inputs = make_inputs(1, 4, 3, 2)
    with pytest.raises(ValueError, match="backend must be one of"):
        selective_scan(**inputs, backend="cuda")
    with pytest.raises(ValueError, match="chunk_size must be a positive int"):
        selective_scan(**inputs, chunk_size=0)
