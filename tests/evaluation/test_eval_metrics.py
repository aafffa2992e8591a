"""FID/KID with a custom extractor and content-keyed caching; the digit classifier metric."""

from __future__ import annotations

import numpy as np
import pytest
from fid_test_extractors import mean_colour_extractor
from PIL import Image

from arcee_diffusers.evaluation import digits, fid


def write_folder(root, count, shift=0, seed=0):
    rng = np.random.default_rng(seed)
    root.mkdir(parents=True)
    for i in range(count):
        pixels = np.clip(rng.normal(120 + shift, 30, (16, 16, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(pixels).save(root / f"{i:03d}.png")
    return root


def fid_kid(generated, reference, cache_dir):
    return fid.compute_fid_kid(
        generated, reference, mean_colour_extractor(), "mean-colour", cache_dir=cache_dir, batch_size=16
    )


def test_fid_kid_identical_small_shifted_large(tmp_path):
    real = write_folder(tmp_path / "real", 40)
    same = write_folder(tmp_path / "same", 40)
    other = write_folder(tmp_path / "other", 40, seed=1)
    shifted = write_folder(tmp_path / "shifted", 40, shift=60, seed=1)
    cache = tmp_path / "cache"

    identical = fid_kid(same, real, cache)
    resampled, moved = fid_kid(other, real, cache), fid_kid(shifted, real, cache)
    assert identical["fid"] == pytest.approx(0, abs=1e-6)
    # KID is an unbiased estimate: about 0, either sign, for equal sets
    assert abs(identical["kid_x1e3"]) < 0.1 * moved["kid_x1e3"]
    assert moved["fid"] > 10 * resampled["fid"] > 0
    assert moved["kid_x1e3"] > 10 * abs(resampled["kid_x1e3"])
    assert identical["num_generated"] == identical["num_reference"] == 40


def test_reference_features_cached_by_content(tmp_path, monkeypatch):
    real = write_folder(tmp_path / "real", 12)
    cache = tmp_path / "cache"
    first = fid.reference_features(real, mean_colour_extractor(), "mean-colour", cache)
    (cached,) = (cache / "fid_stats").glob("*.npy")
    assert cached.name.startswith("mean-colour-clean-")

    # same contents: read from the cache, no feature extraction
    monkeypatch.setattr(fid, "folder_features", lambda *a, **k: pytest.fail("recomputed cached features"))
    np.testing.assert_array_equal(fid.reference_features(real, None, "mean-colour", cache), first)
    monkeypatch.undo()

    # any change of content gives a new key
    key = fid.folder_content_key(real)
    Image.fromarray(np.zeros((16, 16, 3), np.uint8)).save(real / "000.png")
    assert fid.folder_content_key(real) != key
    fid.reference_features(real, mean_colour_extractor(), "mean-colour", cache)
    assert len(list((cache / "fid_stats").glob("*.npy"))) == 2


def test_fid_errors_name_the_folder(tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        fid.image_files(tmp_path / "nowhere")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty.* contains no images"):
        fid.image_files(tmp_path / "empty")
    with pytest.raises(ValueError, match="extractor_name"):
        fid.reference_features(tmp_path, mean_colour_extractor())


def test_digit_classifier_generalises():
    images, labels = digits.load_real_digits()
    half_a, half_b = digits.real_halves()
    assert not set(half_a) & set(half_b) and len(half_a) + len(half_b) == len(images)
    classifier = digits.train_digit_classifier(half_a)
    assert digits.digit_accuracy(images[half_b], labels[half_b], classifier) >= 0.95


def test_digit_metric_real_small_noise_large():
    images, labels = digits.load_real_digits()
    _, half_b = digits.real_halves()
    real = digits.evaluate_digit_samples(images[half_b], labels[half_b])
    assert real["accuracy"] > 0.99 and real["frechet_ratio"] == pytest.approx(1.0)

    rng = np.random.default_rng(0)
    noise = digits.evaluate_digit_samples(rng.random(images[half_b].shape), labels[half_b])
    assert noise["accuracy"] < 0.3 and noise["frechet_ratio"] > 20
    blurred = np.clip(images[half_b] + rng.normal(0, 0.1, images[half_b].shape), 0, 1)
    mild = digits.evaluate_digit_samples(blurred, labels[half_b])
    assert 1.0 < mild["frechet_ratio"] < noise["frechet_ratio"]


def test_to_digit_images_resizes_and_quantises():
    rgb = np.full((2, 16, 16, 3), 0.5)
    out = digits.to_digit_images(rgb)
    assert out.shape == (2, 8, 8)
    np.testing.assert_allclose(out, np.round(0.5 * 255) / 255)
