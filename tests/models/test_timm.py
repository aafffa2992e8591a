import json

import pytest
import safetensors.torch
import timm
import torch
import torch.nn.functional as F
from timm.optim import create_optimizer_v2

import arcee_diffusers  # noqa: F401  (registers the timm models)
from arcee_diffusers import ArceeZigmaTransformer
from arcee_diffusers.models import VARIANTS as MODEL_VARIANTS
from arcee_diffusers.timm_models import ArceeZigma, checkpoint_filter_fn, diffusers_conditioning

# 8 x 8 latents, patch 2: a 4 x 4 token grid. The same model in timm and diffusers argument names.
TINY_TIMM = {"img_size": 8, "depth": 4, "embed_dim": 32, "d_state": 8}
TINY_DIFFUSERS = {"sample_size": 8, "patch_size": 2, "num_layers": 4, "hidden_size": 32, "d_state": 8}
GRID, WIDTH = 4, 32

# Every registered name (the variant table's timm names): the diffusers preset it shares its blocks with, and
# its overrides.
VARIANTS = {variant.timm_name: (variant.preset, variant.overrides) for variant in MODEL_VARIANTS}
DIFFUSERS_ONLY = ("time_embed.", "label_embed.", "final_layer.")


def tiny_timm(name: str = "arcee_zigma_tiny_p2_k1", seed: int = 0, **kwargs) -> torch.nn.Module:
    torch.manual_seed(seed)
    return timm.create_model(name, **{**TINY_TIMM, **kwargs})


def tiny_inputs(batch: int = 2, channels: int = 4, seed: int = 1) -> torch.Tensor:
    return torch.randn(batch, channels, 8, 8, generator=torch.Generator().manual_seed(seed))


