"""Benchmark the selective-scan backends: time and peak extra memory, against the naive reference.

    python benchmarks/bench_scan.py --out bench_scan_cpu.json
    python benchmarks/bench_scan.py --device cuda --dtype bfloat16 \
        --shapes 48,1536,256,256 8,1536,1024,256 48,1536,256,16 --out bench_scan_cuda.json

For every shape (batch, dim, L, N) and backend: forward (no grad) and forward+backward (gradients of every
input including the initial state, cotangents on y and h_T), with h0, z, D, delta_bias and softplus on.
Times are medians over about ``--reps`` runs (CUDA: events, after synchronize), in two rounds of one batch
per backend, the second round in reverse order (see ``time_backends``); on CPU also the median process CPU
time. The ratio columns are the naive reference's time over the backend's, measured in the same rounds.

Peak extra memory: on CUDA, ``torch.cuda.max_memory_allocated`` above what the inputs hold. On CPU, the
resident-set high-water mark (``VmHWM``) of a fresh subprocess that runs the op once on a tiny shape (to page
in code), builds the inputs, resets the mark to the current RSS, runs the op once and reads it again; the
difference is everything the op allocated (outputs and input gradients included), as the OS saw it.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import subprocess
import sys
import time

import torch

from arcee_scan import BACKENDS, selective_scan

CPU_SHAPES = ["2,192,256,16", "2,384,128,64", "2,1536,256,256"]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MODES = ("fwd", "fwdbwd")


def parse_shape(text: str) -> tuple[int, int, int, int]:
    parts = tuple(int(p) for p in text.split(","))
    if len(parts) != 4 or min(parts) < 1:
        raise argparse.ArgumentTypeError(f"shape must be batch,dim,L,N with positive ints, got {text!r}")
    return parts


def make_inputs(shape, dtype: torch.dtype, device: str, layout: str = "time-major") -> dict:
    batch, dim, length, d_state = shape
    gen = torch.Generator(device=device).manual_seed(0)

    def randn(*size, dtype=dtype):
        return torch.randn(*size, generator=gen, device=device).to(dtype)

    def sequence(channels: int) -> torch.Tensor:
        # "time-major": (batch, channels, L) views of (batch, L, channels) buffers, the layout the Mamba
        # mixer hands over (its linear layers' outputs); "channels-first": contiguous (batch, channels, L)
        if layout == "time-major":
            return randn(batch, length, channels).transpose(1, 2)
        return randn(batch, channels, length)

    A = -torch.arange(1, d_state + 1, device=device, dtype=torch.float32).repeat(dim, 1)  # S4D-real
    B = randn(batch, length, d_state).transpose(1, 2)  # B/C time-major in either layout, as in the mixer
    C = randn(batch, length, d_state).transpose(1, 2)
    return {
        "u": sequence(dim),
        "delta": sequence(dim) * 0.5 - 3.0,
        "A": A,
        "B": B,
        "C": C,
        "D": randn(dim, dtype=torch.float32),
        "z": sequence(dim),
        "delta_bias": torch.rand(dim, generator=gen, device=device) * 0.3,
        "delta_softplus": True,
        "initial_state": randn(batch, dim, d_state, dtype=torch.float32),
    }


def run_once(inputs: dict, backend: str, mode: str) -> None:
    if mode == "fwd":
        with torch.no_grad():
            selective_scan(**inputs, backend=backend)
        return
    leaves = {k: v.detach().requires_grad_() for k, v in inputs.items() if isinstance(v, torch.Tensor)}
    y, h_T = selective_scan(**(inputs | leaves), backend=backend)
    torch.autograd.grad((y.float().sum() + h_T.sum()), list(leaves.values()))


def time_once(inputs: dict, backend: str, mode: str, device: str) -> tuple[float, float]:
    """Wall-clock ms and process CPU ms (all threads; shows contention on CPU) of one run."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        run_once(inputs, backend, mode)
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end), float("nan")
    t0, c0 = time.perf_counter(), time.process_time()
    run_once(inputs, backend, mode)
    return (time.perf_counter() - t0) * 1e3, (time.process_time() - c0) * 1e3


def time_backends(
    inputs: dict, backends: list[str], mode: str, reps: int, device: str
) -> dict[str, tuple[float, float, float]]:
    """Per backend: median and best wall-clock ms, median CPU ms.

    Each backend runs in a batch of back-to-back calls after a warm-up call (its steady state: right after
    the naive reference has freed a few hundred MB, the next op's fresh tensors page-fault). The batches
    run in two rounds, the second in reverse order, so a machine that drifts during the measurement
    (shared VMs do, by tens of percent over minutes) affects every backend alike.
    """
    times: dict[str, list[tuple[float, float]]] = {backend: [] for backend in backends}
    for order in (backends, backends[::-1]):
        for backend in order:
            run_once(inputs, backend, mode)  # warm-up (and Triton compilation)
            for _ in range((reps + 1) // 2):
                times[backend].append(time_once(inputs, backend, mode, device))
    return {
        backend: (
            statistics.median(wall for wall, _ in runs),
            min(wall for wall, _ in runs),
            statistics.median(cpu for _, cpu in runs),
        )
        for backend, runs in times.items()
    }


def peak_extra_mb(shape, dtype_name: str, backend: str, mode: str, device: str, layout: str) -> float:
    if device == "cuda":
        inputs = make_inputs(shape, DTYPES[dtype_name], device, layout)
        run_once(inputs, backend, mode)
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        run_once(inputs, backend, mode)
        torch.cuda.synchronize()
        return (torch.cuda.max_memory_allocated() - base) / 2**20
    # a fresh process per measurement: ru_maxrss is a lifetime high-water mark
    shape_text = ",".join(map(str, shape))
    command = [sys.executable, __file__, "--rss-probe", shape_text, dtype_name, backend, mode, layout]
    result = subprocess.run(command, capture_output=True, text=True, check=True)
    return float(result.stdout.strip().splitlines()[-1])


def rss_high_water_kib() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))


