"""The watchdog's handle on a worker's process (spawned, or forked by the zygote): with
zygote_client.py, the only parts of the watchdog that start, signal and reap processes.

Owns WorkerProcess (a worker's process group, control channel, sentinel and output pipe),
ForkedProcess (what WorkerProcess needs of a Popen, for a forked worker), worker_command
and describe_exit; the zygote's client is zygote_client.py. The Supervisor in
watchdog.py uses only their pids and methods, so unit tests replace them with fakes. Imports
system, channel, settings and protocol: never gpt4all, never the HTTP server.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import selectors
import signal
import socket
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Callable

from apiserver import system
from apiserver.channel import Channel, channel_pair, close_all
from apiserver.protocol import (
    ENV_BACKGROUND,
    ENV_CONTROL_FD,
    ENV_LISTEN_FD,
    ENV_SENTINEL,
    ENV_WATCHDOG_PID,
    ENV_ZYGOTE_FD,
    ENV_ZYGOTE_SERVES,
)
from apiserver.settings import Settings

log = logging.getLogger("watchdog")
# The workers' output, written as is (the workers format their own lines) to logs/server.log.
server_log = logging.getLogger("watchdog.server_log")

WORKER_SCRIPT_ENV = "GPT4ALL_API_WORKER_SCRIPT"  # undocumented: tests run tests/fake_worker.py
OUTPUT_LINES_KEPT = 30
SCRIPTS = Path(__file__).resolve().parent.parent  # where gpt4all_api.py lives


def worker_command(settings: Settings) -> list[str]:
    """The worker's command line: our config, and our address (which may come from our command line)."""
    script = os.environ.get(WORKER_SCRIPT_ENV) or str(SCRIPTS / "gpt4all_api.py")
    return [sys.executable, "-u", script, "--config", str(settings.config_file), "--host", settings.host,
            "--port", str(settings.port)]


def describe_exit(returncode: int, killed_by_us: bool) -> str:
    """A return code in words, as the log shows it."""
    if returncode >= 0:
        return f"exited with code {returncode}"
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    if -returncode == signal.SIGKILL and not killed_by_us:
        return f"killed by {name}: out of memory?"
    return f"killed by {name}"


LOG_PREFIX = re.compile(r"^\S+ \S+ [A-Z]+ \[\d+\] [\w.]+: ")  # settings.LOG_FORMAT up to the message


def log_message_of(line: str) -> str:
    """A worker's log line without its time, level, pid and logger: the reason alone."""
    return LOG_PREFIX.sub("", line)


