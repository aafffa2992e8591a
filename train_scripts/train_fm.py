"""Train an Arcee/ZigMa flow-matching model with 🤗 Accelerate.

    accelerate launch train_scripts/train_fm.py --output_dir outputs/digits  # the embedded digits demo
    accelerate launch train_scripts/train_fm.py --train_data_dir imgs/ --vae vae/ --resolution 256 \\
        --preset B/2 --num_scan_orders 4 --output_dir outputs/celebahq  # the paper's recipe

With neither --dataset_name nor --train_data_dir it trains a small class-conditional model on
scikit-learn's bundled digits and ends by writing samples.png and metrics.json (see docs/training.md).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import math
import sys
import time
from pathlib import Path

import torch
from accelerate import Accelerator
from accelerate.logging import get_logger
from accelerate.utils import DataLoaderConfiguration, ProjectConfiguration, set_seed
from diffusers.optimization import get_scheduler
from diffusers.training_utils import EMAModel
from tqdm.auto import tqdm

from arcee_diffusers.evaluation import digits, fid, sampling
from arcee_diffusers.models import ArceeZigmaTransformer, preset_config
from arcee_diffusers.pipelines.pipeline_arcee_zigma import ArceeZigmaPipeline
from arcee_diffusers.schedulers.flow_paths import get_flow_path
from arcee_diffusers.schedulers.scheduling_gvp_flow import FlowMatchGVPScheduler
from arcee_diffusers.training import checkpointing, data, flow_matching, latents
from arcee_diffusers.training.ema import EMA_SCHEDULES, create_ema

logger = get_logger(__name__)
START_TIME = time.perf_counter()

# The embedded demo: a small class-conditional Arcee-1 on 8×8 digits, sized to train on two CPU cores in a
# few minutes. Flags given on the command line win over these; the paper recipe fills everything else.
DIGITS_DEFAULTS = {
    "resolution": 8,
    "preset": "Tiny/2",
    "patch_size": 2,
    "hidden_size": 64,
    "num_layers": 6,
    "d_state": 16,
    "class_conditional": True,
    "train_batch_size": 32,
    "max_train_steps": 2000,
    "learning_rate": 3e-3,
    "lr_scheduler": "cosine",
    "lr_warmup_steps": 50,
    "weighting_scheme": "logit_normal",
    "ema_decay": 0.999,
    "ema_schedule": "ramp",
    "dataloader_drop_last": False,
    "checkpointing_steps": 1000,
    "num_inference_steps": 16,
    "final_eval": "digits",
}
GENERAL_DEFAULTS = {
    "resolution": 256,
    "preset": "Tiny/2",
    "class_conditional": False,
    "train_batch_size": 16,
    "max_train_steps": 50_000,
    "learning_rate": 3e-4,
    "lr_scheduler": "constant",
    "lr_warmup_steps": 0,
    "weighting_scheme": "uniform",
    "ema_decay": 0.9999,
    "ema_schedule": "constant",
    "dataloader_drop_last": True,
    "checkpointing_steps": 5000,
    "num_inference_steps": 32,
    "final_eval": "none",
}


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    group = parser.add_argument_group("data")
    group.add_argument("--dataset_name", help="A 🤗 datasets name or local dataset script/folder.")
    group.add_argument("--dataset_config_name")
    group.add_argument("--train_data_dir", help="An image folder (labels from sub-folder names).")
    group.add_argument("--image_column", default="image")
    group.add_argument("--label_column", default="label")
    group.add_argument("--cache_dir", help="Where 🤗 datasets caches downloads.")
    group.add_argument("--resolution", type=int)
    group.add_argument(
        "--center_crop",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="Center crop (default). --no-center_crop crops at random, drawn in the data loader: a resumed "
        "run does not reproduce those crops exactly.",
    )
    group.add_argument("--random_flip", action="store_true")
    group.add_argument("--dataloader_num_workers", type=int, default=0)
    group.add_argument(
        "--dataloader_drop_last",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Drop each epoch's last incomplete batch (the paper's; the digits demo keeps it).",
    )
    group.add_argument("--vae", help="AutoencoderKL folder or repo id: train on its latents (encoded once).")
    group.add_argument("--vae_batch_size", type=int, default=32)

    group = parser.add_argument_group("model")
    group.add_argument(
        "--model_config", help="A folder with a transformer config.json (e.g. hub_configs/...)."
    )
    group.add_argument("--preset", help="Size preset, e.g. Tiny/2, B/2 (default Tiny/2).")
    for name in ("num_layers", "hidden_size", "patch_size", "d_state", "num_scan_orders"):
        group.add_argument(f"--{name}", type=int)
    group.add_argument("--scan_pattern", choices=["zigzag", "bidirectional"])
    group.add_argument(
        "--state_chain",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="Arcee's state chain (default on); --no-state_chain gives the ZigMa/Vim baseline.",
    )
    group.add_argument("--class_conditional", action=argparse.BooleanOptionalAction, default=None)
    group.add_argument("--class_dropout_prob", type=float, default=0.1, help="Label dropout for guidance.")
    group.add_argument("--gradient_checkpointing", action="store_true")

    group = parser.add_argument_group("objective and optimisation")
    group.add_argument("--path", default="gvp", choices=["gvp", "linear"])
    group.add_argument(
        "--weighting_scheme", choices=flow_matching.TIME_SAMPLINGS, help="t sampling (uniform)."
    )
    group.add_argument("--logit_mean", type=float, default=0.0)
    group.add_argument("--logit_std", type=float, default=1.0)
    group.add_argument("--mode_scale", type=float, default=1.29)
    group.add_argument("--train_batch_size", type=int, help="Per-device batch size.")
    group.add_argument("--gradient_accumulation_steps", type=int, default=1)
    group.add_argument("--max_train_steps", type=int)
    group.add_argument("--learning_rate", type=float)
    group.add_argument("--lr_scheduler", help="A diffusers LR schedule name (constant).")
    group.add_argument("--lr_warmup_steps", type=int)
    group.add_argument("--adam_beta1", type=float, default=0.9)
    group.add_argument("--adam_beta2", type=float, default=0.999)
    group.add_argument("--adam_weight_decay", type=float, default=0.0)
    group.add_argument("--adam_epsilon", type=float, default=1e-8)
    group.add_argument("--max_grad_norm", type=float, default=2.0)
    group.add_argument("--use_ema", action=argparse.BooleanOptionalAction, default=True)
    group.add_argument("--ema_decay", type=float)
    group.add_argument(
        "--ema_schedule",
        choices=EMA_SCHEDULES,
        help="constant: the decay from the first update (the paper's); ramp: diffusers' "
        "min((1+s)/(10+s), decay) (the digits demo's).",
    )
    group.add_argument("--mixed_precision", choices=["no", "fp16", "bf16"])
    group.add_argument("--allow_tf32", action="store_true")
    group.add_argument("--seed", type=int, default=0)

    group = parser.add_argument_group("outputs")
    group.add_argument("--output_dir", required=True)
    group.add_argument("--logging_dir", default="logs")
    group.add_argument("--report_to", default="tensorboard", help='"tensorboard", "wandb", "all" or "none".')
    group.add_argument("--checkpointing_steps", type=int)
    group.add_argument("--checkpoints_total_limit", type=int)
    group.add_argument("--resume_from_checkpoint", help='A checkpoint folder or "latest".')
    group.add_argument("--validation_steps", type=int, help="Write and log a sample grid every N steps.")
    group.add_argument("--num_inference_steps", type=int, help="Euler steps of sample grids and evals.")
    group.add_argument("--guidance_scale", type=float, default=3.0, help="Guidance of the final samples.")
    group.add_argument(
        "--final_eval",
        choices=["digits", "fid", "none"],
        help="digits: accuracy and Fréchet distance from the digit classifier; fid: eval_fid.",
    )
    group.add_argument("--num_eval_samples", type=int, help="Digits: samples per guidance (default 901).")
    group.add_argument("--fid_reference_dir", help="Real images for --final_eval fid / --eval_steps.")
    group.add_argument("--fid_num_samples", type=int, default=5000)
    group.add_argument("--eval_steps", type=int, help="Run the final evaluation every N steps as well.")
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--hub_model_id")
    args = parser.parse_args(argv)

    defaults = (
        DIGITS_DEFAULTS if args.dataset_name is None and args.train_data_dir is None else GENERAL_DEFAULTS
    )
    for key, value in defaults.items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.final_eval == "fid" and args.fid_reference_dir is None:
        parser.error("--final_eval fid needs --fid_reference_dir")
    if args.push_to_hub and args.hub_model_id is None:
        parser.error("--push_to_hub needs --hub_model_id")
    return args


def build_model(args: argparse.Namespace, in_channels: int, sample_size: int, num_classes: int | None):
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
    if args.model_config is not None:
        config = {**ArceeZigmaTransformer.load_config(args.model_config), **overrides, **shape, **labels}
    else:
        config = preset_config(args.preset, **overrides, **shape, **labels)
    if sample_size % config["patch_size"] != 0:
        raise ValueError(
            f"resolution: the model input is {sample_size}x{sample_size}, "
            f"not divisible by patch_size {config['patch_size']}"
        )
    return ArceeZigmaTransformer.from_config(config)


def build_train_dataset(args: argparse.Namespace, accelerator: Accelerator):
    """The torch dataset to train on, the model input's channels and size, and the number of classes."""
    dataset = data.load_train_dataset(
        args.dataset_name, args.dataset_config_name, args.train_data_dir, args.cache_dir
    )
    label_column = args.label_column if args.class_conditional else None
    data.check_columns(dataset, args.image_column, label_column)
    num_classes = data.num_classes_of(dataset, label_column) if label_column else None
    mode = data.image_mode_of(dataset, args.image_column)
    if args.vae is None:
        transform = data.image_transform(args.resolution, args.center_crop)
        dataset = data.with_image_transform(dataset, transform, args.image_column, label_column, mode)
        return dataset, len(mode), args.resolution, num_classes, None

    from diffusers import AutoencoderKL

    vae = AutoencoderKL.from_pretrained(args.vae).eval().requires_grad_(False)
    # encoded once, so a random crop would be frozen: latents always use a center crop; flips are handled
    # by caching both views
    transform = data.image_transform(args.resolution, center_crop=True)
    images = data.with_image_transform(dataset, transform, args.image_column, label_column, "RGB")
    key = latents.latent_cache_key(
        dataset._fingerprint,
        vae.config,
        resolution=args.resolution,
        random_flip=args.random_flip,
        labels=label_column,
    )
    cache_path = Path(args.output_dir) / "latent_cache" / f"{key}.safetensors"
    with accelerator.main_process_first():
        cache = latents.load_or_encode(
            cache_path,
            lambda: latents.encode_dataset(
                vae.to(accelerator.device), images, args.vae_batch_size, args.random_flip, accelerator.device
            ),
        )
    train_dataset = latents.CachedLatentDataset(cache)
    _, channels, size, _ = cache["mean"][:, 0].shape
    return train_dataset, channels, size, num_classes, vae.cpu()


