"""Per-row denoising loss on fixed triples, the chain cut at test time, and the influence map of one token."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from arcee_diffusers.evaluation import spatial
from arcee_diffusers.models import ArceeZigmaTransformer
from arcee_diffusers.schedulers.flow_paths import get_flow_path
from arcee_diffusers.training.flow_matching import flow_matching_loss


def random_model(state_chain, scan_pattern="zigzag", patch_size=1):
    torch.manual_seed(0)
    model = ArceeZigmaTransformer(
        sample_size=8, patch_size=patch_size, in_channels=2, out_channels=2, num_layers=3, hidden_size=16,
        d_state=4, scan_pattern=scan_pattern, state_chain=state_chain,
    )  # fmt: skip
    with torch.no_grad():  # the zero-initialised gates and head would make every output and gradient zero
        for p in model.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return model.eval()


def test_heldout_triples_are_fixed_by_the_seed():
    x1 = torch.randn(3, 2, 8, 8)
    a, b = spatial.heldout_triples(x1, 2, seed=5), spatial.heldout_triples(x1, 2, seed=5)
    assert all(torch.equal(a[k], b[k]) for k in a) and a["x1"].shape == (6, 2, 8, 8)
    assert torch.equal(a["x1"][1], x1[0]) and not torch.equal(a["noise"][0], a["noise"][1])
    assert not torch.equal(a["t"], spatial.heldout_triples(x1, 2, seed=6)["t"])


@pytest.mark.parametrize("patch_size", [1, 2])
def test_per_row_loss_averages_to_the_flow_matching_loss(patch_size):
    model, path = random_model(True, patch_size=patch_size), get_flow_path("gvp")
    triples = spatial.heldout_triples(torch.randn(5, 2, 8, 8), 2)
    rows = spatial.per_row_denoising_loss(model, triples, path, batch_size=4)
    assert rows.shape == (8 // patch_size,) and np.all(rows > 0)
    with torch.no_grad():
        loss = flow_matching_loss(model, triples["x1"], triples["t"], path, noise=triples["noise"])
    assert rows.mean() == pytest.approx(loss.item(), rel=1e-5)
    # the first grid row alone, computed by hand
    with torch.no_grad():
        x1, noise, t = triples["x1"], triples["noise"], triples["t"]
        error = model(path.interpolate(x1, noise, t), t).sample - path.velocity(x1, noise, t)
    assert rows[0] == pytest.approx(error[:, :, :patch_size].square().mean().item(), rel=1e-5)


@pytest.mark.parametrize(
    ("pad", "patch", "expected"), [(0, 2, 0), (2, 2, 1), (3, 2, 1), (4, 2, 2), (2, 1, 2)]
)
def test_first_data_row_skips_the_padding_rows(pad, patch, expected):
    images = torch.nn.functional.pad(torch.rand(4, 1, 8, 8), (pad, pad, pad, pad), value=-1.0)
    assert spatial.first_data_row(images, patch) == expected
    assert spatial.first_data_row(torch.zeros(3, 1, 8, 8), patch) == 0  # identical images: no padding known


def test_state_chain_cut_at_test_time_changes_the_output_and_is_restored():
    model, path = random_model(True), get_flow_path("gvp")
    triples = spatial.heldout_triples(torch.randn(2, 2, 8, 8), 1)
    chained = spatial.per_row_denoising_loss(model, triples, path)
    with spatial.state_chain_set(model, False):
        assert model.config.state_chain is False
        cut = spatial.per_row_denoising_loss(model, triples, path)
    assert model.config.state_chain is True
    assert not np.allclose(chained, cut)
    np.testing.assert_array_equal(spatial.per_row_denoising_loss(model, triples, path), chained)
    baseline = random_model(False)  # same seed, same weights: cutting the chain gives the baseline
    np.testing.assert_allclose(spatial.per_row_denoising_loss(baseline, triples, path), cut, rtol=1e-6)


def test_middle_token_of_path_0():
    token, scanned = spatial.middle_token_of_path(4)
    # path 0 for a 4x4 grid: 0 1 2 3 7 6 5 4 | 8 ...; step 8 is token 8
    assert token == 8 and scanned.sum() == 9
    assert scanned[:2].all() and scanned[2, 0] and not scanned[2, 1:].any() and not scanned[3].any()


@pytest.mark.parametrize("patch_size", [1, 2])
def test_influence_map_zigma_1_is_causal_along_path_0_arcee_1_is_not(patch_size):
    x, t = torch.randn(3, 2, 8, 8), torch.rand(3)
    token, scanned = spatial.middle_token_of_path(8 // patch_size)
    zigma = spatial.influence_map(random_model(False, patch_size=patch_size), x, t, token)
    arcee = spatial.influence_map(random_model(True, patch_size=patch_size), x, t, token)
    assert zigma.shape == arcee.shape == scanned.shape
    assert np.all(zigma[~scanned] == 0) and np.all(zigma[scanned] > 0)
    assert np.all(arcee[~scanned] > 0)
    vim = spatial.influence_map(random_model(False, "bidirectional", patch_size), x, t, token)
    assert np.all(vim > 0)  # a backward scan sees the whole image without any chain


def test_influence_map_is_the_jacobian_norm():
    model = random_model(True, patch_size=2)
    x, t = torch.randn(1, 2, 8, 8), torch.rand(1)
    jacobian = torch.autograd.functional.jacobian(lambda inp: model(inp, t).sample[0, :, 2:4, 4:6], x)
    expected = jacobian.reshape(8, 2, 4, 2, 4, 2).square().sum(dim=(0, 1, 3, 5)).sqrt()
    np.testing.assert_allclose(spatial.influence_map(model, x, t, token=1 * 4 + 2), expected, rtol=1e-5)