class WorkerProcess:
    """One worker's process group, control pipe, sentinel file and output pipe.

    The Supervisor uses only pid and the methods, so unit tests replace this class with a fake.
    """

    def __init__(self, popen: subprocess.Popen | ForkedProcess, control: socket.socket, sentinel: Path,
                 selector: selectors.BaseSelector) -> None:
        self.popen = popen
        self.pid = popen.pid
        self.control: Channel | None = Channel(control)
        self.sentinel = sentinel
        self.selector = selector
        assert popen.stdout is not None, "workers are started with their output on a pipe"
        self.output: IO[bytes] | None = popen.stdout
        os.set_blocking(popen.stdout.fileno(), False)
        selector.register(popen.stdout, selectors.EVENT_READ, self.read_output)
        control.setblocking(False)
        selector.register(control, selectors.EVENT_READ, self.read_messages)
        # What the worker says on its control channel (kind, payload, fds): set by the Supervisor.
        self.on_message: Callable[..., None] = lambda kind, payload, fds=(): None
        self.partial_line = b""
        self.recent_lines: collections.deque = collections.deque(maxlen=OUTPUT_LINES_KEPT)
        self.echo_to_log = False

    @classmethod
    def spawn(cls, command: list[str], listen_fd: int, sentinel: Path,
              selector: selectors.BaseSelector, zygote_fd: int | None = None,
              background: bool = False, zygote_serves: bool = False) -> WorkerProcess:
        """Start a worker (or, with zygote_fd, the zygote) in its own process group; only it gets
        its end of the control channel. A background worker loads at idle priority. Our session,
        not one of its own: Linux's autogroup shares the CPU between sessions first, so in a session
        of its own an idle-priority load would still take half the machine from the active worker
        (docs/benchmarks.md has the figures)."""
        ours, theirs = channel_pair()  # both non-inheritable: no other child gets them
        env = dict(os.environ, **{ENV_WATCHDOG_PID: str(os.getpid())})
        if zygote_fd is None:
            env.update({ENV_LISTEN_FD: str(listen_fd), ENV_CONTROL_FD: str(theirs.fileno()),
                        ENV_SENTINEL: str(sentinel), ENV_BACKGROUND: "1" if background else "0",
                        ENV_ZYGOTE_SERVES: "1" if zygote_serves else "0"})
            passed: tuple[int, ...] = (listen_fd, theirs.fileno())
        else:  # the zygote hands each forked worker its own fds; it needs the channel only
            command, passed = command + ["--zygote"], (zygote_fd,)
            env[ENV_ZYGOTE_FD] = str(zygote_fd)
        try:
            popen = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, pass_fds=passed,
                                     preexec_fn=os.setpgrp, env=env)
        except OSError:
            ours.close()
            raise
        finally:
            theirs.close()
        return cls(popen, ours, sentinel, selector)

    def poll(self) -> int | None:
        return self.popen.poll()

    def heartbeat(self) -> int | None:
        """The sentinel's mtime in ns, None while it does not exist."""
        try:
            return os.stat(self.sentinel).st_mtime_ns
        except FileNotFoundError:
            return None

    def activate(self) -> None:
        self.tell(b"A")

    def tell(self, kind: bytes, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        """One message on the control channel (with file descriptors, duplicated into the worker);
        lost if the worker has just died (poll() tells how)."""
        if self.control is not None:
            try:
                self.control.send(kind + payload, fds)
            except OSError:
                pass

    def read_messages(self) -> None:
        """Pass each message the worker sent to on_message, until none is waiting. The message's
        file descriptors are on_message's to keep or close."""
        if self.control is None:
            return
        for data, fds in self.control.receive_ready():
            if self.control is None:  # closed by what a message set off
                close_all(fds)
                continue
            self.on_message(data[:1], data[1:], fds)
        if self.control is not None and self.control.eof:
            self.close_control()

    def close_control(self) -> None:
        if self.control is not None:
            self.selector.unregister(self.control.socket)
            self.control.close()
            self.control = None

    def send(self, signum: int) -> None:
        """Signal the worker's whole process group."""
        try:
            os.killpg(self.pid, signum)
        except ProcessLookupError:
            pass

    def dump_stacks(self) -> None:
        """SIGUSR1: the worker's faulthandler writes its stacks, copied from now on into watchdog.log."""
        self.echo_to_log = True
        try:
            os.kill(self.pid, signal.SIGUSR1)
        except ProcessLookupError:
            pass

    def rss_mb(self) -> float | None:
        return system.rss_mb(self.pid)

    def read_output(self) -> None:
        """Copy what the worker printed into server.log a line at a time, until the pipe is empty."""
        while self.output is not None:
            try:
                data = os.read(self.output.fileno(), 1 << 16)
            except BlockingIOError:
                return
            if not data:
                self.close_output()
                data = b"\n" if self.partial_line else b""
            *lines, self.partial_line = (self.partial_line + data).split(b"\n")
            for line in lines:
                self.record_line(line.decode("utf-8", "replace").rstrip("\r"))

    def record_line(self, line: str) -> None:
        self.recent_lines.append(line)
        server_log.info("%s", line)
        if self.echo_to_log:
            log.warning("pid %d: %s", self.pid, line)

    def last_lines(self) -> list[str]:
        return list(self.recent_lines)

    def close_output(self) -> None:
        if self.output is not None:
            self.selector.unregister(self.output)
            self.output.close()
            self.output = None

    def close(self) -> None:
        """After the exit: read its last words and messages, close our ends, remove its sentinel."""
        self.read_output()
        self.close_output()
        self.read_messages()
        self.close_control()
        self.sentinel.unlink(missing_ok=True)


class ForkedProcess:
    """What WorkerProcess needs of a Popen, for a worker forked by the zygote. The zygote is its
    parent and tells us its exit (Zygote.receive sets returncode); if the zygote died first, the
    worker became our child (we are a child subreaper) and we wait for it ourselves."""

    def __init__(self, pid: int, stdout: IO[bytes], hear_zygote: Callable[[int], None]) -> None:
        self.pid, self.stdout, self.hear_zygote = pid, stdout, hear_zygote
        self.returncode: int | None = None

    def poll(self) -> int | None:
        if self.returncode is None:
            try:
                pid, status = os.waitpid(self.pid, os.WNOHANG)
            except ChildProcessError:  # the zygote's child: its exit comes as a message
                if not self.exists():
                    self.hear_zygote(self.pid)  # the zygote sent it before the pid could go
                    if self.returncode is None:  # lost with the zygote
                        self.returncode = -int(signal.SIGKILL)
            else:
                if pid:
                    self.returncode = os.waitstatus_to_exitcode(status)
        return self.returncode

    def exists(self) -> bool:
        try:
            os.kill(self.pid, 0)
        except (ProcessLookupError, PermissionError):  # gone, or the pid is another user's now
            return False
        return True