def main(args: argparse.Namespace) -> None:
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
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    if accelerator.is_main_process:
        output_dir.mkdir(parents=True, exist_ok=True)
    accelerator.wait_for_everyone()
    set_seed(args.seed, device_specific=True)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True

    train_dataset, channels, sample_size, num_classes, vae = build_train_dataset(args, accelerator)
    model = build_model(args, channels, sample_size, num_classes)
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
    )
    # the loader's own generator keeps iterator creation from drawing on the global RNG, whose checkpointed
    # state must be the only source of the noise, times, flips and label dropout for resuming to be exact
    train_dataloader = torch.utils.data.DataLoader(
        train_dataset,
        generator=torch.Generator().manual_seed(args.seed),
        batch_size=args.train_batch_size,
        shuffle=True,
        collate_fn=data.collate,
        num_workers=args.dataloader_num_workers,
        drop_last=args.dataloader_drop_last,
    )
    if len(train_dataloader) == 0:
        raise ValueError(
            f"train_batch_size: the dataset has {len(train_dataset)} examples, fewer than one batch of "
            f"{args.train_batch_size} with --dataloader_drop_last"
        )
    lr_scheduler = get_scheduler(
        args.lr_scheduler,
        optimizer,
        num_warmup_steps=args.lr_warmup_steps * accelerator.num_processes,
        num_training_steps=args.max_train_steps * accelerator.num_processes,
    )
    model, optimizer, train_dataloader, lr_scheduler = accelerator.prepare(
        model, optimizer, train_dataloader, lr_scheduler
    )

    updates_per_epoch = math.ceil(len(train_dataloader) / args.gradient_accumulation_steps)
    num_epochs = math.ceil(args.max_train_steps / updates_per_epoch)
    if accelerator.is_main_process:
        accelerator.init_trackers("train_fm", config={k: v for k, v in vars(args).items() if v is not None})
    total_batch = args.train_batch_size * accelerator.num_processes * args.gradient_accumulation_steps
    logger.info(
        f"{len(train_dataset)} examples, {num_epochs} epochs, total batch {total_batch}, "
        f"{args.max_train_steps} steps, {sum(p.numel() for p in model.parameters()):,} parameters"
    )

    global_step = 0
    resume_path = checkpointing.resolve_checkpoint(output_dir, args.resume_from_checkpoint)
    if resume_path is not None:
        logger.info(f"Resuming from {resume_path}")
        global_step = checkpointing.load_checkpoint(accelerator, resume_path)
    elif args.resume_from_checkpoint is not None:
        logger.info("No checkpoint found: starting a new run")
    first_epoch = global_step // updates_per_epoch
    batches_to_skip = (global_step % updates_per_epoch) * args.gradient_accumulation_steps

    path = get_flow_path(args.path)
    progress = tqdm(
        range(args.max_train_steps),
        initial=global_step,
        desc="steps",
        disable=not accelerator.is_local_main_process,
    )
    for epoch in range(first_epoch, num_epochs):
        model.train()
        # the seedable sampler shuffles as a function of (seed, epoch): skipping batches restores the position
        train_dataloader.set_epoch(epoch)
        loader = train_dataloader
        if epoch == first_epoch and batches_to_skip:
            loader = accelerator.skip_first_batches(train_dataloader, batches_to_skip)
            loader.set_epoch(epoch)
        for batch in loader:
            x1 = model_input(batch, args.random_flip, vae)
            with accelerator.accumulate(model):
                t = flow_matching.sample_flow_times(
                    x1.shape[0],
                    args.weighting_scheme,
                    args.logit_mean,
                    args.logit_std,
                    args.mode_scale,
                    x1.device,
                )
                loss = flow_matching.flow_matching_loss(model, x1, t, path, batch.get("class_labels"))
                accelerator.backward(loss)
                if accelerator.sync_gradients:
                    grad_norm = accelerator.clip_grad_norm_(model.parameters(), args.max_grad_norm)
                optimizer.step()
                lr_scheduler.step()
                optimizer.zero_grad(set_to_none=True)
            if not accelerator.sync_gradients:
                continue

            if ema is not None:
                ema.step(model.parameters())
            global_step += 1
            progress.update(1)
            logs = {
                "loss": loss.detach().item(),
                "grad_norm": float(grad_norm),
                "lr": lr_scheduler.get_last_lr()[0],
            }
            progress.set_postfix(loss=f"{logs['loss']:.4f}")
            accelerator.log(logs, step=global_step)

            if global_step % args.checkpointing_steps == 0:
                checkpointing.save_checkpoint(
                    accelerator, output_dir, global_step, args.checkpoints_total_limit
                )
            validate = args.validation_steps and global_step % args.validation_steps == 0
            evaluate = args.eval_steps and global_step % args.eval_steps == 0
            if (validate or evaluate) and accelerator.is_main_process:
                model.eval()
                with ema_weights(model, ema, accelerator):
                    pipeline = build_pipeline(args, accelerator, model, vae)
                    pipeline.set_progress_bar_config(disable=True)
                    if validate:
                        log_sample_grid(
                            args,
                            pipeline,
                            accelerator,
                            global_step,
                            output_dir / "samples" / f"step-{global_step}.png",
                        )
                    if evaluate:
                        metrics = run_evaluation(args, pipeline, output_dir / f"eval-{global_step}")
                        accelerator.log(
                            {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)},
                            step=global_step,
                        )
                model.train()
            if global_step >= args.max_train_steps:
                break
    progress.close()

    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        save_final_pipeline(args, accelerator, model, ema, vae)
        finish(args, accelerator)
    accelerator.end_training()


