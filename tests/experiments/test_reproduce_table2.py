"""train_scripts/reproduce_table2.py on tiny models: the report's fields, skipping and resuming cells, matched
budgets, the influence maps, and the grid's errors."""

from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import psutil
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file
from tqdm.auto import tqdm

from arcee_diffusers.evaluation import fashion_mnist, spatial
from arcee_diffusers.experiments import cell, report, rows, table2
from arcee_diffusers.training import checkpointing, cli, idx_data, trainer

SCRIPT = Path(__file__).resolve().parents[2] / "train_scripts" / "reproduce_table2.py"
TINY_MODEL = ["--hidden_size", "16", "--num_layers", "2", "--d_state", "4", "--train_batch_size", "8"]
TINY = [
    *TINY_MODEL, "--num_inference_steps", "2", "--report_to", "none", "--num_heldout", "16",
    "--max_train_steps", "4", "--checkpointing_steps", "2",
]  # fmt: skip


def run_grid(output_dir, *extra):
    return table2.run_grid(table2.parse_grid_args(["--output_dir", str(output_dir), *TINY, *extra]))


@pytest.fixture(scope="module")
def two_row_grid(tmp_path_factory):
    output_dir = tmp_path_factory.mktemp("grid")
    results = run_grid(output_dir, "--rows", "zigma-1", "arcee-1", "--seeds", "0")
    return output_dir, results


def test_results_have_every_field(two_row_grid):
    output_dir, results = two_row_grid
    assert json.loads((output_dir / "results.json").read_text()) == results
    assert list(results["rows"]) == ["zigma-1", "arcee-1"]
    for row, summary in results["rows"].items():
        assert summary["seeds"] == [0] and summary["parameters"] > 0
        for key in ("frechet_ratio", "nfe", "mean_loss", "first_row_loss", "seconds_per_step"):
            assert summary[key]["n"] == 1 and np.isfinite(summary[key]["mean"]), (row, key)
        assert summary["nfe"]["mean"] == 2 and len(summary["per_row_loss"]["mean"]) == 8
        assert summary["paper"] == dict(zip(("fid", "kid_x1e3"), rows.PAPER_FID_KID[row]))
    assert "mean_loss_chain_cut" in results["rows"]["arcee-1"]
    assert "mean_loss_chain_cut" not in results["rows"]["zigma-1"]

    (pair,) = results["pairs"]
    assert (pair["baseline"], pair["arcee"]) == ("zigma-1", "arcee-1")
    assert set(pair["ratio"]) == {"frechet_ratio", "mean_loss", "first_row_loss"}
    assert pair["paired_difference"]["frechet_ratio"]["n"] == 1
    assert pair["paper_ratio"]["fid"] == pytest.approx(15.33 / 82.81)

    for result in results["cells"]:
        assert result["metrics"]["num_samples"] == 901  # as many as real half B, at guidance 1
        assert result["train_steps"] == 4 and result["train_loss"]["step"] == [1, 2, 3, 4]
        assert len(result["train_loss"]["loss"]) == 4 and result["resumed_from_step"] == []
        assert result["model"]["patch_size"] == 1 and result["model"]["sample_size"] == 8
        assert result["first_data_row"] == 0  # the digits are not padded
        assert result["model"]["state_chain"] == (result["row"] == "arcee-1")
        assert np.array(result["influence"]["map"]).shape == (8, 8)
        assert result["heldout"] == {"images": 16, "draws_per_image": 4, "seed": 0}
        folder = cell.cell_dir(output_dir, result["row"], 0)
        assert not checkpointing.list_checkpoints(folder)  # deleted once the cell finished

    markdown = (output_dir / "results.md").read_text()
    for text in ("| zigma-1 |", "| arcee-1 |", "| arcee-1 / zigma-1 |", "82.81 / 88.69", "Fréchet ratio ↓"):
        assert text in markdown
    for name in ("loss_curves", "per_row_loss", "influence", "samples"):
        assert Image.open(output_dir / "plots" / f"{name}.png").size[0] > 100
    for row in ("zigma-1", "arcee-1"):
        assert (output_dir / "samples" / f"{row}.png").is_file()


def test_matched_budgets_same_first_batch_noise_and_times(two_row_grid):
    output_dir, results = two_row_grid
    first_batch, args = {}, {}
    for row in ("zigma-1", "arcee-1"):
        folder = cell.cell_dir(output_dir, row, 0)
        first_batch[row] = json.loads((folder / cell.FIRST_BATCH_FILE).read_text())
        args[row] = json.loads((folder / cell.ARGS_FILE).read_text())
    zigma, arcee = first_batch["zigma-1"], first_batch["arcee-1"]
    assert zigma == arcee and set(zigma) == {"data", "noise", "times"}
    assert results["first_batch_identical_across_rows"] == {"0": True}
    differing = {key for key in args["zigma-1"] if args["zigma-1"][key] != args["arcee-1"][key]}
    assert differing == {"row", "state_chain", "output_dir"}  # the same budget, batch and LR schedule


