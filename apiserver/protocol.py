"""The worker protocol shared by watchdog.py and its workers (see ../shared/DESIGN.md).

Owns the exit codes, the environment variables a worker is started with, the sentinel file (created
when ready, touched as a heartbeat, removed when a restart is due), the control channel (its
messages, and WatchdogLink, the worker's end), the zygote's fork loop, and the one exponential
Backoff used by the supervisor and the zygote. Imports only the standard library: it is a leaf, and
watchdog.py may import it.
"""

from __future__ import annotations

import contextlib
import ctypes
import json
import logging
import math
import os
import queue
import select
import socket
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Tuple

log = logging.getLogger("gpt4all_api")

# Exit codes the watchdog understands.
EXIT_OK = 0
EXIT_CANNOT_LOAD = 3  # config or model cannot load: retrying at once will not help
EXIT_ORPHANED = 4  # the watchdog went away

# Environment variables set by watchdog.py for its workers.
ENV_LISTEN_FD = "GPT4ALL_API_LISTEN_FD"  # fd of the inherited listening socket
ENV_CONTROL_FD = "GPT4ALL_API_CONTROL_FD"  # the worker's end of its control channel (below)
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


# --------------------------------------------------------------------------------------------
# The control channel: a SOCK_SEQPACKET socket pair per worker, one message per packet, a kind
# byte then its payload. EOF on the worker's side: the watchdog died, exit at once.
# --------------------------------------------------------------------------------------------

# watchdog -> worker
MSG_ACTIVATE = b"A"  # start accepting on the socket
MSG_GO = b"G"  # a generation slot is yours; payload: generations running on the box, yours included
MSG_FULL = b"F"  # no slot and the box's queue is full: answer 503 queue_full
MSG_RUNNING = b"N"  # payload: generations now running on the box (CPU threads are divided by it)
MSG_CANCELLED = b"c"  # your cancel is done: the slot or the place in the queue is given up
MSG_METRICS_TEXT = b"m"  # payload: the box's metrics in Prometheus' text format
# worker -> watchdog
MSG_STOPPED_ACCEPTING = b"S"  # a restart is due: leave the socket to another worker
MSG_WANT_SLOT = b"W"  # a generation is ready to run: wait for MSG_GO (or MSG_FULL)
MSG_DONE = b"D"  # the generation finished: its slot is free
MSG_CANCEL = b"C"  # the client left while waiting for a slot
MSG_REPORT = b"R"  # payload: JSON of one finished request (metrics.RequestReport's fields)
MSG_METRICS = b"M"  # ask for MSG_METRICS_TEXT
MSG_LOADED = b"L"  # payload: seconds the model took to load
MSG_PAGES = b"P"  # payload: JSON [[address, length], ...], the pages this forked worker wrote (for the zygote)
ZYGOTE_PAGES = b"pages "  # watchdog to zygote: + MSG_PAGES's payload, forwarded
MAX_MESSAGE = 1 << 20


def control_channel() -> Tuple[socket.socket, socket.socket]:
    """(watchdog's end, worker's end), neither inheritable (pass_fds or SCM_RIGHTS hand it over)."""
    return socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)


def read_control_pipe(fd: int, on_activate: Callable[[], None]) -> None:
    """Activation only (tests' fake worker): b"A" calls on_activate; EOF: exit at once."""
    while True:
        try:
            data = os.read(fd, MAX_MESSAGE)
        except InterruptedError:
            continue
        if not data:
            orphaned()
        if data[:1] == MSG_ACTIVATE:
            on_activate()


def orphaned() -> None:
    """The watchdog is gone: exit at once, freeing the port and the model's memory."""
    log.warning("the watchdog is gone; exiting")
    logging.shutdown()
    os._exit(EXIT_ORPHANED)


class SlotRefused(Exception):
    """The box's queue is full (MSG_FULL)."""


