"""The report of a Table 2 grid folder, from every finished cell in it: ``results.json``, ``results.md``,
``samples/<row>.png`` and the PNG plots in ``plots/``.

- ``loss_curves.png``: the training loss of each (baseline, Arcee) pair, per seed and averaged;
- ``per_row_loss.png``: the held-out denoising loss per row of the token grid, per pair, with Arcee's chain
  cut at test time;
- ``influence.png``: per row, the gradient norm of the middle output token of path 0 with respect to every
  input patch (log colour scale; exact zeros grey), the part of path 0 scanned up to it outlined;
- ``samples.png``: every row's sample grid side by side.
"""

from __future__ import annotations

import json
import math
import shutil
from pathlib import Path

import numpy as np
from matplotlib.colors import LogNorm
from matplotlib.figure import Figure
from PIL import Image

from ..evaluation import spatial
from ..files import write_atomically
from . import cell
from .rows import PAIRS, PAPER_FID_KID, ROWS, TIER_GRIDS

SAMPLE_METRICS = ("frechet_ratio", "fid", "kid_x1e3")  # lower is better for each
METRIC_NAMES = {"frechet_ratio": "Fréchet ratio", "fid": "FID", "kid_x1e3": "KID×10³"}
LOSS_QUANTITIES = ("mean_loss", "first_row_loss")


def load_cells(grid_dir: Path) -> list[dict]:
    """Every finished cell's result, in table order (row, then seed)."""
    results = [json.loads(p.read_text()) for p in Path(grid_dir).glob(f"cells/*/seed-*/{cell.RESULT_FILE}")]
    return sorted(results, key=lambda r: (ROWS.index(r["row"]), r["seed"]))


def cell_scalars(result: dict) -> dict[str, float]:
    """The numbers of one cell that the table averages over seeds."""
    scalars = {k: v for k, v in result["metrics"].items() if k in (*SAMPLE_METRICS, "nfe")}
    scalars["seconds_per_step"] = result["seconds_per_step"]
    for suffix, key in (("", "per_row_loss"), ("_chain_cut", "per_row_loss_chain_cut")):
        if result[key] is not None:
            scalars[f"mean_loss{suffix}"] = float(np.mean(result[key]))
            scalars[f"first_row_loss{suffix}"] = result[key][first_data_row(result)]
    return scalars


def first_data_row(result: dict) -> int:
    """The token row the "first-row loss" reads: the first that is not padding (a cell written before this
    field was recorded ran on unpadded data: row 0)."""
    return result.get("first_data_row", 0)


def mean_std(values: list[float]) -> dict:
    """Mean, sample standard deviation (None for one value) and count."""
    std = float(np.std(values, ddof=1)) if len(values) > 1 else None
    return {"mean": float(np.mean(values)), "std": std, "n": len(values)}


def summarize(cells: list[dict]) -> dict:
    """Per-row means ± std over seeds, the Arcee/baseline pairs, and whether each seed's rows really saw
    the same first batch."""
    by_row: dict[str, dict[int, dict]] = {}
    for result in cells:
        by_row.setdefault(result["row"], {})[result["seed"]] = result
    rows = {}
    for row, seeds in by_row.items():
        scalars = [cell_scalars(r) for r in seeds.values()]
        first = next(iter(seeds.values()))
        summary = {
            "seeds": sorted(seeds),
            "parameters": first["parameters"],
            "model": first["model"],
            "paper": dict(zip(("fid", "kid_x1e3"), PAPER_FID_KID[row])),
        }
        for key in scalars[0]:
            summary[key] = mean_std([s[key] for s in scalars if s.get(key) is not None])
        for key in ("per_row_loss", "per_row_loss_chain_cut"):
            profiles = np.array([r[key] for r in seeds.values() if r[key] is not None])
            if len(profiles):
                std = profiles.std(0, ddof=1).tolist() if len(profiles) > 1 else None
                summary[key] = {"mean": profiles.mean(0).tolist(), "std": std}
        rows[row] = summary

    pairs = []
    for baseline, arcee in PAIRS:
        if baseline not in by_row or arcee not in by_row:
            continue
        common = sorted(set(by_row[baseline]) & set(by_row[arcee]))
        quantities = [q for q in (*SAMPLE_METRICS, *LOSS_QUANTITIES) if q in rows[baseline]]
        paired = {}
        for q in quantities:
            differences = [
                cell_scalars(by_row[arcee][s])[q] - cell_scalars(by_row[baseline][s])[q] for s in common
            ]
            if differences:
                paired[q] = mean_std(differences)
        pairs.append(
            {
                "baseline": baseline,
                "arcee": arcee,
                "ratio": {q: rows[arcee][q]["mean"] / rows[baseline][q]["mean"] for q in quantities},
                "paired_difference": paired,
                "paired_seeds": common,
                "paper_ratio": {
                    k: rows[arcee]["paper"][k] / rows[baseline]["paper"][k] for k in ("fid", "kid_x1e3")
                },
            }
        )

    first_batches = {}
    for result in cells:
        first_batches.setdefault(result["seed"], set()).add(json.dumps(result["first_batch_sha256"]))
    identical = {str(seed): len(digests) == 1 for seed, digests in sorted(first_batches.items())}
    return {"rows": rows, "pairs": pairs, "first_batch_identical_across_rows": identical}


