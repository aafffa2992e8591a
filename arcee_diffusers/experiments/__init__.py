"""Experiments built on the library: the paper's Table 2 at small scale (``rows``: its rows, pairs and tiers;
``table2``: the grid; ``cell``: one (row, seed) run and its measurements; ``report``: results.json,
results.md, plots).

Run it with ``python train_scripts/reproduce_table2.py`` (see docs/reproduction.md).
"""

from .rows import PAIRS, PAPER_FID_KID, ROWS, row_settings
from .table2 import CellsFailed, parse_grid_args, run_grid

__all__ = ["PAIRS", "PAPER_FID_KID", "ROWS", "CellsFailed", "parse_grid_args", "row_settings", "run_grid"]
