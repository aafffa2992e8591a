"""Fashion-MNIST, offline: Debian's idx files to a local 🤗 dataset, and the real-image folders of its metric.

    apt-get install --no-install-recommends dataset-fashion-mnist   # 31 MB, /usr/share/datasets/fashion-mnist
    python scripts/prepare_fashion_mnist.py --output_dir data/fashion_mnist

writes ``data/fashion_mnist/data/{train,test}-00000-of-00001.parquet`` (``--dataset_name data/fashion_mnist``
reads it as ``--dataset_name zalando-datasets/fashion_mnist`` reads the Hub's copy), and
``data/fashion_mnist/fid/reference`` (test half A) and ``fid/real`` (``--num_real`` images of test half B) for
``--fid_reference_dir`` and ``--fid_real_dir``; then trains (or loads) the metric's classifier and prints its
test accuracy. See docs/reproduction.md, "Fashion-MNIST".
"""

from __future__ import annotations

import argparse
from pathlib import Path

from arcee_diffusers.command_line import user_errors_exit
from arcee_diffusers.evaluation import fashion_mnist
from arcee_diffusers.training.idx_data import FASHION_MNIST_DIR, write_idx_dataset


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--idx_dir", default=FASHION_MNIST_DIR, help=f"The idx files (default {FASHION_MNIST_DIR})."
    )
    parser.add_argument("--output_dir", default="data/fashion_mnist")
    parser.add_argument(
        "--num_real",
        type=int,
        default=2000,
        help="Real images of --fid_real_dir: as many as the samples scored.",
    )
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> None:
    output_dir = write_idx_dataset(args.idx_dir, args.output_dir)
    reference, real = fashion_mnist.write_fid_folders(Path(output_dir) / "fid", args.num_real, args.idx_dir)
    features = fashion_mnist.load_or_train_features(args.idx_dir)
    print(f"dataset: {output_dir} (--dataset_name {output_dir})")
    print(f"--fid_reference_dir {reference} --fid_real_dir {real}")
    print(f"metric classifier: test accuracy {features.test_accuracy:.4f}")


if __name__ == "__main__":
    with user_errors_exit("prepare_fashion_mnist.py"):
        main(parse_args())
