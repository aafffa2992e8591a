"""Hub repo templates of the variant table: ``hub_configs/<variant>/``, every file of a Hub repo but the
weights (``python hub_configs/generate.py`` writes them; a test keeps the committed ones in step)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from diffusers import AutoencoderKL

from .models import VARIANTS, ArceeZigmaTransformer
from .models.variants import SD_VAE_CONFIG, SD_VAE_NAME, ZIGMA_HUB_REPO, ZIGMA_PAPER, get_variant
from .pipelines import ArceeZigmaPipeline
from .pipelines.folder_layout import write_reexport_layout
from .pipelines.model_card import ARCEE_PAPER, model_card
from .schedulers import PAPER_SOLVER, FlowMatchGVPScheduler


def write_hub_configs(root: str | os.PathLike) -> list[Path]:
    """Write ``<root>/<variant>/transformer/config.json`` for every variant; returns the paths."""
    paths = []
    for variant in VARIANTS:
        with torch.device("meta"):  # only the config is needed: skip allocating and initialising weights
            model = ArceeZigmaTransformer(**variant.config)
        folder = Path(root) / variant.name / "transformer"
        model.save_config(folder)
        paths.append(folder / "config.json")
    return paths


def write_repo_template(folder: str | os.PathLike, repo_id: str, variant: str | None = None) -> list[Path]:
    """Complete `folder` (which holds `transformer/config.json`) into a Hub repo template, weights aside.

    Writes `model_index.json` and the re-export files, `scheduler/scheduler_config.json` (the paper's
    sampler: dopri5, atol 1e-6, rtol 1e-3), `vae/config.json` (sd-vae-ft-ema) for latent models, and a
    README.md model card. `variant` names the entry of the variant table the folder holds; it sets the flow
    path (linear for ZigMa's released models) and the card's source, and the folder's config must match it.
    Without it the template is the paper's setup: the GVP path. `ArceeZigmaPipeline.push_to_hub`
    regenerates all of these files, with the weights. Returns the written paths.
    """
    folder = Path(folder)
    config = ArceeZigmaTransformer.load_config(folder / "transformer")
    flow_path, source, paper = "gvp", None, ARCEE_PAPER
    if variant is not None:
        entry = get_variant(variant)
        mismatched = sorted(key for key, value in entry.config.items() if config.get(key) != value)
        if mismatched:
            raise ValueError(
                f"variant={variant!r} does not match {folder / 'transformer'}: it differs in {mismatched}"
            )
        flow_path = entry.flow_path
        if entry.zigma_checkpoint:
            paper = ZIGMA_PAPER
            source = (
                f"Weights: `{entry.zigma_checkpoint}` of ZigMa's release (Hub repo `{ZIGMA_HUB_REPO}`, "
                "Apache-2.0), converted with `scripts/convert_zigma_checkpoint.py`."
            )
    with torch.device("meta"):  # configs and parameter counts only: no weights are allocated
        transformer = ArceeZigmaTransformer.from_config(config)
        vae = AutoencoderKL(**SD_VAE_CONFIG) if config["in_channels"] == 4 else None
    scheduler = FlowMatchGVPScheduler(path=flow_path, **PAPER_SOLVER)
    pipe = ArceeZigmaPipeline(transformer, scheduler, vae=vae)

    pipe.save_config(folder)
    scheduler.save_config(folder / "scheduler")
    written = [folder / "model_index.json", folder / "scheduler" / "scheduler_config.json"]
    if vae is not None:
        vae.save_config(folder / "vae")
        written.append(folder / "vae" / "config.json")
    write_reexport_layout(folder)
    written += sorted(folder.glob("*.py")) + sorted(folder.glob("*/*.py"))
    card = model_card(
        pipe,
        repo_id,
        vae_name=SD_VAE_NAME if vae is not None else None,
        tags=["template"],
        source=source,
        paper=paper,
    )
    card.save(folder / "README.md")
    written.append(folder / "README.md")
    return written