class WatchdogLink:
    """The worker's end of its control channel: activation, generation slots, reports, metrics.

    A reader thread dispatches what the watchdog sends; any thread may send. Slot requests come
    one at a time (the engine holds its generation lock around them), metrics queries too.
    """

    def __init__(self, fd: int) -> None:
        self.channel = socket.socket(fileno=fd)
        self.on_activate: Callable[[], None] = lambda: None
        self.on_running: Callable[[int], None] = lambda running: None
        self.slot_answers: "queue.Queue[bytes]" = queue.Queue()
        self.metrics_answers: "queue.Queue[bytes]" = queue.Queue()
        self.query_lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self.read_messages, name="control-channel", daemon=True).start()

    def read_messages(self) -> None:
        while True:
            try:
                data = self.channel.recv(MAX_MESSAGE)
            except InterruptedError:
                continue
            except OSError:
                data = b""
            if not data:
                orphaned()
            kind, payload = data[:1], data[1:]
            if kind == MSG_ACTIVATE:
                self.on_activate()
            elif kind in (MSG_GO, MSG_FULL, MSG_CANCELLED):
                self.slot_answers.put(data)
                if kind == MSG_GO:
                    self.on_running(int(payload or b"1"))
            elif kind == MSG_RUNNING:
                self.on_running(int(payload or b"1"))
            elif kind == MSG_METRICS_TEXT:
                self.metrics_answers.put(payload)

    def send(self, kind: bytes, payload: bytes = b"") -> None:
        try:
            self.channel.send(kind + payload)
        except OSError:
            pass  # the watchdog is gone: the reader thread exits the process

    def acquire_slot(self, still_wanted: Callable[[], bool]) -> int:
        """Wait for a generation slot; return how many generations run on the box with ours, or 0
        when still_wanted() turned False and the wait was given up. SlotRefused: the queue is full."""
        self.send(MSG_WANT_SLOT)
        while True:
            try:
                answer = self.slot_answers.get(timeout=0.2)
            except queue.Empty:
                if still_wanted():
                    continue
                self.send(MSG_CANCEL)
                while self.slot_answers.get() != MSG_CANCELLED:
                    pass  # a slot granted just before the cancel: given back by it
                return 0
            if answer[:1] == MSG_FULL:
                raise SlotRefused()
            if answer[:1] == MSG_GO:
                return int(answer[1:] or b"1")

    def release_slot(self) -> None:
        self.send(MSG_DONE)

    def report(self, fields: Dict[str, Any]) -> None:
        self.send(MSG_REPORT, json.dumps(fields).encode())

    def report_pages(self, ranges: List[Tuple[int, int]]) -> None:
        """The pages this forked worker wrote, for the zygote's next workers to copy ahead."""
        self.send(MSG_PAGES, json.dumps(ranges).encode())

    def metrics_text(self, timeout: float = 5.0) -> Optional[bytes]:
        """The box's metrics from the watchdog; None when it does not answer in time."""
        with self.query_lock:
            while not self.metrics_answers.empty():
                self.metrics_answers.get_nowait()  # a late answer to a query that timed out
            self.send(MSG_METRICS)
            try:
                return self.metrics_answers.get(timeout=timeout)
            except queue.Empty:
                return None


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
                        every_half_second: Optional[Callable[[], Any]] = None, load_seconds: float = 0.0,
                        on_pages: Optional[Callable[[bytes], Any]] = None) -> int:
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
    has the message. A pidfd per worker wakes the loop at the exit; without pidfds (Linux before
    5.3) the loop looks every POLL_EVERY seconds."""

    POLL_EVERY = 0.05

    def __init__(self, channel: socket.socket) -> None:
        self.channel = channel
        self.pidfd_of: Dict[int, Optional[int]] = {}

    @property
    def pidfds(self) -> List[int]:
        return [fd for fd in self.pidfd_of.values() if fd is not None]

    @property
    def poll_every(self) -> Optional[float]:
        """The loop's longest wait: None (until something happens) when every worker has a pidfd."""
        return self.POLL_EVERY if None in self.pidfd_of.values() else None

    def add(self, pid: int) -> None:
        try:
            self.pidfd_of[pid] = os.pidfd_open(pid)
        except (AttributeError, OSError):
            self.pidfd_of[pid] = None

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


def fork_worker(channel: socket.socket, sentinel: Path, fds: List[int], run: Callable[[], int],
                inherited: List[int]) -> int:
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
