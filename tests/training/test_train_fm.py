"""train_scripts/train_fm.py in-process: pixel and latent runs, saved folders, resume bookkeeping, errors."""

from __future__ import annotations

import concurrent.futures
import json
import threading
import time

import numpy as np
import pytest
import torch
from PIL import Image
from safetensors.torch import load_file

from arcee_diffusers.pipelines.pipeline_arcee_zigma import ArceeZigmaPipeline
from arcee_diffusers.schedulers.scheduling_gvp_flow import FlowMatchGVPScheduler
from arcee_diffusers.training import checkpointing, latents
from conftest import TINY_RUN, write_image_folder


def weights(folder, variant=None):
    name = "diffusion_pytorch_model" + (f".{variant}" if variant else "") + ".safetensors"
    return load_file(folder / "transformer" / name)


def test_pixel_unconditional_run_saves_loadable_pipeline(
    run_training, image_folder, tmp_path, check_plain_diffusers_load
):
    out = tmp_path / "out"
    run_training(out, "--train_data_dir", str(image_folder), "--max_train_steps", "3", "--path", "linear")

    pipe = ArceeZigmaPipeline.from_pretrained(out)
    assert pipe.transformer.config.num_classes is None
    assert pipe.transformer.config.in_channels == 3 and pipe.transformer.config.sample_size == 8
    assert isinstance(pipe.scheduler, FlowMatchGVPScheduler) and pipe.scheduler.config.path == "linear"
    images = pipe(batch_size=2, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 3) and np.isfinite(images).all()
    # EMA weights are the default; the raw weights are a variant, and after training they differ
    ema, raw = weights(out), weights(out, "raw")
    assert ema.keys() == raw.keys()
    assert any(not torch.equal(ema[k], raw[k]) for k in ema)
    assert not any(p.name.startswith(".checkpoint") for p in out.iterdir())
    check_plain_diffusers_load(out, batch_size=2, num_inference_steps=2)


def test_class_conditional_run_samples_with_guidance(run_training, image_folder, tmp_path):
    out = tmp_path / "out"
    run_training(out, "--train_data_dir", str(image_folder), "--class_conditional", "--max_train_steps", "2")

    pipe = ArceeZigmaPipeline.from_pretrained(out)
    assert pipe.transformer.config.num_classes == 2
    assert pipe.scheduler.config.path == "gvp"
    images = pipe(class_labels=[0, 1], guidance_scale=2.0, num_inference_steps=2, output_type="np").images
    assert images.shape == (2, 8, 8, 3)
    assert (out / "samples.png").is_file()


def test_latent_run_encodes_the_dataset_once(
    run_training, image_folder, tiny_vae_dir, tmp_path, monkeypatch, check_plain_diffusers_load
):
    out = tmp_path / "out"
    common = ["--train_data_dir", str(image_folder), "--vae", str(tiny_vae_dir), "--random_flip"]
    run_training(out, *common, "--max_train_steps", "2", "--checkpointing_steps", "2")
    (cache_file,) = (out / "latent_cache").glob("*.safetensors")
    cache = load_file(cache_file)
    assert cache["mean"].shape == (12, 2, 4, 4, 4)  # 12 images, original + mirrored view, 4×4×4 latents

    # resuming reuses the cache: encoding again would fail
    monkeypatch.setattr(latents, "encode_dataset", lambda *a, **k: pytest.fail("re-encoded the dataset"))
    run_training(out, *common, "--max_train_steps", "3", "--resume_from_checkpoint", "latest")

    pipe = ArceeZigmaPipeline.from_pretrained(out)
    assert pipe.vae is not None and pipe.transformer.config.in_channels == 4
    assert pipe.transformer.config.sample_size == 4
    images = pipe(batch_size=1, num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 3)
    check_plain_diffusers_load(out, batch_size=1, num_inference_steps=2)


def test_runs_sharing_a_latent_cache_encode_it_once(tmp_path):
    # two runs (threads here, processes in practice) start on one empty cache file: one encodes, the other
    # waits for the lock and loads what the first wrote
    path, encodes, started = tmp_path / "cache" / "key.safetensors", [], threading.Barrier(2)

    def encode():
        encodes.append(threading.get_ident())
        time.sleep(0.2)  # long enough for the other caller to reach the lock
        return {"mean": torch.ones(2, 1, 1, 2, 2), "std": torch.ones(2, 1, 1, 2, 2)}

    def run():
        started.wait()
        return latents.load_or_encode(path, encode)

    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        results = list(pool.map(lambda _: run(), range(2)))
    assert len(encodes) == 1 and all(torch.equal(r["mean"], torch.ones(2, 1, 1, 2, 2)) for r in results)


