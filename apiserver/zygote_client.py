"""The watchdog's client of the zygote (Linux): the zygote's process, started like a worker, and the
fork requests sent to it over its channel; a forked worker comes back as a WorkerProcess on a
ForkedProcess. Also the choice of the process model (choose_process_model): the zygote where
forking a loaded model is safe, each worker spawned to load its own model everywhere else. Imports
system, channel, settings, protocol and worker_process: never gpt4all, never the HTTP server.
"""

from __future__ import annotations

import contextlib
import logging
import os
import selectors
import signal
import socket
import time
from pathlib import Path

from apiserver import system
from apiserver.channel import channel_pair
from apiserver.protocol import ZYGOTE_PAGES, Backoff
from apiserver.settings import Settings
from apiserver.worker_process import ForkedProcess, WorkerProcess, describe_exit, worker_command

log = logging.getLogger("watchdog")

FORK_TIMEOUT = 5.0  # seconds the zygote may take to say the pid of a worker it forks
ZYGOTE_SENTINEL = "zygote-{port}.sentinel"  # in state_dir, named for the port (Settings.state_file)


def choose_process_model(settings: Settings) -> tuple[bool, str]:
    """(whether workers are forked from a zygote, why in words). [watchdog] zygote = auto takes the
    zygote where forking a loaded model is safe (system.fork_safe: Linux, device = cpu), true asks
    for it and is refused (ValueError) where it is not safe, false never uses it."""
    safe, why = system.fork_safe(settings.device)
    if settings.zygote == "false":
        return False, "zygote = false"
    if not safe and settings.zygote == "true":
        raise ValueError(f"[watchdog] zygote = true is refused here: {why}; set zygote = auto (or false) "
                         "to spawn each worker")
    return safe, f"zygote = {settings.zygote}, {why}"


