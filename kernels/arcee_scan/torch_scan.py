"""Eager PyTorch backend: chunked selective scan with a hand-written, checkpointed backward.

The sequence is cut into chunks of ``chunk_size`` steps. Per chunk, everything that does not depend on the
state (the decays ``exp(delta*A)``, the inputs ``delta*u*B``, ``C*dy``) is computed for the whole chunk in
one vectorised op into preallocated buffers; only the first-order recurrences loop over time, one in-place
``addcmul`` per step on a contiguous slice. The reductions over N or over a group's channels
(``y = C.h``, ``dB``, ``dC``, ``S``, ``dA``) are batched matrix products; ``sum_n A g a h`` is a
multiply-then-sum pass.

The forward keeps only the state entering each chunk (``checkpoints``); the backward walks the chunks in
reverse, rebuilds the chunk's states from its checkpoint and runs the adjoint recurrence
``g_t = C_t dy_t + a_{t+1} g_{t+1}``. Extra memory is O(batch*dim*N*L/chunk) plus the chunk buffers.

Layout: chunk buffers are ``(k, batch, groups, N, channels_per_group)``, channels innermost. Every product
then runs an inner loop over the channels with contiguous operands (B/C/dy broadcast as scalars), which is
several times faster on CPU than an inner loop over a small N. Channels are processed in blocks sized so
the buffers stay in cache; the CPU speed drops sharply once they outgrow it. Each eager op also costs a few
microseconds of overhead, so fewer, larger blocks win where they fit (see ``default_chunk_size``).
"""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Callable, Iterator

import torch
import torch.nn.functional as F
from torch import Tensor

from .reference import SOFTPLUS_THRESHOLD, biased_delta, compute_dtype, softplus

__all__ = ["default_chunk_size", "scan_backward", "scan_forward"]

# Elements of one chunk buffer per channel block (three are live in the backward, 6 MB in fp32). Measured on
# a 2-core x86 VM (2 MB L2): 2**18..2**19 is fastest at large shapes; smaller blocks pay more per-op
# overhead, larger ones fall out of cache.
CPU_BLOCK_ELEMENTS = 2**19
CUDA_BLOCK_ELEMENTS = 2**26


def default_chunk_size(batch: int, dim: int, d_state: int, device: torch.device) -> int:
    """16 steps, or 8 where halving the chunk lets one block hold every channel.

    Splitting the channels into blocks multiplies the number of ops, and at a few microseconds of overhead
    each that costs more than twice as many checkpoints: at (2, 384, 128, 64) on CPU, 8 is ~6% faster.
    """
    per_step = batch * dim * d_state
    if device.type == "cpu" and 8 * per_step <= CPU_BLOCK_ELEMENTS < 16 * per_step:
        return 8
    return 16


@contextlib.contextmanager
def flush_denormals(device: torch.device) -> Iterator[None]:
    """Flush denormals to zero on CPU for the duration of the op.

    Products of decays underflow through the denormal range, which is ~10x slower on x86. torch has no
    getter for the flag, so the previous setting is probed: a denormal product reads back as 0 when on.
    """
    if device.type != "cpu":
        yield
        return
    probe = torch.tensor([1e-30], dtype=torch.float32) * 1e-9
    was_on = bool(probe.item() == 0.0)
    if not torch.set_flush_denormal(True):
        yield
        return
    try:
        yield
    finally:
        torch.set_flush_denormal(was_on)