def rss_probe(shape_text: str, dtype_name: str, backend: str, mode: str, layout: str) -> None:
    torch.set_num_threads(1)
    # page in the code the op touches (libtorch kernels are loaded lazily) so it is not counted
    run_once(make_inputs((1, 2, 3, 2), DTYPES[dtype_name], "cpu", layout), backend, mode)
    inputs = make_inputs(parse_shape(shape_text), DTYPES[dtype_name], "cpu", layout)
    # reset the high-water mark to the current RSS (ru_maxrss would also carry the parent's, across exec)
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    before = rss_high_water_kib()
    run_once(inputs, backend, mode)
    print((rss_high_water_kib() - before) / 1024)


def available_backends(device: str) -> list[str]:
    backends = ["reference", "torch", "numba"]
    if device == "cuda":
        try:
            import arcee_scan.triton_scan  # noqa: F401
        except ImportError:
            pass
        else:
            backends.append("triton")
    return backends


def cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            return next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        return platform.processor()


def environment(device: str) -> dict:
    env = {
        "torch": torch.__version__,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpu": cpu_model(),
        "threads": torch.get_num_threads(),
        "device": device,
    }
    try:
        import triton

        env["triton"] = triton.__version__
    except ImportError:
        env["triton"] = None
    if device == "cuda":
        props = torch.cuda.get_device_properties(0)
        env |= {"gpu": props.name, "sms": props.multi_processor_count}
    return env


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    parser.add_argument("--dtype", default="float32", choices=sorted(DTYPES))
    parser.add_argument("--shapes", nargs="+", type=parse_shape, default=None, help="batch,dim,L,N ...")
    parser.add_argument("--backends", nargs="+", default=None, choices=list(BACKENDS))
    parser.add_argument("--modes", nargs="+", default=list(MODES), choices=MODES)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument(
        "--reference-limit",
        type=float,
        default=5e7,
        help="skip the naive reference above this many state updates batch*dim*L*N (its memory explodes)",
    )
    parser.add_argument("--no-memory", action="store_true", help="skip the peak-memory measurements")
    parser.add_argument("--out", default=None, help="write the results as JSON here")
    parser.add_argument(
        "--layout",
        default="time-major",
        choices=["time-major", "channels-first"],
        help="u/delta/z as the mixer passes them (time-major views) or contiguous (batch, dim, L)",
    )
    parser.add_argument("--rss-probe", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.rss_probe:
        rss_probe(*args.rss_probe)
        return

    if args.threads:
        torch.set_num_threads(args.threads)
    shapes = args.shapes or [parse_shape(s) for s in CPU_SHAPES]
    backends = args.backends or available_backends(args.device)
    dtype = DTYPES[args.dtype]
    rows = []
    print_header()
    for shape in shapes:
        updates = shape[0] * shape[1] * shape[2] * shape[3]
        inputs = make_inputs(shape, dtype, args.device, args.layout)
        timed = [b for b in backends if b != "reference" or updates <= args.reference_limit]
        for mode in args.modes:
            timings = time_backends(inputs, timed, mode, args.reps, args.device)
            reference = timings.get("reference")
            for backend in timed:
                median, best, cpu = timings[backend]
                row = {
                    "shape": list(shape),
                    "backend": backend,
                    "mode": mode,
                    "dtype": args.dtype,
                    "layout": args.layout,
                    "median_ms": round(median, 3),
                    "min_ms": round(best, 3),
                    "cpu_ms": round(cpu, 3),
                    "g_updates_per_s": round(updates / median / 1e6, 3),
                    "peak_extra_mb": None
                    if args.no_memory
                    else round(peak_extra_mb(shape, args.dtype, backend, mode, args.device, args.layout), 1),
                    "speedup_vs_reference": round(reference[0] / median, 2) if reference else None,
                    "cpu_speedup_vs_reference": (
                        round(reference[2] / cpu, 2) if reference and cpu > 0 else None
                    ),
                }
                rows.append(row)
                print_row(row)
    result = {"environment": environment(args.device), "command": " ".join(sys.argv), "results": rows}
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)
        print(f"wrote {args.out}")


def print_header() -> None:
    print(
        f"{'shape (b,d,L,N)':<20} {'backend':<10} {'mode':<7} {'median ms':>10} {'min ms':>9} {'cpu ms':>9} "
        f"{'x ref':>7} {'cpu x ref':>9} {'peak MB':>9}"
    )


def print_row(row: dict) -> None:
    shape = ",".join(map(str, row["shape"]))
    speedup = f"{row['speedup_vs_reference']:.1f}" if row["speedup_vs_reference"] else "-"
    cpu_speedup = f"{row['cpu_speedup_vs_reference']:.1f}" if row["cpu_speedup_vs_reference"] else "-"
    peak = f"{row['peak_extra_mb']:.0f}" if row["peak_extra_mb"] is not None else "-"
    print(
        f"{shape:<20} {row['backend']:<10} {row['mode']:<7} {row['median_ms']:>10.2f} {row['min_ms']:>9.2f} "
        f"{row['cpu_ms']:>9.2f} {speedup:>7} {cpu_speedup:>9} {peak:>9}",
        flush=True,
    )


if __name__ == "__main__":
    main()
