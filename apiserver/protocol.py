"""The worker protocol shared by watchdog.py and its workers (see ../shared/DESIGN.md).

Owns the exit codes, the environment variables a worker is started with, the sentinel file (created
when ready, touched as a heartbeat, removed when a restart is due), the control channel (its
messages, and WatchdogLink, the worker's end), and the one exponential Backoff used by the
supervisor and the zygote (forking.py has the zygote's fork loop). The channel's transport is
channel.py. Imports system and channel: watchdog.py may import it.
"""

from __future__ import annotations

import json
import logging
import math
import os
import queue
import socket
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Callable

from apiserver.channel import Channel, close_all

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
ENV_ZYGOTE_SERVES = "GPT4ALL_API_ZYGOTE_SERVES"  # "1": a zygote forks the workers after this one
ENV_WATCHDOG_PID = "GPT4ALL_API_WATCHDOG_PID"  # whose family's CPU time is not "other programs"

# In state_dir, named for the port: the prompt cache's self-test passed in a process of this watchdog
# (reuse_setup.py); the watchdog removes it at its start, so that each run tests once.
SELF_TEST_RECORD = "prompt-cache-self-test-{port}.json"

HEARTBEAT_EVERY = 0.5  # seconds between two touches of the sentinel
BACKOFF_START = 1.0  # seconds: the first delay after a failure


class Sentinel:
    """The sentinel file: created when ready, its mtime the heartbeat, removed when a restart is due."""

    def __init__(self, path: Path | None, every: float = HEARTBEAT_EVERY):
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
# The control channel (channel.py): a socket pair per worker, whole messages, a kind byte then its
# payload. EOF on the worker's side: the watchdog died, exit at once.
# --------------------------------------------------------------------------------------------

# watchdog -> worker
MSG_ACTIVATE = b"A"  # start accepting on the socket
MSG_GO = b"G"  # a generation slot is yours; payload: generations running on the box, yours included
MSG_FULL = b"F"  # no slot and the box's queue is full: answer 503 queue_full
MSG_RUNNING = b"N"  # payload: generations now running on the box (CPU threads are divided by it)
MSG_CANCELLED = b"c"  # your cancel is done: the slot or the place in the queue is given up
MSG_METRICS_TEXT = b"m"  # payload: the box's metrics in Prometheus' text format
MSG_CACHE_FOUND = b"f"  # payload: "<lookup> <entry> <index>" with the entry's memory file; "<lookup>": none
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
# The prompt cache (prompt_cache.py, cache_store.py). A prompt prefix is named by its hash
# (turns.prefix_hashes, HASH_BYTES each); payloads list such names, shortest prefix first.
MSG_CACHE_LOOKUP = b"l"  # payload: a 4-byte lookup number, then the names: which entry holds the longest?
MSG_CACHE_PENDING = b"p"  # payload: the names of the entry this worker will save once its reply is sent
MSG_CACHE_ENTRY = b"e"  # payload: those names, with the entry's memory file (no file: nothing was saved)
MSG_CACHE_USED = b"u"  # payload: an entry's number: restored here, and the prompt went on from it
MSG_CACHE_BAD = b"b"  # payload: an entry's number: it failed its checks here; drop it


def read_control_pipe(fd: int, on_activate: Callable[[], None]) -> None:
    """Activation only (tests' fake worker): b"A" calls on_activate; EOF: exit at once."""
    channel = Channel(socket.socket(fileno=fd))
    while (message := channel.receive()) is not None:
        close_all(message[1])
        if message[0][:1] == MSG_ACTIVATE:
            on_activate()
    orphaned()


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
        self.channel = Channel(socket.socket(fileno=fd))
        self.on_activate: Callable[[], None] = lambda: None
        self.on_running: Callable[[int], None] = lambda running: None
        self.slot_answers: queue.Queue[bytes] = queue.Queue()
        self.metrics_answers: queue.Queue[bytes] = queue.Queue()
        self.cache_answers: queue.Queue[tuple[bytes, list[int]]] = queue.Queue()
        self.query_lock = threading.Lock()
        self.lookups = 0

    def start(self) -> None:
        threading.Thread(target=self.read_messages, name="control-channel", daemon=True).start()

    def read_messages(self) -> None:
        while True:
            message = self.channel.receive()
            if message is None:
                orphaned()
                return
            data, fds = message
            kind, payload = data[:1], data[1:]
            if kind == MSG_CACHE_FOUND:
                self.cache_answers.put((payload, fds))
                continue
            close_all(fds)
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

    def send(self, kind: bytes, payload: bytes = b"", fds: Sequence[int] = ()) -> None:
        try:
            self.channel.send(kind + payload, fds)
        except OSError:
            pass  # the watchdog is gone (the reader thread exits the process), or a message too big

    def ask_cache(self, names: bytes) -> int:
        """Ask which entry holds the longest of these prefixes (the answer comes while the caller
        goes on: cache_answer); returns the lookup's number."""
        with self.query_lock:
            self.lookups += 1
            number = self.lookups
        self.send(MSG_CACHE_LOOKUP, number.to_bytes(4, "big") + names)
        return number

    def cache_answer(self, number: int, timeout: float) -> tuple[int, int, int] | None:
        """The answer to lookup number: (entry, index of its name, its memory file, ours to close),
        or None (none, or no answer in time). Answers to an earlier lookup that timed out are
        recognised by their number and thrown away."""
        deadline = time.monotonic() + timeout
        while True:
            try:
                payload, fds = self.cache_answers.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                return None
            words = payload.split()
            if words[:1] == [str(number).encode()] and len(words) == 3 and len(fds) == 1:
                return int(words[1]), int(words[2]), fds[0]
            close_all(fds)
            if words[:1] == [str(number).encode()]:
                return None

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

    def report(self, fields: dict[str, Any]) -> None:
        self.send(MSG_REPORT, json.dumps(fields).encode())

    def report_pages(self, ranges: list[tuple[int, int]]) -> None:
        """The pages this forked worker wrote, for the zygote's next workers to copy ahead."""
        self.send(MSG_PAGES, json.dumps(ranges).encode())

    def metrics_text(self, timeout: float = 5.0) -> bytes | None:
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
