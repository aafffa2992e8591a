"""MNIST-format (idx) files to a local 🤗 dataset, and the padded 32×32 layout of the Fashion-MNIST grid."""

from __future__ import annotations

import gzip

import datasets
import numpy as np
import pytest
import torch
from PIL import Image

from arcee_diffusers.training.data import image_transform
from arcee_diffusers.training.idx_data import (
    FASHION_MNIST_CLASSES,
    read_idx,
    read_idx_split,
    write_idx,
    write_idx_dataset,
)


def write_standin(folder, num_train=12, num_test=6, seed=0):
    """Random 28×28 images and labels in the four idx files of the MNIST family."""
    rng = np.random.default_rng(seed)
    folder.mkdir(parents=True, exist_ok=True)
    arrays = {}
    for prefix, count in (("train", num_train), ("t10k", num_test)):
        arrays[prefix] = rng.integers(0, 256, (count, 28, 28)), rng.integers(0, 10, count)
        write_idx(folder / f"{prefix}-images-idx3-ubyte.gz", arrays[prefix][0])
        write_idx(folder / f"{prefix}-labels-idx1-ubyte.gz", arrays[prefix][1])
    return arrays


def test_idx_round_trip_and_the_published_header(tmp_path):
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    write_idx(tmp_path / "x-idx3-ubyte.gz", images)
    raw = gzip.decompress((tmp_path / "x-idx3-ubyte.gz").read_bytes())
    assert raw[:16] == bytes([0, 0, 8, 3, 0, 0, 0, 2, 0, 0, 0, 3, 0, 0, 0, 4])  # the format's own header
    np.testing.assert_array_equal(read_idx(tmp_path / "x-idx3-ubyte.gz"), images)
    write_idx(tmp_path / "y-idx1-ubyte", np.array([3, 1]))  # not gzipped
    np.testing.assert_array_equal(read_idx(tmp_path / "y-idx1-ubyte"), [3, 1])


def test_dataset_folder_loads_like_the_hub_copy(tmp_path):
    arrays = write_standin(tmp_path / "idx")
    folder = write_idx_dataset(tmp_path / "idx", tmp_path / "fashion_mnist")
    loaded = datasets.load_dataset(str(folder))  # what --dataset_name does
    assert set(loaded) == {"train", "test"} and (len(loaded["train"]), len(loaded["test"])) == (12, 6)
    assert loaded["train"].features["label"].names == list(FASHION_MNIST_CLASSES)
    for split, prefix in (("train", "train"), ("test", "t10k")):
        images, labels = arrays[prefix]
        first = loaded[split][0]
        assert first["image"].mode == "L" and first["image"].size == (28, 28)
        np.testing.assert_array_equal(np.array(first["image"]), images[0])
        assert loaded[split]["label"] == labels.tolist()


@pytest.mark.parametrize(
    "damage, message",
    [
        (
            lambda path: path.write_bytes(gzip.compress(b"\0\0\x08\x05" + bytes(8))),
            "not an unsigned-byte idx",
        ),
        (
            lambda path: path.write_bytes(gzip.compress(gzip.decompress(path.read_bytes())[:-5])),
            "header says",
        ),
        (lambda path: path.write_bytes(path.read_bytes()[:40]), "cannot be read"),
    ],
)
def test_a_damaged_file_is_one_clear_error(tmp_path, damage, message):
    write_standin(tmp_path)
    damage(tmp_path / "train-images-idx3-ubyte.gz")
    with pytest.raises(ValueError, match=message) as error:
        read_idx_split(tmp_path, "train")
    assert "train-images-idx3-ubyte.gz" in str(error.value) and "\n" not in str(error.value)


def test_missing_files_and_mismatched_counts(tmp_path):
    with pytest.raises(FileNotFoundError, match="t10k-images-idx3-ubyte.gz' does not exist"):
        read_idx_split(tmp_path, "test")
    write_standin(tmp_path)
    write_idx(tmp_path / "t10k-labels-idx1-ubyte.gz", np.zeros(5))
    with pytest.raises(ValueError, match=r"test split .* \(6, 28, 28\) images do not match \(5,\) labels"):
        read_idx_split(tmp_path, "test")


def test_padding_keeps_every_pixel_and_adds_a_black_border():
    garment = np.random.default_rng(0).integers(0, 256, (28, 28)).astype(np.uint8)
    padded = image_transform(32, pad=True)(Image.fromarray(garment, mode="L"))
    assert padded.shape == (1, 32, 32)
    expected = torch.tensor(garment, dtype=torch.float32) / 255 * 2 - 1
    torch.testing.assert_close(padded[0, 2:30, 2:30], expected)
    border = torch.ones(32, 32, dtype=torch.bool)
    border[2:30, 2:30] = False
    assert (padded[0][border] == -1).all()  # black, the data's background
    resized = image_transform(32)(Image.fromarray(garment, mode="L"))  # the default resizes instead
    assert not torch.equal(resized[0, 2:30, 2:30], expected)
