"""Training-step time and peak memory: Zigma-k (no state chain) against Arcee-k, or one scan backend
against another, same size, same run.

One step = forward + flow-matching MSE loss + backward + AdamW step. The models under comparison start from
the same weights and run interleaved (one step of each in turn, repeated), so machine-load drift hits them
alike. Reports the median step time, the ratio to the first model (Arcee/Zigma, target <= 1.03; or each
backend against the first) and peak memory (CUDA only).

    python benchmarks/bench_model.py                       # CPU: Tiny/2, 4 x 32 x 32 latents, batch 16
    python benchmarks/bench_model.py --device cuda --preset B/2 --batch 32 --dtype bf16 --out bench.json
    # the 256-token digits model (train_fm.py --resolution 16 --patch_size 1 --no-class_conditional),
    # Arcee-1 with the torch scan backend against the numba one
    python benchmarks/bench_model.py --compare backends --batch 32 --threads 1 --config sample_size=16 \\
        in_channels=1 out_channels=1 patch_size=1 hidden_size=64 num_layers=6 d_state=16
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import sys
import time

import torch

from arcee_diffusers import ArceeZigmaTransformer
from arcee_diffusers.models import PRESETS
from arcee_diffusers.schedulers.flow_paths import get_flow_path
from arcee_diffusers.training import flow_matching_loss


def parse_args() -> argparse.Namespace:
    formatter = argparse.RawDescriptionHelpFormatter
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=formatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default="Tiny/2", choices=list(PRESETS))
    parser.add_argument("--batch", type=int, default=16)
    parser.add_argument(
        "--dtype", default="fp32", choices=["fp32", "bf16"], help="bf16: autocast over fp32 weights"
    )
    parser.add_argument("--orders", default="1", help="comma-separated k values, e.g. 1,2,4,8")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument(
        "--compare", default="chain", choices=["chain", "backends"], help="Zigma vs Arcee, or scan backends"
    )
    parser.add_argument("--scan-backend", default=None, help="arcee_scan backend (default: automatic)")
    parser.add_argument(
        "--scan-backends", nargs="+", default=["torch", "numba"], help="with --compare backends"
    )
    parser.add_argument(
        "--config", nargs="+", default=[], metavar="KEY=VALUE", help="preset overrides, e.g. d_state=16"
    )
    parser.add_argument("--threads", type=int, default=None, help="torch.set_num_threads (CPU)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", default=None, help="write the results as JSON to this path")
    return parser.parse_args()


def is_bidirectional(preset: str) -> bool:
    return PRESETS[preset].get("scan_pattern") == "bidirectional"


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def config_overrides(pairs: list[str]) -> dict:
    """``["d_state=16", "scan_pattern=zigzag"]`` -> ``{"d_state": 16, "scan_pattern": "zigzag"}``."""
    overrides = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep:
            sys.exit(f"bench_model.py: error: --config takes KEY=VALUE pairs, got {pair!r}")
        try:
            overrides[key] = json.loads(value)
        except json.JSONDecodeError:
            overrides[key] = value
    return overrides


def build_models(args: argparse.Namespace, k: int, device: torch.device) -> dict[str, ArceeZigmaTransformer]:
    """Zigma-k and Arcee-k, or Arcee-k once per scan backend, with identical initial weights."""
    overrides = {"scan_backend": args.scan_backend, **config_overrides(args.config)}
    if not is_bidirectional(args.preset):
        overrides["num_scan_orders"] = k
    variant = "Vim" if is_bidirectional(args.preset) else f"Zigma-{k}"
    chained = "ArceeVim" if is_bidirectional(args.preset) else f"Arcee-{k}"
    if args.compare == "chain":
        configs = {variant: {"state_chain": False}, chained: {"state_chain": True}}
    else:
        configs = {f"{chained} {name}": {"scan_backend": name} for name in args.scan_backends}
    torch.manual_seed(args.seed)
    built = [ArceeZigmaTransformer.from_preset(args.preset, **{**overrides, **c}) for c in configs.values()]
    for model in built[1:]:
        model.load_state_dict(built[0].state_dict())  # the chain and the backend add no parameters
    models = {}
    for name, model in zip(configs, built):
        if args.gradient_checkpointing:
            model.enable_gradient_checkpointing()
        models[name] = model.to(device).train()
    return models


def make_step(model: ArceeZigmaTransformer, args: argparse.Namespace, device: torch.device):
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.0)
    config = model.config
    generator = torch.Generator(device).manual_seed(args.seed)
    shape = (args.batch, config.in_channels, config.sample_size, config.sample_size)
    data = torch.randn(shape, device=device, generator=generator)
    noise = torch.randn(shape, device=device, generator=generator)
    t = torch.rand(args.batch, device=device, generator=generator)
    path = get_flow_path("gvp")  # the paper's path, as train_fm.py uses it

    def step() -> None:
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16"):
            loss = flow_matching_loss(model, data, t, path, noise=noise)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step


def timed(step, device: torch.device) -> tuple[float, float | None]:
    """Seconds for one step, and the peak memory it allocated in GiB (CUDA only)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    synchronize(device)
    start = time.perf_counter()
    step()
    synchronize(device)
    seconds = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated(device) / 2**30 if device.type == "cuda" else None
    return seconds, peak


