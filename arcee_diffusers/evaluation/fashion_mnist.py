"""A download-free FID feature space for Fashion-MNIST: a small CNN trained once on its training split.

clean-fid's Inception weights cannot be downloaded here, so, as for the digits, samples are compared in the
feature space of a classifier of the data itself: ``conv 1→32 → pool → conv 32→64 → pool → 128 → 10``
(3×3 convolutions, ReLU), trained on the 60,000 training images for ``EPOCHS`` epochs of Adam (lr 1e-3,
batch 128) from seed 0 on one thread, so that a given torch build rebuilds it bit for bit. Its 128-d
penultimate pre-activations, over their standard deviation on the training split, are the features. It is
cached under ``default_cache_dir()/classifiers/``,
keyed by the training files' bytes, the recipe and the torch version; its test-split accuracy is stored
with it (``GarmentFeatures.test_accuracy``).

``feature_extractor()`` is ``train_fm.py``'s and ``eval_fid.py``'s
``--fid_feature_extractor arcee_diffusers.evaluation.fashion_mnist:feature_extractor``: clean-fid hands it
``(B, 3, 299, 299)`` batches in [0, 255] (its ``mode="clean"`` bicubic resize of each image), which it turns
back into the 32×32 padded layout (grey, area resize), crops to the 28×28 garment and classifies. The data
come from ``$FASHION_MNIST_DIR``, default Debian's ``/usr/share/datasets/fashion-mnist``.

``write_fid_folders`` writes the two real-image folders of the Fréchet ratio (``train_fm.py``'s
``--fid_reference_dir`` and ``--fid_real_dir``): two disjoint, class-stratified halves of the test split,
padded to 32×32 as the models see them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from safetensors.torch import load_file, save_file
from torch import nn

from ..files import atomic_path, write_atomically
from ..training.idx_data import FASHION_MNIST_DIR, SPLIT_FILES, read_idx_split
from .digits import stratified_halves
from .fid import default_cache_dir
from .threads import single_thread

DATA_DIR_ENV_VAR = "FASHION_MNIST_DIR"
RESOLUTION, GARMENT = 32, 28  # the models' padded layout, and the garment inside it
EPOCHS, BATCH_SIZE, LEARNING_RATE, SEED = 2, 128, 1e-3, 0


def data_dir() -> Path:
    return Path(os.environ.get(DATA_DIR_ENV_VAR) or FASHION_MNIST_DIR)


def pad_to_resolution(images: np.ndarray) -> np.ndarray:
    """``(N, 28, 28)`` → ``(N, 32, 32)``: a border of 2 background (0) pixels, as ``--pad_to_resolution``."""
    margin = (RESOLUTION - images.shape[-1]) // 2
    return np.pad(images, ((0, 0), (margin, margin), (margin, margin)))


class GarmentClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.convolutions = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )  # fmt: skip
        self.body = nn.Linear(64 * 7 * 7, 128)
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(128, 10))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """``(B, 28, 28)`` in [0, 1] → ``(B, 128)`` penultimate pre-activations."""
        return self.body(self.convolutions(images[:, None].float()).flatten(1))

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_classifier(images: np.ndarray, labels: np.ndarray, epochs: int = EPOCHS) -> GarmentClassifier:
    """Train on ``(N, 28, 28)`` uint8 images; deterministic for a given torch build."""
    x, y = torch.tensor(images, dtype=torch.float32) / 255, torch.tensor(labels, dtype=torch.long)
    generator = torch.Generator().manual_seed(SEED)
    with torch.random.fork_rng(), single_thread():
        torch.manual_seed(SEED)
        model = GarmentClassifier()
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        for _ in range(epochs):
            for batch in torch.randperm(len(x), generator=generator).split(BATCH_SIZE):
                loss = F.cross_entropy(model(x[batch]), y[batch])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
    return model.eval().requires_grad_(False)


@torch.no_grad()
def _features(model: GarmentClassifier, images: np.ndarray) -> torch.Tensor:
    return torch.cat([model.features(torch.tensor(chunk) / 255) for chunk in np.array_split(images, 20)])


def accuracy(model: GarmentClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    logits = model.head(_features(model, images))
    return float((logits.argmax(1).numpy() == labels).mean())


def _cache_key(folder: Path) -> str:
    digest = hashlib.sha256(f"{EPOCHS}-{BATCH_SIZE}-{LEARNING_RATE}-{SEED}-{torch.__version__}".encode())
    for name in ("images-idx3-ubyte.gz", "labels-idx1-ubyte.gz"):
        digest.update((folder / f"{SPLIT_FILES['train']}-{name}").read_bytes())
    return digest.hexdigest()[:32]


class GarmentFeatures(nn.Module):
    """clean-fid's feature extractor: ``(B, 3, 299, 299)`` in [0, 255] → ``(B, 128)`` classifier features,
    divided by their standard deviation over the training split (``feature_scale``), so that KID's cubic
    kernel sees features of unit scale, as Inception's are (FID ratios do not depend on it)."""

    def __init__(self, classifier: GarmentClassifier, test_accuracy: float, feature_scale: float):
        super().__init__()
        self.classifier = classifier
        self.test_accuracy = test_accuracy
        self.feature_scale = feature_scale

    @torch.no_grad()
    def forward(self, batch: torch.Tensor) -> torch.Tensor:
        grey = batch.float().mean(1, keepdim=True) / 255
        images = F.adaptive_avg_pool2d(grey, RESOLUTION)[:, 0]
        margin = (RESOLUTION - GARMENT) // 2
        return self.classifier.features(images[:, margin:-margin, margin:-margin]) / self.feature_scale


