"""Regenerate ``hub_configs/<variant>/`` from the variant table (``arcee_diffusers/models/variants.py``):
``transformer/config.json``, then the rest of a Hub repo template (model_index.json, scheduler and VAE
configs, re-export files, README.md model card).

python hub_configs/generate.py            # writes next to this file
python hub_configs/generate.py --root DIR
"""

import argparse
from pathlib import Path

from arcee_diffusers.hub_templates import write_hub_configs, write_repo_template


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--root", type=Path, default=Path(__file__).resolve().parent)
    args = parser.parse_args()
    for path in write_hub_configs(args.root):
        print(path)
        variant = path.parent.parent.name
        for written in write_repo_template(path.parent.parent, f"your-namespace/{variant}", variant=variant):
            print(written)


if __name__ == "__main__":
    main()
