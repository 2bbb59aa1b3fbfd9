"""The watchdog's state machine driven by a fake clock and fake worker processes."""

from __future__ import annotations

import contextlib
import json
import logging
import os
import selectors
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from apiserver.api import ApiError, error_reply
from apiserver.protocol import (
    EXIT_CANNOT_LOAD,
    MSG_CANCEL,
    MSG_CANCELLED,
    MSG_DONE,
    MSG_FULL,
    MSG_GO,
    MSG_METRICS,
    MSG_PAGES,
    MSG_REPORT,
    MSG_RUNNING,
    MSG_STOPPED_ACCEPTING,
    MSG_WANT_SLOT,
    ZYGOTE_PAGES,
)
from apiserver.settings import Settings
from apiserver.unavailable import unavailable_reply
from apiserver.zygote_client import FORK_TIMEOUT
from conftest import REPO
from watchdog import State, Supervisor, Worker, Zygote, describe_exit, remove_stale_files


class FakeProcess:
    """What the Supervisor sees of a worker process; the test moves its sentinel and exit."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.returncode: int | None = None
        self.mtime: int | None = None  # None = no sentinel
        self.signals: list[int] = []
        self.activated = False
        self.rss: float | None = None
        self.lines = [f"fake worker {pid} says goodbye"]
        self.closed = False
        self.told: list[bytes] = []  # control channel messages the watchdog sent it

    def tell(self, kind: bytes, payload: bytes = b"") -> None:
        self.told.append(kind + payload)

    def say(self, kind: bytes, payload: bytes = b"") -> None:
        """The worker sends a control channel message (the Supervisor set on_message)."""
        self.on_message(kind, payload)

    def poll(self) -> int | None:
        return self.returncode

    def heartbeat(self) -> int | None:
        return self.mtime

    def activate(self) -> None:
        self.activated = True

    def send(self, signum: int) -> None:
        self.signals.append(signum)

    def dump_stacks(self) -> None:
        self.signals.append(signal.SIGUSR1)

    def rss_mb(self) -> float | None:
        return self.rss

    def last_lines(self) -> list[str]:
        return self.lines

    def close(self) -> None:
        self.closed = True

    def become_ready(self) -> None:
        self.mtime = 1

    def beat(self) -> None:
        self.mtime += 1


class Harness:
    """A Supervisor, the processes it spawned, and a clock that only moves when told."""

    def __init__(self, **settings: object) -> None:
        defaults = dict(warm_spare=True, heartbeat_timeout=5.0, stop_timeout=3.0, start_timeout=10.0,
                        backoff_max=16.0, healthy_after=30.0, state_dir=Path("/nonexistent"))
        defaults.update(settings)
        self.processes: list[FakeProcess] = []
        self.frozen: FakeProcess | None = None  # a process whose heartbeat stopped
        self.now = 1000.0
        self.not_now = False  # the spawner answers None: "ask again next tick"
        self.supervisor = Supervisor(Settings(config_file=Path("config.ini"), **defaults), self.spawn)

    def spawn(self, sentinel: Path) -> FakeProcess | None:
        if self.not_now:
            return None
        assert sentinel.name == f"worker-5000-{len(self.processes) + 1}.sentinel"
        process = FakeProcess(100 + len(self.processes))
        self.processes.append(process)
        return process

    def tick(self, seconds: float = 0.05) -> None:
        """Let time pass; the live workers keep their heartbeat."""
        self.now += seconds
        for process in self.processes:
            if process.mtime is not None and process.returncode is None and process is not self.frozen:
                process.beat()
        self.supervisor.tick(self.now)

    def state_of(self, process: FakeProcess) -> State | None:
        return next((w.state for w in self.supervisor.workers if w.process is process), None)

    def serving(self) -> FakeProcess:
        """Start up to an ACTIVE worker and a READY spare."""
        self.tick()
        self.processes[0].become_ready()
        self.tick()
        self.processes[1].become_ready()
        self.tick()
        assert [self.state_of(p) for p in self.processes] == [State.ACTIVE, State.READY]
        return self.processes[0]


def test_first_worker_is_activated_and_the_spare_starts_only_then() -> None:
    harness = Harness()
    harness.tick()
    harness.tick()
    assert len(harness.processes) == 1, "one model load at a time"
    first = harness.processes[0]
    first.become_ready()
    harness.tick()
    assert first.activated and harness.state_of(first) is State.ACTIVE
    assert len(harness.processes) == 2
    spare = harness.processes[1]
    spare.become_ready()
    harness.tick()
    assert harness.state_of(spare) is State.READY and not spare.activated
    harness.tick(10)
    assert len(harness.processes) == 2


def test_a_spawner_that_says_not_now_is_asked_again_next_tick() -> None:
    harness = Harness()
    harness.tick()
    harness.processes[0].become_ready()
    harness.not_now = True  # the zygote is loading: the spare is to be forked from it
    harness.tick()
    harness.tick()
    assert len(harness.supervisor.workers) == 1 and harness.supervisor.serial == 1
    harness.not_now = False
    harness.tick()
    assert [worker.serial for worker in harness.supervisor.workers] == [1, 2]  # the spare's sentinel: worker-2


def test_without_warm_spare_one_worker_runs() -> None:
    harness = Harness(warm_spare=False)
    harness.tick()
    harness.processes[0].become_ready()
    harness.tick()
    harness.tick()
    assert harness.processes[0].activated and len(harness.processes) == 1


def test_planned_restart_promotes_the_spare_at_once_and_is_no_failure() -> None:
    harness = Harness()
    active = harness.serving()
    spare = harness.processes[1]
    active.mtime = None  # it served its requests and removed its sentinel
    harness.tick()
    assert harness.state_of(spare) is State.ACTIVE and spare.activated
    assert harness.state_of(active) is State.RETIRING and active.signals == []
    assert len(harness.processes) == 3, "a new spare starts"
    active.returncode = 0
    harness.tick()
    assert harness.state_of(active) is None and active.closed
    assert harness.supervisor.backoff_until < harness.now
    assert harness.supervisor.next_backoff == 1.0


def test_a_worker_that_removes_its_sentinel_and_exits_within_one_poll_is_planned() -> None:
    harness = Harness()
    active = harness.serving()
    active.mtime, active.returncode = None, 0
    harness.tick()
    assert harness.processes[1].activated
    assert harness.supervisor.backoff_until < harness.now


def test_without_a_spare_the_next_worker_is_activated_when_ready() -> None:
    harness = Harness(warm_spare=False)
    harness.tick()
    first = harness.processes[0]
    first.become_ready()
    harness.tick()
    first.mtime = None
    harness.tick()
    second = harness.processes[1]
    assert harness.state_of(second) is State.STARTING
    second.become_ready()
    harness.tick()
    assert second.activated


def test_a_retired_worker_that_lingers_gets_sigterm_then_sigkill() -> None:
    harness = Harness()
    active = harness.serving()
    active.mtime = None
    harness.tick()
    harness.tick(2.9)
    assert active.signals == []
    harness.tick(0.2)
    assert active.signals == [signal.SIGTERM]
    harness.tick(3.1)
    assert active.signals == [signal.SIGTERM, signal.SIGKILL]
    active.returncode = -signal.SIGKILL
    harness.tick()
    assert harness.state_of(active) is None
    assert harness.supervisor.backoff_until < harness.now, "a planned restart is no failure"


def test_crash_of_the_active_worker_promotes_the_spare_and_replaces_it_at_once(
        caplog: pytest.LogCaptureFixture) -> None:
    harness = Harness()
    active = harness.serving()
    spare = harness.processes[1]
    active.returncode = -signal.SIGKILL  # the out-of-memory killer, or an operator
    with caplog.at_level(logging.INFO, logger="watchdog"):
        harness.tick()
    assert spare.activated
    assert "killed by SIGKILL: out of memory?" in caplog.text and "fake worker 100 says goodbye" in caplog.text
    assert "replaced at once" in caplog.text and "backoff" not in caplog.text
    assert len(harness.processes) == 3, "a new spare at once"
    assert harness.supervisor.unavailable(harness.now) is None


def crash_active(harness: Harness) -> float:
    """SIGKILL the active worker; return how long until the next worker starts."""
    active = next(w.process for w in harness.supervisor.workers if w.state is State.ACTIVE)
    active.returncode = -signal.SIGKILL
    count = len(harness.processes)
    harness.tick()
    crashed_at = harness.now
    while len(harness.processes) == count:
        harness.tick(0.25)
    delay = round(harness.now - crashed_at)
    for process in harness.processes:
        if process.returncode is None and process.mtime is None:
            process.become_ready()
    harness.tick()
    return delay


def test_crash_loop_without_an_answer_backs_off_with_growing_delays(caplog: pytest.LogCaptureFixture) -> None:
    harness = Harness(crash_loop_limit=3, crash_loop_window=60.0, backoff_max=16.0)
    harness.serving()
    with caplog.at_level(logging.INFO, logger="watchdog"):
        delays = [crash_active(harness) for _ in range(6)]
    assert delays == [0, 0, 1, 2, 4, 8], "two crashes replaced at once, then the backoff of a crash loop"
    assert "crash loop: 3 workers died within 60 s without one answer" in caplog.text


def test_an_answer_between_crashes_ends_the_run() -> None:
    harness = Harness(crash_loop_limit=3)
    harness.serving()
    delays = []
    for _ in range(5):
        delays.append(crash_active(harness))
        delays.append(crash_active(harness))
        active = next(w.process for w in harness.supervisor.workers if w.state is State.ACTIVE)
        active.mtime = None  # it answered and retires: a planned restart
        harness.tick()
        for process in harness.processes:
            if process.returncode is None and process.mtime is None and process is not active:
                process.become_ready()
        harness.tick()
    assert delays == [0] * 10


def test_crashes_spread_beyond_the_window_are_no_loop() -> None:
    harness = Harness(crash_loop_limit=2, crash_loop_window=10.0)
    harness.serving()
    assert crash_active(harness) == 0
    harness.tick(10.0)
    assert crash_active(harness) == 0
    assert crash_active(harness) == 1, "two within 10 s"


def test_nothing_is_unavailable_while_a_worker_starts_or_serves() -> None:
    harness = Harness()
    harness.tick()
    assert harness.supervisor.unavailable(harness.now) is None, "the first load: clients wait for it"
    harness.serving()
    assert harness.supervisor.unavailable(harness.now) is None


def test_unavailable_while_the_model_cannot_load_says_why_and_when() -> None:
    harness = Harness(warm_spare=False, backoff_max=16.0)
    harness.tick()
    harness.processes[0].lines = ["2026-12-02 10:00:00,123 CRITICAL [42] gpt4all_api: model file /m/x.gguf not found"]
    harness.processes[0].returncode = EXIT_CANNOT_LOAD
    harness.tick()
    reason, retry_in = harness.supervisor.unavailable(harness.now)
    assert reason == "model file /m/x.gguf not found" and retry_in == pytest.approx(1.0)
    harness.tick(1.0)
    assert harness.supervisor.unavailable(harness.now) is None, "a worker is starting: wait for it"
    harness.processes[1].lines = harness.processes[0].lines
    harness.processes[1].returncode = EXIT_CANNOT_LOAD
    harness.tick()
    reason, retry_in = harness.supervisor.unavailable(harness.now)
    assert retry_in == pytest.approx(16.0)
    harness.tick(16.0)
    harness.processes[2].become_ready()
    harness.tick()
    assert harness.supervisor.unavailable(harness.now) is None


def test_crash_backoff_doubles_up_to_the_maximum_and_resets_after_healthy_after() -> None:
    harness = Harness(warm_spare=False, backoff_max=8.0, healthy_after=30.0)
    delays = []
    for _ in range(5):
        harness.tick()
        process = harness.processes[-1]
        process.returncode = 1
        harness.tick()
        crashed_at = harness.now
        count = len(harness.processes)
        while len(harness.processes) == count:
            harness.tick(0.25)
        delays.append(round(harness.now - crashed_at))
    assert delays == [1, 2, 4, 8, 8]
    harness.processes[-1].become_ready()
    harness.tick()
    harness.tick(29)
    assert harness.supervisor.next_backoff == 8.0
    harness.tick(2)
    assert harness.supervisor.next_backoff == 1.0


def test_cannot_load_retries_once_quickly_then_at_the_maximum_and_logs_critical(
        caplog: pytest.LogCaptureFixture) -> None:
    harness = Harness(warm_spare=False, backoff_max=16.0)
    harness.tick()
    harness.processes[0].lines = ["loading", "ERROR cannot load model: no such file models/x.gguf"]
    harness.processes[0].returncode = EXIT_CANNOT_LOAD
    with caplog.at_level(logging.INFO, logger="watchdog"):
        harness.tick()
    critical = [r for r in caplog.records if r.levelno == logging.CRITICAL]
    assert len(critical) == 1 and "no such file models/x.gguf" in critical[0].getMessage()
    harness.tick(0.9)
    assert len(harness.processes) == 1
    harness.tick(0.2)
    assert len(harness.processes) == 2, "one quick retry"
    harness.processes[1].returncode = EXIT_CANNOT_LOAD
    harness.tick()
    harness.tick(15.9)
    assert len(harness.processes) == 2
    harness.tick(0.2)
    assert len(harness.processes) == 3, "then the maximum backoff"


def test_a_hung_active_worker_is_dumped_terminated_killed_and_replaced(caplog: pytest.LogCaptureFixture) -> None:
    harness = Harness()
    active = harness.serving()
    spare = harness.processes[1]
    harness.frozen = active
    with caplog.at_level(logging.INFO, logger="watchdog"):
        harness.tick(4.9)
        assert active.signals == []
        harness.tick(0.2)
    assert active.signals == [signal.SIGUSR1, signal.SIGTERM]
    assert "hangs (no heartbeat for 5.1 s)" in caplog.text
    assert spare.activated
    harness.tick(3.0)
    assert active.signals[-1] == signal.SIGKILL
    active.returncode = -signal.SIGKILL
    harness.tick()
    assert harness.state_of(active) is None and "out of memory" not in caplog.text
    assert len(harness.processes) == 3, "a new spare at once: the hung worker had started"


def test_a_worker_that_never_becomes_ready_is_hung() -> None:
    harness = Harness(start_timeout=10.0)
    harness.tick()
    starting = harness.processes[0]
    harness.tick(9.9)
    assert starting.signals == []
    harness.tick(0.2)
    assert starting.signals == [signal.SIGUSR1, signal.SIGTERM]
    assert harness.state_of(starting) is State.RETIRING


def test_a_spare_with_a_stale_heartbeat_is_hung_too() -> None:
    harness = Harness()
    harness.serving()
    spare = harness.processes[1]
    harness.frozen = spare
    harness.tick(5.1)
    assert spare.signals == [signal.SIGUSR1, signal.SIGTERM]
    assert harness.state_of(harness.processes[0]) is State.ACTIVE


def test_memory_above_max_rss_mb_swaps_in_the_spare_and_terminates_the_old_one() -> None:
    harness = Harness(max_rss_mb=100)
    active = harness.serving()
    spare = harness.processes[1]
    active.rss = 99.0
    harness.tick()
    assert harness.state_of(active) is State.ACTIVE
    active.rss = 150.0
    harness.tick()
    assert spare.activated and active.signals == [signal.SIGTERM]
    assert harness.supervisor.backoff_until < harness.now


def test_memory_limit_without_spare_waits_for_a_successor() -> None:
    harness = Harness(max_rss_mb=100, warm_spare=False)
    harness.tick()
    active = harness.processes[0]
    active.become_ready()
    harness.tick()
    active.rss = 150.0
    harness.tick()
    assert active.signals == [] and len(harness.processes) == 2
    harness.processes[1].become_ready()
    harness.tick()
    assert harness.processes[1].activated and active.signals == [signal.SIGTERM]


def test_reload_keeps_the_active_worker_until_its_successor_is_ready() -> None:
    harness = Harness()
    active = harness.serving()
    old_spare = harness.processes[1]
    harness.supervisor.reload(harness.supervisor.settings, harness.now)
    harness.tick()
    assert old_spare.signals == [signal.SIGTERM]
    assert harness.state_of(active) is State.ACTIVE and active.signals == []
    successor = harness.processes[2]
    successor.become_ready()
    harness.tick()
    assert successor.activated and active.signals == [signal.SIGTERM]
    assert len(harness.processes) == 4, "then a new spare"


def test_stop_terminates_every_worker_and_starts_none() -> None:
    harness = Harness()
    active = harness.serving()
    spare = harness.processes[1]
    harness.supervisor.stop(harness.now)
    harness.tick(10)
    assert active.signals[0] == spare.signals[0] == signal.SIGTERM
    assert len(harness.processes) == 2 and not harness.supervisor.finished
    active.returncode = spare.returncode = 0
    harness.tick()
    assert harness.supervisor.finished


@pytest.mark.parametrize("returncode, killed_by_us, words", [
    (0, False, "exited with code 0"),
    (3, False, "exited with code 3"),
    (-signal.SIGSEGV, False, "killed by SIGSEGV"),
    (-signal.SIGKILL, False, "killed by SIGKILL: out of memory?"),
    (-signal.SIGKILL, True, "killed by SIGKILL"),
])
def test_describe_exit(returncode: int, killed_by_us: bool, words: str) -> None:
    assert describe_exit(returncode, killed_by_us) == words


def test_the_watchdogs_503_has_the_shape_of_every_other_error() -> None:
    head, body = unavailable_reply("POST", "/v1/chat/completions", "model file x not found", 3.2).split(b"\r\n\r\n", 1)
    expected = error_reply(ApiError(503, "model file x not found; next try in 4 s", "model_unavailable"))
    assert json.loads(body) == json.loads(expected.body)
    assert head.startswith(b"HTTP/1.1 503 ") and b"\r\nRetry-After: 4\r\n" in head
    head, body = unavailable_reply("GET", "/health", "model file x not found", 0.2).split(b"\r\n\r\n", 1)
    assert json.loads(body) == {"status": "unavailable", "reason": "model file x not found", "retry_in_s": 1}
    assert unavailable_reply("HEAD", "/", "x", 1).endswith(b"\r\n\r\n")


def test_the_503_responder_survives_a_request_target_urlsplit_refuses() -> None:
    import selectors
    import socket as socket_module

    from apiserver.unavailable import Client, UnavailableResponder
    ours, theirs = socket_module.socketpair()
    with ours, theirs:
        responder = UnavailableResponder(selectors.DefaultSelector())
        responder.reason, responder.retry_at = "model file x not found", 0.0
        client = Client(ours, 0.0)
        client.head = b"GET //[ HTTP/1.1\r\n\r\n"
        responder.clients[ours] = client
        responder.selector.register(ours, selectors.EVENT_READ)
        responder.answer(client)
        assert theirs.recv(100).startswith(b"HTTP/1.1 503 ")


# ------------------------------------------------------------------------------------------
# Parallel workers: BUSY workers, the box's generation slots, the metrics.
# ------------------------------------------------------------------------------------------


def serving_workers(harness: Harness, count: int) -> list[FakeProcess]:
    """Start until `count` workers are ACTIVE (and a spare READY)."""
    for _ in range(count + 3):
        harness.tick()
        for process in harness.processes:
            if process.mtime is None:
                process.become_ready()
        harness.tick()
    active = [p for p in harness.processes if harness.state_of(p) is State.ACTIVE]
    assert len(active) == count, [harness.state_of(p) for p in harness.processes]
    return active


def test_a_worker_whose_restart_is_due_is_busy_and_the_spare_takes_the_socket_at_once() -> None:
    harness = Harness()
    active = harness.serving()
    spare = harness.processes[1]
    active.say(MSG_STOPPED_ACCEPTING)
    harness.tick()
    assert harness.state_of(active) is State.BUSY and harness.state_of(spare) is State.ACTIVE and spare.activated
    harness.tick()
    assert len(harness.processes) == 3, "a new spare starts while the busy worker answers"
    active.mtime = None  # answered
    harness.tick()
    assert harness.state_of(active) is State.RETIRING
    assert harness.supervisor.restarts["planned"] == 1


def test_a_spare_waits_for_the_answer_it_would_slow() -> None:
    harness = Harness()
    harness.supervisor.spare_may_wait = lambda: True  # spawned, or forked from a ready zygote
    active = harness.serving()
    spare = harness.processes[1]
    active.say(MSG_STOPPED_ACCEPTING)
    harness.tick()
    assert harness.state_of(spare) is State.ACTIVE, "the spare takes the socket at once, as always"
    active.say(MSG_WANT_SLOT)
    harness.tick()
    active.say(MSG_DONE)
    harness.tick()
    assert len(harness.processes) == 2, "no spare while the busy worker generates or sends its answer"
    active.mtime = None  # answered: it removed its sentinel
    harness.tick()
    assert harness.state_of(active) is State.RETIRING and len(harness.processes) == 3


def test_in_keep_loaded_mode_a_missing_spare_waits_for_the_running_generation() -> None:
    harness = Harness(restart_after_requests=0)
    harness.supervisor.spare_may_wait = lambda: True
    active = harness.serving()
    active.say(MSG_WANT_SLOT)
    harness.processes[1].returncode = -9  # the spare was killed
    harness.tick()
    harness.tick()
    assert len(harness.processes) == 2
    active.say(MSG_DONE)
    harness.tick()
    assert len(harness.processes) == 3


def test_a_spare_is_made_at_once_when_no_worker_would_accept_without_it() -> None:
    harness = Harness()
    harness.supervisor.spare_may_wait = lambda: True
    active = harness.serving()
    spare = harness.processes[1]
    active.say(MSG_STOPPED_ACCEPTING)
    harness.tick()
    harness.tick()
    assert len(harness.processes) == 2, "waiting: the busy worker has not answered yet"
    spare.say(MSG_STOPPED_ACCEPTING)  # a second client came meanwhile: nobody accepts now
    harness.tick()
    assert len(harness.processes) == 3


def test_a_spare_is_not_held_back_while_the_zygote_loads() -> None:
    harness = Harness()
    harness.supervisor.spare_may_wait = lambda: False  # the spare loads its own model meanwhile
    active = harness.serving()
    active.say(MSG_STOPPED_ACCEPTING)
    active.say(MSG_WANT_SLOT)
    harness.tick()
    harness.tick()
    assert len(harness.processes) == 3


def test_without_warm_spare_a_busy_worker_is_replaced_once_it_has_gone() -> None:
    harness = Harness(warm_spare=False)
    harness.tick()
    harness.processes[0].become_ready()
    harness.tick()
    harness.processes[0].say(MSG_STOPPED_ACCEPTING)
    harness.tick()
    assert len(harness.processes) == 1
    harness.processes[0].mtime = None
    harness.processes[0].returncode = 0
    harness.tick()
    assert len(harness.processes) == 2


def test_workers_two_keeps_two_active_and_a_spare() -> None:
    harness = Harness(workers=2)
    active = serving_workers(harness, 2)
    assert sum(harness.state_of(p) is State.READY for p in harness.processes) == 1
    assert all(p.activated for p in active)


def test_slots_go_to_the_first_workers_then_the_queue_in_order_then_full() -> None:
    harness = Harness(workers=2, queue_size=1)
    first, second = serving_workers(harness, 2)
    first.say(MSG_WANT_SLOT)
    second.say(MSG_WANT_SLOT)
    assert first.told == [MSG_GO + b"1", MSG_RUNNING + b"2"] and second.told[-1] == MSG_GO + b"2"
    third, fourth = FakeProcess(900), FakeProcess(901)
    for process in (third, fourth):  # two more workers, each with a request taken
        worker = Worker(process.pid, process, State.BUSY, started_at=harness.now)
        harness.supervisor.workers.append(worker)
        process.on_message = lambda kind, payload, worker=worker: harness.supervisor.message(worker, kind, payload)
    third.say(MSG_WANT_SLOT)
    fourth.say(MSG_WANT_SLOT)
    assert third.told == [] and fourth.told == [MSG_FULL], "one may wait (queue_size = 1), the next is refused"
    first.say(MSG_DONE)
    assert third.told == [MSG_GO + b"2"], "the slot passes to the first in line"
    second.say(MSG_DONE)
    assert third.told[-1] == MSG_RUNNING + b"1", "the one left running may use every free core"


def test_a_cancelled_wait_or_a_dead_worker_gives_its_slot_back() -> None:
    harness = Harness(workers=1)
    first = serving_workers(harness, 1)[0]
    spare = next(p for p in harness.processes if harness.state_of(p) is State.READY)
    first.say(MSG_WANT_SLOT)
    spare.say(MSG_WANT_SLOT)
    assert MSG_GO not in [message[:1] for message in spare.told], "one slot, taken: it waits"
    spare.say(MSG_CANCEL)
    assert spare.told[-1] == MSG_CANCELLED and not harness.supervisor.waiting
    spare.say(MSG_WANT_SLOT)
    first.returncode = -9  # killed while generating
    harness.tick()
    assert spare.told[-1] == MSG_GO + b"1", "the dead worker's slot goes to the next in line"
    assert harness.supervisor.crashes == 1 and harness.supervisor.restarts["crash"] == 1


def test_metrics_count_reports_and_restarts_and_survive_the_workers() -> None:
    harness = Harness()
    active = harness.serving()
    for _ in range(3):
        active.say(MSG_REPORT, json.dumps({"route": "/v1/chat/completions", "status": 200, "seconds": 0.5,
                                           "prompt_tokens": 7, "completion_tokens": 5,
                                           "first_token_seconds": 0.1, "tokens_per_second": 30.0}).encode())
    active.say(MSG_REPORT, b"not json")
    active.say(MSG_REPORT, b'["not", "a", "dict"]')
    active.mtime = None
    harness.tick()
    active.returncode = 0
    harness.tick()
    spare = harness.processes[1]
    spare.say(MSG_METRICS)
    text = spare.told[-1][1:].decode()
    assert 'gpt4all_api_requests_total{route="/v1/chat/completions",status="200"} 3' in text
    assert "gpt4all_api_generated_tokens_total 15" in text and "gpt4all_api_prompt_tokens_total 21" in text
    assert 'gpt4all_api_restarts_total{cause="planned"} 1' in text


def test_reload_and_memory_are_restart_causes() -> None:
    harness = Harness(max_rss_mb=100)
    active = harness.serving()
    active.rss = 500
    harness.tick()
    harness.tick()
    assert harness.supervisor.restarts["memory"] == 1
    harness.supervisor.reload(harness.supervisor.settings, harness.now)
    harness.tick()
    assert harness.supervisor.restarts["reload"] >= 1


def test_the_watchdogs_own_503s_count_in_the_metrics() -> None:
    import selectors
    import socket

    from apiserver.unavailable import UnavailableResponder
    from watchdog import UNAVAILABLE_ROUTE

    harness = Harness()
    selector = selectors.DefaultSelector()
    responder = UnavailableResponder(selector)
    responder.on_answer = lambda: harness.supervisor.totals.add({"route": UNAVAILABLE_ROUTE, "status": 503})
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.setblocking(False)
        responder.update(listener, ("model file missing", 30.0))
        with socket.create_connection(listener.getsockname()) as client:
            client.sendall(b"GET /v1/models HTTP/1.1\r\nHost: x\r\n\r\n")
            client.settimeout(5)
            for _ in range(20):
                for key, _ in selector.select(0.1):
                    key.data()
                if responder.answered:
                    break
            assert client.recv(100).startswith(b"HTTP/1.1 503")
    selector.close()
    assert harness.supervisor.totals.requests[(UNAVAILABLE_ROUTE, "503")] == 1


class SleepingZygoteProcess:
    """What Zygote needs of its process: alive until killed."""

    def __init__(self) -> None:
        self.pid, self.killed = 999999, False

    def poll(self) -> int | None:
        return -9 if self.killed else None

    def send(self, signum: int) -> None:
        self.killed = True

    def close(self) -> None:
        pass


def zygote_with_our_end(tmp_path: Path):
    """A Zygote whose channel's other end is the test's: the test plays the zygote process."""
    settings = Settings(config_file=tmp_path / "config.ini", state_dir=tmp_path, start_timeout=60.0)
    listener = socket.socket()
    selector = selectors.DefaultSelector()
    zygote = Zygote(settings, listener, selector)
    zygote.channel, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    zygote.channel.setblocking(False)
    selector.register(zygote.channel, selectors.EVENT_READ, zygote.receive)
    zygote.process = SleepingZygoteProcess()
    theirs.send(b"ready 1.25")

    def pump() -> None:
        for key, _ in selector.select(1.0):
            key.data()
    pump()
    return zygote, theirs, pump, listener


def test_the_watchdog_asks_the_zygote_for_a_fork_without_waiting_for_it(tmp_path: Path) -> None:
    zygote, theirs, pump, listener = zygote_with_our_end(tmp_path)
    assert zygote.ready and zygote.load_seconds == 1.25
    first, second = tmp_path / "worker-1.sentinel", tmp_path / "worker-2.sentinel"
    started = time.monotonic()
    assert zygote.spawn(first) is None  # asked; the answer comes later (the watchdog serves meanwhile)
    assert time.monotonic() - started < 0.5 and zygote.forking
    message, fds, _, _ = socket.recv_fds(theirs, 4096, 3)
    assert message.decode() == str(first) and len(fds) == 3
    for fd in fds:
        os.close(fd)
    assert zygote.spawn(first) is None  # still forking: no second request
    assert zygote.spawn(second) is None
    theirs.setblocking(False)
    with pytest.raises(BlockingIOError):
        theirs.recv(4096)
    theirs.send(str(os.getpid()).encode())
    pump()
    forked = zygote.spawn(first)
    assert forked is not None and forked.pid == os.getpid() and forked.sentinel == first
    assert not zygote.forking
    forked.close()
    zygote.stop()
    listener.close()


def test_a_zygote_that_does_not_answer_a_fork_is_restarted(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    zygote, theirs, pump, listener = zygote_with_our_end(tmp_path)
    process = zygote.process
    assert zygote.spawn(tmp_path / "worker-1.sentinel") is None
    zygote.check(time.monotonic() + 1.0, may_start=False)
    assert zygote.process is process  # still waiting
    with caplog.at_level(logging.WARNING, logger="watchdog"):
        zygote.check(time.monotonic() + FORK_TIMEOUT + 1.0, may_start=False)
    assert process.killed and zygote.process is None and not zygote.forking
    assert "did not fork a worker" in caplog.text
    theirs.close()
    listener.close()


def test_a_workers_written_pages_go_to_the_zygote(tmp_path: Path) -> None:
    harness = Harness()
    forwarded: list[bytes] = []
    harness.supervisor.on_pages = forwarded.append
    harness.serving().say(MSG_PAGES, b"[[4096, 8192]]")
    assert forwarded == [b"[[4096, 8192]]"]
    zygote, theirs, pump, listener = zygote_with_our_end(tmp_path)
    zygote.learn(b"[[4096, 8192]]")
    assert theirs.recv(4096) == ZYGOTE_PAGES + b"[[4096, 8192]]"
    zygote.stop()
    zygote.learn(b"[]")  # no zygote any more: dropped
    listener.close()


def orphan_sleeper() -> int:
    """A process of ours that is not our child, as a worker forked by the zygote is to the watchdog."""
    return int(subprocess.run(["sh", "-c", "sleep 60 >/dev/null 2>&1 & echo $!"], capture_output=True,
                              text=True, check=True).stdout)


def fork_through(zygote: Zygote, theirs: socket.socket, pump, sentinel: Path, pid: int):
    """Ask the zygote for a worker and answer as the zygote would, with pid."""
    assert zygote.spawn(sentinel) is None
    for fd in socket.recv_fds(theirs, 4096, 3)[1]:
        os.close(fd)
    theirs.send(str(pid).encode())
    pump()
    return zygote.spawn(sentinel)


def test_the_exit_of_a_forked_worker_is_what_the_zygote_says(tmp_path: Path) -> None:
    zygote, theirs, pump, listener = zygote_with_our_end(tmp_path)
    pids = [orphan_sleeper() for _ in range(3)]
    try:
        told, unread, lost = (fork_through(zygote, theirs, pump, tmp_path / f"worker-{index}.sentinel", pid)
                              for index, pid in enumerate(pids))
        assert told.poll() is None and unread.poll() is None  # alive, and not our children
        theirs.send(f"exit {pids[0]} 7".encode())
        pump()
        assert told.poll() == 7
        for pid in pids[1:]:
            os.kill(pid, signal.SIGKILL)
        deadline = time.monotonic() + 10
        while any(Path(f"/proc/{pid}").exists() for pid in pids[1:]) and time.monotonic() < deadline:
            time.sleep(0.01)
        theirs.send(f"exit {pids[1]} -15".encode())  # sent before the zygote reaped it: not read yet
        assert unread.poll() == -15
        assert lost.poll() == -signal.SIGKILL  # gone, and the zygote said nothing
        assert zygote.workers == {}
    finally:
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for forked in (told, unread, lost):
            forked.close()
        zygote.stop()
        listener.close()


ZYGOTE_LOOP = """
import os, signal, socket, sys
from apiserver.forking import serve_fork_requests
if sys.argv[2] == "without pidfds":
    del os.pidfd_open
