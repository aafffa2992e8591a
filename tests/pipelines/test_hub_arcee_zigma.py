"""Push to and load from a Hub: the real huggingface_hub/diffusers client against a loopback server.

The server (tests/hub_server.py) speaks the Hub's HTTP API for repo creation, validate-yaml, preupload
("regular" uploads), NDJSON commits, model info, tree listings and file resolution. It does NOT model
authentication, LFS/Xet storage, branches other than main, tags or pull requests, so those code paths of the
client are not exercised here. The client runs in a subprocess because huggingface_hub reads HF_ENDPOINT
when it is first imported (pytest-xdist workers have imported it long before).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from arcee_diffusers.pipelines.folder_layout import REEXPORTS, to_native_layout, write_reexport_layout
from tests.hub_server import HubServer

CLIENT = Path(__file__).with_name("hub_roundtrip_client.py")
CONDITIONAL_REPO = "arcee-test/tiny-conditional"
LATENT_REPO = "arcee-test/tiny-latent"
SAVED_REPO = "arcee-test/tiny-saved"


@pytest.fixture(scope="module")
def round_trip(tmp_path_factory):
    """Runs the client once; returns (server, report)."""
    workdir = tmp_path_factory.mktemp("hub")
    report_path = workdir / "report.json"
    with HubServer() as server:
        result = subprocess.run(
            [sys.executable, str(CLIENT), str(report_path)],
            env=server.client_env(workdir / "hf_home"),
            cwd=CLIENT.parent,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert result.returncode == 0, result.stderr[-4000:]
        yield server, json.loads(report_path.read_text())


def test_push_then_load_by_repo_id_is_bit_equal(round_trip):
    _, report = round_trip
    loaded = report["by_repo_id"]
    assert loaded["is_our_pipeline_class"] and loaded["weights_bit_equal"]
    assert loaded["max_image_difference"] < 1e-5
    assert loaded["scheduler_class"] == "FlowMatchGVPScheduler"
    assert loaded["scheduler_config"]["solver"] == "heun" and loaded["flow_path"] == "gvp"
    assert report["commit_url"].endswith(tuple("0123456789abcdef"))


def test_diffusion_pipeline_with_trust_remote_code_returns_our_classes(round_trip):
    _, report = round_trip
    auto = report["diffusion_pipeline"]
    assert auto["is_our_pipeline_class"]
    assert auto["transformer_class"] == "arcee_diffusers.models.arcee_zigma_transformer.ArceeZigmaTransformer"
    assert auto["weights_bit_equal"] and auto["max_image_difference"] < 1e-5
    assert "trust_remote_code" in report["untrusted_error"]


def test_hub_repo_layout_survives_a_re_push(round_trip):
    server, _ = round_trip
    commits = server.repos[CONDITIONAL_REPO].commits
    assert [commit.message for commit in commits] == ["Upload ArceeZigmaPipeline", "Re-push"]
    for commit in commits:
        files = commit.files
        index = json.loads(files["model_index.json"])
        assert index["_class_name"] == ["pipeline_arcee_zigma", "ArceeZigmaPipeline"]
        assert index["transformer"] == ["modeling_arcee_zigma", "ArceeZigmaTransformer"]
        assert index["scheduler"] == ["scheduling_gvp_flow", "FlowMatchGVPScheduler"]
        assert index["flow_path"] == "gvp"
        for path in ("pipeline_arcee_zigma.py", "transformer/modeling_arcee_zigma.py"):
            assert b"from arcee_diffusers import" in files[path]
        assert "transformer/diffusion_pytorch_model.safetensors" in files
        assert not any(path.endswith((".bin", ".pt", ".pth")) for path in files)


def test_model_card_metadata_and_content(round_trip):
    _, report = round_trip
    data = report["card_data"]
    assert data["library_name"] == "diffusers"
    assert data["pipeline_tag"] == "unconditional-image-generation"
    assert data["license"] == "apache-2.0"
    assert data["datasets"] == ["arcee-test/digits"]
    assert {"arcee-diffusers", "flow-matching", "class-conditional", "gvp-path"} <= set(data["tags"])
    text = report["card_text"]
    assert f'ArceeZigmaPipeline.from_pretrained("{CONDITIONAL_REPO}")' in text
    assert f'DiffusionPipeline.from_pretrained("{CONDITIONAL_REPO}", trust_remote_code=True)' in text
    assert "class_labels=[0, 1, 2, 3], guidance_scale=4.0" in text
    assert "arxiv.org/abs/2511.11243" in text
    assert "| learning_rate | 0.0003 |" in text and "| dataset_name | arcee-test/digits |" in text
    assert "hf_secret_that_must_not_leak" not in text and "hub_token" not in text
    assert "/tmp/run" not in text and "output_dir" not in text  # local paths stay on the training machine
    assert "| FID | 15.33 | 1000 | dopri5 (atol 1e-06, rtol 0.001) | 74 |" in text
    assert "| guidance_1/accuracy | 0.9312 |" in text


def test_model_index_block(round_trip):
    _, report = round_trip
    (model,) = report["card_data"]["model-index"]
    (result,) = model["results"]
    assert result["task"] == {"type": "unconditional-image-generation"}
    assert result["dataset"] == {"name": "arcee-test/digits", "type": "arcee-test/digits"}
    fid, kid = result["metrics"]  # accuracy and other non-FID/KID entries stay out of the model-index
    assert (fid["type"], fid["value"], kid["type"], kid["name"], kid["value"]) == (
        "fid",
        15.33,
        "kid",
        "KID×10³",
        10.59,
    )
    assert fid["args"] == {
        "num_samples": 1000,
        "solver": "dopri5 (atol 1e-06, rtol 0.001)",
        "model_calls": 74,
        "implementation": "clean-fid (mode=clean), features: inception_v3",
    }


def test_latent_pipeline_with_vae_and_ema_variant(round_trip):
    server, report = round_trip
    loaded = report["latent_ema"]
    assert loaded["has_vae"] and loaded["weights_bit_equal"] and loaded["max_image_difference"] < 1e-5
    files = server.files(LATENT_REPO)
    assert "transformer/diffusion_pytorch_model.ema.safetensors" in files
    assert "vae/diffusion_pytorch_model.ema.safetensors" in files
    assert "scheduler/scheduling_gvp_flow.py" in files
    card = report["latent_card_data"]
    assert card["license"] == "cc-by-nc-4.0" and "unconditional" in card["tags"]
    assert "model-index" not in card and "eval_results" not in card


def test_save_pretrained_with_push_to_hub_uploads_the_folder(round_trip):
    server, report = round_trip
    saved = report["saved_and_pushed"]
    assert saved["is_our_pipeline_class"] and saved["weights_bit_equal"] and saved["has_vae"]
    (commit,) = server.repos[SAVED_REPO].commits
    assert commit.message == "Saved" and b"library_name: diffusers" in commit.files["README.md"]
    assert json.loads(commit.files["model_index.json"])["_class_name"] == [
        "pipeline_arcee_zigma",
        "ArceeZigmaPipeline",
    ]


def test_layout_helpers_are_inverse(tmp_path):
    index = {
        "_class_name": "ArceeZigmaPipeline",
        "_diffusers_version": "0.42.1",
        "flow_path": "linear",
        "transformer": ["arcee_diffusers.models.arcee_zigma_transformer", "ArceeZigmaTransformer"],
        "scheduler": ["diffusers", "FlowMatchEulerDiscreteScheduler"],
        "vae": [None, None],
    }
    (tmp_path / "model_index.json").write_text(json.dumps(index))
    write_reexport_layout(tmp_path)
    hub_index = json.loads((tmp_path / "model_index.json").read_text())
    assert hub_index["_class_name"] == list(REEXPORTS["_class_name"])
    assert hub_index["scheduler"] == ["diffusers", "FlowMatchEulerDiscreteScheduler"]  # not ours: unchanged
    assert not (tmp_path / "scheduler").exists()
    assert to_native_layout(hub_index) == index
