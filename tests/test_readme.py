"""The README's two opening commands are what CI runs: keep .ci/run and the README in step."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
INSTALL = 'pip install -c constraints.txt -e ".[test]"'
TEST_COMMAND = "python -m pytest -n 2 -q"


def _readme_commands() -> list[str]:
    readme = (ROOT / "README.md").read_text()
    first_block = re.search(r"```(?:bash|sh)?\n(.*?)```", readme, re.S)
    assert first_block, "README.md must open with a fenced block of commands"
    return [line for line in first_block.group(1).splitlines() if line and not line.startswith("#")]


def test_readme_opens_with_install_main_job_and_tests() -> None:
    main_job, tests = _readme_commands()[:2]
    assert INSTALL in main_job and "train_scripts/train_fm.py" in main_job
    assert INSTALL in tests and tests.endswith(TEST_COMMAND)


def test_ci_runs_the_readme_install_and_test_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert INSTALL in ci
    assert TEST_COMMAND in ci


def test_ci_installs_the_browser_before_the_tests_and_marks_itself_ci() -> None:
    """The demo's browser tests fail rather than skip under CI=true, so CI installs Chromium first."""
    ci = (ROOT / ".ci" / "run").read_text()
    assert "apt-get install -y --no-install-recommends chromium" in ci
    assert ci.index("chromium") < ci.index(INSTALL)
    assert 'export CI="${CI:-true}"' in ci