@torch.no_grad()
def randomize_zero_init(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random adaLN and embedder weights: at init the adaLN gates are 0, which hides the mixers, the state
    chain and the conditioning from the output."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "adaLN_modulation" in name or name.startswith(("time_embed", "label_embed", "conditioning")):
            param.copy_(0.3 * torch.randn(param.shape, generator=generator))
        elif "dt_proj" in name and name.endswith("bias"):
            param.fill_(1.0)
    return model


def save_diffusers(directory, seed: int = 0, **overrides) -> tuple[ArceeZigmaTransformer, str]:
    torch.manual_seed(seed)
    model = randomize_zero_init(ArceeZigmaTransformer(**{**TINY_DIFFUSERS, **overrides}), seed).eval()
    model.save_pretrained(directory)
    return model, str(directory / "diffusion_pytorch_model.safetensors")


def load_timm(name: str, file: str, overlay: dict | None = None, **kwargs) -> torch.nn.Module:
    overlay = {"file": file, **(overlay or {})}
    kwargs = {**TINY_TIMM, **kwargs}
    return timm.create_model(name, pretrained=True, pretrained_cfg_overlay=overlay, **kwargs).eval()


def test_importing_the_package_registers_the_models():
    assert timm.list_models("arcee_zigma*") == sorted(VARIANTS)
    for variant in MODEL_VARIANTS:
        cfg = timm.get_pretrained_cfg(variant.timm_name)
        size = variant.config.get("sample_size", 32)
        assert (
            cfg.input_size == (4, size, size)
            and cfg.first_conv == "patch_embed.proj"
            and cfg.classifier == "head"
        )


@pytest.mark.parametrize("name", sorted(VARIANTS))
def test_variant_blocks_match_the_diffusers_preset(name):
    preset, scan_config = VARIANTS[name]
    with torch.device("meta"):
        model = timm.create_model(name)
        reference = ArceeZigmaTransformer.from_preset(preset, **scan_config)
    ours = {k: v.shape for k, v in model.state_dict().items()}
    theirs = {k: v.shape for k, v in reference.state_dict().items() if not k.startswith(DIFFUSERS_ONLY)}
    assert set(ours) - set(theirs) == {"conditioning", "head.weight", "head.bias"}
    assert all(ours[k] == shape for k, shape in theirs.items())
    assert model.num_scan_orders == reference.config.num_scan_orders
    assert model.state_chain == reference.config.state_chain
    assert model.scan_pattern == reference.config.scan_pattern


def test_b2_parameter_count_is_the_paper_trunk_plus_conditioning_and_classifier():
    with torch.device("meta"):
        model = timm.create_model("arcee_zigma_b_p2_k1")
    # SPEC §2: B/2 = 161,776,144 with timestep MLP 787,968, label row 768 and head 1,193,488.
    trunk = 161_776_144 - 787_968 - 768 - 1_193_488
    assert sum(p.numel() for p in model.parameters()) == trunk + 768 + (768 * 1000 + 1000)


def test_scan_paths_are_the_diffusers_models():
    model = tiny_timm("arcee_zigma_tiny_p2_k4")
    reference = ArceeZigmaTransformer(**TINY_DIFFUSERS, num_scan_orders=4)
    for ours, theirs in zip(model.blocks, reference.blocks, strict=True):
        assert torch.equal(ours.mixer.scan_path, theirs.mixer.scan_path)
    assert not torch.equal(model.blocks[0].mixer.scan_path, model.blocks[1].mixer.scan_path)


def test_forward_features_head_and_classifier_shapes():
    model = tiny_timm().eval()
    x = tiny_inputs()
    assert model.num_features == WIDTH
    with torch.no_grad():
        tokens = model.forward_features(x)
        assert tokens.shape == (2, GRID * GRID, WIDTH)
        assert model(x).shape == (2, 1000)
        pooled = model.forward_head(tokens, pre_logits=True)
        torch.testing.assert_close(pooled, tokens.mean(dim=1))
        torch.testing.assert_close(model.forward_head(tokens), model.head(pooled))


def test_reset_classifier_and_pooling():
    model = tiny_timm().eval()
    x = tiny_inputs()
    with torch.no_grad():
        tokens = model.forward_features(x)
        model.reset_classifier(5)
        assert model(x).shape == (2, 5) and model.get_classifier().out_features == 5
        model.reset_classifier(0, global_pool="max")
        torch.testing.assert_close(model(x), tokens.amax(dim=1))
        model.reset_classifier(0, global_pool="")
        torch.testing.assert_close(model(x), tokens)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="token")
    assert tiny_timm(num_classes=0).head.__class__ is torch.nn.Identity


def test_forward_intermediates_indices_formats_and_norm():
    model = randomize_zero_init(tiny_timm()).eval()
    x = tiny_inputs()
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert len(maps) == 4 and all(m.shape == (2, WIDTH, GRID, GRID) for m in maps)
        torch.testing.assert_close(final, model.forward_features(x))

        tokens = model.forward_intermediates(x, indices=[0, -1], output_fmt="NLC", intermediates_only=True)
        assert len(tokens) == 2 and all(t.shape == (2, GRID * GRID, WIDTH) for t in tokens)
        # NCHW maps are the row-major tokens laid out on the grid
        torch.testing.assert_close(maps[0][:, :, 1, 2], tokens[0][:, 1 * GRID + 2])
        torch.testing.assert_close(maps[-1], tokens[1].transpose(1, 2).reshape(2, WIDTH, GRID, GRID))

        last_two = model.forward_intermediates(x, indices=2, intermediates_only=True)
        assert [m.shape for m in last_two] == [maps[2].shape, maps[3].shape]
        torch.testing.assert_close(last_two[0], maps[2])

        early = model.forward_intermediates(x, indices=[1], stop_early=True, intermediates_only=True)
        torch.testing.assert_close(early[0], maps[1])

        normed = model.forward_intermediates(
            x, indices=[1], norm=True, output_fmt="NLC", intermediates_only=True
        )
        torch.testing.assert_close(
            normed[0], F.layer_norm(maps[1].flatten(2).transpose(1, 2), (WIDTH,), eps=1e-6)
        )
    assert not torch.allclose(maps[0], maps[1])
    with pytest.raises(ValueError, match="output_fmt"):
        model.forward_intermediates(x, output_fmt="NHWC")


