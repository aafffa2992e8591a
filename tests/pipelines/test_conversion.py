"""scripts/convert_official_checkpoint.py and arcee_diffusers.conversion on tiny checkpoints in the layout
of the published train.py, built here from the published key names and shapes."""

from __future__ import annotations

import argparse
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tiny_pipelines import check_plain_diffusers_load

from arcee_diffusers import ArceeZigmaPipeline, ArceeZigmaTransformer, FlowMatchGVPScheduler
from arcee_diffusers.conversion import ConversionError, add_vae_argument, convert_checkpoint
from arcee_diffusers.models.scan_orders import inverse_permutation, zigzag_paths
from arcee_diffusers.models.variants import SD_VAE_NAME

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "convert_official_checkpoint.py"
# depth 2, width 16, patch 2 on 8 x 8 latents (a 4 x 4 token grid), d_state 4
DEPTH, WIDTH, PATCH, CHANNELS, GRID, D_STATE = 2, 16, 2, 4, 4, 4
D_INNER, DT_RANK, TOKENS = 2 * WIDTH, 1, GRID * GRID
OUR_CONFIG = {"sample_size": GRID * PATCH, "patch_size": PATCH, "in_channels": CHANNELS}
OUR_CONFIG.update(out_channels=CHANNELS, num_layers=DEPTH, hidden_size=WIDTH, d_state=D_STATE)
SCAN_TYPES = {  # published name -> (scan_pattern, num_scan_orders, state_chain)
    "Arcee_1": ("zigzag", 1, True),
    "Zigma_2": ("zigzag", 2, False),
    "Arcee_4": ("zigzag", 4, True),
    "V2": ("bidirectional", 1, False),
    "V2RC": ("bidirectional", 1, True),
}


def published_state_dict(scan_type: str, seed: int = 0, label_rows: int = 1) -> dict[str, torch.Tensor]:
    """Random weights under the published names and shapes (Arcee_Models.py, mamba_simple.py, timm's
    PatchEmbed), with the scan-path buffers the published model registers for ``scan_type``."""
    generator = torch.Generator().manual_seed(seed)

    def rand(*shape):
        return 0.3 * torch.randn(shape, generator=generator)

    state = {
        "pos_embed": rand(1, TOKENS, WIDTH),
        "x_embedder.proj.weight": rand(WIDTH, CHANNELS, PATCH, PATCH),
        "x_embedder.proj.bias": rand(WIDTH),
        "t_embedder.mlp.0.weight": rand(WIDTH, 256),
        "t_embedder.mlp.0.bias": rand(WIDTH),
        "t_embedder.mlp.2.weight": rand(WIDTH, WIDTH),
        "t_embedder.mlp.2.bias": rand(WIDTH),
        "y_embedder.embedding_table.weight": rand(label_rows, WIDTH),
        "final_layer.adaLN_modulation.1.weight": rand(2 * WIDTH, WIDTH),
        "final_layer.adaLN_modulation.1.bias": rand(2 * WIDTH),
        "final_layer.linear.weight": rand(PATCH * PATCH * CHANNELS, WIDTH),
        "final_layer.linear.bias": rand(PATCH * PATCH * CHANNELS),
    }
    pattern, orders, _ = SCAN_TYPES[scan_type]
    branches = ["", "_b"] if pattern == "bidirectional" else [""]
    paths = zigzag_paths(GRID)[:orders]
    reverse = torch.stack([inverse_permutation(path) for path in paths])
    for i in range(DEPTH):
        block = f"blocks.{i}."
        state[block + "norm.weight"] = 1 + rand(WIDTH)
        state[block + "adaLN_modulation.1.weight"] = rand(3 * WIDTH, WIDTH)
        state[block + "adaLN_modulation.1.bias"] = rand(3 * WIDTH)
        mixer = block + "mixer."
        state[mixer + "in_proj.weight"] = rand(2 * D_INNER, WIDTH)
        state[mixer + "out_proj.weight"] = rand(WIDTH, D_INNER)
        for b in branches:
            state[mixer + f"conv1d{b}.weight"] = rand(D_INNER, 1, 4)
            state[mixer + f"conv1d{b}.bias"] = rand(D_INNER)
            state[mixer + f"x_proj{b}.weight"] = rand(DT_RANK + 2 * D_STATE, D_INNER)
            state[mixer + f"dt_proj{b}.weight"] = rand(D_INNER, DT_RANK)
            state[mixer + f"dt_proj{b}.bias"] = rand(D_INNER) - 1
            a_log = "A_log" if not b else "A_b_log"
            state[mixer + a_log] = torch.log(torch.arange(1.0, D_STATE + 1)).repeat(D_INNER, 1) + rand(
                D_INNER, 1
            )
            state[mixer + ("D" if not b else "D_b")] = 1 + rand(D_INNER)
        if scan_type.startswith("Zigma") or (scan_type.startswith("Arcee") and orders > 1):
            state[mixer + "zigzag_paths"] = paths.clone()
            state[mixer + "zigzag_paths_reverse"] = reverse.clone()
    if scan_type == "Arcee_1":
        state["locked_permutation_path"] = paths.clone()
        state["locked_permutation_path_r"] = reverse.clone()
    return state


