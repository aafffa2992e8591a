"""Input embedders of the Arcee/ZigMa backbone: patches, 2-D sin-cos positions, flow time, class labels."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def get_1d_sincos_embed(embed_dim: int, positions: Tensor, base: float) -> Tensor:
    """``[sin(pos * w), cos(pos * w)]``, ``w_k = base^(-2k / embed_dim)``: ``(len(positions), embed_dim)``."""
    exponents = torch.arange(embed_dim // 2, dtype=torch.float64) / (embed_dim / 2)
    angles = positions.double()[:, None] * base ** (-exponents)[None]
    return torch.cat([angles.sin(), angles.cos()], dim=1)


def get_2d_sincos_pos_embed(embed_dim: int, grid_size: int, base: float = 1000.0) -> Tensor:
    """MAE-layout 2-D sin-cos table of a ``grid_size``-square grid: ``(grid_size**2, embed_dim)``, row-major.

    The first half of the channels encodes the column, the second half the row. The published Arcee code uses
    frequency base 1000 (MAE and DiT use 10000), hence the default.
    """
    if embed_dim % 4 != 0:
        raise ValueError(f"embed_dim must be divisible by 4 for a 2-D sin-cos embedding, got {embed_dim}")
    rows, cols = torch.meshgrid(torch.arange(grid_size), torch.arange(grid_size), indexing="ij")
    column_embed = get_1d_sincos_embed(embed_dim // 2, cols.reshape(-1), base)
    row_embed = get_1d_sincos_embed(embed_dim // 2, rows.reshape(-1), base)
    return torch.cat([column_embed, row_embed], dim=1).float()


# the position tables a model can add to its patch tokens: 2-D sin-cos initialised, zero initialised (both
# learnable), or none
POSITION_EMBEDDINGS = ("sincos", "learned", "none")


def position_table(kind: str, grid_size: int, hidden_size: int) -> nn.Parameter | None:
    """The ``(1, grid_size**2, hidden_size)`` position table of ``kind`` (see ``POSITION_EMBEDDINGS``), still
    to be filled by ``init_position_table``; None for ``"none"``."""
    return None if kind == "none" else nn.Parameter(torch.zeros(1, grid_size**2, hidden_size))


@torch.no_grad()
def init_position_table(table: nn.Parameter | None, kind: str, grid_size: int) -> None:
    """Fill ``table``: 2-D sin-cos for ``"sincos"``, zeros for ``"learned"`` (ZigMa's ``use_pe: 2``)."""
    if table is None:
        return
    if kind == "sincos":
        table.copy_(get_2d_sincos_pos_embed(table.shape[-1], grid_size).unsqueeze(0))
    else:
        nn.init.zeros_(table)


class PatchEmbed(nn.Module):
    """Non-overlapping patches to tokens: ``(B, C, H, W) -> (B, H/p * W/p, hidden_size)``, row-major."""

    def __init__(self, patch_size: int, in_channels: int, hidden_size: int):
        super().__init__()
        self.patch_size = patch_size
        self.proj = nn.Conv2d(in_channels, hidden_size, kernel_size=patch_size, stride=patch_size)

    @torch.no_grad()
    def reset_parameters(self) -> None:
        """Xavier-uniform on the flattened kernel (as a Linear layer would be); the bias keeps PyTorch's
        default, U(+-1/sqrt(in_channels * patch**2)), as in the published code."""
        self.proj.reset_parameters()
        nn.init.xavier_uniform_(self.proj.weight.view(self.proj.weight.shape[0], -1))

    def forward(self, images: Tensor) -> Tensor:
        return self.proj(images).flatten(2).transpose(1, 2)


class TimestepEmbedder(nn.Module):
    """DiT's timestep embedder: sinusoidal features of the raw flow time ``t`` then Linear-SiLU-Linear."""

    def __init__(self, hidden_size: int, frequency_embedding_size: int = 256, max_period: float = 10000.0):
        super().__init__()
        self.frequency_embedding_size = frequency_embedding_size
        self.max_period = max_period
        self.mlp = nn.Sequential(
            nn.Linear(frequency_embedding_size, hidden_size),
            nn.SiLU(),
            nn.Linear(hidden_size, hidden_size),
        )

    def timestep_features(self, timestep: Tensor) -> Tensor:
        half = self.frequency_embedding_size // 2
        freqs = torch.exp(
            -math.log(self.max_period)
            * torch.arange(half, dtype=torch.float32, device=timestep.device)
            / half
        )
        angles = timestep.float()[:, None] * freqs[None]
        return torch.cat([angles.sin(), angles.cos()], dim=-1)

    def forward(self, timestep: Tensor, dtype: torch.dtype) -> Tensor:
        """``(B,)`` flow times -> ``(B, hidden_size)``; ``dtype`` is the compute dtype of the MLP."""
        return self.mlp(self.timestep_features(timestep).to(dtype))


class LabelEmbedder(nn.Module):
    """Class-label embedding table with a null row for classifier-free guidance.

    Conditional (``num_classes`` set): ``num_classes + 1`` rows; row ``num_classes`` is the null label, used
    for dropped labels in training and for the unconditional branch of CFG. It is always there, whatever
    ``dropout_prob``, so any conditional model can be sampled with guidance. Unconditional
    (``num_classes=None``): a single learned row shared by every sample.
    """

    def __init__(self, num_classes: int | None, hidden_size: int, dropout_prob: float = 0.0):
        super().__init__()
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        num_rows = 1 if num_classes is None else num_classes + 1
        self.embedding_table = nn.Embedding(num_rows, hidden_size)

    @property
    def null_label(self) -> int | None:
        return self.num_classes

    def drop_labels(self, labels: Tensor) -> Tensor:
        dropped = torch.rand(labels.shape[0], device=labels.device) < self.dropout_prob
        return torch.where(dropped, torch.full_like(labels, self.num_classes), labels)

    def forward(self, labels: Tensor | None, batch_size: int) -> Tensor:
        if self.num_classes is None:
            if labels is not None:
                raise ValueError("class_labels must be None for an unconditional model (num_classes=None)")
            return self.embedding_table.weight[:1].expand(batch_size, -1)
        if labels is None:
            labels = torch.full((batch_size,), self.num_classes, device=self.embedding_table.weight.device)
        elif labels.shape != (batch_size,):
            raise ValueError(f"class_labels must have shape ({batch_size},), got {tuple(labels.shape)}")
        if self.training and self.dropout_prob > 0:
            labels = self.drop_labels(labels)
        return F.embedding(labels.long(), self.embedding_table.weight)
