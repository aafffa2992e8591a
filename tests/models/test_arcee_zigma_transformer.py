import copy
import math

import pytest
import torch
from diffusers.models.modeling_outputs import Transformer2DModelOutput

from arcee_diffusers import ArceeZigmaTransformer
from arcee_diffusers.models import PRESETS
from arcee_diffusers.models.embeddings import LabelEmbedder, get_2d_sincos_pos_embed
from arcee_diffusers.models.scan_orders import inverse_permutation, zigzag_paths

# 8 x 8 input, patch 2: a 4 x 4 token grid, so path 0 runs from token 0 (top-left) to token 12 (bottom-left).
TINY = {"sample_size": 8, "patch_size": 2, "num_layers": 4, "hidden_size": 32, "d_state": 8}


def tiny_model(seed: int = 0, **overrides) -> ArceeZigmaTransformer:
    torch.manual_seed(seed)
    return ArceeZigmaTransformer(**{**TINY, **overrides})


@torch.no_grad()
def randomize_zero_init(model: ArceeZigmaTransformer, seed: int = 0) -> ArceeZigmaTransformer:
    """Random adaLN and head weights (zero at init, which makes the output 0 whatever the input) and a
    larger step size, so that what flows along the scans shows up in the output."""
    generator = torch.Generator().manual_seed(seed)
    for name, param in model.named_parameters():
        if "adaLN_modulation" in name or name.startswith("final_layer"):
            param.copy_(0.2 * torch.randn(param.shape, generator=generator))
        elif "dt_proj" in name and name.endswith("bias"):
            param.fill_(1.0)
    return model


