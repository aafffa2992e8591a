"""The model card of an ``ArceeZigmaPipeline``, generated from its config and the run that made it (template:
``model_card_template.md`` beside this file)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard

from ..models.variants import PRESETS, display_name

TEMPLATE_PATH = Path(__file__).with_name("model_card_template.md")
PAPER_URL = "https://arxiv.org/abs/2511.11243"
ARCEE_PAPER = ("Arcee", PAPER_URL)  # the paper a card names (name, link) unless told another
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
LOCAL_ONLY_KEYS = (
    "output_dir", "logging_dir", "cache_dir", "latent_cache_dir", "resume_from_checkpoint", "report_to",
    "model_config", "fid_reference_dir", "fid_real_dir",
)  # fmt: skip
METRICS = {"fid": ("fid", "FID"), "kid_x1e3": ("kid", "KID×10³"), "kid": ("kid", "KID")}
CONTEXT_KEYS = ("num_samples", "num_generated", "nfe", "guidance_scale")


def public_training_info(training_info: dict[str, Any]) -> dict[str, Any]:
    """Training arguments fit for a public card: no secrets (keys with "token"), none of the machine's own
    paths (``LOCAL_ONLY_KEYS``), and a local data or VAE folder named by its last part only."""
    public = {}
    for key, value in training_info.items():
        if "token" in key.lower() or key in LOCAL_ONLY_KEYS:
            continue
        if isinstance(value, str | os.PathLike) and os.path.isdir(value):
            value = Path(value).name
        public[key] = value
    return public


def _format(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _preset_name(config) -> str | None:
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
    pipe: DiffusionPipeline,
    repo_id: str,
    *,
    training_info: dict[str, Any] | None = None,
    eval_results: dict[str, Any] | None = None,
    license: str = "apache-2.0",
    datasets: list[str] | None = None,
    tags: list[str] | None = None,
    variant: str | None = None,
    vae_name: str | None = None,
    source: str | None = None,
    paper: tuple[str, str] = ARCEE_PAPER,
) -> ModelCard:
    """A `huggingface_hub.ModelCard` for `pipe`, generated from its config and the run that made it.

    Args:
        pipe: the [`ArceeZigmaPipeline`].
        repo_id: the Hub repo id the usage snippet loads.
        training_info: training arguments (e.g. `vars(args)` of `train_scripts/train_fm.py`), as
            `public_training_info` keeps them (no secrets, no local paths). A Hub `dataset_name` becomes the
            card's dataset.
        eval_results: a flat metrics dict; see `_eval_results` for the keys. FID/KID go to the `model-index`.
        license: the weights' license identifier; set it to match the training data's terms.
        datasets: Hub dataset ids; default `training_info["dataset_name"]` when it is one.
        tags: extra tags.
        variant: the weights' variant name (e.g. `"ema"`), used in the usage snippet.
        vae_name: the VAE's Hub id; default its `_name_or_path` when that is not a local folder.
        source: where the weights come from (Markdown), for weights converted from other code.
        paper: the (name, link) of the paper the model is from: Arcee's, or ZigMa's for its released weights.

    The `pipeline_tag` is `unconditional-image-generation` for class-conditional models too: the Hub has no
    class-conditional task, and these models take no text or image input (a `class-conditional` tag marks
    them).
    """
    from huggingface_hub import ModelCardData

    config = pipe.transformer.config
    dataset_id = (training_info or {}).get("dataset_name")
    if datasets is None and dataset_id and not os.path.isdir(dataset_id):  # a Hub id, not a local folder
        datasets = [dataset_id]
    training_info = public_training_info(training_info or {})
    dataset_label = training_info.get("dataset_name") or training_info.get("train_data_dir") or "custom"
    variant_name = display_name(config)
    preset = _preset_name(config)
    conditional = bool(config.num_classes)
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
        f"[{paper[0]}]({paper[1]})."
    )
    return ModelCard.from_template(
        card_data,
        template_path=str(TEMPLATE_PATH),
        repo_id=repo_id,
        model_title=model_title,
        summary=summary,
        source=source,
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
