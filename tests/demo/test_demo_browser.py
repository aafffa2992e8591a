"""The demo page in a real browser: Debian's Chromium driven by Playwright (arcee_diffusers.demo.browser).

Without Chromium or Playwright these tests skip, except in CI (``CI=true``), where they fail.
"""

from __future__ import annotations

import re

import pytest
from demo_testing import (
    GRID,
    check_arcee_1_sees_past_the_token,
    check_zigma_1_is_blind_past_the_token,
    tiny_pipeline,
)

from arcee_diffusers.demo import browser
from arcee_diffusers.evaluation import spatial


@pytest.mark.parametrize("state_chain", [False, True], ids=["zigma-1", "arcee-1"])
def test_generate_then_click_a_token_and_read_the_map_back(serve, needs_browser, state_chain):
    url, demo_model = serve(tiny_pipeline(state_chain))
    token, _ = spatial.middle_token_of_path(GRID)
    row, col = divmod(token, GRID)
    requests_seen = []
    with browser.chromium_page(url, requests_seen=requests_seen) as page:
        info = browser.generate(page)
        assert re.fullmatch(r"8 image\(s\) in \d+\.\d\d s, 16 model calls\.", info.strip()), info
        record = browser.click_token(page, row, col, GRID)
        assert record["token"]["index"] == token
        if state_chain:
            check_arcee_1_sees_past_the_token(record)
            page.locator("#influence-map-cut img").wait_for()  # shown beside the chained map
        else:
            check_zigma_1_is_blind_past_the_token(record)
            assert record["map_chain_cut"] is None
            assert not page.locator("#influence-map-cut").is_visible()
        zeros = record["exact_zeros_map"]
        assert f"exact zeros: {zeros} of {GRID * GRID}" in page.locator("#influence-info").inner_text()
    outside = [seen for seen in requests_seen if not seen.startswith((url, "data:", "blob:"))]
    assert requests_seen and not outside  # the page asks nothing of the network


def test_bad_input_shows_one_line_in_the_page(serve, needs_browser):
    url, _ = serve(tiny_pipeline())
    with browser.chromium_page(url) as page:
        browser.open_tab(page, "Influence")
        page.locator("#influence-button").click()  # no image yet
        page.get_by_text("image: sample or upload an image first").first.wait_for()
        assert "Traceback" not in page.content()
