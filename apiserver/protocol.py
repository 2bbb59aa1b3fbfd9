"""The worker protocol shared by watchdog.py and its workers (see ../shared/DESIGN.md).

Owns the exit codes, the environment variables a worker is started with, the sentinel file (created
when ready, touched as a heartbeat, removed when a restart is due), the control pipe's reader, the
zygote's fork loop, and the one exponential Backoff used by the supervisor and the zygote. Imports
only the standard library: it is a leaf, and watchdog.py may import it.
"""

from __future__ import annotations

import ctypes
import logging
import math
import os
import socket
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, List, Optional

log = logging.getLogger("gpt4all_api")

# Exit codes the watchdog understands.
EXIT_OK = 0
EXIT_CANNOT_LOAD = 3  # config or model cannot load: retrying at once will not help
EXIT_ORPHANED = 4  # the watchdog went away

# Environment variables set by watchdog.py for its workers.
ENV_LISTEN_FD = "GPT4ALL_API_LISTEN_FD"  # fd of the inherited listening socket
ENV_CONTROL_FD = "GPT4ALL_API_CONTROL_FD"  # read end of a pipe: b"A" = activate, EOF = watchdog gone
ENV_SENTINEL = "GPT4ALL_API_SENTINEL"  # sentinel file: created when ready, touched as heartbeat
ENV_ZYGOTE_FD = "GPT4ALL_API_ZYGOTE_FD"  # a unix socket: this process is the watchdog's zygote
ENV_BACKGROUND = "GPT4ALL_API_BACKGROUND"  # "1": another worker is serving, load at idle priority
ENV_WATCHDOG_PID = "GPT4ALL_API_WATCHDOG_PID"  # whose family's CPU time is not "other programs"

HEARTBEAT_EVERY = 0.5  # seconds between two touches of the sentinel
PR_SET_NAME = 15  # prctl option: the calling thread's name, what ps, top and pstree show
BACKOFF_START = 1.0  # seconds: the first delay after a failure


def set_process_name(name: str) -> None:
    """Name this process (its main thread) for ps, top and pstree: every forked worker would
    otherwise show the zygote's command line. Linux keeps 15 characters; elsewhere nothing happens."""
    if not sys.platform.startswith("linux"):
        return
    try:
        ctypes.CDLL(None, use_errno=True).prctl(PR_SET_NAME, name.encode()[:15], 0, 0, 0)
    except (OSError, AttributeError):
        pass


class Sentinel:
    """The sentinel file: created when ready, its mtime the heartbeat, removed when a restart is due."""

    def __init__(self, path: Optional[Path], every: float = HEARTBEAT_EVERY):
        self.path, self.every = path, every
        self.last_touch = 0.0

    def create(self) -> None:
        if self.path:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self.path.touch()
            self.last_touch = time.monotonic()

    def touch(self) -> None:
        """Beat, at most once every `every` seconds; cheap enough to call for each token."""
        now = time.monotonic()
        if self.path and now - self.last_touch >= self.every:
            self.last_touch = now
            try:
                os.utime(self.path)
            except FileNotFoundError:
                pass  # removed by the watchdog's clean-up: it will replace us

    def remove(self) -> None:
        if self.path:
            try:
                self.path.unlink()
            except FileNotFoundError:
                pass


def read_control_pipe(fd: int, on_activate: Callable[[], None]) -> None:
    """Run in a daemon thread: b"A" calls on_activate; EOF means the watchdog died: exit at once,
    freeing the port and the model's memory."""
    while True:
        try:
            data = os.read(fd, 1)
        except InterruptedError:
            continue
        if not data:
            log.warning("the watchdog is gone; exiting")
            logging.shutdown()
            os._exit(EXIT_ORPHANED)
        if data == b"A":
            on_activate()


class Backoff:
    """The delay before the next try after a failure: BACKOFF_START, doubling up to maximum."""

    def __init__(self, maximum: float) -> None:
        self.maximum = maximum
        self.next_delay = BACKOFF_START  # the delay after the next failure
        self.until = -math.inf  # no try before this time

    def fail(self, now: float, to_maximum: bool = False) -> float:
        """A failure at now: wait the next delay; the one after doubles (or, with to_maximum, is
        the maximum: one quick retry, then the longest wait every time). Returns the delay."""
        delay = min(self.next_delay, self.maximum)
        self.next_delay = self.maximum if to_maximum else min(delay * 2, self.maximum)
        self.until = now + delay
        return delay

    def reset(self) -> None:
        """A success: the next failure waits BACKOFF_START again."""
        self.next_delay = BACKOFF_START

    def waiting(self, now: float) -> bool:
        return now < self.until


# --------------------------------------------------------------------------------------------
# The zygote's side: fork a ready worker for each request of the watchdog.
# --------------------------------------------------------------------------------------------


def serve_fork_requests(channel: socket.socket, run: Callable[[], int],
                        every_half_second: Optional[Callable[[], Any]] = None) -> int:
    """Say ready, then fork a worker running run() for each request, until the watchdog hangs up.

    The watchdog sends a sentinel path with three fds (listening socket, control pipe, output pipe)
    and gets the worker's pid back."""
    channel.sendall(b"ready")
    channel.settimeout(0.5 if every_half_second else None)
    while True:
        try:
            message, fds, _, _ = socket.recv_fds(channel, 4096, 3)
        except socket.timeout:
            every_half_second()
            continue
        if not message or len(fds) != 3:
            return EXIT_OK  # the watchdog is gone
        pid = fork_worker(channel, Path(message.decode()), fds, run)
        for fd in fds:
            os.close(fd)
        channel.sendall(str(pid).encode())


def fork_worker(channel: socket.socket, sentinel: Path, fds: List[int], run: Callable[[], int]) -> int:
    """Fork, fork again and let the middle process exit: the grandchild runs the worker, run(), and
    its parent becomes the watchdog (a child subreaper)."""
    listen_fd, control_fd, output_fd = fds
    reader, writer = os.pipe()
    child = os.fork()
    if child == 0:
        code = 70
        try:
            os.close(reader)
            grandchild = os.fork()
            if grandchild:
                os.write(writer, str(grandchild).encode())
                os._exit(0)
            os.setpgid(0, 0)  # its own process group, which the watchdog signals as a whole
            os.close(writer)
            channel.close()
            os.dup2(output_fd, 1)
            os.dup2(output_fd, 2)
            os.environ.update({ENV_LISTEN_FD: str(listen_fd), ENV_CONTROL_FD: str(control_fd),
                               ENV_SENTINEL: str(sentinel)})
            code = run()
            logging.shutdown()
        except BaseException:
            traceback.print_exc()
        finally:
            os._exit(code)
    os.close(writer)
    pid = int(os.read(reader, 32) or b"0")
    os.close(reader)
    os.waitpid(child, 0)
    return pid
