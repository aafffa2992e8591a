"""The demo's parts without a server: the chain-cut twin, the pictures, the model card, the command line,
the console script and the Space template."""

from __future__ import annotations

import importlib.metadata
import os
import re
import runpy
from pathlib import Path

import numpy as np
import pytest
import torch
from demo_testing import GRID, tiny_pipeline
from PIL import Image
from tiny_pipelines import make_pipeline, tiny_vae

from arcee_diffusers.demo import DemoModel, build_demo, cli, maps
from arcee_diffusers.demo.model import chain_cut_twin
from arcee_diffusers.evaluation import spatial

REPO = Path(__file__).resolve().parents[2]


def test_chain_cut_twin_shares_the_weights_and_is_the_chain_cut_at_test_time():
    model = tiny_pipeline(state_chain=True).transformer
    twin = chain_cut_twin(model)
    assert twin.config.state_chain is False and model.config.state_chain is True
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(model.parameters(), twin.parameters()))
    x, t, labels = torch.randn(2, 1, 8, 8), torch.rand(2), torch.tensor([0, 2])
    with torch.no_grad(), spatial.state_chain_set(model, False):
        expected = model(x, t, class_labels=labels).sample
    with torch.no_grad():
        torch.testing.assert_close(twin(x, t, class_labels=labels).sample, expected, rtol=0, atol=0)
        assert not torch.allclose(model(x, t, class_labels=labels).sample, expected)


@pytest.mark.parametrize("grid", [4, 16, 7])
def test_a_click_on_a_cell_is_its_token(grid):
    for token in range(grid * grid):
        x, y = maps._centre(token, grid)
        assert maps.click_to_token(x, y, grid) == divmod(token, grid)
    cell = maps.cell_size(grid)
    assert maps.click_to_token(grid * cell - 1, grid * cell - 1, grid) == (grid - 1, grid - 1)


def test_color_range_spans_every_non_zero_value_and_survives_all_zeros():
    low, high = maps.log_color_range(np.array([[0.0, 1e-3], [2.0, 0.0]]), np.array([[4.0, 0.0], [0, 0]]))
    assert (low, high) == (1e-3, 4.0)
    assert maps.log_color_range(np.array([[1e-30, 1.0]]))[0] == 1e-8  # the scale's floor
    assert maps.log_color_range(np.zeros((2, 2))) == (1.0, 1.0)


def test_sample_grid_scales_up_small_samples():
    grid = maps.sample_grid(np.random.rand(5, 8, 8, 1))
    columns, rows = 3, 2
    assert grid.size == (columns * (96 + 4) + 4, rows * (96 + 4) + 4)


def test_a_sample_scaled_up_for_the_page_comes_back_pixel_for_pixel():
    pixels = np.random.default_rng(0).integers(0, 256, (1, 8, 8, 1)).astype(np.float32) / 255
    shown = maps.sample_grid(pixels, gutter=0)
    assert shown.size == (96, 96)
    back = maps.to_model_input(shown, channels=1, side=8)
    np.testing.assert_allclose(back[0, 0].numpy(), pixels[0, :, :, 0] * 2 - 1, atol=1e-6)


def test_influence_on_a_latent_model_encodes_the_picture_with_the_vae():
    pipe = make_pipeline(vae=tiny_vae(), in_channels=4)
    demo_model = DemoModel(pipe)
    picture = Image.fromarray(np.random.default_rng(0).integers(0, 256, (20, 30, 3), dtype=np.uint8))
    assert demo_model.encode(picture).shape == (1, 4, 8, 8)
    record = demo_model.influence(picture, 1, 2, "unconditional", 0.5)
    assert np.array(record["map"]).shape == (GRID, GRID) and np.array(record["map_chain_cut"]).shape == (4, 4)


def test_about_card_describes_the_model():
    card = DemoModel(tiny_pipeline(state_chain=False), "some/pipeline").card()
    assert card.startswith("### Zigma-1")
    parameters = sum(p.numel() for p in tiny_pipeline().transformer.parameters())
    assert f"| parameters | {parameters:,} |" in card
    assert "| state chain | off (ZigMa / Vim baseline) |" in card and "`some/pipeline`" in card
    assert '"num_scan_orders": 1' in card


