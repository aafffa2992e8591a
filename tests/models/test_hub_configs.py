import json
from pathlib import Path

import pytest
import torch

from arcee_diffusers import ArceeZigmaTransformer
from arcee_diffusers.hub_templates import write_hub_configs
from arcee_diffusers.models.variants import VARIANTS_BY_NAME, get_variant

HUB_CONFIGS = Path(__file__).resolve().parents[2] / "hub_configs"


def _without_version(text: str) -> dict:
    # save_config stamps the installed diffusers version; everything else must match byte for byte
    config = json.loads(text)
    config.pop("_diffusers_version")
    return config


def test_committed_hub_configs_equal_a_fresh_generation(tmp_path):
    written = write_hub_configs(tmp_path)
    assert sorted(p.parent.parent.name for p in written) == sorted(VARIANTS_BY_NAME)
    committed_folders = {p.name for p in HUB_CONFIGS.iterdir() if (p / "transformer").is_dir()}
    assert committed_folders == set(VARIANTS_BY_NAME)
    for path in written:
        committed = HUB_CONFIGS / path.relative_to(tmp_path)
        fresh_text, committed_text = path.read_text(), committed.read_text()
        assert _without_version(fresh_text) == _without_version(committed_text), path
        fresh_lines = [line for line in fresh_text.splitlines() if "_diffusers_version" not in line]
        assert fresh_lines == [
            line for line in committed_text.splitlines() if "_diffusers_version" not in line
        ]


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
