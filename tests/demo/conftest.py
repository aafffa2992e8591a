"""The demo page on tiny pipelines, launched on 127.0.0.1 and closed after each test, and the browser."""

from __future__ import annotations

import os

import pytest


@pytest.fixture
def serve():
    """``serve(pipe, concurrency=1)``: the demo page of ``pipe`` running on 127.0.0.1; returns
    ``(url, demo_model)``."""
    from arcee_diffusers.demo import LAUNCH_OPTIONS, DemoModel, build_demo

    running = []

    def start(pipe, concurrency: int = 1):
        demo_model = DemoModel(pipe, "tiny")
        demo = build_demo(demo_model, concurrency)
        demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **LAUNCH_OPTIONS)
        running.append(demo)
        return demo.local_url, demo_model

    yield start
    for demo in running:
        demo.close()


@pytest.fixture
def needs_browser():
    """Skip without Chromium or Playwright, but fail in CI (``CI=true``), where .ci/run installs both."""
    from arcee_diffusers.demo.browser import missing_browser

    reason = missing_browser()
    if reason and os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"CI must run the browser tests: {reason}")
    if reason:
        pytest.skip(reason)
