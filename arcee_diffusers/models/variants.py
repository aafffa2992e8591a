"""The paper's model variants as named transformer configs, and the writer of ``hub_configs/``."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from .arcee_zigma_transformer import ArceeZigmaTransformer, preset_config

# folder name -> (size preset, overrides). Zigma-k / Arcee-k at B/2 are the paper's table rows.
PAPER_VARIANTS: dict[str, tuple[str, dict[str, Any]]] = {
    **{f"zigma-{k}-b2": ("B/2", {"num_scan_orders": k, "state_chain": False}) for k in (1, 2, 4, 8)},
    **{f"arcee-{k}-b2": ("B/2", {"num_scan_orders": k, "state_chain": True}) for k in (1, 2, 4, 8)},
    "vim-b2": ("Vim-B/2", {"state_chain": False}),
    "arcee-vim-b2": ("Vim-B/2", {"state_chain": True}),
    "arcee-tiny": ("Tiny/2", {"num_scan_orders": 1, "state_chain": True}),
}


def variant_config(name: str) -> dict[str, Any]:
    """The full transformer config of a paper variant, e.g. ``variant_config("arcee-4-b2")``."""
    if name not in PAPER_VARIANTS:
        raise ValueError(f"Unknown variant name {name!r}; expected one of {list(PAPER_VARIANTS)}")
    preset, overrides = PAPER_VARIANTS[name]
    return preset_config(preset, **overrides)


def write_hub_configs(root: str | Path) -> list[Path]:
    """Write ``<root>/<variant>/transformer/config.json`` for every paper variant; returns the paths."""
    paths = []
    for name in PAPER_VARIANTS:
        with torch.device("meta"):  # only the config is needed: skip allocating and initialising weights
            model = ArceeZigmaTransformer(**variant_config(name))
        folder = Path(root) / name / "transformer"
        model.save_config(folder)
        paths.append(folder / "config.json")
    return paths