def write_report(grid_dir: Path, configuration: dict) -> dict:
    """Write ``results.json``, ``results.md``, ``samples/`` and ``plots/`` for the finished cells."""
    grid_dir = Path(grid_dir)
    cells = load_cells(grid_dir)
    results = {"configuration": configuration, **summarize(cells), "cells": cells}
    write_atomically(grid_dir / "results.json", json.dumps(results, indent=2) + "\n")
    if cells:
        (grid_dir / "plots").mkdir(exist_ok=True)
        copy_sample_grids(grid_dir, results)
        plot_loss_curves(cells, grid_dir / "plots" / "loss_curves.png")
        plot_per_row_loss(results, grid_dir / "plots" / "per_row_loss.png")
        plot_influence_maps(cells, grid_dir / "plots" / "influence.png")
        plot_samples(grid_dir, results, grid_dir / "plots" / "samples.png")
    write_atomically(grid_dir / "results.md", results_markdown(results))
    return results


def _format(stats: dict | None, digits: int = 3) -> str:
    if not stats:
        return "–"
    text = f"{stats['mean']:.{digits}g}"
    return text + (f" ± {stats['std']:.2g}" if stats["std"] is not None else "")


def results_markdown(results: dict) -> str:
    """One line per row (mean ± std over seeds, the paper's FID / KID beside it), one per pair."""
    config, rows = results["configuration"], results["rows"]
    grid = TIER_GRIDS[config["tier"]]
    metrics = [m for m in SAMPLE_METRICS if any(m in r for r in rows.values())]
    first_cell = results["cells"][0] if results["cells"] else None
    # the model the cells ran (a size the preset gave is not among the options)
    model = {**config, **(first_cell["model"] if first_cell else {})}
    lines = [
        "# Table 2 at small scale",
        "",
        f"Tier {config['tier']}: a {grid}×{grid} token grid (patch {model['patch_size']}, "
        f"{_data_description(config)}), unconditional, {model['num_layers']} layers, hidden "
        f"{model['hidden_size']}, d_state {model['d_state']}; {config['max_train_steps']} steps of batch "
        f"{config['train_batch_size']}, lr {config['learning_rate']:g} ({config['lr_scheduler']}), "
        f"t {config['weighting_scheme']}, EMA {config['ema_decay']:g} ({config['ema_schedule']}); "
        f"samples at guidance 1 with {_sampler(config)}"
        + (f", {first_cell['metrics']['num_samples']} per cell" if first_cell else "")
        + f"; per-row loss on {config['num_heldout']} held-out images × {config['heldout_draws']} "
        f"(noise, t) draws{_first_row_description(results['cells'])}.",
        "",
    ]
    identical = results["first_batch_identical_across_rows"]
    if identical:
        same = [s for s, ok in identical.items() if ok]
        differ = [s for s, ok in identical.items() if not ok]
        lines += [
            "Common random numbers: the first batch (data, noise, times) was identical across rows for "
            f"seed(s) {', '.join(same) or 'none'}"
            + (f"; it DIFFERED for seed(s) {', '.join(differ)}" if differ else "")
            + ".",
            "",
        ]
    if not rows:
        return "\n".join([*lines, "No finished cells yet.", ""])

    header = ["row", "parameters", "s/step", *(f"{METRIC_NAMES[m]} ↓" for m in metrics), "NFE"]
    header += ["loss", "first-row loss", "chain cut: loss", "chain cut: first row"]
    header += ["paper FID / KID×10³", "seeds"]
    lines += ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row, r in rows.items():
        cells = [row, f"{r['parameters']:,}", _format(r.get("seconds_per_step"), 2)]
        cells += [_format(r.get(m)) for m in metrics] + [_format(r.get("nfe"))]
        cells += [_format(r.get(q)) for q in ("mean_loss", "first_row_loss")]
        cells += [_format(r.get(q)) for q in ("mean_loss_chain_cut", "first_row_loss_chain_cut")]
        cells += [f"{r['paper']['fid']:.2f} / {r['paper']['kid_x1e3']:.2f}", " ".join(map(str, r["seeds"]))]
        lines.append("| " + " | ".join(cells) + " |")

    if results["pairs"]:
        header = ["pair (Arcee / baseline)"]
        header += [f"{METRIC_NAMES[m]}: Arcee / baseline" for m in metrics]
        header += [f"{METRIC_NAMES[m]}: Arcee − baseline (paired by seed)" for m in metrics]
        header += ["loss ratio", "first-row loss ratio", "paper FID ratio", "paper KID ratio"]
        lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
        for pair in results["pairs"]:
            ratio, paired = pair["ratio"], pair["paired_difference"]
            cells = [f"{pair['arcee']} / {pair['baseline']}"]
            cells += [f"{ratio[m]:.3g}" for m in metrics]
            cells += [f"{_format(paired[m])} (n={paired[m]['n']})" if m in paired else "–" for m in metrics]
            cells += [f"{ratio[q]:.3g}" for q in LOSS_QUANTITIES]
            cells += [f"{pair['paper_ratio'][k]:.3g}" for k in ("fid", "kid_x1e3")]
            lines.append("| " + " | ".join(cells) + " |")
    lines += [
        "",
        "Plots: `plots/loss_curves.png`, `plots/per_row_loss.png`, `plots/influence.png`, "
        "`plots/samples.png`; sample grids: `samples/<row>.png`; every number per cell: `results.json`.",
        "",
    ]
    return "\n".join(lines)