def tiny_inputs(batch: int = 2, seed: int = 1, channels: int = 4) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(batch, channels, 8, 8, generator=generator), torch.rand(batch, generator=generator)


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def expected_param_count(config: dict) -> int:
    """Independent closed form of SPEC §2/§3 (latent 4 x 32 x 32 unless overridden, unconditional)."""
    d, n = config["hidden_size"], config.get("d_state", 256)
    patch, channels = config["patch_size"], 4
    d_inner, dt_rank = 2 * d, math.ceil(d / 16)
    direction = (d_inner * 4 + d_inner) + d_inner * (dt_rank + 2 * n) + (dt_rank * d_inner + d_inner)
    direction += d_inner * n + d_inner  # A_log, D
    directions = 2 if config.get("scan_pattern") == "bidirectional" else 1
    mixer = d * 2 * d_inner + directions * direction + d_inner * d
    block = mixer + d + (d * 3 * d + 3 * d)
    tokens = (32 // patch) ** 2
    patch_embed = channels * patch * patch * d + d
    time_mlp = 256 * d + d + d * d + d
    head = d * 2 * d + 2 * d + d * patch * patch * channels + patch * patch * channels
    return config["num_layers"] * block + patch_embed + tokens * d + time_mlp + d + head


def meta_model(name: str, **overrides) -> ArceeZigmaTransformer:
    with torch.device("meta"):
        return ArceeZigmaTransformer.from_preset(name, **overrides)


# ---------------------------------------------------------------------------------------------------------
# Parameter counts and state dict


@pytest.mark.parametrize("name,expected", [("B/2", 161_776_144), ("Vim-B/2", 161_935_888)])
def test_paper_parameter_counts_exact_with_chain_on_and_off(name, expected):
    for state_chain in (True, False):
        assert num_params(meta_model(name, state_chain=state_chain)) == expected


def test_b2_parameter_breakdown():
    model = meta_model("B/2")
    assert num_params(model.blocks[0].mixer) == 4_876_800
    assert num_params(model.blocks[0]) == 6_649_344
    assert num_params(model.patch_embed) == 13_056
    assert model.pos_embed.numel() == 196_608
    assert num_params(model.time_embed) == 787_968
    assert num_params(model.label_embed) == 768
    assert num_params(model.final_layer) == 1_193_488


@pytest.mark.parametrize("name", list(PRESETS))
def test_every_preset_matches_the_closed_form(name):
    assert num_params(meta_model(name)) == expected_param_count(PRESETS[name])


def test_d_state_16_b2_is_135m():
    assert round(num_params(meta_model("B/2", d_state=16)) / 1e6, 1) == 135.2


@pytest.mark.parametrize("scan_pattern", ["zigzag", "bidirectional"])
def test_state_dict_identical_with_chain_on_and_off_and_without_scan_paths(scan_pattern):
    shapes = {}
    for state_chain in (True, False):
        state_dict = tiny_model(scan_pattern=scan_pattern, state_chain=state_chain).state_dict()
        shapes[state_chain] = {key: tuple(value.shape) for key, value in state_dict.items()}
    assert shapes[True] == shapes[False]
    assert not any("scan_path" in key for key in shapes[True])


# ---------------------------------------------------------------------------------------------------------
# Initialisation and forward


def test_published_initialisation():
    model = tiny_model()
    block = model.blocks[0]
    assert torch.equal(block.mixer.A_log[3], torch.log(torch.arange(1.0, 9.0)))
    assert torch.equal(block.mixer.D, torch.ones(64))
    dt = torch.nn.functional.softplus(block.mixer.dt_proj.bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6 and dt.std() > 0
    assert block.mixer.dt_proj.weight.abs().max() <= 2**-0.5  # dt_rank = ceil(32 / 16) = 2
    for module in (
        block.adaLN_modulation[-1],
        model.final_layer.adaLN_modulation[-1],
        model.final_layer.linear,
    ):
        assert not module.weight.any() and not module.bias.any()
    assert not model.time_embed.mlp[0].bias.any()
    # the patch conv's bias keeps PyTorch's default U(+-1/sqrt(fan_in)), fan_in = 4 channels * 2 * 2
    patch_bias = model.patch_embed.proj.bias
    assert patch_bias.abs().max() <= 1 / math.sqrt(16) and patch_bias.std() > 0.05
    assert torch.equal(model.pos_embed[0], get_2d_sincos_pos_embed(32, 4, base=1000.0))
    # out_proj: kaiming-uniform(a=sqrt(5)) bound 1/sqrt(fan_in), divided by sqrt(depth)
    assert block.mixer.out_proj.weight.abs().max() <= 1 / math.sqrt(64) / math.sqrt(4)


def test_vision_mamba_backward_dt_init():
    # published: dt_proj_b is a plain Linear, its bias zeroed by the model-wide init -> softplus(0) = ln 2
    mixer = tiny_model(scan_pattern="bidirectional").blocks[0].mixer
    assert not mixer.dt_proj_b.bias.any() and mixer.dt_proj.bias.std() > 0
    assert mixer.dt_proj_b.weight.abs().max() <= 2**-0.5 and mixer.dt_proj_b.weight.std() > 0.1
    # the option: the forward branch's dt init for the backward branch too
    mixer = tiny_model(scan_pattern="bidirectional", backward_dt_init="mamba").blocks[0].mixer
    dt = torch.nn.functional.softplus(mixer.dt_proj_b.bias)
    assert dt.min() >= 1e-4 - 1e-9 and dt.max() <= 0.1 + 1e-6 and dt.std() > 0


def test_sincos_pos_embed_base_1000_layout():
    table = get_2d_sincos_pos_embed(8, 3, base=1000.0)  # (9 tokens, 8): [col sin, col cos, row sin, row cos]
    token = 1 * 3 + 2  # row 1, column 2
    freqs = torch.tensor([1.0, 1000.0**-0.5])
    expected = torch.cat([(2 * freqs).sin(), (2 * freqs).cos(), (1 * freqs).sin(), (1 * freqs).cos()])
    torch.testing.assert_close(table[token], expected)


@pytest.mark.parametrize(
    "overrides",
    [
        {},
        {"state_chain": False},
        {"scan_pattern": "bidirectional"},
        {"num_classes": 5, "class_dropout_prob": 0.1},
    ],
)
def test_untrained_output_is_exactly_zero(overrides):
    model = tiny_model(**overrides)
    x, t = tiny_inputs()
    out = model(x, t)
    assert isinstance(out, Transformer2DModelOutput)
    assert out.sample.shape == (2, 4, 8, 8) and not out.sample.any()


def test_return_tuple_and_scalar_timestep_broadcast():
    model = randomize_zero_init(tiny_model())
    x, _ = tiny_inputs()
    (sample,) = model(x, torch.tensor(0.3), return_dict=False)
    torch.testing.assert_close(sample, model(x, torch.full((2,), 0.3)).sample, rtol=0, atol=0)
    torch.testing.assert_close(sample, model(x, 0.3).sample, rtol=0, atol=0)


def test_chain_restarts_every_call_and_stays_within_each_sample():
    model = randomize_zero_init(tiny_model(state_chain=True))
    x, t = tiny_inputs(batch=3)
    out = model(x, t).sample
    assert torch.equal(model(x, t).sample, out)
    torch.testing.assert_close(model(x[1:2], t[1:2]).sample, out[1:2], rtol=1e-5, atol=1e-6)


def test_forward_blocks_intermediates():
    model = randomize_zero_init(tiny_model())
    tokens, conditioning = model.embed(*tiny_inputs())
    last, intermediates = model.forward_blocks(tokens, conditioning, return_intermediates=True)
    assert len(intermediates) == 4 and intermediates[-1] is last
    assert torch.equal(model.forward_blocks(tokens, conditioning), last)


def test_timestep_is_the_raw_flow_time():
    model = tiny_model()
    features = model.time_embed.timestep_features(torch.tensor([0.5]))
    freqs = torch.exp(-math.log(10000.0) * torch.arange(128) / 128)
    torch.testing.assert_close(features[0], torch.cat([(0.5 * freqs).sin(), (0.5 * freqs).cos()]))


def test_out_channels_can_differ_from_in_channels():
    model = randomize_zero_init(tiny_model(in_channels=3, out_channels=6))
    x, t = tiny_inputs(channels=3)
    assert model(x, t).sample.shape == (2, 6, 8, 8)


# ---------------------------------------------------------------------------------------------------------
# Scan orders inside the model


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_block_i_scans_along_path_i_mod_k(k):
    model = tiny_model(num_layers=9, num_scan_orders=k)
    paths = zigzag_paths(4)
    for index, block in enumerate(model.blocks):
        assert torch.equal(block.mixer.scan_path, paths[index % k])


def test_per_layer_permutation_equals_model_level_permutation_for_k1():
    model = randomize_zero_init(tiny_model(state_chain=True))
    x, t = tiny_inputs()
    expected = model(x, t).sample

    row_major = copy.deepcopy(model)
    for block in row_major.blocks:
        block.mixer.scan_path = block.mixer.scan_path_inverse = None
    path = zigzag_paths(4)[0]
    tokens, conditioning = row_major.embed(x, t)
    tokens = row_major.forward_blocks(tokens[:, path], conditioning)[:, inverse_permutation(path)]
    actual = row_major.unpatchify(row_major.final_layer(tokens, conditioning))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("state_chain", [False, True])
def test_causality_along_path_0(state_chain):
    """SPEC §7: Zigma-1 is causal along path 0 through the whole depth; Arcee-1's chain breaks that."""
    model = randomize_zero_init(tiny_model(state_chain=state_chain, num_layers=3))
    x, t = tiny_inputs()
    path = zigzag_paths(4)[0]
    first, last = divmod(path[0].item(), 4), divmod(path[-1].item(), 4)
    assert first == (0, 0) and last == (3, 0)
    perturbed = x.clone()
    perturbed[:, :, 2 * last[0] : 2 * last[0] + 2, 2 * last[1] : 2 * last[1] + 2] += 1.0
    with torch.no_grad():
        out, out_perturbed = model(x, t).sample, model(perturbed, t).sample
    first_patch = (slice(None), slice(None), slice(0, 2), slice(0, 2))
    change_at_first = (out_perturbed - out)[first_patch].abs().max().item()
    assert (out_perturbed - out).abs().max() > 1e-2  # the perturbation does reach the output elsewhere
    if state_chain:
        assert change_at_first > 1e-6
    else:
        assert change_at_first == 0.0


@pytest.mark.parametrize("scan_pattern", ["zigzag", "bidirectional"])
def test_gradient_reaches_block_0_through_the_state_chain_only_when_on(scan_pattern):
    """Block 0's gate is zeroed, so its A only reaches the loss through its final state (the chain)."""
    for state_chain in (False, True):
        model = randomize_zero_init(tiny_model(scan_pattern=scan_pattern, state_chain=state_chain))
        with torch.no_grad():
            gate_rows = slice(32, 64)  # adaLN output is (scale, gate, shift)
            model.blocks[0].adaLN_modulation[-1].weight[gate_rows] = 0
            model.blocks[0].adaLN_modulation[-1].bias[gate_rows] = 0
        x, t = tiny_inputs()
        model(x, t).sample.square().sum().backward()
        mixer = model.blocks[0].mixer
        grads = [mixer.A_log.grad] + ([mixer.A_b_log.grad] if scan_pattern == "bidirectional" else [])
        for grad in grads:
            if state_chain:
                assert grad.abs().max() > 0
            else:
                assert not grad.any()


# ---------------------------------------------------------------------------------------------------------
# Class conditioning


def test_conditional_model_always_has_a_null_row_and_uses_labels():
    model = randomize_zero_init(tiny_model(num_classes=10))  # class_dropout_prob 0: null row still there
    assert model.label_embed.embedding_table.num_embeddings == 11
    model.eval()
    x, t = tiny_inputs()
    out_a = model(x, t, class_labels=torch.tensor([1, 2])).sample
    out_b = model(x, t, class_labels=torch.tensor([3, 2])).sample
    assert not torch.allclose(out_a[0], out_b[0]) and torch.equal(out_a[1], out_b[1])
    torch.testing.assert_close(model(x, t).sample, model(x, t, class_labels=torch.tensor([10, 10])).sample)


def test_label_dropout_only_in_training():
    torch.manual_seed(0)
    embedder = LabelEmbedder(num_classes=4, hidden_size=8, dropout_prob=0.5)
    labels = torch.arange(64) % 4
    table = embedder.embedding_table.weight
    embedder.train()
    embedded = embedder(labels, 64)
    dropped = (embedded == table[4]).all(dim=1)
    assert 10 < dropped.sum() < 54
    assert torch.equal(embedded[~dropped], table[labels[~dropped]])
    embedder.eval()
    assert torch.equal(embedder(labels, 64), table[labels])


def test_unconditional_model_uses_one_row_and_rejects_labels():
    model = tiny_model()
    assert model.label_embed.embedding_table.num_embeddings == 1
    x, t = tiny_inputs()
    with pytest.raises(ValueError, match="class_labels"):
        model(x, t, class_labels=torch.tensor([0, 1]))


# ---------------------------------------------------------------------------------------------------------
# Save / load, mixed precision, checkpointing, compile


@pytest.mark.parametrize("variant", [None, "ema"])
def test_save_load_round_trip_bit_equal(tmp_path, variant):
    model = randomize_zero_init(tiny_model(num_scan_orders=2, num_classes=3))
    model.save_pretrained(tmp_path, variant=variant)
    weights = "diffusion_pytorch_model" + (f".{variant}" if variant else "") + ".safetensors"
    assert (tmp_path / weights).is_file() and (tmp_path / "config.json").is_file()
    loaded = ArceeZigmaTransformer.from_pretrained(tmp_path, variant=variant)
    assert loaded.state_dict().keys() == model.state_dict().keys()
    for key, value in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[key], value), key
    for original, restored in zip(model.blocks, loaded.blocks):
        assert torch.equal(original.mixer.scan_path, restored.mixer.scan_path)
    x, t = tiny_inputs()
    labels = torch.tensor([0, 2])
    assert torch.equal(loaded(x, t, labels).sample, model.eval()(x, t, labels).sample)


@pytest.mark.parametrize("scan_pattern", ["zigzag", "bidirectional"])
def test_bf16_weights_keep_scan_parameters_fp32(tmp_path, scan_pattern):
    model = randomize_zero_init(tiny_model(scan_pattern=scan_pattern))
    model.save_pretrained(tmp_path)
    loaded = ArceeZigmaTransformer.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    fp32_names = {"A_log", "D", "A_b_log", "D_b"}
    for name, param in loaded.named_parameters():
        expected = torch.float32 if name.split(".")[-1] in fp32_names else torch.bfloat16
        assert param.dtype == expected, name
    x, t = tiny_inputs()
    out = loaded(x.bfloat16(), t).sample
    reference = model(x, t).sample
    assert out.dtype == torch.bfloat16 and torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.05 * reference.abs().max().item())


