"""Cost of sampling ZigMa's released models: seconds per model call and peak memory of the 24 x 768 model
at 1,024 tokens (churches256: 4 x 32 x 32 latents, patch 1) and 4,096 tokens (faceshq1024 / landscape1024:
4 x 128 x 128, patch 2), per scan backend, and the estimated time for one image with dopri5.

python benchmarks/bench_zigma_sampling.py                    # CPU: numba and torch scan backends
python benchmarks/bench_zigma_sampling.py --device cuda      # GPU: triton and torch

Random weights (the cost does not depend on them), batch 1, float32, no grad. Each (model, backend) runs in
its own process: one warm-up call (numba's JIT, cached on disk), then --calls timed calls. Peak memory is
the process's peak resident set on CPU (weights included) and torch's peak allocation on CUDA.

The time per image is seconds per call x dopri5's call count. The count depends on the trained weights,
which cannot be downloaded here, so two counts are shown: the one measured on the exact velocity of a
Gaussian target (same linear path, atol 1e-6, rtol 1e-3: a lower bound, a real image model's field is
rougher) and --assumed_calls (default 100, an assumption, not a measurement). The VAE decode is left out.
Prints a markdown table and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

import torch

from arcee_diffusers import ArceeZigmaTransformer, FlowMatchGVPScheduler
from arcee_diffusers.schedulers import PAPER_SOLVER, get_flow_path, sample_flow

MODELS = {"zigma-8-churches256": 1024, "zigma-8-faceshq1024": 4096}  # landscape1024 = faceshq1024's shape
BACKENDS = {"cpu": ("numba", "torch"), "cuda": ("triton", "torch")}
MU, STD = 0.7, 0.5


def measure_one(variant: str, backend: str, device: str, calls: int) -> dict:
    """Seconds per call and peak memory of one model and scan backend, in this process."""
    torch.manual_seed(0)
    model = ArceeZigmaTransformer.from_variant(variant, scan_backend=backend).to(device).eval()
    with torch.no_grad():  # move the zero-initialised head off zero, so the output is a real computation
        model.final_layer.linear.weight.normal_(std=0.02)
    config = model.config
    x = torch.randn(1, config.in_channels, config.sample_size, config.sample_size, device=device)
    t = torch.full((1,), 0.5, device=device)
    with torch.no_grad():
        model(x, t)  # warm-up
        if device == "cuda":
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(calls):
            model(x, t)
        if device == "cuda":
            torch.cuda.synchronize()
    seconds = (time.perf_counter() - start) / calls
    if device == "cuda":
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux
    tokens = (config.sample_size // config.patch_size) ** 2
    return {"model": variant, "tokens": tokens, "backend": backend, "s_per_call": round(seconds, 3),
            "peak_mb": round(peak_mb)}  # fmt: skip


def gaussian_dopri5_calls() -> int:
    """dopri5's call count (ZigMa's tolerances, linear path) on the exact velocity of N(0.7, 0.5^2)."""
    path = get_flow_path("linear")

    def velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        alpha, sigma, d_alpha, d_sigma = path.coefficients(t.double())
        slope = (d_alpha * alpha * STD**2 + d_sigma * sigma) / (alpha**2 * STD**2 + sigma**2)
        return (d_alpha * MU + slope * (x.double() - alpha * MU)).to(x.dtype)

    noise = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    scheduler = FlowMatchGVPScheduler(path="linear", **PAPER_SOLVER)
    return sample_flow(velocity, noise, scheduler, path, None)[1]


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--backends", nargs="+", help="default: numba torch on CPU, triton torch on CUDA")
    parser.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    parser.add_argument("--calls", type=int, default=1, help="timed calls after the warm-up")
    parser.add_argument("--assumed_calls", type=int, default=100, help="a dopri5 call count to price")
    parser.add_argument("--out", type=Path, default=Path("docs/benchmarks/zigma_sampling_cpu.json"))
    parser.add_argument("--one", nargs=2, metavar=("MODEL", "BACKEND"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:  # a child process: one measurement, as JSON on stdout
        print(json.dumps(measure_one(*args.one, args.device, args.calls)))
        return

    gaussian_calls = gaussian_dopri5_calls()
    rows = []
    for variant in args.models:
        for backend in args.backends or BACKENDS[args.device]:
            command = [sys.executable, __file__, "--device", args.device, "--calls", str(args.calls)]
            result = subprocess.run(
                [*command, "--one", variant, backend], capture_output=True, text=True, check=True
            )
            row = json.loads(result.stdout.strip().splitlines()[-1])
            row[f"s_per_image_at_{gaussian_calls}_calls"] = round(row["s_per_call"] * gaussian_calls, 1)
            row[f"s_per_image_at_{args.assumed_calls}_calls"] = round(
                row["s_per_call"] * args.assumed_calls, 1
            )
            rows.append(row)
            print(row, flush=True)

    setup = {
        "device": args.device,
        "device_name": torch.cuda.get_device_name() if args.device == "cuda" else platform.processor(),
        "torch": torch.__version__,
        "threads": torch.get_num_threads(),
        "batch": 1,
        "dtype": "float32",
        "timed_calls": args.calls,
        "gaussian_dopri5_calls": gaussian_calls,
        "assumed_calls": args.assumed_calls,
    }
    keys = list(rows[0])
    print("| " + " | ".join(keys) + " |\n|" + "---|" * len(keys))
    for row in rows:
        print("| " + " | ".join(str(value) for value in row.values()) + " |")
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"setup": setup, "rows": rows}, indent=2) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
