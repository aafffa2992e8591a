"""Training data: any 🤗 dataset with an image column, a local image folder, or the embedded digits.

Every source ends up as a ``datasets.Dataset`` whose transform yields ``pixel_values`` in [-1, 1] and, when
the data has labels, integer ``class_labels``. Images are decoded lazily by our own transform so that an
unreadable file is reported by name instead of deep inside the data loader.
"""

from __future__ import annotations

import io
import os
from collections.abc import Callable
from pathlib import Path

import datasets
import numpy as np
import torch
from PIL import Image
from torchvision import transforms

IMAGE_EXTENSIONS = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp"}


def load_digits_dataset() -> datasets.Dataset:
    """scikit-learn's bundled handwritten digits (1,797 grey 8×8 images, 10 classes) as a labelled dataset.

    The bundled pixels take 17 grey levels (0–16); they are stored as 8-bit PNGs with ``round(v * 255 / 16)``.
    """
    from sklearn.datasets import load_digits

    digits = load_digits()
    levels = np.rint(digits.images * (255 / 16)).astype(np.uint8)
    features = datasets.Features(
        {"image": datasets.Image(), "label": datasets.ClassLabel(names=[str(d) for d in range(10)])}
    )
    images = [Image.fromarray(img, mode="L") for img in levels]
    return datasets.Dataset.from_dict({"image": images, "label": digits.target.tolist()}, features=features)


def load_train_dataset(
    dataset_name: str | None = None,
    dataset_config_name: str | None = None,
    train_data_dir: str | os.PathLike | None = None,
    cache_dir: str | None = None,
    split: str = "train",
) -> datasets.Dataset:
    """A Hub/local dataset by name, an image folder (labels from sub-folders), or the embedded digits."""
    if dataset_name is not None:
        dataset = datasets.load_dataset(dataset_name, dataset_config_name, cache_dir=cache_dir, split=split)
        source = f"dataset {dataset_name!r}"
    elif train_data_dir is not None:
        root = Path(train_data_dir)
        if not root.is_dir():
            raise FileNotFoundError(f"train_data_dir {str(root)!r} does not exist or is not a directory")
        if not any(p.suffix.lower() in IMAGE_EXTENSIONS for p in root.rglob("*") if p.is_file()):
            raise ValueError(f"train_data_dir {str(root)!r} contains no images")
        dataset = datasets.load_dataset("imagefolder", data_dir=str(root), cache_dir=cache_dir, split=split)
        source = f"train_data_dir {str(root)!r}"
    else:
        dataset = load_digits_dataset()
        source = "the digits dataset"
    if len(dataset) == 0:
        raise ValueError(f"{source} is empty")
    return dataset


def check_columns(dataset: datasets.Dataset, image_column: str, label_column: str | None) -> None:
    for name, column in (("image_column", image_column), ("label_column", label_column)):
        if column is not None and column not in dataset.column_names:
            raise ValueError(f"{name} {column!r} not found; the dataset has columns {dataset.column_names}")


def num_classes_of(dataset: datasets.Dataset, label_column: str) -> int:
    """Number of classes: the ``ClassLabel`` size, else ``max(label) + 1`` for integer labels."""
    feature = dataset.features[label_column]
    if isinstance(feature, datasets.ClassLabel):
        return feature.num_classes
    if not isinstance(feature, datasets.Value) or not feature.dtype.startswith("int"):
        raise ValueError(f"label_column {label_column!r} must hold integer class ids, got {feature}")
    return int(max(dataset[label_column])) + 1


def _open_image(value: dict | Image.Image, index: int) -> Image.Image:
    if isinstance(value, Image.Image):
        return value
    name = value.get("path") or f"row {index}"
    try:
        image = Image.open(io.BytesIO(value["bytes"]) if value.get("bytes") else value["path"])
        image.load()
    except Exception as err:  # PIL raises several unrelated types for bad files
        raise ValueError(f"cannot read image {name}: {type(err).__name__}: {err}") from None
    return image


def image_mode_of(dataset: datasets.Dataset, image_column: str) -> str:
    """``"L"`` when the first image is greyscale, else ``"RGB"``; every image is converted to it."""
    first = dataset.cast_column(image_column, datasets.Image(decode=False))[0][image_column]
    return "L" if _open_image(first, 0).mode in ("1", "L", "I", "I;16", "F") else "RGB"