def hand_converted_model(state: dict[str, torch.Tensor], scan_type: str, num_classes=None):
    """Our model with the published weights moved over by hand: three renamed embedders, the head's
    [scale, shift] rows swapped to [shift, scale], the scan-path buffers left out."""
    pattern, orders, chain = SCAN_TYPES[scan_type]
    model = ArceeZigmaTransformer(
        **OUR_CONFIG, scan_pattern=pattern, num_scan_orders=orders, state_chain=chain, num_classes=num_classes
    )
    ours = {}
    for key, value in state.items():
        if "zigzag_paths" in key or key.startswith("locked_permutation_path"):
            continue
        key = key.replace("x_embedder.", "patch_embed.").replace("t_embedder.", "time_embed.")
        key = key.replace("y_embedder.", "label_embed.")
        if key.startswith("final_layer.adaLN_modulation"):
            value = torch.cat([value[WIDTH:], value[:WIDTH]])
        ours[key] = value
    model.load_state_dict(ours, strict=True)
    return model.eval()


def save_published_checkpoint(path: Path, layout: str, label_rows: int = 1, **args) -> dict:
    """A content.pth as the published train.py writes it for scan type ``layout`` (EMA and raw weights
    differ); ``args`` override its stored training arguments."""
    ema, raw = published_state_dict(layout, 0, label_rows), published_state_dict(layout, 1, label_rows)
    param = torch.nn.Parameter(torch.zeros(3))
    optimizer = torch.optim.AdamW([param], lr=3e-4)
    param.grad = torch.ones(3)
    optimizer.step()
    stored = {"model": "Arcee-B/2", "scan_type": layout, "ssm_dstate": 256, "path_type": "GVP"}
    content = {
        "epoch": 3,
        "step": 50000,
        "args": argparse.Namespace(**{**stored, "rms_norm": True, "pe_type": "ape", **args}),
        "model": raw,
        "opt": optimizer.state_dict(),
        "ema": ema,
        "data_loader_state": {"epoch": 3, "micro_idx_in_epoch": 7},
    }
    torch.save(content, path)
    return content


def velocity(model, seed: int = 0, class_labels=None) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(2, CHANNELS, GRID * PATCH, GRID * PATCH, generator=generator)
    with torch.no_grad():
        return model(x, torch.tensor([0.2, 0.7]), class_labels=class_labels).sample


@pytest.fixture(scope="module")
def tiny_vae(tmp_path_factory):
    from diffusers import AutoencoderKL

    torch.manual_seed(0)
    vae = AutoencoderKL(
        block_out_channels=(8,),
        down_block_types=("DownEncoderBlock2D",),
        up_block_types=("UpDecoderBlock2D",),
        latent_channels=CHANNELS,
        layers_per_block=1,
        norm_num_groups=4,
        sample_size=8,
    )
    path = tmp_path_factory.mktemp("vae")
    vae.save_pretrained(path)
    return path


