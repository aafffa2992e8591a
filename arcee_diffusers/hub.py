"""Hub repos for ArceeZigmaPipeline: the repo layout, the model card and the push.

diffusers 0.42 resolves a component's class from the Hub only through files inside the repo, so a pushed repo
carries one-line re-export files that import the real classes from ``arcee_diffusers`` and
``model_index.json`` names them ("Hub layout"):

- ``pipeline_arcee_zigma.py`` -> ``ArceeZigmaPipeline`` (``_class_name``)
- ``transformer/modeling_arcee_zigma.py`` -> ``ArceeZigmaTransformer``
- ``scheduler/scheduling_gvp_flow.py`` -> ``FlowMatchGVPScheduler`` (only when the scheduler is ours)

``DiffusionPipeline.from_pretrained(repo_id, trust_remote_code=True)`` then returns our real classes.
``ArceeZigmaPipeline.from_pretrained`` reads both layouts without running any file of the repo
(``to_native_layout``). ``save_pretrained`` writes the native layout; ``push_pipeline_to_hub`` re-applies the
Hub layout to what it uploads.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

REEXPORTS: dict[str, tuple[str, str]] = {
    "_class_name": ("pipeline_arcee_zigma", "ArceeZigmaPipeline"),
    "transformer": ("modeling_arcee_zigma", "ArceeZigmaTransformer"),
    "scheduler": ("scheduling_gvp_flow", "FlowMatchGVPScheduler"),
}
REEXPORT_SOURCE = '''"""Loads {class_name} from the arcee-diffusers package; no other code here runs."""

from arcee_diffusers import {class_name}  # noqa: F401
'''
TEMPLATE_PATH = Path(__file__).parent / "templates" / "model_card.md"
PAPER_URL = "https://arxiv.org/abs/2511.11243"
PIPELINE_TAG = "unconditional-image-generation"
# training arguments shown in the card's recipe table, in this order (others go to the JSON block)
RECIPE_KEYS = (
    "dataset_name",
    "train_data_dir",
    "resolution",
    "random_flip",
    "path",
    "max_train_steps",
    "train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "lr_scheduler",
    "lr_warmup_steps",
    "adam_beta1",
    "adam_beta2",
    "adam_weight_decay",
    "max_grad_norm",
    "use_ema",
    "ema_decay",
    "ema_schedule",
    "mixed_precision",
    "seed",
)
# training arguments that only make sense on the training machine (or are secrets: any key with "token")
LOCAL_ONLY_KEYS = ("output_dir", "logging_dir", "cache_dir", "resume_from_checkpoint", "report_to")
METRICS = {"fid": ("fid", "FID"), "kid_x1e3": ("kid", "KID×10³"), "kid": ("kid", "KID")}
CONTEXT_KEYS = ("num_samples", "num_generated", "nfe", "guidance_scale")


def _entry_class(entry: Any) -> str | None:
    if isinstance(entry, str):
        return entry
    if isinstance(entry, (list, tuple)) and len(entry) == 2:
        return entry[1]
    return None


def write_hub_layout(folder: str | os.PathLike) -> None:
    """Turn a saved pipeline folder into the Hub layout (re-export files, `model_index.json` naming them)."""
    folder = Path(folder)
    index_path = folder / "model_index.json"
    index = json.loads(index_path.read_text())
    for key, (module, class_name) in REEXPORTS.items():
        if _entry_class(index.get(key)) != class_name:
            continue
        target = folder if key == "_class_name" else folder / key
        target.mkdir(parents=True, exist_ok=True)
        (target / f"{module}.py").write_text(REEXPORT_SOURCE.format(class_name=class_name))
        index[key] = [module, class_name]
    index_path.write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")


def to_native_layout(config: dict[str, Any]) -> dict[str, Any]:
    """Map a Hub-layout `model_index.json` dict back to our own modules, in place (and return it).

    Components get the defining module, as `save_pretrained` writes it: diffusers finds a component's base
    class (hence its loading method) among the names of that module.
    """
    import arcee_diffusers

    for key, (module, class_name) in REEXPORTS.items():
        entry = config.get(key)
        if isinstance(entry, (list, tuple)) and list(entry) == [module, class_name]:
            defining_module = getattr(arcee_diffusers, class_name).__module__
            config[key] = class_name if key == "_class_name" else [defining_module, class_name]
    return config


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _variant_name(config) -> str:
    chain = config.state_chain
    if config.scan_pattern == "bidirectional":
        return "ArceeVim" if chain else "Vision Mamba"
    return f"{'Arcee' if chain else 'Zigma'}-{config.num_scan_orders}"


def _preset_name(config) -> str | None:
    from .models import PRESETS

    for name, preset in PRESETS.items():
        same_shape = all(config.get(key) == value for key, value in preset.items() if key != "scan_pattern")
        if same_shape and preset.get("scan_pattern", "zigzag") == config.scan_pattern:
            return name
    return None


def _scheduler_description(scheduler) -> str:
    config = {key: value for key, value in scheduler.config.items() if not key.startswith("_")}
    if type(scheduler).__name__ == "FlowMatchGVPScheduler":
        keys = ["path", "solver"] + (["atol", "rtol"] if config["solver"] == "dopri5" else [])
        config = {key: config[key] for key in keys}
        arguments = ", ".join(f"{key}={value!r}" for key, value in config.items())
        return f"{type(scheduler).__name__}({arguments})"
    return type(scheduler).__name__


def _eval_results(
    results: dict[str, Any] | None, scheduler_description: str, dataset_type: str, dataset_name: str
) -> tuple[list, list[dict[str, str]], list[tuple[str, str]]]:
    """`EvalResult`s for the card's `model-index`, rows for its table and other numeric measurements.

    Metric keys: `fid`, `kid_x1e3` (KID × 10³, as `arcee_diffusers.evaluation.fid` returns it) or `kid`, each
    optionally prefixed (`"guidance_4.0/fid"`). Context keys: `num_generated`/`num_samples`,
    `feature_extractor`/`fid_implementation`, `solver`, `nfe` (true model calls per sample),
    `guidance_scale`, `dataset_name`/`dataset_type`. Any other numeric entry (e.g. the digits evaluation's
    `"guidance_1/accuracy"`) is listed as it is, outside the `model-index`.
    """
    from huggingface_hub import EvalResult

    if not results:
        return [], [], []
    if not isinstance(results, dict):
        raise TypeError(f"eval_results must be a dict of metrics, got {type(results).__name__}")
    dataset_type = results.get("dataset_type", dataset_type)
    dataset_name = results.get("dataset_name", dataset_name)
    samples = results.get("num_samples", results.get("num_generated"))
    implementation = results.get("fid_implementation")
    if implementation is None and results.get("feature_extractor") is not None:
        implementation = f"clean-fid (mode=clean), features: {results['feature_extractor']}"
    solver = results.get("solver", scheduler_description)
    context = {
        "num_samples": samples,
        "solver": solver,
        "model_calls": results.get("nfe"),
        "implementation": implementation,
        "guidance_scale": results.get("guidance_scale"),
    }
    context = {key: value for key, value in context.items() if value is not None}

    eval_results, rows, others = [], [], []
    for key, value in results.items():
        prefix, _, name = key.rpartition("/")
        if isinstance(value, bool) or not isinstance(value, (int, float)) or key in CONTEXT_KEYS:
            continue
        if name not in METRICS:
            others.append((key, _format(value)))
            continue
        metric_type, label = METRICS[name]
        metric_name = f"{label} ({prefix})" if prefix else label
        eval_results.append(
            EvalResult(
                task_type=PIPELINE_TAG,
                dataset_type=dataset_type,
                dataset_name=dataset_name,
                metric_type=metric_type,
                metric_name=metric_name,
                metric_value=round(float(value), 4),
                metric_config=prefix or None,
                metric_args=context or None,
            )
        )
        rows.append(
            {
                "name": metric_name,
                "value": f"{value:.4g}",
                "samples": _format(samples) if samples is not None else "n/a",
                "solver": solver,
                "nfe": _format(results["nfe"]) if results.get("nfe") is not None else "not recorded",
                "implementation": implementation or "n/a",
            }
        )
    return eval_results, rows, others


def model_card(
    pipe,
    repo_id: str,
    *,
    training_info: dict[str, Any] | None = None,
    eval_results: dict[str, Any] | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    variant: str | None = None,
    vae_name: str | None = None,
):
    """A `huggingface_hub.ModelCard` for `pipe`, generated from its config and the run that made it.

    Args:
        pipe: the [`ArceeZigmaPipeline`].
        repo_id: the Hub repo id the usage snippet loads.
        training_info: training arguments (e.g. `vars(args)` of `train_scripts/train_fm.py`); keys containing
            "token" (secrets) and local paths (`output_dir`, ...) are dropped. `dataset_name` becomes the
            card's dataset.
        eval_results: a flat metrics dict; see `_eval_results` for the keys. FID/KID go to the `model-index`.
        license: the weights' license identifier; set it to match the training data's terms.
        datasets: Hub dataset ids; default `training_info["dataset_name"]` when given.
        tags: extra tags.
        variant: the weights' variant name (e.g. `"ema"`), used in the usage snippet.
        vae_name: the VAE's Hub id; default its `_name_or_path` when that is not a local folder.

    The `pipeline_tag` is `unconditional-image-generation` for class-conditional models too: the Hub has no
    class-conditional task, and these models take no text or image input (a `class-conditional` tag marks
    them).
    """
    from huggingface_hub import ModelCard, ModelCardData

    config = pipe.transformer.config
    training_info = {key: value for key, value in (training_info or {}).items() if "token" not in key.lower()}
    dataset_id = training_info.get("dataset_name")
    if datasets is None and dataset_id:
        datasets = [dataset_id]
    dataset_label = dataset_id or (
        Path(training_info["train_data_dir"]).name if training_info.get("train_data_dir") else "custom"
    )
    variant_name = _variant_name(config)
    preset = _preset_name(config)
    conditional = config.num_classes is not None
    flow_path = pipe.config.flow_path
    scheduler_description = _scheduler_description(pipe.scheduler)
    if vae_name is None and pipe.vae is not None:
        name_or_path = str(getattr(pipe.vae.config, "_name_or_path", "") or "")
        vae_name = name_or_path if name_or_path.count("/") == 1 and not os.path.exists(name_or_path) else None

    card_tags = ["arcee-diffusers", "arcee", "mamba", "state-space-model", "flow-matching"]
    card_tags.append(f"{flow_path}-path")
    card_tags.append("vision-mamba" if config.scan_pattern == "bidirectional" else "zigma")
    card_tags.append("class-conditional" if conditional else "unconditional")
    card_tags += [tag for tag in (tags or []) if tag not in card_tags]

    model_title = f"{variant_name} {preset or ''}".strip()
    evals, eval_rows, other_measurements = _eval_results(
        eval_results, scheduler_description, dataset_label, dataset_label
    )
    card_data = ModelCardData(
        library_name="diffusers",
        pipeline_tag=PIPELINE_TAG,
        license=license,
        datasets=datasets,
        tags=card_tags,
        model_name=model_title if evals else None,
        eval_results=evals or None,
    )

    space = "latent" if pipe.vae is not None or config.in_channels not in (1, 3) else "pixel"
    architecture = [
        ("model", f"{variant_name} ({'state chain' if config.state_chain else 'baseline, no state chain'})"),
        ("preset", preset or "custom"),
        ("parameters", f"{sum(p.numel() for p in pipe.transformer.parameters()):,}"),
        ("blocks x width", f"{config.num_layers} x {config.hidden_size}, d_state {config.d_state}"),
        ("scan", f"{config.scan_pattern}, {config.num_scan_orders} order(s)"),
        ("input", f"{config.in_channels} x {config.sample_size} x {config.sample_size} ({space} space)"),
        ("patch size", config.patch_size),
        ("classes", config.num_classes if conditional else "unconditional"),
        ("flow path", f"{flow_path} (t = 0 noise, t = 1 data)"),
    ]
    if pipe.vae is not None:
        scaling = pipe.vae.config.scaling_factor
        architecture.append(("VAE", f"{vae_name or 'AutoencoderKL'}, latents x {scaling}"))

    call_args = "class_labels=[0, 1, 2, 3], guidance_scale=4.0, " if conditional else "batch_size=4, "
    usage_call = f"images = pipe({call_args}generator=torch.manual_seed(0)).images"

    recipe = [(key, _format(training_info[key])) for key in RECIPE_KEYS if training_info.get(key) is not None]
    training_json = json.dumps(training_info, indent=2, sort_keys=True, default=str) if training_info else ""
    scans = (
        "hand their final state to the next block (Arcee's state chain)"
        if config.state_chain
        else "each start from a zero state (the baseline)"
    )
    summary = (
        f"{'A class-conditional' if conditional else 'An unconditional'} flow-matching image generator with "
        "the "
        f"{variant_name} backbone: Mamba blocks whose selective scans {scans}, from the paper "
        f"[Arcee]({PAPER_URL})."
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        repo_id=repo_id,
        model_title=model_title,
        summary=summary,
        architecture=[(name, _format(value)) for name, value in architecture],
        variant=variant,
        usage_call=usage_call,
        call_args=call_args,
        flow_path=flow_path,
        scheduler_description=scheduler_description,
        training_rows=recipe,
        training_json=training_json,
        eval_rows=eval_rows,
        other_measurements=other_measurements,
    )


def push_pipeline_to_hub(
    pipe,
    repo_id: str,
    *,
    training_info: dict[str, Any] | None = None,
    eval_results: dict[str, Any] | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    private: bool | None = None,
    token: str | None = None,
    commit_message: str = "Upload ArceeZigmaPipeline",
    create_pr: bool = False,
    variant: str | None = None,
    safe_serialization: bool = True,
):
    """Save `pipe` in the Hub layout with a generated model card and upload it; returns the `CommitInfo`.

    Creates the repo if needed (`private`, `token` as in `huggingface_hub.create_repo`), saves the pipeline
    (`variant` names the weight files, e.g. `"ema"`), writes the re-export files (`write_hub_layout`) and a
    README.md from [`model_card`] (`training_info`, `eval_results`, `license`, `datasets`, `tags`), then
    uploads the folder in one commit. Weights are always safetensors.
    """
    from huggingface_hub import HfApi

    if not safe_serialization:
        raise ValueError("safe_serialization must be True: arcee-diffusers saves and loads safetensors only")
    if not isinstance(repo_id, str) or repo_id.count("/") > 1 or not repo_id.strip("/"):
        raise ValueError(f"repo_id must be 'namespace/name' or 'name', got {repo_id!r}")
    api = HfApi(token=token)
    if "/" not in repo_id:
        repo_id = f"{api.whoami()['name']}/{repo_id}"
    card = model_card(
        pipe,
        repo_id,
        training_info=training_info,
        eval_results=eval_results,
        license=license,
        datasets=datasets,
        tags=tags,
        variant=variant,
    )
    with tempfile.TemporaryDirectory() as folder:
        # everything is written before the repo is created, so a failure leaves no empty repo behind
        pipe.save_pretrained(folder, variant=variant)
        write_hub_layout(folder)
        card.save(os.path.join(folder, "README.md"))
        api.create_repo(repo_id, private=private, exist_ok=True)
        return api.upload_folder(
            repo_id=repo_id, folder_path=folder, commit_message=commit_message, create_pr=create_pr
        )


# stabilityai/sd-vae-ft-ema, the paper's VAE (the SD-VAE architecture; latents x 0.18215)
SD_VAE_NAME = "stabilityai/sd-vae-ft-ema"
SD_VAE_CONFIG = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}


def write_repo_template(folder: str | os.PathLike, repo_id: str) -> list[Path]:
    """Complete `folder` (which holds `transformer/config.json`) into a Hub repo template, weights aside.

    Writes `model_index.json` and the re-export files (Hub layout), `scheduler/scheduler_config.json` (the
    paper's sampler: GVP path, dopri5, atol 1e-6, rtol 1e-3), `vae/config.json` (sd-vae-ft-ema) for latent
    models, and a README.md model card. `push_pipeline_to_hub` regenerates all of them, with the weights.
    Returns the written paths.
    """
    import torch
    from diffusers import AutoencoderKL

    from .models import ArceeZigmaTransformer
    from .pipelines import ArceeZigmaPipeline
    from .schedulers import FlowMatchGVPScheduler

    folder = Path(folder)
    config = ArceeZigmaTransformer.load_config(folder / "transformer")
    with torch.device("meta"):  # configs and parameter counts only: no weights are allocated
        transformer = ArceeZigmaTransformer.from_config(config)
        vae = AutoencoderKL(**SD_VAE_CONFIG) if config["in_channels"] == 4 else None
    scheduler = FlowMatchGVPScheduler(path="gvp", solver="dopri5", atol=1e-6, rtol=1e-3)
    pipe = ArceeZigmaPipeline(transformer, scheduler, vae=vae)

    pipe.save_config(folder)
    scheduler.save_config(folder / "scheduler")
    written = [folder / "model_index.json", folder / "scheduler" / "scheduler_config.json"]
    if vae is not None:
        vae.save_config(folder / "vae")
        written.append(folder / "vae" / "config.json")
    write_hub_layout(folder)
    written += sorted(folder.glob("*.py")) + sorted(folder.glob("*/*.py"))
    card = model_card(pipe, repo_id, vae_name=SD_VAE_NAME if vae is not None else None, tags=["template"])
    card.save(folder / "README.md")
    written.append(folder / "README.md")
    return written
