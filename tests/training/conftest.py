"""Tiny generated data, a tiny random VAE and an in-process runner for train_scripts/train_fm.py."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

REPO = Path(__file__).resolve().parents[2]
TRAIN_SCRIPT = REPO / "train_scripts" / "train_fm.py"

# a model small enough for a step to take milliseconds
TINY_MODEL = ["--hidden_size", "16", "--num_layers", "2", "--d_state", "4", "--patch_size", "2"]
TINY_RUN = [
    *TINY_MODEL,
    "--train_batch_size",
    "4",
    "--report_to",
    "none",
    "--final_eval",
    "none",
    "--num_inference_steps",
    "2",
    "--resolution",
    "8",
]


def load_module(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[name] = module
    spec.loader.exec_module(module)
    return module


def load_train_script():
    return load_module("train_fm", TRAIN_SCRIPT)


@pytest.fixture(scope="session")
def train_fm():
    return load_train_script()


@pytest.fixture(scope="session")
def check_plain_diffusers_load():
    """tests/pipelines/tiny_pipelines.py's check that a saved folder loads with plain diffusers."""
    return load_module(
        "tiny_pipelines", REPO / "tests" / "pipelines" / "tiny_pipelines.py"
    ).check_plain_diffusers_load


@pytest.fixture
def run_training(train_fm):
    """Run the script's ``main`` in this process with the tiny defaults plus ``extra`` flags."""

    def run(output_dir, *extra: str):
        args = train_fm.parse_args(["--output_dir", str(output_dir), *TINY_RUN, *extra])
        train_fm.main(args)
        return args

    return run


def write_image_folder(root: Path, num_per_class: int = 6, size: int = 8, classes=("cat", "dog")) -> Path:
    """Class sub-folders of small RGB PNGs: class 0 dark, class 1 bright, with seeded texture."""
    rng = np.random.default_rng(0)
    for label, name in enumerate(classes):
        (root / name).mkdir(parents=True, exist_ok=True)
        for i in range(num_per_class):
            base = 60 + 120 * label
            pixels = np.clip(base + rng.integers(-40, 40, (size, size, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(pixels).save(root / name / f"{i}.png")
    return root


@pytest.fixture
def image_folder(tmp_path):
    return write_image_folder(tmp_path / "images")


@pytest.fixture(scope="session")
def tiny_vae_dir(tmp_path_factory):
    """A random 2-level AutoencoderKL (8×8 RGB → 4×4×4 latents) saved to a local folder."""
    import torch
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=(8, 8),
        layers_per_block=1,
        down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
        up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"),
        norm_num_groups=4,
        sample_size=8,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path