@pytest.mark.parametrize("scan_type", list(SCAN_TYPES))
def test_round_trip_equals_the_hand_permuted_model(scan_type, tmp_path):
    content = save_published_checkpoint(tmp_path / "content.pth", scan_type)
    out = tmp_path / "converted"
    convert_checkpoint(tmp_path / "content.pth", out, scan_type.lower(), vae=None)

    pipe = ArceeZigmaPipeline.from_pretrained(out)
    pattern, orders, chain = SCAN_TYPES[scan_type]
    config = pipe.transformer.config
    assert (config.scan_pattern, config.num_scan_orders, config.state_chain) == (pattern, orders, chain)
    assert (config.num_layers, config.hidden_size, config.d_state, config.sample_size) == (2, 16, 4, 8)
    assert config.num_classes is None and pipe.vae is None
    assert isinstance(pipe.scheduler, FlowMatchGVPScheduler) and pipe.scheduler.config.path == "gvp"
    expected = velocity(hand_converted_model(content["ema"], scan_type))
    assert expected.abs().mean() > 0.1
    torch.testing.assert_close(velocity(pipe.transformer), expected, rtol=0, atol=0)
    raw = ArceeZigmaTransformer.from_pretrained(out / "transformer", variant="raw").eval()
    torch.testing.assert_close(
        velocity(raw), velocity(hand_converted_model(content["model"], scan_type)), rtol=0, atol=0
    )


def test_conditional_checkpoint_with_vae_folder(tmp_path, tiny_vae):
    # 4 label rows: classes 0..2 and the published null row last, as ours
    content = save_published_checkpoint(tmp_path / "content.pth", "Zigma_2", label_rows=4, num_classes=4)
    convert_checkpoint(tmp_path / "content.pth", tmp_path / "out", "Zigma_2", vae=tiny_vae)
    pipe = ArceeZigmaPipeline.from_pretrained(tmp_path / "out")
    assert pipe.transformer.config.num_classes == 3 and pipe.vae is not None
    labels = torch.tensor([0, 2])
    torch.testing.assert_close(
        velocity(pipe.transformer, class_labels=labels),
        velocity(hand_converted_model(content["ema"], "Zigma_2", num_classes=3), class_labels=labels),
        rtol=0,
        atol=0,
    )
    pipe.scheduler = FlowMatchGVPScheduler.from_config(pipe.scheduler.config, solver="euler")
    images = pipe(class_labels=[1], num_inference_steps=2, output_type="np").images
    assert images.shape == (1, 8, 8, 3)
    check_plain_diffusers_load(tmp_path / "out", class_labels=[1, 2])  # the folder's own sampler: dopri5


def test_script_converts_and_checks_the_model_name(tmp_path):
    spec = importlib.util.spec_from_file_location("convert_official_checkpoint", SCRIPT)
    script = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(script)
    save_published_checkpoint(tmp_path / "content.pth", "Arcee_4", model="Arcee-B/2")
    common = ["--checkpoint", str(tmp_path / "content.pth"), "--scan_type", "Arcee_4", "--vae", "none"]
    with pytest.raises(ConversionError, match=r"model Arcee-B/2 has depth, width, patch \(24, 768, 2\)"):
        script.main(script.parse_args([*common, "--output_dir", str(tmp_path / "a"), "--model", "Arcee-B/2"]))
    script.main(script.parse_args([*common, "--output_dir", str(tmp_path / "b")]))
    assert ArceeZigmaPipeline.from_pretrained(tmp_path / "b").transformer.config.num_scan_orders == 4


VAE_OPTIONS = [([], SD_VAE_NAME), (["--vae", "None"], None), (["--vae", "vae/"], "vae/")]


@pytest.mark.parametrize(("argv", "vae"), VAE_OPTIONS)
def test_the_converters_vae_option(argv, vae):
    parser = argparse.ArgumentParser()
    add_vae_argument(parser)
    assert parser.parse_args(argv).vae == vae


class RunsCode:
    """Pickles as a call to os.mkdir: loading it would create the folder."""

    def __init__(self, folder: Path):
        self.folder = str(folder)

    def __reduce__(self):
        return (os.mkdir, (self.folder,))


