"""``python -m arcee_diffusers.demo [PIPELINE]`` (console script ``arcee-demo``): serve the demo page."""

from __future__ import annotations

import argparse
import os

from ..command_line import user_errors_exit

PROGRAM = "arcee-demo"
DEFAULT_PIPELINE = "outputs/digits"
MAIN_JOB = "accelerate launch train_scripts/train_fm.py --output_dir outputs/digits"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog=PROGRAM, description=__doc__)
    parser.add_argument(
        "pipeline", nargs="?", default=DEFAULT_PIPELINE,
        help=f"a pipeline folder or Hub repo id (default {DEFAULT_PIPELINE}, the README's main job's output)",
    )  # fmt: skip
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    parser.add_argument(
        "--port", type=int, default=None, help="port (default: gradio's, 7860 or the next free)"
    )
    parser.add_argument(
        "--concurrency",
        type=int,
        default=1,
        help="requests the queue runs at once (default 1: one job on a CPU)",
    )
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with user_errors_exit(PROGRAM, NotADirectoryError):
        if args.pipeline == DEFAULT_PIPELINE and not os.path.isdir(DEFAULT_PIPELINE):
            raise FileNotFoundError(
                f"no pipeline at {DEFAULT_PIPELINE}: run the README's main job first ({MAIN_JOB}), "
                "or pass a pipeline folder or Hub repo id"
            )
        if args.concurrency < 1:
            raise ValueError(f"--concurrency must be a positive int, got {args.concurrency}")
        from . import LAUNCH_OPTIONS, DemoModel, build_demo, load_pipeline

        demo = build_demo(
            DemoModel(load_pipeline(args.pipeline, args.device), args.pipeline), args.concurrency
        )
    demo.launch(server_name=args.host, server_port=args.port, **LAUNCH_OPTIONS)
