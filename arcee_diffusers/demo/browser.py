"""Driving the demo page in a real browser: Debian's Chromium under Playwright.

Used by the browser tests and by ``scripts/demo_screenshots.py``. Playwright drives the system browser
(``executable_path``); it never downloads one (``playwright install`` is not needed and must not be run).
"""

from __future__ import annotations

import contextlib
import json
import os
from collections.abc import Iterator

CHROMIUM = "/usr/bin/chromium"
# as root there is no user namespace sandbox; no GPU on the test machines; /dev/shm may be tiny in containers
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage"]
TIMEOUT_MS = 60_000  # one action, e.g. a sampling job on a loaded CPU


def missing_browser() -> str | None:
    """Why the browser cannot run here (no Chromium, no Playwright), or None."""
    if not os.path.exists(CHROMIUM):
        return f"no {CHROMIUM} (apt-get install -y --no-install-recommends chromium)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return 'no playwright (pip install -c constraints.txt -e ".[test]")'
    return None


@contextlib.contextmanager
def chromium_page(
    url: str, width: int = 1280, height: int = 900, requests_seen: list[str] | None = None
) -> Iterator:
    """A headless Chromium page at ``url``, the page's gradio app loaded; the URL of every request the page
    makes is appended to ``requests_seen`` if given."""
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        try:
            page = browser.new_page(viewport={"width": width, "height": height})
            page.set_default_timeout(TIMEOUT_MS)
            if requests_seen is not None:
                page.on("request", lambda request: requests_seen.append(request.url))
            page.goto(url)
            page.locator("#generate-button").wait_for()
            yield page
        finally:
            browser.close()


def open_tab(page, name: str) -> None:
    page.get_by_role("tab", name=name).click()


def generate(page) -> str:
    """Press Generate on the Generate tab; the info line once the samples are shown."""
    open_tab(page, "Generate")
    page.locator("#generate-button").click()
    info = page.locator("#generate-info").filter(has_text="model calls")
    info.wait_for()
    page.locator("#samples img").wait_for()
    return info.inner_text()


def click_token(page, row: int, col: int, grid: int) -> dict:
    """On the Influence tab: sample an image, click token ``(row, col)`` of the token grid, and read the
    maps' values back from the page (the JSON record of ``DemoModel.influence``)."""
    open_tab(page, "Influence")
    page.locator("#sample-button").click()
    picture = page.locator("#token-grid img")
    picture.wait_for()
    box = picture.bounding_box()
    picture.click(position={"x": (col + 0.5) * box["width"] / grid, "y": (row + 0.5) * box["height"] / grid})
    values = page.locator("#influence-values textarea")
    page.wait_for_function(
        "([selector, token]) => { const area = document.querySelector(selector);"
        " return area && area.value.includes(token); }",
        arg=["#influence-values textarea", f'"index": {row * grid + col},'],
    )
    return json.loads(values.input_value())
