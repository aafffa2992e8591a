"""The pictures of the demo page: sample grids, the token grid over an image and influence heat maps.

Plain numpy and PIL (a colormap lookup from matplotlib), so a request never touches matplotlib's global
figure state. Every picture of a token grid is ``grid * cell`` pixels wide, ``cell`` pixels per token, so a
click at pixel ``(x, y)`` is token ``(y // cell, x // cell)``.
"""

from __future__ import annotations

import math

import numpy as np
import torch
from PIL import Image, ImageDraw

from ..models.scan_orders import zigzag_paths

CANVAS = 384  # pixels across a token-grid picture (rounded down to a multiple of the grid)
TILE = 96  # smallest side of one sample in a grid of samples
ZERO_COLOR = (200, 200, 200)  # exact zeros, apart from the colour scale
PATH_COLOR = (0, 220, 255)
DYNAMIC_RANGE = 1e-8  # the colour scale spans [max * 1e-8, max], log-spaced: every non-zero value shows


def cell_size(grid: int) -> int:
    return max(1, CANVAS // grid)


def click_to_token(x: float, y: float, grid: int) -> tuple[int, int]:
    """The ``(row, col)`` of the token under pixel ``(x, y)`` of a token-grid picture."""
    cell = cell_size(grid)
    return min(int(y) // cell, grid - 1), min(int(x) // cell, grid - 1)


def first_block_path(config) -> np.ndarray:
    """The row-major token indices in the order the model's first block scans them: zigzag path 0, or
    row-major for Vision Mamba's forward scan."""
    grid = config.sample_size // config.patch_size
    if config.scan_pattern == "zigzag":
        return zigzag_paths(grid)[0].numpy()
    return np.arange(grid * grid)


def sample_grid(images: np.ndarray, gutter: int = 4) -> Image.Image:
    """``(B, H, W, C)`` images in [0, 1] as one picture, near-square, each sample scaled up (nearest) to at
    least ``TILE`` pixels, on a grey background."""
    count, height, width = images.shape[:3]
    scale = max(1, math.ceil(TILE / max(height, width)))
    columns = math.ceil(math.sqrt(count))
    rows = math.ceil(count / columns)
    tile_h, tile_w = height * scale, width * scale
    canvas = Image.new(
        "RGB", (columns * (tile_w + gutter) + gutter, rows * (tile_h + gutter) + gutter), "grey"
    )
    for index, image in enumerate(images):
        tile = to_pil(image).resize((tile_w, tile_h), Image.NEAREST)
        row, col = divmod(index, columns)
        canvas.paste(tile, (gutter + col * (tile_w + gutter), gutter + row * (tile_h + gutter)))
    return canvas


def to_pil(image: np.ndarray) -> Image.Image:
    """One ``(H, W, C)`` image in [0, 1] (C = 1 or 3) as an RGB picture."""
    pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if pixels.shape[-1] == 1 else pixels).convert("RGB")


def _centre(token: int, grid: int) -> tuple[float, float]:
    row, col = divmod(int(token), grid)
    cell = cell_size(grid)
    return (col + 0.5) * cell, (row + 0.5) * cell


def _draw_path(draw: ImageDraw.ImageDraw, path: np.ndarray, grid: int, token: int | None) -> None:
    """The scan path through the token centres: thin over its whole length, thick up to ``token``, with a dot
    where it starts."""
    points = [_centre(index, grid) for index in path]
    draw.line(points, fill=PATH_COLOR, width=1)
    if token is not None:
        step = int(np.nonzero(path == token)[0][0])
        draw.line(points[: step + 1], fill=PATH_COLOR, width=3)
    x, y = points[0]
    draw.ellipse((x - 4, y - 4, x + 4, y + 4), fill=PATH_COLOR)


def _mark_token(draw: ImageDraw.ImageDraw, token: int, grid: int) -> None:
    cell = cell_size(grid)
    row, col = divmod(int(token), grid)
    box = (col * cell, row * cell, (col + 1) * cell - 1, (row + 1) * cell - 1)
    draw.rectangle(box, outline=(0, 255, 0), width=3)


def token_grid_picture(
    image: Image.Image, grid: int, path: np.ndarray, token: int | None = None
) -> Image.Image:
    """``image`` scaled to the token grid, with the grid's lines, the first block's scan path and the chosen
    token outlined."""
    cell = cell_size(grid)
    picture = image.convert("RGB").resize((grid * cell, grid * cell), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    for k in range(1, grid):
        draw.line((k * cell, 0, k * cell, grid * cell), fill=(255, 255, 255), width=1)
        draw.line((0, k * cell, grid * cell, k * cell), fill=(255, 255, 255), width=1)
    _draw_path(draw, path, grid, token)
    if token is not None:
        _mark_token(draw, token, grid)
    return picture


def log_color_range(*maps: np.ndarray) -> tuple[float, float]:
    """One colour scale for maps shown side by side: ``(low, high)`` over their non-zero values."""
    positive = np.concatenate([m[m > 0] for m in maps])
    if positive.size == 0:
        return 1.0, 1.0
    high = float(positive.max())
    return max(float(positive.min()), high * DYNAMIC_RANGE), high


def heat_map_picture(
    values: np.ndarray, color_range: tuple[float, float], path: np.ndarray, token: int
) -> Image.Image:
    """A ``(grid, grid)`` map of non-negative values as a picture: non-zero values on a log-spaced magma
    scale over ``color_range``, exact zeros in grey, the scan path and the token drawn over it."""
    import matplotlib

    grid = values.shape[0]
    low, high = np.log(color_range[0]), np.log(color_range[1])
    scaled = (np.log(np.maximum(values, color_range[0])) - low) / max(high - low, 1e-12)
    colors = (matplotlib.colormaps["magma"](np.clip(scaled, 0, 1))[..., :3] * 255).round().astype(np.uint8)
    colors[values == 0] = ZERO_COLOR
    cell = cell_size(grid)
    picture = Image.fromarray(colors).resize((grid * cell, grid * cell), Image.NEAREST)
    draw = ImageDraw.Draw(picture)
    _draw_path(draw, path, grid, token)
    _mark_token(draw, token, grid)
    return picture


def to_model_input(image: Image.Image, channels: int, side: int) -> torch.Tensor:
    """A picture as a ``(1, channels, side, side)`` tensor in [-1, 1] (grey for one channel), area-resized,
    so a sample scaled up by a whole factor for the page comes back pixel for pixel."""
    resized = image.convert("L" if channels == 1 else "RGB").resize((side, side), Image.BOX)
    pixels = np.asarray(resized, dtype=np.float32).reshape(side, side, channels)
    return torch.from_numpy(pixels / 127.5 - 1.0).permute(2, 0, 1)[None]
