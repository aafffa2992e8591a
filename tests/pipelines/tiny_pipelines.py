"""Tiny random-weight ArceeZigmaPipelines for fast CPU tests, and the check that a saved folder loads with
plain diffusers (shared by the pipeline, Hub, conversion and training tests)."""

from __future__ import annotations

import numpy as np
import torch
from diffusers import AutoencoderKL, DiffusionPipeline

from arcee_diffusers import ArceeZigmaPipeline, ArceeZigmaTransformer, FlowMatchGVPScheduler

NUM_CLASSES = 5


def tiny_transformer(
    num_classes: int | None = None, in_channels: int = 3, seed: int = 0, state_chain: bool = True
) -> ArceeZigmaTransformer:
    """Arcee-1 (or, with ``state_chain=False``, Zigma-1 with the very same weights) on a 4 x 4 token grid."""
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
        state_chain=state_chain,
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


def check_plain_diffusers_load(folder, **call_kwargs) -> None:
    """`DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)` gives our classes and the same
    images as `ArceeZigmaPipeline.from_pretrained(folder)`, for the same call (`call_kwargs`) and seed."""
    ours = ArceeZigmaPipeline.from_pretrained(folder)
    plain = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(plain) is ArceeZigmaPipeline
    assert {name: type(c) for name, c in plain.components.items()} == {
        name: type(c) for name, c in ours.components.items()
    }
    images = []
    for pipe in (ours, plain):
        pipe.set_progress_bar_config(disable=True)
        images.append(pipe(**call_kwargs, generator=seeded(0), output_type="np").images)
    assert np.isfinite(images[0]).all()
    # bit-equal weights; BLAS results can still move by an ulp with the loaded tensors' memory alignment
    np.testing.assert_allclose(images[1], images[0], atol=1e-5, rtol=0)
