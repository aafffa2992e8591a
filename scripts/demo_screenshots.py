"""Screenshots of each tab of the demo page, taken by the browser the tests use (Debian's Chromium driven
by Playwright; see arcee_diffusers/demo/browser.py):

    python scripts/demo_screenshots.py outputs/digits --output_dir docs/demo

serves PIPELINE on 127.0.0.1, generates on the Generate tab, samples an image and clicks the middle token of
the first block's path on the Influence tab, samples both on the Chain on / cut tab, and writes
``generate.png``, ``influence.png``, ``chain.png`` and ``about.png`` (full pages, 1280 pixels wide).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from arcee_diffusers.command_line import user_errors_exit
from arcee_diffusers.demo import LAUNCH_OPTIONS, DemoModel, browser, build_demo, load_pipeline
from arcee_diffusers.evaluation import spatial
from arcee_diffusers.files import atomic_path


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("pipeline", nargs="?", default="outputs/digits", help="a pipeline folder or Hub id")
    parser.add_argument("--output_dir", default="docs/demo")
    return parser.parse_args(argv)


def screenshot(page, path: Path) -> None:
    with atomic_path(path) as tmp:
        tmp.write_bytes(page.screenshot(full_page=True, type="png"))
    print(f"wrote {path}")


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    with user_errors_exit("demo_screenshots.py", NotADirectoryError):
        if reason := browser.missing_browser():
            raise FileNotFoundError(reason)
        demo_model = DemoModel(load_pipeline(args.pipeline, "cpu"), args.pipeline)
    output_dir = Path(args.output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    demo = build_demo(demo_model)
    demo.launch(server_name="127.0.0.1", prevent_thread_lock=True, quiet=True, **LAUNCH_OPTIONS)
    try:
        with browser.chromium_page(demo.local_url) as page:
            browser.generate(page)
            screenshot(page, output_dir / "generate.png")
            token, _ = spatial.middle_token_of_path(demo_model.grid)
            browser.click_token(page, *divmod(token, demo_model.grid), demo_model.grid)
            page.locator("#influence-map img").wait_for()
            screenshot(page, output_dir / "influence.png")
            browser.open_tab(page, "Chain on / cut")
            if demo_model.has_chain:
                page.locator("#chain-button").click()
                page.locator("#chain-info").filter(has_text="model calls").wait_for()
            screenshot(page, output_dir / "chain.png")
            browser.open_tab(page, "About")
            screenshot(page, output_dir / "about.png")
    finally:
        demo.close()


if __name__ == "__main__":
    main()