def test_prune_intermediate_layers_keeps_the_requested_outputs():
    model = randomize_zero_init(tiny_timm()).eval()
    x = tiny_inputs()
    with torch.no_grad():
        expected = model.forward_intermediates(x, indices=[0, 1], intermediates_only=True)
        kept = model.prune_intermediate_layers([0, 1])
        assert kept == [0, 1] and len(model.blocks) == 2
        assert isinstance(model.head, torch.nn.Identity) and model.num_classes == 0
        pruned = model.forward_intermediates(x, indices=kept, intermediates_only=True)
    for ours, theirs in zip(pruned, expected, strict=True):
        torch.testing.assert_close(ours, theirs)


def test_features_only_returns_nchw_maps_with_feature_info():
    x = tiny_inputs()
    full = randomize_zero_init(tiny_timm("arcee_zigma_tiny_p2_k4")).eval()
    features = tiny_timm("arcee_zigma_tiny_p2_k4", features_only=True, out_indices=(0, 2)).eval()
    features.model.load_state_dict(full.state_dict(), strict=False)
    assert features.feature_info.channels() == [WIDTH, WIDTH]
    assert features.feature_info.reduction() == [2, 2]
    assert len(features.model.blocks) == 3  # pruned after block 2
    with torch.no_grad():
        maps = features(x)
        expected = full.forward_intermediates(x, indices=[0, 2], intermediates_only=True)
    assert [m.shape for m in maps] == [(2, WIDTH, GRID, GRID)] * 2
    for ours, theirs in zip(maps, expected, strict=True):
        torch.testing.assert_close(ours, theirs)
    default = tiny_timm(features_only=True)
    assert len(default(x)) == 3  # timm's isotropic default: the last 3 blocks


@pytest.mark.parametrize("name", ["arcee_zigma_tiny_p2_k1", "arcee_zigma_vim_b_p2"])
def test_state_chain_on_and_off_share_keys_but_not_outputs(name):
    chain = randomize_zero_init(tiny_timm(name)).eval()
    baseline = tiny_timm(name, state_chain=False).eval()
    assert {k: v.shape for k, v in chain.state_dict().items()} == {
        k: v.shape for k, v in baseline.state_dict().items()
    }
    baseline.load_state_dict(chain.state_dict())
    x = tiny_inputs()
    with torch.no_grad():
        assert not torch.allclose(chain.forward_features(x), baseline.forward_features(x), atol=1e-4)


# the trunk of ZigMa's released models: no position table, the final norm, t x 1000
ZIGMA_TRUNK = {"position_embedding": "none", "final_norm": True, "timestep_scale": 1000.0}
ZIGMA_TRUNK["state_chain"] = False
# (timm name, timm kwargs, diffusers overrides): Arcee-1, Zigma-4 baseline, ArceeVim, a conditional Arcee-2,
# a ZigMa release-like Zigma-2.
CONVERSIONS = [
    ("arcee_zigma_tiny_p2_k1", {}, {}),
    ("arcee_zigma_tiny_p2_k4", {"state_chain": False}, {"num_scan_orders": 4, "state_chain": False}),
    ("arcee_zigma_vim_b_p2", {}, {"scan_pattern": "bidirectional"}),
    ("arcee_zigma_tiny_p2_k1", {"num_scan_orders": 2}, {"num_scan_orders": 2, "num_classes": 3}),
    (
        "arcee_zigma_tiny_p2_k1",
        {"num_scan_orders": 2, **ZIGMA_TRUNK},
        {"num_scan_orders": 2, "num_classes": 0, "head_modulation": False, **ZIGMA_TRUNK},
    ),
]


