"""Public entry point of the stateful selective scan: validation, backend dispatch and the custom op.

Backends
--------
``"reference"``  the naive loop of :mod:`arcee_scan.reference` under autograd (the oracle; small shapes).
``"torch"``      :mod:`arcee_scan.torch_scan`, eager PyTorch with a checkpointed hand-written backward.
``"numba"``      :mod:`arcee_scan.numba_scan`, compiled CPU kernels (numba JIT, cached on disk), CPU only.
``"triton"``     :mod:`arcee_scan.triton_scan`, Triton kernels (CUDA; CPU only under ``TRITON_INTERPRET=1``).

``backend=None`` reads the ``ARCEE_SCAN_BACKEND`` environment variable, else picks ``"triton"`` for CUDA
tensors when Triton imports (``"torch"`` when it does not, or for float64) and ``"numba"`` for CPU tensors
when numba imports (``"torch"`` when it does not).

Backend contract
----------------
``torch_scan``, ``numba_scan`` and ``triton_scan`` each expose ``scan_forward`` and ``scan_backward``;
besides those, only ``torch_scan.default_chunk_size`` is called (for ``chunk_size=None``). They receive B/C
always grouped ``(batch, G, N, L)`` with arbitrary strides, A/D/delta_bias as given, and ``initial_state``
float32 (float64 when ``u`` is float64) or None, and return contiguous tensors (the numba backend: its
per-step outputs ``out``, ``y_pregate``, ``du``, ``ddelta``, ``dz``, ``dB``, ``dC`` time-major, views of
``(..., L, d)`` buffers, see ``_new_sequence``)::

    scan_forward(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_size)
        -> out (b, d, L) in u's dtype after the z gate, h_T (b, d, N) fp32,
           checkpoints (b, d, cdiv(L, chunk_size), N) fp32 (the state entering each chunk; what lies where
               in its memory is the backend's business, only its own scan_backward reads it),
           y_pregate (b, d, L) or None
    scan_backward(dout, dh_T, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state,
                  checkpoints, y_pregate, chunk_size, deterministic)
        -> du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0   (None for absent optional inputs)

The two are wrapped in ``torch.library.custom_op``\\ s with fake implementations and a registered autograd
formula, so ``torch.compile`` traces a model calling :func:`selective_scan` without graph breaks.
"""

from __future__ import annotations

import importlib
import math
import os
from types import ModuleType

import torch
from torch import Tensor

from . import torch_scan
from .reference import biased_delta, compute_dtype, selective_scan_reference, softplus

__all__ = [
    "BACKENDS",
    "DEFAULT_CHUNK_SIZE",
    "compile_cpu_kernels_in_background",
    "resolve_backend",
    "selective_scan",
]

BACKENDS = ("reference", "torch", "numba", "triton")
BACKEND_ENV_VAR = "ARCEE_SCAN_BACKEND"
BACKGROUND_COMPILE_ENV_VAR = "ARCEE_SCAN_BACKGROUND_COMPILE"
DEFAULT_CHUNK_SIZE = 16
# the numba kernels' per-chunk work (checkpoint stores, scratch set-up) is not worth repeating every 16
# steps: 64 was fastest at (32, 128, 256, 16) and (2, 1536, 256, 256), and keeps 4x fewer checkpoints
NUMBA_CHUNK_SIZE = 64


# whether a backend module imports: decided on its first use, then a plain read (compile-friendly). numba's
# is decided when this module loads (0.2 s), so that no import runs inside a torch.compile trace of a CPU
# model; Triton's on the first CUDA call.
_IMPORTABLE: dict[str, bool] = {}


def _importable(backend: str) -> bool:
    if backend not in _IMPORTABLE:
        try:
            _backend_module(backend)
            _IMPORTABLE[backend] = True
        except ImportError:
            _IMPORTABLE[backend] = False
    return _IMPORTABLE[backend]


def _triton_available() -> bool:
    return _importable("triton")


def _numba_available() -> bool:
    return _importable("numba")


def resolve_backend(backend: str | None, u: Tensor) -> str:
    """Explicit ``backend`` > ``$ARCEE_SCAN_BACKEND`` > triton for CUDA tensors, numba for CPU tensors (each
    if it imports) > torch."""
    if backend is None:
        backend = os.environ.get(BACKEND_ENV_VAR) or None
        source = f"${BACKEND_ENV_VAR}"
    else:
        source = "backend"
    if backend is None:
        if u.is_cuda:
            return "triton" if u.dtype != torch.float64 and _triton_available() else "torch"
        return "numba" if u.is_cpu and _numba_available() else "torch"
    if backend not in BACKENDS:
        raise ValueError(f"{source} must be one of {BACKENDS} or None, got {backend!r}")
    if backend == "numba" and not u.is_cpu:
        raise ValueError(f"{source} 'numba' runs on CPU tensors only, got tensors on {u.device}")
    return backend


