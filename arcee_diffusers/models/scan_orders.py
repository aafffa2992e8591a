"""Token scan orders over a patch grid: ZigMa's eight zigzag paths and Vision Mamba's row-major order.

A path is a 1-D long tensor ``path`` of length ``height * width`` where ``path[i]`` is the row-major index
of the token visited at step ``i``. Gathering ``tokens[:, path]`` puts a row-major sequence in scan order
and gathering with :func:`inverse_permutation` puts it back.
"""

from __future__ import annotations

import torch
from torch import Tensor

SCAN_PATTERNS = ("zigzag", "bidirectional")
ZIGZAG_SCAN_ORDER_COUNTS = (1, 2, 4, 8)


def _row_snake(grid: Tensor) -> Tensor:
    rows = [row if i % 2 == 0 else row.flip(0) for i, row in enumerate(grid.unbind(0))]
    return torch.cat(rows)


def zigzag_paths(height: int, width: int | None = None) -> Tensor:
    """The eight boustrophedon paths of a ``height x width`` grid, as a ``(8, height * width)`` long tensor.

    Order: for each start corner (top-left, top-right, bottom-left, bottom-right) the row-snake, then the
    column-snake. For a 4 x 4 grid path 0 is ``0 1 2 3 7 6 5 4 8 9 10 11 15 14 13 12`` and path 1 is
    ``0 4 8 12 13 9 5 1 2 6 10 14 15 11 7 3``.
    """
    width = height if width is None else width
    if height < 1 or width < 1:
        raise ValueError(f"zigzag_paths: the grid must be at least 1 x 1, got {height} x {width}")
    grid = torch.arange(height * width).reshape(height, width)
    paths = []
    # Starting from another corner is the same snake over the grid mirrored so that corner is top-left.
    for flip_dims in ((), (1,), (0,), (0, 1)):
        corner_grid = grid.flip(flip_dims) if flip_dims else grid
        paths.append(_row_snake(corner_grid))
        paths.append(_row_snake(corner_grid.t()))
    return torch.stack(paths)


def inverse_permutation(path: Tensor) -> Tensor:
    """``inverse[path[i]] = i``: the gather that undoes ``tokens[:, path]``."""
    inverse = torch.empty_like(path)
    inverse[path] = torch.arange(path.numel(), device=path.device)
    return inverse


def layer_scan_path(paths: Tensor | None, layer_index: int, num_scan_orders: int) -> Tensor | None:
    """Path of layer ``layer_index``: ``paths[layer_index % num_scan_orders]`` (None means row-major)."""
    if paths is None:
        return None
    return paths[layer_index % num_scan_orders]


def validate_scan_config(scan_pattern: str, num_scan_orders: int) -> None:
    if scan_pattern not in SCAN_PATTERNS:
        raise ValueError(f"scan_pattern must be one of {SCAN_PATTERNS}, got {scan_pattern!r}")
    if num_scan_orders not in ZIGZAG_SCAN_ORDER_COUNTS:
        raise ValueError(
            f"num_scan_orders must be one of {ZIGZAG_SCAN_ORDER_COUNTS}, got {num_scan_orders!r}"
        )
    if scan_pattern == "bidirectional" and num_scan_orders != 1:
        raise ValueError(
            f"num_scan_orders must be 1 with scan_pattern='bidirectional' (Vision Mamba scans row-major "
            f"both ways), got {num_scan_orders}"
        )
