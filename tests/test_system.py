"""The platform seam (apiserver/system.py): what each system offers, the process model chosen from
it, every module importing where the Linux-only calls are missing, the Windows entry's message, and
gpt4all_api.py alone serving with sys.platform = "win32"."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from apiserver import system
from apiserver.settings import Settings
from apiserver.zygote_client import choose_process_model
from conftest import REPO, Process, request, write_config

MODULES = ["watchdog", "gpt4all_api"] + sorted(f"apiserver.{path.stem}" for path in (REPO / "apiserver").glob("*.py"))
LINUX_ONLY = {"os": ["pidfd_open", "memfd_create", "sched_setscheduler", "SCHED_IDLE", "sched_getaffinity",
                     "waitid", "P_PID", "WNOWAIT"],
              "socket": ["SOCK_SEQPACKET", "TCP_INFO"]}
POSIX_ONLY = {"os": ["fork", "setpgrp", "killpg", "getpgid", "setsid", "sched_param"],
              "signal": ["SIGHUP", "SIGKILL", "SIGUSR1", "SIGCHLD"]}


def pretend(platform: str) -> str:
    """Python code that makes this interpreter look like platform: sys.platform set, the Linux-only
    calls removed (and for Windows the POSIX-only ones and fcntl too)."""
    missing = {module: list(names) for module, names in LINUX_ONLY.items()}
    lines = [f"import os, signal, socket, sys; sys.platform = {platform!r}"]
    if platform == "win32":
        for module, names in POSIX_ONLY.items():
            missing.setdefault(module, []).extend(names)
        lines.append("sys.modules['fcntl'] = None")
    for module, names in missing.items():
        lines += [f"if hasattr({module}, {name!r}): delattr({module}, {name!r})" for name in names]
    return "\n".join(lines) + "\n"


@pytest.mark.parametrize("platform", ["darwin", "win32"])
def test_every_module_imports_where_the_linux_calls_are_missing(platform: str) -> None:
    code = pretend(platform) + f"import importlib\nfor name in {MODULES!r}:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stderr


def test_the_watchdog_on_windows_points_to_wsl2_and_exits() -> None:
    code = pretend("win32") + "import runpy; runpy.run_path('watchdog.py', run_name='__main__')\n"
    result = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert result.returncode == 2, result.stderr
    assert "WSL2" in result.stderr and "does not run on Windows" in result.stderr, result.stderr


def test_the_linux_extras_answer_no_in_the_portable_mode(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv(system.PORTABLE_ENV, raising=False)
    extras = (system.seqpacket, system.pidfds, system.proc, system.process_names, system.page_control,
              system.tcp_info, system.memory_files, system.idle_threads)
    assert all(extra() for extra in extras)  # this machine: Linux 5.x with everything
    assert system.rss_mb(1) is not None and system.child_pids() is not None
    monkeypatch.setenv(system.PORTABLE_ENV, "1")
    assert not any(extra() for extra in extras)
    assert system.rss_mb(1) is None and system.child_pids() is None and not system.become_subreaper()
    assert not system.lower_this_thread_priority()
    monkeypatch.delenv(system.PORTABLE_ENV)
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not any(extra() for extra in extras) and system.watchdog_unsupported() is None
    monkeypatch.setattr(sys, "platform", "win32")
    assert "WSL2" in (system.watchdog_unsupported() or "")


@pytest.mark.parametrize("platform, portable, device, setting, expected", [
    ("linux", False, "cpu", "auto", True),
    ("linux", False, "cpu", "true", True),
    ("linux", False, "cpu", "false", False),
    ("linux", False, "gpu", "auto", False),
    ("linux", False, "cuda", "true", ValueError),
    ("linux", True, "cpu", "auto", False),
    ("linux", True, "cpu", "true", ValueError),
    ("darwin", False, "cpu", "auto", False),
    ("darwin", False, "cpu", "true", ValueError),
    ("darwin", False, "gpu", "false", False),
])
def test_the_process_model(monkeypatch: pytest.MonkeyPatch, platform: str, portable: bool, device: str,
                           setting: str, expected: object) -> None:
    monkeypatch.setattr(sys, "platform", platform)
    if portable:
        monkeypatch.setenv(system.PORTABLE_ENV, "1")
    else:
        monkeypatch.delenv(system.PORTABLE_ENV, raising=False)
    settings = Settings(config_file=Path("config.ini"), device=device, zygote=setting)
    if expected is ValueError:
        with pytest.raises(ValueError, match="zygote = true is refused here"):
            choose_process_model(settings)
        return
    use_zygote, why = choose_process_model(settings)
    assert use_zygote is expected and why
    if device != "cpu" and setting != "false":
        assert "a GPU context does not survive a fork" in why


def test_gpt4all_api_alone_serves_with_the_platform_set_to_windows(tmp_path: Path) -> None:
    """Without the watchdog, nothing Linux- or POSIX-only is in the server's path."""
    config = write_config(tmp_path)
    code = pretend("win32") + f"import runpy; sys.argv = ['gpt4all_api.py', '--config', {str(config)!r}]\n" \
        "runpy.run_path('gpt4all_api.py', run_name='__main__')\n"
    server = Process("gpt4all_api.py", config, cwd=str(REPO), command=[sys.executable, "-c", code])
    try:
        server.wait_ready()
        status, _, body = request(server.base_url, "POST", "/v1/chat/completions", {
            "messages": [{"role": "user", "content": "Say hello."}], "max_tokens": 8}, timeout=120)
        assert status == 200, body
    finally:
        server.stop()
