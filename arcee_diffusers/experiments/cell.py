"""One cell of the Table 2 grid: a ``train_fm.py`` run on all but a held-out set of images, then its
measurements, written to ``<cell>/result.json``.

The cell folder is a ``train_fm.py`` output folder (pipeline, ``samples.png``, ``metrics.json``, checkpoints
while it trains) plus ``cell_args.json`` (the exact options), ``train_log.jsonl`` (loss and seconds per
step), ``first_batch.json`` (SHA-256 of the first step's data, noise and times) and ``result.json``.

    python -m arcee_diffusers.experiments.cell <cell folder>   # run (or resume) the cell its args describe
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import hashlib
import json
import shutil
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

from arcee_scan import resolve_backend

from ..evaluation import spatial
from ..files import write_atomically
from ..models import ArceeZigmaTransformer
from ..schedulers.flow_paths import get_flow_path
from ..training import checkpointing, latents, trainer

ARGS_FILE = "cell_args.json"
LOG_FILE = "train_log.jsonl"
FIRST_BATCH_FILE = "first_batch.json"
RESULT_FILE = "result.json"
HELDOUT_SEED = 0  # the held-out images, noise and times are the same for every cell
INFLUENCE_SAMPLES = 8  # held-out images averaged in the influence map, at t = 0.5
LOSS_CURVE_POINTS = 200


def cell_dir(grid_dir: Path, row: str, seed: int) -> Path:
    return Path(grid_dir) / "cells" / row / f"seed-{seed}"


def is_finished(folder: Path) -> bool:
    return (folder / RESULT_FILE).exists()


def write_result(folder: Path, result: dict) -> None:
    """Write the cell's ``result.json``, which marks it finished."""
    write_atomically(folder / RESULT_FILE, json.dumps(result, indent=2))


def write_cell_args(args: argparse.Namespace) -> Path:
    folder = Path(args.output_dir)
    folder.mkdir(parents=True, exist_ok=True)
    write_atomically(folder / ARGS_FILE, json.dumps(vars(args), indent=2))
    return folder


def read_log(folder: Path) -> list[dict]:
    """The training log's complete records (a line cut short by a kill is skipped)."""
    path = Path(folder) / LOG_FILE
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def steps_done(folder: Path) -> int:
    records = read_log(folder)
    return records[-1]["step"] if records else 0


class StepRecorder:
    """``trainer.train``'s ``on_step`` callback: appends ``{"step", "loss", "seconds"}`` per step to the
    training log (``seconds`` since the previous step of this process; ``process_start`` marks the first)
    and, at step 1, the SHA-256 of the step's data, noise and times. The first step of a resumed run drops
    what a killed run logged after its last checkpoint: the resumed run repeats those steps exactly."""

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.file = None
        self.last_time = None

    def __call__(self, step: trainer.TrainStep) -> None:
        now = time.perf_counter()
        record = {"step": step.step, "loss": step.logs["loss"], "seconds": None}
        if self.file is None:
            kept = [r for r in read_log(self.folder) if r["step"] < step.step]
            write_atomically(self.folder / LOG_FILE, "".join(json.dumps(r) + "\n" for r in kept))
            self.file = open(self.folder / LOG_FILE, "a")  # noqa: SIM115 (kept open across steps; close())
            record["process_start"] = True
        else:
            record["seconds"] = now - self.last_time
        if step.step == 1:
            digests = {name: _sha256(getattr(step, key)) for name, key in FIRST_BATCH_TENSORS.items()}
            write_atomically(self.folder / FIRST_BATCH_FILE, json.dumps(digests, indent=2))
        self.file.write(json.dumps(record) + "\n")
        self.file.flush()
        self.last_time = now

    def close(self) -> None:
        if self.file is not None:
            self.file.close()


FIRST_BATCH_TENSORS = {"data": "x1", "noise": "noise", "times": "t"}


def split_heldout(train_data: trainer.TrainData, num_heldout: int) -> tuple[trainer.TrainData, torch.Tensor]:
    """Hold out ``num_heldout`` images (a fixed random choice, the same for every cell): the training data
    without them, and their model inputs ``x1`` (latents: the posterior means of the unflipped view)."""
    dataset = train_data.dataset
    if num_heldout >= len(dataset):
        raise ValueError(f"num_heldout: the dataset has {len(dataset)} examples; hold out fewer")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(HELDOUT_SEED))
    heldout, kept = order[:num_heldout].sort().values, order[num_heldout:].sort().values
    if isinstance(dataset, latents.CachedLatentDataset):
        vae = train_data.vae.config
        x1 = (dataset.mean[heldout, 0] - (vae.shift_factor or 0.0)) * vae.scaling_factor
    else:
        x1 = torch.stack([dataset[int(i)]["pixel_values"] for i in heldout])
    subset = torch.utils.data.Subset(dataset, kept.tolist())
    return dataclasses.replace(train_data, dataset=subset), x1


