"""The paper's Table 2 at small scale: its ten rows × seeds on matched budgets, as one resumable grid.

A **row** is a scan layout (Zigma-k with k = 1, 2, 4, 8 zigzag paths, or Vision Mamba) with the state chain
off (the baseline) or on (Arcee); rows share every other setting. A **cell** is one (row, seed): one
``train_fm.py`` run (``arcee_diffusers.training.trainer``) in ``<output_dir>/cells/<row>/seed-<seed>/``,
followed by its measurements (``cell.py``). For a given seed every row sees the same data order, noise and
times (common random numbers, see ``trainer.train``).

A **tier** fixes the token grid: ``64`` (8×8 tokens; on the embedded digits 8×8 pixels, patch 1) or
``256`` (16×16 tokens, the paper's count; the digits upsampled to 16×16). On real data the patch size
follows from the model input (pixels, or latents with ``--vae``) and the tier.

``<output_dir>/grid.json`` records the configuration; a rerun with another one is refused, a rerun with the
same one skips finished cells and resumes interrupted ones from their latest checkpoint. ``--from_results``
takes the finished cells of another folder's ``results.json`` (a published grid, say) as finished here, so a
grid carries on from its committed results on a machine that has none of its cell folders.
"""

from __future__ import annotations

import argparse
import copy
import functools
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path

from tqdm.auto import tqdm

from ..training import cli
from . import cell, report
from .rows import PAIRS, ROWS, TIER_GRIDS, row_settings

# the grid's own defaults on top of the small recipe (cli.SMALL_RECIPE); flags given on the command line win
GRID_DEFAULTS = {"num_layers": 8, "checkpointing_steps": 500}
# set per cell by the grid, so not options of it
CELL_OPTIONS = ("seed", "scan_pattern", "num_scan_orders", "state_chain", "resume_from_checkpoint")
# options that do not change a cell's results, so a rerun may change them
RUN_OPTIONS = (
    "output_dir", "logging_dir", "report_to", "checkpointing_steps", "checkpoints_total_limit",
    "checkpoint_at_steps", "validation_steps", "eval_steps", "dataloader_num_workers", "cache_dir",
    "latent_cache_dir", "vae_batch_size", "rows", "seeds", "jobs", "keep_checkpoints", "from_results",
)  # fmt: skip
GRID_FILE = "grid.json"


class CellsFailed(RuntimeError):
    """Some cells run by ``--jobs`` exited with an error (each named, with its log)."""


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """``train_fm.py``'s options (passed on to every cell) plus the grid's."""
    parser = cli.build_parser(description)
    group = parser.add_argument_group("grid")
    group.add_argument(
        "--rows",
        nargs="+",
        default=list(ROWS),
        help="Rows to run; their pairs run in the order first named (default: all ten, in table order).",
    )
    group.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    group.add_argument(
        "--tier", choices=list(TIER_GRIDS), default="64", help="Tokens per image: 64 (8x8) or 256 (16x16)."
    )
    group.add_argument(
        "--jobs", type=int, default=1, help="Cells run at a time, each in its own process with 1 thread."
    )
    group.add_argument(
        "--num_heldout", type=int, default=256, help="Images kept out of training for the per-row loss."
    )
    group.add_argument("--heldout_draws", type=int, default=4, help="(noise, t) draws per held-out image.")
    group.add_argument(
        "--keep_checkpoints", action="store_true", help="Keep finished cells' checkpoints (default: delete)."
    )
    group.add_argument(
        "--from_results",
        default=None,
        help="results.json of a grid of the same configuration (say docs/reproduction/tier64/results.json): "
        "its cells count as finished here and only the others run.",
    )
    parser.set_defaults(seed=None)  # --seeds instead; None tells that --seed was given
    return parser


