"""Sampling benchmark: images/s and true model calls per solver, and error vs calls on an analytic target.

python benchmarks/bench_sampling.py                       # CPU: Tiny/2, 4 x 16 x 16 latents, d_state 16
python benchmarks/bench_sampling.py --device cuda          # GPU: B/2, 4 x 32 x 32 latents, d_state 256

Part 1 runs ArceeZigmaPipeline (output_type="latent": the VAE decode, the same for every solver, is left
out) with random weights perturbed away from the zero-initialised head, so the ODE is not trivial; an
adaptive solver's call count on a trained model differs. Part 2 samples Gaussian data N(0.7, 0.5^2) with its
exact GVP velocity and reports, per solver, the model calls and the error at the end of the ODE (max over
samples of |x - exact endpoint|, and the std of the samples minus that of the exact endpoints): pick the
cheapest solver that reaches the accuracy you need.
Prints markdown tables and writes JSON (--out).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)

from arcee_diffusers import ArceeZigmaPipeline, ArceeZigmaTransformer, FlowMatchGVPScheduler
from arcee_diffusers.schedulers import PAPER_SOLVER, get_flow_path, sample_flow

FLOW = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
# name -> (scheduler factory, num_inference_steps; None = adaptive)
PIPELINE_SOLVERS = {
    "euler-50": (lambda: FlowMatchGVPScheduler(solver="euler"), 50),
    "heun-25": (lambda: FlowMatchGVPScheduler(solver="heun"), 25),
    "dpm++flow-25": (lambda: DPMSolverMultistepScheduler(**FLOW), 25),
    "unipc-flow-25": (lambda: UniPCMultistepScheduler(**FLOW), 25),
    "dopri5 (paper)": (lambda: FlowMatchGVPScheduler(**PAPER_SOLVER), None),
}
GAUSSIAN_SOLVERS = {
    "euler": lambda: FlowMatchGVPScheduler(solver="euler"),
    "heun": lambda: FlowMatchGVPScheduler(solver="heun"),
    "diffusers euler": FlowMatchEulerDiscreteScheduler,
    "diffusers heun": FlowMatchHeunDiscreteScheduler,
    "dpm++ flow": lambda: DPMSolverMultistepScheduler(**FLOW),
    "unipc flow": lambda: UniPCMultistepScheduler(**FLOW),
}
GAUSSIAN_STEPS = (5, 10, 25, 50, 100)
DOPRI5_RTOLS = (1e-2, 1e-3, 1e-4, 1e-5)
MU, STD = 0.7, 0.5


def random_transformer(args) -> ArceeZigmaTransformer:
    torch.manual_seed(0)
    model = ArceeZigmaTransformer.from_preset(
        args.preset, sample_size=args.sample_size, in_channels=4, out_channels=4, d_state=args.d_state
    )
    generator = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.02 * torch.randn(parameter.shape, generator=generator))
    return model.to(args.device).eval()


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def bench_pipeline(args) -> list[dict]:
    pipe = ArceeZigmaPipeline(random_transformer(args), FlowMatchGVPScheduler())
    pipe.set_progress_bar_config(disable=True)
    rows = []
    for name in args.solvers:
        make_scheduler, steps = PIPELINE_SOLVERS[name]
        pipe.scheduler = make_scheduler()
        kwargs = {"batch_size": args.batch_size, "num_inference_steps": steps, "output_type": "latent"}
        pipe(**{**kwargs, "num_inference_steps": 2 if steps else None})  # warm-up
        synchronize(args.device)
        start = time.perf_counter()
        output = pipe(generator=torch.Generator(args.device).manual_seed(0), **kwargs)
        synchronize(args.device)
        seconds = time.perf_counter() - start
        rows.append(
            {
                "solver": name,
                "model_calls": output.nfe,
                "seconds": round(seconds, 3),
                "images_per_s": round(args.batch_size / seconds, 4),
                "ms_per_call": round(1000 * seconds / output.nfe, 2),
            }
        )
        print(f"  {name}: {rows[-1]}", flush=True)
    return rows


def exact_gvp_velocity(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    alpha, sigma, d_alpha, d_sigma = get_flow_path("gvp").coefficients(t.double())
    slope = (d_alpha * alpha * STD**2 + d_sigma * sigma) / (alpha**2 * STD**2 + sigma**2)
    return (d_alpha * MU + slope * (x.double() - alpha * MU)).to(x.dtype)


def bench_gaussian() -> list[dict]:
    noise = torch.randn(4096, 2, generator=torch.Generator().manual_seed(0))
    exact = MU + STD * noise
    path = get_flow_path("gvp")

    def row(name: str, scheduler, steps: int | None) -> dict:
        out, calls = sample_flow(exact_gvp_velocity, noise.clone(), scheduler, path, steps)
        return {
            "solver": name,
            "steps": steps,
            "model_calls": calls,
            "max_error": float((out - exact).abs().max()),
            "std_error": float(out.std() - exact.std()),
        }

    rows = [row(name, make(), steps) for name, make in GAUSSIAN_SOLVERS.items() for steps in GAUSSIAN_STEPS]
    for rtol in DOPRI5_RTOLS:
        rows.append(row(f"dopri5 rtol={rtol:g}", FlowMatchGVPScheduler(solver="dopri5", rtol=rtol), None))
    return rows


def markdown(rows: list[dict]) -> str:
    keys = list(rows[0])
    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    for row in rows:
        cells = [f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default=None, help="default: Tiny/2 on CPU, B/2 on CUDA")
    parser.add_argument("--sample_size", type=int, default=None, help="latent side; default 16 CPU, 32 CUDA")
    parser.add_argument("--d_state", type=int, default=None, help="default 16 on CPU, 256 (paper) on CUDA")
    parser.add_argument("--batch_size", type=int, default=None, help="default 4 on CPU, 16 on CUDA")
    parser.add_argument(
        "--solvers", nargs="+", default=list(PIPELINE_SOLVERS), choices=list(PIPELINE_SOLVERS)
    )
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/sampling.json"))
    args = parser.parse_args()
    cuda = args.device.startswith("cuda")
    args.preset = args.preset or ("B/2" if cuda else "Tiny/2")
    args.sample_size = args.sample_size or (32 if cuda else 16)
    args.d_state = args.d_state or (256 if cuda else 16)
    args.batch_size = args.batch_size or (16 if cuda else 4)

    setup = {key: value for key, value in vars(args).items() if key not in ("out", "solvers")}
    setup["device_name"] = (
        torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    )
    setup["torch"] = torch.__version__
    setup["threads"] = torch.get_num_threads()
    print(f"pipeline sampling, {setup}", flush=True)
    pipeline_rows = bench_pipeline(args)
    print(markdown(pipeline_rows))
    print("\nGaussian target N(0.7, 0.5^2), exact GVP velocity: error vs model calls")
    gaussian_rows = bench_gaussian()
    print(markdown(gaussian_rows))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"setup": setup, "pipeline": pipeline_rows, "gaussian": gaussian_rows}, indent=2)
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
