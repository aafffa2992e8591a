"""MNIST-format (idx) image sets as local 🤗 datasets: Fashion-MNIST from Debian's ``dataset-fashion-mnist``.

``write_idx_dataset`` turns the four idx files of a set (``train-images-idx3-ubyte.gz``,
``train-labels-idx1-ubyte.gz``, ``t10k-images-idx3-ubyte.gz``, ``t10k-labels-idx1-ubyte.gz``) into a folder
laid out like a Hub dataset repo: ``data/train-00000-of-00001.parquet`` and
``data/test-00000-of-00001.parquet`` with an ``image`` column (grey PNGs, 28×28 as published) and a ``label``
``ClassLabel``. So ``datasets.load_dataset(folder)`` and ``train_fm.py --dataset_name folder`` read it
offline exactly as they read the Hub's copy (``--dataset_name zalando-datasets/fashion_mnist``): same
splits, columns and class names.
"""

from __future__ import annotations

import gzip
import os
from pathlib import Path

import datasets
import numpy as np
from PIL import Image

from ..files import atomic_path

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"  # Debian's dataset-fashion-mnist
FASHION_MNIST_CLASSES = (
    "T - shirt / top", "Trouser", "Pullover", "Dress", "Coat",
    "Sandal", "Shirt", "Sneaker", "Bag", "Ankle boot",
)  # fmt: skip
# split name -> idx file prefix, as the MNIST family publishes them
SPLIT_FILES = {"train": "train", "test": "t10k"}
IDX_IMAGES, IDX_LABELS = 0x0803, 0x0801  # magic numbers: unsigned bytes, 3 and 1 dimensions


def read_idx(path: str | os.PathLike) -> np.ndarray:
    """An idx file (gzipped or not) as a uint8 array: ``(N, rows, cols)`` images or ``(N,)`` labels."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"idx file {str(path)!r} does not exist")
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rb") as file:
            data = file.read()
    except (OSError, EOFError) as err:
        raise ValueError(f"idx file {str(path)!r} cannot be read: {err}") from None
    magic = int.from_bytes(data[:4], "big") if len(data) >= 4 else None
    if magic not in (IDX_IMAGES, IDX_LABELS):
        raise ValueError(f"idx file {str(path)!r} is not an unsigned-byte idx file (magic {magic!r})")
    ndim = magic & 0xFF
    shape = tuple(int.from_bytes(data[4 + 4 * i : 8 + 4 * i], "big") for i in range(ndim))
    offset = 4 + 4 * ndim
    if len(data) != offset + int(np.prod(shape)):
        raise ValueError(
            f"idx file {str(path)!r} holds {len(data) - offset} bytes of data, its header says {shape}"
        )
    return np.frombuffer(data, np.uint8, offset=offset).reshape(shape)


def write_idx(path: str | os.PathLike, array: np.ndarray) -> None:
    """Write a uint8 array of 1 (labels) or 3 (images) dimensions as an idx file, gzipped if ``path`` ends in
    ``.gz``: the inverse of ``read_idx`` (for subsets, and for tests' stand-ins)."""
    array = np.ascontiguousarray(array, dtype=np.uint8)
    magic = {1: IDX_LABELS, 3: IDX_IMAGES}.get(array.ndim)
    if magic is None:
        raise ValueError(f"array must have 1 (labels) or 3 (images) dimensions, got shape {array.shape}")
    header = magic.to_bytes(4, "big") + b"".join(n.to_bytes(4, "big") for n in array.shape)
    opener = gzip.open if str(path).endswith(".gz") else open
    with opener(path, "wb") as file:
        file.write(header + array.tobytes())


def read_idx_split(idx_dir: str | os.PathLike, split: str) -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 28, 28) uint8, labels (N,) uint8)`` of ``split`` (``"train"`` or ``"test"``)."""
    if split not in SPLIT_FILES:
        raise ValueError(f"split must be one of {list(SPLIT_FILES)}, got {split!r}")
    prefix = Path(idx_dir) / SPLIT_FILES[split]
    images = read_idx(f"{prefix}-images-idx3-ubyte.gz")
    labels = read_idx(f"{prefix}-labels-idx1-ubyte.gz")
    if images.ndim != 3 or labels.ndim != 1 or len(images) != len(labels):
        raise ValueError(
            f"{split} split of {str(idx_dir)!r}: {images.shape} images do not match {labels.shape} labels"
        )
    return images, labels


def idx_split_dataset(
    idx_dir: str | os.PathLike, split: str, class_names: tuple[str, ...] = FASHION_MNIST_CLASSES
) -> datasets.Dataset:
    """One split as a ``datasets.Dataset`` with ``image`` (grey PIL images) and ``label`` (``ClassLabel``)."""
    images, labels = read_idx_split(idx_dir, split)
    if labels.max(initial=0) >= len(class_names):
        raise ValueError(f"{split} split of {str(idx_dir)!r} has label {labels.max()}, beyond {class_names}")
    features = datasets.Features({"image": datasets.Image(), "label": datasets.ClassLabel(names=class_names)})
    return datasets.Dataset.from_dict(
        {"image": [Image.fromarray(image, mode="L") for image in images], "label": labels.tolist()},
        features=features,
    )


def write_idx_dataset(
    idx_dir: str | os.PathLike = FASHION_MNIST_DIR,
    output_dir: str | os.PathLike = "data/fashion_mnist",
    class_names: tuple[str, ...] = FASHION_MNIST_CLASSES,
) -> Path:
    """Write both splits of an idx set as ``<output_dir>/data/<split>-00000-of-00001.parquet``; returns
    ``output_dir``, which ``datasets.load_dataset`` (and ``--dataset_name``) reads."""
    output_dir = Path(output_dir)
    (output_dir / "data").mkdir(parents=True, exist_ok=True)
    for split in SPLIT_FILES:
        dataset = idx_split_dataset(idx_dir, split, class_names)
        target = output_dir / "data" / f"{split}-00000-of-00001.parquet"
        with atomic_path(target) as tmp:
            dataset.to_parquet(str(tmp))
    return output_dir