def parse_grid_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    """The grid's options, checked, with every cell's training options filled in (the cells' own are not)."""
    parser = build_parser(description)
    args = parser.parse_args(argv)
    given = [f"--{name}" for name in CELL_OPTIONS if getattr(args, name) is not None]
    if given:
        raise ValueError(f"{' '.join(given)}: set by the grid for each cell (use --rows and --seeds)")
    if args.class_conditional:
        raise ValueError("class_conditional: the Table 2 grid trains unconditional models")
    if args.push_to_hub:
        raise ValueError("push_to_hub: a grid has many models; push a cell's folder with train_fm.py instead")
    for row in args.rows:
        row_settings(row)
    if len(set(args.rows)) != len(args.rows) or len(set(args.seeds)) != len(args.seeds):
        raise ValueError("rows and seeds must not repeat")
    if args.final_eval == "none":
        raise ValueError("final_eval: every cell is evaluated (digits, or fid with --fid_reference_dir)")
    for name in ("jobs", "num_heldout", "heldout_draws"):
        if getattr(args, name) < 1:
            raise ValueError(f"{name} must be a positive int, got {getattr(args, name)}")

    args.class_conditional = False
    digits = cli.recipe_defaults(args) is cli.DIGITS_DEFAULTS
    # every grid runs the small recipe, on real data too: the paper's (B/2 at 3e-4 for 50k steps on GPUs)
    # would not train a row on two CPU cores
    for key, value in {**cli.SMALL_RECIPE, **GRID_DEFAULTS}.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if args.final_eval is None:
        args.final_eval = "digits" if digits else "fid"
    grid = TIER_GRIDS[args.tier]
    if args.resolution is None:
        args.resolution = grid if digits else cli.recipe_defaults(args)["resolution"]
    args.patch_size = tier_patch_size(args, grid)
    cli.finalize_args(args, parser)
    if args.num_layers < 8 and any(row_settings(row)["num_scan_orders"] == 8 for row in args.rows):
        raise ValueError(
            f"num_layers: the 8-path rows need at least 8 layers to use every path, got {args.num_layers}"
        )
    return args


def tier_patch_size(args: argparse.Namespace, grid: int) -> int:
    """The patch size that gives a ``grid`` × ``grid`` token grid on this data (``--patch_size`` checked)."""
    size, source = args.resolution, f"--resolution {args.resolution}"
    if args.vae is not None:
        from diffusers import AutoencoderKL

        factor = 2 ** (len(AutoencoderKL.load_config(args.vae)["block_out_channels"]) - 1)
        size, source = size // factor, f"{source} through the VAE's {factor}x downsampling"
    if args.patch_size is None and size % grid == 0:
        return size // grid
    if args.patch_size is not None and size == grid * args.patch_size:
        return args.patch_size
    patch = f" with --patch_size {args.patch_size}" if args.patch_size is not None else ""
    raise ValueError(
        f"tier {args.tier} needs {grid}x{grid} tokens, which the {size}x{size} model input "
        f"({source}){patch} does not give"
    )


def configuration(args: argparse.Namespace) -> dict:
    """Everything that decides a cell's results (rows and seeds excepted): a grid folder holds one."""
    return {key: value for key, value in sorted(vars(args).items()) if key not in RUN_OPTIONS}


def check_same_configuration(stored: dict, current: dict, where: str, remedy: str) -> None:
    """Refuse a grid of another configuration, naming every option that differs and what to do. An option
    that the stored grid predates counts as the same while it holds its default here."""
    if stored == current:
        return
    parser = build_parser()
    changes = [
        f"{key} {stored.get(key)!r} there, {current.get(key)!r} here"
        for key in sorted(set(stored) | set(current))
        if stored.get(key, parser.get_default(key)) != current.get(key)
    ]
    if not changes:
        return
    raise ValueError(f"{where} holds a grid of another configuration ({'; '.join(changes)}); {remedy}")


def check_grid_folder(output_dir: Path, args: argparse.Namespace) -> None:
    """Write ``grid.json`` on the first run; refuse a folder that holds a grid of another configuration."""
    path = output_dir / GRID_FILE
    current = configuration(args)
    if path.exists():
        stored = json.loads(path.read_text())["configuration"]
        check_same_configuration(
            stored, current, f"output_dir {str(output_dir)!r}", "use another --output_dir or the same options"
        )
        return
    output_dir.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"configuration": current}, indent=2) + "\n")


def import_finished_cells(results_path: str | Path, output_dir: Path, args: argparse.Namespace) -> None:
    """Write each cell of another grid's ``results.json`` as a finished cell of ``output_dir`` (with its
    row's sample grid where ``samples/<row>.png`` lies beside that file); cells finished here are kept."""
    results_path = Path(results_path)
    if not results_path.is_file():
        raise ValueError(f"from_results: {str(results_path)!r} is not a file; expected a grid's results.json")
    results = json.loads(results_path.read_text())
    check_same_configuration(
        results["configuration"],
        configuration(args),
        f"from_results {str(results_path)!r}",
        "run with that grid's options to carry it on",
    )
    for result in results["cells"]:
        folder = cell.cell_dir(output_dir, result["row"], result["seed"])
        if cell.is_finished(folder):
            continue
        folder.mkdir(parents=True, exist_ok=True)
        samples = results_path.parent / "samples" / f"{result['row']}.png"
        if result["seed"] == results["rows"][result["row"]]["seeds"][0] and samples.is_file():
            shutil.copyfile(samples, folder / "samples.png")  # the report shows each row's first seed
        cell.write_result(folder, result)


