"""Tiny random-weight ArceeZigmaPipelines for fast CPU tests (shared by the pipeline and Hub tests)."""

from __future__ import annotations

import torch
from diffusers import AutoencoderKL

from arcee_diffusers import ArceeZigmaPipeline, ArceeZigmaTransformer, FlowMatchGVPScheduler

NUM_CLASSES = 5


def tiny_transformer(
    num_classes: int | None = None, in_channels: int = 3, seed: int = 0
) -> ArceeZigmaTransformer:
    torch.manual_seed(seed)
    model = ArceeZigmaTransformer.from_preset(
        "Tiny/2",
        sample_size=8,
        in_channels=in_channels,
        out_channels=in_channels,
        num_layers=2,
        hidden_size=32,
        d_state=4,
        num_classes=num_classes,
    )
    # the zero-initialised head and adaLN gates make an untrained model output exactly 0: perturb every weight
    generator = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.05 * torch.randn(parameter.shape, generator=generator))
    return model.eval()


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(
        block_out_channels=(8, 16),
        down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2,
        latent_channels=4,
        norm_num_groups=8,
        layers_per_block=1,
        sample_size=16,
    ).eval()


def make_pipeline(num_classes=None, scheduler=None, vae=None, in_channels=3, **kwargs) -> ArceeZigmaPipeline:
    pipe = ArceeZigmaPipeline(
        tiny_transformer(num_classes, in_channels), scheduler or FlowMatchGVPScheduler(), vae=vae, **kwargs
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)