def load_or_train_features(
    folder: str | os.PathLike | None = None, cache_dir: str | os.PathLike | None = None
) -> GarmentFeatures:
    """The classifier features of the Fashion-MNIST in ``folder`` (default ``data_dir()``), trained on first
    use and cached with their test accuracy."""
    folder = Path(folder or data_dir())
    cache = Path(cache_dir or default_cache_dir()) / "classifiers" / f"fashion-mnist-{_cache_key(folder)}"
    weights, info = cache.with_suffix(".safetensors"), cache.with_suffix(".json")
    classifier = GarmentClassifier()
    if weights.is_file() and info.is_file():
        classifier.load_state_dict(load_file(weights))
        stored = json.loads(info.read_text())
    else:
        train_images, train_labels = read_idx_split(folder, "train")
        classifier = train_classifier(train_images, train_labels)
        stored = {
            "test_accuracy": accuracy(classifier, *read_idx_split(folder, "test")),
            "feature_scale": float(_features(classifier, train_images).std()),
            "epochs": EPOCHS,
            "seed": SEED,
        }
        cache.parent.mkdir(parents=True, exist_ok=True)
        with atomic_path(weights) as tmp:
            save_file(classifier.state_dict(), tmp)
        write_atomically(info, json.dumps(stored) + "\n")
    classifier = classifier.eval().requires_grad_(False)
    return GarmentFeatures(classifier, stored["test_accuracy"], stored["feature_scale"])


@functools.cache
def feature_extractor() -> GarmentFeatures:
    """``--fid_feature_extractor arcee_diffusers.evaluation.fashion_mnist:feature_extractor``."""
    return load_or_train_features()


def write_fid_folders(
    output_dir: str | os.PathLike, num_real: int, folder: str | os.PathLike | None = None
) -> tuple[Path, Path]:
    """``<output_dir>/reference`` (test half A, every image) and ``<output_dir>/real`` (the first
    ``num_real`` of test half B, as many as the samples it is compared with), as 32×32 PNGs."""
    images, labels = read_idx_split(folder or data_dir(), "test")
    half_a, half_b = stratified_halves(labels)
    if num_real > len(half_b):
        raise ValueError(f"num_real: test half B has {len(half_b)} images, asked for {num_real}")
    padded = pad_to_resolution(images)
    written = []
    for name, indices in (("reference", half_a), ("real", half_b[:num_real])):
        target = Path(output_dir) / name
        target.mkdir(parents=True, exist_ok=True)
        for index in indices:
            Image.fromarray(padded[index], mode="L").save(target / f"{index:05d}.png")
        written.append(target)
    return written[0], written[1]
