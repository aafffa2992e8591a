"""The demo page's APIs through gradio_client (no browser) on tiny random pipelines."""

from __future__ import annotations

import concurrent.futures
import json
import re
import time

import httpx
import numpy as np
import pytest
from demo_testing import (
    GRID,
    check_arcee_1_sees_past_the_token,
    check_zigma_1_is_blind_past_the_token,
    tiny_pipeline,
)
from gradio_client import Client, handle_file
from PIL import Image

from arcee_diffusers.demo import maps
from arcee_diffusers.evaluation import spatial


def client(url: str) -> Client:
    return Client(url, verbose=False, download_files=True)


def model_calls(info: str) -> int:
    return int(re.search(r"(\d+) model calls", info).group(1))


def grey_image(path, seed: int = 0) -> str:
    pixels = np.random.default_rng(seed).integers(0, 256, (8, 8), dtype=np.uint8)
    Image.fromarray(pixels).save(path)
    return str(path)


@pytest.mark.parametrize(("solver", "guidance"), [("euler", 1.0), ("heun", 2.0), ("dopri5", 1.0)])
def test_generate_shows_the_true_model_call_count(serve, solver, guidance):
    pipe = tiny_pipeline()
    calls = []
    pipe.transformer.register_forward_hook(lambda *_: calls.append(1))
    url, _ = serve(pipe)
    grid_file, info = client(url).predict("all classes", guidance, 3, solver, 5, 4, api_name="/generate")
    assert model_calls(info) == len(calls) > 0
    if solver != "dopri5":
        assert len(calls) == 3 * (2 if solver == "heun" else 1)  # guidance batches both halves in one call
    assert re.search(r"4 image\(s\) in \d+\.\d\d s", info)
    assert Image.open(grid_file).size[0] >= 2 * maps.TILE  # 2 x 2 samples, each scaled up


def test_generate_on_an_unconditional_model_and_the_same_seed_gives_the_same_images(serve):
    url, _ = serve(tiny_pipeline(num_classes=None))
    api = client(url)
    first, _ = api.predict("unconditional", 1.0, 2, "euler", 7, 2, api_name="/generate")
    again, _ = api.predict("unconditional", 1.0, 2, "euler", 7, 2, api_name="/generate")
    other, _ = api.predict("unconditional", 1.0, 2, "euler", 8, 2, api_name="/generate")
    pixels = [np.asarray(Image.open(f)) for f in (first, again, other)]
    np.testing.assert_array_equal(pixels[0], pixels[1])
    assert not np.array_equal(pixels[0], pixels[2])