def run_cell(args: argparse.Namespace) -> dict:
    """Train (or resume) the cell ``args`` describes, measure it and write its ``result.json``."""
    start = time.perf_counter()
    folder = write_cell_args(args)
    accelerator = trainer.make_accelerator(args)
    train_data = trainer.build_train_dataset(args, accelerator)
    train_data, heldout = split_heldout(train_data, args.num_heldout)
    model = trainer.build_model(args, train_data.channels, train_data.sample_size, train_data.num_classes)
    recorder = StepRecorder(folder)
    try:
        model, ema = trainer.train(args, accelerator, train_data, model, on_step=recorder)
    finally:
        recorder.close()
    trainer.save_final_pipeline(args, accelerator, model, ema, train_data.vae)
    metrics = trainer.finish(args, accelerator, start)
    accelerator.end_training()

    # the saved EMA weights, as a user would load them
    transformer = ArceeZigmaTransformer.from_pretrained(folder / "transformer").to(accelerator.device).eval()
    result = {
        "row": args.row,
        "seed": args.seed,
        "model": {key: transformer.config[key] for key in MODEL_KEYS},
        "parameters": sum(p.numel() for p in transformer.parameters()),
        **measure(transformer, heldout, args),
        **training_summary(folder),
        "metrics": headline_metrics(metrics),
        "first_batch_sha256": json.loads((folder / FIRST_BATCH_FILE).read_text()),
        "scan_backend": resolve_backend(
            transformer.config.scan_backend, torch.empty(0, device=accelerator.device)
        ),
        "threads": torch.get_num_threads(),
        "cell_seconds_this_run": round(time.perf_counter() - start, 1),
    }
    write_result(folder, result)
    if not args.keep_checkpoints:
        for checkpoint in checkpointing.list_checkpoints(folder):
            shutil.rmtree(checkpoint)
    return result


MODEL_KEYS = (
    "scan_pattern", "num_scan_orders", "state_chain", "num_layers", "hidden_size", "d_state", "patch_size",
    "sample_size", "in_channels",
)  # fmt: skip


def measure(transformer: ArceeZigmaTransformer, heldout: torch.Tensor, args: argparse.Namespace) -> dict:
    """Per-row loss on the held-out triples (with the chain cut at test time too, for Arcee rows), the first
    token row that is not padding, and the influence map of the middle token of path 0."""
    path = get_flow_path(args.path)
    triples = spatial.heldout_triples(heldout, args.heldout_draws, seed=HELDOUT_SEED)
    row_loss = functools.partial(
        spatial.per_row_denoising_loss, transformer, triples, path, args.eval_batch_size
    )
    per_row, chain_cut = row_loss(), None
    if transformer.config.state_chain:
        with spatial.state_chain_set(transformer, False):
            chain_cut = row_loss().tolist()

    grid = transformer.config.sample_size // transformer.config.patch_size
    token, _ = spatial.middle_token_of_path(grid)
    first = slice(0, INFLUENCE_SAMPLES * args.heldout_draws, args.heldout_draws)  # one draw per image
    device = next(transformer.parameters()).device
    x1, noise = triples["x1"][first].to(device), triples["noise"][first].to(device)
    t = torch.full((x1.shape[0],), 0.5, device=device)
    influence = spatial.influence_map(transformer, path.interpolate(x1, noise, t), t, token)
    return {
        "per_row_loss": per_row.tolist(),
        "per_row_loss_chain_cut": chain_cut,
        "first_data_row": spatial.first_data_row(heldout, transformer.config.patch_size),
        "heldout": {"images": len(heldout), "draws_per_image": args.heldout_draws, "seed": HELDOUT_SEED},
        "influence": {"token": token, "path_index": 0, "t": 0.5, "map": influence.tolist()},
    }


def training_summary(folder: Path) -> dict:
    """Steps, median seconds per step, the runs it resumed from and the loss curve (binned means)."""
    records = read_log(folder)
    seconds = [r["seconds"] for r in records if r["seconds"] is not None]
    width = max(1, -(-len(records) // LOSS_CURVE_POINTS))
    bins = [records[i : i + width] for i in range(0, len(records), width)]
    return {
        "train_steps": records[-1]["step"],
        "seconds_per_step": statistics.median(seconds) if seconds else None,
        "train_seconds": round(sum(seconds), 1),
        "resumed_from_step": [r["step"] - 1 for r in records if r.get("process_start") and r["step"] > 1],
        "train_loss": {
            "step": [b[-1]["step"] for b in bins],
            "loss": [float(np.mean([r["loss"] for r in b])) for b in bins],
        },
    }


def headline_metrics(metrics: dict) -> dict:
    """The sample metrics of the table: the digit Fréchet ratio at guidance 1, or FID and KID×10³ (and their
    Fréchet ratio when the run measured real images too)."""
    if "guidance_1/frechet_ratio" in metrics:
        return {
            "frechet_ratio": metrics["guidance_1/frechet_ratio"],
            "nfe": metrics["guidance_1/nfe"],
            "num_samples": metrics["guidance_1/num_samples"],
        }
    headline = {
        "fid": metrics["fid"],
        "kid_x1e3": metrics["kid_x1e3"],
        "nfe": metrics["nfe"],
        "num_samples": metrics["num_generated"],
    }
    if "frechet_ratio" in metrics:
        headline.update(frechet_ratio=metrics["frechet_ratio"], fid_real=metrics["fid_real"])
    return headline


def _sha256(tensor: torch.Tensor) -> str:
    return hashlib.sha256(tensor.detach().float().cpu().contiguous().numpy().tobytes()).hexdigest()


if __name__ == "__main__":
    cell_folder = Path(sys.argv[1])
    run_cell(argparse.Namespace(**json.loads((cell_folder / ARGS_FILE).read_text())))