def test_bf16_autocast_close_to_fp32():
    model = randomize_zero_init(tiny_model())
    x, t = tiny_inputs()
    reference = model(x, t).sample
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(x, t).sample
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out.float(), reference, rtol=0.1, atol=0.05 * reference.abs().max().item())


def test_layerwise_casting_fp8_storage_bf16_compute(tmp_path):
    model = randomize_zero_init(tiny_model())
    model.save_pretrained(tmp_path)
    model = ArceeZigmaTransformer.from_pretrained(tmp_path, torch_dtype=torch.bfloat16)
    x, t = tiny_inputs()
    reference = model(x.bfloat16(), t).sample.float()
    model.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.bfloat16)
    block = model.blocks[0]
    assert block.mixer.in_proj.weight.dtype == torch.float8_e4m3fn
    assert block.mixer.dt_proj.weight.dtype == torch.bfloat16 and block.mixer.A_log.dtype == torch.float32
    out = model(x.bfloat16(), t).sample.float()
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, reference, rtol=0.2, atol=0.1 * reference.abs().max().item())


@pytest.mark.parametrize("scan_pattern", ["zigzag", "bidirectional"])
def test_gradient_checkpointing_gives_the_same_gradients(scan_pattern):
    x, t = tiny_inputs()
    grads = {}
    for checkpointing in (False, True):
        model = randomize_zero_init(tiny_model(scan_pattern=scan_pattern, num_scan_orders=1))
        if checkpointing:
            model.enable_gradient_checkpointing()
        calls = []
        model.blocks[1].register_forward_pre_hook(lambda *args, calls=calls: calls.append(1))
        model.train()
        model(x, t).sample.square().mean().backward()
        assert len(calls) == (2 if checkpointing else 1)  # recomputed in the backward when checkpointing
        grads[checkpointing] = {name: p.grad.clone() for name, p in model.named_parameters()}
    for name, grad in grads[False].items():
        torch.testing.assert_close(grads[True][name], grad, rtol=1e-5, atol=1e-7, msg=name)
    assert grads[True]["blocks.0.mixer.A_log"].abs().max() > 0


