"""One flow-matching training run under 🤗 Accelerate: what ``train_scripts/train_fm.py`` does, as functions.

    args = parse_args(argv)                               # ``cli``
    accelerator = make_accelerator(args)
    data = build_train_dataset(args, accelerator)         # pixels or cached VAE latents
    model = build_model(args, data.channels, data.sample_size, data.num_classes)
    model, ema = train(args, accelerator, data, model)    # checkpoints, resume, sample grids, evals
    if accelerator.is_main_process:
        save_final_pipeline(args, accelerator, model, ema, data.vae)
        finish(args, accelerator, start_time)             # reload, samples.png, metrics.json, push

The Table 2 grid (``arcee_diffusers.experiments``) runs the same steps for each of its cells. ``train`` reads
like the loop it is: ``prepare_run``, ``resume``, then ``train_micro_batch`` on every batch and, after each
optimiser update, the EMA, the logs, a checkpoint when due and ``sample_and_evaluate``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers import AutoencoderKL
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from torch import Tensor
from tqdm.auto import tqdm

from ..evaluation import digits, fid, sampling
from ..models import ArceeZigmaTransformer, preset_config
from ..pipelines.pipeline_arcee_zigma import ArceeZigmaPipeline
from ..schedulers.flow_paths import FlowPath, get_flow_path
from ..schedulers.scheduling_gvp_flow import FlowMatchGVPScheduler
from . import checkpointing, data, flow_matching, latents
from .ema import create_ema

logger = get_logger(__name__)


@dataclass
class TrainData:
    """The dataset to train on and what the model needs to know about it."""

    dataset: torch.utils.data.Dataset
    channels: int
    sample_size: int
    num_classes: int | None
    vae: torch.nn.Module | None = None


@dataclass
class TrainStep:
    """What ``train``'s ``on_step`` callback sees after each optimiser update (the tensors are the last
    micro-batch's with gradient accumulation)."""

    step: int
    logs: dict[str, float]
    x1: Tensor
    noise: Tensor
    t: Tensor


