"""The Table 2 grid's rows, pairs and token tiers: what both the grid (``table2``) and its report need.

The rows are the variant table's (``arcee_diffusers.models.variants``): their names, scan layouts and the
paper's published FID and KID×10³ come from there.
"""

from __future__ import annotations

from ..models.variants import LAYOUT_KEYS, TABLE2_VARIANTS, layout_of

ROWS: tuple[str, ...] = tuple(variant.row for variant in TABLE2_VARIANTS)
# (baseline, Arcee) pairs: the same scan layout with the state chain off and on
PAIRS: tuple[tuple[str, str], ...] = tuple(zip(ROWS[::2], ROWS[1::2]))
# the published Table 2 (CelebA-HQ 256, 50k steps): FID, KID×10³
PAPER_FID_KID: dict[str, tuple[float, float]] = {v.row: v.paper_fid_kid for v in TABLE2_VARIANTS}
TIER_GRIDS = {"64": 8, "256": 16}  # tier name (tokens) -> side of the token grid
_LAYOUTS = {variant.row: dict(zip(LAYOUT_KEYS, layout_of(variant.config))) for variant in TABLE2_VARIANTS}


def row_settings(row: str) -> dict:
    """What distinguishes ``row``: its scan pattern, number of zigzag paths and state chain."""
    if row not in _LAYOUTS:
        raise ValueError(f"rows: unknown row {row!r}; expected some of {' '.join(ROWS)}")
    return dict(_LAYOUTS[row])
