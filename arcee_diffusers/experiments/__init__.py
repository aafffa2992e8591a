"""Experiments built on the library: the paper's Table 2 at small scale (``table2``: rows, tiers, the grid;
``cell``: one (row, seed) run and its measurements; ``report``: results.json, results.md, plots).

Run it with ``python train_scripts/reproduce_table2.py`` (see docs/reproduction.md).
"""

from .table2 import PAIRS, PAPER_FID_KID, ROWS, CellsFailed, parse_grid_args, row_settings, run_grid

__all__ = ["PAIRS", "PAPER_FID_KID", "ROWS", "CellsFailed", "parse_grid_args", "row_settings", "run_grid"]
