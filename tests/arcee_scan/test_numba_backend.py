"""What is particular to the compiled "numba" backend: channel blocks, threads, float64, the disk cache (the
shared grid against the reference is in test_cpu_backends.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numba
import numpy as np
import pytest
import torch
from scan_testing import make_inputs, outputs_and_grads

from arcee_scan import numba_scan


@pytest.mark.parametrize("batch, dim, groups", [(1, 24, 1), (3, 100, 4), (2, 12, 12), (32, 128, 1)])
def test_channel_blocks_tile_each_group(batch, dim, groups):
    blocks, first = numba_scan._channel_blocks(batch, dim, groups)
    per_group = dim // groups
    covered = []
    for g in range(groups):
        rows = blocks[first[g] : first[g + 1]]
        assert (rows[:, 0] == g).all()
        assert rows[0, 1] == g * per_group and rows[-1, 2] == (g + 1) * per_group
        assert (rows[1:, 1] == rows[:-1, 2]).all()  # contiguous, in order
        covered += [c for _, c0, c1 in rows for c in range(c0, c1)]
    assert covered == list(range(dim))
    # enough work items for parallel slack, unless every channel is already its own block
    assert batch * len(blocks) >= min(numba_scan.MIN_WORK_ITEMS, batch * dim)


@numba.njit
def _call_lane_sums(lanes, out):
    numba_scan._lane_sums(lanes, 1, 3, out, 1, 2, 5)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_lane_sums_are_the_row_sums_of_a_block(dtype):
    # float32 takes the shuffle tree, float64 a loop; both write exactly the 16 sums asked for
    lanes = np.random.default_rng(0).standard_normal((2, 21, numba_scan.LANES)).astype(dtype)
    out = np.zeros((2, 3, 24), dtype)
    _call_lane_sums(lanes, out)
    np.testing.assert_allclose(out[1, 2, 5:21], lanes[1, 3:19].sum(axis=1), rtol=1e-6, atol=1e-6)
    out[1, 2, 5:21] = 0
    assert not out.any()


@pytest.mark.skipif(numba.config.NUMBA_NUM_THREADS < 2, reason="needs two numba threads")
def test_results_do_not_depend_on_the_thread_count():
    inputs = make_inputs(1, 40, 37, 20, 2)
    previous = torch.get_num_threads()
    try:
        results = []
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(outputs_and_grads(inputs, "numba", chunk_size=8))
            assert numba.get_num_threads() == threads  # the kernels follow torch's thread count
    finally:
        torch.set_num_threads(previous)
    for name, value in results[0].items():
        assert torch.equal(value, results[1][name]), name


def test_cache_key_covers_sources_and_versions():
    sources = [b"kernel source", b"reference source"]
    key = numba_scan.cache_key(sources, "0.1.0")
    assert numba_scan.cache_key(list(sources), "0.1.0") == key
    assert numba_scan.cache_key([b"kernel sourcf", b"reference source"], "0.1.0") != key  # one byte
    assert numba_scan.cache_key([b"kernel source", b"reference sourcf"], "0.1.0") != key
    assert numba_scan.cache_key(sources, "0.1.1") != key
    assert numba_scan.cache_key(sources[::-1], "0.1.0") != key


def test_kernels_are_cached_under_the_key_of_these_sources(tmp_path, monkeypatch):
    monkeypatch.setenv(numba_scan.CACHE_DIR_ENV_VAR, str(tmp_path))
    sources = [path.read_bytes() for path in sorted(Path(numba_scan.__file__).parent.glob("*.py"))]
    key = numba_scan.cache_key(sources, numba_scan._package_version())
    assert numba_scan.cache_dir() == tmp_path / f"numba-{key}"
    # the folder is chosen when a kernel is decorated: every kernel of this import sits under the key of
    # the sources it was imported from (in the user's cache folder here, not in tmp_path)
    for kernel in (numba_scan._forward_kernel, numba_scan._backward_kernel, numba_scan._sum_block_parts):
        assert f"numba-{key}" in kernel.stats.cache_path


CACHE_PROBE = textwrap.dedent(
    """
    import json, time
    import torch
    from arcee_scan import numba_scan, selective_scan
    args = dict(u=torch.randn(1, 4, 5), delta=torch.rand(1, 4, 5), A=-torch.rand(4, 2),
                B=torch.randn(1, 2, 5), C=torch.randn(1, 2, 5))
    start = time.perf_counter()
    with torch.no_grad():
        selective_scan(**args, backend="numba")
    kernel = numba_scan._forward_kernel
    print(json.dumps({"seconds": time.perf_counter() - start, "path": kernel.stats.cache_path,
                      "hits": sum(kernel.stats.cache_hits.values()),
                      "misses": sum(kernel.stats.cache_misses.values())}))
    """
)


@pytest.mark.slow
def test_a_new_process_loads_the_compiled_kernels_from_disk(tmp_path):
    env = dict(os.environ, **{numba_scan.CACHE_DIR_ENV_VAR: str(tmp_path)})

    def probe() -> dict:
        done = subprocess.run(
            [sys.executable, "-c", CACHE_PROBE], env=env, capture_output=True, text=True, check=True
        )
        return json.loads(done.stdout.strip().splitlines()[-1])

    cold, warm = probe(), probe()
    assert cold["path"].startswith(str(tmp_path / "numba-")) and cold["path"] == warm["path"]
    assert cold["misses"] == 1 and cold["hits"] == 0
    assert warm["hits"] == 1 and warm["misses"] == 0
    assert warm["seconds"] < cold["seconds"]


BACKGROUND_PROBE = textwrap.dedent(
    """
    import json, sys
    import torch
    from arcee_scan import numba_scan
    started = numba_scan.compile_in_background()
    from arcee_diffusers.models import ArceeZigmaTransformer  # what a training run imports meanwhile
    model = ArceeZigmaTransformer(sample_size=4, patch_size=1, in_channels=1, out_channels=1, num_layers=2,
                                  hidden_size=16, d_state=int(sys.argv[1]), num_classes=3)
    x, t, y = torch.randn(2, 1, 4, 4), torch.rand(2), torch.tensor([0, 2])
    model(x, t, y).sample.square().mean().backward()
    stats = {kernel.py_func.__name__: kernel.stats for kernel in numba_scan._KERNELS}
    print(json.dumps({"started": started, **{name: [sum(s.cache_hits.values()), sum(s.cache_misses.values())]
                                             for name, s in stats.items()}}))
    """
)


@pytest.mark.slow
def test_kernels_compiled_in_the_background_are_what_a_model_step_loads(tmp_path):
    # a model's first training step finds every kernel it runs compiled by the helpers (a hit, no miss),
    # at another d_state too (N is not part of the signature); a new process then starts no helpers
    env = dict(os.environ, **{numba_scan.CACHE_DIR_ENV_VAR: str(tmp_path)})

    def probe(d_state: int) -> dict:
        command = [sys.executable, "-c", BACKGROUND_PROBE, str(d_state)]
        done = subprocess.run(command, env=env, capture_output=True, text=True, check=True)
        return json.loads(done.stdout.strip().splitlines()[-1])

    first, second = probe(16), probe(40)
    assert first.pop("started") and not second.pop("started")
    for name, (hits, misses) in first.items():
        assert hits >= 1 and misses == 0, name
    assert all(misses == 0 for _, misses in second.values())


def test_float64_runs_in_the_numba_kernels(monkeypatch):
    # float64 is compiled by numba too (gradcheck runs it), not handed to another backend
    launched = []
    launch = numba_scan._launch
    monkeypatch.setattr(
        numba_scan, "_launch", lambda kernel, *a: launched.append(a[0].dtype) or launch(kernel, *a)
    )
    outputs_and_grads(make_inputs(1, 4, 5, 3, dtype=torch.float64), "numba")
    assert len(launched) == 6 and {str(dtype) for dtype in launched} == {"float64"}
