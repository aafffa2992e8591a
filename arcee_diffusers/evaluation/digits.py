"""A download-free metric for the embedded digits: a small classifier trained on scikit-learn's digits.

The classifier is an MLP ``64 → 128 → 64 → 10`` (ReLU) on the flattened 8×8 image in [0, 1], trained
full-batch with Adam (lr 2e-3, weight decay 1e-4) for 300 steps with Gaussian input noise (std 0.1), from
seed 0, on all 1,797 digits: one to two seconds on one CPU core. Trained the same way on one half of
the digits it scores ≈ 97 % on the other half.

It gives two numbers at the digits' native 8×8:

- **conditional accuracy**: the share of class-conditional samples that it assigns to their class;
- **Fréchet distance** between Gaussians fitted to its 64-d penultimate pre-activations (FID's formula in this
  feature space), measured against real half A and compared with the distance of real half B to half A
  (``frechet_ratio``). The two halves are a fixed, class-stratified split of the 1,797 digits, so a
  generator that matches the data should reach a ratio near 1 with as many samples as half B has.
"""

from __future__ import annotations

import functools

import numpy as np
import torch
import torch.nn.functional as F
from cleanfid.fid import frechet_distance
from torch import nn

from .threads import single_thread


def load_real_digits() -> tuple[np.ndarray, np.ndarray]:
    """``(images (N, 8, 8) in [0, 1], labels (N,))``, quantised to 8 bits exactly as the dataset's PNGs."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    return np.rint(digits.images * (255 / 16)) / 255, digits.target


def stratified_halves(labels: np.ndarray, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices (sorted) of two disjoint, class-stratified halves of a labelled set (half A, half B): the
    reference and the real-data comparison of a Fréchet ratio."""
    rng = np.random.default_rng(seed)
    half_a, half_b = [], []
    for label in np.unique(labels):
        members = rng.permutation(np.flatnonzero(labels == label))
        half_a.append(members[: len(members) // 2])
        half_b.append(members[len(members) // 2 :])
    return np.sort(np.concatenate(half_a)), np.sort(np.concatenate(half_b))


def real_halves(seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Indices of two disjoint, class-stratified halves of the real digits (half A, half B)."""
    return stratified_halves(load_real_digits()[1], seed)


class DigitClassifier(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.Linear(128, 64))
        self.head = nn.Sequential(nn.ReLU(), nn.Linear(64, 10))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        """(B, 8, 8) in [0, 1] → (B, 64) penultimate pre-activations (dense, unlike the ReLU outputs)."""
        return self.body(images.reshape(images.shape[0], 64).float())

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images))


def train_digit_classifier(
    indices: np.ndarray | None = None, steps: int = 300, seed: int = 0
) -> DigitClassifier:
    """Deterministic for a given torch build: seeded init and noise, full-batch Adam."""
    images, labels = load_real_digits()
    if indices is not None:
        images, labels = images[indices], labels[indices]
    x = torch.tensor(images, dtype=torch.float32)
    y = torch.tensor(labels)
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        model = DigitClassifier()
    optimizer = torch.optim.Adam(model.parameters(), lr=2e-3, weight_decay=1e-4)
    with single_thread():
        for _ in range(steps):
            noisy = x + 0.1 * torch.randn(x.shape, generator=generator)
            loss = F.cross_entropy(model(noisy), y)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
    return model.eval().requires_grad_(False)


@functools.cache
def default_digit_classifier() -> DigitClassifier:
    return train_digit_classifier()


def to_digit_images(images: np.ndarray | torch.Tensor) -> np.ndarray:
    """Pipeline output (N, H, W[, C]) in [0, 1] → (N, 8, 8) grey in [0, 1], area-resized, 8-bit quantised."""
    x = torch.as_tensor(np.asarray(images), dtype=torch.float32)
    if x.dim() == 4:
        x = x.mean(-1)
    if x.shape[-2:] != (8, 8):
        x = F.adaptive_avg_pool2d(x[:, None], 8)[:, 0]
    return (torch.round(x.clamp(0, 1) * 255) / 255).numpy()


def _gaussian(features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    return features.mean(0), np.cov(features, rowvar=False)


def digit_frechet_distance(images_a: np.ndarray, images_b: np.ndarray, classifier=None) -> float:
    """Fréchet distance between two sets of (N, 8, 8) images in the classifier's feature space."""
    classifier = classifier or default_digit_classifier()
    feats = [
        classifier.features(torch.as_tensor(x, dtype=torch.float32)).numpy() for x in (images_a, images_b)
    ]
    return float(
        frechet_distance(*_gaussian(feats[0].astype(np.float64)), *_gaussian(feats[1].astype(np.float64)))
    )


def digit_accuracy(images: np.ndarray, labels: np.ndarray, classifier=None) -> float:
    classifier = classifier or default_digit_classifier()
    predicted = classifier(torch.as_tensor(images, dtype=torch.float32)).argmax(-1).numpy()
    return float((predicted == np.asarray(labels)).mean())


def real_vs_real_frechet(classifier=None) -> float:
    """The reference scale: Fréchet distance of real half B to real half A."""
    images, _ = load_real_digits()
    half_a, half_b = real_halves()
    return digit_frechet_distance(images[half_b], images[half_a], classifier)


def evaluate_digit_samples(images: np.ndarray, labels: np.ndarray | None = None, classifier=None) -> dict:
    """Metrics for (N, 8, 8) samples: accuracy against ``labels`` (if given) and Fréchet vs real half A."""
    classifier = classifier or default_digit_classifier()
    real, _ = load_real_digits()
    half_a, _ = real_halves()
    metrics = {"num_samples": len(images)}
    if labels is not None:
        metrics["accuracy"] = digit_accuracy(images, labels, classifier)
    frechet = digit_frechet_distance(images, real[half_a], classifier)
    reference = real_vs_real_frechet(classifier)
    metrics.update(frechet=frechet, frechet_real_vs_real=reference, frechet_ratio=frechet / reference)
    return metrics


def evaluate_digits_pipeline(
    pipeline,
    guidance_scale: float = 1.0,
    num_samples: int | None = None,
    num_guided_samples: int = 500,
    seed: int = 0,
    num_inference_steps: int | None = None,
    batch_size: int = 512,
) -> dict[str, float]:
    """Digit metrics of a pipeline, flat (``"guidance_1/frechet_ratio"``, ...): at guidance 1 from
    ``num_samples`` samples and, if ``guidance_scale`` is not 1, at ``guidance_scale`` from
    ``num_guided_samples``. Accuracy is reported for class-conditional pipelines only.

    ``num_samples`` defaults to the size of real half B, so that ``frechet_ratio`` at guidance 1 compares like
    with like (the guided ``frechet_ratio`` uses fewer samples and is biased up a little).
    """
    from .sampling import sample_images

    num_samples = num_samples or len(real_halves()[1])
    counts = [(1.0, num_samples)]
    if guidance_scale != 1:
        counts.append((float(guidance_scale), min(num_guided_samples, num_samples)))
    results = {}
    for scale, count in counts:
        images, labels, model_calls = sample_images(
            pipeline, range(count), seed, scale, num_inference_steps, batch_size
        )
        metrics = evaluate_digit_samples(to_digit_images(images), labels)
        metrics["nfe"] = float(np.mean(model_calls))
        results.update({f"guidance_{scale:g}/{name}": value for name, value in metrics.items()})
    return results