def _first_row_description(cells: list[dict]) -> str:
    """Which token row the first-row columns read, where it is not row 0."""
    rows = sorted({first_data_row(c) for c in cells})
    if rows in ([], [0]):
        return ""
    listed = " / ".join(map(str, rows))
    return f"; the first-row columns read token row {listed}, the first that is not padding"


def _data_description(config: dict) -> str:
    """ "digits at 16 px", "fashion_mnist at 32 px (padded)", "imgs at 256 px, VAE latents", ..."""
    source = config.get("dataset_name") or config.get("train_data_dir")
    name = Path(source).name if source else "digits"
    padded = " (padded)" if config.get("pad_to_resolution") else ""
    return f"{name} at {config['resolution']} px{padded}{', VAE latents' if config['vae'] else ''}"


def _sampler(config: dict) -> str:
    # both evaluations sample with --num_inference_steps Euler steps; 0 asks for the paper's dopri5
    steps = config["num_inference_steps"]
    return f"{steps} Euler steps" if steps else "dopri5 (atol 1e-6, rtol 1e-3)"


def _present_pairs(rows) -> list[tuple[str, str]]:
    return [(b, a) for b, a in PAIRS if b in rows and a in rows]


def _subplots(count: int, width: float = 4.0, height: float = 3.2, columns: int = 5):
    columns = min(columns, count)
    figure = Figure(figsize=(width * columns, height * math.ceil(count / columns)), layout="constrained")
    axes = figure.subplots(math.ceil(count / columns), columns, squeeze=False).ravel()
    for ax in axes[count:]:
        ax.set_visible(False)
    return figure, axes


def plot_loss_curves(cells: list[dict], path: Path) -> None:
    by_row: dict[str, list[dict]] = {}
    for result in cells:
        by_row.setdefault(result["row"], []).append(result)
    pairs = _present_pairs(by_row)
    if not pairs:
        return
    figure, axes = _subplots(len(pairs))
    for ax, pair in zip(axes, pairs):
        for row, colour in zip(pair, ("tab:blue", "tab:orange")):
            curves = [r["train_loss"] for r in by_row[row]]
            for curve in curves:
                ax.plot(curve["step"], curve["loss"], color=colour, alpha=0.3, linewidth=0.8)
            length = min(len(c["loss"]) for c in curves)
            mean = np.mean([c["loss"][:length] for c in curves], axis=0)
            ax.plot(curves[0]["step"][:length], mean, color=colour, label=row)
        ax.set(title=" vs ".join(pair), xlabel="step", ylabel="training loss", yscale="log")
        ax.legend()
    figure.savefig(path, dpi=100)


