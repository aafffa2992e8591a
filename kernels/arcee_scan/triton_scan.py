"""Triton backend of the stateful selective scan: forward and checkpointed backward kernels.

Runs on CUDA tensors, and on CPU tensors when ``TRITON_INTERPRET=1`` was set before this module was imported
(Triton reads it when the kernels are decorated). See docs/kernel.md for the math; the notation here follows
it: ``a_t = exp(delta_t A)``, ``b_t = delta_t u_t B_t``, ``h_t = a_t h_{t-1} + b_t`` and the reverse
recurrence ``g_t = C_t dy_t + a_{t+1} g_{t+1}`` started from ``dh_T``.

Forward: one program per (batch, block of channels) keeps the fp32 ``(BLOCK_D, N)`` state tile in registers
and walks time, so each ``B_t``/``C_t`` load serves BLOCK_D channels; it writes ``h_T`` and the state entering
every chunk of ``chunk_size`` steps. Each step's inputs are loaded one step ahead.

Backward: one program per (batch, block of channels, block of states) walks the chunks in reverse. Per chunk
it rebuilds ``h`` from the checkpoint with a first-order associative scan and builds ``g`` with a reverse scan
whose combine carries the segment's first decay, so ``a_{t+1}`` never has to be shifted into place (shifting
a register tile costs a second exp per element). Nothing is ever divided by a decay: products of ``a`` only
underflow to zero, which is harmless. Its tiles put time first, so the scans run inside each thread.

Sums across programs (dB/dC over channel blocks, du/ddelta over state blocks) use fp32 atomics by default;
``deterministic=True`` has every program write a private partial instead and sums the partials with torch
reductions, which run in a fixed order. dA, dD and d delta_bias are always summed that way.

On an NVIDIA GPU, exp2 and log2 are the hardware's approximate instructions (inline PTX), and sigmoid divides
approximately: relative error at most ~4e-6, tested against the reference on an H100. The interpreter and
ROCm builds of torch run the portable ``tl`` functions.
Both kernels are bound by the instructions issued per state element, not by the exp unit: see
docs/benchmarks/triton.md for the H100 measurements behind the tile sizes below.
"""

from __future__ import annotations

import os

import torch
import triton
import triton.language as tl
from torch import Tensor
from triton.runtime.interpreter import InterpretedFunction

__all__ = ["scan_forward", "scan_backward", "REVERSE_SCAN_WITH_FLIP"]

# `tl.associative_scan(..., reverse=True)` with a non-commutative combine has GPU bug reports
# (triton-lang/triton#4362, #8412); flipping the tile, scanning forward and flipping back is the default. On
# an H100 with Triton 3.6 both were correct (benchmarks/device_check.py probes it) and the flip was faster.
# Set ARCEE_SCAN_TRITON_FLIP=0 to use reverse=True.
REVERSE_SCAN_WITH_FLIP = os.environ.get("ARCEE_SCAN_TRITON_FLIP", "1") != "0"

# Tile sizes: elements of one program's fp32 state tile (forward: BLOCK_D x N; backward: BLOCK_D x BLOCK_N x
# chunk) and warps per program, measured on an H100 at the paper's shapes (docs/benchmarks/triton.md). Both
# kernels are fastest as one-warp programs: the sums over N and over channels stay in shuffles, without
# shared memory or barriers. The deterministic backward keeps one dB/dC partial per channel block and one
# du/ddelta partial per state block, so it takes wider channel blocks, and runs as many samples per launch
# as PARTIAL_SUM_BYTES of partials hold (one launch at the paper's shape would need 6.75 GiB; it now runs 7
# samples per launch). Tests shrink the tiles to exercise the multi-block sums.
FORWARD_TILE = 1024
FORWARD_MAX_BLOCK_D = 8
FORWARD_NUM_WARPS = 1
BACKWARD_TILE = 1024
BACKWARD_BLOCK_N = 32
BACKWARD_NUM_WARPS = 1
DETERMINISTIC_BACKWARD_TILE = 2048
DETERMINISTIC_BACKWARD_BLOCK_N = 16
DETERMINISTIC_BACKWARD_NUM_WARPS = 2
PARTIAL_SUM_BYTES = 1 << 30

