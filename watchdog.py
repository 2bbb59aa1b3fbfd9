"""watchdog.py: the product's entry point, `python watchdog.py [--config FILE]`; supervises gpt4all_api.py.

It holds the listening socket (bound once, or systemd's), a lock file and logs/watchdog.log.
`[watchdog] workers` ACTIVE workers accept on the inherited socket while, with warm_spare, a READY
spare waits with its model loaded; a client that comes while no worker accepts waits in the kernel
backlog, so a restart delays it and never refuses it. A worker gets (../shared/DESIGN.md) the
socket's fd in GPT4ALL_API_LISTEN_FD, its end of a control channel in GPT4ALL_API_CONTROL_FD (a
socket pair, apiserver/channel.py and protocol.py: activation, generation slots, request reports, metrics
queries; EOF = the watchdog died: exit at once) and a sentinel path in GPT4ALL_API_SENTINEL (created
when ready, touched as a heartbeat, removed when its requests are done and its restart is due),
plus GPT4ALL_API_BACKGROUND=1 when another worker serves (load at idle priority) and our pid in
GPT4ALL_API_WATCHDOG_PID (the workers' CPU time is not "other programs" to make room for). Its
stdout and stderr come back through one pipe into logs/server.log, of which the watchdog is the
single writer. The metrics' totals live here (apiserver/metrics.py), so they survive every worker.

Worker states, driven by Supervisor.tick(now):

    STARTING --sentinel created--> READY --activated--> ACTIVE --restart due--> BUSY
        |                            |                     |                      |  sentinel removed,
        +----------------------------+---------------------+----------------------+  SIGTERM (hang,
                                    memory, reload, stop) --> RETIRING --exit--> gone

An exit from any other state is a crash. A worker that had become ready is replaced at once; one
that could not start (died before it was ready, EXIT_CANNOT_LOAD, or a crash loop: crash_loop_limit
deaths within crash_loop_window without an answer) makes the watchdog back off (1 s doubling to
backoff_max; backoff_max at once after one quick retry for EXIT_CANNOT_LOAD), and while no worker
is active, ready or starting it answers the clients itself: 503 with the reason
(apiserver/unavailable.py). SIGTERM or SIGINT: graceful stop, exit status 0. SIGHUP: re-read the
config, roll the workers. Exit status 1: another watchdog holds the lock; 2: bad config or cannot
listen. The prompt cache's saved contexts live here too (apiserver/cache_store.py), so that they
outlive the workers that saved them. The process model (the zygote's where forking is safe, else
spawned workers) and everything system-specific come from apiserver/zygote_client.py and
apiserver/system.py. It imports only apiserver.system, channel, settings, protocol, unavailable,
metrics, cache_store, worker_process and zygote_client (the processes' handles): never
gpt4all, never the HTTP server (tests/test_layout.py checks). Read top to bottom: the state
machine, the process-wide pieces, main().
"""

from __future__ import annotations

import argparse
import collections
import dataclasses
import enum
import json
import logging
import math
import os
import selectors
import signal
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO, Callable

from apiserver import system
from apiserver.cache_store import CacheStore
from apiserver.metrics import Box, Totals, accept_queue_length, render
from apiserver.protocol import (
    BACKOFF_START,
    EXIT_CANNOT_LOAD,
    MSG_CANCEL,
    MSG_CANCELLED,
    MSG_DONE,
    MSG_FULL,
    MSG_GO,
    MSG_LOADED,
    MSG_METRICS,
    MSG_METRICS_TEXT,
    MSG_PAGES,
    MSG_REPORT,
    MSG_RUNNING,
    MSG_STOPPED_ACCEPTING,
    MSG_WANT_SLOT,
    SELF_TEST_RECORD,
    Backoff,
)
from apiserver.settings import Settings, add_address_arguments, configure_logging, load_settings, rotating_log_handler
from apiserver.unavailable import UnavailableResponder
from apiserver.worker_process import WorkerProcess, describe_exit, log_message_of, worker_command
from apiserver.zygote_client import ZYGOTE_SENTINEL, Zygote, choose_process_model

log = logging.getLogger("watchdog")
# The workers' output, written as is (the workers format their own lines) to logs/server.log.
server_log = logging.getLogger("watchdog.server_log")