def test_resume_continues_from_latest_complete_checkpoint(run_training, image_folder, tmp_path):
    out = tmp_path / "out"
    common = ["--train_data_dir", str(image_folder), "--checkpointing_steps", "2"]
    run_training(out, *common, "--max_train_steps", "4", "--checkpoints_total_limit", "1")
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["checkpoint-4"]

    # a crash while writing checkpoint 6 left a partial folder: `latest` must ignore it
    partial = out / ".checkpoint-6.partial"
    partial.mkdir()
    (partial / "optimizer.bin").write_bytes(b"truncated")
    assert checkpointing.resolve_checkpoint(out, "latest") == out / "checkpoint-4"
    run_training(out, *common, "--max_train_steps", "6", "--resume_from_checkpoint", "latest")
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["checkpoint-4", "checkpoint-6"]
    assert not partial.exists()


def test_checkpoint_at_steps_survives_the_total_limit(run_training, image_folder, tmp_path):
    out = tmp_path / "out"
    run_training(
        out, "--train_data_dir", str(image_folder), "--max_train_steps", "5", "--checkpointing_steps", "2",
        "--checkpoints_total_limit", "1", "--checkpoint_at_steps", "3", "--report_to", "tensorboard",
    )  # fmt: skip
    assert [p.name for p in checkpointing.list_checkpoints(out)] == ["checkpoint-3", "checkpoint-4"]
    assert list((out / "logs").rglob("events.out.tfevents.*"))  # a list option does not break the tracker


def test_crash_during_save_leaves_no_checkpoint(train_fm, tmp_path):
    from accelerate import Accelerator

    accelerator = Accelerator(cpu=True)

    def crash(output_dir):
        (tmp_path / "out" / ".checkpoint-3.partial").mkdir()
        (tmp_path / "out" / ".checkpoint-3.partial" / "model.safetensors").write_bytes(b"half")
        raise KeyboardInterrupt

    accelerator.save_state = crash
    (tmp_path / "out").mkdir()
    with pytest.raises(KeyboardInterrupt):
        checkpointing.save_checkpoint(accelerator, tmp_path / "out", 3)
    assert checkpointing.list_checkpoints(tmp_path / "out") == []
    assert checkpointing.resolve_checkpoint(tmp_path / "out", "latest") is None


def test_corrupt_checkpoint_is_named(run_training, image_folder, tmp_path):
    out = tmp_path / "out"
    common = ["--train_data_dir", str(image_folder), "--checkpointing_steps", "2"]
    run_training(out, *common, "--max_train_steps", "2")
    (out / "checkpoint-2" / "optimizer.bin").write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match=r"corrupt checkpoint .*checkpoint-2"):
        run_training(out, *common, "--max_train_steps", "4", "--resume_from_checkpoint", "latest")


