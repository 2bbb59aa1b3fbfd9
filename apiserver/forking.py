"""The zygote's fork loop: a ready worker forked for each request of the watchdog, and each exit told.

Owns serve_fork_requests (the zygote's main loop after its model is loaded), ForkedWorkers (its
children, each exit told to the watchdog before it is reaped) and fork_worker. Imports system, channel
and protocol.
"""

from __future__ import annotations

import contextlib
import logging
import os
import select
import socket
import time
import traceback
from pathlib import Path
from typing import Any, Callable

from apiserver import system
from apiserver.channel import MAX_MESSAGE
from apiserver.protocol import ENV_CONTROL_FD, ENV_LISTEN_FD, ENV_SENTINEL, EXIT_OK, ZYGOTE_PAGES


def serve_fork_requests(channel: socket.socket, run: Callable[[], int],
                        every_half_second: Callable[[], Any] | None = None, load_seconds: float = 0.0,
                        on_pages: Callable[[bytes], Any] | None = None) -> int:
    """Say ready (and how long the model took to load), then fork a worker running run() for each
    request, until the watchdog hangs up.

    The watchdog sends a sentinel path with three fds (listening socket, control channel, output
    pipe) and gets the worker's pid back, then "exit <pid> <code>" when it ends (ForkedWorkers). A
    worker's written pages, which the watchdog forwards (ZYGOTE_PAGES), go to on_pages."""
    channel.sendall(f"ready {load_seconds:.3f}".encode())
    channel.setblocking(True)
    workers = ForkedWorkers(channel)
    next_tick = time.monotonic() + 0.5
    try:
        while True:
            timeout = workers.poll_every
            if every_half_second is not None:
                until_tick = max(0.0, next_tick - time.monotonic())
                timeout = until_tick if timeout is None else min(timeout, until_tick)
            readable, _, _ = select.select([channel, *workers.pidfds], [], [], timeout)
            workers.report_exits()
            if every_half_second is not None and time.monotonic() >= next_tick:
                every_half_second()
                next_tick = time.monotonic() + 0.5
            if channel not in readable:
                continue
            message, fds, _, _ = socket.recv_fds(channel, MAX_MESSAGE, 3)
            if message.startswith(ZYGOTE_PAGES) and not fds:
                if on_pages is not None:
                    on_pages(message[len(ZYGOTE_PAGES):])
                continue
            if not message or len(fds) != 3:
                for fd in fds:
                    os.close(fd)
                return EXIT_OK  # the watchdog is gone
            pid = fork_worker(channel, Path(message.decode()), fds, run, workers.pidfds)
            for fd in fds:
                os.close(fd)
            workers.add(pid)
            channel.sendall(str(pid).encode())
    finally:
        workers.close()  # the workers still running become the watchdog's children (a subreaper)


class ForkedWorkers:
    """The zygote's workers, its children: each exit is told to the watchdog before it is reaped.

    The watchdog waits for its own children only; a worker is the zygote's. "exit <pid> <code>"
    goes out while the worker is still a zombie, so by the time its pid can be reused the watchdog
    has the message. A pidfd per worker wakes the loop at the exit; without pidfds (system.pidfds:
    Linux before 5.3) the loop looks every POLL_EVERY seconds."""

    POLL_EVERY = 0.05

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.pidfd_of: dict[int, int | None] = {}

    @property
    def pidfds(self) -> list[int]:
        return [fd for fd in self.pidfd_of.values() if fd is not None]

    @property
    def poll_every(self) -> float | None:
        """The loop's longest wait: None (until something happens) when every worker has a pidfd."""
        return self.POLL_EVERY if None in self.pidfd_of.values() else None

    def add(self, pid: int) -> None:
        self.pidfd_of[pid] = None
        if system.pidfds():
            try:
                self.pidfd_of[pid] = os.pidfd_open(pid)
            except OSError:
                pass

    def report_exits(self) -> None:
        for pid in list(self.pidfd_of):
            try:
                ended = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
            except ChildProcessError:  # cannot happen to our own child: forget it
                ended = None
                self.forget(pid)
            if ended is None:
                continue
            code = ended.si_status if ended.si_code == os.CLD_EXITED else -ended.si_status
            try:
                self.channel.sendall(f"exit {pid} {code}".encode())
            except OSError:
                pass  # the watchdog is gone
            os.waitpid(pid, 0)
            self.forget(pid)

    def forget(self, pid: int) -> None:
        fd = self.pidfd_of.pop(pid)
        if fd is not None:
            os.close(fd)

    def close(self) -> None:
        for pid in list(self.pidfd_of):
            self.forget(pid)


def fork_worker(channel: socket.socket, sentinel: Path, fds: list[int], run: Callable[[], int],
                inherited: list[int]) -> int:
    """Fork the worker, run(): in a process group of its own (which the watchdog signals as a
    whole), without the zygote's channel and its pidfds (inherited)."""
    listen_fd, control_fd, output_fd = fds
    pid = os.fork()
    if pid:
        with contextlib.suppress(OSError):  # here too: the watchdog may signal the group at once
            os.setpgid(pid, pid)
        return pid
    code = 70
    try:
        os.setpgid(0, 0)
        channel.close()
        for fd in inherited:
            os.close(fd)
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
