"""ArceeZigmaPipeline: diffusers' usual pipeline checks (same names as its PipelineTesterMixin), on tiny
random-weight models on CPU, plus sampler conventions, classifier-free guidance and input validation."""

from __future__ import annotations

import inspect
import json

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import (
    DDPMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FlowMatchHeunDiscreteScheduler,
    UniPCMultistepScheduler,
)
from tiny_pipelines import (
    NUM_CLASSES,
    check_plain_diffusers_load,
    make_pipeline,
    seeded,
    tiny_transformer,
    tiny_vae,
)

from arcee_diffusers import ArceeZigmaPipeline, FlowMatchGVPScheduler
from arcee_diffusers.pipelines.model_card import model_card


@pytest.fixture(scope="module")
def pipe() -> ArceeZigmaPipeline:
    return make_pipeline()


@pytest.fixture(scope="module")
def conditional_pipe() -> ArceeZigmaPipeline:
    return make_pipeline(num_classes=NUM_CLASSES)


# ---- diffusers' pipeline checks --------------------------------------------------------------------------


def test_components(pipe):
    assert set(pipe.components) == {"transformer", "scheduler", "vae"}
    assert pipe.model_cpu_offload_seq == "transformer->vae"
    assert pipe.config.flow_path == "gvp"
    assert (
        ArceeZigmaPipeline(pipe.transformer, FlowMatchEulerDiscreteScheduler()).config.flow_path == "linear"
    )


def test_call_signature():
    parameters = inspect.signature(ArceeZigmaPipeline.__call__).parameters
    expected = {
        "batch_size": 1,
        "class_labels": None,
        "guidance_scale": 1.0,
        "num_inference_steps": 50,
        "generator": None,
        "latents": None,
        "output_type": "pil",
        "return_dict": True,
        "callback_on_step_end": None,
        "callback_on_step_end_tensor_inputs": ["latents"],
    }
    assert {name: parameters[name].default for name in expected} == expected


def test_inference(pipe):
    output = pipe(batch_size=2, num_inference_steps=4, generator=seeded(), output_type="np")
    assert output.images.shape == (2, 8, 8, 3) and output.images.dtype == np.float32
    assert output.images.min() >= 0.0 and output.images.max() <= 1.0
    assert output.images.std() > 0.01
    assert output.nfe == 4


def test_dict_tuple_outputs_equivalent(pipe):
    output = pipe(num_inference_steps=3, generator=seeded(), output_type="np")
    images, nfe = pipe(num_inference_steps=3, generator=seeded(), output_type="np", return_dict=False)
    np.testing.assert_array_equal(output.images, images)
    assert output.nfe == nfe == 3
    np.testing.assert_array_equal(output.to_tuple()[0], images)


def test_seeded_determinism(pipe):
    first = pipe(num_inference_steps=3, generator=seeded(7), output_type="np").images
    second = pipe(num_inference_steps=3, generator=seeded(7), output_type="np").images
    other = pipe(num_inference_steps=3, generator=seeded(8), output_type="np").images
    np.testing.assert_array_equal(first, second)
    assert np.abs(first - other).max() > 1e-3


@pytest.mark.parametrize("conditional", [False, True])
def test_inference_batch_single_identical(pipe, conditional_pipe, conditional):
    seeds = [3, 4, 5]
    labels = [0, 4, 2]
    runner = conditional_pipe if conditional else pipe
    kwargs = {"num_inference_steps": 3, "output_type": "np"}
    if conditional:
        kwargs["guidance_scale"] = 2.0
    batch = runner(
        batch_size=3,
        class_labels=labels if conditional else None,
        generator=[seeded(s) for s in seeds],
        **kwargs,
    ).images
    for i, seed in enumerate(seeds):
        single = runner(class_labels=[labels[i]] if conditional else None, generator=seeded(seed), **kwargs)
        assert np.abs(batch[i] - single.images[0]).max() < 1e-4


