"""recipes/celebahq256: every script parses, each row's command is the published run (the README's table), a
missing input fails with one line, and each row trains a few updates at a tiny size on generated images
(one CPU process, every other flag of the row) and is scored by eval.sh with an offline feature extractor."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from arcee_diffusers.experiments.rows import ROWS
from arcee_diffusers.models.variants import TABLE2_VARIANTS

REPO = Path(__file__).resolve().parents[2]
RECIPES = REPO / "recipes" / "celebahq256"
SCRIPTS = sorted(RECIPES.glob("*.sh"))
QUICK_ROWS = ("arcee-1", "arcee-vim")  # one per launch layout by default; the other rows are `slow`
TINY = [
    "--hidden_size", "16", "--num_layers", "8", "--d_state", "4", "--resolution", "16",
    "--max_train_steps", "3", "--train_batch_size", "2", "--report_to", "none",
]  # fmt: skip
TINY_EVAL = ["--num_samples", "4", "--feature_extractor", "fid_test_extractors:mean_colour_extractor"]
TINY_EVAL_STEP = "2"
# the paper's recipe (SPEC.md §5): the same in every row
PAPER_FLAGS = {
    "--resolution": "256", "--path": "gvp", "--weighting_scheme": "uniform", "--learning_rate": "3e-4",
    "--lr_scheduler": "constant", "--adam_weight_decay": "0", "--max_grad_norm": "2.0",
    "--ema_decay": "0.9999", "--ema_schedule": "constant", "--mixed_precision": "no",
    "--checkpoint_at_steps": "50001", "--vae": "stabilityai/sd-vae-ft-ema",
}  # fmt: skip
PAPER_SWITCHES = ("--random_flip", "--dataloader_drop_last", "--allow_tf32", "--no-class_conditional")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    """Eight 16×16 RGB images and a random 2× VAE (8×8 latents) on disk."""
    root = tmp_path_factory.mktemp("inputs")
    images = root / "images"
    images.mkdir()
    rng = np.random.default_rng(0)
    for i in range(8):
        Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)).save(images / f"{i}.png")
    sys.path.insert(0, str(REPO / "tests" / "pipelines"))
    try:
        from tiny_pipelines import tiny_vae
    finally:
        sys.path.pop(0)
    tiny_vae().save_pretrained(root / "vae")
    return root


def recipe_env(inputs: Path, output_root: Path, **overrides: str) -> dict[str, str]:
    """The scripts' variables pointing at ``inputs``, the venv's tools on PATH, nothing from the network."""
    env = {k: v for k, v in os.environ.items() if k not in ("DRY_RUN", "NUM_PROCESSES", "EVAL_STEP")}
    env.update(
        PATH=f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}",
        DATA_DIR=str(inputs / "images"),
        VAE=str(inputs / "vae"),
        FID_REF_DIR=str(inputs / "images"),
        OUTPUT_ROOT=str(output_root),
        LATENT_CACHE_DIR=str(output_root / "latent_cache"),
        PYTHONPATH=str(REPO / "tests" / "evaluation"),  # fid_test_extractors
        ARCEE_DIFFUSERS_CACHE=str(output_root / "cache"),
        HF_HUB_OFFLINE="1",
        HF_DATASETS_OFFLINE="1",
        HF_DATASETS_CACHE=str(output_root / "datasets_cache"),
    )
    env.update(overrides)
    return env


def run_script(script: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["bash", str(RECIPES / script), *args], env=env, capture_output=True, text=True, timeout=600
    )


def dry_run(script: str, *args: str, env: dict[str, str]) -> list[str]:
    result = run_script(script, *args, env={**env, "DRY_RUN": "1"})
    assert result.returncode == 0, result.stderr
    return shlex.split(result.stdout)


def options(words: list[str]) -> dict[str, str | None]:
    """``--flag value`` pairs and bare ``--switch`` es of a command line, in order (the last one wins)."""
    found = {}
    for i, word in enumerate(words):
        if word.startswith("--"):
            following = words[i + 1] if i + 1 < len(words) else "--"
            found[word] = None if following.startswith("--") else following
    return found


def readme_rows() -> dict[str, dict[str, str]]:
    """The README's per-row table, keyed by row name."""
    lines = (RECIPES / "README.md").read_text().splitlines()
    header = next(line for line in lines if line.startswith("| script |"))
    columns = [cell.strip().replace("`", "") for cell in header.strip("|").split("|")]
    rows = {}
    for line in lines:
        if match := re.match(r"\| `([a-z0-9-]+)\.sh` \|", line):
            cells = [cell.strip().replace("`", "") for cell in line.strip().strip("|").split("|")]
            rows[match.group(1)] = dict(zip(columns, cells))
    return rows