def tiny_train_args(output_dir, *extra):
    argv = ["--output_dir", str(output_dir), *TINY_MODEL, "--max_train_steps", "1", "--report_to", "none"]
    return cli.parse_args([*argv, "--no-class_conditional", "--patch_size", "1", *extra])


def first_step(args):
    """One training step of the model ``args`` describe; its data, noise and times."""
    seen = []
    accelerator = trainer.make_accelerator(args)
    data = trainer.build_train_dataset(args, accelerator)
    model = trainer.build_model(args, data.channels, data.sample_size, data.num_classes)
    trainer.train(args, accelerator, data, model, on_step=seen.append)
    accelerator.end_training()
    return seen[0]


def test_different_architectures_draw_the_same_noise_and_times(tmp_path):
    # Vision Mamba has more parameters than Zigma: its initialisation draws more random numbers
    zigma = first_step(tiny_train_args(tmp_path / "a"))
    vim = first_step(tiny_train_args(tmp_path / "b", "--scan_pattern", "bidirectional"))
    other_seed = first_step(tiny_train_args(tmp_path / "c", "--seed", "1"))
    for name in ("x1", "noise", "t"):
        assert torch.equal(getattr(zigma, name), getattr(vim, name)), name
        assert not torch.equal(getattr(zigma, name), getattr(other_seed, name)), name


def test_influence_maps_zigma_1_causal_arcee_1_not(two_row_grid):
    _, results = two_row_grid
    maps = {r["row"]: (np.array(r["influence"]["map"]), r["influence"]["token"]) for r in results["cells"]}
    token, scanned = spatial.middle_token_of_path(8)
    assert maps["zigma-1"][1] == maps["arcee-1"][1] == token
    zigma, arcee = maps["zigma-1"][0], maps["arcee-1"][0]
    assert np.all(zigma[~scanned] == 0) and np.all(zigma[scanned] > 0)
    assert np.all(arcee[~scanned] > 0)


def test_rerun_skips_finished_cells(two_row_grid, monkeypatch):
    output_dir, results = two_row_grid
    result_files = [cell.cell_dir(output_dir, r, 0) / cell.RESULT_FILE for r in ("zigma-1", "arcee-1")]
    stamps = [p.stat().st_mtime_ns for p in result_files]
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("trained a finished cell"))
    again = run_grid(output_dir, "--rows", "zigma-1", "arcee-1", "--seeds", "0", "--jobs", "2")
    assert [p.stat().st_mtime_ns for p in result_files] == stamps
    assert again["rows"] == results["rows"]


def test_grid_carries_on_from_another_folders_results(two_row_grid, tmp_path, monkeypatch):
    output_dir, results = two_row_grid
    monkeypatch.setattr(trainer, "train", lambda *a, **k: pytest.fail("trained a cell the results held"))
    published = output_dir / "results.json"
    carried = run_grid(
        tmp_path, "--rows", "zigma-1", "arcee-1", "--seeds", "0", "--from_results", str(published)
    )
    assert carried == results
    for row in ("zigma-1", "arcee-1"):
        assert (tmp_path / "samples" / f"{row}.png").read_bytes() == (
            output_dir / "samples" / f"{row}.png"
        ).read_bytes()

    args = parse(tmp_path, *TINY, "--rows", "zigma-1", "--max_train_steps", "5")
    with pytest.raises(
        ValueError,
        match=r"from_results .* another configuration \(max_train_steps 4 there, 5 here\); run with that",
    ):
        table2.import_finished_cells(published, tmp_path / "other", args)
    with pytest.raises(
        ValueError, match="from_results: '.*missing.json' is not a file; expected a grid's results"
    ):
        table2.import_finished_cells(tmp_path / "missing.json", tmp_path / "other", args)