HERE = Path(__file__).resolve().parent
# Files in state_dir, named for the port (Settings.state_file).
LOCK_FILE, WORKER_SENTINEL = "watchdog-{port}.lock", "worker-{port}-{serial}.sentinel"
# The metrics' route label of the 503s the watchdog answers itself while no worker can serve.
UNAVAILABLE_ROUTE = "(watchdog: no worker can serve)"
# Settings that belong to the socket or the lock: a SIGHUP cannot change them.
RESTART_ONLY_SETTINGS = ("host", "port", "backlog", "state_dir")


# --------------------------------------------------------------------------------------------
# The state machine: no system calls of its own, time passed in, so tests drive it with fakes.
# --------------------------------------------------------------------------------------------


class State(enum.Enum):
    STARTING = "starting"  # spawned, loading its model, no sentinel yet
    READY = "ready"  # sentinel exists; waiting as the spare, not accepting
    ACTIVE = "active"  # activated: accepting on the socket
    BUSY = "busy"  # stopped accepting (its restart is due): serving the requests it took, then exits
    RETIRING = "retiring"  # sentinel removed or SIGTERM sent: waiting for its exit


@dataclasses.dataclass(eq=False)  # one worker is one process: compared and hashed by identity
class Worker:
    serial: int
    process: WorkerProcess
    state: State
    started_at: float
    heartbeat_mtime: int | None = None
    heartbeat_at: float = 0.0  # when the sentinel's mtime last changed
    outdated: str = ""  # why an ACTIVE worker is to be replaced once a successor is READY
    outdated_cause: str = ""  # that reason as a metrics label: memory, reload
    stop_deadline: float = math.inf  # RETIRING: when to send the next, harder signal
    terminated: bool = False  # SIGTERM sent
    killed: bool = False  # SIGKILL sent

    def __str__(self) -> str:
        return f"worker {self.serial} (pid {self.process.pid})"


def cache_budget(settings: Settings) -> int:
    """The bytes the prompt cache's entries may hold (0: off; also where there are no memory files)."""
    return settings.prompt_cache_mb << 20 if settings.prompt_cache and system.memory_files() else 0


