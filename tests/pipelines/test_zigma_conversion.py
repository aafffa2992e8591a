"""scripts/convert_zigma_checkpoint.py and arcee_diffusers.conversion.zigma on tiny checkpoints in the
layout of ZigMa's train_acc.py, built here from the key names and shapes of its model_zigma.py and
mamba_simple.py, with an ``args`` entry pickled like an OmegaConf DictConfig (omegaconf need not be
installed: the pickle is written from look-alike classes under omegaconf's module names).

Exact equality with ZigMa's own model is checked outside the project (docs/model.md, "ZigMa's released
weights"); these tests pin the mapping, the safety of the reader and the folder it writes."""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch
from tiny_pipelines import check_plain_diffusers_load, tiny_vae

from arcee_diffusers import ArceeZigmaPipeline, ArceeZigmaTransformer
from arcee_diffusers.conversion import (
    ConversionError,
    convert_zigma_checkpoint,
    convert_zigma_state_dict,
    infer_zigma_config,
    load_zigma_checkpoint,
)

REPO = Path(__file__).resolve().parents[2]
SCRIPT = REPO / "scripts" / "convert_zigma_checkpoint.py"
WIDTH, DEPTH, D_STATE, CHANNELS = 32, 8, 16, 4
# the two released layouts, tiny: patch 1 with a learned table (churches256), patch 2 without (1024 px)
LAYOUTS = {
    "patch1_learned": {"img_dim": 8, "patch_size": 1, "use_pe": 2},
    "patch2_none": {"img_dim": 16, "patch_size": 2},  # the _old yaml has no use_pe: ZigMa's default 0
}


def zigma_params(layout: str, **overrides) -> dict:
    params = {"img_dim": 8, "in_channels": CHANNELS, "embed_dim": WIDTH, "depth": DEPTH}
    return {**params, "scan_type": "zigzagN8", **LAYOUTS[layout], **overrides}


