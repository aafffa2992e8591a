"""A tiny Fashion-MNIST stand-in in the Debian package's idx layout: ten classes of 28×28 images, class k a
bright horizontal band near rows 2k + 4 to 2k + 7 (position, length and brightness drawn per image) over dim
noise, so that a classifier can tell them apart and each class still varies."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from arcee_diffusers.training.idx_data import write_idx


def band_images(labels: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    images = rng.integers(0, 40, (len(labels), 28, 28))
    for image, label in zip(images, labels):
        top, left, right = 2 * label + 4 + rng.integers(-1, 2), rng.integers(1, 6), rng.integers(22, 27)
        image[top : top + 4, left:right] += rng.integers(150, 216)
    return images.astype(np.uint8)


def write_fashion_standin(folder: Path, num_train: int = 400, num_test: int = 400) -> Path:
    rng = np.random.default_rng(0)
    folder.mkdir(parents=True, exist_ok=True)
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        labels = rng.integers(0, 10, count)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", band_images(labels, rng))
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", labels)
    return folder