class Supervisor:
    """Keeps [watchdog] workers ACTIVE workers (and a READY spare) alive, hands out the box's
    generation slots and keeps the metrics' totals; the watchdog calls tick() every poll.

    spawn_process(sentinel) starts a worker process and returns a WorkerProcess (or a fake), or None
    for "not now, ask again next tick". A worker whose restart is due says so (MSG_STOPPED_ACCEPTING)
    and turns BUSY: a READY worker takes its place on the socket at once, so the box keeps accepting
    (GET /metrics and /health answer) while it generates. A worker with a generation to run asks for
    a slot (MSG_WANT_SLOT): at most `workers` run at once, at most queue_size wait (in order); beyond
    that MSG_FULL (503 queue_full). The running ones learn how many run (MSG_RUNNING): with
    n_threads = 0 they divide the free cores by it.
    """

    def __init__(self, settings: Settings, spawn_process: Callable[[Path], WorkerProcess | None]) -> None:
        self.settings = settings
        self.spawn_process = spawn_process
        self.workers: list[Worker] = []
        self.serial = 0
        self.stopping = False
        self.backoff = Backoff(settings.backoff_max)  # BACKOFF: no new worker before backoff.until
        self.failure = ""  # why the last backoff began, in words (for the 503 answers meanwhile)
        self.crash_times: list[float] = []  # crashes of started workers since the last answer
        self.healthy_since: float | None = None  # an ACTIVE worker since then, no failure
        self.running: list[Worker] = []  # holding a generation slot
        self.waiting: collections.deque[Worker] = collections.deque()  # waiting for one, first come first served
        # The metrics: what workers reported, and what only the watchdog knows.
        self.totals = Totals()
        self.restarts: dict[str, int] = collections.Counter()
        self.crashes = 0
        self.model_load_seconds: float | None = None
        self.started_wall = time.time()
        self.backlog: Callable[[], int | None] = lambda: None  # connections no worker accepted yet
        self.on_pages: Callable[[bytes], None] = lambda payload: None  # a worker's written pages, for the zygote
        # The next worker is better made after the answer than beside it: it is spawned (its load
        # would take half the machine from the generation), or forked from a ready zygote. False while
        # a zygote loads: a worker that loads its own model meanwhile is started at once. Set by Watchdog.
        self.spare_may_wait: Callable[[], bool] = lambda: False
        # The prompt cache's saved contexts, kept across the workers' restarts.
        self.cache = CacheStore(cache_budget(settings), lambda worker, kind, payload, fds:
                                worker.process.tell(kind, payload, fds))

    @property
    def finished(self) -> bool:
        return self.stopping and not self.workers

    def find(self, state: State) -> Worker | None:
        return next((worker for worker in self.workers if worker.state is state), None)

    def count(self, state: State) -> int:
        return sum(worker.state is state for worker in self.workers)

    @property
    def serving(self) -> bool:
        """A worker accepts or answers: a new one had better load in the background."""
        return any(worker.state in (State.ACTIVE, State.BUSY) for worker in self.workers)

    # -- what workers say on their control channel -----------------------------------------

    def message(self, worker: Worker, kind: bytes, payload: bytes, fds: Sequence[int] = ()) -> None:
        if self.cache.receive(worker, kind, payload, fds):
            return
        for fd in fds:  # no other message carries one
            os.close(fd)
        if kind == MSG_STOPPED_ACCEPTING and worker.state is State.ACTIVE:
            worker.state = State.BUSY  # tick() (right after this) activates a READY worker in its place
        elif kind == MSG_WANT_SLOT:
            self.want_slot(worker)
        elif kind == MSG_DONE:
            self.free_slot(worker)
        elif kind == MSG_CANCEL:
            self.free_slot(worker)
            worker.process.tell(MSG_CANCELLED)
        elif kind == MSG_REPORT:
            try:
                report = json.loads(payload)
            except ValueError:
                report = None
            if isinstance(report, dict):
                self.totals.add(report)
        elif kind == MSG_METRICS:
            worker.process.tell(MSG_METRICS_TEXT, self.metrics_text().encode("utf-8"))
        elif kind == MSG_PAGES:
            self.on_pages(payload)
        elif kind == MSG_LOADED:
            try:
                self.model_load_seconds = float(payload)
            except ValueError:
                pass

    def want_slot(self, worker: Worker) -> None:
        if worker in self.running or worker in self.waiting:
            return
        if len(self.running) < self.settings.workers:
            self.grant(worker)
        elif len(self.waiting) >= self.settings.queue_size:
            worker.process.tell(MSG_FULL)
        else:
            self.waiting.append(worker)

    def grant(self, worker: Worker) -> None:
        self.running.append(worker)
        worker.process.tell(MSG_GO, str(len(self.running)).encode())
        self.tell_running(but=worker)

    def free_slot(self, worker: Worker) -> None:
        """Its generation ended (or it gave up waiting, or died): the next in line gets the slot
        (grant() tells the others the new count), or the others learn that fewer run."""
        if worker in self.waiting:
            self.waiting.remove(worker)
        if worker not in self.running:
            return
        self.running.remove(worker)
        if self.waiting and len(self.running) < self.settings.workers:  # (workers may have shrunk: SIGHUP)
            self.grant(self.waiting.popleft())
        else:
            self.tell_running()

    def tell_running(self, but: Worker | None = None) -> None:
        for other in self.running:
            if other is not but:
                other.process.tell(MSG_RUNNING, str(len(self.running)).encode())

    def metrics_text(self) -> str:
        by_state = collections.Counter(worker.state for worker in self.workers)
        return render(self.totals, Box(
            model=self.settings.model_id, started_wall=self.started_wall, restarts=self.restarts,
            workers={state.value: by_state[state] for state in State}, crashes=self.crashes,
            running=len(self.running), waiting=len(self.waiting), slots=self.settings.workers,
            backlog=self.backlog(), model_load_seconds=self.model_load_seconds,
            prompt_cache_entries=len(self.cache.entries), prompt_cache_bytes=self.cache.size))

    # -- the state machine ---------------------------------------------------------------------

    def tick(self, now: float) -> None:
        """One poll: react to exits, sentinels, heartbeats and deadlines; then activate and spawn."""
        for worker in list(self.workers):
            returncode = worker.process.poll()
            if returncode is None:
                self.check(worker, now)
            else:
                self.reap(worker, returncode, now)
        self.reset_backoff_if_healthy(now)
        self.activate_or_replace(now)
        self.spawn_if_needed(now)
        self.cache.answer(now)  # lookups that waited for an announced entry, past their wait

    def check(self, worker: Worker, now: float) -> None:
        settings = self.settings
        if worker.state is State.RETIRING:
            if now >= worker.stop_deadline:
                self.escalate(worker, now)
            return
        mtime = worker.process.heartbeat()
        if worker.state is State.STARTING:
            if mtime is not None:
                log.info("%s ready after %.1f s", worker, now - worker.started_at)
                worker.state = State.READY
                worker.heartbeat_mtime, worker.heartbeat_at = mtime, now
            elif now - worker.started_at > settings.start_timeout:
                self.handle_hang(worker, now, f"not ready after {settings.start_timeout:g} s")
        elif mtime is None:
            log.info("%s removed its sentinel: planned restart", worker)
            self.restarts["planned"] += 1
            self.answered()
            self.retire(worker, now, terminate=False)
        elif mtime != worker.heartbeat_mtime:
            worker.heartbeat_mtime, worker.heartbeat_at = mtime, now
        elif now - worker.heartbeat_at > settings.heartbeat_timeout:
            self.handle_hang(worker, now, f"no heartbeat for {now - worker.heartbeat_at:.1f} s")
        if worker.state is State.ACTIVE and settings.max_rss_mb and not worker.outdated:
            rss = worker.process.rss_mb()
            if rss is not None and rss > settings.max_rss_mb:
                worker.outdated = f"resident memory {rss:.0f} MiB above max_rss_mb = {settings.max_rss_mb}"
                worker.outdated_cause = "memory"
                log.warning("%s to be replaced: %s", worker, worker.outdated)

    def reap(self, worker: Worker, returncode: int, now: float) -> None:
        sentinel_removed = worker.process.heartbeat() is None
        worker.process.close()
        self.workers.remove(worker)
        self.free_slot(worker)
        self.cache.worker_gone(worker, crashed=returncode != 0)
        how = describe_exit(returncode, worker.killed)
        if worker.state is State.RETIRING:
            log.info("%s %s after retiring", worker, how)
        elif returncode == 0 and worker.state is not State.STARTING and sentinel_removed:
            log.info("%s removed its sentinel and exited: planned restart", worker)
            self.restarts["planned"] += 1
            self.answered()
        elif returncode == EXIT_CANNOT_LOAD:
            self.crashes += 1
            lines = worker.process.last_lines()
            reason = log_message_of(lines[-1]) if lines else f"{worker} cannot load (no output)"
            log.critical("%s cannot load: %s", worker, lines[-1] if lines else "(no output)")
            self.back_off(now, reason, to_maximum=True)
        else:
            output = "".join(f"\n    {line}" for line in worker.process.last_lines())
            log.error("%s crashed while %s: %s; its last output:%s", worker, worker.state.value, how,
                      output or " (none)")
            self.crashes += 1
            self.restarts["crash"] += 1
            if worker.state is State.STARTING:
                self.back_off(now, f"a worker {how} before it was ready")
            else:
                self.crashed_after_start(now, f"{worker} {how}")

    def answered(self) -> None:
        """A worker answered (a planned restart): crashes before it were no crash loop."""
        self.crash_times.clear()

    def crashed_after_start(self, now: float, what: str) -> None:
        """A worker that became ready died (killed from outside, a crash in a request): replace it
        at once, unless crash_loop_limit such crashes came within crash_loop_window without one
        answer in between (a request that crashes the model every time): then back off."""
        window, limit = self.settings.crash_loop_window, self.settings.crash_loop_limit
        self.crash_times = [time for time in self.crash_times if now - time < window] + [now]
        if len(self.crash_times) >= limit:
            log.warning("crash loop: %d workers died within %g s without one answer", len(self.crash_times), window)
            self.back_off(now, f"{len(self.crash_times)} workers died within {window:g} s without answering "
                               f"(last: {what})")
        else:
            log.info("%s after it was ready: replaced at once (%d of the %d such deaths within %g s that make "
                     "a crash loop)", what, len(self.crash_times), limit, window)

    def handle_hang(self, worker: Worker, now: float, symptom: str) -> None:
        log.error("%s hangs (%s): dumping its stacks, then stopping it", worker, symptom)
        self.restarts["hang"] += 1
        worker.process.dump_stacks()
        starting = worker.state is State.STARTING
        self.retire(worker, now, terminate=True)
        if starting:
            self.back_off(now, f"a worker was {symptom}")
        else:
            self.crashed_after_start(now, f"{worker} hung ({symptom})")

    @property
    def backoff_until(self) -> float:
        return self.backoff.until

    @property
    def next_backoff(self) -> float:
        return self.backoff.next_delay

    def back_off(self, now: float, reason: str, to_maximum: bool = False) -> None:
        """Delay the next worker: 1 s doubling to backoff_max; a worker that cannot load gets one
        quick retry (the file may have been in the middle of a copy), then backoff_max every time."""
        delay = self.backoff.fail(now, to_maximum)
        self.failure = reason
        self.healthy_since = None
        log.warning("backoff: next worker in %g s", delay)

    def reset_backoff_if_healthy(self, now: float) -> None:
        healthy = self.healthy_since is not None and now - self.healthy_since >= self.settings.healthy_after
        if healthy and self.next_backoff > BACKOFF_START:
            log.info("healthy for %g s: crash backoff reset to %g s", self.settings.healthy_after, BACKOFF_START)
            self.backoff.reset()

    def retire(self, worker: Worker, now: float, terminate: bool) -> None:
        """RETIRING: with terminate, SIGTERM (it finishes its requests); either way a deadline."""
        worker.state = State.RETIRING
        worker.stop_deadline = now + self.settings.stop_timeout
        if terminate:
            worker.process.send(signal.SIGTERM)
            worker.terminated = True

    def escalate(self, worker: Worker, now: float) -> None:
        """A RETIRING worker past its deadline: SIGTERM, and SIGKILL after another stop_timeout."""
        if not worker.terminated:
            log.warning("%s still running %g s after retiring: SIGTERM", worker, self.settings.stop_timeout)
            self.retire(worker, now, terminate=True)
        else:
            log.warning("%s still running %g s after SIGTERM: SIGKILL", worker, self.settings.stop_timeout)
            worker.process.send(signal.SIGKILL)
            worker.killed = True
            worker.stop_deadline = math.inf

    def activate_or_replace(self, now: float) -> None:
        """Keep `workers` ACTIVE workers: promote a READY one when one is missing (none yet, or one
        turned BUSY), and in place of an outdated one."""
        if self.stopping:
            return
        for active in [worker for worker in self.workers if worker.state is State.ACTIVE and worker.outdated]:
            successor = self.find(State.READY)
            if successor is None:
                return
            log.info("%s replaced by %s: %s", active, successor, active.outdated)
            self.restarts[active.outdated_cause] += 1
            self.retire(active, now, terminate=True)
            self.activate(successor, now)
        while self.count(State.ACTIVE) < self.settings.workers:
            successor = self.find(State.READY)
            if successor is None:
                return
            self.activate(successor, now)

    def activate(self, worker: Worker, now: float) -> None:
        worker.process.activate()
        worker.state = State.ACTIVE
        if self.healthy_since is None:
            self.healthy_since = now
        log.info("%s active", worker)

    def spawn_if_needed(self, now: float) -> None:
        """Start a worker when one is missing: one model load at a time, none while backing off."""
        if self.stopping or self.backoff.waiting(now) or self.find(State.STARTING):
            return
        # Without warm_spare (memory is short), a BUSY worker is replaced only once it has gone.
        gone = (State.RETIRING, State.BUSY) if self.settings.warm_spare else (State.RETIRING,)
        current = [worker for worker in self.workers if worker.state not in gone and not worker.outdated]
        if len(current) >= self.settings.workers + (1 if self.settings.warm_spare else 0):
            return
        if self.spare_can_wait(current):
            return
        serial = self.serial + 1
        try:
            process = self.spawn_process(self.settings.state_file(WORKER_SENTINEL, serial=serial))
        except OSError as error:
            log.error("cannot start worker %d: %s", serial, error)
            self.serial = serial
            self.back_off(now, f"cannot start a worker: {error}")
            return
        if process is None:
            return  # not now: the spawner is about to have a quicker way (the zygote)
        self.serial = serial
        worker = Worker(self.serial, process, State.STARTING, started_at=now)
        process.on_message = lambda kind, payload, fds=(): self.message(worker, kind, payload, fds)
        self.workers.append(worker)
        log.info("%s started", worker)

    def spare_can_wait(self, current: list[Worker]) -> bool:
        """Only the spare is missing, it may wait (spare_may_wait), and a request is being answered:
        a generation runs or waits for its slot, or a worker is BUSY (it stopped accepting for its
        last request and has not yet removed its sentinel, which it does once the answer is sent).
        Making a spare beside a generation slows it, since llama.cpp's threads wait for each other:
        a fork and the pre-warm's copy by 30 - 45 ms, a spawned worker's model load (0.7 - 1 s of
        CPU, at idle priority) by far more. So the spare is made after the answer, in the pause
        before the next request when there is one. All `workers` accept meanwhile; when one of them
        stops accepting, more than the spare is missing and the next worker is made at once."""
        return (len(current) == self.settings.workers and all(worker.state is State.ACTIVE for worker in current)
                and self.spare_may_wait()
                and bool(self.running or self.waiting or self.find(State.BUSY)))

    def unavailable(self, now: float) -> tuple[str, float] | None:
        """(why, seconds until the next try) while no worker will accept soon: none is active,
        ready or starting, and a backoff runs. None while clients had better wait in the queue."""
        if self.stopping or not self.backoff.waiting(now) or any(
                worker.state is not State.RETIRING for worker in self.workers):
            return None
        return self.failure, self.backoff.until - now

    def reload(self, settings: Settings, now: float) -> None:
        """Roll onto new settings: the ACTIVE worker serves until a new one is READY."""
        self.settings = settings
        self.backoff.maximum = settings.backoff_max
        self.cache.set_budget(cache_budget(settings))
        for worker in self.workers:
            if worker.state is State.ACTIVE:
                worker.outdated, worker.outdated_cause = "config reloaded", "reload"
            elif worker.state in (State.STARTING, State.READY):
                self.restarts["reload"] += 1
                self.retire(worker, now, terminate=True)  # a BUSY one exits after its answer anyway

    def stop(self, now: float) -> None:
        """Graceful stop: SIGTERM to every worker; each finishes its requests within stop_timeout."""
        self.stopping = True
        for worker in self.workers:
            if not worker.terminated:
                self.retire(worker, now, terminate=True)


