"""Convert one of ZigMa's released checkpoints (Hub repo taohu/zigma: churches256_0280000.pt,
faceshq1024_0090000.pt, landscape1024_0210000.pt) into a pipeline folder that ``ArceeZigmaPipeline`` and
plain diffusers load, computing exactly what ZigMa's own model computes.

    python scripts/convert_zigma_checkpoint.py --checkpoint churches256_0280000.pt \\
        --output_dir zigma-8-churches256

No pickled code runs (a weights-only load, with inert stand-ins for the stored OmegaConf config); see
docs/model.md.
"""

from __future__ import annotations

import argparse

from arcee_diffusers.command_line import user_errors_exit
from arcee_diffusers.conversion import add_vae_argument, convert_zigma_checkpoint


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="ZigMa's train_acc.py checkpoint (.pt).")
    parser.add_argument("--output_dir", required=True)
    parser.add_argument(
        "--weights",
        choices=("ema", "model"),
        default="ema",
        help="Which weights become the transformer (default ema); the other is kept as a variant.",
    )
    add_vae_argument(parser)
    parser.add_argument(
        "--legacy_unpermute",
        action="store_true",
        help="For checkpoints trained under ZigMa's code of 2024-04-08 to 2024-05-24 (noise-like samples "
        "without it; docs/model.md).",
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    pipeline = convert_zigma_checkpoint(
        args.checkpoint, args.output_dir, args.weights, args.vae, args.legacy_unpermute
    )
    config = pipeline.transformer.config
    print(
        f"wrote {args.output_dir}: {config.num_layers} layers, width {config.hidden_size}, patch "
        f"{config.patch_size}, {config.sample_size} x {config.sample_size} latents, d_state "
        f"{config.d_state}, zigzag x{config.num_scan_orders}, position table {config.position_embedding}"
    )


if __name__ == "__main__":
    with user_errors_exit("convert_zigma_checkpoint.py"):
        main(parse_args())