def test_save_load_local(pipe, tmp_path):
    expected = pipe(num_inference_steps=3, generator=seeded(), output_type="np").images
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["flow_path"] == "gvp" and index["vae"] == [None, None]
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").is_file()
    assert (tmp_path / "scheduler" / "scheduler_config.json").is_file()
    loaded = ArceeZigmaPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, FlowMatchGVPScheduler) and loaded.vae is None
    for name, parameter in pipe.transformer.state_dict().items():
        assert torch.equal(parameter, loaded.transformer.state_dict()[name]), name
    images = loaded(num_inference_steps=3, generator=seeded(), output_type="np").images
    # bit-equal weights; BLAS results can still move by an ulp with the loaded tensors' memory alignment
    np.testing.assert_allclose(images, expected, atol=1e-5, rtol=0)


@pytest.mark.parametrize("latent", [False, True])
def test_saved_folder_loads_with_plain_diffusers(tmp_path, latent):
    if latent:
        pipe, call = make_pipeline(vae=tiny_vae(), in_channels=4), {"batch_size": 2}
    else:
        pipe, call = make_pipeline(num_classes=NUM_CLASSES), {"class_labels": [1, 3], "guidance_scale": 2.0}
    pipe.save_pretrained(tmp_path)
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_arcee_zigma", "ArceeZigmaPipeline"]
    assert (tmp_path / "transformer" / "modeling_arcee_zigma.py").is_file()
    check_plain_diffusers_load(tmp_path, num_inference_steps=3, **call)


@pytest.mark.parametrize(
    "name, message",
    [
        ("./no/such/folder", r"no such folder, and not a Hub repo id \('namespace/name'\)$"),
        ("no-such-namespace/no-such-model", "no such folder, and the Hub could not provide it"),
    ],
)
def test_from_pretrained_of_a_missing_folder_says_so(name, message, monkeypatch):
    monkeypatch.setattr("huggingface_hub.constants.HF_HUB_OFFLINE", True)  # no network here or in CI
    with pytest.raises(FileNotFoundError, match=message) as error:
        ArceeZigmaPipeline.from_pretrained(name)
    assert "\n" not in str(error.value) and name in str(error.value)


def test_save_load_variant(pipe, tmp_path):
    pipe.save_pretrained(tmp_path, variant="ema")
    assert (tmp_path / "transformer" / "diffusion_pytorch_model.ema.safetensors").is_file()
    assert not (tmp_path / "transformer" / "diffusion_pytorch_model.safetensors").exists()
    loaded = ArceeZigmaPipeline.from_pretrained(tmp_path, variant="ema")
    for (name, expected), actual in zip(
        pipe.transformer.state_dict().items(), loaded.transformer.state_dict().values()
    ):
        assert torch.equal(expected, actual), name


@pytest.mark.parametrize("keyword", ["dtype", "torch_dtype"])
def test_to_dtype(pipe, tmp_path, keyword):
    pipe.save_pretrained(tmp_path)
    loaded = ArceeZigmaPipeline.from_pretrained(tmp_path, **{keyword: torch.bfloat16})
    loaded.set_progress_bar_config(disable=True)
    assert loaded.transformer.dtype == torch.bfloat16
    # _keep_in_fp32_modules: the SSM's A_log and D stay float32
    assert {p.dtype for n, p in loaded.transformer.named_parameters() if n.endswith(("A_log", ".D"))} == {
        torch.float32
    }
    output = loaded(num_inference_steps=2, generator=seeded(), output_type="pt")
    assert output.images.dtype == torch.bfloat16 and torch.isfinite(output.images.float()).all()
    converted = make_pipeline().to(torch.float64)
    assert converted.transformer.dtype == torch.float64
    assert converted(num_inference_steps=2, output_type="pt").images.dtype == torch.float64


def test_output_types(pipe):
    kwargs = {"batch_size": 2, "num_inference_steps": 2}
    pil = pipe(generator=seeded(), **kwargs).images
    assert len(pil) == 2 and isinstance(pil[0], PIL.Image.Image) and pil[0].size == (8, 8)
    pt = pipe(generator=seeded(), output_type="pt", **kwargs).images
    latent = pipe(generator=seeded(), output_type="latent", **kwargs).images
    assert pt.shape == latent.shape == (2, 3, 8, 8)
    # pixel space: images are the samples mapped from [-1, 1] to [0, 1]
    torch.testing.assert_close(pt, (latent / 2 + 0.5).clamp(0, 1))
    np.testing.assert_allclose(np.asarray(pil[0]), np.rint(pt[0].permute(1, 2, 0).numpy() * 255), atol=1)