def make_accelerator(args: argparse.Namespace) -> Accelerator:
    """The run's ``Accelerator`` (seedable sampler on ``args.seed``), its output folder, the global seed."""
    output_dir = Path(args.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=args.gradient_accumulation_steps,
        mixed_precision=args.mixed_precision,
        log_with=None if args.report_to == "none" else args.report_to,
        project_config=ProjectConfiguration(
            project_dir=str(output_dir), logging_dir=str(output_dir / args.logging_dir)
        ),
        dataloader_config=DataLoaderConfiguration(use_seedable_sampler=True, data_seed=args.seed),
    )
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(args.seed, device_specific=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    return accelerator


def build_model(
    args: argparse.Namespace, in_channels: int, sample_size: int, num_classes: int | None
) -> ArceeZigmaTransformer:
    """The transformer of ``--preset`` (or ``--model_config``, or ``--init_from`` with its weights) with the
    flags' overrides, sized to the data."""
    overrides = {
        key: getattr(args, key)
        for key in (
            "num_layers",
            "hidden_size",
            "patch_size",
            "d_state",
            "scan_pattern",
            "num_scan_orders",
            "state_chain",
        )
        if getattr(args, key) is not None
    }
    labels = {
        "num_classes": num_classes,
        "class_dropout_prob": args.class_dropout_prob if num_classes else 0.0,
    }
    shape = {"sample_size": sample_size, "in_channels": in_channels, "out_channels": in_channels}
    saved_model = args.init_from or args.model_config
    if saved_model is not None:
        folder = transformer_folder(saved_model, "init_from" if args.init_from else "model_config")
        saved = ArceeZigmaTransformer.load_config(folder)
        if not num_classes and not saved.get("num_classes"):  # keep the saved kind of unconditional model
            labels["num_classes"] = saved.get("num_classes")
        config = {**saved, **overrides, **shape, **labels}
    else:
        config = preset_config(args.preset, **overrides, **shape, **labels)
    if sample_size % config["patch_size"] != 0:
        raise ValueError(
            f"resolution: the model input is {sample_size}x{sample_size}, "
            f"not divisible by patch_size {config['patch_size']}"
        )
    model = ArceeZigmaTransformer.from_config(config)
    if args.init_from is not None:
        load_initial_weights(model, folder, args.init_from)
    return model


def transformer_folder(path: str, flag: str) -> Path:
    """The folder of a transformer ``config.json``: ``path`` itself or a pipeline folder's transformer/."""
    folder = Path(path)
    if (folder / "transformer" / "config.json").is_file():  # a pipeline folder or Hub template
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{flag} {path!r} holds no config.json (nor transformer/config.json)")
    return folder


def load_initial_weights(model: ArceeZigmaTransformer, folder: Path, init_from: str) -> None:
    """Load the saved transformer's weights into ``model``, whose config may differ from the saved one only
    in ways that keep every parameter's name and shape (the state chain, the scan backend, ...)."""
    saved = ArceeZigmaTransformer.from_pretrained(folder, torch_dtype=torch.float32).state_dict()
    expected = model.state_dict()
    problems = [
        f"{label}: {', '.join(sorted(keys)[:5])}"
        for label, keys in (
            ("missing", expected.keys() - saved.keys()),
            ("unexpected", saved.keys() - expected.keys()),
            ("shape", {k for k in expected.keys() & saved.keys() if expected[k].shape != saved[k].shape}),
        )
        if keys
    ]
    if problems:
        raise ValueError(
            f"init_from {init_from!r}: the flags and the data change the saved model's parameters "
            f"({'; '.join(problems)}); only changes that keep them (e.g. --state_chain) can start from it"
        )
    model.load_state_dict(saved)


def build_train_dataset(args: argparse.Namespace, accelerator: Accelerator) -> TrainData:
    """The torch dataset to train on, the model input's channels and size, and the number of classes."""
    dataset = data.load_train_dataset(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir
    )
    label_column = args.label_column if args.class_conditional else None
    data.check_columns(dataset, args.image_column, label_column)
    num_classes = data.num_classes_of(dataset, label_column) if label_column else None
    mode = data.image_mode_of(dataset, args.image_column)
    if args.vae is None:
        transform = data.image_transform(args.resolution, args.center_crop, args.pad_to_resolution)
        dataset = data.with_image_transform(dataset, transform, args.image_column, label_column, mode)
        if args.center_crop or args.pad_to_resolution:  # a random crop must be drawn anew at every step
            dataset = data.in_memory(dataset, len(mode), args.resolution)
        return TrainData(dataset, len(mode), args.resolution, num_classes)

    vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False)
    # encoded once, so a random crop would be frozen: latents always use a center crop; flips are handled
    # by caching both views
    transform = data.image_transform(args.resolution, center_crop=True, pad=args.pad_to_resolution)
    images = data.with_image_transform(dataset, transform, args.image_column, label_column, "RGB")
    key = latents.latent_cache_key(
        dataset._fingerprint,
        vae.config,
        resolution=args.resolution,
        random_flip=args.random_flip,
        labels=label_column,
    )
    cache_dir = Path(args.latent_cache_dir or Path(args.output_dir) / "latent_cache")
    with accelerator.main_process_first():
        cache = latents.load_or_encode(
            cache_dir / f"{key}.safetensors",
            lambda: latents.encode_dataset(
                vae.to(accelerator.device), images, args.vae_batch_size, args.random_flip, accelerator.device
            ),
        )
    _, channels, size, _ = cache["mean"][:, 0].shape
    return TrainData(latents.CachedLatentDataset(cache), channels, size, num_classes, vae.cpu())