@pytest.mark.parametrize(("name", "timm_kwargs", "diffusers_overrides"), CONVERSIONS)
def test_diffusers_checkpoint_loads_and_reproduces_the_trunk(
    tmp_path, name, timm_kwargs, diffusers_overrides
):
    generator, file = save_diffusers(tmp_path, **diffusers_overrides)
    model = load_timm(name, file, **timm_kwargs)
    reference = generator.state_dict()
    for key, value in model.state_dict().items():
        if key != "conditioning" and not key.startswith("head."):
            assert torch.equal(value, reference[key]), key

    x = tiny_inputs()
    with torch.no_grad():
        tokens, conditioning = generator.embed(x, 1.0)  # the data end, null label
        torch.testing.assert_close(model.conditioning.expand(2, -1), conditioning)
        # same trunk given the same conditioning vector
        conditioning = model.conditioning.expand(2, -1)
        last, intermediates = generator.forward_blocks(tokens, conditioning, return_intermediates=True)
        final, ours = model.forward_intermediates(x, output_fmt="NLC")
        for a, b in zip(ours, intermediates, strict=True):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
        # forward_features ends with the generator head's LayerNorm
        torch.testing.assert_close(final, F.layer_norm(last, (WIDTH,), eps=1e-6), rtol=1e-5, atol=1e-5)
        # the conditioning matters: the noise end (t = 0) gives other tokens
        _, noise_end = generator.embed(x, 0.0)
        assert not torch.allclose(generator.forward_blocks(tokens, noise_end), last, atol=1e-3)


def test_diffusers_conditioning_is_time_plus_null_label(tmp_path):
    generator, _ = save_diffusers(tmp_path, num_classes=5)
    state_dict = generator.state_dict()
    with torch.no_grad():
        expected = (
            generator.time_embed(torch.tensor([0.25]), torch.float32)
            + generator.label_embed.embedding_table.weight[5]
        )
    torch.testing.assert_close(diffusers_conditioning(state_dict, timestep=0.25), expected)


def test_pretrained_features_only_and_other_in_chans(tmp_path):
    generator, file = save_diffusers(tmp_path)
    features = timm.create_model(
        "arcee_zigma_tiny_p2_k1",
        pretrained=True,
        pretrained_cfg_overlay=dict(file=file),
        features_only=True,
        out_indices=[-1],
        **TINY_TIMM,
    ).eval()
    x = tiny_inputs()
    with torch.no_grad():
        (last_map,) = features(x)
        tokens, _ = generator.embed(x, 1.0)
        expected = generator.forward_blocks(tokens, features.model.conditioning.expand(2, -1))
    torch.testing.assert_close(last_map, expected.transpose(1, 2).reshape(2, WIDTH, GRID, GRID))
    # timm's loader adapts the 4-channel latent stem to RGB
    rgb = load_timm("arcee_zigma_tiny_p2_k1", file, in_chans=3)
    assert rgb.patch_embed.proj.weight.shape[1] == 3 and rgb(tiny_inputs(channels=3)).shape == (2, 1000)


def test_timm_checkpoint_round_trip(tmp_path):
    model = randomize_zero_init(tiny_timm(num_classes=7))
    file = str(tmp_path / "model.safetensors")
    safetensors.torch.save_file(model.state_dict(), file)
    # timm keeps a checkpoint's classifier only when the pretrained cfg declares its class count
    loaded = load_timm("arcee_zigma_tiny_p2_k1", file, overlay={"num_classes": 7}, num_classes=7)
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key


