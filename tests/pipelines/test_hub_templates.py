"""hub_configs/<variant>/: one complete Hub repo template per entry of the variant table, in step with
`write_hub_configs` and `write_repo_template`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch

from arcee_diffusers import ArceeZigmaPipeline, ArceeZigmaTransformer
from arcee_diffusers.hub_templates import write_hub_configs, write_repo_template
from arcee_diffusers.models.variants import VARIANTS_BY_NAME, get_variant

HUB_CONFIGS = Path(__file__).resolve().parents[2] / "hub_configs"


def _without_version(text: str) -> list[str]:
    # save_config stamps the installed diffusers version; everything else must match line for line
    return [line for line in text.splitlines() if "_diffusers_version" not in line]


@pytest.mark.parametrize(
    "variant", ["arcee-1-b2", "zigma-4-b2", "arcee-vim-b2", "arcee-1-tiny", "zigma-8-faceshq1024"]
)
def test_committed_template_equals_a_fresh_generation(variant, tmp_path):
    committed = HUB_CONFIGS / variant
    fresh = tmp_path / variant
    shutil.copytree(committed / "transformer", fresh / "transformer", ignore=shutil.ignore_patterns("*.py"))
    written = write_repo_template(fresh, repo_id=f"your-namespace/{variant}", variant=variant)
    committed_files = {p.relative_to(committed) for p in committed.rglob("*") if p.is_file()}
    fresh_files = {p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file()}
    assert committed_files == fresh_files and {p.relative_to(fresh) for p in written} <= fresh_files
    for relative in fresh_files:
        fresh_text, committed_text = (fresh / relative).read_text(), (committed / relative).read_text()
        assert _without_version(fresh_text) == _without_version(committed_text), relative


def test_template_takes_the_flow_path_from_the_variant_not_the_folder_name(tmp_path):
    committed = HUB_CONFIGS / "zigma-8-churches256" / "transformer"
    for name, variant, flow_path in [
        ("renamed", "zigma-8-churches256", "linear"),
        ("zigma-8-churches256", None, "gvp"),
    ]:
        shutil.copytree(committed, tmp_path / name / "transformer")
        write_repo_template(tmp_path / name, repo_id="your-namespace/churches", variant=variant)
        scheduler = json.loads((tmp_path / name / "scheduler" / "scheduler_config.json").read_text())
        assert scheduler["path"] == flow_path, name
    with pytest.raises(ValueError, match="variant='zigma-8-b2' does not match .*patch_size"):
        write_repo_template(tmp_path / "renamed", repo_id="your-namespace/churches", variant="zigma-8-b2")


@pytest.mark.parametrize("variant", sorted(VARIANTS_BY_NAME))
def test_template_is_a_hub_layout_of_the_paper_setup(variant):
    folder = HUB_CONFIGS / variant
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_arcee_zigma", "ArceeZigmaPipeline"]
    flow_path = get_variant(variant).flow_path  # the paper's GVP; linear for ZigMa's released weights
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["flow_path"] == flow_path
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["path"], scheduler["solver"], scheduler["atol"], scheduler["rtol"]) == (
        flow_path,
        "dopri5",
        1e-6,
        1e-3,
    )
    assert json.loads((folder / "vae" / "config.json").read_text())["scaling_factor"] == 0.18215
    readme = (folder / "README.md").read_text()
    assert readme.startswith("---\n") and "library_name: diffusers" in readme
    assert f'from_pretrained("your-namespace/{variant}")' in readme
    native = ArceeZigmaPipeline.load_config(folder)
    assert native["_class_name"] == "ArceeZigmaPipeline"
    assert native["transformer"] == [
        "arcee_diffusers.models.arcee_zigma_transformer",
        "ArceeZigmaTransformer",
    ]


def test_committed_hub_configs_equal_a_fresh_generation(tmp_path):
    written = write_hub_configs(tmp_path)
    assert sorted(p.parent.parent.name for p in written) == sorted(VARIANTS_BY_NAME)
    committed_folders = {p.name for p in HUB_CONFIGS.iterdir() if (p / "transformer").is_dir()}
    assert committed_folders == set(VARIANTS_BY_NAME)
    for path in written:
        committed = HUB_CONFIGS / path.relative_to(tmp_path)
        fresh_text, committed_text = path.read_text(), committed.read_text()
        assert _without_version(fresh_text) == _without_version(committed_text), path


@pytest.mark.parametrize("name", list(VARIANTS_BY_NAME))
def test_hub_config_loads_into_the_variant(name):
    config = ArceeZigmaTransformer.load_config(HUB_CONFIGS / name / "transformer")
    with torch.device("meta"):
        model = ArceeZigmaTransformer.from_config(config)
    for key, value in get_variant(name).config.items():
        assert model.config[key] == value, key
    is_arcee = name.startswith("arcee")
    assert model.config.state_chain == is_arcee


def test_paper_variants_cover_the_table():
    zigzag = {
        (c["num_scan_orders"], c["state_chain"])
        for c in (get_variant(name).config for name in VARIANTS_BY_NAME)
        if c.get("scan_pattern", "zigzag") == "zigzag" and c["hidden_size"] == 768
    }
    assert zigzag == {(k, chain) for k in (1, 2, 4, 8) for chain in (False, True)}
    with pytest.raises(ValueError, match="variant"):
        get_variant("arcee-3-b2")
