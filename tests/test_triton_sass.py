"""benchmarks/triton_sass.py still captures both launches and reads their machine code (no GPU needed)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "triton_sass.py"
ENV = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}


def run_report(*args: str) -> subprocess.CompletedProcess:
    command = [
        sys.executable,
        str(SCRIPT),
        "--shape",
        "3,64,40,16",
        "--dtype",
        "float32",
        *args,
    ]  # later flags win
    return subprocess.run(command, env=ENV, capture_output=True, text=True, timeout=600)


def test_reports_both_kernels_as_launched(tmp_path: Path) -> None:
    out = tmp_path / "sass.json"
    settings = ["BACKWARD_BLOCK_N=8", "BACKWARD_MAX_REGISTERS=96"]
    result = run_report("--set", *settings, "--out", str(out), "--sass-dir", str(tmp_path))
    assert result.returncode == 0, result.stderr[-4000:]
    kernels = json.loads(out.read_text())["kernels"]
    forward, backward = kernels["scan_fwd_kernel"], kernels["scan_bwd_kernel"]
    assert forward["constexprs"]["BLOCK_N"] == 16 and backward["constexprs"]["BLOCK_N"] == 8  # --set applied
    assert forward["max_registers"] is None and backward["max_registers"] == 96 >= backward["registers"]
    assert forward["grid"][0] == backward["grid"][0] == 3  # the sample axis first, by default
    for kernel in (forward, backward):
        assert 0 < kernel["registers"] <= 255 and 0 < kernel["warps_per_sm"] <= 64
        assert kernel["instructions"] == sum(kernel["mix"].values()) > kernel["loop_instructions"] > 0
        assert "MUFU" in kernel["mix"]  # exp2 lowered to the hardware's approximate instruction
    assert backward["constexprs"]["ATOMIC_BC"] and backward["mix"].get("REDG", 0) > 0  # atomic adds
    tile = forward["constexprs"]["BLOCK_D"] * forward["constexprs"]["BLOCK_N"]
    assert forward["loop_mix"]["MUFU"] >= tile / 32  # the step loop: an exp per state element and thread
    assert (tmp_path / "scan_bwd_kernel.sass").read_text().count("MUFU") == backward["mix"]["MUFU"]


def test_float32_b_c_shortens_the_forward_step(tmp_path: Path) -> None:
    # bf16 B/C loaded as 8 halves per thread reach the state tile's 4-per-thread layout through lane
    # shuffles; fp32 copies load straight into it (triton_scan.FLOAT32_B_C)
    steps = {}
    for setting in ("FLOAT32_B_C=0", "FLOAT32_B_C=1"):
        out = tmp_path / f"{setting}.json"
        result = run_report(
            "--shape", "2,64,32,256", "--dtype", "bfloat16", "--set", setting, "--out", str(out)
        )
        assert result.returncode == 0, result.stderr[-4000:]
        steps[setting] = json.loads(out.read_text())["kernels"]["scan_fwd_kernel"]["loop_mix"]
    assert steps["FLOAT32_B_C=1"].get("SHFL", 0) < steps["FLOAT32_B_C=0"]["SHFL"]
    assert sum(steps["FLOAT32_B_C=1"].values()) < sum(steps["FLOAT32_B_C=0"].values())


def test_rejects_an_unknown_constant() -> None:
    result = run_report("--set", "NO_SUCH_TILE=4")
    assert result.returncode == 2 and "NAME=INT" in result.stderr
