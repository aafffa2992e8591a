"""What is particular to the eager "torch" backend: its channel blocks, chunk default and checkpoint layout
(the shared grid against the reference is in test_cpu_backends.py)."""

from __future__ import annotations

import pytest
import torch
from scan_testing import assert_all_close, detached_copy, make_inputs, outputs_and_grads

from arcee_scan import torch_scan


@pytest.mark.parametrize("groups", [None, 2])
@pytest.mark.parametrize(
    "budget",
    [3 * 2 * 4 * 4, 7 * 2 * 4 * 4, 2**26],
    ids=["blocks-inside-groups", "whole-groups", "one-block"],
)
def test_channel_blocks(monkeypatch, groups, budget):
    # small budgets force channel blocks smaller than a group (with a short remainder block) or blocks of
    # whole groups; a huge one (the CUDA setting) makes one block of every channel
    monkeypatch.setattr(torch_scan, "CPU_BLOCK_ELEMENTS", budget)
    inputs = make_inputs(2, 14, 11, 4, groups)
    expected = outputs_and_grads(detached_copy(inputs), "reference", chunk_size=4)
    assert_all_close(outputs_and_grads(inputs, "torch", chunk_size=4), expected, 1e-4, 1e-5)


def test_default_chunk_size_keeps_all_channels_in_one_block():
    cpu, meta = torch.device("cpu"), torch.device("meta")
    # (2, 384, ., 64): 16 steps of every channel exceed the CPU block budget, 8 fit
    assert torch_scan.default_chunk_size(2, 384, 64, cpu) == 8
    assert torch_scan._channel_blocks(2, 384, 1, 64, 8, torch_scan.CPU_BLOCK_ELEMENTS) == [(0, 384, 0, 1)]
    assert torch_scan.default_chunk_size(2, 192, 16, cpu) == 16  # 16 steps fit already
    assert torch_scan.default_chunk_size(2, 1536, 256, cpu) == 16  # not even 8 fit: split channels instead
    assert torch_scan.default_chunk_size(2, 384, 64, meta) == 16  # off CPU one block holds everything


def test_default_chunk_size_reaches_the_op(monkeypatch):
    seen = []

    def spy(*args):
        seen.append(args[-1])
        return scan_forward(*args)

    scan_forward = torch_scan.scan_forward
    monkeypatch.setattr(torch_scan, "scan_forward", spy)
    outputs_and_grads(make_inputs(2, 384, 17, 64), "torch")
    outputs_and_grads(make_inputs(2, 24, 17, 4), "torch")
    assert seen == [8, 16]


def test_backward_refuses_checkpoints_in_another_layout():
    inputs = {k: v.detach() for k, v in make_inputs(2, 4, 6, 2, 1).items() if isinstance(v, torch.Tensor)}
    names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias")
    out, h_T, checkpoints, y_pregate = torch_scan.scan_forward(
        *(inputs[name] for name in names), True, inputs["initial_state"], 4
    )
    transposed = checkpoints.transpose(0, 1).contiguous().transpose(0, 1)  # same values, other memory order
    with pytest.raises(ValueError, match="checkpoints must be the contiguous tensor"):
        torch_scan.scan_backward(
            out, h_T, *(inputs[name] for name in names), True, inputs["initial_state"], transposed,
            y_pregate, 4, False,
        )  # fmt: skip