def test_cells_run_pair_by_pair_with_partners_together_and_report_after_each(tmp_path, monkeypatch):
    ran = []
    reported = tmp_path / "results.md"
    monkeypatch.setattr(cell, "run_cell", lambda args: ran.append((args.row, args.seed, reported.is_file())))
    run_grid(tmp_path, "--rows", "arcee-vim", "arcee-1", "vim", "zigma-1", "--seeds", "0", "1")
    assert [(row, seed) for row, seed, _ in ran] == [
        ("vim", 0), ("arcee-vim", 0), ("vim", 1), ("arcee-vim", 1),
        ("zigma-1", 0), ("arcee-1", 0), ("zigma-1", 1), ("arcee-1", 1),
    ]  # fmt: skip
    assert [report_before for *_, report_before in ran] == [False] + [True] * 7
    assert table2.cell_order(["zigma-1", "vim"], [2]) == [("zigma-1", 2), ("vim", 2)]
    assert table2.cell_order(["vim", "zigma-1"], [2]) == [("vim", 2), ("zigma-1", 2)]
    assert table2.cell_order(list(rows.ROWS), [0])[:4] == [(row, 0) for row in rows.ROWS[:4]]


def test_killed_cell_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    save = checkpointing.save_checkpoint

    def save_then_die(accelerator, output_dir, step, *limits):
        path = save(accelerator, output_dir, step, *limits)
        if step == 4:
            raise KeyboardInterrupt  # as if killed right after writing checkpoint-4
        return path

    common = ["--rows", "zigma-1", "--seeds", "0", "--max_train_steps", "6"]
    monkeypatch.setattr(checkpointing, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        run_grid(tmp_path / "grid", *common)
    folder = cell.cell_dir(tmp_path / "grid", "zigma-1", 0)
    assert not cell.is_finished(folder) and (folder / "checkpoint-4").is_dir()
    assert cell.steps_done(folder) == 4
    monkeypatch.undo()

    resumed = run_grid(tmp_path / "grid", *common)["cells"][0]
    reference = run_grid(tmp_path / "reference", *common)["cells"][0]
    assert resumed["resumed_from_step"] == [4] and reference["resumed_from_step"] == []
    assert resumed["train_loss"] == reference["train_loss"]
    assert [r["step"] for r in cell.read_log(folder)] == [1, 2, 3, 4, 5, 6]
    weights = [
        load_file(cell.cell_dir(tmp_path / grid, "zigma-1", 0) / "transformer" / name)
        for grid in ("grid", "reference")
        for name in ("diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.raw.safetensors")
    ]
    for a, b in ((weights[0], weights[2]), (weights[1], weights[3])):
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_cell_killed_after_training_is_finished_without_more_steps(tmp_path, monkeypatch):
    def die(*args, **kwargs):
        raise KeyboardInterrupt  # killed while evaluating, after the last checkpoint

    common = ["--rows", "arcee-1", "--seeds", "0", "--max_train_steps", "6"]
    monkeypatch.setattr(trainer, "finish", die)
    with pytest.raises(KeyboardInterrupt):
        run_grid(tmp_path, *common)
    monkeypatch.undo()
    (result,) = run_grid(tmp_path, *common)["cells"]
    assert result["train_steps"] == 6 and result["train_loss"]["step"] == [1, 2, 3, 4, 5, 6]
    assert result["resumed_from_step"] == []  # nothing left to train: no step ran in the second process


def parse(tmp_path, *extra):
    return table2.parse_grid_args(["--output_dir", str(tmp_path / "grid"), *extra])


def test_tiers(tmp_path):
    default = parse(tmp_path)
    assert (default.resolution, default.patch_size, default.num_layers) == (8, 1, 8)
    assert default.class_conditional is False and default.guidance_scale == 1.0
    assert default.final_eval == "digits" and default.rows == list(rows.ROWS)
    tier_256 = parse(tmp_path, "--tier", "256")
    assert (tier_256.resolution, tier_256.patch_size) == (16, 1)
    folder = tmp_path / "images"
    folder.mkdir()
    real = parse(tmp_path, "--train_data_dir", str(folder), "--fid_reference_dir", str(folder))
    assert (real.resolution, real.patch_size, real.final_eval) == (256, 32, "fid")


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--rows", "zigma-1", "zigma-3"], "rows: unknown row 'zigma-3'; expected some of zigma-1 arcee-1"),
        (["--tier", "256", "--resolution", "8"], "tier 256 needs 16x16 tokens, which the 8x8 model input"),
        (
            ["--patch_size", "2"],
            r"tier 64 needs 8x8 tokens, which the 8x8 model input \(--resolution 8\) with --patch_size 2",
        ),
        (["--seed", "3"], "--seed: set by the grid for each cell"),
        (["--state_chain"], "--state_chain: set by the grid"),
        (["--num_layers", "6"], "num_layers: the 8-path rows need at least 8 layers"),
        (["--class_conditional"], "class_conditional: the Table 2 grid trains unconditional models"),
    ],
)
def test_bad_grids_name_the_culprit(tmp_path, extra, message):
    with pytest.raises(ValueError, match=message):
        parse(tmp_path, *extra)