def image_transform(resolution: int, center_crop: bool = True, pad: bool = False) -> Callable:
    """PIL image → tensor in [-1, 1]: resize the short side, then a center (or random) square crop. With
    ``pad`` nothing is resized: a smaller image is padded to ``resolution`` with black (0, the background of
    the MNIST family), centred, and a larger one center-cropped.

    Random flips are not here but in :func:`random_hflip`, applied by the training step: the data loader
    prefetches a batch ahead, so randomness drawn while loading would escape the checkpointed RNG state.
    """
    if pad:  # CenterCrop pads a smaller image with zeros
        fit = [transforms.CenterCrop(resolution)]
    else:
        fit = [
            transforms.Resize(resolution, interpolation=transforms.InterpolationMode.BILINEAR),
            transforms.CenterCrop(resolution) if center_crop else transforms.RandomCrop(resolution),
        ]
    return transforms.Compose([*fit, transforms.ToTensor(), transforms.Normalize([0.5], [0.5])])


def random_hflip(images: torch.Tensor) -> torch.Tensor:
    """Mirror each image of ``(B, C, H, W)`` with probability 1/2 (global torch RNG)."""
    flip = torch.rand(images.shape[0], device=images.device) < 0.5
    return torch.where(flip[:, None, None, None], images.flip(-1), images)


def with_image_transform(
    dataset: datasets.Dataset,
    transform: Callable,
    image_column: str = "image",
    label_column: str | None = None,
    mode: str = "RGB",
) -> datasets.Dataset:
    """Attach a lazy transform producing ``pixel_values`` (and ``class_labels`` when ``label_column``)."""
    dataset = dataset.cast_column(image_column, datasets.Image(decode=False))

    def apply(batch: dict) -> dict:
        images = [_open_image(v, i).convert(mode) for i, v in enumerate(batch[image_column])]
        out = {"pixel_values": [transform(image) for image in images]}
        if label_column is not None:
            out["class_labels"] = batch[label_column]
        return out

    return dataset.with_transform(apply)


# A deterministic transform of a dataset this small is run once and kept as tensors (the digits: 0.5 MB)
IN_MEMORY_BYTES = 256 * 2**20


class TensorImageDataset(torch.utils.data.Dataset):
    """Transformed images (and labels) held as tensors, items like :func:`with_image_transform`'s."""

    def __init__(self, pixel_values: torch.Tensor, class_labels: torch.Tensor | None = None):
        self.pixel_values, self.class_labels = pixel_values, class_labels

    def __len__(self) -> int:
        return self.pixel_values.shape[0]

    def __getitem__(self, index: int) -> dict:
        item = {"pixel_values": self.pixel_values[index]}
        if self.class_labels is not None:
            item["class_labels"] = int(self.class_labels[index])
        return item


def in_memory(dataset: datasets.Dataset, channels: int, resolution: int) -> torch.utils.data.Dataset:
    """A dataset with a deterministic transform (:func:`with_image_transform`, center crop) as tensors,
    when they fit in ``IN_MEMORY_BYTES``; else the dataset itself. Decoding and resizing every image at
    every step cost a digits training step ~12 ms, a fifth of it."""
    if len(dataset) * channels * resolution * resolution * 4 > IN_MEMORY_BYTES:
        return dataset
    pixels, labels = [], []
    for start in range(0, len(dataset), 256):
        batch = dataset[start : start + 256]
        pixels += batch["pixel_values"]
        labels += batch.get("class_labels", [])
    class_labels = torch.tensor(labels, dtype=torch.long) if labels else None
    return TensorImageDataset(torch.stack(pixels), class_labels)


def collate(examples: list[dict]) -> dict[str, torch.Tensor]:
    """Stack tensors (``pixel_values`` or ``latents``) and turn ``class_labels`` into a long tensor."""
    return {
        key: torch.stack([e[key] for e in examples])
        if torch.is_tensor(examples[0][key])
        else torch.tensor([e[key] for e in examples], dtype=torch.long)
        for key in examples[0]
    }