def zigma_state_dict(params: dict, seed: int = 0, scale: float = 0.2) -> dict[str, torch.Tensor]:
    """Random weights under ZigMa's names and shapes (model_zigma.ZigMa, mamba_simple.Mamba, timm's
    PatchEmbed, the Triton RMSNorm with no bias); no scan paths: ZigMa keeps them in Python lists."""
    generator = torch.Generator().manual_seed(seed)
    width, patch, d_inner, dt_rank = params["embed_dim"], params["patch_size"], 2 * params["embed_dim"], 2

    def rand(*shape):
        return scale * torch.randn(shape, generator=generator)

    state = {
        "x_embedder.proj.weight": rand(width, params["in_channels"], patch, patch),
        "x_embedder.proj.bias": rand(width),
        "t_embedder.mlp.0.weight": rand(width, 256),
        "t_embedder.mlp.0.bias": rand(width),
        "t_embedder.mlp.2.weight": rand(width, width),
        "t_embedder.mlp.2.bias": rand(width),
        "final_layer.linear.weight": rand(patch * patch * params["in_channels"], width),
        "final_layer.linear.bias": rand(patch * patch * params["in_channels"]),
        "norm_f.weight": 1 + rand(width),
    }
    if params.get("use_pe", 0):
        state["pos_embed"] = rand(1, (params["img_dim"] // patch) ** 2, width)
    for i in range(params["depth"]):
        block = f"blocks.{i}."
        state.update(
            {
                block + "norm.weight": 1 + rand(width),
                block + "adaLN_modulation.1.weight": rand(3 * width, width),
                block + "adaLN_modulation.1.bias": rand(3 * width),
                block + "mixer.A_log": rand(d_inner, D_STATE),
                block + "mixer.D": rand(d_inner),
                block + "mixer.in_proj.weight": rand(2 * d_inner, width),
                block + "mixer.conv1d.weight": rand(d_inner, 1, 4),
                block + "mixer.conv1d.bias": rand(d_inner),
                block + "mixer.x_proj.weight": rand(dt_rank + 2 * D_STATE, d_inner),
                block + "mixer.dt_proj.weight": rand(d_inner, dt_rank),
                block + "mixer.dt_proj.bias": rand(d_inner),
                block + "mixer.out_proj.weight": rand(width, d_inner),
            }
        )
    return state


@pytest.fixture
def omegaconf_lookalike(monkeypatch):
    """``make(params)``: an object that pickles with the globals and state layout of an OmegaConf
    ``DictConfig`` holding ``{"model": {"target": ..., "params": params}}``."""
    classes, modules = {}, {}
    for module_name, class_name in (
        ("omegaconf.dictconfig", "DictConfig"),
        ("omegaconf.nodes", "AnyNode"),
        ("omegaconf.base", "ContainerMetadata"),
        ("omegaconf.base", "Metadata"),
    ):
        module = modules.setdefault(module_name, types.ModuleType(module_name))
        cls = type(class_name, (), {"__module__": module_name})
        setattr(module, class_name, cls)
        classes[class_name] = cls
    for module_name, module in {"omegaconf": types.ModuleType("omegaconf"), **modules}.items():
        monkeypatch.setitem(sys.modules, module_name, module)

    def metadata(kind: str, key):
        meta = classes[kind]()
        meta.__dict__.update(
            ref_type=typing_any(), object_type=dict if kind == "ContainerMetadata" else None, optional=True,
            key=key, flags={}, flags_root=False, resolver_cache=collections.defaultdict(dict),
        )  # fmt: skip
        return meta

    def node(value, key, parent):
        if isinstance(value, dict):
            config = classes["DictConfig"]()
            content = {name: node(item, name, config) for name, item in value.items()}
            config.__dict__.update(
                _metadata=metadata("ContainerMetadata", key), _parent=parent, _content=content
            )
            return config
        any_node = classes["AnyNode"]()
        any_node.__dict__.update(_metadata=metadata("Metadata", key), _parent=parent, _val=value)
        return any_node

    def make(params: dict):
        return node({"model": {"target": "model_zigma.ZigMa", "params": params}}, None, None)

    return make


def typing_any():
    import typing

    return typing.Any


def write_checkpoint(
    path: Path, params: dict, make_args, prefix: str = "", scale: float = 0.2, **replace
) -> Path:
    contents = {
        "model": {prefix + k: v for k, v in zigma_state_dict(params, 1, scale).items()},
        "ema": {prefix + k: v for k, v in zigma_state_dict(params, 0, scale).items()},
        "opt": {"state": {}, "param_groups": [{"lr": 1e-4}]},
        "args": make_args(params),
        "train_steps": 100,
        "best_fid": 0.0,
        **replace,
    }
    torch.save(contents, path)
    return path


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_every_key_maps_and_the_orders_are_permuted(layout):
    params = zigma_params(layout)
    state = zigma_state_dict(params)
    config = infer_zigma_config(params, state)
    converted = convert_zigma_state_dict(state, config)
    model = ArceeZigmaTransformer.from_config(config)
    assert converted.keys() == model.state_dict().keys()
    model.load_state_dict(converted)  # strict
    assert config["position_embedding"] == ("learned" if layout == "patch1_learned" else "none")
    assert (config["sample_size"], config["num_scan_orders"], config["d_state"]) == (params["img_dim"], 8, 16)
    # ZigMa's time features are [cos, sin] and its adaLN chunks shift, scale, gate; ours [sin, cos] and
    # scale, gate, shift
    time_weight = state["t_embedder.mlp.0.weight"]
    assert torch.equal(
        converted["time_embed.mlp.0.weight"], torch.cat([time_weight[:, 128:], time_weight[:, :128]], 1)
    )
    shift, scale, gate = state["blocks.3.adaLN_modulation.1.bias"].chunk(3)
    assert torch.equal(converted["blocks.3.adaLN_modulation.1.bias"], torch.cat([scale, gate, shift]))
    assert torch.equal(converted["norm_out.weight"], state["norm_f.weight"])


def test_the_reader_runs_no_pickled_code(tmp_path, omegaconf_lookalike):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    checkpoint = write_checkpoint(
        tmp_path / "evil.pt", zigma_params("patch2_none"), omegaconf_lookalike, args=Exploit()
    )
    with pytest.raises(ConversionError, match=r"needs pickled code to load \((posix|nt)\.system\); refusing"):
        load_zigma_checkpoint(checkpoint)
    assert not marker.exists()


def test_the_reader_builds_the_args_without_omegaconf(tmp_path, omegaconf_lookalike):
    params = zigma_params("patch1_learned")
    checkpoint = write_checkpoint(tmp_path / "zigma.pt", params, omegaconf_lookalike, prefix="module.")
    for name in [name for name in sys.modules if name.startswith("omegaconf")]:
        del sys.modules[name]  # the fixture's monkeypatch restores them
    contents = load_zigma_checkpoint(checkpoint)
    assert contents["args"]["model"]["params"] == params
    assert not any(key.startswith("module.") for key in contents["model"])  # prefixes stripped


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (
            {"ema": {"y_embedder.weight": torch.zeros(WIDTH, 8)}},
            r"text- or label-conditioned \(y_embedder.weight\); only ZigMa's unconditional models convert",
        ),
        (
            {"params": {"scan_type": "hilbertN8"}},
            r"scan_type is 'hilbertN8'; only \['zigzagN1', .*\] convert",
        ),
        (
            {"params": {"embed_dim": 64}},
            r"args.model.params disagree with the tensors: embed_dim 64 \(tensors: 32\)",
        ),
        (
            {"ema": {"blocks.2.mixer.D": torch.zeros(7)}},
            r"state dict 'ema' does not match the model .*"
            r"shape mismatches: blocks.2.mixer.D \(7,\) \(expected \(64,\)\)",
        ),
        (
            {"ema": {"blocks.2.mixer.extra": torch.zeros(1)}},
            r"unmapped keys: blocks.2.mixer.extra",
        ),
    ],
)
def test_bad_checkpoints_give_one_clear_error(tmp_path, omegaconf_lookalike, change, message):
    params = zigma_params("patch2_none", **change.get("params", {}))
    ema = {**zigma_state_dict(zigma_params("patch2_none")), **change.get("ema", {})}
    checkpoint = write_checkpoint(tmp_path / "bad.pt", params, omegaconf_lookalike, ema=ema)
    with pytest.raises(ConversionError, match=message):
        convert_zigma_checkpoint(checkpoint, tmp_path / "out", vae=None)