def main() -> None:
    args = parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True  # the paper trains in fp32 with TF32
        torch.backends.cudnn.allow_tf32 = True
    orders = [int(k) for k in args.orders.split(",")]
    if is_bidirectional(args.preset):
        orders = [1]

    rows = []
    for k in orders:
        models = build_models(args, k, device)
        steps = {name: make_step(model, args, device) for name, model in models.items()}
        times = {name: [] for name in steps}
        peaks = {name: 0.0 for name in steps}
        for repeat in range(args.warmup + args.repeats):
            for name, step in steps.items():
                seconds, peak = timed(step, device)
                phase = "warm-up" if repeat < args.warmup else f"repeat {repeat - args.warmup + 1}"
                print(f"  {name} {phase}: {1e3 * seconds:.1f} ms", file=sys.stderr, flush=True)
                if repeat >= args.warmup:
                    times[name].append(seconds)
                    peaks[name] = max(peaks[name], peak or 0.0)
        baseline = next(iter(steps))
        for name in steps:
            rows.append(
                {
                    "model": name,
                    "k": k,
                    "median_ms": 1e3 * statistics.median(times[name]),
                    "min_ms": 1e3 * min(times[name]),
                    "times_ms": [1e3 * s for s in times[name]],
                    "peak_memory_gib": peaks[name] if device.type == "cuda" else None,
                    "ratio_to_baseline": statistics.median(times[name]) / statistics.median(times[baseline]),
                }
            )
        del models, steps

    if device.type == "cuda":
        device_name = torch.cuda.get_device_name(device)
    else:
        device_name = platform.processor() or platform.machine()
    print(
        f"{args.preset}, batch {args.batch}, {args.dtype}, {device_name}, "
        f"{args.repeats} interleaved repeats after {args.warmup} warm-up"
    )
    print(f"{'model':<16} {'median ms':>10} {'min ms':>10} {'peak GiB':>9} {'vs baseline':>12}")
    for row in rows:
        peak = "-" if row["peak_memory_gib"] is None else f"{row['peak_memory_gib']:.2f}"
        print(
            f"{row['model']:<16} {row['median_ms']:>10.1f} {row['min_ms']:>10.1f} {peak:>9} "
            f"{row['ratio_to_baseline']:>11.3f}x"
        )
    if args.out:
        result = {
            "args": vars(args),
            "device": device_name,
            "torch": torch.__version__,
            "threads": torch.get_num_threads(),
            "rows": rows,
        }
        with open(args.out, "w") as handle:
            json.dump(result, handle, indent=2)


if __name__ == "__main__":
    main()