@pytest.mark.slow
def test_torch_compile_with_the_scan_as_an_opaque_op():
    model = randomize_zero_init(tiny_model(num_layers=2, scan_backend="torch"))
    x, t = tiny_inputs()
    expected = model(x, t).sample
    compiled = torch.compile(model, backend="aot_eager", fullgraph=True)
    out = compiled(x, t).sample
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    out.square().sum().backward()
    assert model.blocks[0].mixer.A_log.grad.abs().max() > 0


# ---------------------------------------------------------------------------------------------------------
# Bad configuration and input


@pytest.mark.parametrize(
    "overrides,argument",
    [
        ({"sample_size": 9}, "sample_size"),
        ({"num_scan_orders": 3}, "num_scan_orders"),
        ({"scan_pattern": "bidirectional", "num_scan_orders": 2}, "num_scan_orders"),
        ({"scan_pattern": "hilbert"}, "scan_pattern"),
        ({"num_classes": -1}, "num_classes"),  # 0 is valid: no label embedding
        ({"class_dropout_prob": 0.1}, "class_dropout_prob"),
        ({"class_dropout_prob": 1.0, "num_classes": 3}, "class_dropout_prob"),
        ({"hidden_size": 30}, "hidden_size"),
        ({"scan_pattern": "bidirectional", "backward_dt_init": "uniform"}, "backward_dt_init"),
    ],
)
def test_bad_config_raises_value_error_naming_the_argument(overrides, argument):
    with pytest.raises(ValueError, match=argument):
        tiny_model(**overrides)