def test_pickle_with_code_is_refused_without_running_it(tmp_path):
    marker = tmp_path / "code-ran"
    torch.save({"ema": published_state_dict("Arcee_1"), "args": RunsCode(marker)}, tmp_path / "evil.pth")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--checkpoint", str(tmp_path / "evil.pth"), "--scan_type", "Arcee_1"]
        + ["--output_dir", str(tmp_path / "out"), "--vae", "none"],
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0 and not marker.exists() and not (tmp_path / "out").exists()
    (line,) = result.stderr.strip().splitlines()
    assert "needs pickled code to load (posix.mkdir)" in line and "evil.pth" in line


def test_wrong_key_set_names_every_unmapped_and_missing_key(tmp_path):
    content = save_published_checkpoint(tmp_path / "content.pth", "Arcee_1")
    ema = content["ema"]
    ema["norm_f.weight"] = ema.pop("blocks.1.norm.weight")  # a final norm instead of block 1's
    ema["blocks.0.norm.bias"] = torch.zeros(WIDTH)  # a LayerNorm's bias
    del ema["t_embedder.mlp.2.bias"]
    torch.save(content, tmp_path / "content.pth")
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(tmp_path / "content.pth", tmp_path / "out", "Arcee_1", vae=None)
    message = str(error.value)
    assert "state dict 'ema'" in message
    assert "unmapped keys: blocks.0.norm.bias, norm_f.weight" in message
    assert "missing keys: blocks.1.norm.weight, t_embedder.mlp.2.bias" in message


def test_shape_mismatch_is_named(tmp_path):
    content = save_published_checkpoint(tmp_path / "content.pth", "V2")
    content["model"]["blocks.1.mixer.x_proj_b.weight"] = torch.zeros(DT_RANK + D_STATE, D_INNER)
    torch.save(content, tmp_path / "content.pth")
    with pytest.raises(
        ConversionError,
        match=r"state dict 'model' .* shape mismatches: blocks\.1\.mixer\.x_proj_b\.weight \(5, 32\) "
        r"\(expected \(9, 32\)\)",
    ):
        convert_checkpoint(tmp_path / "content.pth", tmp_path / "out", "V2", vae=None)


@pytest.mark.parametrize(
    "scan_type,stored,match",
    [
        # without stored args, from the tensors alone
        ("Zigma_1", None, "the scan type has 1 zigzag path.* but the checkpoint has one model-level"),
        ("V2RC", None, "is bidirectional, but the checkpoint has no Vision Mamba's backward branch"),
        ("Arcee_3", None, r"scan_type must be one of \['Zigma_1'"),
        ("Arcee_1", {"scan_type": "Zigma_1"}, "trained with --scan-type Zigma_1"),
        ("Arcee_1", {"pe_type": "rope"}, r"trained with --pe-type 'rope'; only \['ape'\] convert"),
    ],
)
def test_names_that_do_not_fit_the_checkpoint(tmp_path, scan_type, stored, match):
    content = save_published_checkpoint(tmp_path / "content.pth", "Arcee_1", **(stored or {}))
    if stored is None:
        del content["args"]
        torch.save(content, tmp_path / "content.pth")
    with pytest.raises(ConversionError, match=match):
        convert_checkpoint(tmp_path / "content.pth", tmp_path / "out", scan_type, vae=None)


def test_not_a_published_checkpoint(tmp_path):
    torch.save({"state_dict": {}}, tmp_path / "other.pth")
    with pytest.raises(ConversionError, match=r"expected a dict with 'ema'.* found \['state_dict'\]"):
        convert_checkpoint(tmp_path / "other.pth", tmp_path / "out", "Arcee_1", vae=None)
    (tmp_path / "broken.pth").write_bytes(b"PK\x03\x04 not a zip")
    with pytest.raises(ConversionError, match="cannot read checkpoint .*broken.pth"):
        convert_checkpoint(tmp_path / "broken.pth", tmp_path / "out", "Arcee_1", vae=None)
    with pytest.raises(FileNotFoundError, match="missing.pth"):
        convert_checkpoint(tmp_path / "missing.pth", tmp_path / "out", "Arcee_1", vae=None)