def test_influence_zigma_1_is_blind_past_the_token_arcee_1_is_not(serve, tmp_path):
    image = handle_file(grey_image(tmp_path / "digit.png"))
    token, _ = spatial.middle_token_of_path(GRID)
    row, col = divmod(token, GRID)
    records = {}
    for name, state_chain in (("zigma", False), ("arcee", True)):
        url, _ = serve(tiny_pipeline(state_chain))
        outputs = client(url).predict(image, row, col, "1", 0.5, api_name="/influence")
        grid_file, map_file, cut_file, values, info = outputs
        records[name] = json.loads(values)
        assert records[name]["token"] == {"row": row, "col": col, "index": token, "step": GRID * GRID // 2}
        assert (cut_file is None) == (not state_chain)
        assert f"exact zeros: {records[name]['exact_zeros_map']} of {GRID * GRID}" in info
        # the picture shows every exact zero, and only those, in grey
        picture = np.asarray(Image.open(map_file).convert("RGB"))
        cell = maps.cell_size(GRID)
        corners = picture[cell // 4 :: cell, cell // 4 :: cell]  # a point of each cell away from the lines
        is_grey = np.all(corners == maps.ZERO_COLOR, axis=-1)
        np.testing.assert_array_equal(is_grey, np.array(records[name]["map"]) == 0)
    check_zigma_1_is_blind_past_the_token(records["zigma"])
    check_arcee_1_sees_past_the_token(records["arcee"])
    # the chain cut at test time is Zigma-1: the same weights give the same map
    np.testing.assert_allclose(records["arcee"]["map_chain_cut"], records["zigma"]["map"], rtol=1e-6)
    assert records["zigma"]["map_chain_cut"] is None


def test_chain_tab_samples_the_same_seeds_with_and_without_the_chain(serve):
    url, _ = serve(tiny_pipeline(state_chain=True))
    on_file, cut_file, info = client(url).predict("all classes", 3, 0, 2, api_name="/chain")
    assert not np.array_equal(np.asarray(Image.open(on_file)), np.asarray(Image.open(cut_file)))
    assert "3 model calls each" in info
    url, _ = serve(tiny_pipeline(state_chain=False))
    with pytest.raises(Exception, match="no state chain to cut"):
        client(url).predict("all classes", 3, 0, 2, api_name="/chain")


GENERATE_OK = {
    "class_choice": "all classes",
    "guidance": 1.0,
    "steps": 2,
    "solver": "euler",
    "seed": 0,
    "count": 1,
}


BAD_GENERATE_INPUTS = [
    ({"steps": 0}, "steps must be a whole number in [1, 200], got 0"),
    ({"steps": 2.5}, "steps must be a whole number"),
    ({"count": 17}, "number of images must be a whole number in [1, 16]"),
    ({"seed": -1}, "seed must be a whole number in [0, "),
    ({"solver": "rk4"}, "solver must be one of ['euler', 'heun', 'dopri5']"),
    ({"class_choice": "9"}, "class must be one of ['all classes', '0', '1', '2']"),
    ({"guidance": 21.0}, "guidance must be a number in [1, 20]"),
    ({"guidance": None}, "guidance must be a number"),
]


def test_bad_generate_input_is_one_line_naming_it(serve):
    url, _ = serve(tiny_pipeline())
    api = client(url)
    for bad, message in BAD_GENERATE_INPUTS:
        with pytest.raises(Exception, match=re.escape(message)):
            api.predict(*{**GENERATE_OK, **bad}.values(), api_name="/generate")


def test_bad_influence_input_is_one_line_naming_it(serve, tmp_path):
    url, _ = serve(tiny_pipeline())
    api = client(url)
    image = handle_file(grey_image(tmp_path / "digit.png"))
    not_a_picture = tmp_path / "notes.png"
    not_a_picture.write_text("not a picture")
    huge = tmp_path / "huge.png"
    Image.new("L", (5000, 4000)).save(huge)  # a few kB, 20 million pixels
    too_big = tmp_path / "big.png"
    too_big.write_bytes(bytes(11 * 2**20))  # over the page's 10 MB upload limit
    for arguments, message in [
        ((None, 0, 0, "0", 0.5), "image: sample or upload an image first"),
        ((image, GRID, 0, "0", 0.5), f"row must be a whole number in [0, {GRID - 1}], got {GRID}"),
        ((image, 0, -1, "0", 0.5), "column must be a whole number"),
        ((image, 0, 0, "all classes", 0.5), "class must be one of ['0', '1', '2']"),
        ((image, 0, 0, "0", 1.5), "t must be a number in [0, 1], got 1.5"),
        ((handle_file(str(not_a_picture)), 0, 0, "0", 0.5), "image: not a picture PIL can read"),
        ((handle_file(str(huge)), 0, 0, "0", 0.5), "image: at most 4096 x 4096 pixels, got 5000 x 4000"),
        ((handle_file(str(too_big)), 0, 0, "0", 0.5), "exceeds the maximum file size of 10485760 bytes"),
    ]:
        with pytest.raises(Exception, match=re.escape(message)):
            api.predict(*arguments, api_name="/influence")


def test_unconditional_model_refuses_guidance(serve):
    url, _ = serve(tiny_pipeline(num_classes=None))
    with pytest.raises(Exception, match=re.escape("guidance must be a number in [1, 1], got 2.0")):
        client(url).predict("unconditional", 2.0, 2, "euler", 0, 1, api_name="/generate")


def test_a_file_the_caller_did_not_upload_is_refused(serve, tmp_path):
    """A raw API call naming a server-side file (gradio_client would upload it; a forger would not)."""
    secret = grey_image(tmp_path / "secret.png")
    url, _ = serve(tiny_pipeline())
    forged = {"path": secret, "meta": {"_type": "gradio.FileData"}}
    event = httpx.post(f"{url}gradio_api/call/influence", json={"data": [forged, 0, 0, "0", 0.5]}).json()
    answer = httpx.get(f"{url}gradio_api/call/influence/{event['event_id']}", timeout=60).text
    assert "event: error" in answer and "exact zeros" not in answer


@pytest.mark.parametrize("concurrency", [1, 3])
def test_load_20_concurrent_requests_all_complete_and_the_server_still_answers(serve, concurrency):
    url, _ = serve(tiny_pipeline(), concurrency)
    api = Client(url, verbose=False, download_files=False)  # parallel downloads of one name would collide
    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(4) as pool:  # 4 callers, 5 jobs each, all queued at once
        jobs = [api.submit("all classes", 1.0, 2, "euler", k % 2, 2, api_name="/generate") for k in range(20)]
        results = list(pool.map(lambda job: job.result(timeout=120), jobs))
    assert time.perf_counter() - start < 120
    assert len(results) == 20 and all("2 model calls" in info for _, info in results)
    # requests run side by side share the weights but not the scheduler: the same seed, the same images
    pixels = [np.asarray(Image.open(grid_file["path"])) for grid_file, _ in results]  # this process's server
    for k, image in enumerate(pixels):
        np.testing.assert_array_equal(image, pixels[k % 2])
    assert httpx.get(url, timeout=10).status_code == 200
    assert "model calls" in api.predict("0", 1.0, 1, "euler", 0, 1, api_name="/generate")[1]