class Zygote:
    """A gpt4all_api.py process that loads the model once and forks ready workers in milliseconds.

    A fresh worker per request would otherwise load the model each time, on the cores the active
    worker is generating on. Any failure here (not Linux, not ready yet, dead, slow to answer) makes
    spawn() return None, and the worker is started the ordinary way.
    """

    def __init__(self, settings: Settings, listener: socket.socket, selector: selectors.BaseSelector) -> None:
        self.settings, self.listener, self.selector = settings, listener, selector
        self.process: WorkerProcess | None = None
        self.channel: socket.socket | None = None
        self.ready = False
        self.starts = 0
        self.started_at = 0.0
        self.backoff = Backoff(settings.backoff_max)
        self.load_seconds: float | None = None
        # A fork asked for and not answered yet (the watchdog never waits for it: a worker's request
        # for a generation slot, arriving meanwhile, would wait as long), and one answered but not
        # yet taken by spawn().
        self.asked: tuple[Path, socket.socket, int, float] | None = None  # sentinel, our end, output, when
        self.forked: WorkerProcess | None = None
        self.workers: dict[int, ForkedProcess] = {}  # forked and not yet told to have exited

    @property
    def loading(self) -> bool:
        """Loading, or about to start for the first time: it will fork the next spare."""
        return not self.ready and (self.process is not None or self.starts == 0)

    def start(self, now: float) -> None:
        # A packet pair: the zygote runs only where system.fork_safe holds, on Linux.
        channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
        self.channel = channel
        try:
            self.process = WorkerProcess.spawn(worker_command(self.settings), self.listener.fileno(),
                                               self.settings.state_file(ZYGOTE_SENTINEL), self.selector,
                                               zygote_fd=theirs.fileno())
        except OSError as error:
            log.warning("cannot start the zygote: %s", error)
            self.channel.close()
            self.channel = None
        finally:
            theirs.close()
        self.ready, self.starts, self.started_at = False, self.starts + 1, now
        if self.process:
            channel.setblocking(False)
            self.selector.register(channel, selectors.EVENT_READ, self.receive)
            log.info("zygote (pid %d) loading the model", self.process.pid)

    def stop(self) -> None:
        if self.process is not None:
            self.process.send(signal.SIGKILL)
            while self.process.poll() is None:
                time.sleep(0.01)
            self.process.close()
        self.receive()  # the exits it told before it died; its living workers are our children now
        if self.channel is not None:
            self.selector.unregister(self.channel)
            self.channel.close()
        self.process, self.channel, self.ready = None, None, False
        self.workers.clear()
        self.forget_fork()

    def forget_fork(self) -> None:
        """Drop the fork asked for, and kill one forked but not taken (nobody will watch it)."""
        if self.asked is not None:
            _, ours, output_read, _ = self.asked
            ours.close()
            os.close(output_read)
            self.asked = None
        if self.forked is not None:
            self.forked.send(signal.SIGKILL)  # its group, and itself (it may not have made its group yet)
            with contextlib.suppress(ProcessLookupError):
                os.kill(self.forked.pid, signal.SIGKILL)
            self.forked.close()
            self.forked = None

    def receive(self) -> None:
        """The zygote speaks: "ready <load seconds>" once, then the pid of each worker it forked,
        and "exit <pid> <code>" when one ends."""
        while self.channel is not None:
            try:
                message = self.channel.recv(64).decode("ascii", "replace")
            except BlockingIOError:
                return
            except OSError:
                message = ""
            if not message:  # it died: check() notices and restarts it
                self.selector.unregister(self.channel)
                self.channel.close()
                self.channel = None
                return
            word, _, rest = message.partition(" ")
            if word == "ready" and not self.ready:
                self.ready = True
                try:
                    self.load_seconds = float(rest) if rest else self.load_seconds
                except ValueError:
                    pass
                log.info("zygote (pid %s) ready: workers are forked from it", self.process.pid if self.process else "?")
            elif word == "exit":
                self.worker_exited(rest)
            elif word.isdigit() and self.asked is not None:
                sentinel, ours, output_read, _ = self.asked
                self.asked = None
                process = ForkedProcess(int(word), os.fdopen(output_read, "rb", buffering=0), self.worker_gone)
                self.workers[process.pid] = process
                self.forked = WorkerProcess(process, ours, sentinel, self.selector)

    def worker_gone(self, pid: int) -> None:
        """A worker's pid is gone: read what the zygote said of it, and wait for its word no more."""
        self.receive()
        self.workers.pop(pid, None)

    def worker_exited(self, pid_and_code: str) -> None:
        """ "exit <pid> <code>": one of the zygote's workers ended (it is reaped right after)."""
        try:
            pid, code = map(int, pid_and_code.split())
        except ValueError:
            return
        process = self.workers.pop(pid, None)
        if process is not None:
            process.returncode = code

    def check(self, now: float, may_start: bool) -> None:
        """Notice readiness and deaths; restart a dead zygote (when may_start: a worker serves and
        none loads), backing off while it keeps dying."""
        code = self.process.poll() if self.process is not None else None
        if self.process is not None and code is not None:
            log.warning("zygote (pid %d) %s; workers are started without it", self.process.pid,
                        describe_exit(code, False))
            if self.ready:
                self.backoff.reset()  # it served its purpose: start the next one at once
            else:
                self.backoff.fail(now)
            self.stop()
        if self.process is None and not self.backoff.waiting(now) and may_start:
            self.start(now)
        if self.process is not None and not self.ready and now - self.started_at > self.settings.start_timeout:
            log.warning("zygote (pid %d) not ready after %g s: restarting it", self.process.pid,
                        self.settings.start_timeout)
            self.stop()
            self.backoff.fail(now)
        if self.asked is not None and now - self.asked[3] > FORK_TIMEOUT:
            log.warning("the zygote did not fork a worker in %g s: restarting it", FORK_TIMEOUT)
            self.stop()

    def learn(self, pages: bytes) -> None:
        """A worker's written pages: the zygote adds them to what its next workers copy ahead."""
        if self.channel is not None and self.ready:
            try:
                self.channel.send(ZYGOTE_PAGES + pages)
            except OSError as error:  # too big, or the zygote is busy: its pre-warm stays as it is
                log.info("could not pass a worker's written pages to the zygote: %s", error)

    @property
    def forking(self) -> bool:
        """A fork was asked for: spawn() returns it soon (there is no need to start a worker otherwise)."""
        return self.asked is not None or self.forked is not None

    def spawn(self, sentinel: Path) -> WorkerProcess | None:
        """The worker forked for sentinel, once the zygote said its pid; None until then (the first
        call asks for it)."""
        if self.forked is not None and self.forked.sentinel == sentinel:
            forked, self.forked = self.forked, None
            return forked
        if self.forked is not None:  # forked for a worker no longer wanted
            self.forget_fork()
        if not self.ready or self.channel is None or self.forking:
            return None
        ours, theirs = channel_pair()
        output_read, output_write = os.pipe()
        try:
            socket.send_fds(self.channel, [str(sentinel).encode()],
                            [self.listener.fileno(), theirs.fileno(), output_write])
        except OSError as error:
            log.warning("the zygote did not take a fork request (%s): restarting it", error)
            ours.close()
            os.close(output_read)
            self.stop()
        else:
            self.asked = (sentinel, ours, output_read, time.monotonic())
        finally:
            theirs.close()
            os.close(output_write)
        return None
