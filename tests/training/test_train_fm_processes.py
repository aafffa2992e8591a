"""train_fm.py as real processes: SIGKILL and resume, two ranks under `accelerate launch`, CLI errors."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

from arcee_diffusers.training.checkpointing import list_checkpoints
from conftest import TINY_RUN, TRAIN_SCRIPT

ENV = {**os.environ, "PYTHONUNBUFFERED": "1", "TQDM_DISABLE": "1"}


def train_command(output_dir, *extra):
    return [sys.executable, str(TRAIN_SCRIPT), "--output_dir", str(output_dir), *TINY_RUN, *extra]


def final_weights(output_dir):
    folder = output_dir / "transformer"
    return {
        "ema": load_file(folder / "diffusion_pytorch_model.safetensors"),
        "raw": load_file(folder / "diffusion_pytorch_model.raw.safetensors"),
    }


def assert_identical(a, b):
    for kind in ("ema", "raw"):
        assert a[kind].keys() == b[kind].keys()
        for name in a[kind]:
            assert torch.equal(a[kind][name], b[kind][name]), f"{kind} {name} differs"


@pytest.mark.slow
def test_sigkill_then_resume_matches_uninterrupted_run(image_folder, tmp_path):
    # 12 images, batch 4: 3 batches per epoch, so a checkpoint lands mid-epoch and resuming must skip batches
    common = [
        "--train_data_dir",
        str(image_folder),
        "--random_flip",
        "--class_conditional",
        "--max_train_steps",
        "40",
        "--checkpointing_steps",
        "5",
        "--seed",
        "7",
    ]
    reference = tmp_path / "reference"
    subprocess.run(train_command(reference, *common), check=True, env=ENV, capture_output=True)

    interrupted = tmp_path / "interrupted"
    process = subprocess.Popen(train_command(interrupted, *common), env=ENV, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 120
    while not list_checkpoints(interrupted) and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run finished before it could be killed"
    assert list_checkpoints(interrupted) and not (interrupted / "model_index.json").exists()

    subprocess.run(
        train_command(interrupted, *common, "--resume_from_checkpoint", "latest"),
        check=True,
        env=ENV,
        capture_output=True,
    )
    assert_identical(final_weights(interrupted), final_weights(reference))


WRAPPER = """
import sys
import accelerate
from safetensors.torch import save_file

end_training = accelerate.Accelerator.end_training

def dump_weights_then_end(self):
    model = self.unwrap_model(self._models[0])
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    save_file(state, OUTPUT + f"/rank{self.process_index}.safetensors")
    end_training(self)

accelerate.Accelerator.end_training = dump_weights_then_end
sys.argv = [SCRIPT] + sys.argv[1:]
exec(compile(open(SCRIPT).read(), SCRIPT, "exec"))
"""


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
def test_two_cpu_processes_end_with_identical_weights(image_folder, tmp_path):
    out = tmp_path / "out"
    wrapper = tmp_path / "wrapper.py"
    wrapper.write_text(WRAPPER.replace("OUTPUT", repr(str(out))).replace("SCRIPT", repr(str(TRAIN_SCRIPT))))
    launch = [
        sys.executable,
        "-m",
        "accelerate.commands.launch",
        "--multi_gpu",
        "--num_processes",
        "2",
        "--num_machines",
        "1",
        "--mixed_precision",
        "no",
        "--dynamo_backend",
        "no",
        "--main_process_port",
        str(free_port()),
    ]
    args = [
        "--output_dir",
        str(out),
        *TINY_RUN,
        "--train_data_dir",
        str(image_folder),
        "--max_train_steps",
        "4",
        "--checkpointing_steps",
        "2",
    ]
    result = subprocess.run(
        [*launch, str(wrapper), *args],
        env={**ENV, "ACCELERATE_USE_CPU": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "num_processes=2" in result.stderr or "total batch 8" in result.stderr
    rank0, rank1 = load_file(out / "rank0.safetensors"), load_file(out / "rank1.safetensors")
    for name in rank0:
        assert torch.equal(rank0[name], rank1[name]), name
    # both ranks wrote their RNG state into the same (complete) checkpoint
    assert {p.name for p in (out / "checkpoint-4").glob("random_states_*.pkl")} == {
        "random_states_0.pkl",
        "random_states_1.pkl",
    }
    trained = load_file(out / "transformer" / "diffusion_pytorch_model.raw.safetensors")
    assert all(torch.equal(trained[name], rank0[name]) for name in rank0)


@pytest.mark.slow
def test_cli_error_is_one_line(tmp_path):
    missing = tmp_path / "no_such_folder"
    result = subprocess.run(
        train_command(tmp_path / "out", "--train_data_dir", str(missing)),
        env=ENV,
        capture_output=True,
        text=True,
    )
    assert result.returncode != 0
    assert "Traceback" not in result.stderr
    last = result.stderr.strip().splitlines()[-1]
    assert last.startswith("train_fm.py: error:") and str(missing) in last


@pytest.mark.slow
def test_push_to_hub_uploads_pipeline_with_metrics_card(tmp_path):
    from tests.hub_server import HubServer

    out = tmp_path / "out"
    flags = [
        "--max_train_steps",
        "2",
        "--final_eval",
        "digits",
        "--num_eval_samples",
        "20",
        "--push_to_hub",
        "--hub_model_id",
        "org/tiny-digits",
    ]
    with HubServer() as server:
        env = {**ENV, **server.client_env(tmp_path / "hf_home")}
        result = subprocess.run(
            train_command(out, *flags), env=env, capture_output=True, text=True, timeout=600
        )
        assert result.returncode == 0, result.stderr[-3000:]
        files = server.files("org/tiny-digits")
    assert {"model_index.json", "README.md", "transformer/diffusion_pytorch_model.safetensors"} <= set(files)
    card = files["README.md"].decode()
    metrics = json.loads((out / "metrics.json").read_text())
    assert "guidance_1/accuracy" in card and "guidance_3/frechet_ratio" in card
    assert metrics["guidance_1/num_samples"] == 20
