"""hub_configs/<variant>/ are complete Hub repo templates, in step with `write_repo_template`."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from arcee_diffusers import ArceeZigmaPipeline
from arcee_diffusers.hub_templates import write_repo_template
from arcee_diffusers.models.variants import VARIANTS_BY_NAME

HUB_CONFIGS = Path(__file__).resolve().parents[2] / "hub_configs"


def _without_version(text: str) -> list[str]:
    # save_config stamps the installed diffusers version; everything else must match line for line
    return [line for line in text.splitlines() if "_diffusers_version" not in line]


@pytest.mark.parametrize("variant", ["arcee-1-b2", "zigma-4-b2", "arcee-vim-b2", "arcee-1-tiny"])
def test_committed_template_equals_a_fresh_generation(variant, tmp_path):
    committed = HUB_CONFIGS / variant
    fresh = tmp_path / variant
    shutil.copytree(committed / "transformer", fresh / "transformer", ignore=shutil.ignore_patterns("*.py"))
    written = write_repo_template(fresh, repo_id=f"your-namespace/{variant}")
    committed_files = {p.relative_to(committed) for p in committed.rglob("*") if p.is_file()}
    fresh_files = {p.relative_to(fresh) for p in fresh.rglob("*") if p.is_file()}
    assert committed_files == fresh_files and {p.relative_to(fresh) for p in written} <= fresh_files
    for relative in fresh_files:
        fresh_text, committed_text = (fresh / relative).read_text(), (committed / relative).read_text()
        assert _without_version(fresh_text) == _without_version(committed_text), relative


@pytest.mark.parametrize("variant", sorted(VARIANTS_BY_NAME))
def test_template_is_a_hub_layout_of_the_paper_setup(variant):
    folder = HUB_CONFIGS / variant
    index = json.loads((folder / "model_index.json").read_text())
    assert index["_class_name"] == ["pipeline_arcee_zigma", "ArceeZigmaPipeline"]
    assert index["vae"] == ["diffusers", "AutoencoderKL"] and index["flow_path"] == "gvp"
    scheduler = json.loads((folder / "scheduler" / "scheduler_config.json").read_text())
    assert (scheduler["path"], scheduler["solver"], scheduler["atol"], scheduler["rtol"]) == (
        "gvp",
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