def test_unknown_preset():
    with pytest.raises(ValueError, match="preset"):
        ArceeZigmaTransformer.from_preset("H/2")


def test_bad_input_shapes():
    model = tiny_model()
    with pytest.raises(ValueError, match="sample_size"):
        model(torch.randn(2, 4, 16, 16), torch.rand(2))
    with pytest.raises(ValueError, match="timestep"):
        model(torch.randn(2, 4, 8, 8), torch.rand(3))


ZIGMA_OPTIONS = {
    "num_classes": 0,
    "position_embedding": "none",
    "timestep_scale": 1000.0,
    "final_norm": True,
    "head_modulation": False,
}


def test_zigma_options_change_the_parameters_as_documented():
    default = set(tiny_model().state_dict())
    zigma = set(tiny_model(**ZIGMA_OPTIONS).state_dict())
    assert default - zigma == {
        "pos_embed",
        "label_embed.embedding_table.weight",
        "final_layer.adaLN_modulation.1.weight",
        "final_layer.adaLN_modulation.1.bias",
    }
    assert zigma - default == {"norm_out.weight"}
    learned = tiny_model(position_embedding="learned")
    assert torch.count_nonzero(learned.pos_embed) == 0  # ZigMa's use_pe 2 starts from zeros
    x, t = tiny_inputs()
    assert torch.count_nonzero(tiny_model(**ZIGMA_OPTIONS)(x, t).sample) == 0  # the head is zero-initialised
    with pytest.raises(
        ValueError, match=r"class_labels must be None for an unconditional model \(num_classes=0\)"
    ):
        tiny_model(**ZIGMA_OPTIONS)(x, t, class_labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="position_embedding must be one of"):
        tiny_model(position_embedding="rope")
    with pytest.raises(ValueError, match="timestep_scale must be a positive number"):
        tiny_model(timestep_scale=0)


@torch.no_grad()
def test_timestep_scale_multiplies_t_and_the_final_norm_normalises_the_stream():
    scaled = randomize_zero_init(tiny_model(**ZIGMA_OPTIONS))
    plain = copy.deepcopy(scaled)
    plain.register_to_config(timestep_scale=1.0)
    x, t = tiny_inputs()
    torch.testing.assert_close(scaled(x, t).sample, plain(x, 1000 * t).sample)

    tokens, conditioning = scaled.embed(x, t)
    last, intermediates = scaled.forward_blocks(tokens, conditioning, return_intermediates=True)
    residual = tokens.float()  # the stream ZigMa's blocks hand on: the embeddings plus every block's output
    for output in intermediates[:-1]:
        residual = residual + output
    expected = scaled.norm_out(residual + intermediates[-1])
    torch.testing.assert_close(last, expected)