def test_folder_of_another_configuration_is_refused(tmp_path):
    table2.check_grid_folder(tmp_path / "grid", parse(tmp_path, "--max_train_steps", "100"))
    table2.check_grid_folder(tmp_path / "grid", parse(tmp_path, "--max_train_steps", "100", "--rows", "vim"))
    refused = r"another configuration \(max_train_steps 100 there, 200 here\); use another --output_dir"
    with pytest.raises(ValueError, match=refused):
        table2.check_grid_folder(tmp_path / "grid", parse(tmp_path, "--max_train_steps", "200"))


def test_cli_error_is_one_line(tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    command = [sys.executable, str(SCRIPT), "--output_dir", str(tmp_path), "--rows", "arcee-3"]
    process = subprocess.run(command, capture_output=True, text=True, env=env)
    assert process.returncode != 0
    assert process.stderr.strip().splitlines() == [
        "reproduce_table2.py: error: rows: unknown row 'arcee-3'; expected some of " + " ".join(rows.ROWS)
    ]


def test_report_of_a_partial_grid(tmp_path):
    args = argparse.Namespace(**vars(parse(tmp_path)))
    results = report.write_report(tmp_path, table2.configuration(args))
    assert results["rows"] == {} and results["pairs"] == []
    assert "No finished cells yet." in (tmp_path / "results.md").read_text()


@pytest.fixture
def latent_data(tmp_path, monkeypatch):
    """16×16 RGB images, a random 2× VAE (8×8 latents) and the offline FID feature extractor."""
    from diffusers import AutoencoderKL

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "evaluation"))
    rng = np.random.default_rng(0)
    images = tmp_path / "images"
    images.mkdir()
    for i in range(24):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8, 8), layers_per_block=1, norm_num_groups=4, latent_channels=4,
        down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
    )  # fmt: skip
    vae.save_pretrained(tmp_path / "vae")
    return [
        "--train_data_dir", str(images), "--vae", str(tmp_path / "vae"), "--resolution", "16",
        "--fid_reference_dir", str(images), "--fid_num_samples", "6",
        "--fid_feature_extractor", "fid_test_extractors:mean_colour_extractor", "--num_heldout", "4",
    ]  # fmt: skip


def test_real_data_grid_scores_fid_and_shares_the_latent_cache(tmp_path, latent_data, monkeypatch):
    grid = tmp_path / "grid"
    first = run_grid(grid, *latent_data, "--rows", "zigma-1", "--seeds", "0")
    (result,) = first["cells"]
    assert result["model"]["in_channels"] == 4 and result["model"]["patch_size"] == 1  # 8×8 latents
    assert result["metrics"]["num_samples"] == 6 and result["metrics"]["fid"] > 0
    assert np.isfinite(result["metrics"]["kid_x1e3"]) and "FID ↓" in (grid / "results.md").read_text()
    assert len(list((grid / "latent_cache").glob("*.safetensors"))) == 1

    # a second invocation with other rows reuses the cache and reports both
    monkeypatch.setattr("arcee_diffusers.training.latents.encode_dataset", lambda *a, **k: pytest.fail())
    both = run_grid(grid, *latent_data, "--rows", "arcee-1", "--seeds", "0")
    assert list(both["rows"]) == ["zigma-1", "arcee-1"] and len(both["pairs"]) == 1
    assert both["pairs"][0]["ratio"].keys() == {"fid", "kid_x1e3", "mean_loss", "first_row_loss"}
    with pytest.raises(ValueError, match="tier 256 needs 16x16 tokens, which the 8x8 model input"):
        parse(tmp_path, *latent_data, "--tier", "256")


@pytest.mark.slow
def test_two_cells_at_a_time_in_their_own_processes(tmp_path, two_row_grid):
    results = run_grid(tmp_path / "grid", "--rows", "zigma-1", "arcee-1", "--seeds", "0", "--jobs", "2")
    assert [r["row"] for r in results["cells"]] == ["zigma-1", "arcee-1"]
    assert all(r["threads"] == 1 for r in results["cells"])
    in_process = {r["row"]: r for r in two_row_grid[1]["cells"]}
    for result in results["cells"]:
        assert result["first_batch_sha256"] == in_process[result["row"]]["first_batch_sha256"]
        assert (cell.cell_dir(tmp_path / "grid", result["row"], 0) / "log.txt").stat().st_size > 0