def test_every_script_parses():
    names = {script.stem for script in SCRIPTS}
    assert names == {*ROWS, "common", "eval"}
    for script in SCRIPTS:
        result = subprocess.run(["bash", "-n", str(script)], capture_output=True, text=True)
        assert result.returncode == 0, (script.name, result.stderr)


@pytest.mark.parametrize("row", ROWS)
def test_launch_and_eval_commands_are_the_readme_table(row, inputs, tmp_path):
    env = recipe_env(inputs, tmp_path)
    del env["VAE"], env["FID_REF_DIR"]  # their defaults: the Hub's SD-VAE, the training images
    published = readme_rows()[row]
    command = dry_run(f"{row}.sh", env=env)
    script_at = command.index(str(REPO / "train_scripts" / "train_fm.py"))
    launcher, flags = command[:script_at], options(command[script_at + 1 :])
    processes, launch = published["processes"], options(launcher)
    assert launcher[:2] == ["accelerate", "launch"] and "--multi_gpu" in launch
    assert launch["--num_processes"] == processes and launch["--mixed_precision"] == "no"
    assert flags["--model_config"] == str(REPO / published["--model_config"])
    # the row's template is the variant table's entry for that row
    (variant,) = [variant for variant in TABLE2_VARIANTS if variant.row == row]
    assert published["--model_config"] == f"hub_configs/{variant.name}/transformer"
    for flag in ("--max_train_steps", "--train_batch_size", "--gradient_accumulation_steps"):
        assert flags[flag] == published[flag], flag
    per_process = int(flags["--train_batch_size"]) * int(flags["--gradient_accumulation_steps"])
    assert int(processes) * per_process == 192
    assert {k: flags[k] for k in PAPER_FLAGS} == PAPER_FLAGS
    assert all(k in flags and flags[k] is None for k in PAPER_SWITCHES)
    assert flags["--output_dir"] == str(tmp_path / row)
    readme = (RECIPES / "README.md").read_text()
    assert all(flag in readme for flag in (*flags, *launch)), "a flag the README does not list"

    config = json.loads((REPO / published["--model_config"] / "config.json").read_text())
    assert config["d_state"] == 256 and config["hidden_size"] == 768 and config["patch_size"] == 2
    assert config["state_chain"] == row.startswith("arcee")
    is_vim = row.endswith("vim")
    assert config["scan_pattern"] == ("bidirectional" if is_vim else "zigzag")
    assert config["num_layers"] == (20 if is_vim else 24)
    assert config["num_scan_orders"] == (1 if is_vim else int(row.split("-")[1]))

    checkpoint = tmp_path / row / "checkpoint-50001" / "transformer_ema"
    checkpoint.mkdir(parents=True)
    (tmp_path / row / "model_index.json").write_text("{}")
    command = dry_run("eval.sh", row, env=env)
    assert command[:2] == ["python", str(REPO / "train_scripts" / "eval_fid.py")]
    flags = options(command[2:])
    assert flags["--transformer"] == str(checkpoint) and flags["--reference_dir"] == env["DATA_DIR"]
    assert flags["--batch_size"] == published["eval --batch_size"]
    evaluation = {"--num_samples": "50000", "--num_inference_steps": "0", "--atol": "1e-6", "--rtol": "1e-3"}
    assert {k: flags[k] for k in evaluation} == evaluation and "--allow_tf32" in flags
    assert all(flag in readme for flag in flags)


