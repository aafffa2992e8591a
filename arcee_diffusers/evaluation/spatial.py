"""Where along the image a model errs, and what each output token sees.

- **Per-row denoising loss**: the flow-matching MSE of a model on a fixed set of held-out
  ``(image, noise, t)`` triples, averaged over each row of the token grid. A scan that reads the image top to
  bottom predicts the first rows from little context; Arcee's state chain hands later blocks a summary of
  the whole image, which should show up as a lower loss on the first rows.
- **Influence map**: for one output token, the norm of the gradient of its output with respect to every input
  patch. Zigma-1 is causal along its scan path (SPEC.md §7), so its map is exactly zero outside the part of
  path 0 scanned up to that token; with the state chain it is not.
"""

from __future__ import annotations

import contextlib

import numpy as np
import torch
from torch import Tensor

from ..models.scan_orders import zigzag_paths
from ..schedulers.flow_paths import FlowPath


def heldout_triples(x1: Tensor, draws_per_image: int = 4, seed: int = 0) -> dict[str, Tensor]:
    """Fixed ``(x1, noise, t)`` triples: each image ``draws_per_image`` times, with noise and ``t ~ U[0, 1)``
    drawn from a generator seeded ``seed`` (so every model is scored on the very same triples)."""
    generator = torch.Generator().manual_seed(seed)
    x1 = x1.float().repeat_interleave(draws_per_image, dim=0)
    noise = torch.randn(x1.shape, generator=generator)
    t = torch.rand(x1.shape[0], generator=generator)
    return {"x1": x1, "noise": noise, "t": t}


def token_grid_of(model: torch.nn.Module) -> tuple[int, int]:
    """``(grid, patch)``: the side of the model's token grid and its patch size."""
    patch = model.config.patch_size
    return model.config.sample_size // patch, patch


@torch.no_grad()
def per_row_denoising_loss(
    model: torch.nn.Module, triples: dict[str, Tensor], path: FlowPath, batch_size: int = 256
) -> np.ndarray:
    """Velocity MSE per row of the token grid, ``(grid,)``: averaged over channels, the patch's pixels, the
    tokens of the row and the triples. Its mean is the plain flow-matching loss on the triples."""
    grid, patch = token_grid_of(model)
    device = next(model.parameters()).device
    totals = torch.zeros(grid, dtype=torch.float64)
    for start in range(0, len(triples["t"]), batch_size):
        x1, noise, t = (triples[k][start : start + batch_size].to(device) for k in ("x1", "noise", "t"))
        prediction = model(path.interpolate(x1, noise, t), t, return_dict=False)[0]
        error = (prediction.float() - path.velocity(x1, noise, t)).square()  # (B, C, H, W)
        batch, channels = error.shape[:2]
        per_token = error.reshape(batch, channels, grid, patch, grid, patch).mean(dim=(1, 3, 5))
        totals += per_token.sum(dim=(0, 2)).double().cpu()  # (grid,): summed over samples and columns
    return (totals / (len(triples["t"]) * grid)).numpy()


def first_data_row(images: Tensor, patch: int) -> int:
    """The first row of the token grid in which ``images`` ``(N, C, H, W)`` differ. The rows above it hold
    only padding, the same pixels in every image (Fashion-MNIST padded to 32 px: row 1 with patch 2); 0 when
    none do."""
    differs = (images != images[:1]).any(dim=(0, 1, 3))  # (H,): pixel rows not identical across images
    return int(differs.nonzero()[0, 0]) // patch if differs.any() else 0


@contextlib.contextmanager
def state_chain_set(model: torch.nn.Module, enabled: bool):
    """Run ``model`` with its state chain on or off (same weights), e.g. Arcee with the chain cut at test
    time; restores the configured value on exit."""
    configured = model.config.state_chain
    model.register_to_config(state_chain=enabled)
    try:
        yield model
    finally:
        model.register_to_config(state_chain=configured)


def middle_token_of_path(grid: int, path_index: int = 0) -> tuple[int, np.ndarray]:
    """The token halfway along zigzag path ``path_index`` (row-major index), and the ``(grid, grid)`` mask of
    the tokens that path scans up to and including it."""
    path = zigzag_paths(grid)[path_index]
    step = len(path) // 2
    scanned = np.zeros(grid * grid, dtype=bool)
    scanned[path[: step + 1].numpy()] = True
    return int(path[step]), scanned.reshape(grid, grid)


def influence_map(
    model: torch.nn.Module, x: Tensor, t: Tensor, token: int, class_labels: Tensor | None = None
) -> np.ndarray:
    """``(grid, grid)``: for output token ``token`` (row-major), the Frobenius norm of the Jacobian of its
    output (channels × patch pixels) with respect to each input patch, root-mean-square over the batch
    ``x`` ``(B, C, H, W)`` at times ``t`` ``(B,)``."""
    grid, patch = token_grid_of(model)
    row, col = divmod(token, grid)
    x = x.detach().float().requires_grad_(True)
    output = model(x, t, class_labels=class_labels, return_dict=False)[0]
    patch_out = output[:, :, row * patch : (row + 1) * patch, col * patch : (col + 1) * patch]
    patch_out = patch_out.reshape(x.shape[0], -1)  # (B, C * p * p); samples are independent of each other
    squares = torch.zeros_like(x)
    for k in range(patch_out.shape[1]):
        (grad,) = torch.autograd.grad(patch_out[:, k].sum(), x, retain_graph=k < patch_out.shape[1] - 1)
        squares += grad.square()
    batch, channels = x.shape[:2]
    per_patch = squares.reshape(batch, channels, grid, patch, grid, patch).sum(dim=(1, 3, 5)).mean(0)
    return per_patch.sqrt().detach().cpu().numpy()
