"""Tiny random pipelines for the demo tests (imported as ``demo_testing``; pytest puts this folder on
sys.path), and the Zigma-1 / Arcee-1 facts their influence maps must show."""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "pipelines"))
from tiny_pipelines import tiny_transformer  # noqa: E402

from arcee_diffusers import ArceeZigmaPipeline, FlowMatchGVPScheduler  # noqa: E402

NUM_CLASSES = 3
GRID = 4  # tiny_transformer: 8 x 8 pixels, patch 2


def tiny_pipeline(state_chain: bool = True, num_classes: int | None = NUM_CLASSES) -> ArceeZigmaPipeline:
    """Arcee-1 or (``state_chain=False``) Zigma-1 with the same weights; one grey channel, 4 x 4 tokens."""
    transformer = tiny_transformer(num_classes, in_channels=1, state_chain=state_chain)
    pipe = ArceeZigmaPipeline(transformer, FlowMatchGVPScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def path_split(record: dict, key: str) -> tuple[np.ndarray, np.ndarray]:
    """The values of map ``key`` of an influence record on the first block's path up to and including the
    clicked token, and past it."""
    values = np.array(record[key]).reshape(-1)
    path = np.array(record["first_block_path"])
    step = record["token"]["step"]
    assert path[step] == record["token"]["index"]
    return values[path[: step + 1]], values[path[step + 1 :]]


def check_zigma_1_is_blind_past_the_token(record: dict, key: str = "map") -> None:
    seen, unseen = path_split(record, key)
    assert unseen.size > 0 and np.all(unseen == 0), unseen
    assert np.all(seen > 0), seen


def check_arcee_1_sees_past_the_token(record: dict) -> None:
    _, unseen = path_split(record, "map")
    assert unseen.size > 0 and np.all(unseen > 0), unseen
    check_zigma_1_is_blind_past_the_token(record, "map_chain_cut")  # cut at test time: Zigma-1's causality