def test_a_missing_input_fails_with_one_line(inputs, tmp_path):
    env = recipe_env(inputs, tmp_path / "out")
    (tmp_path / "no_config").mkdir()
    (tmp_path / "out" / "zigma-1").mkdir(parents=True)
    cases = [
        ("zigma-1.sh", (), {"DATA_DIR": str(tmp_path / "missing")}, "DATA_DIR '.*missing' is not a folder"),
        ("zigma-1.sh", (), {"VAE": "./nowhere"}, "VAE './nowhere' is neither a folder nor a Hub repo id"),
        ("vim.sh", (), {"VAE": str(tmp_path / "no_config")}, "VAE '.*no_config' has no config.json"),
        ("eval.sh", (), {}, "usage: eval.sh ROW"),
        ("eval.sh", ("zigma-3",), {}, "unknown row 'zigma-3'; expected one of: zigma-1 .* arcee-vim$"),
        ("eval.sh", ("zigma-1",), {"FID_REF_DIR": "nope"}, "FID_REF_DIR 'nope' is not a folder"),
        ("eval.sh", ("zigma-1",), {}, "out/zigma-1' holds no finished run: train it with zigma-1.sh first"),
    ]
    for script, args, overrides, message in cases:
        result = run_script(script, *args, env={**env, **overrides})
        assert result.returncode == 1 and result.stdout == "", (script, overrides)
        (line,) = result.stderr.splitlines()
        assert re.search(f"^{script}: error: .*{message}", line), line
    (tmp_path / "out" / "zigma-1" / "model_index.json").write_text("{}")
    result = run_script("eval.sh", "zigma-1", env=env)
    assert result.returncode == 1 and "checkpoint-50001/transformer_ema' is missing" in result.stderr


@pytest.mark.parametrize(
    "row", [row if row in QUICK_ROWS else pytest.param(row, marks=pytest.mark.slow) for row in ROWS]
)
def test_row_trains_and_evaluates_at_a_tiny_size(row, inputs, tmp_path):
    env = recipe_env(inputs, tmp_path, NUM_PROCESSES="1", EVAL_STEP=TINY_EVAL_STEP)
    trained = run_script(f"{row}.sh", *TINY, env=env)
    assert trained.returncode == 0, trained.stderr[-3000:]
    published = readme_rows()[row]
    accumulation = int(published["--gradient_accumulation_steps"])
    assert f"total batch {2 * accumulation}, 3 steps" in trained.stderr  # one process × 2 × accumulation

    run_dir = tmp_path / row
    hub_config = json.loads((REPO / published["--model_config"] / "config.json").read_text())
    config = json.loads((run_dir / "transformer" / "config.json").read_text())
    for key in ("scan_pattern", "num_scan_orders", "state_chain", "backward_dt_init", "num_classes"):
        assert config[key] == hub_config[key], key
    assert (config["d_state"], config["num_layers"], config["sample_size"]) == (4, 8, 8)
    ema = json.loads((run_dir / "checkpoint-2" / "transformer_ema" / "config.json").read_text())
    assert ema["decay"] == ema["min_decay"] == 0.9999 and ema["optimization_step"] == 2  # constant EMA

    scored = run_script("eval.sh", row, *TINY_EVAL, env=env)
    assert scored.returncode == 0, scored.stderr[-3000:]
    metrics = json.loads((run_dir / "fid-step2.json").read_text())
    assert metrics["transformer"] == str(run_dir / "checkpoint-2" / "transformer_ema")
    assert metrics["solver"] == "dopri5 (adaptive, atol 1e-06, rtol 0.001)" and metrics["nfe"] >= 6
    assert metrics["num_generated"] == 4 and np.isfinite(metrics["fid"]) and np.isfinite(metrics["kid_x1e3"])
    assert len(list((run_dir / "samples-step2").glob("*.png"))) == 4
