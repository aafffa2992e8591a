import pytest
import torch

from arcee_diffusers.models.scan_orders import inverse_permutation, layer_scan_path, zigzag_paths

# SPEC §4 gives paths 0-3 for G = 4; paths 4-7 are the same snakes from the bottom-left and bottom-right.
ZIGZAG_PATHS_G4 = [
    [0, 1, 2, 3, 7, 6, 5, 4, 8, 9, 10, 11, 15, 14, 13, 12],  # row-snake, top-left
    [0, 4, 8, 12, 13, 9, 5, 1, 2, 6, 10, 14, 15, 11, 7, 3],  # column-snake, top-left
    [3, 2, 1, 0, 4, 5, 6, 7, 11, 10, 9, 8, 12, 13, 14, 15],  # row-snake, top-right
    [3, 7, 11, 15, 14, 10, 6, 2, 1, 5, 9, 13, 12, 8, 4, 0],  # column-snake, top-right
    [12, 13, 14, 15, 11, 10, 9, 8, 4, 5, 6, 7, 3, 2, 1, 0],  # row-snake, bottom-left
    [12, 8, 4, 0, 1, 5, 9, 13, 14, 10, 6, 2, 3, 7, 11, 15],  # column-snake, bottom-left
    [15, 14, 13, 12, 8, 9, 10, 11, 7, 6, 5, 4, 0, 1, 2, 3],  # row-snake, bottom-right
    [15, 11, 7, 3, 2, 6, 10, 14, 13, 9, 5, 1, 0, 4, 8, 12],  # column-snake, bottom-right
]


def test_zigzag_paths_grid_4_match_the_published_tables():
    assert zigzag_paths(4).tolist() == ZIGZAG_PATHS_G4


@pytest.mark.parametrize("height,width", [(1, 1), (3, 3), (5, 5), (16, 16), (3, 5)])
def test_zigzag_paths_are_permutations_moving_to_grid_neighbours(height, width):
    paths = zigzag_paths(height, width)
    assert paths.shape == (8, height * width) and paths.dtype == torch.long
    for path in paths:
        assert sorted(path.tolist()) == list(range(height * width))
        rows, cols = path // width, path % width
        steps = (rows.diff().abs() + cols.diff().abs()).tolist()
        assert all(step == 1 for step in steps)  # boustrophedon: every step goes to an adjacent cell


@pytest.mark.parametrize("grid", [2, 4, 16])
def test_even_grids_pair_each_path_with_its_reverse(grid):
    # An even number of rows (columns) makes a row-snake (column-snake) end in a corner of the same
    # side, so the bottom row-snakes reverse the top ones and the column-snakes reverse each other.
    paths = zigzag_paths(grid)
    for path, reversed_path in [(0, 4), (2, 6), (1, 3), (5, 7)]:
        assert torch.equal(paths[path].flip(0), paths[reversed_path])


def test_inverse_permutation_undoes_the_gather():
    path = zigzag_paths(4)[3]
    tokens = torch.randn(2, 16, 3)
    assert torch.equal(tokens[:, path][:, inverse_permutation(path)], tokens)


@pytest.mark.parametrize("k", [1, 2, 4, 8])
def test_layer_i_uses_path_i_mod_k(k):
    paths = zigzag_paths(4)
    for layer in range(12):
        assert torch.equal(layer_scan_path(paths, layer, k), paths[layer % k])
    assert layer_scan_path(None, 3, 1) is None
