"""Shared fixtures: free ports, per-test config files, and real server / watchdog subprocesses.

Integration tests run the real gpt4all_api.py and watchdog.py on the real embedded model (assembled
once into the repository's models/ folder), on free ports, and poll against monotonic deadlines.
"""

from __future__ import annotations

import configparser
import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

import pytest

REPO = Path(__file__).resolve().parent.parent
MODELS = REPO / "models"
sys.path.insert(0, str(REPO))
# The portable run (tests/test_portable.py): apiserver/system.py answers "no" to every Linux extra.
PORTABLE_ENV = "GPT4ALL_API_PORTABLE"
PORTABLE = os.environ.get(PORTABLE_ENV) == "1"


def linux_extra(what: str) -> pytest.MarkDecorator:
    """Skip, in the portable run, a test of what only Linux's extras give."""
    return pytest.mark.skipif(PORTABLE, reason=f"{what}: a Linux extra, off in the portable run")


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def write_config(directory: Path, overrides: dict[str, dict[str, Any]] | None = None) -> Path:
    """config.ini in directory: the committed defaults, a free port, logs and state inside directory."""
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "config.ini", encoding="utf-8")
    parser["server"]["port"] = str(free_port())
    parser["model"]["model_path"] = str(MODELS)
    parser["logging"]["log_dir"] = str(directory / "logs")
    parser["watchdog"]["state_dir"] = str(directory / "run")
    for section, values in (overrides or {}).items():
        for key, value in values.items():
            parser[section][key] = str(value)
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "config.ini"
    with open(path, "w", encoding="utf-8") as handle:
        parser.write(handle)
    return path


class Process:
    """A server or watchdog subprocess in its own process group, its output in a file."""

    def __init__(self, script: str, config: Path, env: dict[str, str] | None = None,
                 cwd: str | None = None, command: list | None = None):
        self.config = config
        parser = configparser.ConfigParser(interpolation=None)
        parser.read(config, encoding="utf-8")
        self.port = int(parser["server"]["port"])
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.output_path = config.parent / f"{Path(script).stem}.out"
        self.output = open(self.output_path, "wb")
        self.popen = subprocess.Popen(command or [sys.executable, str(REPO / script), "--config", str(config)],
                                      stdout=self.output, stderr=subprocess.STDOUT, start_new_session=True,
                                      env=env, cwd=cwd)

    def logs(self) -> str:
        text = self.output_path.read_text(errors="replace")
        for name in ("watchdog.log", "server.log"):
            log_file = self.config.parent / "logs" / name
            if log_file.exists():
                text += f"\n----- {name} -----\n" + log_file.read_text(errors="replace")
        return text[-20000:]

    def fail(self, reason: str) -> None:
        pytest.fail(f"{reason}\n----- output -----\n{self.logs()}")

    def wait_ready(self, timeout: float = 120) -> dict[str, Any]:
        """Poll /health until it answers 200 (model loaded) before the deadline."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                self.fail(f"exited with code {self.popen.returncode} before it was ready")
            try:
                status, _, body = request(self.base_url, "GET", "/health", timeout=5)
                if status == 200:
                    return json.loads(body)
            except OSError:
                pass
            time.sleep(0.1)
        self.fail(f"not ready within {timeout} s")

    def wait_for_spare(self, timeout: float = 60) -> None:
        """A watchdog's warm spare has loaded: both workers' sentinels exist (the zygote has none)."""
        state_dir = self.config.parent / "run"
        wait_until(lambda: len(list(state_dir.glob("worker-*.sentinel"))) >= 2, timeout, self, "the warm spare")

    def stop(self, timeout: float = 30) -> int | None:
        """SIGTERM the process group, then SIGKILL it after the timeout."""
        if self.popen.poll() is None:
            try:
                os.killpg(self.popen.pid, signal.SIGTERM)
            except ProcessLookupError:
                pass
            try:
                self.popen.wait(timeout)
            except subprocess.TimeoutExpired:
                pass
        try:
            os.killpg(self.popen.pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass
        self.popen.wait()
        self.output.close()
        return self.popen.returncode


def descendants(pid: int) -> list[int]:
    """Pids of a process's children, theirs and so on: the watchdog's workers are the zygote's children."""
    found: list[int] = []
    try:
        children = Path(f"/proc/{pid}/task/{pid}/children").read_text().split()
    except OSError:
        return found
    for child in map(int, children):
        found += [child] + descendants(child)
    return found


def wait_until(predicate: Callable[[], Any], timeout: float, process: Process, what: str) -> Any:
    """Poll predicate until it returns something true, or fail with the process's output."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(0.02)
    process.fail(f"timed out after {timeout:.1f} s waiting for {what}")


def both(first: Process, second: Process, ask: Callable[[Process], Any]) -> tuple[Any, Any]:
    """ask(process) of two processes at once (two watchdogs compared on the same question)."""
    results: list[Any] = [None, None]

    def run(index: int, process: Process) -> None:
        results[index] = ask(process)

    threads = [threading.Thread(target=run, args=pair) for pair in enumerate((first, second))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    return results[0], results[1]


def request(base_url: str, method: str, path: str, body: Any = None, headers: dict[str, str] | None = None,
            timeout: float = 120) -> tuple[int, dict[str, str], bytes]:
    """One HTTP exchange; a dict body is sent as JSON. Returns (status, lower-case headers, body)."""
    host, port = base_url.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=timeout)
    headers = dict(headers or {})
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.setdefault("Content-Type", "application/json")
    try:
        connection.request(method, path, body=body, headers=headers)
        response = connection.getresponse()
        return response.status, {k.lower(): v for k, v in response.getheaders()}, response.read()
    finally:
        connection.close()


@pytest.fixture
def start(tmp_path):
    """start(script, overrides) -> Process; every process is stopped at the end of the test."""
    started = []

    def start_process(script: str = "gpt4all_api.py", overrides: dict[str, dict[str, Any]] | None = None,
                      **kwargs: Any) -> Process:
        directory = tmp_path / f"{Path(script).stem}-{len(started)}"
        directory.mkdir()
        process = Process(script, write_config(directory, overrides), **kwargs)
        started.append(process)
        return process

    yield start_process
    for process in started:
        process.stop()


@pytest.fixture
def settings(tmp_path: Path) -> Any:
    """Settings from a fresh config.ini (the unit tier's fixture)."""
    from apiserver.settings import load_settings
    return load_settings(write_config(tmp_path))
