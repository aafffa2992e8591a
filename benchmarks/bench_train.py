"""Training throughput (images/s) and peak memory of one flow-matching training step.

    python benchmarks/bench_train.py  # CPU: Tiny/2, fp32 vs bf16, Zigma vs Arcee
    python benchmarks/bench_train.py --device cuda --preset B/2 --batch_size 96 --num_scan_orders 1 4

A step is what train_scripts/train_fm.py does per batch: GVP flow-matching loss, backward, grad-norm clip,
AdamW step and EMA update, on random 4×32×32 latents (256 px images through the SD-VAE). Every
configuration runs in a fresh process, so peak memory is that configuration's alone: max resident set size
on CPU, ``torch.cuda.max_memory_allocated`` on CUDA. Prints a table and writes JSON.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import resource
import subprocess
import sys
import time


def run_one(config: dict) -> dict:
    import torch

    from arcee_diffusers.models import ArceeZigmaTransformer
    from arcee_diffusers.schedulers.flow_paths import get_flow_path
    from arcee_diffusers.training import flow_matching_loss, sample_flow_times
    from arcee_diffusers.training.ema import create_ema

    device = torch.device(config["device"])
    torch.manual_seed(0)
    model = ArceeZigmaTransformer.from_preset(
        config["preset"],
        num_scan_orders=config["num_scan_orders"],
        state_chain=config["state_chain"],
        d_state=config["d_state"],
    ).to(device)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0, foreach=True)  # as train_fm
    ema = create_ema(model.parameters(), decay=0.9999)  # the paper recipe's constant EMA
    ema.to(device)
    path = get_flow_path("gvp")
    shape = (
        config["batch_size"],
        model.config.in_channels,
        model.config.sample_size,
        model.config.sample_size,
    )
    x1 = torch.randn(shape, device=device)
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=config["precision"] == "bf16")

    def step():
        with autocast:
            loss = flow_matching_loss(model, x1, sample_flow_times(x1.shape[0], device=device), path)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 2.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        ema.step(model.parameters())

    def synchronize():
        if device.type == "cuda":
            torch.cuda.synchronize()

    for _ in range(config["warmup"]):
        step()
    synchronize()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(config["steps"]):
        step()
    synchronize()
    seconds = time.perf_counter() - start
    if device.type == "cuda":
        peak_mib = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    return {
        **config,
        "images_per_s": config["batch_size"] * config["steps"] / seconds,
        "s_per_step": seconds / config["steps"],
        "peak_memory_mib": peak_mib,
        "parameters": sum(p.numel() for p in model.parameters()),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--preset", default=None, help="Default: Tiny/2 on CPU, B/2 on CUDA.")
    parser.add_argument("--batch_size", type=int, default=None, help="Default: 8 on CPU, 96 (paper) on CUDA.")
    parser.add_argument("--d_state", type=int, default=256)
    parser.add_argument("--num_scan_orders", type=int, nargs="+", default=[1])
    parser.add_argument("--precisions", nargs="+", default=["fp32", "bf16"])
    parser.add_argument("--steps", type=int, default=None, help="Timed steps (default 5 CPU, 20 CUDA).")
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--output_json", default="benchmarks/results/bench_train.json")
    parser.add_argument("--config", help=argparse.SUPPRESS)  # internal: run one configuration
    args = parser.parse_args()
    if args.config:
        print(json.dumps(run_one(json.loads(args.config))))
        return

    cuda = args.device.startswith("cuda")
    base = {
        "device": args.device,
        "preset": args.preset or ("B/2" if cuda else "Tiny/2"),
        "batch_size": args.batch_size or (96 if cuda else 8),
        "d_state": args.d_state,
        "steps": args.steps or (20 if cuda else 5),
        "warmup": args.warmup,
    }
    results = []
    for k, chain, precision in itertools.product(args.num_scan_orders, (False, True), args.precisions):
        config = {**base, "num_scan_orders": k, "state_chain": chain, "precision": precision}
        command = [sys.executable, __file__, "--config", json.dumps(config)]
        done = subprocess.run(command, capture_output=True, text=True)
        if done.returncode != 0:
            result = {**config, "error": done.stderr.strip().splitlines()[-1]}
        else:
            result = json.loads(done.stdout.strip().splitlines()[-1])
        results.append(result)
        name = f"{'Arcee' if chain else 'Zigma'}-{k}"
        if "error" in result:
            print(f"{name:9s} {precision:5s} failed: {result['error']}", flush=True)
        else:
            print(
                f"{name:9s} {precision:5s} {result['images_per_s']:9.2f} img/s "
                f"{result['s_per_step']:8.3f} s/step {result['peak_memory_mib']:9.0f} MiB",
                flush=True,
            )

    print(f"\n{base['preset']}, batch {base['batch_size']}, d_state {base['d_state']}, {args.device}")
    print("| model | precision | images/s | s/step | peak memory (MiB) |\n|---|---|---|---|---|")
    for r in results:
        name = f"{'Arcee' if r['state_chain'] else 'Zigma'}-{r['num_scan_orders']}"
        if "error" in r:
            print(f"| {name} | {r['precision']} | failed | | {r['error'][:60]} |")
        else:
            print(
                f"| {name} | {r['precision']} | {r['images_per_s']:.2f} | {r['s_per_step']:.3f} | "
                f"{r['peak_memory_mib']:.0f} |"
            )
    from pathlib import Path

    Path(args.output_json).parent.mkdir(parents=True, exist_ok=True)
    machine = {"platform": platform.platform(), "python": platform.python_version()}
    Path(args.output_json).write_text(json.dumps({"machine": machine, "results": results}, indent=2) + "\n")
    print(f"\nwrote {args.output_json}")


if __name__ == "__main__":
    main()
