"""The Fashion-MNIST metric on a stand-in: a deterministic, cached classifier, its real-image folders, and a
Fréchet ratio near 1 for real images and far above it for noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from fashion_standin import band_images, write_fashion_standin
from PIL import Image

from arcee_diffusers.evaluation import fashion_mnist
from arcee_diffusers.evaluation.fid import compute_fid_kid
from arcee_diffusers.training.idx_data import read_idx_split


@pytest.fixture(scope="module")
def standin(tmp_path_factory):
    return write_fashion_standin(tmp_path_factory.mktemp("fashion_mnist"))


def test_the_classifier_is_deterministic_and_cached(standin, tmp_path, monkeypatch):
    images, labels = read_idx_split(standin, "train")
    first, second = (fashion_mnist.train_classifier(images, labels) for _ in range(2))
    for name, weight in first.state_dict().items():
        assert torch.equal(weight, second.state_dict()[name]), name

    features = fashion_mnist.load_or_train_features(standin, cache_dir=tmp_path)
    assert 0.3 < features.test_accuracy <= 1.0  # well above chance (0.1) after 8 small steps
    assert features.feature_scale > 0
    monkeypatch.setattr(fashion_mnist, "train_classifier", lambda *a: pytest.fail("trained again"))
    cached = fashion_mnist.load_or_train_features(standin, cache_dir=tmp_path)
    assert cached.test_accuracy == features.test_accuracy
    batch = torch.rand(3, 3, 299, 299) * 255
    torch.testing.assert_close(cached(batch), features(batch), rtol=0, atol=0)
    assert cached(batch).shape == (3, 128)


def test_real_folders_are_disjoint_padded_halves_of_the_test_split(standin, tmp_path):
    reference, real = fashion_mnist.write_fid_folders(tmp_path, 40, standin)
    reference_files, real_files = sorted(reference.iterdir()), sorted(real.iterdir())
    assert len(reference_files) == 198 and len(real_files) == 40  # class-stratified halves of 400
    assert not {p.name for p in reference_files} & {p.name for p in real_files}
    images, _ = read_idx_split(standin, "test")
    index = int(real_files[0].stem)
    padded = np.array(Image.open(real_files[0]))
    assert padded.shape == (32, 32) and not padded[:2].any() and not padded[:, -2:].any()
    np.testing.assert_array_equal(padded[2:30, 2:30], images[index])
    with pytest.raises(ValueError, match="num_real: test half B has 202 images, asked for 203"):
        fashion_mnist.write_fid_folders(tmp_path / "more", 203, standin)


def test_frechet_ratio_is_near_one_for_real_images_and_far_above_for_noise(standin, tmp_path):
    reference, real = fashion_mnist.write_fid_folders(tmp_path / "fid", 100, standin)
    extractor = fashion_mnist.load_or_train_features(standin, cache_dir=tmp_path)
    rng = np.random.default_rng(1)
    real_like, noise = tmp_path / "real_like", tmp_path / "noise"
    for folder, images in (
        (real_like, band_images(rng.integers(0, 10, 100), rng)),  # new draws of the same distribution
        (noise, rng.integers(0, 256, (100, 28, 28)).astype(np.uint8)),
    ):
        folder.mkdir()
        for i, image in enumerate(fashion_mnist.pad_to_resolution(image[None])[0] for image in images):
            Image.fromarray(image, mode="L").save(folder / f"{i}.png")
    options = dict(
        feature_extractor=extractor, extractor_name="standin", cache_dir=tmp_path, real_folder=real
    )
    like = compute_fid_kid(real_like, reference, **options)
    far = compute_fid_kid(noise, reference, **options)
    assert like["num_real"] == like["num_generated"] == 100 and like["fid_real"] > 0
    # 100 samples in 128 dimensions: real-vs-real FIDs scatter by a few times around the floor
    assert 0.1 < like["frechet_ratio"] < 10
    assert far["frechet_ratio"] > 50 * like["frechet_ratio"] and far["kid_x1e3"] > 50 * abs(like["kid_x1e3"])