def plot_per_row_loss(results: dict, path: Path) -> None:
    rows = results["rows"]
    pairs = _present_pairs(rows)
    if not pairs:
        return
    figure, axes = _subplots(len(pairs))
    for ax, (baseline, arcee) in zip(axes, pairs):
        lines = [
            (baseline, "per_row_loss", "tab:blue", "-"),
            (arcee, "per_row_loss", "tab:orange", "-"),
            (arcee, "per_row_loss_chain_cut", "tab:orange", "--"),
        ]
        for row, key, colour, style in lines:
            if key not in rows[row]:
                continue
            mean = np.array(rows[row][key]["mean"])
            grid_rows = np.arange(len(mean))
            label = row + (" (chain cut at test time)" if key.endswith("chain_cut") else "")
            ax.plot(grid_rows, mean, color=colour, linestyle=style, marker="o", markersize=3, label=label)
            if rows[row][key]["std"] is not None:
                std = np.array(rows[row][key]["std"])
                ax.fill_between(grid_rows, mean - std, mean + std, color=colour, alpha=0.15)
        ax.set(title=f"{arcee} vs {baseline}", xlabel="row of the token grid", ylabel="held-out loss")
        ax.legend(fontsize=7)
    figure.savefig(path, dpi=100)


def plot_influence_maps(cells: list[dict], path: Path) -> None:
    first_seed = {}
    for result in cells:
        first_seed.setdefault(result["row"], result)
    figure, axes = _subplots(len(first_seed), width=3.2, height=3.2)
    for ax, (row, result) in zip(axes, first_seed.items()):
        influence = np.array(result["influence"]["map"])
        grid = influence.shape[0]
        token, scanned = spatial.middle_token_of_path(grid, result["influence"]["path_index"])
        positive = influence[influence > 0]
        norm = None
        if positive.size:  # every non-zero value in colour, however small
            norm = LogNorm(vmin=max(positive.min(), positive.max() * 1e-8), vmax=positive.max())
        image = ax.imshow(np.ma.masked_equal(influence, 0), norm=norm, cmap=_influence_cmap())
        _outline(ax, scanned)
        ax.plot(*divmod(token, grid)[::-1], marker="*", color="cyan", markersize=10)
        ax.set(title=f"{row} (seed {result['seed']})", xticks=[], yticks=[])
        figure.colorbar(image, ax=ax, shrink=0.8)
    figure.suptitle(
        "gradient norm of the starred output token w.r.t. each input patch\n"
        "(outline: path 0 scanned up to the token; grey: exactly 0)",
        fontsize=9,
    )
    figure.savefig(path, dpi=100)


def _outline(ax, mask: np.ndarray) -> None:
    """Draw the pixel-edge boundary of a boolean ``(H, W)`` mask shown with ``imshow``."""
    padded = np.pad(mask, 1)
    for r, c in zip(*np.nonzero(mask)):
        for dr, dc, xs, ys in (
            (-1, 0, (c - 0.5, c + 0.5), (r - 0.5, r - 0.5)),
            (1, 0, (c - 0.5, c + 0.5), (r + 0.5, r + 0.5)),
            (0, -1, (c - 0.5, c - 0.5), (r - 0.5, r + 0.5)),
            (0, 1, (c + 0.5, c + 0.5), (r - 0.5, r + 0.5)),
        ):
            if not padded[r + 1 + dr, c + 1 + dc]:
                ax.plot(xs, ys, color="cyan", linewidth=1.5)


def _influence_cmap():
    import matplotlib

    return matplotlib.colormaps["magma"].with_extremes(bad="lightgrey")


def copy_sample_grids(grid_dir: Path, results: dict) -> None:
    """``samples/<row>.png``: the sample grid of each row's first seed."""
    (grid_dir / "samples").mkdir(exist_ok=True)
    for row, summary in results["rows"].items():
        source = cell.cell_dir(grid_dir, row, summary["seeds"][0]) / "samples.png"
        if source.exists():
            shutil.copyfile(source, grid_dir / "samples" / f"{row}.png")


def plot_samples(grid_dir: Path, results: dict, path: Path) -> None:
    rows = [row for row in results["rows"] if (grid_dir / "samples" / f"{row}.png").exists()]
    if not rows:
        return
    figure, axes = _subplots(len(rows), width=3.2, height=3.4)
    for ax, row in zip(axes, rows):
        image = np.asarray(Image.open(grid_dir / "samples" / f"{row}.png").convert("L"))
        ax.imshow(image, cmap="gray", vmin=0, vmax=255)
        ax.set(title=f"{row} (seed {results['rows'][row]['seeds'][0]})", xticks=[], yticks=[])
    figure.savefig(path, dpi=100)
