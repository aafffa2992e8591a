"""Compiled CPU backend: the selective scan as numba kernels (a JIT: nothing is built at install).

One work item is a (sample, channel block) pair, run in parallel with ``prange``. Within an item each
channel's state ``h`` (N values) lives in a small buffer and the time loop updates it tile by tile: the
state axis is cut into tiles of ``LANES`` values, a compile-time constant, so the innermost loop has a
fixed trip count and LLVM turns it into vector code for every N (with a runtime N it would vectorise only
N >= 64, and N = 16 would run scalar). N is padded to a multiple of ``LANES`` inside the backend: the pad
has A = 0 (decay 1) and B = C = 0, so its state stays 0 and contributes nothing.

The forward keeps the state entering every chunk of ``chunk_size`` steps (the checkpoints, extra memory
O(batch*dim*N*L/chunk)); the backward walks each channel's chunks in reverse, recomputes the chunk's states
and decays from its checkpoint into a (chunk + 1, N) buffer and runs the adjoint recurrence
``g_t = C_t dy_t + a_{t+1} g_{t+1}`` through them. dB and dC are sums over a group's channels: each work
item adds its channels into a private (L, N) partial, and the partials are summed in a fixed order
afterwards, so the backward has no races and is bitwise repeatable. The channel blocks depend only on the
shape, never on the thread count, so neither do the results.

``exp`` is a polynomial ``exp2`` on a bit-cast exponent (llvmlite ships no vector ``exp``; the scalar
libm call is ~20x slower), and every work item sets flush-to-zero (products of decays underflow through the
denormal range, ~10x slower on x86) and restores the thread's previous setting when it ends.

Compiled code is cached on disk (see ``cache_dir``), under a key of the package's source files and the
versions of the package, numba and llvmlite: a changed kernel source or a new release compiles afresh,
never runs stale code. ``compile_in_background`` fills that cache from two helper processes while the
caller goes on with other work (the first compile takes ~20 s on one core).
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import math
import os
import platform
import subprocess
import sys
import threading
from collections.abc import Iterable
from pathlib import Path

import llvmlite
import numba
import numpy as np
import torch
import torch.nn.functional as F
from llvmlite import ir
from numba import prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from torch import Tensor

from .reference import SOFTPLUS_THRESHOLD, compute_dtype

__all__ = ["cache_dir", "cache_key", "compile_in_background", "scan_backward", "scan_forward"]

LANES = 16  # state values per tile: one AVX-512 register of fp32
# unsigned tile indices: numba wraps negative signed indices around, and that select stops vectorisation
_U0, _U1, _LANES_U = np.uint64(0), np.uint64(1), np.uint64(LANES)
# float32 literals: a float64 one would promote float32 arithmetic to float64 (and float64 kernels stay so)
_ONE = np.float32(1.0)
# Channel blocks are cut until batch * blocks reaches this: parallel slack for a few threads. Each block
# costs a dB/dC partial and short channel loops, so more is slower on one thread: at (2, 192, 256, 16),
# 16 items took 1.6x as long as 4.
MIN_WORK_ITEMS = 8
CACHE_DIR_ENV_VAR = "ARCEE_SCAN_CACHE_DIR"
LOG2_E = math.log2(math.e)
FASTMATH = {"contract", "reassoc", "nsz", "arcp"}  # no nnan/ninf: inf and nan must propagate


# --- the on-disk cache ---------------------------------------------------------------------------------


def _package_version() -> str:
    try:
        return importlib.metadata.version("arcee-diffusers")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def cache_key(sources: Iterable[bytes], package_version: str) -> str:
    """What the compiled code depends on: the package's sources, its version, numba's and llvmlite's."""
    digest = hashlib.sha256()
    versions = (package_version, numba.__version__, llvmlite.__version__)
    for part in (*sources, *(version.encode() for version in versions)):
        digest.update(hashlib.sha256(part).digest())
    return digest.hexdigest()[:16]


def cache_dir() -> Path:
    """Where numba keeps this module's compiled kernels: ``$ARCEE_SCAN_CACHE_DIR`` (else the user cache
    folder) / ``numba-<cache_key>``, the key over every source file of the package (the kernels read
    constants of other modules, such as the softplus threshold). numba adds its own index per kernel, keyed
    by the signature and the CPU, so one folder serves every machine that shares it."""
    base = os.environ.get(CACHE_DIR_ENV_VAR) or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache"), "arcee_scan"
    )
    sources = [path.read_bytes() for path in sorted(Path(__file__).parent.glob("*.py"))]
    return Path(base) / f"numba-{cache_key(sources, _package_version())}"


def _jit_cached(**options):
    """``numba.njit(cache=True, **options)`` with the cache in ``cache_dir()``.

    numba picks a function's cache folder when it is decorated, from ``numba.config.CACHE_DIR``; setting
    that only around the decoration keeps the user's own numba cache setting for everything else.
    """

    def decorate(function):
        previous = numba.config.CACHE_DIR
        numba.config.CACHE_DIR = str(cache_dir())
        try:
            return numba.njit(cache=True, **options)(function)
        finally:
            numba.config.CACHE_DIR = previous

    return decorate


# --- scalar helpers, inlined into the kernels ----------------------------------------------------------

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
_FLUSH_TO_ZERO_BITS = 0x8040  # MXCSR: flush-to-zero (results) and denormals-are-zero (inputs)


def _mxcsr_call(builder, name: str, pointer) -> None:
    function_type = ir.FunctionType(ir.VoidType(), [ir.IntType(8).as_pointer()])
    function = cgutils.get_or_insert_function(builder.module, function_type, name)
    builder.call(function, [builder.bitcast(pointer, ir.IntType(8).as_pointer())])


