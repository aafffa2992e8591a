"""benchmarks/bench_scan.py still runs end to end and writes the table it documents (no timing is checked)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_bench_scan_writes_a_row_per_backend_and_mode(tmp_path: Path) -> None:
    out = tmp_path / "scan.json"
    command = [sys.executable, str(ROOT / "benchmarks" / "bench_scan.py"), "--threads", "1", "--reps", "2"]
    command += ["--shapes", "2,8,5,3", "--out", str(out)]
    subprocess.run(command, check=True, capture_output=True, text=True)
    result = json.loads(out.read_text())
    rows = {(row["backend"], row["mode"]): row for row in result["results"]}
    backends = ("reference", "torch", "numba")
    assert set(rows) == {(backend, mode) for backend in backends for mode in ("fwd", "fwdbwd")}
    for row in rows.values():
        assert row["median_ms"] > 0 and row["min_ms"] <= row["median_ms"]
        assert row["peak_extra_mb"] is not None and row["speedup_vs_reference"] > 0
        assert row["layout"] == "time-major"
    assert result["environment"]["threads"] == 1
