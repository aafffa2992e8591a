"""The paper recipe's EMA and time draws, and which recipe train_fm.py gives each kind of run."""

from __future__ import annotations

import pytest
import torch

from arcee_diffusers.training import flow_matching
from arcee_diffusers.training.ema import create_ema


def ema_after(schedule: str, values: list[float], decay: float = 0.9) -> float:
    """The EMA of a scalar parameter that starts at ``values[0]`` and is set to each of ``values[1:]``."""
    param = torch.nn.Parameter(torch.tensor([values[0]]))
    ema = create_ema([param], decay, schedule)
    for value in values[1:]:
        param.data.fill_(value)
        ema.step([param])
    return ema.shadow_params[0].item()


def test_constant_ema_uses_the_decay_from_the_first_update():
    # the published update: ema = d * ema + (1 - d) * params after every step, ema starting at the init
    values, decay = [1.0, 2.0, 5.0, -3.0], 0.9
    expected = values[0]
    for value in values[1:]:
        expected = decay * expected + (1 - decay) * value
    assert ema_after("constant", values, decay) == pytest.approx(expected, rel=1e-6)


def test_ramp_ema_is_diffusers_default():
    # diffusers copies on the first update, then ramps the decay as (1 + s) / (10 + s)
    assert ema_after("ramp", [1.0, 2.0]) == pytest.approx(2.0)
    assert ema_after("ramp", [1.0, 2.0, 5.0]) == pytest.approx(2 / 11 * 2.0 + 9 / 11 * 5.0)


def test_constant_ema_survives_a_state_dict_round_trip():
    param = torch.nn.Parameter(torch.zeros(1))
    ema = create_ema([param], 0.9999, "constant")
    restored = create_ema([param], 0.9999, "ramp")
    restored.load_state_dict(ema.state_dict())
    assert restored.get_decay(1) == restored.get_decay(10**6) == 0.9999


def test_bad_ema_settings_are_named():
    param = torch.nn.Parameter(torch.zeros(1))
    with pytest.raises(ValueError, match="ema_schedule must be one of"):
        create_ema([param], 0.99, "cosine")
    with pytest.raises(ValueError, match=r"ema_decay must be in \[0, 1\]"):
        create_ema([param], 1.5)


def test_uniform_times_are_the_published_draw():
    # t = torch.rand(batch) from the CPU generator: U[0, 1), not the (0, 1] of 1 - u
    generator = torch.Generator().manual_seed(0)
    t = flow_matching.sample_flow_times(4096, "uniform", generator=generator)
    assert torch.equal(t, torch.rand(4096, generator=torch.Generator().manual_seed(0)))
    assert t.min() >= 0 and t.max() < 1


def test_paper_and_digits_recipes(train_fm, tmp_path):
    paper = train_fm.parse_args(["--output_dir", str(tmp_path), "--train_data_dir", str(tmp_path)])
    assert (paper.ema_decay, paper.ema_schedule, paper.weighting_scheme) == (0.9999, "constant", "uniform")
    assert paper.dataloader_drop_last
    digits = train_fm.parse_args(["--output_dir", str(tmp_path)])
    assert (digits.ema_schedule, digits.dataloader_drop_last) == ("ramp", False)
    chosen = train_fm.parse_args(["--output_dir", str(tmp_path), "--ema_schedule", "constant"])
    assert chosen.ema_schedule == "constant"