@intrinsic
def _enter_flush_to_zero(typingctx):
    """Set flush-to-zero on this thread; returns the previous control word (x86; a no-op elsewhere)."""

    def codegen(context, builder, signature, args):
        if not _X86:
            return ir.Constant(ir.IntType(32), 0)
        word = cgutils.alloca_once(builder, ir.IntType(32))
        _mxcsr_call(builder, "llvm.x86.sse.stmxcsr", word)
        previous = builder.load(word)
        builder.store(builder.or_(previous, ir.Constant(ir.IntType(32), _FLUSH_TO_ZERO_BITS)), word)
        _mxcsr_call(builder, "llvm.x86.sse.ldmxcsr", word)
        return previous

    return types.uint32(), codegen


@intrinsic
def _leave_flush_to_zero(typingctx, previous):
    """Restore the control word ``_enter_flush_to_zero`` returned."""

    def codegen(context, builder, signature, args):
        if _X86:
            word = cgutils.alloca_once(builder, ir.IntType(32))
            builder.store(args[0], word)
            _mxcsr_call(builder, "llvm.x86.sse.ldmxcsr", word)
        return context.get_dummy_value()

    return types.void(types.uint32), codegen


@intrinsic
def _bits_to_float32(typingctx, bits):
    def codegen(context, builder, signature, args):
        return builder.bitcast(args[0], ir.FloatType())

    return types.float32(types.int32), codegen


