"""The model tables: the size presets and the named variants, with every name a variant goes by.

A variant is a size preset (``PRESETS``) plus a scan layout (scan pattern, number of zigzag paths, state
chain). Each entry of ``VARIANTS`` carries all of its names:

- ``name``: ``ArceeZigmaTransformer.from_variant(name)`` and the Hub template ``hub_configs/<name>/``;
- ``timm_name``: ``timm.create_model(timm_name)``;
- ``display_name``: the paper's name of the layout, in model cards;
- ``row``: its row of the paper's Table 2 (``reproduce_table2.py --rows``), with the published FID and
  KID×10³ (CelebA-HQ 256, 50k steps); only the B/2 and Vim-B/2 entries have one;
- ``published_scan_type``: the ``--scan-type`` of the published Arcee code that runs this layout (the
  checkpoint converter's names);
- ``zigma_checkpoint``: the file of ZigMa's released weights (Hub repo ``taohu/zigma``) that this entry
  loads exactly (``scripts/convert_zigma_checkpoint.py``); those entries sample on the linear flow path.

Adding a variant is one entry here; the timm registry, the Hub templates, the Table 2 rows, the converter's
names and the table in docs/model.md all derive from it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

# Sizes: the published code's --model sizes (d_state 256, SD-VAE latents 4 x 32 x 32, unconditional), and
# DEMO_PRESET, ours.
DEMO_PRESET = "Tiny/2"
PRESETS: dict[str, dict[str, Any]] = {
    DEMO_PRESET: {"num_layers": 8, "hidden_size": 128, "patch_size": 2},
    "XS/2": {"num_layers": 24, "hidden_size": 448, "patch_size": 2},
    "XS/1": {"num_layers": 24, "hidden_size": 368, "patch_size": 1},
    "B/2": {"num_layers": 24, "hidden_size": 768, "patch_size": 2},
    "B/1": {"num_layers": 24, "hidden_size": 768, "patch_size": 1},
    "XB/2": {"num_layers": 24, "hidden_size": 1024, "patch_size": 2},
    "XB/1": {"num_layers": 24, "hidden_size": 1024, "patch_size": 1},
    "L/2": {"num_layers": 48, "hidden_size": 1024, "patch_size": 2},
    "L/1": {"num_layers": 48, "hidden_size": 1024, "patch_size": 1},
    "Vim-B/2": {"num_layers": 20, "hidden_size": 768, "patch_size": 2, "scan_pattern": "bidirectional"},
}
# the paper's VAE (stabilityai/sd-vae-ft-ema: the SD-VAE architecture, latents x 0.18215), for latent models
SD_VAE_NAME = "stabilityai/sd-vae-ft-ema"
SD_VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ["DownEncoderBlock2D"] * 4,
    "up_block_types": ["UpDecoderBlock2D"] * 4,
    "block_out_channels": [128, 256, 512, 512],
    "layers_per_block": 2,
    "act_fn": "silu",
    "latent_channels": 4,
    "norm_num_groups": 32,
    "sample_size": 256,
    "scaling_factor": 0.18215,
}
# ZigMa's released models (CompVis/zigma): its time scale, final norm, plain head, no label embedding,
# d_state 16 and the state chain off; each entry adds its input size and position table
ZIGMA_RELEASE: dict[str, Any] = {
    "d_state": 16,
    "num_classes": 0,
    "timestep_scale": 1000.0,
    "final_norm": True,
    "head_modulation": False,
    "num_scan_orders": 8,
    "state_chain": False,
}
ZIGMA_HUB_REPO = "taohu/zigma"
ZIGMA_PAPER = ("ZigMa", "https://arxiv.org/abs/2403.13802")  # the paper of those weights (name, link)
# the config keys that make a scan layout (the rest is size)
LAYOUT_KEYS = ("scan_pattern", "num_scan_orders", "state_chain")


@dataclass(frozen=True)
class Variant:
    """One named model: a size preset, its overrides, and every name it goes by."""

    name: str
    display_name: str
    timm_name: str
    preset: str
    overrides: dict[str, Any] = field(default_factory=dict)
    row: str | None = None
    paper_fid_kid: tuple[float, float] | None = None
    published_scan_type: str | None = None
    zigma_checkpoint: str | None = None

    @property
    def flow_path(self) -> str:
        """The flow path its weights were trained on: linear for ZigMa's, the paper's GVP otherwise."""
        return "linear" if self.zigma_checkpoint else "gvp"

    @property
    def config(self) -> dict[str, Any]:
        """The transformer config (the preset with the overrides applied)."""
        return preset_config(self.preset, **self.overrides)


def _zigzag(k: int, state_chain: bool) -> dict[str, Any]:
    return {"num_scan_orders": k, "state_chain": state_chain}


def _zigma_release(sample_size: int, position_embedding: str) -> dict[str, Any]:
    return {**ZIGMA_RELEASE, "sample_size": sample_size, "position_embedding": position_embedding}


# Table 2's rows come first, in the paper's order: (baseline, Arcee) pairs with the same scan layout.
#           name            display name    timm name                       preset     overrides               row          paper FID/KID   --scan-type
VARIANTS: tuple[Variant, ...] = (
    Variant("zigma-1-b2",   "Zigma-1",      "arcee_zigma_b_p2_k1_nochain",  "B/2",     _zigzag(1, False),      "zigma-1",   (82.81, 88.69), "Zigma_1"),
    Variant("arcee-1-b2",   "Arcee-1",      "arcee_zigma_b_p2_k1",          "B/2",     _zigzag(1, True),       "arcee-1",   (15.33, 10.59), "Arcee_1"),
    Variant("zigma-2-b2",   "Zigma-2",      "arcee_zigma_b_p2_k2_nochain",  "B/2",     _zigzag(2, False),      "zigma-2",   (15.64, 11.22), "Zigma_2"),
    Variant("arcee-2-b2",   "Arcee-2",      "arcee_zigma_b_p2_k2",          "B/2",     _zigzag(2, True),       "arcee-2",   (15.68, 11.40), "Arcee_2"),
    Variant("zigma-4-b2",   "Zigma-4",      "arcee_zigma_b_p2_k4_nochain",  "B/2",     _zigzag(4, False),      "zigma-4",   (11.27, 7.70),  "Zigma_4"),
    Variant("arcee-4-b2",   "Arcee-4",      "arcee_zigma_b_p2_k4",          "B/2",     _zigzag(4, True),       "arcee-4",   (10.86, 7.45),  "Arcee_4"),
    Variant("zigma-8-b2",   "Zigma-8",      "arcee_zigma_b_p2_k8_nochain",  "B/2",     _zigzag(8, False),      "zigma-8",   (11.19, 7.77),  "Zigma_8"),
    Variant("arcee-8-b2",   "Arcee-8",      "arcee_zigma_b_p2_k8",          "B/2",     _zigzag(8, True),       "arcee-8",   (11.75, 8.17),  "Arcee_8"),
    Variant("vim-b2",       "Vision Mamba", "arcee_zigma_vim_b_p2_nochain", "Vim-B/2", {"state_chain": False}, "vim",       (14.08, 9.76),  "V2"),
    Variant("arcee-vim-b2", "ArceeVim",     "arcee_zigma_vim_b_p2",         "Vim-B/2", {"state_chain": True},  "arcee-vim", (13.47, 9.36),  "V2RC"),
    # other sizes of Arcee-k
    Variant("arcee-1-tiny", "Arcee-1",      "arcee_zigma_tiny_p2_k1",       "Tiny/2",  _zigzag(1, True)),
    Variant("arcee-4-tiny", "Arcee-4",      "arcee_zigma_tiny_p2_k4",       "Tiny/2",  _zigzag(4, True)),
    Variant("arcee-4-xs2",  "Arcee-4",      "arcee_zigma_xs_p2_k4",         "XS/2",    _zigzag(4, True)),
    Variant("arcee-4-xs1",  "Arcee-4",      "arcee_zigma_xs_p1_k4",         "XS/1",    _zigzag(4, True)),
    Variant("arcee-4-b1",   "Arcee-4",      "arcee_zigma_b_p1_k4",          "B/1",     _zigzag(4, True)),
    Variant("arcee-4-xb2",  "Arcee-4",      "arcee_zigma_xb_p2_k4",         "XB/2",    _zigzag(4, True)),
    Variant("arcee-4-l2",   "Arcee-4",      "arcee_zigma_l_p2_k4",          "L/2",     _zigzag(4, True)),
    # ZigMa's released unconditional weights (scripts/convert_zigma_checkpoint.py)
    Variant("zigma-8-churches256",   "Zigma-8", "arcee_zigma_b_p1_k8_nochain_churches256",   "B/1",
            _zigma_release(32, "learned"), zigma_checkpoint="churches256_0280000.pt"),
    Variant("zigma-8-faceshq1024",   "Zigma-8", "arcee_zigma_b_p2_k8_nochain_faceshq1024",   "B/2",
            _zigma_release(128, "none"),   zigma_checkpoint="faceshq1024_0090000.pt"),
    Variant("zigma-8-landscape1024", "Zigma-8", "arcee_zigma_b_p2_k8_nochain_landscape1024", "B/2",
            _zigma_release(128, "none"),   zigma_checkpoint="landscape1024_0210000.pt"),
)  # fmt: skip

VARIANTS_BY_NAME: dict[str, Variant] = {variant.name: variant for variant in VARIANTS}
# the Table 2 rows in the paper's order
TABLE2_VARIANTS: tuple[Variant, ...] = tuple(variant for variant in VARIANTS if variant.row is not None)


def preset_config(name: str, **overrides: Any) -> dict[str, Any]:
    """The config of preset ``name`` (see ``PRESETS``) with ``overrides`` applied."""
    if name not in PRESETS:
        raise ValueError(f"Unknown preset name {name!r}; expected one of {list(PRESETS)}")
    return {**PRESETS[name], **overrides}


def get_variant(name: str) -> Variant:
    """The variant called ``name`` (e.g. ``"arcee-4-b2"``)."""
    if name not in VARIANTS_BY_NAME:
        raise ValueError(f"Unknown variant name {name!r}; expected one of {list(VARIANTS_BY_NAME)}")
    return VARIANTS_BY_NAME[name]


def layout_of(config: Any) -> tuple[str, int, bool]:
    """``(scan_pattern, num_scan_orders, state_chain)`` of a transformer config (a dict or a diffusers
    ``FrozenDict``; missing keys take the transformer's defaults)."""
    defaults = {"scan_pattern": "zigzag", "num_scan_orders": 1, "state_chain": True}
    return tuple(config.get(key, defaults[key]) for key in LAYOUT_KEYS)


def display_name(config: Any) -> str:
    """The paper's name of a config's scan layout ("Arcee-4", "Zigma-1", "Vision Mamba", ...), from the
    first variant with that layout."""
    layout = layout_of(config)
    for variant in VARIANTS:
        if layout_of(variant.config) == layout:
            return variant.display_name
    raise ValueError(f"no variant has the scan layout {dict(zip(LAYOUT_KEYS, layout))}")


def markdown_table() -> str:
    """The table as Markdown, for docs/model.md (a test keeps the two equal)."""
    columns = (
        "name", "display name", "timm", "preset", "depth", "width", "patch", "scan", "state chain",
        "Table 2 row", "paper FID / KID×10³", "published `--scan-type`", "ZigMa weights",
    )  # fmt: skip
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for variant in VARIANTS:
        config = variant.config
        scan_pattern, num_scan_orders, state_chain = layout_of(config)
        scan = f"zigzag, k = {num_scan_orders}" if scan_pattern == "zigzag" else scan_pattern
        cells = (
            f"`{variant.name}`",
            variant.display_name,
            f"`{variant.timm_name}`",
            f"`{variant.preset}`",
            config["num_layers"],
            config["hidden_size"],
            config["patch_size"],
            scan,
            "on" if state_chain else "off",
            f"`{variant.row}`" if variant.row else "",
            "{:.2f} / {:.2f}".format(*variant.paper_fid_kid) if variant.paper_fid_kid else "",
            f"`{variant.published_scan_type}`" if variant.published_scan_type else "",
            f"`{variant.zigma_checkpoint}`" if variant.zigma_checkpoint else "",
        )
        lines.append("| " + " | ".join(map(str, cells)) + " |")
    return "\n".join(lines) + "\n"