def test_terminated_grid_stops_its_cells(tmp_path):
    env = {**os.environ, "TQDM_DISABLE": "1"}
    options = [
        *TINY, "--max_train_steps", "100000", "--rows", "zigma-1", "arcee-1", "--seeds", "0", "--jobs", "2",
    ]  # fmt: skip
    grid = subprocess.Popen([sys.executable, str(SCRIPT), "--output_dir", str(tmp_path), *options], env=env)
    folders = [cell.cell_dir(tmp_path, row, 0) for row in ("zigma-1", "arcee-1")]
    deadline = time.monotonic() + 240
    while not all(cell.steps_done(folder) > 0 for folder in folders):
        assert grid.poll() is None and time.monotonic() < deadline, "the cells never started training"
        time.sleep(0.5)
    cells = psutil.Process(grid.pid).children()
    assert len(cells) == 2
    grid.terminate()
    _, alive = psutil.wait_procs(cells, timeout=60)
    for process in alive:
        process.kill()
    assert not alive, "cells still training after their grid was terminated"
    assert grid.wait(timeout=60) == 128 + signal.SIGTERM


def test_cells_in_processes_run_from_another_thread(tmp_path):
    # Python refuses signal handlers outside the main thread; the grid must not need one there
    args = parse(tmp_path, "--jobs", "2")
    returned = []
    progress = tqdm(disable=True)
    thread = threading.Thread(
        target=lambda: returned.append(table2.run_in_processes(args, [], progress, print))
    )
    thread.start()
    thread.join()
    assert returned == [[]]  # no failures, and no exception in the thread


def test_fashion_mnist_grid_on_a_standin(tmp_path, monkeypatch):
    """The real-data route end to end at the paper's token count: idx files → dataset folder, 28×28 grey
    padded to 32×32 with patch 2 (256 tokens), the classifier's Fréchet ratio, the small recipe, a report
    that shows the values used."""
    rng = np.random.default_rng(0)
    idx = tmp_path / "idx"
    idx.mkdir()
    for prefix, count in (("train", 48), ("t10k", 40)):
        idx_data.write_idx(idx / f"{prefix}-images-idx3-ubyte.gz", rng.integers(0, 256, (count, 28, 28)))
        idx_data.write_idx(idx / f"{prefix}-labels-idx1-ubyte.gz", np.arange(count) % 10)
    dataset = idx_data.write_idx_dataset(idx, tmp_path / "fashion_mnist")
    reference, real = fashion_mnist.write_fid_folders(tmp_path / "fid", 6, idx)
    monkeypatch.setenv(fashion_mnist.DATA_DIR_ENV_VAR, str(idx))
    monkeypatch.setenv("ARCEE_DIFFUSERS_CACHE", str(tmp_path / "cache"))
    fashion_mnist.feature_extractor.cache_clear()
    try:
        results = run_grid(
            tmp_path / "grid", "--dataset_name", str(dataset), "--resolution", "32", "--pad_to_resolution",
            "--tier", "256", "--fid_reference_dir", str(reference), "--fid_real_dir", str(real),
            "--fid_num_samples", "6", "--num_heldout", "8", "--rows", "zigma-1", "arcee-1", "--seeds", "0",
            "--fid_feature_extractor", "arcee_diffusers.evaluation.fashion_mnist:feature_extractor",
        )  # fmt: skip
    finally:
        fashion_mnist.feature_extractor.cache_clear()
    config = results["configuration"]
    assert (config["learning_rate"], config["lr_scheduler"], config["patch_size"]) == (3e-3, "cosine", 2)
    for result in results["cells"]:
        model = result["model"]
        assert (model["in_channels"], model["sample_size"], model["patch_size"]) == (1, 32, 2)
        metrics = result["metrics"]
        assert metrics["num_samples"] == 6 and metrics["frechet_ratio"] > 0 and metrics["fid_real"] > 0
        assert len(result["per_row_loss"]) == 16  # a 16×16 token grid
        assert result["first_data_row"] == 1  # row 0 is the 2-pixel border
    assert results["pairs"][0]["ratio"].keys() == {
        "frechet_ratio",
        "fid",
        "kid_x1e3",
        "mean_loss",
        "first_row_loss",
    }
    header = (tmp_path / "grid" / "results.md").read_text()
    assert "fashion_mnist at 32 px (padded)" in header and "2 layers, hidden 16, d_state 4" in header
    assert "the first-row columns read token row 1, the first that is not padding" in header
    (zigma,) = (result for result in results["cells"] if result["row"] == "zigma-1")
    assert results["rows"]["zigma-1"]["first_row_loss"]["mean"] == zigma["per_row_loss"][1]
    assert "lr 0.003 (cosine)" in header and "2 Euler steps" in header
