"""Client side of the Hub round trip, run in a subprocess whose HF_ENDPOINT is the loopback server.

python hub_roundtrip_client.py OUT_JSON: pushes two tiny pipelines, loads them back by repo id in every
supported way, and writes what it observed to OUT_JSON for the test to check.
"""

from __future__ import annotations

import json
import sys
import tempfile

import numpy as np
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard
from tiny_pipelines import make_pipeline, seeded, tiny_vae

from arcee_diffusers import ArceeZigmaPipeline, FlowMatchGVPScheduler

CONDITIONAL_REPO = "arcee-test/tiny-conditional"
LATENT_REPO = "arcee-test/tiny-latent"
SAVED_REPO = "arcee-test/tiny-saved"
TRAINING_INFO = {
    "dataset_name": "arcee-test/digits",
    "path": "gvp",
    "learning_rate": 3e-4,
    "max_train_steps": 50,
    "train_batch_size": 16,
    "use_ema": True,
    "hub_token": "hf_secret_that_must_not_leak",
    "output_dir": "/tmp/run",
}
EVAL_RESULTS = {
    "fid": 15.33,
    "kid_x1e3": 10.59,
    "num_generated": 1000,
    "feature_extractor": "inception_v3",
    "solver": "dopri5 (atol 1e-06, rtol 0.001)",
    "nfe": 74,
    "guidance_1/accuracy": 0.9312,
}


def images(pipe, **kwargs) -> np.ndarray:
    return pipe(num_inference_steps=3, generator=seeded(), output_type="np", **kwargs).images


def compare(reference, reference_images, loaded, **kwargs) -> dict:
    loaded.set_progress_bar_config(disable=True)
    expected = reference.transformer.state_dict()
    actual = loaded.transformer.state_dict()
    return {
        "pipeline_class": f"{type(loaded).__module__}.{type(loaded).__name__}",
        "is_our_pipeline_class": type(loaded) is ArceeZigmaPipeline,
        "transformer_class": f"{type(loaded.transformer).__module__}.{type(loaded.transformer).__name__}",
        "scheduler_class": type(loaded.scheduler).__name__,
        "scheduler_config": {k: v for k, v in loaded.scheduler.config.items() if not k.startswith("_")},
        "flow_path": loaded.config.flow_path,
        "weights_bit_equal": expected.keys() == actual.keys()
        and all(torch.equal(expected[k], actual[k]) for k in expected),
        "max_image_difference": float(np.abs(images(loaded, **kwargs) - reference_images).max()),
        "has_vae": loaded.vae is not None,
    }


def main(out_path: str) -> None:
    report = {}

    conditional = make_pipeline(num_classes=5, scheduler=FlowMatchGVPScheduler(solver="heun"))
    conditional_images = images(conditional, class_labels=[1, 3], guidance_scale=2.0)
    commit = conditional.push_to_hub(CONDITIONAL_REPO, training_info=TRAINING_INFO, eval_results=EVAL_RESULTS)
    report["commit_url"] = str(commit.commit_url)
    cfg = {"class_labels": [1, 3], "guidance_scale": 2.0}
    report["by_repo_id"] = compare(
        conditional, conditional_images, ArceeZigmaPipeline.from_pretrained(CONDITIONAL_REPO), **cfg
    )
    auto = DiffusionPipeline.from_pretrained(CONDITIONAL_REPO, trust_remote_code=True)
    report["diffusion_pipeline"] = compare(conditional, conditional_images, auto, **cfg)
    try:
        DiffusionPipeline.from_pretrained(CONDITIONAL_REPO)
        report["untrusted_error"] = None
    except ValueError as err:
        report["untrusted_error"] = str(err)
    card = ModelCard.load(CONDITIONAL_REPO)
    report["card_data"] = card.data.to_dict()
    report["card_text"] = card.text

    # a reloaded pipeline pushes again with the same layout
    reloaded = ArceeZigmaPipeline.from_pretrained(CONDITIONAL_REPO)
    reloaded.push_to_hub(CONDITIONAL_REPO, commit_message="Re-push")

    latent = make_pipeline(in_channels=4, vae=tiny_vae())
    latent_images = images(latent)
    latent.push_to_hub(LATENT_REPO, variant="ema", license="cc-by-nc-4.0")
    report["latent_ema"] = compare(
        latent, latent_images, ArceeZigmaPipeline.from_pretrained(LATENT_REPO, variant="ema")
    )
    report["latent_card_data"] = ModelCard.load(LATENT_REPO).data.to_dict()

    # diffusers' save_pretrained(..., push_to_hub=True) route
    with tempfile.TemporaryDirectory() as folder:
        latent.save_pretrained(folder, push_to_hub=True, repo_id=SAVED_REPO, commit_message="Saved")
    report["saved_and_pushed"] = compare(
        latent, latent_images, ArceeZigmaPipeline.from_pretrained(SAVED_REPO)
    )

    with open(out_path, "w") as file:
        json.dump(report, file, indent=2, default=str)


if __name__ == "__main__":
    main(sys.argv[1])