@intrinsic
def _lane_sums_float32(typingctx, lanes, a0, a1, out, b0, b1, b2):
    """out[b0, b1, b2 + i] = sum_j lanes[a0, a1 + i, j] for i < 16 (float32, LANES = 16), by a transpose-and-
    add tree over the 16 rows: 15 vector adds and 30 shuffles for the 16 sums, where reducing each row on its
    own takes four of each per row."""

    def codegen(context, builder, signature, args):
        def pointer(array_type, array, indices, index_types):
            array = context.make_array(array_type)(context, builder, array)
            indices = [context.cast(builder, i, t, types.intp) for i, t in zip(indices, index_types)]
            return cgutils.get_item_pointer(context, builder, array_type, array, indices)

        lanes_type, out_type = signature.args[0], signature.args[3]
        zero = context.get_constant(types.intp, 0)
        src = pointer(lanes_type, args[0], [args[1], args[2], zero], [*signature.args[1:3], types.intp])
        dst = pointer(out_type, args[3], args[4:7], signature.args[4:7])
        vector = ir.VectorType(ir.FloatType(), LANES)

        def load_row(i):
            row = builder.gep(src, [context.get_constant(types.intp, LANES * i)])
            return builder.load(builder.bitcast(row, vector.as_pointer()), align=4)

        rows = [load_row(i) for i in range(LANES)]
        half = LANES // 2
        while len(rows) > 1:
            # pair up rows: the low and the high half of each 2*half-lane block of both, added, leave each
            # input block's partial sums in a block of half lanes, in row order
            low = [q * 2 * half + e for q in range(LANES // (2 * half)) for e in range(half)]
            low += [LANES + x for x in low]
            masks = [
                ir.Constant(ir.VectorType(ir.IntType(32), LANES), [x + shift for x in low])
                for shift in (0, half)
            ]
            rows = [
                builder.fadd(*(builder.shuffle_vector(rows[r], rows[r + 1], mask) for mask in masks))
                for r in range(0, len(rows), 2)
            ]
            half //= 2
        builder.store(rows[0], builder.bitcast(dst, vector.as_pointer()), align=4)
        return context.get_dummy_value()

    # C-contiguous 3-d float32 arrays whose rows are LANES long (the kernels' scratch)
    if lanes != out or lanes.dtype != types.float32 or lanes.ndim != 3 or lanes.layout != "C":
        return None
    return types.void(lanes, a0, a1, out, b0, b1, b2), codegen


def _lane_sums(lanes, a0, a1, out, b0, b1, b2):
    """out[b0, b1, b2 + i] = sum_j lanes[a0, a1 + i, j] for i < 16: sixteen sums over the lanes at once."""
    for i in range(LANES):
        out[b0, b1, b2 + i] = lanes[a0, a1 + i].sum()


@overload(_lane_sums, inline="always")
def _lane_sums_overload(lanes, a0, a1, out, b0, b1, b2):
    if lanes.dtype == types.float32:
        return lambda lanes, a0, a1, out, b0, b1, b2: _lane_sums_float32(lanes, a0, a1, out, b0, b1, b2)

    def loop(lanes, a0, a1, out, b0, b1, b2):
        # accumulated in place: a loop-local total sets off numba's pedantic SSA warning when inlined
        for i in range(_LANES_U):
            out[b0, b1, b2 + i] = 0.0
            for j in range(_LANES_U):
                out[b0, b1, b2 + i] += lanes[a0, a1 + i, j]

    return loop


@_jit_cached(fastmath=FASTMATH, nogil=True, inline="always")
def _row_sums(lanes, tid, count, out, k, start):
    """out[tid, k, start + i] = sum_j lanes[tid, i, j] for i < count: sixteen rows at a time by
    ``_lane_sums``, the last ``count % 16`` one by one."""
    whole = count - count % _LANES_U
    for i in range(_U0, whole, _LANES_U):
        _lane_sums(lanes, tid, i, out, tid, k, start + i)
    for i in range(whole, count):
        total = np.float32(0.0)  # float32 0 keeps float64 kernels float64
        for j in range(_LANES_U):
            total += lanes[tid, i, j]
        out[tid, k, start + i] = total


def _exp2(x):
    """2**x; a vectorisable polynomial for float32, numpy's exp2 for float64 (gradcheck precision)."""
    return np.exp2(x)


@overload(_exp2, inline="always")
def _exp2_overload(x):
    if x != types.float32:
        return lambda x: np.exp2(x)

    def exp2_float32(x):
        # 2**x = 2**k * 2**f with k = round(x), |f| <= 1/2, and 2**f by a degree-6 polynomial fitted to it
        # (relative error < 1e-7, fp32 rounding). Branch-free, so that it vectorises: below -127 the
        # exponent bits are 0 and the result 0; between -127 and -126 it is denormal, which flush-to-zero
        # zeroes; above 128 it is inf.
        clamped = min(max(x, np.float32(-127.0)), np.float32(128.0))
        k = np.rint(clamped)
        f = clamped - k
        p = np.float32(1.5353362e-4)
        p = p * f + np.float32(1.3398875e-3)
        p = p * f + np.float32(9.6184369e-3)
        p = p * f + np.float32(5.5503324e-2)
        p = p * f + np.float32(2.4022648e-1)
        p = p * f + np.float32(6.9314718e-1)
        p = p * f + np.float32(1.0)
        return p * _bits_to_float32((np.int32(k) + np.int32(127)) << np.int32(23))

    return exp2_float32


def _sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


@overload(_sigmoid, inline="always")
def _sigmoid_overload(x):
    if x != types.float32:
        return lambda x: 1.0 / (1.0 + np.exp(-x))
    return lambda x: np.float32(1.0) / (np.float32(1.0) + _exp2(x * np.float32(-LOG2_E)))


def _softplus(x):
    return x if x > SOFTPLUS_THRESHOLD else np.log1p(np.exp(x))


@overload(_softplus, inline="always")
def _softplus_overload(x):
    """torch's softplus (threshold 20): x above the threshold, log(1 + e^x) below."""
    if x != types.float32:
        return lambda x: x if x > SOFTPLUS_THRESHOLD else np.log1p(np.exp(x))

    def softplus_float32(x):
        # log(1 + e^x) = max(x, 0) + log1p(w), w = e^-|x| in (0, 1]; log1p(w) = 2 atanh(s) with
        # s = w / (2 + w) in (0, 1/3], and atanh(s) / s by a degree-4 polynomial in s^2 fitted to it (no
        # cancellation for small w; relative error < 3e-7). No threshold is needed: above 20, log1p(w) <
        # 3e-9 is below half an fp32 ulp of x, so the sum rounds to x exactly, as torch's threshold gives.
        w = _exp2(-abs(x) * np.float32(LOG2_E))
        s = w / (np.float32(2.0) + w)
        q = s * s
        p = np.float32(0.14012229)
        p = p * q + np.float32(0.1399957)
        p = p * q + np.float32(0.2001085)
        p = p * q + np.float32(0.33333206)
        p = p * q + np.float32(1.0)
        return max(x, np.float32(0.0)) + np.float32(2.0) * s * p

    return softplus_float32


# --- kernels -------------------------------------------------------------------------------------------

# The kernels take no views and make no array aliases (no slices, no ``x = y`` of arrays): numba then marks
# the parallel body's array arguments noalias, which LLVM needs to vectorise loops that load from some
# arrays and store to others. Scratch buffers are therefore arguments too, one row per thread
# (``numba.get_thread_id()``), so their size does not grow with the batch.
#
# Within a work item the elementwise work on the per-step values (bias and softplus, D, the z gate, their
# gradients) runs over (time, channel) with the channels innermost, where the time-major arrays are
# contiguous, so it vectorises; the recurrences then run one channel at a time, reading the step sizes
# from the (L, channels) scratch. A channel's state is walked one tile at a time, the time loop inside the
# tile loop: LLVM keeps the tile's state (and the backward's adjoint) in vector registers through the time
# loop, instead of a store and a reload per step. Sums over the state (y, and the backward's S and Q) add
# up lane by lane over the tiles and are reduced across the lanes once per step.


@_jit_cached(nogil=True, inline="always")
def _work_item(blocks, item):
    """Work item ``item``'s sample, block, group, first channel and channel count, unsigned."""
    n_blocks = blocks.shape[0]
    block = item % n_blocks
    first, end = blocks[block, 1], blocks[block, 2]
    return (
        np.uint64(item // n_blocks),
        np.uint64(block),
        np.uint64(blocks[block, 0]),
        np.uint64(first),
        np.uint64(end - first),
    )


@_jit_cached(fastmath=FASTMATH, nogil=True, inline="always")
def _steps_and_drives(u, delta, delta_bias, delta_softplus, b, c0, width, tid, row, step_rows, drive_rows):
    """step_rows[tid, k, t] = the step of channel c0 + k (bias added, softplus taken), drive_rows = step * u.

    Computed channel-innermost, where the time-major inputs are contiguous, into row[tid, 0] (a loop that
    vectorises), then stored channel-major, the order the recurrences read them in, by a loop of its own
    (strided stores in the same loop would stop LLVM from vectorising the arithmetic)."""
    for t in range(u.shape[1]):
        for k in range(width):
            raw = delta[b, t, c0 + k] + delta_bias[c0 + k]
            row[tid, 0, k] = _softplus(raw) if delta_softplus else raw
        for k in range(width):
            step_rows[tid, k, t] = row[tid, 0, k]
            drive_rows[tid, k, t] = row[tid, 0, k] * u[b, t, c0 + k]


@_jit_cached(parallel=True, fastmath=FASTMATH, nogil=True)
def _forward_kernel(
    u, delta, z, delta_bias, D, A_log2, B, C, h0, delta_softplus, gated, chunk_size, blocks,
    row, step_rows, drive_rows, y_rows, state, y_lanes, out, y_pregate, h_T, checkpoints,
):  # fmt: skip
    """out = y * silu(z) (or y), y_pregate = y when ``gated``, h_T and the checkpoints.

    u, delta, z, out, y_pregate: (b, L, d), time-major; delta_bias, D: (d,); A_log2: (d, Np) A * log2(e),
    padded with 0; B, C: (b, G, L, Np) time-major, padded with 0; h0: (b, d, N); blocks: (n, 3) rows
    (group, first channel, end channel). Scratch, a row per thread: row (., 2, channels of a block), a
    step's values of the item's channels; step_rows, drive_rows, y_rows (., channels of a block, L), the
    steps, ``step * u`` and y of the item's channels; state (., LANES), one tile of h; y_lanes (., L,
    LANES), ``C h`` by lane.
    """
    batch, length, _ = u.shape
    padded = np.uint64(A_log2.shape[1])
    d_state = np.uint64(h_T.shape[2])
    n_blocks = blocks.shape[0]
    n_chunks = checkpoints.shape[2]
    length_u = np.uint64(length)
    for item in prange(batch * n_blocks):
        control = _enter_flush_to_zero()
        tid = numba.get_thread_id()
        b, block, g, c0, width = _work_item(blocks, item)
        _steps_and_drives(u, delta, delta_bias, delta_softplus, b, c0, width, tid, row, step_rows, drive_rows)
        for k in range(width):
            d = c0 + k
            for t in range(length):
                for j in range(_LANES_U):
                    y_lanes[tid, t, j] = 0.0
            for n0 in range(_U0, padded, _LANES_U):
                in_state = min(_LANES_U, d_state - n0)  # the tile's lanes that are not padding
                for j in range(_LANES_U):
                    state[tid, j] = 0.0
                for j in range(in_state):
                    state[tid, j] = h0[b, d, n0 + j]
                for chunk in range(n_chunks):
                    for j in range(in_state):
                        checkpoints[b, d, chunk, n0 + j] = state[tid, j]
                    t0 = np.uint64(chunk * chunk_size)
                    for t in range(t0, min(t0 + np.uint64(chunk_size), length_u)):
                        step, drive = step_rows[tid, k, t], drive_rows[tid, k, t]
                        for j in range(_LANES_U):
                            n = n0 + j
                            h = _exp2(step * A_log2[d, n]) * state[tid, j] + drive * B[b, g, t, n]
                            state[tid, j] = h
                            y_lanes[tid, t, j] += C[b, g, t, n] * h
                for j in range(in_state):
                    h_T[b, d, n0 + j] = state[tid, j]
            _row_sums(y_lanes, tid, length_u, y_rows, k, _U0)
        for t in range(length):
            for k in range(width):
                row[tid, 0, k] = y_rows[tid, k, t]
            if gated:
                for k in range(width):
                    d = c0 + k
                    y, gate = row[tid, 0, k] + D[d] * u[b, t, d], z[b, t, d]
                    y_pregate[b, t, d] = y
                    out[b, t, d] = y * gate * _sigmoid(gate)
            else:
                for k in range(width):
                    out[b, t, c0 + k] = row[tid, 0, k] + D[c0 + k] * u[b, t, c0 + k]
        _leave_flush_to_zero(control)


@_jit_cached(parallel=True, fastmath=FASTMATH, nogil=True)
def _backward_kernel(
    dout, dh_T, u, delta, z, y_pregate, delta_bias, D, A, A_log2, B, C, checkpoints,
    delta_softplus, gated, chunk_size, blocks,
    row, step_rows, drive_rows, dy_rows, input_rows, decay_rows, carry, dA_acc, h_tile, decays, decayed,
    input_lanes, decay_lanes, du, ddelta, dz, dh0, dA_parts, channel_parts, dB_parts, dC_parts,
):  # fmt: skip
    """Gradients of every input from dout (of the output, after the gate) and dh_T.

    The per-step arrays (dout, u, delta, z, y_pregate, du, ddelta, dz) are time-major (b, L, d). Scratch, a
    row per thread: row (., 2, channels of a block), a step's values of the item's channels; step_rows,
    drive_rows, dy_rows, input_rows, decay_rows (., channels of a block, L): the
    steps, ``step * u``, the gradient of the pre-gate y, ``S = sum_n g B`` and ``Q = sum_n g a h_{t-1} A``
    of the item's channels;
    carry (., Np), a_{t+1} g_{t+1}, what flows into g_t from step t + 1; dA_acc (., Np); h_tile (., LANES),
    the running state of the recomputation; decays, decayed (., chunk, LANES): one tile of the chunk's
    a_t and a_t h_{t-1};
    input_lanes, decay_lanes (., chunk, LANES), S and Q by lane. Outputs: du, ddelta, dz; dh0 (b, d, N);
    parts summed afterwards: dA_parts (b, d, N) and channel_parts (b, 2, d) (dD, d delta_bias) over b,
    dB_parts / dC_parts (b, n_blocks, L, Np) over a group's blocks.
    """
    batch, length, _ = u.shape
    padded = np.uint64(A_log2.shape[1])
    d_state = np.uint64(dh0.shape[2])
    n_blocks = blocks.shape[0]
    n_chunks = checkpoints.shape[2]
    length_u = np.uint64(length)
    for item in prange(batch * n_blocks):
        control = _enter_flush_to_zero()
        tid = numba.get_thread_id()
        b, block, g, c0, width = _work_item(blocks, item)
        _steps_and_drives(u, delta, delta_bias, delta_softplus, b, c0, width, tid, row, step_rows, drive_rows)
        for t in range(length):
            if gated:
                for k in range(width):
                    d = c0 + k
                    gate = z[b, t, d]
                    sig = _sigmoid(gate)
                    row[tid, 0, k] = dout[b, t, d] * gate * sig
                    dz[b, t, d] = dout[b, t, d] * y_pregate[b, t, d] * sig * (_ONE + gate * (_ONE - sig))
            else:
                for k in range(width):
                    row[tid, 0, k] = dout[b, t, c0 + k]
            for k in range(width):
                dy_rows[tid, k, t] = row[tid, 0, k]
            for n in range(padded):
                dB_parts[b, block, t, n] = 0.0
                dC_parts[b, block, t, n] = 0.0
        for k in range(width):
            d = c0 + k
            for n in range(padded):
                carry[tid, n] = 0.0
                dA_acc[tid, n] = 0.0
            for n in range(d_state):
                carry[tid, n] = dh_T[b, d, n]
            for chunk in range(n_chunks - 1, -1, -1):
                t0 = np.uint64(chunk * chunk_size)
                steps = min(np.uint64(chunk_size), length_u - t0)
                for i in range(steps):
                    for j in range(_LANES_U):
                        input_lanes[tid, i, j] = 0.0
                        decay_lanes[tid, i, j] = 0.0
                for n0 in range(_U0, padded, _LANES_U):
                    # recompute the tile's decays a_t and decayed states a_t h_{t-1} = h_t - b_t from the
                    # chunk's checkpoint (the running state is h_tile, which LLVM keeps in registers), and dC
                    in_state = min(_LANES_U, d_state - n0)
                    for j in range(_LANES_U):
                        h_tile[tid, j] = 0.0
                    for j in range(in_state):
                        h_tile[tid, j] = checkpoints[b, d, chunk, n0 + j]
                    for i in range(steps):
                        t = t0 + i
                        step, drive, grad_y = step_rows[tid, k, t], drive_rows[tid, k, t], dy_rows[tid, k, t]
                        for j in range(_LANES_U):
                            n = n0 + j
                            a = _exp2(step * A_log2[d, n])
                            a_h = a * h_tile[tid, j]
                            h = a_h + drive * B[b, g, t, n]
                            h_tile[tid, j] = h
                            decays[tid, i, j] = a
                            decayed[tid, i, j] = a_h
                            dC_parts[b, block, t, n] += grad_y * h
                    # the adjoint through the chunk, last step first
                    for r in range(steps):
                        i = steps - _U1 - r
                        t = t0 + i
                        step, drive, grad_y = step_rows[tid, k, t], drive_rows[tid, k, t], dy_rows[tid, k, t]
                        for j in range(_LANES_U):
                            n = n0 + j
                            g_t = carry[tid, n] + C[b, g, t, n] * grad_y
                            g_decayed = g_t * decayed[tid, i, j]
                            dB_parts[b, block, t, n] += g_t * drive
                            input_lanes[tid, i, j] += g_t * B[b, g, t, n]
                            decay_lanes[tid, i, j] += g_decayed * A[d, n]
                            dA_acc[tid, n] += g_decayed * step
                            carry[tid, n] = decays[tid, i, j] * g_t
                _row_sums(input_lanes, tid, steps, input_rows, k, t0)
                _row_sums(decay_lanes, tid, steps, decay_rows, k, t0)
            for n in range(d_state):
                dh0[b, d, n] = carry[tid, n]
                dA_parts[b, d, n] = dA_acc[tid, n]
        for k in range(width):
            channel_parts[b, 0, c0 + k] = 0.0
            channel_parts[b, 1, c0 + k] = 0.0
        for t in range(length):
            for k in range(width):
                row[tid, 0, k] = input_rows[tid, k, t]
                row[tid, 1, k] = decay_rows[tid, k, t]
            for k in range(width):
                d = c0 + k
                input_sum, x = row[tid, 0, k], u[b, t, d]
                grad_y = dout[b, t, d] * z[b, t, d] * _sigmoid(z[b, t, d]) if gated else dout[b, t, d]
                raw = delta[b, t, d] + delta_bias[d]
                step = _softplus(raw) if delta_softplus else raw
                du[b, t, d] = D[d] * grad_y + step * input_sum
                grad_step = x * input_sum + row[tid, 1, k]
                if delta_softplus:
                    # torch's softplus is linear above the threshold, so its derivative is exactly 1 there
                    raw = delta[b, t, d] + delta_bias[d]
                    grad_step *= _ONE if raw > SOFTPLUS_THRESHOLD else _sigmoid(raw)
                ddelta[b, t, d] = grad_step
                channel_parts[b, 0, d] += grad_y * x
                channel_parts[b, 1, d] += grad_step
        _leave_flush_to_zero(control)


# The sums of the per-item partials are small next to the scan: one thread, no parallel launch (whose fixed
# cost, ~0.1 ms, is more than the work at small shapes); the innermost loops run along contiguous memory.


@_jit_cached(fastmath=FASTMATH, nogil=True)
def _sum_block_parts(parts, first_block, out):
    """out[b, g, t, n] = sum of parts[b, k, t, n] over group g's blocks k, in order; out is (b, G, L, N)."""
    batch, groups, length, d_state = out.shape
    for b in range(batch):
        for g in range(groups):
            for t in range(length):
                for n in range(d_state):
                    out[b, g, t, n] = parts[b, first_block[g], t, n]
                for k in range(first_block[g] + 1, first_block[g + 1]):
                    for n in range(d_state):
                        out[b, g, t, n] += parts[b, k, t, n]


@_jit_cached(fastmath=FASTMATH, nogil=True)
def _sum_over_batch(parts, out):
    """out[d, n] = sum over b of parts[b, d, n], in order."""
    batch, dim, width = parts.shape
    for d in range(dim):
        for n in range(width):
            out[d, n] = parts[0, d, n]
    for b in range(1, batch):
        for d in range(dim):
            for n in range(width):
                out[d, n] += parts[b, d, n]


# --- the backend contract ------------------------------------------------------------------------------

# Threading layer: OpenMP first, where numba finds a runtime. It shares torch's OpenMP threads, so the
# kernels and torch's own ops take turns on one pool: a training step of the 256-token digits model on two
# threads took 47 ms with it against 67 ms with numba's own workqueue layer, whose threads compete with
# torch's spinning ones (benchmarks/bench_numba.py). TBB next, workqueue (always present) last. A layer the
# user picks ($NUMBA_THREADING_LAYER or $NUMBA_THREADING_LAYER_PRIORITY) wins. The workqueue layer aborts
# the process when two threads launch parallel kernels at once, so launches are serialised by one lock.
if not {"NUMBA_THREADING_LAYER", "NUMBA_THREADING_LAYER_PRIORITY"} & set(os.environ):
    numba.config.THREADING_LAYER_PRIORITY = ["omp", "tbb", "workqueue"]
_launch_lock = threading.Lock()


def _launch(kernel, *args) -> None:
    """Run a kernel on torch's thread count. numba's OpenMP layer sets the calling thread's OpenMP thread
    count, the one torch.get_num_threads() reports, to numba's own at its first launch: it is put back."""
    _await_background_compile()
    with _launch_lock:
        threads = torch.get_num_threads()
        numba.set_num_threads(max(1, min(threads, numba.config.NUMBA_NUM_THREADS)))
        kernel(*args)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)


def _channel_blocks(batch: int, dim: int, groups: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows (group, first channel, end channel) that lie inside one group, and each group's first row.

    Each group is cut into as many blocks as needed for ``batch * blocks >= MIN_WORK_ITEMS``: a function of
    the shape only, so the summation order of dB/dC (and so every bit of them) never depends on threads.
    """
    per_group = dim // groups
    splits = max(1, min(per_group, math.ceil(MIN_WORK_ITEMS / (batch * groups))))
    ends = [k * per_group // splits for k in range(splits + 1)]  # sizes differ by at most one
    rows = [
        (g, g * per_group + e0, g * per_group + e1) for g in range(groups) for e0, e1 in zip(ends, ends[1:])
    ]
    first = np.arange(groups + 1, dtype=np.int64) * splits
    return np.asarray(rows, dtype=np.int64), first


class _Inputs:
    """The kernels' arguments: numpy views in the compute dtype, the per-step sequences as time-major
    (b, L, d) buffers, B/C time-major and A padded to whole tiles, zeros for absent D / delta_bias, and the
    channel blocks."""

    def __init__(self, u, delta, z, A, B, C, D, delta_bias):
        self.dtype = compute_dtype(u)
        self.batch, self.dim, self.length = u.shape
        self.d_state = A.shape[1]
        self.padded = math.ceil(self.d_state / LANES) * LANES
        self.u_steps = self.steps(u)
        self.u, self.delta = _array(self.u_steps), _array(self.steps(delta))
        # a stand-in when z is absent: the kernels take the same argument types either way
        self.z = _array(self.steps(z)) if z is not None else np.zeros((1, 1, 1), self.u.dtype)
        self.delta_bias = self.per_channel(delta_bias)
        self.D = self.per_channel(D)
        A = self.pad(A.to(self.dtype))
        self.A, self.A_log2 = _array(A), _array(A * LOG2_E)
        self.B = _array(self.pad(B.to(self.dtype).transpose(-1, -2)))  # (b, G, L, Np)
        self.C = _array(self.pad(C.to(self.dtype).transpose(-1, -2)))
        self.blocks, self.first_block = _channel_blocks(self.batch, self.dim, B.shape[1])
        self.block_width = int((self.blocks[:, 2] - self.blocks[:, 1]).max())

    def steps(self, x: Tensor) -> Tensor:
        """(b, d, L) -> its time-major (b, L, d) buffer in the compute dtype: no copy for a time-major view
        (what the Mamba mixer passes)."""
        return x.to(self.dtype).transpose(1, 2).contiguous()

    def new_steps(self) -> Tensor:
        return self.u_steps.new_empty(self.batch, self.length, self.dim)

    def per_channel(self, x: Tensor | None) -> np.ndarray:
        return np.zeros(self.dim, self.u.dtype) if x is None else _array(x.to(self.dtype).contiguous())

    def pad(self, x: Tensor) -> Tensor:
        """Pad the state axis (last) to ``padded``; no copy for a contiguous one that needs none, such as
        the mixer's time-major B/C."""
        if x.shape[-1] != self.padded:
            x = F.pad(x, (0, self.padded - x.shape[-1]))
        return x.contiguous()

    def scratch(self, *shape: int) -> np.ndarray:
        """A scratch buffer with a row per thread the kernels may run on."""
        return np.empty((numba.config.NUMBA_NUM_THREADS, *shape), self.u.dtype)

    def channel_rows(self) -> np.ndarray:
        """Scratch for a value per channel of a block and step, a row per thread. The rows are a
        cache line longer than a power of two: the time-major passes write and read them a column at a
        time, and rows 2**k bytes apart all fall into the same few sets of the L1 cache."""
        row = self.length + (LANES if self.length & (self.length - 1) == 0 else 0)
        return self.scratch(self.block_width, row)


def _array(t: Tensor) -> np.ndarray:
    return t.detach().numpy()


def _sequence(steps: Tensor, dtype: torch.dtype) -> Tensor:
    """A time-major (b, L, d) buffer as the (b, d, L) tensor of the contract, in ``dtype``."""
    return steps.transpose(1, 2).to(dtype)


def scan_forward(
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
) -> tuple[Tensor, Tensor, Tensor, Tensor | None]:
    """See the backend contract in kernels/arcee_scan/interface.py. ``out`` and ``y_pregate`` are
    time-major: (b, d, L) views of (b, L, d) buffers."""
    with torch.no_grad():
        inputs = _Inputs(u, delta, z, A, B, C, D, delta_bias)
        out = inputs.new_steps()
        y_pregate = inputs.new_steps() if z is not None else out  # (not written without z)
        new = inputs.u_steps.new_empty
        h_T = new(inputs.batch, inputs.dim, inputs.d_state)
        checkpoints = new(inputs.batch, inputs.dim, math.ceil(inputs.length / chunk_size), inputs.d_state)
        h0 = torch.zeros_like(h_T) if initial_state is None else initial_state.contiguous()
        _launch(
            _forward_kernel,
            inputs.u, inputs.delta, inputs.z, inputs.delta_bias, inputs.D, inputs.A_log2, inputs.B, inputs.C,
            _array(h0), delta_softplus, z is not None, chunk_size, inputs.blocks,
            inputs.scratch(2, inputs.block_width), *(inputs.channel_rows() for _ in range(3)),
            inputs.scratch(LANES), inputs.scratch(inputs.length, LANES),
            *map(_array, (out, y_pregate, h_T, checkpoints)),
        )  # fmt: skip
    pregate = _sequence(y_pregate, inputs.dtype) if z is not None else None
    return _sequence(out, u.dtype), h_T, checkpoints, pregate


def scan_backward(
    dout: Tensor | None,
    dh_T: Tensor | None,
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
    y_pregate: Tensor | None,
    chunk_size: int,
    deterministic: bool,
) -> tuple[Tensor | None, ...]:
    """See the backend contract in kernels/arcee_scan/interface.py. Always deterministic (no atomics).
    du, ddelta and dz are time-major like the forward's outputs; dB and dC are (b, G, N, L) views of
    time-major (b, G, L, N) buffers."""
    groups = B.shape[1]
    with torch.no_grad():
        inputs = _Inputs(u, delta, z, A, B, C, D, delta_bias)
        batch, dim, length = inputs.batch, inputs.dim, inputs.length
        d_state, padded = inputs.d_state, inputs.padded
        new = inputs.u_steps.new_empty
        dout = inputs.new_steps().zero_() if dout is None else inputs.steps(dout)
        dh_T = new(batch, dim, d_state).zero_() if dh_T is None else dh_T.contiguous()
        # stand-ins without z: the kernel reads neither
        y_pregate = inputs.steps(y_pregate) if z is not None else inputs.u_steps
        du, ddelta = inputs.new_steps(), inputs.new_steps()
        dz = inputs.new_steps() if z is not None else du
        dh0, dA_parts, channel_parts = new(batch, dim, d_state), new(batch, dim, d_state), new(batch, 2, dim)
        dB_parts = new(batch, len(inputs.blocks), length, padded)
        dC_parts = new(batch, len(inputs.blocks), length, padded)
        steps = min(chunk_size, length)
        _launch(
            _backward_kernel,
            _array(dout), _array(dh_T), inputs.u, inputs.delta, inputs.z, _array(y_pregate),
            inputs.delta_bias, inputs.D, inputs.A, inputs.A_log2, inputs.B, inputs.C,
            _array(checkpoints.contiguous()),
            delta_softplus, z is not None, chunk_size, inputs.blocks, inputs.scratch(2, inputs.block_width),
            *(inputs.channel_rows() for _ in range(5)), inputs.scratch(padded), inputs.scratch(padded),
            inputs.scratch(LANES), *(inputs.scratch(steps, LANES) for _ in range(4)),
            *map(_array, (du, ddelta, dz, dh0, dA_parts, channel_parts, dB_parts, dC_parts)),
        )  # fmt: skip
        dA, channel_sums = new(dim, d_state), new(2, dim)
        _launch(_sum_over_batch, _array(dA_parts), _array(dA))
        _launch(_sum_over_batch, _array(channel_parts), _array(channel_sums))
        dB, dC = new(batch, groups, length, d_state), new(batch, groups, length, d_state)
        for parts, total in ((dB_parts, dB), (dC_parts, dC)):
            _launch(_sum_block_parts, _array(parts), inputs.first_block, _array(total))
    return (
        _sequence(du, u.dtype),
        _sequence(ddelta, delta.dtype),
        dA,
        dB.transpose(-1, -2),
        dC.transpose(-1, -2),
        None if D is None else channel_sums[0].clone(),  # (the op's outputs must not alias)
        None if z is None else _sequence(dz, z.dtype),
        None if delta_bias is None else channel_sums[1].clone(),
        None if initial_state is None else dh0,
    )


# --- the Mamba mixer's causal depthwise convolution ----------------------------------------------------
# Time-major like the scan's per-step arrays, so that the mixer's activations never change layout; the
# channel loops are innermost and vectorise. One work item per sample; the weight and bias gradients are
# summed per sample, then over the samples in order (deterministic whatever the thread count).


@_jit_cached(fastmath=FASTMATH, nogil=True, inline="always")
def _conv_step(x, weight, bias, b, t, pre):
    """pre[b, e] = bias[e] + sum_k weight[k, e] x[b, t + k - (K - 1), e], the taps before t = 0 zero."""
    width, channels = weight.shape
    for e in range(channels):
        pre[b, e] = bias[e]
    for k in range(max(0, width - 1 - t), width):
        s = t + k - (width - 1)
        for e in range(channels):
            pre[b, e] += weight[k, e] * x[b, s, e]


@_jit_cached(parallel=True, fastmath=FASTMATH, nogil=True)
def _conv_forward_kernel(x, weight, bias, silu, pre, out):
    """out = silu(conv(x)) or conv(x). x, out: (b, L, E); weight: (K, E); bias: (E,); pre: (b, E)."""
    batch, length, channels = x.shape
    for b in prange(batch):
        control = _enter_flush_to_zero()
        for t in range(length):
            _conv_step(x, weight, bias, b, t, pre)
            if silu:
                for e in range(channels):
                    out[b, t, e] = pre[b, e] * _sigmoid(pre[b, e])
            else:
                for e in range(channels):
                    out[b, t, e] = pre[b, e]
        _leave_flush_to_zero(control)


@_jit_cached(parallel=True, fastmath=FASTMATH, nogil=True)
def _conv_backward_kernel(dout, x, weight, bias, silu, pre, dpre, dx, dweight_parts, dbias_parts):
    """dx (b, L, E), and per sample dweight_parts (b, K, E), dbias_parts (b, E). Scratch: pre (b, E), dpre
    (b, L, E), the gradient of the pre-activation."""
    batch, length, channels = x.shape
    width = weight.shape[0]
    for b in prange(batch):
        control = _enter_flush_to_zero()
        for t in range(length):
            if silu:
                _conv_step(x, weight, bias, b, t, pre)
                for e in range(channels):
                    sig = _sigmoid(pre[b, e])
                    dpre[b, t, e] = dout[b, t, e] * sig * (_ONE + pre[b, e] * (_ONE - sig))
            else:
                for e in range(channels):
                    dpre[b, t, e] = dout[b, t, e]
        for k in range(width):
            for e in range(channels):
                dweight_parts[b, k, e] = 0.0
        for e in range(channels):
            dbias_parts[b, e] = 0.0
        for s in range(length):
            for e in range(channels):
                dx[b, s, e] = 0.0
            for k in range(width):
                t = s + (width - 1) - k  # the output step that reads x[s] through tap k
                if t < length:
                    for e in range(channels):
                        dx[b, s, e] += weight[k, e] * dpre[b, t, e]
                        dweight_parts[b, k, e] += dpre[b, t, e] * x[b, s, e]
            for e in range(channels):
                dbias_parts[b, e] += dpre[b, s, e]
        _leave_flush_to_zero(control)


def conv_forward(x: Tensor, weight: Tensor, bias: Tensor, silu: bool) -> Tensor:
    """Causal depthwise convolution of time-major ``x`` (b, L, E) in its compute dtype: weight (K, E),
    bias (E,), both contiguous in that dtype; SiLU after it when ``silu``."""
    x = x.contiguous()
    out = torch.empty_like(x)
    pre = x.new_empty(x.shape[0], x.shape[2])
    _launch(_conv_forward_kernel, *map(_array, (x, weight, bias)), silu, *map(_array, (pre, out)))
    return out


def conv_backward(dout: Tensor, x: Tensor, weight: Tensor, bias: Tensor, silu: bool) -> tuple[Tensor, ...]:
    """dx (b, L, E), dweight (K, E), dbias (E,) of ``conv_forward``."""
    dout, x = dout.contiguous(), x.contiguous()
    batch, _, channels = x.shape
    dx = torch.empty_like(x)
    dweight_parts = x.new_empty(batch, weight.shape[0], channels)
    dbias_parts = x.new_empty(batch, 1, channels)
    _launch(
        _conv_backward_kernel, *map(_array, (dout, x, weight, bias)), silu,
        _array(x.new_empty(batch, channels)), _array(torch.empty_like(x)), _array(dx),
        _array(dweight_parts), _array(dbias_parts[:, 0]),
    )  # fmt: skip
    dweight, dbias = x.new_empty(weight.shape), x.new_empty(1, channels)
    _launch(_sum_over_batch, _array(dweight_parts), _array(dweight))
    _launch(_sum_over_batch, _array(dbias_parts), _array(dbias))
    return dx, dweight, dbias[0]


# --- compiling ahead, in the background ----------------------------------------------------------------
# The first call of each kernel compiles it (~6 s the forward and the convolution, ~15 s the backward, on
# one core), and the process waits. Two helper processes can compile them side by side into the disk cache
# instead, while the caller imports, loads data and builds its model; the first launch here then waits for
# them and loads the kernels from the cache. Only the float32 kernels (what every dtype but float64 runs
# in) are compiled ahead; anything else compiles on first use, as without this.
_WARM_UP_PARTS = ("forward", "backward")  # the two helpers' shares, the backward the larger
_KERNELS = (
    _forward_kernel, _backward_kernel, _sum_over_batch, _sum_block_parts, _conv_forward_kernel,
    _conv_backward_kernel,
)  # fmt: skip
_background: list[subprocess.Popen] = []


def compile_in_background() -> bool:
    """Start compiling the float32 kernels into the disk cache in two helper processes, and return at once.

    The first kernel launch in this process waits for them (a helper that fails costs nothing: the kernel
    then compiles here, as it would have). Returns False, starting nothing, when the cache already holds
    every kernel or when helpers are running already.
    """
    if _background or _cached():
        return False
    for part in _WARM_UP_PARTS:
        command = [sys.executable, "-c", f"from arcee_scan.numba_scan import _warm_up; _warm_up({part!r})"]
        env = {**os.environ, "NUMBA_NUM_THREADS": "1", "OMP_NUM_THREADS": "1"}
        _background.append(
            subprocess.Popen(command, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        )
    return True


def _cached() -> bool:
    """Whether numba's cache folder has an index for every kernel (numba checks the signature on use)."""
    return all(
        any(Path(kernel.stats.cache_path).glob(f"{Path(__file__).stem}.{kernel.py_func.__name__}-*.nbi"))
        for kernel in _KERNELS
    )


def _await_background_compile() -> None:
    while _background:
        _background.pop().wait()


def _warm_up(part: str) -> None:
    """Run the kernels of ``part`` once at a tiny shape (their float32 signatures are shape-free)."""
    torch.manual_seed(0)
    batch, dim, length, d_state = 1, 4, 3, LANES
    u, delta, z = (torch.randn(batch, length, dim).transpose(1, 2) for _ in range(3))
    A, D, bias = -torch.rand(dim, d_state), torch.randn(dim), torch.randn(dim)
    B, C = (torch.randn(batch, 1, length, d_state).transpose(-1, -2) for _ in range(2))
    h0 = torch.randn(batch, dim, d_state)
    if part == "forward":
        scan_forward(u, delta, A, B, C, D, z, bias, True, h0, 2)
        conv_backward(*(torch.randn(batch, length, dim) for _ in range(2)), torch.randn(4, dim), bias, True)
        conv_forward(torch.randn(batch, length, dim), torch.randn(4, dim), bias, True)
    else:  # the backward of made-up forward results: only the types matter
        checkpoints, y_pregate = torch.zeros(batch, dim, 2, d_state), torch.zeros_like(u)
        scan_backward(u, h0, u, delta, A, B, C, D, z, bias, True, h0, checkpoints, y_pregate, 2, True)