def model_input(batch: dict, random_flip: bool, vae) -> torch.Tensor:
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


def build_pipeline(args, accelerator: Accelerator, model, vae) -> ArceeZigmaPipeline:
    scheduler = FlowMatchGVPScheduler(path=args.path)
    transformer = accelerator.unwrap_model(model)
    return ArceeZigmaPipeline(transformer=transformer, scheduler=scheduler, vae=vae).to(accelerator.device)


def log_sample_grid(
    args, pipeline: ArceeZigmaPipeline, accelerator: Accelerator, step: int, path: Path
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


def run_evaluation(args, pipeline: ArceeZigmaPipeline, sample_dir: Path) -> dict:
    if args.final_eval == "digits":
        return digits.evaluate_digits_pipeline(
            pipeline,
            args.guidance_scale,
            num_samples=args.num_eval_samples,
            seed=args.seed,
            num_inference_steps=args.num_inference_steps,
        )
    if args.final_eval == "fid":
        samples = sampling.generate_samples(
            pipeline, sample_dir, args.fid_num_samples, args.seed, args.guidance_scale
        )
        metrics = fid.compute_fid_kid(samples, args.fid_reference_dir, device=pipeline.device)
        metrics.update(
            solver=sampling.describe_solver(pipeline, None),
            nfe=sampling.mean_model_calls(sample_dir, args.fid_num_samples),
        )
        return metrics
    return {}


def save_final_pipeline(args, accelerator: Accelerator, model, ema: EMAModel | None, vae) -> None:
    """EMA weights as the pipeline's transformer; the raw weights as the ``raw`` variant next to them."""
    output_dir = Path(args.output_dir)
    transformer = accelerator.unwrap_model(model)
    with ema_weights(model, ema, accelerator):
        build_pipeline(args, accelerator, model, vae).save_pretrained(output_dir)
    if ema is not None:
        transformer.save_pretrained(output_dir / "transformer", variant="raw")


def finish(args, accelerator: Accelerator) -> None:
    """Reload the saved folder the way a user would, then write samples.png, metrics.json and push."""
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
            seconds_since_start=round(time.perf_counter() - START_TIME, 1),
        )
        (output_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
        logger.info(f"metrics: {json.dumps(metrics)}")
        accelerator.log(
            {f"eval/{k}": v for k, v in metrics.items() if isinstance(v, float)}, step=args.max_train_steps
        )
    if args.push_to_hub:
        pipeline.push_to_hub(args.hub_model_id, eval_results=metrics, training_info=vars(args))


if __name__ == "__main__":
    arguments = parse_args()
    try:
        main(arguments)
    except (ValueError, FileNotFoundError) as err:
        # expected user errors: one readable line and a non-zero exit, not a traceback
        sys.exit(f"train_fm.py: error: {' '.join(str(err).split())}")