def run():
    name = os.environ["GPT4ALL_API_SENTINEL"].rsplit("/", 1)[1]
    if name == "killed":
        os.kill(os.getpid(), signal.SIGKILL)
    return int(name)
sys.exit(serve_fork_requests(socket.socket(fileno=int(sys.argv[1])), run))
"""


@pytest.mark.parametrize("how", ["with pidfds", "without pidfds"])
def test_the_zygote_forks_each_worker_once_tells_its_exit_and_reaps_it(tmp_path: Path, how: str) -> None:
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    loop = subprocess.Popen([sys.executable, "-c", ZYGOTE_LOOP, str(theirs.fileno()), how], cwd=REPO,
                            pass_fds=[theirs.fileno()])
    theirs.close()
    read, write = os.pipe()
    try:
        ours.settimeout(30)
        assert ours.recv(64).startswith(b"ready ")
        for name, code in (("7", 7), ("killed", -signal.SIGKILL), ("0", 0)):
            socket.send_fds(ours, [str(tmp_path / name).encode()], [read, write, write])
            pid = int(ours.recv(64))
            assert ours.recv(64) == f"exit {pid} {code}".encode()
            deadline = time.monotonic() + 10
            while Path(f"/proc/{pid}").exists() and time.monotonic() < deadline:  # reaped: no zombie left
                time.sleep(0.01)
            assert not Path(f"/proc/{pid}").exists()
        ours.close()
        assert loop.wait(30) == 0
    finally:
        os.close(read)
        os.close(write)
        if loop.poll() is None:
            loop.kill()
            loop.wait()


def test_a_start_removes_the_files_of_a_previous_run_on_its_port_only(tmp_path: Path) -> None:
    settings = Settings(config_file=tmp_path / "config.ini", port=5000, state_dir=tmp_path)
    ours = ["worker-5000-3.sentinel", "zygote-5000.sentinel", "prompt-cache-self-test-5000.json"]
    theirs = ["worker-5001-3.sentinel", "zygote-5001.sentinel", "prompt-cache-self-test-5001.json"]
    for name in ours + theirs:
        (tmp_path / name).touch()
    remove_stale_files(settings)
    assert sorted(path.name for path in tmp_path.iterdir()) == sorted(theirs)
