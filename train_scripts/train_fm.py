"""Train an Arcee/ZigMa flow-matching model with 🤗 Accelerate.

    accelerate launch train_scripts/train_fm.py --output_dir outputs/digits  # the embedded digits demo
    accelerate launch train_scripts/train_fm.py --train_data_dir imgs/ --vae vae/ --resolution 256 \\
        --preset B/2 --num_scan_orders 4 --output_dir outputs/celebahq  # the paper's recipe

With neither --dataset_name nor --train_data_dir it trains a small class-conditional model on
scikit-learn's bundled digits and ends by writing samples.png and metrics.json (see docs/training.md).
The options and both recipes are in arcee_diffusers/training/cli.py, the training loop, checkpoints and
evaluation in arcee_diffusers/training/trainer.py.
"""

from __future__ import annotations

if __name__ == "__main__":  # the CPU scan's first compile runs in helper processes while the trainer imports
    import arcee_scan

    arcee_scan.compile_cpu_kernels_in_background()

import argparse  # noqa: E402
import logging  # noqa: E402
import time  # noqa: E402

from arcee_diffusers import training  # noqa: E402
from arcee_diffusers.command_line import user_errors_exit  # noqa: E402

START_TIME = time.perf_counter()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return training.parse_args(argv, description=__doc__)


def main(args: argparse.Namespace) -> None:
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    accelerator = training.make_accelerator(args)
    train_data = training.build_train_dataset(args, accelerator)
    model = training.build_model(args, train_data.channels, train_data.sample_size, train_data.num_classes)
    model, ema = training.train(args, accelerator, train_data, model)
    if accelerator.is_main_process:
        training.save_final_pipeline(args, accelerator, model, ema, train_data.vae)
        training.finish(args, accelerator, START_TIME)
    accelerator.end_training()


if __name__ == "__main__":
    with user_errors_exit("train_fm.py"):
        main(parse_args())
