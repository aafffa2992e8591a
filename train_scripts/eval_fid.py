"""Generate samples from a pipeline and score them with clean-fid (FID, KID×10³) against real images.

    python train_scripts/eval_fid.py --pipeline outputs/celebahq --reference_dir data/celebahq256 \\
        --num_samples 50000 --sample_dir outputs/celebahq/fid-50k --output_json outputs/celebahq/fid.json

Sample i uses seed ``--seed + i``; rerunning with the same --sample_dir adds only the missing samples. The
real folder's features are cached under a hash of its contents. The default sampler is the paper's
(dopri5, atol 1e-6, rtol 1e-3: --num_inference_steps 0); clean-fid downloads its Inception network unless
--feature_extractor names a local one ("module:function" returning the extractor).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from arcee_diffusers.command_line import user_errors_exit
from arcee_diffusers.evaluation import compute_fid_kid, describe_solver, generate_samples, mean_model_calls
from arcee_diffusers.evaluation.fid import load_feature_extractor
from arcee_diffusers.models import ArceeZigmaTransformer
from arcee_diffusers.pipelines.pipeline_arcee_zigma import ArceeZigmaPipeline
from arcee_diffusers.schedulers.sampling import is_native_scheduler


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--pipeline", required=True, help="A saved pipeline folder or Hub repo id.")
    parser.add_argument("--variant", help='Weights variant, e.g. "raw" for the non-EMA weights.')
    parser.add_argument(
        "--transformer",
        help="Score the transformer in this folder with the pipeline's other parts, e.g. a training "
        "checkpoint's EMA weights (<run>/checkpoint-<step>/transformer_ema).",
    )
    parser.add_argument("--reference_dir", required=True, help="Folder of real images.")
    parser.add_argument("--sample_dir", required=True, help="Where samples go (and are resumed from).")
    parser.add_argument("--num_samples", type=int, default=50_000)
    parser.add_argument("--batch_size", type=int, default=64)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--guidance_scale", type=float, default=1.0)
    parser.add_argument(
        "--num_inference_steps", type=int, default=0, help="0: adaptive dopri5 (the paper's)."
    )
    for name in ("atol", "rtol"):
        parser.add_argument(
            f"--{name}", type=float, help=f"dopri5's {name} (default: the pipeline scheduler's)."
        )
    parser.add_argument("--allow_tf32", action="store_true", help="TF32 matmuls and convolutions on CUDA.")
    parser.add_argument("--feature_extractor", help='"module:function" returning a custom feature extractor.')
    parser.add_argument("--cache_dir", help="Reference-feature cache (default ~/.cache/arcee_diffusers).")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--output_json", help="Write the metrics here (they are always printed).")
    args = parser.parse_args(argv)
    if args.num_inference_steps and (args.atol is not None or args.rtol is not None):
        parser.error("--atol/--rtol are dopri5's tolerances: they need --num_inference_steps 0")
    return args


def main(args: argparse.Namespace) -> dict:
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    components = {}
    if args.transformer:
        components["transformer"] = ArceeZigmaTransformer.from_pretrained(args.transformer)
    pipeline = ArceeZigmaPipeline.from_pretrained(args.pipeline, variant=args.variant, **components)
    pipeline.to(args.device).set_progress_bar_config(disable=True)
    steps = args.num_inference_steps or None
    tolerances = {name: getattr(args, name) for name in ("atol", "rtol") if getattr(args, name) is not None}
    if tolerances:
        if not is_native_scheduler(pipeline.scheduler):
            scheduler = type(pipeline.scheduler).__name__
            raise ValueError(f"--atol/--rtol need a FlowMatchGVPScheduler; the pipeline has {scheduler}")
        pipeline.scheduler.register_to_config(**tolerances)
    samples = generate_samples(
        pipeline, args.sample_dir, args.num_samples, args.seed, args.guidance_scale, steps, args.batch_size
    )
    extractor, name = None, "inception_v3"
    if args.feature_extractor:
        extractor, name = load_feature_extractor(args.feature_extractor), args.feature_extractor
    metrics = compute_fid_kid(samples, args.reference_dir, extractor, name, args.cache_dir, args.device)
    settings = ("variant", "transformer", "num_samples", "seed", "guidance_scale")
    metrics.update(
        pipeline=str(args.pipeline),
        num_inference_steps=steps,
        solver=describe_solver(pipeline, steps),
        nfe=mean_model_calls(args.sample_dir, args.num_samples),
        **{k: getattr(args, k) for k in settings},
    )
    print(json.dumps(metrics, indent=2))
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


if __name__ == "__main__":
    with user_errors_exit("eval_fid.py"):
        main(parse_args())
