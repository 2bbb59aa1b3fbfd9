"""CI's second pass: the watchdog, crash-recovery, fleet, OpenAI and Ollama integration suites (and
the watchdog's suite on the stand-in worker) run again with GPT4ALL_API_PORTABLE=1, inherited by the
watchdog and its workers: apiserver/system.py then answers "no" to every Linux extra, as on macOS
(a stream-framed control channel, no pidfds, no /proc, no memory files, spawned workers). Tests of
what only those extras give skip there, each with its reason (conftest.linux_extra)."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

from conftest import PORTABLE, PORTABLE_ENV, REPO

SUITES = ["tests/test_watchdog_integration.py", "tests/test_crash_recovery.py", "tests/test_fleet_integration.py",
          "tests/test_openai_watchdog.py", "tests/test_ollama_integration.py", "tests/test_watchdog_fake.py"]


@pytest.mark.skipif(PORTABLE, reason="this is the portable run")
def test_the_integration_suites_pass_with_the_linux_extras_off() -> None:
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-rs", "-p", "no:cacheprovider", *SUITES],
                            cwd=REPO, env=dict(os.environ, **{PORTABLE_ENV: "1"}), capture_output=True, text=True,
                            timeout=3600)
    summary = result.stdout.strip().splitlines()[-1] if result.stdout.strip() else ""
    print(f"portable run: {summary}")
    assert result.returncode == 0, result.stdout[-20000:] + result.stderr[-5000:]
    passed = int(re.search(r"(\d+) passed", summary).group(1))  # type: ignore[union-attr]
    assert passed >= 30, summary
    skips = [line for line in result.stdout.splitlines() if line.startswith("SKIPPED")]
    assert all("a Linux extra, off in the portable run" in line or "nginx" in line for line in skips), skips