def compile_cpu_kernels_in_background() -> bool:
    """Start compiling the numba backend's kernels in helper processes, for a program that will run the scan
    on CPU: its first call then waits for them instead of compiling for ~20 s on one core itself (see
    ``arcee_scan.numba_scan.compile_in_background``). Call it early, before the program's slow imports.

    Starts nothing, and returns False, where ``$ARCEE_SCAN_BACKGROUND_COMPILE`` is 0, where the CPU default is
    not numba (numba missing, or ``$ARCEE_SCAN_BACKEND`` naming another backend), where CUDA is available, in
    a launcher's processes other than each machine's first (``$LOCAL_RANK`` > 0), or when the kernels are
    cached already.
    """
    if os.environ.get(BACKGROUND_COMPILE_ENV_VAR, "1") == "0":
        return False
    if os.environ.get(BACKEND_ENV_VAR, "numba") != "numba" or not _numba_available():
        return False
    if torch.cuda.is_available() or int(os.environ.get("LOCAL_RANK", "0")) > 0:
        return False
    return _backend_module("numba").compile_in_background()


def _backend_module(backend: str) -> ModuleType:
    return importlib.import_module(f"arcee_scan.{backend}_scan")


def _empty_like_none(t: Tensor | None, like: Tensor) -> Tensor:
    # custom ops cannot return None: absent optional outputs travel as empty tensors
    return like.new_empty(0) if t is None else t


