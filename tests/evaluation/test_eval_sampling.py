"""Seeded, resumable sample folders and train_scripts/eval_fid.py with an offline feature extractor."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from arcee_diffusers.evaluation import sampling
from arcee_diffusers.models import ArceeZigmaTransformer
from arcee_diffusers.pipelines.pipeline_arcee_zigma import ArceeZigmaPipeline
from arcee_diffusers.schedulers.scheduling_gvp_flow import FlowMatchGVPScheduler

EVAL_SCRIPT = Path(__file__).resolve().parents[2] / "train_scripts" / "eval_fid.py"


@pytest.fixture
def pipeline():
    torch.manual_seed(0)
    transformer = ArceeZigmaTransformer(
        sample_size=8,
        patch_size=2,
        in_channels=3,
        out_channels=3,
        num_layers=2,
        hidden_size=16,
        d_state=4,
        num_classes=3,
    )
    with torch.no_grad():  # a non-zero head, so samples depend on the model and the labels
        for p in transformer.parameters():
            p.add_(0.05 * torch.randn_like(p))
    pipe = ArceeZigmaPipeline(transformer, FlowMatchGVPScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def read(path):
    return np.asarray(Image.open(path))


def test_sample_depends_on_index_not_on_batch(pipeline):
    together, labels, calls = sampling.sample_images(
        pipeline, range(5), seed=3, num_inference_steps=3, batch_size=5
    )
    apart, _, _ = sampling.sample_images(pipeline, [3, 4], seed=3, num_inference_steps=3, batch_size=1)
    np.testing.assert_allclose(together[3:], apart, atol=1e-5)
    assert labels.tolist() == [0, 1, 2, 0, 1]
    assert calls == [3] * 5  # Euler: one model call per step
    assert all(not np.allclose(together[i], together[j]) for i in range(5) for j in range(i))


def test_generate_samples_resumes_without_repeating_seeds(pipeline, tmp_path):
    folder = tmp_path / "samples"
    paths = sampling.generate_samples(pipeline, folder, 6, seed=0, num_inference_steps=2, batch_size=4)
    assert [p.name for p in paths] == [f"{i:06d}.png" for i in range(6)]
    first = {p.name: read(p) for p in paths}
    for name in ("000001.png", "000004.png"):
        (folder / name).unlink()
    (folder / ".000005.png.tmp").write_bytes(b"left by a crash")
    kept_mtime = (folder / "000000.png").stat().st_mtime_ns

    paths = sampling.generate_samples(pipeline, folder, 8, seed=0, num_inference_steps=2, batch_size=4)
    assert len(paths) == 8 and (folder / "000000.png").stat().st_mtime_ns == kept_mtime
    assert sampling.mean_model_calls(folder, 8) == 2.0
    assert sampling.mean_model_calls(folder, 9) is None  # sample 8 was never made
    for name, image in first.items():
        np.testing.assert_array_equal(read(folder / name), image)  # regenerated = identical, same seed
    images = [read(p).astype(int) for p in paths]
    assert all(np.abs(images[i] - images[j]).sum() > 0 for i in range(8) for j in range(i))
    with pytest.raises(ValueError, match="holds samples made with"):
        sampling.generate_samples(pipeline, folder, 8, seed=1, num_inference_steps=2)


def test_a_sample_folder_refuses_other_weights_or_another_solver(pipeline, tmp_path):
    folder = tmp_path / "samples"
    sampling.generate_samples(pipeline, folder, 2, num_inference_steps=2)
    with pytest.raises(ValueError, match="holds samples made with"):
        sampling.generate_samples(pipeline, folder, 2, num_inference_steps=None)  # dopri5
    pipeline.scheduler.register_to_config(solver="heun")
    with pytest.raises(ValueError, match="heun"):
        sampling.generate_samples(pipeline, folder, 2, num_inference_steps=2)
    pipeline.scheduler.register_to_config(solver="euler")
    with torch.no_grad():
        pipeline.transformer.final_layer.linear.bias.add_(1e-3)
    with pytest.raises(ValueError, match="weights"):
        sampling.generate_samples(pipeline, folder, 2, num_inference_steps=2)


@pytest.fixture(scope="module")
def eval_fid():
    spec = importlib.util.spec_from_file_location("eval_fid", EVAL_SCRIPT)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture
def real(tmp_path):
    folder = tmp_path / "real"
    folder.mkdir()
    rng = np.random.default_rng(0)
    for i in range(10):
        Image.fromarray(rng.integers(0, 255, (8, 8, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    return folder


def test_eval_fid_script_offline(eval_fid, pipeline, real, tmp_path):
    pipeline.save_pretrained(tmp_path / "pipe")
    args = eval_fid.parse_args(
        [
            "--pipeline",
            str(tmp_path / "pipe"),
            "--reference_dir",
            str(real),
            "--sample_dir",
            str(tmp_path / "gen"),
            "--num_samples",
            "10",
            "--num_inference_steps",
            "2",
            "--guidance_scale",
            "2",
            "--feature_extractor",
            "fid_test_extractors:mean_colour_extractor",
            "--cache_dir",
            str(tmp_path / "cache"),
            "--output_json",
            str(tmp_path / "fid.json"),
            "--device",
            "cpu",
        ]
    )
    metrics = eval_fid.main(args)
    assert json.loads((tmp_path / "fid.json").read_text()) == metrics
    assert metrics["num_generated"] == 10 and metrics["fid"] > 0 and np.isfinite(metrics["kid_x1e3"])
    # guidance runs both halves as one batch: one model call per Euler step
    assert metrics["nfe"] == 2.0 and metrics["solver"] == "FlowMatchGVPScheduler euler, 2 steps"
    assert len(list((tmp_path / "gen").glob("*.png"))) == 10
    with pytest.raises(ValueError, match="module:function"):
        eval_fid.load_feature_extractor("no_colon")


def test_eval_fid_scores_another_transformer_at_given_tolerances(eval_fid, pipeline, real, tmp_path, capsys):
    """--transformer swaps in other weights (e.g. a checkpoint's EMA); --atol/--rtol set dopri5's."""
    pipeline.save_pretrained(tmp_path / "pipe")
    other = tmp_path / "checkpoint-7" / "transformer_ema"
    with torch.no_grad():
        for p in pipeline.transformer.parameters():
            p.mul_(-1)
    pipeline.transformer.save_pretrained(other)

    def run(name, *extra):
        args = eval_fid.parse_args(
            ["--pipeline", str(tmp_path / "pipe"), "--reference_dir", str(real), "--sample_dir",
             str(tmp_path / name), "--num_samples", "4", "--feature_extractor",
             "fid_test_extractors:mean_colour_extractor", "--cache_dir", str(tmp_path / "cache"),
             "--device", "cpu", "--atol", "1e-4", "--rtol", "1e-2", *extra]
        )  # fmt: skip
        return eval_fid.main(args)

    own, swapped = run("own"), run("swapped", "--transformer", str(other))
    assert own["transformer"] is None and swapped["transformer"] == str(other)
    assert swapped["solver"] == "dopri5 (adaptive, atol 0.0001, rtol 0.01)" and swapped["nfe"] >= 6
    first = [read(tmp_path / name / "000000.png") for name in ("own", "swapped")]
    assert not np.array_equal(*first)
    with pytest.raises(SystemExit):
        eval_fid.parse_args(["--pipeline", "p", "--reference_dir", "r", "--sample_dir", "s",
                             "--num_inference_steps", "2", "--atol", "1e-4"])  # fmt: skip
    assert "need --num_inference_steps 0" in capsys.readouterr().err


def test_image_grid_has_a_gutter_between_tiles(tmp_path):
    tiles = np.ones((6, 2, 2, 1))  # white tiles: any pixel between them that is not white is gutter
    picture = sampling.save_image_grid(tiles, tmp_path / "grid.png", num_columns=3, scale=3, gutter=2)
    grid = np.asarray(Image.open(tmp_path / "grid.png"))
    assert picture.size == (3 * 6 + 4 * 2, 2 * 6 + 3 * 2) and grid.shape == (2 * 6 + 3 * 2, 3 * 6 + 4 * 2)
    gutter_value = round(0.5 * 255)
    for edge in (0, 1, 8, 9, 16, 17):  # rows above, between and below the tiles
        assert (grid[edge] == gutter_value).all()
    assert (grid[2:8, 2:8] == 255).all() and (grid[2:8, 8:10] == gutter_value).all()


def digit_pipeline(num_classes):
    torch.manual_seed(0)
    transformer = ArceeZigmaTransformer(
        sample_size=8, patch_size=2, in_channels=1, out_channels=1, num_layers=1, hidden_size=8, d_state=2,
        num_classes=num_classes,
    )  # fmt: skip
    pipe = ArceeZigmaPipeline(transformer, FlowMatchGVPScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_digit_evaluation_at_guidance_1_uses_as_many_samples_as_real_half_b():
    from arcee_diffusers.evaluation import digits

    half_b = len(digits.real_halves()[1])
    unconditional = digits.evaluate_digits_pipeline(digit_pipeline(None), 1.0, num_inference_steps=1)
    assert unconditional["guidance_1/num_samples"] == half_b and unconditional["guidance_1/nfe"] == 1.0
    assert not any(key.startswith("guidance_1/accuracy") for key in unconditional)
    assert {key.split("/")[0] for key in unconditional} == {"guidance_1"}

    guided = digits.evaluate_digits_pipeline(digit_pipeline(10), 3.0, num_inference_steps=1)
    assert guided["guidance_1/num_samples"] == half_b and guided["guidance_3/num_samples"] == 500
    assert "guidance_1/accuracy" in guided and "guidance_3/accuracy" in guided