@pytest.mark.parametrize(
    ("diffusers_overrides", "timm_kwargs", "message"),
    [
        ({"num_scan_orders": 4}, {}, "num_scan_orders=4"),
        ({"state_chain": False}, {}, "state_chain=False"),
        ({"sample_size": 16}, {}, "sample_size=16"),
        ({"scan_pattern": "bidirectional"}, {}, "scan_pattern='bidirectional'"),
        ({}, {"depth": 2}, "4 blocks, the model 2"),
        ({}, {"embed_dim": 64}, "has shape"),
        ({}, {"d_state": 4}, "has shape"),
    ],
)
def test_mismatched_checkpoint_raises_a_clear_error(tmp_path, diffusers_overrides, timm_kwargs, message):
    _, file = save_diffusers(tmp_path, **diffusers_overrides)
    with pytest.raises(ValueError, match=message):
        load_timm("arcee_zigma_tiny_p2_k1", file, **timm_kwargs)


def test_mismatches_without_config_json_are_caught_by_the_weights(tmp_path):
    generator, _ = save_diffusers(tmp_path / "big", sample_size=16, scan_pattern="bidirectional")
    model = tiny_timm(scan_pattern="bidirectional")
    with pytest.raises(ValueError, match="position table has 64 tokens, the model 16"):
        checkpoint_filter_fn(generator.state_dict(), model)
    with pytest.raises(ValueError, match="'bidirectional' model"):
        checkpoint_filter_fn(generator.state_dict(), tiny_timm())


def test_foreign_checkpoints_are_rejected(tmp_path):
    with pytest.raises(ValueError, match="Not an ArceeZigmaTransformer"):
        checkpoint_filter_fn({"pos_embed": torch.zeros(1, 16, 32)}, tiny_timm())
    _, file = save_diffusers(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "_class_name": "DiTTransformer2DModel"}))
    with pytest.raises(ValueError, match="not an ArceeZigmaTransformer"):
        load_timm("arcee_zigma_tiny_p2_k1", file)


@pytest.mark.parametrize(
    ("kwargs", "error", "argument"),
    [
        ({"img_size": (8, 16)}, ValueError, "img_size"),
        ({"img_size": 9}, ValueError, "img_size"),
        ({"img_size": "8"}, TypeError, "img_size"),
        ({"global_pool": "token"}, ValueError, "global_pool"),
        ({"num_scan_orders": 3}, ValueError, "num_scan_orders"),
        ({"scan_pattern": "bidirectional", "backward_dt_init": "s4"}, ValueError, "backward_dt_init"),
    ],
)
def test_bad_arguments_raise_naming_the_argument(kwargs, error, argument):
    with pytest.raises(error, match=argument):
        ArceeZigma(**{**TINY_TIMM, **kwargs})


def test_vision_mamba_backward_dt_init_matches_the_diffusers_model():
    # the published zero bias by default (the timm init must not overwrite either choice)
    default = ArceeZigma(**TINY_TIMM, scan_pattern="bidirectional").blocks[0].mixer
    assert not default.dt_proj_b.bias.any() and default.dt_proj.bias.std() > 0
    mamba = ArceeZigma(**TINY_TIMM, scan_pattern="bidirectional", backward_dt_init="mamba").blocks[0].mixer
    dt = torch.nn.functional.softplus(mamba.dt_proj_b.bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6 and dt.std() > 0


def test_bad_input_shape_raises():
    model = tiny_timm()
    with pytest.raises(ValueError, match=r"x must have shape \(batch, 4, 8, 8\)"):
        model(torch.zeros(2, 4, 16, 16))


def test_grad_checkpointing_and_timm_optimizer_groups():
    model = randomize_zero_init(tiny_timm())
    x = tiny_inputs()
    model(x).square().mean().backward()
    expected = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    model.set_grad_checkpointing()
    model(x).square().mean().backward()
    for name, param in model.named_parameters():
        torch.testing.assert_close(param.grad, expected[name], msg=name)
    assert expected["blocks.0.mixer.in_proj.weight"].abs().sum() > 0
    assert {"pos_embed", "conditioning", "blocks.3.mixer.A_log"} <= model.no_weight_decay()
    optimizer = create_optimizer_v2(model, "adamw", weight_decay=0.05, layer_decay=0.75)
    assert len(optimizer.param_groups) > 2
