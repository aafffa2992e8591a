"""One prepared GPU session for the scan: environment, reverse-scan probe, CUDA tests, benchmarks.

Run through ``benchmarks/device_check.sh`` (sets PYTHONPATH and $OUT). Every step is a subprocess with its own
timeout, inside an overall budget; a step that fails, crashes the CUDA context or hangs is recorded in
``$OUT/device_check.json`` (rewritten after every step) and the next step runs anyway.

    bash benchmarks/device_check.sh                        # every step, ~8 min budget
    bash benchmarks/device_check.sh --only env,probe       # a subset
    python benchmarks/device_check.py probe --out probe.json   # one step by hand

Steps that write JSON small enough to embed (env, probe) are folded into device_check.json; the benchmarks
keep their own files (the device tool returns at most 8 files from $OUT).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import signal
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import triton
import triton.language as tl

from arcee_scan.triton_scan import REVERSE_SCAN_WITH_FLIP, _reverse_affine_combine

PAPER_SHAPES = ["48,1536,256,256", "8,1536,1024,256", "48,1536,256,16"]
# Exp-unit bound of the scan (docs/benchmarks/triton.md): 16 exp/clk/SM at 1.98 GHz boost on H100 and
# H200 SXM.
EXP_PER_CLOCK_PER_SM = 16
ASSUMED_CLOCK_HZ = 1.98e9


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: int
    embed: bool = False  # fold the JSON the step writes to <tmp>/<name>.json into device_check.json
    outputs: list[str] = field(default_factory=list)


def steps(out: Path, tmp: Path) -> list[Step]:
    py = sys.executable
    me = str(Path(__file__).resolve())
    pytest = [py, "-m", "pytest", "tests/arcee_scan/test_triton_backend.py", "-q", "-p", "no:cacheprovider"]
    if importlib.util.find_spec("xdist"):
        pytest += ["-n", "8"]  # compiles the kernel variants in parallel
    bench_scan = ["benchmarks/bench_scan.py", "--device", "cuda", "--dtype", "bfloat16"]
    bench_scan += ["--shapes", *PAPER_SHAPES, "--out", str(out / "bench_scan_gpu.json")]
    bench_model = ["benchmarks/bench_model.py", "--device", "cuda", "--preset", "B/2", "--batch", "32"]
    bench_model += ["--dtype", "bf16", "--orders", "1,4", "--out", str(out / "bench_model_gpu.json")]
    bench_sampling = ["benchmarks/bench_sampling.py", "--device", "cuda"]
    bench_sampling += ["--out", str(out / "bench_sampling_gpu.json")]
    bench_zigma = ["benchmarks/bench_zigma_sampling.py", "--device", "cuda", "--calls", "3"]
    bench_zigma += ["--out", str(out / "bench_zigma_sampling_gpu.json")]
    bench_train = ["benchmarks/bench_train.py", "--device", "cuda", "--num_scan_orders", "1", "4"]
    bench_train += ["--output_json", str(out / "bench_train_gpu.json")]
    return [
        Step("env", [py, me, "env", "--out", str(tmp / "env.json")], 60, embed=True),
        Step("probe", [py, me, "probe", "--out", str(tmp / "probe.json")], 120, embed=True),
        Step("pytest_triton_cuda", pytest, 240),
        Step("bench_scan", [py, *bench_scan], 150, outputs=["bench_scan_gpu.json"]),
        Step(
            "bench_triton",
            [py, me, "bench", "--shapes", *PAPER_SHAPES, "--out", str(out / "bench_triton_gpu.json")],
            200,
            outputs=["bench_triton_gpu.json"],
        ),
        # The steps below import arcee_diffusers, hence diffusers, which the GPU image lacks: carry its
        # wheel (and safetensors/huggingface-hub if missing) as the device docs describe, or they fail alone.
        Step("bench_model", [py, *bench_model], 150, outputs=["bench_model_gpu.json"]),
        Step("bench_sampling", [py, *bench_sampling], 120, outputs=["bench_sampling_gpu.json"]),
        Step("bench_train", [py, *bench_train], 180, outputs=["bench_train_gpu.json"]),
        Step("bench_zigma_sampling", [py, *bench_zigma], 120, outputs=["bench_zigma_sampling_gpu.json"]),
    ]


def run_step(step: Step, timeout_s: float, log) -> dict:
    start = time.time()
    log.write(f"\n===== {step.name}: {' '.join(step.argv)} (timeout {timeout_s:.0f}s)\n")
    log.flush()
    proc = subprocess.Popen(
        step.argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )
    try:
        output, _ = proc.communicate(timeout=timeout_s)
        status = "ok" if proc.returncode == 0 else "failed"
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate()
        status = "timeout"
    log.write(output)
    log.flush()
    print(f"[{step.name}] {status} in {time.time() - start:.1f}s", flush=True)
    return {
        "status": status,
        "returncode": proc.returncode,
        "wall_s": round(time.time() - start, 1),
        "command": step.argv,
        "output_tail": output[-3000:],
        "outputs": step.outputs,
    }


def drive(args: argparse.Namespace) -> None:
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix="device_check_"))
    selected = steps(out, tmp)
    if args.only:
        wanted = set(args.only.split(","))
        unknown = wanted - {s.name for s in selected}
        if unknown:
            known = [s.name for s in selected]
            raise SystemExit(f"--only names unknown steps {sorted(unknown)}; known: {known}")
        selected = [s for s in selected if s.name in wanted]
    summary = {"started": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "budget_s": args.budget}
    summary["steps"] = {}
    start = time.time()
    with open(out / "device_check.log", "a") as log:
        for step in selected:
            left = args.budget - (time.time() - start)
            if left < 20:
                record = {"status": "skipped", "reason": "overall budget spent"}
            else:
                record = run_step(step, min(step.timeout_s, left), log)
            result_file = tmp / f"{step.name}.json"
            if step.embed and result_file.exists():
                record["result"] = json.loads(result_file.read_text())
            summary["steps"][step.name] = record
            summary["wall_s"] = round(time.time() - start, 1)
            (out / "device_check.json").write_text(json.dumps(summary, indent=1))
    print(json.dumps({name: rec["status"] for name, rec in summary["steps"].items()}))


# ---------------------------------------------------------------- step: env


def env_step(args: argparse.Namespace) -> None:
    info = {
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_cuda": torch.version.cuda,
        "triton": triton.__version__,
        "cuda_available": torch.cuda.is_available(),
    }
    if torch.cuda.is_available():
        props = torch.cuda.get_device_properties(0)
        info |= {
            "gpu": props.name,
            "sms": props.multi_processor_count,
            "capability": f"{props.major}.{props.minor}",
            "memory_gib": round(props.total_memory / 2**30, 1),
            "l2_mib": round(getattr(props, "L2_cache_size", 0) / 2**20, 1),
        }
    try:
        query = "name,driver_version,clocks.max.sm,clocks.max.mem,power.limit"
        command = ["nvidia-smi", f"--query-gpu={query}", "--format=csv,noheader"]
        info["nvidia_smi"] = subprocess.run(
            command, capture_output=True, text=True, timeout=20
        ).stdout.strip()
    except (OSError, subprocess.TimeoutExpired) as error:
        info["nvidia_smi"] = repr(error)
    print(json.dumps(info, indent=1))
    Path(args.out).write_text(json.dumps(info, indent=1))


# ---------------------------------------------------------------- step: probe


@triton.jit
def _reverse_scan_probe_kernel(
    a_ptr, x_ptr, g_ptr, R0: tl.constexpr, R1: tl.constexpr, T: tl.constexpr, USE_FLIP: tl.constexpr
):
    # (R0, R1, T) tiles scanned over the last axis, like the backward kernel's (BLOCK_D, BLOCK_N, chunk)
    i0 = tl.arange(0, R0)[:, None, None]
    i1 = tl.arange(0, R1)[None, :, None]
    offs = (i0 * R1 + i1) * T + tl.arange(0, T)[None, None, :]
    a = tl.load(a_ptr + offs)
    x = tl.load(x_ptr + offs)
    ones = tl.full((R0, R1, T), 1.0, tl.float32)
    if USE_FLIP:
        flipped = (tl.flip(a, 2), ones, tl.flip(x, 2))
        _, _, g = tl.associative_scan(flipped, 2, _reverse_affine_combine)
        g = tl.flip(g, 2)
    else:
        _, _, g = tl.associative_scan((a, ones, x), 2, _reverse_affine_combine, reverse=True)
    tl.store(g_ptr + offs, g)


def probe_step(args: argparse.Namespace) -> None:
    """Does ``associative_scan(reverse=True)`` with the backward's non-commutative combine agree with
    ``tl.flip`` + forward scan, and both with a float64 loop, on this GPU and Triton version?"""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    results = []
    for shape in [(4, 16, 16), (8, 16, 16), (2, 16, 8), (1, 1, 32), (4, 16, 64), (16, 16, 4), (4, 4, 2)]:
        gen = torch.Generator().manual_seed(0)
        a = torch.rand(shape, generator=gen, dtype=torch.float64) * 0.5 + 0.5
        x = torch.randn(shape, generator=gen, dtype=torch.float64)
        expected = torch.empty_like(x)  # g_t = x_t + a_{t+1} g_{t+1}
        expected[..., -1] = x[..., -1]
        for t in range(shape[-1] - 2, -1, -1):
            expected[..., t] = x[..., t] + a[..., t + 1] * expected[..., t + 1]
        row = {"shape": shape}
        for use_flip in (True, False):
            key = "flip" if use_flip else "reverse"
            try:
                a_in, x_in, g = a.float().to(device), x.float().to(device), torch.empty(shape, device=device)
                _reverse_scan_probe_kernel[(1,)](a_in, x_in, g, *shape, USE_FLIP=use_flip)
                error = (g.double().cpu() - expected).abs().max().item()
                row[key] = {"max_abs_error": error, "ok": error < 1e-4 * (1 + expected.abs().max().item())}
            except Exception as exc:  # a compile or launch failure is itself a probe result
                row[key] = {"error": f"{type(exc).__name__}: {exc}"[:500], "ok": False}
        results.append(row)
        print(row, flush=True)
    verdict = {
        "flip_ok": all(r["flip"]["ok"] for r in results),
        "reverse_ok": all(r["reverse"]["ok"] for r in results),
        "default_uses_flip": REVERSE_SCAN_WITH_FLIP,
    }
    print(verdict)
    Path(args.out).write_text(json.dumps({"verdict": verdict, "cases": results}, indent=1))
    if not verdict["flip_ok"]:
        raise SystemExit("the default reverse scan (tl.flip) is wrong on this device")


# ---------------------------------------------------------------- step: bench


def bench_step(args: argparse.Namespace) -> None:
    """``triton.testing.do_bench`` medians of the Triton scan (default, deterministic, reverse=True) and of
    the torch backend on the same card, bf16 inputs, plus a tile sweep at ``--sweep-shapes``."""
    from bench_scan import make_inputs, parse_shape
    from triton.testing import do_bench

    from arcee_scan import selective_scan, triton_scan

    props = torch.cuda.get_device_properties(0)
    exp_peak = props.multi_processor_count * EXP_PER_CLOCK_PER_SM * ASSUMED_CLOCK_HZ
    report = {"gpu": props.name, "assumed_exp_peak_per_s": exp_peak, "dtype": "bfloat16", "shapes": []}

    def measure(inputs: dict, mode: str, **knobs) -> dict:
        leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if isinstance(v, torch.Tensor)}

        def fwd():
            with torch.no_grad():
                selective_scan(**inputs, **knobs)

        def fwd_bwd():
            y, h_T = selective_scan(**(inputs | leaves), **knobs)
            torch.autograd.backward((y, h_T), (torch.ones_like(y), torch.ones_like(h_T)))

        fn = fwd if mode == "fwd" else fwd_bwd
        fn()  # compile / warm up outside the timing and the memory peak
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        peak_mb = (torch.cuda.max_memory_allocated() - base) / 2**20
        grads = list(leaves.values())
        ms = do_bench(fn, warmup=args.warmup_ms, rep=args.rep_ms, grad_to_none=grads, return_mode="median")
        return {"ms": round(ms, 4), "peak_extra_mb": round(peak_mb, 1)}

    def guarded(label: str, *a, **kw) -> dict:
        try:
            return measure(*a, **kw)
        except Exception as exc:  # one OOM or failure must not cost the other numbers
            torch.cuda.empty_cache()
            return {"error": f"{type(exc).__name__}: {exc}"[:300], "label": label}

    variants = {
        "triton": {"backend": "triton"},
        "triton_deterministic": {"backend": "triton", "deterministic": True},
        "torch": {"backend": "torch"},
    }
    for text in args.shapes:
        shape = parse_shape(text)
        updates = shape[0] * shape[1] * shape[2] * shape[3]
        inputs = make_inputs(shape, torch.bfloat16, "cuda", "channels-first")
        entry = {"shape": shape, "state_updates": updates, "results": {}}
        for name, knobs in variants.items():
            for mode in ("fwd", "fwd_bwd"):
                if name == "triton_deterministic" and mode == "fwd":
                    continue  # the forward has no cross-program sums
                row = guarded(name, inputs, mode, **knobs)
                if "ms" in row:
                    row["g_updates_per_s"] = round(updates / row["ms"] / 1e6, 1)
                    row["fraction_of_exp_peak"] = round(updates / (row["ms"] / 1e3) / exp_peak, 3)
                entry["results"][f"{name}/{mode}"] = row
                print(shape, name, mode, row, flush=True)
        triton_scan.REVERSE_SCAN_WITH_FLIP = False
        reverse = guarded("reverse", inputs, "fwd_bwd", backend="triton")
        entry["results"]["triton_reverse_scan/fwd_bwd"] = reverse
        triton_scan.REVERSE_SCAN_WITH_FLIP = True
        report["shapes"].append(entry)
        del inputs
        torch.cuda.empty_cache()
        Path(args.out).write_text(json.dumps(report, indent=1))

    # tile sweep over the module's tile knobs, restored after each configuration
    knobs = ("FORWARD_TILE", "FORWARD_MAX_BLOCK_D", "FORWARD_NUM_WARPS", "FORWARD_MAX_REGISTERS")
    knobs += ("BACKWARD_TILE", "BACKWARD_BLOCK_N", "BACKWARD_NUM_WARPS", "BACKWARD_MAX_REGISTERS")
    knobs += ("CHANNEL_BLOCKS_FIRST", "FLOAT32_B_C")
    knobs += (
        "DETERMINISTIC_BACKWARD_TILE",
        "DETERMINISTIC_BACKWARD_BLOCK_N",
        "DETERMINISTIC_BACKWARD_NUM_WARPS",
    )
    defaults = {k: getattr(triton_scan, k) for k in knobs}
    report["tile_defaults"] = defaults
    report["sweep"] = []
    det = {"deterministic": True}
    sweep = [
        # forward: channels per program (min(TILE / N, MAX_BLOCK_D)) and warps
        ("fwd", {"FORWARD_TILE": 512}),
        ("fwd", {"FORWARD_MAX_BLOCK_D": 4}),
        ("fwd", {"FORWARD_MAX_BLOCK_D": 16}),
        ("fwd", {"FORWARD_TILE": 2048, "FORWARD_NUM_WARPS": 2}),
        # register caps: more resident warps against spills (benchmarks/triton_sass.py counts both)
        ("fwd", {"FORWARD_MAX_REGISTERS": 128}),
        ("fwd_bwd", {"BACKWARD_MAX_REGISTERS": 200}),
        ("fwd_bwd", {"BACKWARD_MAX_REGISTERS": 168}),
        ("fwd_bwd", {"BACKWARD_MAX_REGISTERS": 128}),
        # launch choices: grid order (B/C reuse in L1) and fp32 B/C (no conversion shuffles, twice the bytes)
        ("fwd", {"CHANNEL_BLOCKS_FIRST": True}),
        ("fwd_bwd", {"CHANNEL_BLOCKS_FIRST": True}),
        ("fwd", {"FLOAT32_B_C": True}),
        ("fwd_bwd", {"FLOAT32_B_C": True}),
        # backward: (BLOCK_D x BLOCK_N x chunk) tile, warps, checkpoint interval
        ("fwd_bwd", {"BACKWARD_BLOCK_N": 16}),
        ("fwd_bwd", {"BACKWARD_BLOCK_N": 64}),
        ("fwd_bwd", {"BACKWARD_TILE": 512}),
        ("fwd_bwd", {"BACKWARD_TILE": 2048, "BACKWARD_NUM_WARPS": 2}),
        ("fwd_bwd", {"chunk_size": 8}),
        ("fwd_bwd", {"chunk_size": 32}),
        # deterministic backward: wider channel blocks bound the partial sums' memory
        ("fwd_bwd", det | {"DETERMINISTIC_BACKWARD_TILE": 1024, "DETERMINISTIC_BACKWARD_NUM_WARPS": 1}),
        ("fwd_bwd", det | {"DETERMINISTIC_BACKWARD_BLOCK_N": 32}),
        ("fwd_bwd", det | {"DETERMINISTIC_BACKWARD_TILE": 4096, "DETERMINISTIC_BACKWARD_NUM_WARPS": 4}),
    ]
    for text in args.sweep_shapes:
        inputs = make_inputs(parse_shape(text), torch.bfloat16, "cuda", "channels-first")
        for mode, config in sweep:
            tiles = {key: value for key, value in config.items() if key in defaults}
            for key, value in tiles.items():
                setattr(triton_scan, key, value)
            options = {key: config[key] for key in ("chunk_size", "deterministic") if key in config}
            row = guarded(str(config), inputs, mode, backend="triton", **options)
            for key, value in defaults.items():
                setattr(triton_scan, key, value)
            report["sweep"].append({"shape": text, "mode": mode, "config": config, **row})
            print("sweep", text, mode, config, row, flush=True)
            Path(args.out).write_text(json.dumps(report, indent=1))
        del inputs
        torch.cuda.empty_cache()
    print_table(report)


def print_table(report: dict) -> None:
    print(f"\n{report['gpu']}, bf16 inputs, do_bench medians")
    print(f"{'shape':>22} {'variant':>34} {'ms':>9} {'G upd/s':>9} {'of exp peak':>11} {'extra MB':>9}")
    for entry in report["shapes"]:
        for name, row in entry["results"].items():
            if "ms" in row:
                rate, fraction = row.get("g_updates_per_s", 0), row.get("fraction_of_exp_peak", 0)
                print(
                    f"{str(entry['shape']):>22} {name:>34} {row['ms']:>9.3f} {rate:>9.1f} {fraction:>11.3f}"
                    f" {row['peak_extra_mb']:>9.0f}"
                )
            else:
                print(f"{str(entry['shape']):>22} {name:>34} {row['error']}")


def main() -> None:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("step", nargs="?", default="all", choices=["all", "env", "probe", "bench"])
    parser.add_argument("--out", default=os.environ.get("OUT", "device_results"))
    parser.add_argument("--only", default=None, help="comma-separated step names (driver mode)")
    parser.add_argument("--budget", type=float, default=480.0, help="overall seconds for all steps")
    parser.add_argument("--shapes", nargs="+", default=PAPER_SHAPES, help="bench: batch,dim,L,N ...")
    parser.add_argument(
        "--sweep-shapes", nargs="*", default=[PAPER_SHAPES[0], PAPER_SHAPES[2]], help="bench: tile sweeps"
    )
    parser.add_argument("--warmup-ms", type=int, default=25)
    parser.add_argument("--rep-ms", type=int, default=100)
    args = parser.parse_args()
    {"all": drive, "env": env_step, "probe": probe_step, "bench": bench_step}[args.step](args)


if __name__ == "__main__":
    main()