def test_grayscale_pixel_model():
    gray = make_pipeline(in_channels=1)
    images = gray(batch_size=1, num_inference_steps=2, generator=seeded()).images
    assert images[0].mode == "L"


def test_latent_model_decodes_with_the_vae_scaling_factor():
    vae = tiny_vae()
    pipe = make_pipeline(in_channels=4, vae=vae)
    assert pipe.vae_scale_factor == 2
    latents = pipe(num_inference_steps=2, generator=seeded(), output_type="latent").images
    images = pipe(num_inference_steps=2, generator=seeded(), output_type="pt").images
    assert images.shape == (1, 3, 16, 16)
    with torch.no_grad():
        decoded = vae.decode(latents / vae.config.scaling_factor).sample
    torch.testing.assert_close(images, (decoded / 2 + 0.5).clamp(0, 1))


def test_callback_on_step_end(pipe):
    seen = []

    def callback(pipeline, i, t, callback_kwargs):
        seen.append((i, float(t)))
        if i == 3:  # the last step: replace the sample by zeros
            return {"latents": torch.zeros_like(callback_kwargs["latents"])}
        return {}

    images = pipe(num_inference_steps=4, output_type="np", callback_on_step_end=callback).images
    assert seen == [(0, 0.0), (1, 0.25), (2, 0.5), (3, 0.75)]
    np.testing.assert_allclose(images, 0.5)


# ---- samplers --------------------------------------------------------------------------------------------


@pytest.mark.parametrize("flow_path", ["gvp", "linear"])
def test_every_scheduler_solves_the_same_ode(flow_path):
    """The sample is the ODE's solution whatever the scheduler: converged samplers agree with tight dopri5.

    diffusers' schedulers see a GVP model through the change of variables: this checks it end to end.
    """
    pipe = make_pipeline(
        scheduler=FlowMatchGVPScheduler(path=flow_path, solver="dopri5", rtol=1e-5, atol=1e-7)
    )
    reference = pipe(num_inference_steps=None, generator=seeded(), output_type="latent")
    assert reference.nfe > 2 and (reference.nfe - 2) % 6 == 0
    flow = {"use_flow_sigmas": True, "prediction_type": "flow_prediction"}
    samplers = [
        (FlowMatchGVPScheduler(path=flow_path, solver="heun"), 10, 20),
        (FlowMatchHeunDiscreteScheduler(), 10, 19),
        (DPMSolverMultistepScheduler(**flow), 15, 15),
        (UniPCMultistepScheduler(**flow), 15, 15),
    ]
    for scheduler, steps, calls in samplers:
        pipe.scheduler = scheduler
        output = pipe(num_inference_steps=steps, generator=seeded(), output_type="latent")
        assert output.nfe == calls
        error = (output.images - reference.images).abs().max().item()
        assert error < 0.03, (type(scheduler).__name__, error)


def test_dopri5_paper_protocol_and_num_inference_steps_none():
    pipe = make_pipeline(scheduler=FlowMatchGVPScheduler(solver="dopri5"))
    adaptive = pipe(num_inference_steps=50, generator=seeded(), output_type="latent")
    assert adaptive.nfe > 2 and (adaptive.nfe - 2) % 6 == 0
    # num_inference_steps=None runs dopri5 with any scheduler (here diffusers' Euler, linear path)
    pipe = make_pipeline(scheduler=FlowMatchEulerDiscreteScheduler())
    assert pipe(num_inference_steps=None, generator=seeded(), output_type="latent").nfe > 2
    with pytest.raises(ValueError, match="callback_on_step_end"):
        pipe(num_inference_steps=None, callback_on_step_end=lambda *args: {})


