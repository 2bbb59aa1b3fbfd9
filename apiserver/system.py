"""What this system offers the watchdog and its workers, one capability at a time, and the fallback
where it does not (docs/design.md, "Platforms"): the one module that asks sys.platform, /proc and
prctl. Every other module asks it. Nothing system-specific runs at import time; each answer is
computed when it is first asked for.

    capability          where                 without it
    seqpacket           Linux                 the control channel is a stream pair, length-prefixed (channel.py)
    pidfds              Linux 5.3             the zygote's loop polls waitpid for its children's exits
    proc                Linux                 no CPU share (n_threads = 0 counts the cores), no RSS (max_rss_mb
                                              is not enforced), no page maps, no prompt-cache tokenizer
    process_names       Linux (prctl)         processes keep their command line in ps and top
    subreaper           Linux (prctl)         the zygote is not used
    page_control        Linux (madvise)       no huge pages, no page-map pre-warm
    tcp_info            Linux                 the backlog metric is omitted
    memory_files        Linux (memfd)         the prompt cache keeps no saved contexts
    idle_threads        Linux (SCHED_IDLE)    a spare loads its model at normal priority
    fork_safe(device)   Linux, device = cpu   each worker is spawned and loads the model itself

GPT4ALL_API_PORTABLE=1 in the environment (inherited by the workers) makes every Linux extra
answer "no", as on macOS or another POSIX system: CI's second pass runs the integration suites so
(tests/test_portable.py). Imports only the standard library.
"""

from __future__ import annotations

import ctypes
import functools
import os
import socket
import sys

PORTABLE_ENV = "GPT4ALL_API_PORTABLE"
PR_SET_NAME, PR_SET_CHILD_SUBREAPER = 15, 36  # prctl options
WSL_MESSAGE = ("watchdog.py does not run on Windows itself: it needs POSIX signals and socket hand-over. "
               "Run it under WSL2 (wsl --install, then follow the README inside Ubuntu), which runs the "
               "Linux path as tested; gpt4all_api.py alone runs on Windows without the watchdog.")


def portable() -> bool:
    """The Linux extras are switched off (GPT4ALL_API_PORTABLE=1)."""
    return os.environ.get(PORTABLE_ENV) == "1"


def linux() -> bool:
    """Linux, with its extras allowed."""
    return sys.platform.startswith("linux") and not portable()


def seqpacket() -> bool:
    return linux() and hasattr(socket, "SOCK_SEQPACKET")


def pidfds() -> bool:
    return linux() and hasattr(os, "pidfd_open")


def proc() -> bool:
    return linux() and os.path.exists("/proc/self/stat")


def process_names() -> bool:
    return linux()


def page_control() -> bool:
    return linux()


def tcp_info() -> bool:
    return linux() and hasattr(socket, "TCP_INFO")


def memory_files() -> bool:
    return linux() and hasattr(os, "memfd_create")


def idle_threads() -> bool:
    return linux() and hasattr(os, "sched_setscheduler") and hasattr(os, "SCHED_IDLE")


def watchdog_unsupported() -> str | None:
    """Why the watchdog cannot run here (Windows), or None."""
    if sys.platform == "win32" or os.name != "posix":
        return WSL_MESSAGE
    return None


def fork_safe(device: str) -> tuple[bool, str]:
    """(whether workers may be forked from a loaded model here, why in words)."""
    if device != "cpu":
        return False, f"device = {device}: a GPU context does not survive a fork"
    if portable():
        return False, f"{PORTABLE_ENV}=1 switches the Linux extras off"
    if not sys.platform.startswith("linux"):
        return False, f"forking a loaded model is done on Linux only (this is {sys.platform})"
    return True, "Linux, device = cpu"


@functools.cache
def _libc() -> ctypes.CDLL:
    return ctypes.CDLL(None, use_errno=True)


def _prctl(option: int, argument: int | bytes) -> bool:
    try:
        return _libc().prctl(option, argument, 0, 0, 0) == 0
    except (OSError, AttributeError):
        return False


def set_process_name(name: str) -> None:
    """Name this process (its main thread) for ps, top and pstree: every forked worker would
    otherwise show the zygote's command line. Linux keeps 15 characters; elsewhere nothing happens."""
    if process_names():
        _prctl(PR_SET_NAME, name.encode()[:15])


def become_subreaper() -> bool:
    """PR_SET_CHILD_SUBREAPER: orphaned descendants (the zygote's workers) become our children."""
    return linux() and _prctl(PR_SET_CHILD_SUBREAPER, 1)


def rss_mb(pid: int) -> float | None:
    """A process's resident memory in MiB (/proc); None where it cannot be read."""
    if not proc():
        return None
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def child_pids() -> list[int] | None:
    """This process's children (/proc); None where they cannot be listed."""
    if not proc():
        return None
    try:
        with open(f"/proc/self/task/{os.getpid()}/children", encoding="ascii") as children:
            return [int(pid) for pid in children.read().split()]
    except (OSError, ValueError):
        return None


def lower_this_thread_priority() -> bool:
    """SCHED_IDLE for the calling thread alone (Linux); False where that cannot be done."""
    if not idle_threads():
        return False
    try:
        os.sched_setscheduler(0, os.SCHED_IDLE, os.sched_param(0))
    except OSError:
        return False
    return True