# Register caps per thread (ptxas' -maxnreg), None for ptxas' own choice. Uncapped, ptxas spends registers on
# instruction-level parallelism: 160 in the forward and all 255 in the backward at the paper's shape, which
# leaves room for 12 and 8 resident warps per SM (benchmarks/triton_sass.py). A cap trades spills for more
# warps to hide latency with; the device sweep measures both.
FORWARD_MAX_REGISTERS: int | None = None
BACKWARD_MAX_REGISTERS: int | None = None

# Two launch choices, off until a GPU run times them (the device sweep has both). Programs start roughly in
# grid order, first axis fastest: with the sample first, the programs resident on an SM at one time read
# different samples' B and C; with the channel blocks first (CHANNEL_BLOCKS_FIRST) they read the same
# sample's, which L1 can then serve. FLOAT32_B_C converts half-precision B and C to fp32 before the launch:
# the forward's 16-byte loads of 8 halves then no longer need lane shuffles to reach the state tile's layout
# of 4 values per thread, 326 instead of 361 instructions per step at the paper's shape
# (benchmarks/triton_sass.py), for twice the B/C bytes loaded.
CHANNEL_BLOCKS_FIRST = False
FLOAT32_B_C = False

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)


@triton.jit
def _exp2(x):
    # ex2.approx.ftz: one instruction instead of five (tl.exp2 rescales around denormal results); a decay
    # below 2^-126 becomes zero, which the recurrence tolerates
    if _PTX_MATH:
        return tl.inline_asm_elementwise(
            "ex2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.exp2(x)


@triton.jit
def _log2(x):
    # lg2.approx: absolute error below 2^-22 (tl.log2 is a ~25-instruction polynomial)
    if _PTX_MATH:
        return tl.inline_asm_elementwise(
            "lg2.approx.ftz.f32 $0, $1;", "=r,r", [x], dtype=tl.float32, is_pure=True, pack=1
        )
    else:
        return tl.log2(x)


@triton.jit
def _sigmoid(x):
    return tl.fdiv(1.0, 1.0 + _exp2(-x * LOG2E), ieee_rounding=False)


@triton.jit
def _softplus(x):
    # max(x, 0) + log1p(e), e = exp(-|x|) <= 1: a series where log2(1 + e) would lose e's low bits
    # (relative error < 1e-6), the fast log2 above (< 4e-6); identity above torch's threshold of 20
    e = _exp2(-tl.abs(x) * LOG2E)
    series = e * (1.0 - e * (0.5 - e * (0.3333333333333333 - e * 0.25)))
    log1p_e = tl.where(e < 0.03125, series, _log2(1.0 + e) * LN2)
    return tl.where(x > 20.0, x, tl.maximum(x, 0.0) + log1p_e)


@triton.jit
def _softplus_grad(x):
    return tl.where(x > 20.0, 1.0, _sigmoid(x))


# Under TRITON_INTERPRET=1 (read when the functions above were decorated) every @triton.jit function is an
# InterpretedFunction, run on CPU tensors, where no PTX runs. The helpers above use inline PTX only when the
# kernels compile for an NVIDIA GPU: not interpreted, and not a ROCm build of torch. Resolved when a kernel is
# compiled or interpreted, after these lines ran.
_INTERPRETED = isinstance(_softplus_grad, InterpretedFunction)
_PTX_MATH = tl.constexpr(not _INTERPRETED and torch.version.hip is None)


@triton.jit
def _affine_combine(a_left, b_left, a_right, b_right):
    # compose h -> a_left h + b_left, then h -> a_right h + b_right
    return a_left * a_right, a_right * b_left + b_right


@triton.jit
def _reverse_affine_combine(a_later, m_later, v_later, a_earlier, m_earlier, v_earlier):
    # A segment [s, e] is (a_s, a_{s+1}...a_e, g_s with the gradient entering past e set to zero).
    # Appending the earlier segment in front: g_s = v_earlier + m_earlier * a_first_later * v_later.
    bridge = m_earlier * a_later
    return a_earlier, bridge * m_later, v_earlier + bridge * v_later


@triton.jit
def _sample_and_channel_block(CHANNELS_FIRST: tl.constexpr):
    # the grid's first two axes, in the order _grid launched them
    if CHANNELS_FIRST:
        return tl.program_id(1).to(tl.int64), tl.program_id(0)
    else:
        return tl.program_id(0).to(tl.int64), tl.program_id(1)


@triton.jit
def _scan_fwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, h0_ptr,
    out_ptr, ypre_ptr, hT_ptr, ckpt_ptr,
    dim, L, d_state, chunk_size, n_chunks, channels_per_group,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_H0: tl.constexpr, CHANNELS_FIRST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    pid_b, pid_d = _sample_and_channel_block(CHANNELS_FIRST)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = tl.arange(0, BLOCK_N)
    mask_d = offs_d < dim
    mask_n = offs_n < d_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    # BLOCK_D divides the channels per group (or there is one group): the block reads one group's B and C
    group = (pid_d * BLOCK_D) // channels_per_group

    # masked channels and states get A = 0 and B = 0: an identity step that is never stored
    A = tl.load(A_ptr + offs_d[:, None] * d_state + offs_n[None, :], mask=mask_dn, other=0.0)
    A2 = A.to(tl.float32) * LOG2E
    if HAS_D:
        D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state_offs = (pid_b * dim + offs_d[:, None]) * d_state + offs_n[None, :]  # (b, d, N) contiguous
    if HAS_H0:
        h = tl.load(h0_ptr + state_offs, mask=mask_dn, other=0.0)
    else:
        h = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    ckpt_ptrs = ckpt_ptr + ((pid_b * dim + offs_d[:, None]) * n_chunks) * d_state + offs_n[None, :]

    u_ptrs = u_ptr + pid_b * su_b + offs_d * su_d
    delta_ptrs = delta_ptr + pid_b * sdt_b + offs_d * sdt_d
    z_ptrs = z_ptr + pid_b * sz_b + offs_d * sz_d
    B_ptrs = B_ptr + pid_b * sB_b + group * sB_g + offs_n * sB_n
    C_ptrs = C_ptr + pid_b * sC_b + group * sC_g + offs_n * sC_n
    out_ptrs = out_ptr + (pid_b * dim + offs_d) * L
    # every step's inputs are loaded one step ahead: only h carries over from step to step, so the loads'
    # latency hides behind the step before instead of stalling the warp
    u_next = tl.load(u_ptrs, mask=mask_d, other=0.0)
    dt_next = tl.load(delta_ptrs, mask=mask_d, other=0.0)
    B_next = tl.load(B_ptrs, mask=mask_n, other=0.0)
    C_next = tl.load(C_ptrs, mask=mask_n, other=0.0)
    if HAS_Z:
        z_next = tl.load(z_ptrs, mask=mask_d, other=0.0)
    for chunk in range(n_chunks):
        tl.store(ckpt_ptrs + chunk * d_state, h, mask=mask_dn)
        for t in range(chunk * chunk_size, tl.minimum(chunk * chunk_size + chunk_size, L)):
            u = u_next.to(tl.float32)
            dt = dt_next.to(tl.float32)
            B_t = B_next.to(tl.float32)
            C_t = C_next.to(tl.float32)
            t_next = tl.minimum(t + 1, L - 1)  # the last step reloads itself: no per-step mask to build
            u_next = tl.load(u_ptrs + t_next * su_l, mask=mask_d, other=0.0)
            dt_next = tl.load(delta_ptrs + t_next * sdt_l, mask=mask_d, other=0.0)
            B_next = tl.load(B_ptrs + t_next * sB_l, mask=mask_n, other=0.0)
            C_next = tl.load(C_ptrs + t_next * sC_l, mask=mask_n, other=0.0)
            if HAS_BIAS:
                dt += bias
            if SOFTPLUS:
                dt = _softplus(dt)
            h = _exp2(dt[:, None] * A2) * h + (dt * u)[:, None] * B_t[None, :]
            y = tl.sum(h * C_t[None, :], axis=1)
            if HAS_D:
                y += D * u
            if HAS_Z:
                tl.store(ypre_ptr + (pid_b * dim + offs_d) * L + t, y, mask=mask_d)
                z = z_next.to(tl.float32)
                z_next = tl.load(z_ptrs + t_next * sz_l, mask=mask_d, other=0.0)
                y = y * z * _sigmoid(z)
            tl.store(out_ptrs + t, y.to(out_ptr.dtype.element_ty), mask=mask_d)
    tl.store(hT_ptr + state_offs, h, mask=mask_dn)


@triton.jit
def _scan_bwd_kernel(
    u_ptr, delta_ptr, A_ptr, B_ptr, C_ptr, D_ptr, z_ptr, bias_ptr, dout_ptr, dhT_ptr, ckpt_ptr, ypre_ptr,
    du_ptr, ddelta_ptr, dA_ptr, dB_ptr, dC_ptr, dD_ptr, dz_ptr, dh0_ptr,
    dim, L, d_state, chunk_size, n_chunks, channels_per_group, n_d_blocks, du_partial_stride,
    su_b, su_d, su_l, sdt_b, sdt_d, sdt_l, sz_b, sz_d, sz_l, so_b, so_d, so_l,
    sB_b, sB_g, sB_n, sB_l, sC_b, sC_g, sC_n, sC_l,
    HAS_D: tl.constexpr, HAS_Z: tl.constexpr, HAS_BIAS: tl.constexpr, SOFTPLUS: tl.constexpr,
    HAS_DOUT: tl.constexpr, HAS_DHT: tl.constexpr, HAS_H0: tl.constexpr,
    ATOMIC_BC: tl.constexpr, ATOMIC_DU: tl.constexpr, USE_FLIP: tl.constexpr,
    CHANNELS_FIRST: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_T: tl.constexpr,
):  # fmt: skip
    pid_b, pid_d = _sample_and_channel_block(CHANNELS_FIRST)
    pid_n = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    steps = tl.arange(0, BLOCK_T)
    mask_d = offs_d < dim
    mask_n = offs_n < d_state
    mask_dn = mask_d[:, None] & mask_n[None, :]
    group = (pid_d * BLOCK_D) // channels_per_group
    groups = dim // channels_per_group

    A = tl.load(A_ptr + offs_d[:, None] * d_state + offs_n[None, :], mask=mask_dn, other=0.0).to(tl.float32)
    A2 = A * LOG2E
    if HAS_D:
        D = tl.load(D_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    if HAS_BIAS:
        bias = tl.load(bias_ptr + offs_d, mask=mask_d, other=0.0).to(tl.float32)
    state_offs = (pid_b * dim + offs_d[:, None]) * d_state + offs_n[None, :]
    if HAS_DHT:
        dh = tl.load(dhT_ptr + state_offs, mask=mask_dn, other=0.0)  # gradient entering h from later steps
    else:
        dh = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dA_acc = tl.zeros((BLOCK_D, BLOCK_N), dtype=tl.float32)
    dD_acc = tl.zeros((BLOCK_D,), dtype=tl.float32)
    ckpt_ptrs = ckpt_ptr + ((pid_b * dim + offs_d[:, None]) * n_chunks) * d_state + offs_n[None, :]

    # Tiles put time first: (BLOCK_T, BLOCK_D, BLOCK_N). Triton spreads a tile's lanes over its trailing
    # axes, so each thread holds a whole chunk of steps and the scans and flips over time run in registers;
    # only the sums over N and over channels cross lanes.
    row_d = (pid_b * dim + offs_d) * L  # (b, d, L) contiguous outputs
    B_base = B_ptr + pid_b * sB_b + group * sB_g + offs_n * sB_n
    C_base = C_ptr + pid_b * sC_b + group * sC_g + offs_n * sC_n
    # dB/dC: one (N, L) slice per group, or per channel block when partials are kept (deterministic)
    bc_row = pid_b * groups + group if ATOMIC_BC else pid_b * n_d_blocks + pid_d
    bc_base = (bc_row * d_state + offs_n) * L
    du_base = row_d if ATOMIC_DU else row_d + pid_n.to(tl.int64) * du_partial_stride
    first = steps[:, None, None] == 0
    last = steps[:, None, None] == BLOCK_T - 1

    for i in range(n_chunks):
        chunk = n_chunks - 1 - i
        offs_t = chunk * chunk_size + steps
        mask_t = (steps < chunk_size) & (offs_t < L)
        mask_td = mask_t[:, None] & mask_d[None, :]
        mask_tn = mask_t[:, None] & mask_n[None, :]

        # (BLOCK_T, BLOCK_D) per-channel inputs
        u = tl.load(u_ptr + pid_b * su_b + offs_t[:, None] * su_l + offs_d[None, :] * su_d, mask=mask_td,
                    other=0.0).to(tl.float32)  # fmt: skip
        dt_raw = tl.load(delta_ptr + pid_b * sdt_b + offs_t[:, None] * sdt_l + offs_d[None, :] * sdt_d,
                         mask=mask_td, other=0.0).to(tl.float32)  # fmt: skip
        if HAS_BIAS:
            dt_raw += bias[None, :]
        dt = _softplus(dt_raw) if SOFTPLUS else dt_raw
        # steps past L or past the chunk become identity steps (a = 1, b = 0): zero delta AFTER softplus
        dt = tl.where(mask_t[:, None], dt, 0.0)
        if HAS_DOUT:
            dout = tl.load(dout_ptr + pid_b * so_b + offs_t[:, None] * so_l + offs_d[None, :] * so_d,
                           mask=mask_td, other=0.0).to(tl.float32)  # fmt: skip
            if HAS_Z:
                z = tl.load(z_ptr + pid_b * sz_b + offs_t[:, None] * sz_l + offs_d[None, :] * sz_d,
                            mask=mask_td, other=0.0).to(tl.float32)  # fmt: skip
                sig_z = _sigmoid(z)
                dy = dout * z * sig_z
            else:
                dy = dout
        else:
            dy = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
        # (BLOCK_T, BLOCK_N) group inputs
        B = tl.load(B_base[None, :] + offs_t[:, None] * sB_l, mask=mask_tn, other=0.0).to(tl.float32)
        C = tl.load(C_base[None, :] + offs_t[:, None] * sC_l, mask=mask_tn, other=0.0).to(tl.float32)

        # rebuild of h from the state entering the chunk
        a = _exp2(dt[:, :, None] * A2[None, :, :])
        b = (dt * u)[:, :, None] * B[:, None, :]
        h_in = tl.load(ckpt_ptrs + chunk * d_state, mask=mask_dn, other=0.0)
        b_first = tl.where(first, b + a * h_in[None, :, :], b)
        _, h = tl.associative_scan((a, b_first), 0, _affine_combine)

        # g, backwards in time; the gradient from later chunks enters at the last slot (padded slots
        # have a = 1 and no local term, so it reaches the last real step unchanged)
        x = dy[:, :, None] * C[:, None, :]
        x = tl.where(last, x + dh[None, :, :], x)
        ones = tl.full((BLOCK_T, BLOCK_D, BLOCK_N), 1.0, tl.float32)
        if USE_FLIP:
            _, _, g = tl.associative_scan((tl.flip(a, 0), ones, tl.flip(x, 0)), 0, _reverse_affine_combine)
            g = tl.flip(g, 0)
        else:
            _, _, g = tl.associative_scan((a, ones, x), 0, _reverse_affine_combine, reverse=True)
        dh = tl.sum(tl.where(first, a * g, 0.0), axis=0)

        g_decayed_h = g * (h - b)  # g_t a_t h_{t-1}, without ever forming h_{t-1}
        dA_acc += tl.sum(g_decayed_h * dt[:, :, None], axis=0)
        S = tl.sum(g * B[:, None, :], axis=2)
        ddt = u * S + tl.sum(g_decayed_h * A[None, :, :], axis=2)
        du = dt * S
        if HAS_D:
            du += tl.where(pid_n == 0, D[None, :] * dy, 0.0)
        if SOFTPLUS:
            ddt *= _softplus_grad(dt_raw)
        dB = tl.sum(g * (dt * u)[:, :, None], axis=1)
        dC = tl.sum(h * dy[:, :, None], axis=1)

        du_offs = du_base[None, :] + offs_t[:, None]
        bc_offs = bc_base[None, :] + offs_t[:, None]
        if ATOMIC_DU:
            tl.atomic_add(du_ptr + du_offs, du, mask=mask_td, sem="relaxed")
            tl.atomic_add(ddelta_ptr + du_offs, ddt, mask=mask_td, sem="relaxed")
        else:
            tl.store(du_ptr + du_offs, du, mask=mask_td)
            tl.store(ddelta_ptr + du_offs, ddt, mask=mask_td)
        if ATOMIC_BC:
            tl.atomic_add(dB_ptr + bc_offs, dB, mask=mask_tn, sem="relaxed")
            tl.atomic_add(dC_ptr + bc_offs, dC, mask=mask_tn, sem="relaxed")
        else:
            tl.store(dB_ptr + bc_offs, dB, mask=mask_tn)
            tl.store(dC_ptr + bc_offs, dC, mask=mask_tn)
        if HAS_DOUT:
            dD_acc += tl.sum(dy * u, axis=0)
            if HAS_Z:  # written once, by the first state block
                mask_dz = mask_td & (pid_n == 0)
                out_offs = row_d[None, :] + offs_t[:, None]
                y = tl.load(ypre_ptr + out_offs, mask=mask_dz, other=0.0)
                dz = dout * y * sig_z * (1.0 + z * (1.0 - sig_z))
                tl.store(dz_ptr + out_offs, dz.to(dz_ptr.dtype.element_ty), mask=mask_dz)

    # per-batch partials, summed over the batch by the caller in a fixed order
    tl.store(dA_ptr + state_offs, dA_acc, mask=mask_dn)
    if HAS_D and HAS_DOUT:
        tl.store(dD_ptr + pid_b * dim + offs_d, dD_acc, mask=mask_d & (pid_n == 0))
    if HAS_H0:
        tl.store(dh0_ptr + state_offs, dh, mask=mask_dn)


def _strides(x: Tensor | None, rank: int) -> tuple[int, ...]:
    return tuple(x.stride()) if x is not None else (0,) * rank


def _grid(batch: int, channel_blocks: int, *rest: int) -> tuple[int, ...]:
    """The launch grid, its first two axes ordered by CHANNEL_BLOCKS_FIRST."""
    first = (channel_blocks, batch) if CHANNEL_BLOCKS_FIRST else (batch, channel_blocks)
    return (*first, *rest)


def _launch_B_C(B: Tensor, C: Tensor) -> tuple[Tensor, Tensor]:
    """B and C as the kernels load them: fp32 copies (same strides) when FLOAT32_B_C is set."""
    return (B.float(), C.float()) if FLOAT32_B_C else (B, C)


def _channel_block(dim: int, groups: int, target: int) -> int:
    """Largest power of two <= target that keeps every channel block inside one group of B/C."""
    block = min(triton.next_power_of_2(dim), max(1, target))
    if groups > 1:
        while (dim // groups) % block:
            block //= 2
    return block


def _check_input(u: Tensor) -> None:
    if u.dtype == torch.float64:
        raise TypeError(
            "u must be float32, float16 or bfloat16 for the triton backend (fp32 state); got float64"
        )
    if u.device.type != "cuda" and not _INTERPRETED:
        raise RuntimeError(
            "the triton backend needs CUDA tensors, or CPU tensors with TRITON_INTERPRET=1 set before "
            f"arcee_scan.triton_scan is imported; got tensors on {u.device}"
        )


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
    """Returns ``(out, h_T, checkpoints, y_pregate)`` as in the backend contract (docs in interface.py)."""
    _check_input(u)
    batch, dim, L = u.shape
    groups, d_state = B.shape[1], B.shape[2]
    n_chunks = triton.cdiv(L, chunk_size)
    A = A.contiguous()
    initial_state = initial_state.contiguous() if initial_state is not None else None

    out = torch.empty((batch, dim, L), dtype=u.dtype, device=u.device)
    y_pregate = torch.empty((batch, dim, L), dtype=torch.float32, device=u.device) if z is not None else None
    h_T = torch.empty((batch, dim, d_state), dtype=torch.float32, device=u.device)
    checkpoints = torch.empty((batch, dim, n_chunks, d_state), dtype=torch.float32, device=u.device)

    block_n = triton.next_power_of_2(d_state)
    block_d = _channel_block(dim, groups, min(FORWARD_TILE // block_n, FORWARD_MAX_BLOCK_D))
    B, C = _launch_B_C(B, C)
    grid = _grid(batch, triton.cdiv(dim, block_d))
    _scan_fwd_kernel[grid](
        u, delta, A, B, C, D if D is not None else A, z if z is not None else u,
        delta_bias if delta_bias is not None else A, initial_state if initial_state is not None else h_T,
        out, y_pregate if y_pregate is not None else out, h_T, checkpoints,
        dim, L, d_state, chunk_size, n_chunks, dim // groups,
        *u.stride(), *delta.stride(), *_strides(z, 3), *B.stride(), *C.stride(),
        HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None, SOFTPLUS=delta_softplus,
        HAS_H0=initial_state is not None, CHANNELS_FIRST=CHANNEL_BLOCKS_FIRST, BLOCK_D=block_d,
        BLOCK_N=block_n, num_warps=FORWARD_NUM_WARPS, maxnreg=FORWARD_MAX_REGISTERS,
    )  # fmt: skip
    return out, h_T, checkpoints, y_pregate


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
) -> tuple[Tensor, ...]:
    """Returns ``(du, ddelta, dA, dB, dC, dD, dz, ddelta_bias, dh0)`` as in the backend contract."""
    _check_input(u)
    batch, dim, L = u.shape
    groups, d_state = B.shape[1], B.shape[2]
    n_chunks = triton.cdiv(L, chunk_size)
    if checkpoints.shape != (batch, dim, n_chunks, d_state):
        raise ValueError(
            f"checkpoints must have shape {(batch, dim, n_chunks, d_state)}, got {checkpoints.shape}"
        )
    if z is not None and dout is not None and y_pregate is None:
        raise ValueError("y_pregate (saved by scan_forward) is required for the gradient through z")
    A = A.contiguous()
    B, C = _launch_B_C(B, C)
    dh_T = dh_T.contiguous() if dh_T is not None else None

    tile, max_block_n, num_warps = (
        (DETERMINISTIC_BACKWARD_TILE, DETERMINISTIC_BACKWARD_BLOCK_N, DETERMINISTIC_BACKWARD_NUM_WARPS)
        if deterministic
        else (BACKWARD_TILE, BACKWARD_BLOCK_N, BACKWARD_NUM_WARPS)
    )
    block_t = triton.next_power_of_2(chunk_size)
    block_n = min(triton.next_power_of_2(d_state), max_block_n, max(1, tile // block_t))
    block_d = _channel_block(dim, groups, tile // (block_n * block_t))
    n_d_blocks, n_n_blocks = triton.cdiv(dim, block_d), triton.cdiv(d_state, block_n)
    atomic_bc = not deterministic and n_d_blocks > groups
    atomic_du = not deterministic and n_n_blocks > 1

    kw = {"dtype": torch.float32, "device": u.device}
    du_parts = 1 if atomic_du else n_n_blocks
    bc_rows = groups if atomic_bc else n_d_blocks
    # outputs; an atomic sum accumulates into its output directly, so it starts from zero
    du = (torch.zeros if atomic_du else torch.empty)((batch, dim, L), **kw)
    ddelta = torch.zeros_like(du) if atomic_du else torch.empty_like(du)
    dB = (torch.zeros if atomic_bc else torch.empty)((batch, groups, d_state, L), **kw)
    dC = torch.zeros_like(dB) if atomic_bc else torch.empty_like(dB)
    dA = torch.empty((batch, dim, d_state), **kw)
    dD = torch.empty((batch, dim), **kw) if D is not None and dout is not None else None
    dz = torch.empty((batch, dim, L), dtype=z.dtype, device=u.device) if z is not None else None
    dh0 = torch.empty((batch, dim, d_state), **kw) if initial_state is not None else None

    # Per-program partials (deterministic mode) take (du_parts * dim + bc_rows * N) * L floats per sample,
    # twice over: they are made for as many samples at a time as PARTIAL_SUM_BYTES holds, then summed.
    partial_floats = (du_parts if du_parts > 1 else 0) * dim + (bc_rows if bc_rows != groups else 0) * d_state
    samples = max(1, PARTIAL_SUM_BYTES // max(1, 8 * partial_floats * L)) if partial_floats else batch
    for b0 in range(0, batch, samples):
        rows = slice(b0, min(batch, b0 + samples))
        n = rows.stop - rows.start
        du_part = du[rows][None] if du_parts == 1 else torch.empty((du_parts, n, dim, L), **kw)
        ddelta_part = ddelta[rows][None] if du_parts == 1 else torch.empty_like(du_part)
        dB_part = dB[rows] if bc_rows == groups else torch.empty((n, bc_rows, d_state, L), **kw)
        dC_part = dC[rows] if bc_rows == groups else torch.empty_like(dB_part)
        u_s, delta_s, z_s, dout_s, dh_T_s, dA_s, dD_s, dz_s, dh0_s = [
            x[rows] if x is not None else None for x in (u, delta, z, dout, dh_T, dA, dD, dz, dh0)
        ]
        grid = _grid(n, n_d_blocks, n_n_blocks)
        _scan_bwd_kernel[grid](
            u_s, delta_s, A, B[rows], C[rows], D if D is not None else A, z_s if z is not None else u_s,
            delta_bias if delta_bias is not None else A, dout_s if dout is not None else u_s,
            dh_T_s if dh_T is not None else dA_s, checkpoints[rows],
            y_pregate[rows] if y_pregate is not None else u_s,
            du_part, ddelta_part, dA_s, dB_part, dC_part, dD_s if dD is not None else dA_s,
            dz_s if dz is not None else du_part, dh0_s if dh0 is not None else dA_s,
            dim, L, d_state, chunk_size, n_chunks, dim // groups, n_d_blocks, n * dim * L,
            *u_s.stride(), *delta_s.stride(), *_strides(z_s, 3), *_strides(dout_s, 3),
            *B.stride(), *C.stride(),
            HAS_D=D is not None, HAS_Z=z is not None, HAS_BIAS=delta_bias is not None,
            SOFTPLUS=delta_softplus, HAS_DOUT=dout is not None, HAS_DHT=dh_T is not None,
            HAS_H0=initial_state is not None, ATOMIC_BC=atomic_bc, ATOMIC_DU=atomic_du,
            USE_FLIP=REVERSE_SCAN_WITH_FLIP, CHANNELS_FIRST=CHANNEL_BLOCKS_FIRST, BLOCK_D=block_d,
            BLOCK_N=block_n, BLOCK_T=block_t, num_warps=num_warps, maxnreg=BACKWARD_MAX_REGISTERS,
        )  # fmt: skip
        # fixed-order sums of the per-program partials
        if du_parts > 1:
            torch.sum(du_part, 0, out=du[rows])
            torch.sum(ddelta_part, 0, out=ddelta[rows])
        if bc_rows != groups:
            torch.sum(dB_part.view(n, groups, bc_rows // groups, d_state, L), 2, out=dB[rows])
            torch.sum(dC_part.view(n, groups, bc_rows // groups, d_state, L), 2, out=dC[rows])

    ddelta_bias = ddelta.sum((0, 2)) if delta_bias is not None else None
    if D is not None:
        dD = dD.sum(0) if dD is not None else torch.zeros_like(D, dtype=torch.float32)
    if z is not None and dout is None:
        dz.zero_()
    return (
        du.to(u.dtype), ddelta.to(delta.dtype), dA.sum(0), dB, dC, dD, dz, ddelta_bias, dh0,
    )  # fmt: skip