def test_classifier_free_guidance_batches_both_halves(conditional_pipe):
    calls = []
    hook = conditional_pipe.transformer.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append((args[0].shape[0], kwargs["class_labels"].tolist())),
        with_kwargs=True,
    )
    try:
        guided = conditional_pipe(
            class_labels=[1, 3], guidance_scale=3.0, num_inference_steps=2, generator=seeded()
        )
        plain = conditional_pipe(
            class_labels=[1, 3], guidance_scale=1.0, num_inference_steps=2, generator=seeded()
        )
    finally:
        hook.remove()
    assert guided.nfe == plain.nfe == 2
    assert calls == [(4, [1, 3, NUM_CLASSES, NUM_CLASSES])] * 2 + [(2, [1, 3])] * 2
    difference = np.abs(np.asarray(guided.images[0], float) - np.asarray(plain.images[0], float))
    assert difference.max() > 0


# ---- bad input -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"class_labels": [1]}, "unconditional"),
        ({"guidance_scale": 2.0}, "class-conditional"),
        ({"output_type": "jpeg"}, "output_type"),
        ({"num_inference_steps": 0}, "num_inference_steps"),
        ({"batch_size": 0}, "batch_size"),
        ({"batch_size": 2, "generator": [torch.Generator()]}, "generators"),
        ({"latents": torch.zeros(1, 3, 4, 4)}, "latents must have shape"),
        ({"callback_on_step_end_tensor_inputs": ["velocity"]}, "callback_on_step_end_tensor_inputs"),
    ],
)
def test_bad_inputs_unconditional(pipe, kwargs, message):
    with pytest.raises(ValueError, match=message):
        pipe(num_inference_steps=kwargs.pop("num_inference_steps", 1), **kwargs)


@pytest.mark.parametrize(
    ("class_labels", "extra", "message"),
    [
        (None, {}, "class_labels is required"),
        ([NUM_CLASSES], {}, r"\[0, 5\)"),
        ([-1, 2], {}, r"\[0, 5\)"),
        ([0.5], {}, "ints"),
        ([[1, 2]], {}, "ints"),
        ([1, 2], {"batch_size": 3}, "batch_size"),
    ],
)
def test_bad_class_labels(conditional_pipe, class_labels, extra, message):
    with pytest.raises(ValueError, match=message):
        conditional_pipe(class_labels=class_labels, num_inference_steps=1, **extra)


def test_bad_components():
    latent_model = make_pipeline(in_channels=4)
    with pytest.raises(ValueError, match="pass a `vae`"):
        latent_model(num_inference_steps=1)
    assert latent_model(num_inference_steps=1, output_type="latent").images.shape == (1, 4, 8, 8)
    with pytest.raises(ValueError, match="latent_channels"):
        make_pipeline(in_channels=3, vae=tiny_vae())(num_inference_steps=1)
    with pytest.raises(ValueError, match="flow-match scheduler"):
        ArceeZigmaPipeline(tiny_transformer(), DDPMScheduler())
    with pytest.raises(ValueError, match="flow_path"):
        ArceeZigmaPipeline(tiny_transformer(), FlowMatchGVPScheduler(), flow_path="vp")
    mismatch = make_pipeline(scheduler=FlowMatchGVPScheduler(path="linear"), flow_path="gvp")
    with pytest.raises(ValueError, match="path"):
        mismatch(num_inference_steps=1)


def test_model_card_keeps_no_local_path(tmp_path):
    data = tmp_path / "fashion_mnist"
    data.mkdir()
    info = {
        "dataset_name": str(data),
        "vae": str(tmp_path),
        "latent_cache_dir": str(tmp_path / "cache"),
        "fid_reference_dir": str(tmp_path / "reference"),
        "hub_token": "secret",
        "learning_rate": 0.003,
    }
    card = model_card(make_pipeline(), "me/repo", training_info=info)
    text = str(card)
    assert str(tmp_path) not in text and "secret" not in text
    assert "| dataset_name | fashion_mnist |" in text and "| learning_rate | 0.003 |" in text
    assert "datasets" not in card.data.to_dict()  # a local folder is no Hub dataset id
    hub = model_card(
        make_pipeline(), "me/repo", training_info={"dataset_name": "zalando-datasets/fashion_mnist"}
    )
    assert hub.data.to_dict()["datasets"] == ["zalando-datasets/fashion_mnist"]