def test_no_analytics_and_the_named_apis():
    demo = build_demo(DemoModel(tiny_pipeline()))
    assert os.environ["GRADIO_ANALYTICS_ENABLED"] == "False" and demo.analytics_enabled is False
    public = {fn.api_name for fn in demo.fns.values() if fn.api_visibility == "public"}
    assert public == {"generate", "influence", "chain"}
    with pytest.raises(ValueError, match="concurrency must be a positive int, got 0"):
        build_demo(DemoModel(tiny_pipeline()), 0)


def test_command_line_without_the_default_pipeline_says_to_run_the_main_job(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with pytest.raises(SystemExit, match=re.escape("README's main job first (accelerate launch")):
        cli.main([])


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (None, "did not load (OSError: Error no file named model_index.json"),
        ("{", "is not a valid JSON file"),
    ],
)
def test_command_line_with_a_broken_folder_is_one_line(tmp_path, content, message):
    if content is not None:
        (tmp_path / "model_index.json").write_text(content)
    with pytest.raises(SystemExit) as raised:
        cli.main([str(tmp_path)])
    assert str(raised.value).startswith("arcee-demo: error: PIPELINE") and message in str(raised.value)
    assert "\n" not in str(raised.value)


def test_a_pickled_checkpoint_is_refused_not_unpickled(tmp_path):
    tiny_pipeline().save_pretrained(tmp_path / "pickled", safe_serialization=False)
    assert list((tmp_path / "pickled").rglob("*.bin")) and not list(
        (tmp_path / "pickled").rglob("*.safetensors")
    )
    with pytest.raises(SystemExit, match="did not load"):
        cli.main([str(tmp_path / "pickled")])


def test_command_line_serves_on_loopback_by_default(tmp_path, monkeypatch):
    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    launched = {}
    monkeypatch.setattr("gradio.Blocks.launch", lambda demo, **kwargs: launched.update(kwargs, demo=demo))
    cli.main([str(tmp_path / "pipe"), "--port", "7999", "--concurrency", "2"])
    assert launched["server_name"] == "127.0.0.1" and launched["server_port"] == 7999
    assert launched["ssr_mode"] is False and launched["max_file_size"] == "10mb"
    assert launched["demo"]._queue.default_concurrency_limit == 2  # gradio keeps it on its queue
    cli.main([str(tmp_path / "pipe"), "--host", "0.0.0.0"])
    assert launched["server_name"] == "0.0.0.0"
    with pytest.raises(SystemExit, match="--concurrency must be a positive int, got 0"):
        cli.main([str(tmp_path / "pipe"), "--concurrency", "0"])


def test_console_script():
    (script,) = [
        e for e in importlib.metadata.entry_points(group="console_scripts") if e.name == "arcee-demo"
    ]
    assert script.value == "arcee_diffusers.demo.cli:main"


def test_space_template_runs_the_same_page(tmp_path, monkeypatch):
    import gradio

    tiny_pipeline().save_pretrained(tmp_path / "pipe")
    monkeypatch.setenv("ARCEE_PIPELINE", str(tmp_path / "pipe"))
    demo = runpy.run_path(str(REPO / "spaces" / "app.py"))["demo"]
    assert isinstance(demo, gradio.Blocks) and not demo.is_running
    assert {"generate", "influence"} <= {fn.api_name for fn in demo.fns.values()}
    card = (REPO / "spaces" / "README.md").read_text()
    header = dict(re.findall(r"^(\w+): (.*)$", card.split("---")[1], re.M))
    pinned = re.search(r"^gradio==(\S+)$", (REPO / "constraints.txt").read_text(), re.M).group(1)
    assert header["sdk"] == "gradio" and header["app_file"] == "app.py"
    assert header["sdk_version"] == pinned == gradio.__version__  # the Space runs the gradio the tests ran
    assert len(header["short_description"]) <= 60  # the Hub's limit
    assert "arcee-diffusers[demo]" in (REPO / "spaces" / "requirements.txt").read_text()