def _channel_blocks(
    batch: int, dim: int, groups: int, d_state: int, chunk_size: int, budget: int
) -> list[tuple[int, int, int, int]]:
    """Split the channels into ``(c0, c1, g0, g1)`` blocks that either hold whole groups or lie inside one.

    Within a block the B/C view is then ``B[:, g0:g1]`` with ``(c1 - c0) // (g1 - g0)`` channels per group.
    Blocks hold at most ``budget`` elements per chunk buffer.
    """
    per_group = dim // groups
    channels = max(1, budget // (batch * d_state * chunk_size))
    if channels >= per_group:
        step = min(groups, channels // per_group)
        ends = [min(g0 + step, groups) for g0 in range(0, groups, step)]
        return [(g0 * per_group, g1 * per_group, g0, g1) for g0, g1 in zip(range(0, groups, step), ends)]
    # split every group into ceil(per_group / channels) parts of about equal size
    size = math.ceil(per_group / math.ceil(per_group / channels))
    return [
        (g * per_group + e0, g * per_group + min(e0 + size, per_group), g, g + 1)
        for g in range(groups)
        for e0 in range(0, per_group, size)
    ]


def _time_major(x: Tensor, dtype: torch.dtype) -> Tensor:
    """(batch, channels..., L) -> contiguous (L, batch, channels...): a chunk is then a contiguous slice."""
    return x.to(dtype).movedim(-1, 0).contiguous()


class _Inputs:
    """The step-independent inputs in compute dtype and time-major layout, shared by forward and backward."""

    def __init__(self, u, delta, A, B, C, delta_bias, delta_softplus: bool, dtype: torch.dtype):
        self.delta_raw = biased_delta(delta, delta_bias, dtype)
        self.delta = softplus(self.delta_raw) if delta_softplus else self.delta_raw
        self.u = u.to(dtype)
        self.A_T = A.to(dtype).t().contiguous()  # (N, d)
        self.A_log2_T = self.A_T * math.log2(math.e)
        self.delta_tm = _time_major(self.delta, dtype)  # (L, b, d)
        self.delta_u_tm = torch.empty_like(self.delta_tm)  # (L, b, d)
        torch.mul(self.delta, self.u, out=self.delta_u_tm.permute(1, 2, 0))
        self.B_tm = _time_major(B, dtype)  # (L, b, G, N)
        self.C_tm = _time_major(C, dtype)  # (L, b, G, N)


class _Block:
    """Views of one channel block, time-major with channels innermost: ``(L, b, g, ., e)``.

    ``g`` groups of ``e`` channels; chunk ``i`` is the ``i``-th slice of ``chunk_size`` steps of the leading
    dim. Per-channel values are ``(., 1, e)`` rows and per-state values (B, C) ``(N, 1)`` columns or
    ``(1, N)`` rows, so products with the ``(k, b, g, N, e)`` chunk buffers broadcast cheaply and reductions
    are batched matrix products. The time-major inputs are held as tuples of per-chunk views, made once:
    slicing them per chunk would cost more than the arithmetic at small shapes.
    """

    def __init__(self, block: tuple[int, int, int, int], inputs: _Inputs, chunk_size: int):
        self.c0, self.c1, g0, g1 = block
        self.chunk_size = chunk_size
        self.batch = inputs.delta_tm.shape[1]
        self.groups = g1 - g0
        self.per_group = (self.c1 - self.c0) // self.groups
        self.d_state = inputs.A_T.shape[0]
        self.delta = self.channels(inputs.delta_tm)
        self.delta_u = self.channels(inputs.delta_u_tm)
        self.A = self.per_channel_state(inputs.A_T)
        self.A_log2 = self.per_channel_state(inputs.A_log2_T)
        B, C = inputs.B_tm[:, :, g0:g1], inputs.C_tm[:, :, g0:g1]  # (L, b, g, N)
        self.B_col, self.B_row = self.chunks(B[..., None]), self.chunks(B[..., None, :])  # (N, 1), (1, N)
        self.C_col, self.C_row = self.chunks(C[..., None]), self.chunks(C[..., None, :])

    def chunks(self, x: Tensor) -> tuple[Tensor, ...]:
        return x.split(self.chunk_size)

    def channels(self, x_tm: Tensor) -> tuple[Tensor, ...]:
        """(L, b, d) -> per chunk (k, b, g, 1, e)."""
        return self.chunks(x_tm[:, :, self.c0 : self.c1].view(-1, self.batch, self.groups, 1, self.per_group))

    def per_channel_state(self, x_T: Tensor) -> Tensor:
        """(N, d) -> (g, N, e)."""
        return x_T[:, self.c0 : self.c1].view(self.d_state, self.groups, self.per_group).transpose(0, 1)

    def state(self, x: Tensor) -> Tensor:
        """(b, d, N) -> (b, g, N, e)."""
        return x[:, self.c0 : self.c1].view(self.batch, self.groups, self.per_group, -1).transpose(-1, -2)

    def checkpoints(self, checkpoints: Tensor) -> Tensor:
        """The contract's (b, d, n_chunks, N) tensor -> this block's (n_chunks, b, g, N, e) view.

        The checkpoints are private to this backend (only its own backward reads them), so the memory of the
        contiguous (b, d, n_chunks, N) tensor holds them as (n_chunks, b, N, d), channels innermost like the
        chunk buffers: storing and reading one is then a plain strided copy, not a transpose.
        """
        batch, dim, n_chunks, d_state = checkpoints.shape
        channels_last = checkpoints.view(-1).view(n_chunks, batch, d_state, dim)
        per_group = channels_last[..., self.c0 : self.c1].unflatten(-1, (self.groups, self.per_group))
        return per_group.transpose(2, 3)

    def buffer(self, flat: Tensor, steps: int) -> Tensor:
        shape = (steps, self.batch, self.groups, self.d_state, self.per_group)
        return flat[: math.prod(shape)].view(shape)

    def fill_decay_and_input(self, index: int, decay: Tensor, states: Tensor) -> None:
        """decay <- exp(delta A), states <- delta u B for every step of the chunk.

        exp2 because torch's exp takes a ~30x slower path for arguments below about -87 (denormal or zero
        results), which is where large-N decays live; exp2 has no such path.
        """
        torch.mul(self.delta[index], self.A_log2, out=decay).exp2_()
        torch.mul(self.delta_u[index], self.B_col[index], out=states)


class _ChunkBuffers:
    """A block's chunk buffers for chunks of ``steps`` steps, whole and as per-step views.

    The buffers are the same memory for every chunk of the block, so the per-step views (one ``select`` per
    step and buffer, which at small shapes costs as much as the arithmetic) are made once, not per chunk.
    """

    def __init__(self, block: _Block, flats: list[Tensor], steps: int):
        self.whole = [block.buffer(flat, steps) for flat in flats]
        self.steps = [buffer.unbind(0) for buffer in self.whole]

    @staticmethod
    def by_length(
        block: _Block, flats: list[Tensor], chunk_size: int, length: int
    ) -> dict[int, _ChunkBuffers]:
        lengths = {min(chunk_size, length), length % chunk_size or chunk_size}
        return {steps: _ChunkBuffers(block, flats, steps) for steps in lengths}


def _run_recurrence(states: tuple[Tensor, ...], decay: tuple[Tensor, ...], h: Tensor) -> None:
    """states holds b_t on entry and h_t = a_t h_{t-1} + b_t on exit; h is the state entering the chunk."""
    for state, a in zip(states, decay):
        state.addcmul_(a, h)
        h = state


_cpu_workspace = threading.local()


def _chunk_buffers(count: int, size: int, like: Tensor) -> list[Tensor]:
    """``count`` flat scratch buffers of ``size`` elements, for the calling thread.

    On CPU they are views of a per-thread workspace kept between calls: a few MB freshly allocated per call
    come back from the OS as new pages, and first-touch page faults cost more than the scan's own arithmetic
    at small shapes. (CUDA's caching allocator already reuses memory.)
    """
    if like.device.type != "cpu":
        return [like.new_empty(size) for _ in range(count)]
    if not hasattr(_cpu_workspace, "by_dtype"):
        _cpu_workspace.by_dtype = {}
    workspaces = _cpu_workspace.by_dtype
    workspace = workspaces.get(like.dtype)
    if workspace is None or workspace.numel() < count * size:
        with torch.inference_mode(False):  # usable inside and outside inference mode
            workspace = workspaces[like.dtype] = torch.empty(count * size, dtype=like.dtype)
    return [workspace[i * size : (i + 1) * size] for i in range(count)]


class _Plan:
    """The channel blocks of one call and the size of their chunk buffers."""

    def __init__(self, inputs: _Inputs, groups: int, chunk_size: int):
        self.length, batch, dim = inputs.delta_tm.shape
        d_state = inputs.A_T.shape[0]
        self.chunk_size = chunk_size
        self.n_chunks = math.ceil(self.length / chunk_size)
        self.device = inputs.u.device
        budget = CPU_BLOCK_ELEMENTS if self.device.type == "cpu" else CUDA_BLOCK_ELEMENTS
        steps = min(chunk_size, self.length)
        self.blocks = _channel_blocks(batch, dim, groups, d_state, steps, budget)
        self.buffer_size = steps * batch * d_state * max(c1 - c0 for c0, c1, _, _ in self.blocks)

    def chunk_lengths(self) -> list[int]:
        """Steps in each chunk: ``chunk_size``, the last one possibly fewer."""
        return [min(self.chunk_size, self.length - t0) for t0 in range(0, self.length, self.chunk_size)]

    def run(self, run_block: Callable[[_Block], object], inputs: _Inputs) -> list:
        """``run_block`` on every block, in order, with denormals flushed."""
        with flush_denormals(self.device):
            return [run_block(_Block(spec, inputs, self.chunk_size)) for spec in self.blocks]


class _ForwardPass:
    """Fills ``y_tm``, ``h_final`` and ``checkpoints`` one channel block at a time."""

    def __init__(self, inputs: _Inputs, plan: _Plan, initial_state: Tensor | None):
        self.inputs, self.plan, self.initial_state = inputs, plan, initial_state
        length, batch, dim = inputs.delta_tm.shape
        d_state = inputs.A_T.shape[0]
        self.y_tm = inputs.u.new_empty(length, batch, dim)
        self.h_final = inputs.u.new_empty(batch, dim, d_state)
        self.checkpoints = inputs.u.new_empty(batch, dim, plan.n_chunks, d_state)

    def run_block(self, block: _Block) -> None:
        plan = self.plan
        buffers = _ChunkBuffers.by_length(
            block, _chunk_buffers(2, plan.buffer_size, self.inputs.u), plan.chunk_size, plan.length
        )
        block_checkpoints = block.checkpoints(self.checkpoints)
        y_block = block.channels(self.y_tm)
        h = block.state(self.initial_state) if self.initial_state is not None else None
        for index, steps in enumerate(plan.chunk_lengths()):
            chunk = buffers[steps]
            (decay, states), (decay_steps, state_steps) = chunk.whole, chunk.steps
            h_in = block_checkpoints[index]
            if h is None:
                h_in.zero_()
            else:
                h_in.copy_(h)
            block.fill_decay_and_input(index, decay, states)
            _run_recurrence(state_steps, decay_steps, h_in)
            h = states[-1]
            torch.matmul(block.C_row[index], states, out=y_block[index])  # y_t = sum_n C_t[n] h_t[n]
        block.state(self.h_final).copy_(h)


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
    """See the backend contract in kernels/arcee_scan/interface.py."""
    dtype = compute_dtype(u)
    with torch.no_grad():
        inputs = _Inputs(u, delta, A, B, C, delta_bias, delta_softplus, dtype)
        plan = _Plan(inputs, B.shape[1], chunk_size)
        forward = _ForwardPass(inputs, plan, initial_state)
        plan.run(forward.run_block, inputs)

        y_scan = forward.y_tm.permute(1, 2, 0)  # (b, d, L) view
        y = inputs.u.new_empty(y_scan.shape)  # contiguous, as the op's fake promises
        if D is None:
            y.copy_(y_scan)
        else:
            torch.addcmul(y_scan, inputs.u, D.to(dtype)[:, None], out=y)
        y_pregate = None
        out = y
        if z is not None:
            y_pregate = y
            out = torch.mul(y, F.silu(z.to(dtype)), out=torch.empty_like(y))  # contiguous, like y
    return out.to(u.dtype), forward.h_final, forward.checkpoints, y_pregate


class _BackwardPass:
    """Walks each channel block's chunks in reverse: recompute the states, run the adjoint, reduce.

    Blocks write disjoint channels of ``S_tm``, ``ddelta_state_tm``, ``dA_T`` and ``dh0``. dB and dC sum over
    a group's channels, which a block may share with others, so each block returns its part and the caller
    adds the parts up.
    """

    def __init__(self, inputs: _Inputs, plan: _Plan, dy_tm: Tensor, dh_T: Tensor | None, checkpoints: Tensor):
        self.inputs, self.plan, self.checkpoints = inputs, plan, checkpoints
        self.dy_tm, self.dh_T = dy_tm, dh_T
        length, batch, dim = inputs.delta_tm.shape
        d_state = inputs.A_T.shape[0]
        self.dA_T = torch.empty_like(inputs.A_T)
        self.S_tm = inputs.u.new_empty(length, batch, dim)  # sum_n g_t B_t
        self.ddelta_state_tm = inputs.u.new_empty(length, batch, dim)  # sum_n g_t a_t h_{t-1} A
        self.dh0 = inputs.u.new_empty(batch, dim, d_state)

    def run_block(self, block: _Block) -> tuple[Tensor, Tensor]:
        plan, inputs = self.plan, self.inputs
        buffers = _ChunkBuffers.by_length(
            block, _chunk_buffers(3, plan.buffer_size, inputs.u), plan.chunk_size, plan.length
        )
        block_checkpoints = block.checkpoints(self.checkpoints)
        dy_chunks = block.channels(self.dy_tm)  # (k, b, g, 1, e) each
        dy_cols = [dy.transpose(-1, -2) for dy in dy_chunks]  # (k, b, g, e, 1)
        delta_u_cols = [delta_u.transpose(-1, -2) for delta_u in block.delta_u]
        shape_BC = (plan.length, block.batch, block.groups, block.d_state, 1)
        dB_block, dC_block = inputs.u.new_empty(shape_BC), inputs.u.new_empty(shape_BC)
        dB_chunks, dC_chunks = block.chunks(dB_block), block.chunks(dC_block)
        S_chunks, ddelta_state_chunks = block.channels(self.S_tm), block.channels(self.ddelta_state_tm)
        dA_block = inputs.u.new_zeros(block.groups * block.d_state * block.per_group)
        ones = inputs.u.new_ones(plan.chunk_size * block.batch)
        # carry = a_{t+1} g_{t+1}: what flows into g_t from the step after it
        carry = block.state(self.dh_T) if self.dh_T is not None else None
        for index, steps in reversed(list(enumerate(plan.chunk_lengths()))):
            chunk = buffers[steps]
            (decay, states, adjoint), (decay_steps, state_steps, adjoint_steps) = chunk.whole, chunk.steps
            h_in = block_checkpoints[index]
            block.fill_decay_and_input(index, decay, states)
            _run_recurrence(state_steps, decay_steps, h_in)
            # dC = sum over the block's channels of dy h, while the states are still in cache
            torch.matmul(states, dy_cols[index], out=dC_chunks[index])

            # adjoint: g_t = C_t dy_t + a_{t+1} g_{t+1}, one in-place addcmul per step
            torch.mul(dy_chunks[index], block.C_col[index], out=adjoint)
            if carry is not None:
                adjoint_steps[-1].add_(carry)
            for step in range(steps - 2, -1, -1):
                adjoint_steps[step].addcmul_(decay_steps[step + 1], adjoint_steps[step + 1])
            # decay[t] <- a_t g_t; the first step's is what flows into the previous chunk
            decay.mul_(adjoint)
            carry = decay[0].clone()

            # dB = sum over the block's channels of g delta u; S = sum_n g B
            torch.matmul(adjoint, delta_u_cols[index], out=dB_chunks[index])
            torch.matmul(block.B_row[index], adjoint, out=S_chunks[index])

            # decay[t] <- a_t g_t h_{t-1}, from the stored states: never divide by a_t
            decay[1:].mul_(states[:-1])
            decay[0].mul_(h_in)
            # (the adjoint buffer is free from here on: it takes the products)
            torch.sum(
                torch.mul(decay, block.A, out=adjoint), -2, keepdim=True, out=ddelta_state_chunks[index]
            )
            # dA += sum over steps and batch of a_t g_t h_{t-1} delta_t, the sum as a matrix-vector product
            rows = decay.mul_(block.delta[index]).view(-1, dA_block.numel())
            dA_block.addmv_(rows.t(), ones[: rows.shape[0]])
        block.state(self.dh0).copy_(carry)
        block.per_channel_state(self.dA_T).copy_(dA_block.view(block.groups, block.d_state, block.per_group))
        return dB_block.squeeze(-1), dC_block.squeeze(-1)


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
    """See the backend contract in kernels/arcee_scan/interface.py. Always deterministic (no atomics)."""
    dtype = compute_dtype(u)
    batch, dim, length = u.shape
    groups = B.shape[1]
    with torch.no_grad():
        inputs = _Inputs(u, delta, A, B, C, delta_bias, delta_softplus, dtype)
        # gradient of the pre-gate y
        dy_tm = inputs.u.new_empty(length, batch, dim)
        dy = dy_tm.permute(1, 2, 0)  # (b, d, L) view of the time-major copy the scan reads
        dz = None
        if dout is None:
            dy.zero_()
            if z is not None:
                dz = torch.zeros_like(z)
        elif z is None:
            dy.copy_(dout)
        else:
            dout, z_c = dout.to(dtype), z.to(dtype)
            torch.mul(dout, F.silu(z_c), out=dy)
            # contiguous whatever z's strides, as the op's fake promises
            dz = torch.ops.aten.silu_backward(dout * y_pregate, z_c).to(
                z.dtype, memory_format=torch.contiguous_format
            )

        if not checkpoints.is_contiguous():  # its memory is read in this backend's own order
            raise ValueError("checkpoints must be the contiguous tensor this backend's scan_forward returned")
        plan = _Plan(inputs, groups, chunk_size)
        backward = _BackwardPass(inputs, plan, dy_tm, dh_T, checkpoints)
        dB_tm = inputs.B_tm.new_zeros(inputs.B_tm.shape)  # (L, b, G, N)
        dC_tm = inputs.C_tm.new_zeros(inputs.C_tm.shape)
        for (_, _, g0, g1), (dB_block, dC_block) in zip(plan.blocks, plan.run(backward.run_block, inputs)):
            dB_tm[:, :, g0:g1] += dB_block
            dC_tm[:, :, g0:g1] += dC_block

        S = backward.S_tm.permute(1, 2, 0)
        # out= keeps the gradients contiguous whatever the inputs' strides, as the op's fake promises
        du = torch.mul(inputs.delta, S, out=inputs.u.new_empty(batch, dim, length))
        ddelta_state = backward.ddelta_state_tm.permute(1, 2, 0)
        ddelta = torch.addcmul(ddelta_state, inputs.u, S, out=inputs.u.new_empty(batch, dim, length))
        dD = None
        if D is not None:
            du.addcmul_(dy, D.to(dtype)[:, None])
            dD = (dy * inputs.u).sum((0, 2))
        if delta_softplus:
            # torch's softplus is linear above the threshold, so its derivative is exactly 1 there
            raw = inputs.delta_raw
            ddelta.mul_(torch.sigmoid(raw).masked_fill_(raw > SOFTPLUS_THRESHOLD, 1.0))
        ddelta_bias = None if delta_bias is None else ddelta.sum((0, 2))
    return (
        du.to(u.dtype),
        ddelta.to(delta.dtype),
        backward.dA_T.t().contiguous(),
        dB_tm.permute(1, 2, 3, 0).contiguous(),
        dC_tm.permute(1, 2, 3, 0).contiguous(),
        dD,
        dz,
        ddelta_bias,
        None if initial_state is None else backward.dh0,
    )