def cell_args(grid_args: argparse.Namespace, row: str, seed: int) -> argparse.Namespace:
    """The ``train_fm.py`` options of one cell: the grid's, plus the row's scan layout and the seed."""
    args = copy.copy(grid_args)
    grid_dir = Path(grid_args.output_dir)
    args.output_dir = str(cell.cell_dir(grid_dir, row, seed))
    args.row, args.seed = row, seed
    args.resume_from_checkpoint = "latest"
    args.latent_cache_dir = grid_args.latent_cache_dir or str(grid_dir / "latent_cache")
    vars(args).update(row_settings(row))
    return args


def run_grid(args: argparse.Namespace) -> dict:
    """Run every unfinished cell of ``args.rows`` × ``args.seeds`` in ``cell_order``, writing the report of
    every finished cell in the folder after each cell and at the end (so two invocations with disjoint
    ``--rows`` share one report, and a stopped grid leaves the report of what it finished); returns it."""
    output_dir = Path(args.output_dir)
    check_grid_folder(output_dir, args)
    if args.from_results is not None:
        import_finished_cells(args.from_results, output_dir, args)
    cells = cell_order(args.rows, args.seeds)
    todo = [(row, seed) for row, seed in cells if not cell.is_finished(cell.cell_dir(output_dir, row, seed))]
    progress = tqdm(total=len(cells), initial=len(cells) - len(todo), desc="cells")
    write_report = functools.partial(report.write_report, output_dir, configuration(args))
    failures = []
    if args.jobs == 1:
        for row, seed in todo:
            progress.set_postfix_str(f"{row} seed {seed}")
            cell.run_cell(cell_args(args, row, seed))
            progress.update(1)
            write_report()
    else:
        failures = run_in_processes(args, todo, progress, write_report)
    progress.close()
    results = write_report()
    if failures:
        raise CellsFailed("; ".join(failures) + " (rerun the same command to resume)")
    return results


def cell_order(rows: list[str], seeds: list[int]) -> list[tuple[str, int]]:
    """Pair by pair in the order ``rows`` first names them (the default ``--rows`` is the table's order),
    each pair seed by seed with its two rows next to each other: under ``--jobs 2`` partners train side by
    side (on the same load, so their seconds per step compare), and a grid stopped half-way leaves the
    first pairs whole."""
    pair_of = {row: pair for pair in PAIRS for row in pair}
    pairs = dict.fromkeys(pair_of[row] for row in rows)
    return [(row, seed) for pair in pairs for seed in seeds for row in pair if row in rows]


def run_in_processes(
    args: argparse.Namespace,
    todo: list[tuple[str, int]],
    progress: tqdm,
    on_cell_finished: Callable[[], object],
) -> list[str]:
    """``args.jobs`` cells at a time, each in a ``python -m arcee_diffusers.experiments.cell`` process with
    one thread and its output in ``<cell>/log.txt``; a bar per running cell follows its training log;
    ``on_cell_finished`` runs after each cell that ends well."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
    pending, running, failures = list(todo), {}, []
    # Python takes signal handlers in the main thread only; a grid run from another thread keeps the default
    in_main_thread = threading.current_thread() is threading.main_thread()
    previous_handler = signal.signal(signal.SIGTERM, exit_on_sigterm) if in_main_thread else None
    try:
        while pending or running:
            while pending and len(running) < args.jobs:
                row, seed = pending.pop(0)
                folder = cell.write_cell_args(cell_args(args, row, seed))
                command = [sys.executable, "-m", cell.__name__, str(folder)]
                with open(folder / "log.txt", "ab") as log:
                    process = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT, env=env)
                bar = tqdm(total=args.max_train_steps, desc=f"{row} seed {seed}", leave=False)
                running[process] = (row, seed, folder, bar)
            time.sleep(1)
            for process, (row, seed, folder, bar) in list(running.items()):
                bar.update(cell.steps_done(folder) - bar.n)
                if process.poll() is None:
                    continue
                bar.close()
                del running[process]
                progress.update(1)
                if process.returncode != 0:
                    log = folder / "log.txt"
                    failures.append(f"cell {row} seed {seed} failed (exit {process.returncode}; see {log})")
                else:
                    on_cell_finished()
    finally:
        # interrupted (Ctrl-C, or SIGTERM from a scheduler): stop the cells too, so that a rerun never
        # trains a cell twice at once
        for process in running:
            process.terminate()
            process.wait()
        if in_main_thread:
            signal.signal(signal.SIGTERM, previous_handler)
    return failures


def exit_on_sigterm(signum: int, frame: object) -> None:
    """SIGTERM as an exit that unwinds (Python's default dies on the spot and leaves the cells running)."""
    raise SystemExit(128 + signum)