# --------------------------------------------------------------------------------------------
# The process-wide pieces: lock, socket, logs, signals, the main loop.
# --------------------------------------------------------------------------------------------


class LockHeld(Exception):
    pass


def acquire_lock(path: Path) -> IO[str]:
    """An exclusive flock on path, holding our pid; LockHeld names the pid of the holder."""
    import fcntl  # POSIX: imported here so that this file still loads on Windows, to say it cannot run there

    path.parent.mkdir(parents=True, exist_ok=True)
    handle = open(path, "a+", encoding="ascii")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "unknown"
        handle.close()
        raise LockHeld(f"another watchdog (pid {holder}) holds {path}") from None
    handle.truncate(0)
    handle.write(f"{os.getpid()}\n")
    handle.flush()
    return handle


def open_listening_socket(settings: Settings) -> socket.socket:
    """systemd's socket (LISTEN_PID/LISTEN_FDS, fd 3) when activated by it, else bind host:port."""
    if os.environ.get("LISTEN_PID") == str(os.getpid()) and int(os.environ.get("LISTEN_FDS", "0")) >= 1:
        for name in ("LISTEN_PID", "LISTEN_FDS", "LISTEN_FDNAMES"):
            os.environ.pop(name, None)  # meant for us, not for the workers
        return socket.socket(fileno=3)
    family = socket.getaddrinfo(settings.host, settings.port, type=socket.SOCK_STREAM,
                                flags=socket.AI_PASSIVE)[0][0]
    return socket.create_server((settings.host, settings.port), family=family, backlog=settings.backlog)