def test_bad_inputs_name_the_culprit(run_training, image_folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="train_data_dir .*missing"):
        run_training(tmp_path / "o1", "--train_data_dir", str(tmp_path / "missing"))
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    with pytest.raises(ValueError, match="train_data_dir .*empty.* contains no images"):
        run_training(tmp_path / "o2", "--train_data_dir", str(tmp_path / "empty"))
    with pytest.raises(ValueError, match="not divisible by patch_size 2"):
        run_training(tmp_path / "o3", "--train_data_dir", str(image_folder), "--resolution", "7")
    bad = write_image_folder(tmp_path / "bad", num_per_class=2)
    (bad / "dog" / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")
    with pytest.raises(ValueError, match=r"cannot read image .*broken\.png"):
        # all 5 images in one batch
        run_training(tmp_path / "o4", "--train_data_dir", str(bad), "--train_batch_size", "5")
    with pytest.raises(
        ValueError, match="train_batch_size: the dataset has 12 examples, fewer than one batch"
    ):
        run_training(tmp_path / "o5", "--train_data_dir", str(image_folder), "--train_batch_size", "16")


def test_digits_default_dataset():
    from arcee_diffusers.training.data import load_digits_dataset

    dataset = load_digits_dataset()
    assert len(dataset) == 1797 and dataset.features["label"].num_classes == 10
    image = dataset[0]["image"]
    assert image.mode == "L" and image.size == (8, 8)
    from sklearn.datasets import load_digits

    expected = np.rint(load_digits().images[0] * 255 / 16)
    np.testing.assert_array_equal(np.asarray(image), expected)
    assert dataset[0]["label"] == 0


def test_image_transform_range_and_shape(image_folder):
    from arcee_diffusers.training import data

    dataset = data.load_train_dataset(train_data_dir=image_folder)
    transform = data.image_transform(4, center_crop=True)
    dataset = data.with_image_transform(dataset, transform, "image", "label", "RGB")
    batch = data.collate([dataset[i] for i in range(3)])
    assert batch["pixel_values"].shape == (3, 3, 4, 4) and batch["class_labels"].dtype == torch.long
    assert batch["pixel_values"].min() >= -1 and batch["pixel_values"].max() <= 1
    grey = Image.open(next(image_folder.rglob("*.png"))).convert("L")
    assert transform(grey).shape == (1, 4, 4)


@pytest.mark.parametrize("labels", ["label", None])
def test_in_memory_dataset_holds_the_same_items(image_folder, monkeypatch, labels):
    from arcee_diffusers.training import data

    dataset = data.load_train_dataset(train_data_dir=image_folder)
    lazy = data.with_image_transform(dataset, data.image_transform(4), "image", labels, "RGB")
    kept = data.in_memory(lazy, 3, 4)
    assert isinstance(kept, data.TensorImageDataset) and len(kept) == len(lazy)
    for index in (0, len(lazy) - 1):
        want, got = lazy[index], kept[index]
        assert want.keys() == got.keys()
        assert torch.equal(got["pixel_values"], want["pixel_values"])
        assert got.get("class_labels") == want.get("class_labels")
    monkeypatch.setattr(data, "IN_MEMORY_BYTES", 3 * 4 * 4 * 4 * len(lazy) - 1)  # one byte too few
    assert data.in_memory(lazy, 3, 4) is lazy


def test_unconditional_digits_run_evaluates_at_guidance_1(run_training, tmp_path):
    out = tmp_path / "out"
    run_training(out, "--no-class_conditional", "--max_train_steps", "2", "--final_eval", "digits")
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["guidance_scale"] == 1.0 and metrics["guidance_1/num_samples"] == 901  # real half B
    assert not any(key.startswith("guidance_3") for key in metrics)


def test_guidance_without_labels_fails_while_parsing(train_fm, tmp_path, capsys):
    # before any training: the flags alone decide it
    with pytest.raises(SystemExit):
        train_fm.parse_args(
            ["--output_dir", str(tmp_path), "--no-class_conditional", "--guidance_scale", "3"]
        )
    assert "--guidance_scale > 1 needs --class_conditional" in capsys.readouterr().err
    assert train_fm.parse_args(["--output_dir", str(tmp_path)]).guidance_scale == 3.0  # the digits demo


def zigma_like_folder(folder):
    """A saved pipeline whose transformer has the options of ZigMa's released models, at the tiny size."""
    from arcee_diffusers import ArceeZigmaTransformer
    from arcee_diffusers.models.variants import ZIGMA_RELEASE

    torch.manual_seed(0)
    config = {**ZIGMA_RELEASE, "d_state": 4, "position_embedding": "learned", "num_scan_orders": 2}
    transformer = ArceeZigmaTransformer(
        sample_size=8, patch_size=2, in_channels=3, out_channels=3, num_layers=2, hidden_size=16, **config
    )
    with torch.no_grad():
        for parameter in transformer.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    ArceeZigmaPipeline(transformer, FlowMatchGVPScheduler(path="linear")).save_pretrained(folder)
    return transformer


def test_init_from_starts_from_saved_weights_with_the_chain_on(
    train_fm, run_training, image_folder, tmp_path
):
    from arcee_diffusers.training.trainer import build_model

    saved = zigma_like_folder(tmp_path / "zigma")
    args = train_fm.parse_args(
        [
            "--output_dir",
            str(tmp_path / "o"),
            *TINY_RUN,
            "--init_from",
            str(tmp_path / "zigma"),
            "--state_chain",
        ]
    )
    model = build_model(args, in_channels=3, sample_size=8, num_classes=None)
    assert model.config.state_chain and not saved.config.state_chain
    assert (model.config.num_classes, model.config.timestep_scale, model.config.final_norm) == (
        0,
        1000.0,
        True,
    )
    saved_weights = saved.state_dict()
    assert all(torch.equal(value, saved_weights[key]) for key, value in model.state_dict().items())

    out = tmp_path / "arcee"
    run_training(
        out, "--train_data_dir", str(image_folder), "--max_train_steps", "1", "--path", "linear",
        "--init_from", str(tmp_path / "zigma"), "--state_chain",
    )  # fmt: skip
    assert ArceeZigmaPipeline.from_pretrained(out).transformer.config.state_chain


def test_init_from_refuses_flags_that_change_the_parameters(train_fm, tmp_path):
    from arcee_diffusers.training.trainer import build_model

    zigma_like_folder(tmp_path / "zigma")
    flags = ["--output_dir", str(tmp_path / "o"), *TINY_RUN, "--init_from", str(tmp_path / "zigma")]
    with pytest.raises(ValueError, match=r"change the saved model's parameters \(missing: blocks.2.adaLN"):
        build_model(train_fm.parse_args([*flags, "--num_layers", "3"]), 3, 8, None)
    with pytest.raises(ValueError, match=r"change the saved model's parameters \(missing: label_embed"):
        build_model(train_fm.parse_args(flags), 3, 8, num_classes=2)
    with pytest.raises(SystemExit):
        train_fm.parse_args([*flags, "--model_config", str(tmp_path / "zigma")])
