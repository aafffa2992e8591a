"""The numba backend's fixed costs: JIT compilation, the on-disk cache, and the threading layers.

    python benchmarks/bench_numba.py --out docs/benchmarks/numba_cpu.json

Every measurement runs in a fresh process (numba compiles once per process and keeps the result):

- **compile**: the first forward+backward call with an empty cache folder (the JIT compiles every kernel
  the call needs, and writes them to the cache), the same call once more in that process, then the first
  call of a new process with that cache warm (numba loads the kernels from disk).
- **threads**: forward+backward at ``--shape`` with numba's OpenMP threading layer (the backend's first
  choice where the machine has an OpenMP runtime, see kernels/arcee_scan/numba_scan.py) and with its
  workqueue layer (the fallback, no runtime needed), at 1 and 2 threads; medians of ``--reps`` calls after
  a warm-up.
- **start-up** (``--startup N``): ``train_scripts/train_fm.py --max_train_steps 30 --final_eval none``
  (the README's main job, cut short) with an empty cache, with and without the background compile
  (``$ARCEE_SCAN_BACKGROUND_COMPILE=0``), alternating, N runs each: seconds from start to exit.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
TRAIN_FM = os.path.join(os.path.dirname(HERE), "train_scripts", "train_fm.py")
PROBE = """
import json, statistics, sys, time
start = time.perf_counter()
import torch
from bench_scan import make_inputs, parse_shape, run_once
import arcee_scan.numba_scan
import numba
imported = time.perf_counter() - start
shape, threads, reps = parse_shape(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3])
torch.set_num_threads(threads)
inputs = make_inputs(shape, torch.float32, "cpu")
calls = []
for _ in range(reps + 1):
    start = time.perf_counter()
    run_once(inputs, "numba", "fwdbwd")
    calls.append(time.perf_counter() - start)
print(json.dumps({"import_s": imported, "first_call_s": calls[0], "second_call_s": calls[1],
                  "median_ms": 1e3 * statistics.median(calls[1:]), "layer": numba.threading_layer(),
                  "numba_threads": numba.get_num_threads()}))
"""


def probe(shape: str, threads: int, reps: int, env: dict) -> dict:
    command = [sys.executable, "-c", PROBE, shape, str(threads), str(reps)]
    done = subprocess.run(command, capture_output=True, text=True, env={**os.environ, **env}, cwd=HERE)
    if done.returncode != 0:
        return {"error": (done.stderr.strip().splitlines() or ["failed"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def startup(background: bool, env: dict) -> float | None:
    """Seconds of a 30-step main job from an empty cache, the background compile on or off."""
    with tempfile.TemporaryDirectory() as cache, tempfile.TemporaryDirectory() as output:
        run_env = {**os.environ, **env, "ARCEE_SCAN_CACHE_DIR": cache}
        run_env["ARCEE_SCAN_BACKGROUND_COMPILE"] = "1" if background else "0"
        command = [
            sys.executable,
            TRAIN_FM,
            "--output_dir",
            output,
            "--max_train_steps",
            "30",
            "--final_eval",
            "none",
        ]
        start = time.perf_counter()
        done = subprocess.run(command, capture_output=True, env=run_env)
        return time.perf_counter() - start if done.returncode == 0 else None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--compile-shape", default="2,24,40,16", help="batch,dim,L,N of the compile probe")
    parser.add_argument("--shape", default="32,128,256,16", help="batch,dim,L,N of the threading probe")
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--startup", type=int, default=0, help="runs of the start-up probe, each way")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    args = parser.parse_args()
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [HERE, os.environ.get("PYTHONPATH")]))}

    with tempfile.TemporaryDirectory() as cache:
        cache_env = {**env, "ARCEE_SCAN_CACHE_DIR": cache}
        cold = probe(args.compile_shape, 1, 1, cache_env)
        warm = probe(args.compile_shape, 1, 1, cache_env)
    compile_rows = [
        {"case": "empty cache: first call (JIT compile)", "seconds": cold.get("first_call_s")},
        {"case": "empty cache: second call", "seconds": cold.get("second_call_s")},
        {"case": "new process, warm cache: first call", "seconds": warm.get("first_call_s")},
        {"case": "new process: import torch + arcee_scan + numba", "seconds": warm.get("import_s")},
    ]
    print(f"compile ({args.compile_shape}, forward + backward, float32)")
    for row in compile_rows:
        seconds = row["seconds"]
        print(
            f"  {row['case']:<48} {seconds:8.3f} s" if seconds is not None else f"  {row['case']:<48} failed"
        )

    thread_rows = []
    print(f"\nthreads ({args.shape}, forward + backward, median of {args.reps})")
    for layer in ("workqueue", "omp"):
        for threads in (1, 2):
            result = probe(args.shape, threads, args.reps, {**env, "NUMBA_THREADING_LAYER": layer})
            thread_rows.append({"layer": layer, "threads": threads, **result})
            if "error" in result:
                print(f"  {layer:<10} {threads} thread(s): unavailable ({result['error'][:70]})")
            else:
                print(f"  {layer:<10} {threads} thread(s): {result['median_ms']:8.2f} ms")

    startup_rows = []
    if args.startup:
        print(f"\nstart-up (train_fm.py, 30 steps, empty cache; {args.startup} runs each way, alternating)")
        for run in range(args.startup):
            for background in (False, True):
                seconds = startup(background, env)
                startup_rows.append({"run": run, "background_compile": background, "seconds": seconds})
                shown = f"{seconds:8.1f} s" if seconds is not None else "  failed"
                print(f"  background compile {'on ' if background else 'off'}: {shown}")

    if args.out:
        environment = {
            "python": platform.python_version(),
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
        }
        result = {
            "environment": environment,
            "command": " ".join(sys.argv),
            "compile": {"shape": args.compile_shape, "cold": cold, "warm": warm, "rows": compile_rows},
            "threads": {"shape": args.shape, "rows": thread_rows},
            "startup": startup_rows,
            "time": time.strftime("%Y-%m-%d %H:%M:%S"),
        }
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