def configure_server_log(settings: Settings) -> None:
    """logs/server.log: the workers' lines as they wrote them, through one rotating writer."""
    for handler in list(server_log.handlers):
        server_log.removeHandler(handler)
        handler.close()
    server_log.addHandler(rotating_log_handler(settings, "server.log", logging.Formatter("%(message)s")))
    server_log.setLevel(logging.INFO)
    server_log.propagate = False


def remove_stale_files(settings: Settings) -> None:
    """Sentinels and the self-test's pass of a previous watchdog on our port (other ports' belong to
    running watchdogs): this run's first worker (or zygote) tests the prompt cache afresh."""
    names = (settings.state_file(WORKER_SENTINEL, serial="*").name, settings.state_file(ZYGOTE_SENTINEL).name,
             settings.state_file(SELF_TEST_RECORD).name)
    for path in [path for name in names for path in settings.state_dir.glob(name)]:
        log.info("removing %s, left by a previous run", path)
        path.unlink(missing_ok=True)


def log_what_this_system_lacks(settings: Settings) -> None:
    """Settings that cannot take effect here (apiserver/system.py), said once at start."""
    if settings.max_rss_mb and not system.proc():
        log.warning("max_rss_mb = %d is not enforced here: a worker's resident memory is read from /proc",
                    settings.max_rss_mb)
    if settings.prompt_cache and settings.restart_after_requests and not system.memory_files():
        log.info("prompt cache: contexts are not kept across workers here (no memory files, memfd_create)")


