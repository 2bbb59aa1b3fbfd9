"""The code's safety net inside the one test command: ruff (pyflakes, pycodestyle, import order,
bugbear, pyupgrade for Python 3.9) over everything, mypy over the product code (watchdog.py,
gpt4all_api.py, apiserver/). Their settings are in pyproject.toml; a failure shows their output."""

from __future__ import annotations

import subprocess
import sys

from conftest import REPO


def run_tool(*command: str) -> None:
    result = subprocess.run([sys.executable, "-m", *command], cwd=REPO, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, f"{' '.join(command)} found problems:\n{result.stdout}{result.stderr}"


def test_ruff_finds_nothing() -> None:
    run_tool("ruff", "check", "--no-cache", ".")


def test_mypy_finds_nothing_in_the_product_code() -> None:
    run_tool("mypy", "--no-incremental")
