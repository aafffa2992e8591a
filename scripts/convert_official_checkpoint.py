"""Convert a checkpoint of the published Arcee code (``content.pth`` or ``epoch*_step*.pt`` of its train.py)
into a pipeline folder that ``ArceeZigmaPipeline.from_pretrained`` loads.

    python scripts/convert_official_checkpoint.py --checkpoint content.pth --model Arcee-B/2 \\
        --scan_type Arcee_4 --output_dir arcee4-celebahq

The EMA weights become the transformer and the raw weights its ``raw`` variant; the scheduler is the paper's
dopri5 sampler. The configuration is read from the tensors; see docs/model.md for the scan-type table.
"""

from __future__ import annotations

import argparse

from arcee_diffusers.command_line import user_errors_exit
from arcee_diffusers.conversion import PUBLISHED_SCAN_TYPES, add_vae_argument, convert_checkpoint
from arcee_diffusers.schedulers.flow_paths import PATHS


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--checkpoint", required=True, help="The published content.pth / epoch*_step*.pt.")
    parser.add_argument(
        "--scan_type",
        required=True,
        help=f"The published --scan-type it was trained with: one of {', '.join(PUBLISHED_SCAN_TYPES)}.",
    )
    parser.add_argument(
        "--model", help="The published --model, e.g. Arcee-B/2, checked against the tensors (optional)."
    )
    parser.add_argument("--output_dir", required=True)
    add_vae_argument(parser)
    parser.add_argument(
        "--path", choices=sorted(PATHS), help="Flow path (default: the checkpoint's, else gvp)."
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    pipeline = convert_checkpoint(
        args.checkpoint, args.output_dir, args.scan_type, args.model, args.vae, args.path
    )
    config = pipeline.transformer.config
    print(
        f"wrote {args.output_dir}: {config.num_layers} layers, width {config.hidden_size}, patch "
        f"{config.patch_size}, d_state {config.d_state}, {config.scan_pattern} x{config.num_scan_orders}, "
        f"state chain {'on' if config.state_chain else 'off'}"
    )


if __name__ == "__main__":
    with user_errors_exit("convert_official_checkpoint.py"):
        main(parse_args())