class Watchdog:
    """The main loop: read the workers' output, act on queued signals, tick the Supervisor."""

    def __init__(self, settings: Settings, listener: socket.socket, overrides: dict | None = None) -> None:
        self.listener = listener
        listener.setblocking(False)  # the watchdog accepts on it while no worker can (unavailable.py)
        self.overrides = overrides or {}  # from the command line: they outlive a SIGHUP
        self.selector = selectors.DefaultSelector()
        self.received_signals: list[int] = []
        self.supervisor = Supervisor(settings, self.spawn_worker)
        self.supervisor.backlog = lambda: accept_queue_length(listener)
        self.responder = UnavailableResponder(self.selector)
        # Its 503s count in the metrics too, under a route label of their own.
        self.responder.on_answer = lambda: self.supervisor.totals.add({"route": UNAVAILABLE_ROUTE, "status": 503})
        self.zygote = self.make_zygote(settings)
        self.supervisor.on_pages = self.forward_pages
        self.supervisor.spare_may_wait = lambda: not self.zygote or (self.zygote.ready and not self.zygote.forking)
        self.next_stray_check = 0.0

    def make_zygote(self, settings: Settings) -> Zygote | None:
        """The zygote when the process model is the zygote's (choose_process_model), else None:
        each worker is spawned and loads the model itself (the spare in the pause after an answer)."""
        use_zygote, why = choose_process_model(settings)
        if use_zygote and not system.become_subreaper():
            use_zygote, why = False, "cannot become a child subreaper (prctl)"
        if use_zygote:
            log.info("process model: zygote (%s): workers are forked from one loaded model", why)
            return Zygote(settings, self.listener, self.selector)
        log.info("process model: spawn (%s): each worker loads the model itself%s", why,
                 ", the warm spare after each answer" if settings.warm_spare else "")
        return None

    def forward_pages(self, pages: bytes) -> None:
        if self.zygote:
            self.zygote.learn(pages)

    def reap_strays(self, now: float) -> None:
        """Wait for children we never knew: a worker the zygote forked just before it was killed
        (a subreaper inherits it) would otherwise stay a zombie."""
        if now < self.next_stray_check:
            return
        self.next_stray_check = now + 1.0
        known = {worker.process.pid for worker in self.supervisor.workers}
        if self.zygote and self.zygote.process:
            known.add(self.zygote.process.pid)
        if self.zygote and self.zygote.forked:
            known.add(self.zygote.forked.pid)
        children = system.child_pids()
        for pid in [pid for pid in children or () if pid not in known]:
            try:
                if os.waitpid(pid, os.WNOHANG)[0]:
                    log.info("reaped pid %d, a worker forked for nobody", pid)
            except ChildProcessError:
                pass

    def spawn_worker(self, sentinel: Path) -> WorkerProcess | None:
        """Fork the worker from the zygote when it is ready; start it the ordinary way otherwise.

        One model load at a time, at idle priority while a worker serves: a spare waits (None) for
        the loading zygote, and a worker started beside an active one loads in the background.
        Nobody serving (the first start, a crash without a ready spare): a full-speed load now.
        """
        serving = self.supervisor.serving
        if self.zygote:
            forked = self.zygote.spawn(sentinel)
            if forked or self.zygote.forking or (serving and self.zygote.loading):
                return forked
        return WorkerProcess.spawn(worker_command(self.supervisor.settings), self.listener.fileno(),
                                   sentinel, self.selector, background=serving, zygote_serves=bool(self.zygote))

    def queue_signal(self, signum: int, frame: object) -> None:
        self.received_signals.append(signum)  # nothing else here: the main loop logs and acts

    def run(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            signal.signal(signum, self.queue_signal)
        while not self.supervisor.finished:
            # While nothing can serve soon, the watchdog answers the waiting clients itself; it stops
            # before any worker is activated (both happen in this thread, tick() after this).
            self.responder.update(self.listener, self.supervisor.unavailable(time.monotonic()))
            for key, _ in self.selector.select(self.supervisor.settings.poll_interval):
                key.data()
            self.supervisor.cache.answer(time.monotonic())  # after every message that came with a lookup
            while self.received_signals:
                self.handle_signal(self.received_signals.pop(0), time.monotonic())
            # The zygote starts once a worker serves and none loads: at first start that worker
            # assembles the default model, and two model loads at once would only slow each other.
            if self.zygote and not self.supervisor.stopping:
                may_start = self.supervisor.serving and not self.supervisor.find(State.STARTING)
                self.zygote.check(time.monotonic(), may_start=may_start)
                if self.zygote.load_seconds is not None:  # a new zygote is ready: its load is the last one
                    self.supervisor.model_load_seconds, self.zygote.load_seconds = self.zygote.load_seconds, None
            self.supervisor.tick(time.monotonic())
            self.reap_strays(time.monotonic())
        if self.zygote:
            self.zygote.stop()
        self.selector.close()

    def handle_signal(self, signum: int, now: float) -> None:
        name = signal.Signals(signum).name
        if signum == signal.SIGHUP:
            self.reload(now)
        elif not self.supervisor.stopping:
            log.info("%s: stopping %d worker(s), each within %g s", name, len(self.supervisor.workers),
                     self.supervisor.settings.stop_timeout)
            if self.zygote:
                self.zygote.stop()
            self.supervisor.stop(now)

    def reload(self, now: float) -> None:
        """SIGHUP: re-read the config and roll the workers; a bad config keeps the old settings."""
        if self.supervisor.stopping:
            return
        old = self.supervisor.settings
        try:
            new = load_settings(old.config_file, **self.overrides)
            choose_process_model(new)
        except ValueError as error:
            log.error("SIGHUP: keeping the old settings: %s", error)
            return
        changed = [name for name in RESTART_ONLY_SETTINGS if getattr(new, name) != getattr(old, name)]
        if changed:
            log.warning("SIGHUP: %s changed: that takes a restart of the watchdog; keeping %s",
                        ", ".join(changed), ", ".join(f"{name} = {getattr(old, name)}" for name in changed))
            new = dataclasses.replace(new, **{name: getattr(old, name) for name in changed})
        configure_logging(new, "watchdog.log")
        configure_server_log(new)
        log.info("SIGHUP: %s reloaded, rolling the workers", new.config_file)
        if self.zygote:  # it holds the old model: a new one (if wanted) loads in the background
            self.zygote.stop()
        self.zygote = self.make_zygote(new)
        self.supervisor.reload(new, now)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Run gpt4all_api.py workers on one held socket, "
                                                 "restarting them as config.ini's [watchdog] says.")
    parser.add_argument("--config", type=Path, default=HERE / "config.ini", help="default: %(default)s")
    add_address_arguments(parser)
    args = parser.parse_args(argv)
    unsupported = system.watchdog_unsupported()
    if unsupported:
        print(f"watchdog: {unsupported}", file=sys.stderr)
        return 2
    overrides = {"host": args.host, "port": args.port}
    try:
        settings = load_settings(args.config, **overrides)
        choose_process_model(settings)  # refuses zygote = true where forking is unsafe
    except ValueError as error:
        print(f"watchdog: {error}", file=sys.stderr)
        return 2
    system.set_process_name("gpt4all-watcher")
    lock_file = settings.state_file(LOCK_FILE)
    try:
        lock = acquire_lock(lock_file)
    except LockHeld as error:
        print(f"watchdog: {error}; not starting a second one", file=sys.stderr)
        return 1
    try:
        configure_logging(settings, "watchdog.log")
        configure_server_log(settings)
        try:
            listener = open_listening_socket(settings)
        except OSError as error:
            log.critical("cannot listen on %s:%d: %s", settings.host, settings.port, error)
            return 2
        with listener:
            remove_stale_files(settings)
            log.info("watchdog started: pid %d, config %s, listening on %s:%d, restart_after_requests = %d, "
                     "warm_spare = %s, heartbeat_timeout = %g s, stop_timeout = %g s, backoff_max = %g s, "
                     "max_rss_mb = %d, worker: %s", os.getpid(), settings.config_file,
                     *listener.getsockname()[:2], settings.restart_after_requests, settings.warm_spare,
                     settings.heartbeat_timeout, settings.stop_timeout, settings.backoff_max,
                     settings.max_rss_mb, " ".join(worker_command(settings)))
            log_what_this_system_lacks(settings)
            Watchdog(settings, listener, overrides).run()
        log.info("watchdog stopped")
        return 0
    except Exception:
        log.critical("watchdog failed; its workers exit with it", exc_info=True)
        raise
    finally:
        lock_file.unlink(missing_ok=True)
        lock.close()


if __name__ == "__main__":
    sys.exit(main())