def test_a_truncated_file_gives_one_clear_error(tmp_path, omegaconf_lookalike):
    checkpoint = write_checkpoint(tmp_path / "zigma.pt", zigma_params("patch2_none"), omegaconf_lookalike)
    data = checkpoint.read_bytes()
    checkpoint.write_bytes(data[: len(data) // 2])
    with pytest.raises(ConversionError, match=r"cannot read checkpoint .* \(truncated or damaged\?\)"):
        load_zigma_checkpoint(checkpoint)


def test_legacy_unpermute_puts_tokens_back_with_the_path():
    config = {"sample_size": 4, "patch_size": 1, "num_layers": 8, "hidden_size": 16, "d_state": 4}
    config.update(num_scan_orders=8, state_chain=False)
    fixed = ArceeZigmaTransformer(**config)
    legacy = ArceeZigmaTransformer(**config, legacy_unpermute=True)
    for block_fixed, block_legacy in zip(fixed.blocks, legacy.blocks, strict=True):
        path = block_fixed.mixer.scan_path
        assert torch.equal(block_legacy.mixer.scan_path_inverse, path)
        assert torch.equal(path[block_fixed.mixer.scan_path_inverse], torch.arange(16))
    with pytest.raises(ValueError, match="legacy_unpermute needs scan_pattern='zigzag'"):
        ArceeZigmaTransformer(
            **{**config, "num_scan_orders": 1}, scan_pattern="bidirectional", legacy_unpermute=True
        )


@pytest.mark.slow
def test_converted_folder_samples_end_to_end(tmp_path, omegaconf_lookalike):
    params = zigma_params("patch1_learned")
    # small weights: a smooth velocity field, so dopri5 needs few steps (with 0.2 ones it needs hundreds)
    checkpoint = write_checkpoint(
        tmp_path / "churches_tiny.pt", params, omegaconf_lookalike, prefix="module.", scale=0.02
    )
    vae_dir = tmp_path / "vae"
    tiny_vae().save_pretrained(vae_dir)
    out = tmp_path / "converted"
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--checkpoint", str(checkpoint), "--output_dir", str(out),
         "--vae", str(vae_dir)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "position table learned" in result.stdout

    pipe = ArceeZigmaPipeline.from_pretrained(out)
    config = pipe.transformer.config
    assert (config.timestep_scale, config.final_norm, config.head_modulation, config.num_classes) == (
        1000.0,
        True,
        False,
        0,
    )
    scheduler = pipe.scheduler.config
    assert (scheduler.path, scheduler.solver, scheduler.atol, scheduler.rtol) == (
        "linear",
        "dopri5",
        1e-6,
        1e-3,
    )
    assert pipe.vae.config.scaling_factor == 0.18215
    pipe.set_progress_bar_config(disable=True)
    result = pipe(batch_size=2, generator=torch.Generator().manual_seed(0), output_type="np")
    assert result.images.shape == (2, 16, 16, 3) and result.nfe >= 6  # dopri5: 6 calls per step, at least
    raw = ArceeZigmaTransformer.from_pretrained(out / "transformer", variant="raw")
    assert not torch.equal(raw.final_layer.linear.weight, pipe.transformer.final_layer.linear.weight)
    card = (out / "README.md").read_text()
    for text in ("churches_tiny.pt", "taohu/zigma", "Björn Ommer", "license: apache-2.0", "dopri5"):
        assert text in card, text
    assert "from the paper [ZigMa](https://arxiv.org/abs/2403.13802)" in card and "paper [Arcee]" not in card
    assert json.loads((out / "model_index.json").read_text())["flow_path"] == "linear"
    check_plain_diffusers_load(out, batch_size=1)  # the folder's own sampler: dopri5


def test_the_script_reports_a_user_error_in_one_line(tmp_path):
    notes = tmp_path / "notes.pt"
    notes.write_text("not a checkpoint\n")
    result = subprocess.run(
        [sys.executable, str(SCRIPT), "--checkpoint", str(notes), "--output_dir", str(tmp_path / "o"),
         "--vae", "none"],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert result.returncode != 0 and len(result.stderr.strip().splitlines()) == 1, result.stderr
    assert "cannot read checkpoint" in result.stderr


def test_weights_model_makes_the_raw_weights_the_transformer(tmp_path, omegaconf_lookalike):
    params = zigma_params("patch2_none")
    checkpoint = write_checkpoint(tmp_path / "zigma.pt", params, omegaconf_lookalike)
    contents = load_zigma_checkpoint(checkpoint)
    config = infer_zigma_config(params, contents["model"])
    convert_zigma_checkpoint(checkpoint, tmp_path / "raw", weights="model", vae=None)
    raw = ArceeZigmaTransformer.from_pretrained(tmp_path / "raw" / "transformer")
    ema = ArceeZigmaTransformer.from_pretrained(tmp_path / "raw" / "transformer", variant="ema")
    for model, name in ((raw, "model"), (ema, "ema")):
        expected = convert_zigma_state_dict(contents[name], config, name)
        assert all(torch.equal(value, expected[key]) for key, value in model.state_dict().items())
    with pytest.raises(ConversionError, match="weights must be 'ema' or 'model', got 'best'"):
        convert_zigma_checkpoint(checkpoint, tmp_path / "bad", weights="best", vae=None)