@dataclass
class MicroBatch:
    """What one micro-batch drew and gave: its loss, the clipped gradient norm (on a syncing micro-batch),
    the clean sample, the noise and the times."""

    loss: Tensor
    grad_norm: Tensor | float | None
    x1: Tensor
    noise: Tensor
    t: Tensor


@dataclass
class TrainRun:
    """What ``prepare_run`` sets up for ``train``'s loop: the prepared model, EMA, optimiser, schedule and
    loader, and the epochs they span."""

    model: torch.nn.Module
    ema: EMAModel | None
    optimizer: torch.optim.Optimizer
    lr_scheduler: torch.optim.lr_scheduler.LRScheduler
    dataloader: torch.utils.data.DataLoader
    updates_per_epoch: int
    num_epochs: int


def train(
    args: argparse.Namespace,
    accelerator: Accelerator,
    train_data: TrainData,
    model: ArceeZigmaTransformer,
    on_step: Callable[[TrainStep], None] | None = None,
) -> tuple[torch.nn.Module, EMAModel | None]:
    """Train ``model`` for ``args.max_train_steps`` updates (resuming from ``--resume_from_checkpoint``),
    with checkpoints, sample grids and evaluations on the way; returns the prepared model and its EMA."""
    run = prepare_run(args, accelerator, train_data, model)
    global_step = resume(args, accelerator)
    first_epoch = global_step // run.updates_per_epoch
    path = get_flow_path(args.path)
    # absent from the cell_args.json of a Table 2 grid process started before the option existed
    keep_steps = getattr(args, "checkpoint_at_steps", [])
    progress = tqdm(
        range(args.max_train_steps),
        initial=global_step,
        desc="steps",
        leave=False,
        disable=not accelerator.is_local_main_process,
    )
    for epoch in range(first_epoch, run.num_epochs):
        run.model.train()
        # a resumed run skips the batches its first epoch has already trained on
        done = global_step % run.updates_per_epoch if epoch == first_epoch else 0
        for batch in epoch_batches(
            accelerator, run.dataloader, epoch, done * args.gradient_accumulation_steps
        ):
            # checked before the step, so that resuming from the last checkpoint trains nothing more
            if global_step >= args.max_train_steps:
                break
            micro = train_micro_batch(args, accelerator, run, batch, path, train_data.vae)
            if not accelerator.sync_gradients:
                continue

            # an optimiser update is done: EMA, logs, checkpoint, samples and evaluation
            if run.ema is not None:
                run.ema.step(run.model.parameters())
            global_step += 1
            logs = {
                "loss": micro.loss.item(),
                "grad_norm": float(micro.grad_norm),
                "lr": run.lr_scheduler.get_last_lr()[0],
            }
            progress.update(1)
            progress.set_postfix(loss=f"{logs['loss']:.4f}")
            accelerator.log(logs, step=global_step)
            if on_step is not None:
                on_step(TrainStep(global_step, logs, micro.x1, micro.noise, micro.t))
            if global_step % args.checkpointing_steps == 0 or global_step in keep_steps:
                checkpointing.save_checkpoint(
                    accelerator, args.output_dir, global_step, args.checkpoints_total_limit, keep_steps
                )
            sample_and_evaluate(args, accelerator, run, train_data.vae, global_step)
    progress.close()
    accelerator.wait_for_everyone()
    return run.model, run.ema