@torch.library.custom_op("arcee_scan::selective_scan_fwd", mutates_args=())
def _selective_scan_fwd(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    initial_state: Tensor | None,
    chunk_size: int,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    out, h_T, checkpoints, y_pregate = _backend_module(backend).scan_forward(
        u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_size
    )
    if z is not None and y_pregate is None:
        raise RuntimeError(f"backend {backend!r} must return the pre-gate y when z is given")
    return out, h_T, checkpoints, _empty_like_none(y_pregate, h_T)


def _new_sequence(like: Tensor, backend: str, dtype: torch.dtype | None = None) -> Tensor:
    """An empty (..., L) output laid out as ``backend`` returns it: the numba backend's per-step outputs
    are time-major (views of (..., L, d) buffers), every other backend's contiguous."""
    if backend != "numba":
        return like.new_empty(like.shape, dtype=dtype)
    return like.new_empty(*like.shape[:-2], like.shape[-1], like.shape[-2], dtype=dtype).transpose(-1, -2)


@_selective_scan_fwd.register_fake
def _(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_size, deterministic, backend):
    batch, dim, length = u.shape
    d_state = A.shape[1]
    state_dtype = compute_dtype(u)
    out = _new_sequence(u, backend)
    h_T = u.new_empty(batch, dim, d_state, dtype=state_dtype)
    checkpoints = u.new_empty(batch, dim, math.ceil(length / chunk_size), d_state, dtype=state_dtype)
    y_pregate = _new_sequence(u, backend, state_dtype) if z is not None else u.new_empty(0, dtype=state_dtype)
    return out, h_T, checkpoints, y_pregate


@torch.library.custom_op("arcee_scan::selective_scan_bwd", mutates_args=())
def _selective_scan_bwd(
    dout: Tensor,
    dh_T: Tensor,
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    delta_softplus: bool,
    initial_state: Tensor | None,
    checkpoints: Tensor,
    y_pregate: Tensor,
    chunk_size: int,
    deterministic: bool,
    backend: str,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    grads = _backend_module(backend).scan_backward(
        dout,
        dh_T,
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_softplus,
        initial_state,
        checkpoints,
        y_pregate if z is not None else None,
        chunk_size,
        deterministic,
    )
    # outputs must not alias inputs or each other, so absent gradients are fresh empty tensors
    return tuple(_empty_like_none(g, dh_T) for g in grads)


@_selective_scan_bwd.register_fake
def _(
    dout, dh_T, u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, checkpoints, y_pregate,
    chunk_size, deterministic, backend,
):  # fmt: skip
    batch, dim, _ = u.shape
    state_dtype = compute_dtype(u)

    def optional(t: Tensor | None, shape: tuple[int, ...], dtype: torch.dtype) -> Tensor:
        return dh_T.new_empty(shape if t is not None else (0,), dtype=dtype)

    return (  # laid out by the backend, whatever the inputs' strides
        _new_sequence(u, backend),
        _new_sequence(delta, backend),
        A.new_empty(A.shape, dtype=state_dtype),
        _new_sequence(B, backend, state_dtype),
        _new_sequence(C, backend, state_dtype),
        optional(D, (dim,), state_dtype),
        _new_sequence(z, backend) if z is not None else dh_T.new_empty(0, dtype=u.dtype),
        optional(delta_bias, (dim,), state_dtype),
        optional(initial_state, (batch, dim, A.shape[1]), state_dtype),
    )


def _setup_context(ctx, inputs, output) -> None:
    u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state, chunk_size, deterministic, backend = (
        inputs
    )
    out, h_T, checkpoints, y_pregate = output
    ctx.mark_non_differentiable(checkpoints, y_pregate)
    # no zero-filled gradients for the outputs that get none (checkpoints, y_pregate, and h_T where the
    # state is not chained on): allocating and filling them cost more than the small scans' own work
    ctx.set_materialize_grads(False)
    ctx.output_meta = ((out.shape, out.dtype), (h_T.shape, h_T.dtype))  # meta only: no reference cycle
    ctx.save_for_backward(u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints, y_pregate)
    ctx.options = (delta_softplus, chunk_size, deterministic, backend)


def _backward(ctx, dout, dh_T, _dcheckpoints, _dy_pregate):
    u, delta, A, B, C, D, z, delta_bias, initial_state, checkpoints, y_pregate = ctx.saved_tensors
    delta_softplus, chunk_size, deterministic, backend = ctx.options
    (out_shape, out_dtype), (h_T_shape, h_T_dtype) = ctx.output_meta
    du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0 = _selective_scan_bwd(
        u.new_zeros(out_shape, dtype=out_dtype) if dout is None else dout,
        u.new_zeros(h_T_shape, dtype=h_T_dtype) if dh_T is None else dh_T.contiguous(),
        u,
        delta,
        A,
        B,
        C,
        D,
        z,
        delta_bias,
        delta_softplus,
        initial_state,
        checkpoints,
        y_pregate,
        chunk_size,
        deterministic,
        backend,
    )
    return (
        du,
        ddelta,
        dA.to(A.dtype),
        dB.to(B.dtype),
        dC.to(C.dtype),
        None if D is None else dD.to(D.dtype),
        None if z is None else dz,
        None if delta_bias is None else ddelta_bias.to(delta_bias.dtype),
        None,
        None if initial_state is None else dh0.to(initial_state.dtype),
        None,
        None,
        None,
    )


torch.library.register_autograd("arcee_scan::selective_scan_fwd", _backward, setup_context=_setup_context)
_numba_available()


def _default_chunk_size(backend: str, u: Tensor, A: Tensor) -> int:
    if backend == "torch":
        batch, dim, _ = u.shape
        return torch_scan.default_chunk_size(batch, dim, A.shape[1], u.device)
    if backend == "numba":
        return NUMBA_CHUNK_SIZE
    return DEFAULT_CHUNK_SIZE


def _check_float(name: str, t: Tensor) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if not t.is_floating_point():
        raise TypeError(
            f"{name} must be a floating-point tensor (float32/float16/bfloat16/float64), got {t.dtype}"
        )


def _check_shape(name: str, t: Tensor, expected: tuple[int, ...], form: str) -> None:
    if tuple(t.shape) != expected:
        raise ValueError(f"{name} must have shape {form} = {expected}, got {tuple(t.shape)}")


def _validate(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None,
    z: Tensor | None,
    delta_bias: Tensor | None,
    initial_state: Tensor | None,
    chunk_size: int | None,
) -> None:
    named = {"u": u, "delta": delta, "A": A, "B": B, "C": C, "D": D, "z": z, "delta_bias": delta_bias}
    named["initial_state"] = initial_state
    for name, t in named.items():
        if t is not None:
            _check_float(name, t)
    if u.dim() != 3:
        raise ValueError(f"u must be 3-D (batch, dim, L), got shape {tuple(u.shape)}")
    batch, dim, length = u.shape
    if length == 0:
        raise ValueError("u must have a non-empty sequence: (batch, dim, L) with L >= 1, got L = 0")
    if A.dim() != 2 or A.shape[0] != dim:
        raise ValueError(f"A must have shape (dim, N) with dim = {dim}, got {tuple(A.shape)}")
    d_state = A.shape[1]
    for name, t in (("B", B), ("C", C)):
        if t.dim() == 3:
            _check_shape(name, t, (batch, d_state, length), "(batch, N, L)")
        elif t.dim() == 4:
            groups = t.shape[1]
            if groups == 0 or dim % groups != 0:
                raise ValueError(f"{name} has {groups} groups, which must divide dim = {dim}")
            _check_shape(name, t, (batch, groups, d_state, length), "(batch, G, N, L)")
        else:
            raise ValueError(
                f"{name} must be (batch, N, L) or grouped (batch, G, N, L), got {tuple(t.shape)}"
            )
    groups_B, groups_C = (1 if t.dim() == 3 else t.shape[1] for t in (B, C))
    if groups_B != groups_C:
        raise ValueError(f"B and C must have the same number of groups, got {groups_B} and {groups_C}")
    _check_shape("delta", delta, (batch, dim, length), "(batch, dim, L) like u")
    if z is not None:
        _check_shape("z", z, (batch, dim, length), "(batch, dim, L) like u")
    for name, t in (("D", D), ("delta_bias", delta_bias)):
        if t is not None:
            _check_shape(name, t, (dim,), "(dim,)")
    if initial_state is not None:
        _check_shape("initial_state", initial_state, (batch, dim, d_state), "(batch, dim, N)")
        if initial_state.dtype != compute_dtype(u):
            raise TypeError(
                f"initial_state must be {compute_dtype(u)} (the state dtype; float64 only with float64 u), "
                f"got {initial_state.dtype}"
            )
    devices = {name: t.device for name, t in named.items() if t is not None}
    if len(set(devices.values())) > 1:
        listing = ", ".join(f"{name}: {device}" for name, device in devices.items())
        raise ValueError(f"all tensors must be on one device, got {listing}")
    if chunk_size is not None and (
        isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1
    ):
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size!r}")


def selective_scan(
    u: Tensor,
    delta: Tensor,
    A: Tensor,
    B: Tensor,
    C: Tensor,
    D: Tensor | None = None,
    z: Tensor | None = None,
    delta_bias: Tensor | None = None,
    delta_softplus: bool = False,
    initial_state: Tensor | None = None,
    output_final_state: bool = True,
    backend: str | None = None,
    *,
    chunk_size: int | None = None,
    deterministic: bool | None = None,
) -> tuple[Tensor, Tensor | None]:
    """Mamba-1 selective scan with an initial state in and the final state out, differentiable through both.

    Args:
        u, delta: (batch, dim, L). z: (batch, dim, L) gate, ``out = y * silu(z)``.
        A: (dim, N). B, C: (batch, N, L) or grouped (batch, G, N, L); channel d reads group d // (dim / G).
        D, delta_bias: (dim,). delta_softplus: apply ``softplus(delta + delta_bias)`` (threshold 20).
        initial_state: (batch, dim, N) float32 (float64 with float64 inputs); zeros when None.
        output_final_state: return ``h_T``; its gradient flows back when it is used.
        backend: one of ``BACKENDS`` (``"reference"``, ``"torch"``, ``"numba"``, ``"triton"``) or None
            (automatic, see the module docstring).
        chunk_size: steps between state checkpoints kept for the backward; None picks the backend's
            default (16; 64 for numba; the torch backend on CPU takes 8 where that keeps all channels in
            one block).
        deterministic: bitwise-repeatable backward; defaults to
            ``torch.are_deterministic_algorithms_enabled()``.

    Returns:
        ``(y, h_T)``: y (batch, dim, L) in u's dtype; h_T (batch, dim, N) float32, or None when
        ``output_final_state=False``.
    """
    _validate(u, delta, A, B, C, D, z, delta_bias, initial_state, chunk_size)
    if deterministic is None:
        deterministic = torch.are_deterministic_algorithms_enabled()
    backend = resolve_backend(backend, u)
    if chunk_size is None:
        chunk_size = _default_chunk_size(backend, u, A)
    # (batch, N, L) -> one group (batch, 1, N, L); a view, so strides (e.g. time-major) are kept
    B = B.unsqueeze(1) if B.dim() == 3 else B
    C = C.unsqueeze(1) if C.dim() == 3 else C
    if backend == "reference":
        y, h_T = selective_scan_reference(u, delta, A, B, C, D, z, delta_bias, delta_softplus, initial_state)
    else:
        if backend == "torch" and delta_softplus:
            # the torch backend would run softplus twice, in the forward and in the recomputing backward;
            # outside the op autograd runs it once and keeps what its backward needs. Contiguous, so that
            # softplus's backward never mixes layouts (its fake and real output strides then differ under
            # torch.compile when the mixer's delta is a time-major view)
            delta = softplus(biased_delta(delta, delta_bias, compute_dtype(u)).contiguous())
            delta_bias, delta_softplus = None, False
        y, h_T, _, _ = _selective_scan_fwd(
            u, delta, A, B, C, D, z, delta_bias, bool(delta_softplus), initial_state, chunk_size,
            bool(deterministic), backend,
        )  # fmt: skip
    return y, (h_T if output_final_state else None)
