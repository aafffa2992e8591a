"""The command line of ``train_scripts/train_fm.py`` and its two recipes (the digits demo, the paper's).

``parse_args`` = ``build_parser`` + ``finalize_args``: options left unset take the recipe's value, then the
combination is checked, so that a bad combination fails before any training. The Table 2 grid
(``arcee_diffusers.experiments``) uses the same parser and fills in its tier's values in between.
"""

from __future__ import annotations

import argparse

from ..models.scan_orders import SCAN_PATTERNS
from ..schedulers.flow_paths import PATHS
from .ema import EMA_SCHEDULES
from .flow_matching import TIME_SAMPLINGS

# A small model and its optimisation, sized to train on two CPU cores in minutes: the embedded demo's, and
# every Table 2 grid's on any data (arcee_diffusers.experiments.table2).
SMALL_RECIPE = {
    "preset": "Tiny/2",
    "hidden_size": 64,
    "num_layers": 6,
    "d_state": 16,
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
}
# The embedded demo: the small recipe as a class-conditional Arcee-1 on 8×8 digits. Flags given on the
# command line win over these; the paper recipe fills everything else.
DIGITS_DEFAULTS = {
    "resolution": 8,
    "patch_size": 2,
    "class_conditional": True,
    "final_eval": "digits",
    **SMALL_RECIPE,
}
# Any other data: the paper's optimisation (lr 3e-4 constant, batch 16, uniform t, EMA 0.9999), at the demo
# size Tiny/2 unless --preset or --model_config say otherwise.
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


def build_parser(description: str | None = None) -> argparse.ArgumentParser:
    """The command line of ``train_scripts/train_fm.py``; every option is None unless given or defaulted."""
    parser = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawDescriptionHelpFormatter
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
    group.add_argument(
        "--pad_to_resolution",
        action="store_true",
        help="Pad smaller images to --resolution with black, centred, instead of resizing them (28x28 "
        "Fashion-MNIST to 32x32: every pixel kept as it is).",
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
    group.add_argument(
        "--latent_cache_dir", help="Where the encoded latents are cached (default <output_dir>/latent_cache)."
    )

    group = parser.add_argument_group("model")
    group.add_argument(
        "--model_config",
        help="A transformer config.json's folder, or a pipeline folder with one under transformer/ (e.g. "
        "hub_configs/arcee-4-b2).",
    )
    group.add_argument(
        "--init_from",
        help="A saved pipeline folder (e.g. a converted ZigMa model) or its transformer/ folder: start from "
        "its transformer's config and weights. Flags may change what keeps the parameters (e.g. "
        "--state_chain for Arcee fine-tuning); one that changes them is an error.",
    )
    group.add_argument("--preset", help="Size preset, e.g. Tiny/2, B/2 (default Tiny/2).")
    for name in ("num_layers", "hidden_size", "patch_size", "d_state", "num_scan_orders"):
        group.add_argument(f"--{name}", type=int)
    group.add_argument("--scan_pattern", choices=SCAN_PATTERNS)
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
    group.add_argument("--path", default="gvp", choices=sorted(PATHS))
    group.add_argument("--weighting_scheme", choices=TIME_SAMPLINGS, help="t sampling (uniform).")
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
    group.add_argument(
        "--checkpoint_at_steps",
        type=int,
        nargs="+",
        default=[],
        metavar="STEP",
        help="Also checkpoint after these updates and keep those checkpoints whatever "
        "--checkpoints_total_limit (the paper's step-50000 checkpoint holds 50001 updates).",
    )
    group.add_argument("--resume_from_checkpoint", help='A checkpoint folder or "latest".')
    group.add_argument("--validation_steps", type=int, help="Write and log a sample grid every N steps.")
    group.add_argument(
        "--num_inference_steps", type=int, help="Euler steps of sample grids and evals (0: adaptive dopri5)."
    )
    group.add_argument(
        "--guidance_scale",
        type=float,
        help="Guidance of the final samples (default 3 for a class-conditional model, else 1).",
    )
    group.add_argument(
        "--final_eval",
        choices=["digits", "fid", "none"],
        help="digits: accuracy and Fréchet distance from the digit classifier; fid: eval_fid.",
    )
    group.add_argument("--num_eval_samples", type=int, help="Digits: samples per guidance (default 901).")
    group.add_argument(
        "--eval_batch_size",
        type=int,
        default=64,
        help="Samples per model call in sample grids and evaluations (on CPU small batches are faster).",
    )
    group.add_argument("--fid_reference_dir", help="Real images for --final_eval fid / --eval_steps.")
    group.add_argument(
        "--fid_real_dir",
        help="Real images outside --fid_reference_dir, as many as --fid_num_samples: their FID is the "
        "floor, and the samples' FID divided by it is reported as frechet_ratio.",
    )
    group.add_argument("--fid_num_samples", type=int, default=5000)
    group.add_argument(
        "--fid_feature_extractor",
        help='"module:function" returning a custom feature extractor (offline; default: Inception).',
    )
    group.add_argument("--eval_steps", type=int, help="Run the final evaluation every N steps as well.")
    group.add_argument("--push_to_hub", action="store_true")
    group.add_argument("--hub_model_id")
    return parser


def recipe_defaults(args: argparse.Namespace) -> dict:
    """The digits recipe without ``--dataset_name`` and ``--train_data_dir``, else the paper's."""
    return DIGITS_DEFAULTS if args.dataset_name is None and args.train_data_dir is None else GENERAL_DEFAULTS


def finalize_args(args: argparse.Namespace, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """Fill unset options from the recipe (digits without a dataset, else the paper's) and check them."""
    for key, value in recipe_defaults(args).items():
        if getattr(args, key, None) is None:
            setattr(args, key, value)
    if args.final_eval == "fid" and args.fid_reference_dir is None:
        parser.error("--final_eval fid needs --fid_reference_dir")
    if args.fid_real_dir is not None:
        from ..evaluation.fid import image_files

        found = len(image_files(args.fid_real_dir))
        if found != args.fid_num_samples:
            parser.error(
                f"--fid_real_dir holds {found} images, --fid_num_samples is {args.fid_num_samples}: compare "
                "as many samples as real images (FID depends on the count)"
            )
    if any(step < 1 for step in args.checkpoint_at_steps):
        parser.error(f"--checkpoint_at_steps takes update counts >= 1, got {args.checkpoint_at_steps}")
    if args.init_from is not None and args.model_config is not None:
        parser.error("--init_from and --model_config both give the model: pass one")
    if args.push_to_hub and args.hub_model_id is None:
        parser.error("--push_to_hub needs --hub_model_id")
    if args.guidance_scale is None:
        args.guidance_scale = 3.0 if args.class_conditional else 1.0
    elif args.guidance_scale > 1 and not args.class_conditional:
        parser.error("--guidance_scale > 1 needs --class_conditional (an unconditional model samples at 1)")
    return args


def parse_args(argv: list[str] | None = None, description: str | None = None) -> argparse.Namespace:
    parser = build_parser(description)
    return finalize_args(parser.parse_args(argv), parser)