def prepare_run(
    args: argparse.Namespace, accelerator: Accelerator, train_data: TrainData, model: ArceeZigmaTransformer
) -> TrainRun:
    """The EMA, optimiser, loader and learning-rate schedule, prepared by ``accelerator``; starts the
    trackers."""
    if args.gradient_checkpointing:
        model.enable_gradient_checkpointing()
    ema = None
    if args.use_ema:
        ema = create_ema(
            model.parameters(),
            args.ema_decay,
            args.ema_schedule,
            model_cls=ArceeZigmaTransformer,
            model_config=model.config,
        )
        ema.to(accelerator.device)
    checkpointing.register_model_hooks(accelerator, ArceeZigmaTransformer, ema)

    optimizer = torch.optim.AdamW(
        model.parameters(),
        lr=args.learning_rate,
        betas=(args.adam_beta1, args.adam_beta2),
        weight_decay=args.adam_weight_decay,
        eps=args.adam_epsilon,
        foreach=True,  # torch's default on CUDA; on CPU it saves ~2 ms of per-tensor ops a digits step
    )
    # the loader's own generator keeps iterator creation from drawing on the global RNG, whose checkpointed
    # state must be the only source of the noise, times, flips and label dropout for resuming to be exact
    dataloader = torch.utils.data.DataLoader(
        train_data.dataset,
        generator=torch.Generator().manual_seed(args.seed),
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=data.collate,
        num_workers=args.dataloader_num_workers,
        drop_last=args.dataloader_drop_last,
    )
    if len(dataloader) == 0:
        raise ValueError(
            f"train_batch_size: the dataset has {len(train_data.dataset)} examples, fewer than one batch of "
            f"{args.train_batch_size} with --dataloader_drop_last"
        )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, dataloader, lr_scheduler
    )

    updates_per_epoch = math.ceil(len(dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    if accelerator.is_main_process:
        # tensorboard's hparams take numbers, strings and booleans only: lists (e.g. --checkpoint_at_steps)
        # go as text
        config = {
            k: v if isinstance(v, int | float | str | bool) else str(v)
            for k, v in vars(args).items()
            if v is not None
        }
        accelerator.init_trackers("train_fm", config=config)
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{len(train_data.dataset)} examples, {num_epochs} epochs, total batch {total_batch}, "
        f"{args.max_train_steps} steps, {sum(p.numel() for p in model.parameters()):,} parameters"
    )
    return TrainRun(model, ema, optimizer, lr_scheduler, dataloader, updates_per_epoch, num_epochs)


def resume(args: argparse.Namespace, accelerator: Accelerator) -> int:
    """Seed the training draws, then load ``--resume_from_checkpoint`` if there is one; returns the number
    of updates already done."""
    # Common random numbers: whatever the model's initialisation drew, training draws its noise, times and
    # flips from the seed alone, so two models trained with one seed see the very same draws.
    set_seed(args.seed, device_specific=True)
    resume_path = checkpointing.resolve_checkpoint(Path(args.output_dir), args.resume_from_checkpoint)
    if resume_path is not None:
        logger.info(f"Resuming from {resume_path}")
        return checkpointing.load_checkpoint(accelerator, resume_path)
    if args.resume_from_checkpoint is not None:
        logger.info("No checkpoint found: starting a new run")
    return 0


def epoch_batches(
    accelerator: Accelerator, dataloader: torch.utils.data.DataLoader, epoch: int, skip: int
) -> Iterable[dict]:
    """The batches of ``epoch`` after the first ``skip`` (those a resumed run has already trained on)."""
    # the seedable sampler shuffles as a function of (seed, epoch): skipping batches restores the position
    dataloader.set_epoch(epoch)
    if not skip:
        return dataloader
    loader = accelerator.skip_first_batches(dataloader, skip)
    loader.set_epoch(epoch)
    return loader


def train_micro_batch(
    args: argparse.Namespace,
    accelerator: Accelerator,
    run: TrainRun,
    batch: dict,
    path: FlowPath,
    vae: AutoencoderKL | None,
) -> MicroBatch:
    """One forward and backward on ``batch``; the optimiser steps when the accumulated gradients sync."""
    x1 = model_input(batch, args.random_flip, vae)
    grad_norm = None
    with accelerator.accumulate(run.model):
        t = flow_matching.sample_flow_times(
            x1.shape[0], args.weighting_scheme, args.logit_mean, args.logit_std, args.mode_scale, x1.device
        )
        noise = torch.randn_like(x1)
        loss = flow_matching.flow_matching_loss(
            run.model, x1, t, path, batch.get("class_labels"), noise=noise
        )
        accelerator.backward(loss)
        if accelerator.sync_gradients:
            grad_norm = accelerator.clip_grad_norm_(run.model.parameters(), args.max_grad_norm)
        run.optimizer.step()
        run.lr_scheduler.step()
        run.optimizer.zero_grad(set_to_none=True)
    return MicroBatch(loss.detach(), grad_norm, x1, noise, t)


def sample_and_evaluate(
    args: argparse.Namespace,
    accelerator: Accelerator,
    run: TrainRun,
    vae: AutoencoderKL | None,
    global_step: int,
) -> None:
    """Every ``--validation_steps`` a sample grid, every ``--eval_steps`` the evaluation, both with the EMA
    weights, on the main process."""
    validate = args.validation_steps and global_step % args.validation_steps == 0
    evaluate = args.eval_steps and global_step % args.eval_steps == 0
    if not (validate or evaluate) or not accelerator.is_main_process:
        return
    output_dir = Path(args.output_dir)
    run.model.eval()
    with ema_weights(run.model, run.ema, accelerator):
        pipeline = build_pipeline(args, accelerator, run.model, vae)
        pipeline.set_progress_bar_config(disable=True)
        if validate:
            grid_path = output_dir / "samples" / f"step-{global_step}.png"
            log_sample_grid(args, pipeline, accelerator, global_step, grid_path)
        if evaluate:
            metrics = run_evaluation(args, pipeline, output_dir / f"eval-{global_step}")
            accelerator.log(
                {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=global_step
            )
    run.model.train()


def model_input(batch: dict, random_flip: bool, vae: AutoencoderKL | None) -> Tensor:
    """The clean sample ``x1``: a latent drawn from the cached posteriors, or the (maybe flipped) pixels."""
    if "latent_mean" in batch:
        return latents.sample_latents(
            batch["latent_mean"], batch["latent_std"], vae.config.scaling_factor, vae.config.shift_factor
        )
    pixels = batch["pixel_values"]
    return data.random_hflip(pixels) if random_flip else pixels


@contextlib.contextmanager
def ema_weights(model: torch.nn.Module, ema: EMAModel | None, accelerator: Accelerator):
    """Temporarily swap the EMA weights into ``model`` (no-op without EMA)."""
    params = list(accelerator.unwrap_model(model).parameters())
    if ema is None:
        yield
        return
    ema.store(params)
    ema.copy_to(params)
    try:
        yield
    finally:
        ema.restore(params)


def build_pipeline(
    args: argparse.Namespace, accelerator: Accelerator, model: torch.nn.Module, vae: AutoencoderKL | None
) -> ArceeZigmaPipeline:
    """The pipeline of the (unwrapped) model being trained, with a scheduler on the training path."""
    scheduler = FlowMatchGVPScheduler(path=args.path)
    transformer = accelerator.unwrap_model(model)
    return ArceeZigmaPipeline(transformer=transformer, scheduler=scheduler, vae=vae).to(accelerator.device)


def log_sample_grid(
    args: argparse.Namespace, pipeline: ArceeZigmaPipeline, accelerator: Accelerator, step: int, path: Path
) -> None:
    """A grid of 8 samples per class (or 64 unconditional samples), saved as PNG and sent to the trackers."""
    num_classes = pipeline.transformer.config.num_classes
    count = 8 * num_classes if num_classes else 64
    images, _, _ = sampling.sample_images(
        pipeline,
        range(count),
        args.seed,
        args.guidance_scale if num_classes else 1.0,
        args.num_inference_steps,
        args.eval_batch_size,
    )
    path.parent.mkdir(parents=True, exist_ok=True)
    # column j holds class j: index i has label i % num_classes
    sampling.save_image_grid(images, path, num_columns=num_classes or 8, scale=max(1, 64 // images.shape[1]))
    for tracker in accelerator.trackers:
        if tracker.name == "tensorboard":
            tracker.log_images({"samples": images}, step, dataformats="NHWC")
        elif tracker.name == "wandb":
            import wandb

            tracker.log({"samples": [wandb.Image(image) for image in images]}, step=step)


def run_evaluation(args: argparse.Namespace, pipeline: ArceeZigmaPipeline, sample_dir: Path) -> dict:
    """``--final_eval``: the digit metrics, or clean-fid FID/KID of ``--fid_num_samples`` samples (drawn with
    ``--num_inference_steps`` Euler steps, or dopri5 when it is 0), with the Fréchet ratio to real images
    when ``--fid_real_dir`` is given."""
    if args.final_eval == "digits":
        return digits.evaluate_digits_pipeline(
            pipeline,
            args.guidance_scale,
            num_samples=args.num_eval_samples,
            seed=args.seed,
            num_inference_steps=args.num_inference_steps,
            batch_size=args.eval_batch_size,
        )
    if args.final_eval == "fid":
        samples = sampling.generate_samples(
            pipeline,
            sample_dir,
            args.fid_num_samples,
            args.seed,
            args.guidance_scale,
            num_inference_steps=args.num_inference_steps or None,
            batch_size=args.eval_batch_size,
        )
        extractor, extractor_name = None, "inception_v3"
        if args.fid_feature_extractor:
            extractor = fid.load_feature_extractor(args.fid_feature_extractor)
            extractor_name = args.fid_feature_extractor
        metrics = fid.compute_fid_kid(
            samples,
            args.fid_reference_dir,
            extractor,
            extractor_name,
            device=pipeline.device,
            real_folder=args.fid_real_dir,
        )
        if hasattr(extractor, "test_accuracy"):  # a classifier's features: how well it knows the data
            metrics["feature_extractor_test_accuracy"] = extractor.test_accuracy
        metrics.update(
            solver=sampling.describe_solver(pipeline, args.num_inference_steps or None),
            nfe=sampling.mean_model_calls(sample_dir, args.fid_num_samples),
        )
        return metrics
    return {}


def save_final_pipeline(
    args: argparse.Namespace,
    accelerator: Accelerator,
    model: torch.nn.Module,
    ema: EMAModel | None,
    vae: AutoencoderKL | None,
) -> None:
    """EMA weights as the pipeline's transformer; the raw weights as the ``raw`` variant next to them."""
    output_dir = Path(args.output_dir)
    transformer = accelerator.unwrap_model(model)
    with ema_weights(model, ema, accelerator):
        build_pipeline(args, accelerator, model, vae).save_pretrained(output_dir)
    if ema is not None:
        transformer.save_pretrained(output_dir / "transformer", variant="raw")


def finish(args: argparse.Namespace, accelerator: Accelerator, start_time: float) -> dict:
    """Reload the saved folder the way a user would, then write samples.png, metrics.json and push; returns
    the metrics (``seconds_since_start`` counts from ``start_time``, a ``time.perf_counter()`` value)."""
    output_dir = Path(args.output_dir)
    pipeline = ArceeZigmaPipeline.from_pretrained(output_dir).to(accelerator.device)
    pipeline.set_progress_bar_config(disable=True)
    log_sample_grid(args, pipeline, accelerator, args.max_train_steps, output_dir / "samples.png")
    metrics = run_evaluation(args, pipeline, output_dir / "fid_samples")
    if metrics:
        metrics.update(
            guidance_scale=args.guidance_scale,
            num_inference_steps=args.num_inference_steps,
            train_steps=args.max_train_steps,
            seconds_since_start=round(time.perf_counter() - start_time, 1),
        )
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        logger.info(f"metrics: {json.dumps(metrics)}")
        accelerator.log(
            {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=args.max_train_steps
        )
    if args.push_to_hub:
        pipeline.push_to_hub(args.hub_model_id, eval_results=metrics, training_info=vars(args))
    return metrics
