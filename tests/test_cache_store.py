"""The watchdog's side of the prompt cache (apiserver/cache_store.py): which entry answers a lookup,
waiting for an announced entry, the least-recently-used order within the budget, entries another
covers, and entries dropped because a worker found them bad or died restoring them."""

from __future__ import annotations

import os

import pytest

from apiserver.cache_store import PENDING_WAIT, CacheStore
from apiserver.protocol import (
    MSG_CACHE_BAD,
    MSG_CACHE_ENTRY,
    MSG_CACHE_FOUND,
    MSG_CACHE_LOOKUP,
    MSG_CACHE_PENDING,
    MSG_CACHE_USED,
)

MiB = 1 << 20


def name(text: str) -> bytes:
    return text.encode().ljust(16, b".")[:16]


class Worker:
    def __init__(self, label: str):
        self.label = label

    def __repr__(self) -> str:
        return self.label


class Harness:
    def __init__(self, budget: int = 64 * MiB):
        self.sent: list[tuple[Worker, bytes, bytes, int]] = []
        self.store = CacheStore(budget, self.send)
        self.lookups = 0

    def send(self, worker, kind, payload, fds) -> None:
        held = os.dup(fds[0]) if fds else -1  # as SCM_RIGHTS would: the worker's own copy
        self.sent.append((worker, kind, payload, held))

    def entry(self, worker: Worker, names: list[str], size: int = MiB) -> int:
        fd = os.memfd_create("test entry")
        os.posix_fallocate(fd, 0, size)
        self.store.receive(worker, MSG_CACHE_ENTRY, b"".join(map(name, names)), [fd])
        return max(self.store.entries, default=0)

    def lookup(self, worker: Worker, names: list[str], now: float = 0.0):
        """(entry number, index) the store answered, None for none, "waiting" when it did not answer."""
        self.lookups += 1
        number = self.lookups.to_bytes(4, "big")
        before = len(self.sent)
        self.store.receive(worker, MSG_CACHE_LOOKUP, number + b"".join(map(name, names)), [])
        self.store.answer(now)
        if len(self.sent) == before:
            return "waiting"
        return self.answer(before)

    def answer(self, index: int):
        worker, kind, payload, fd = self.sent[index]
        assert kind == MSG_CACHE_FOUND
        words = payload.split()
        assert int(words[0]) <= self.lookups
        if len(words) == 1:
            return None
        assert fd >= 0 and os.fstat(fd).st_size > 0
        os.close(fd)
        return int(words[1]), int(words[2])


@pytest.fixture
def harness():
    harness = Harness()
    yield harness
    harness.store.clear()


def test_a_lookup_gets_the_entry_holding_its_longest_prefix(harness):
    a, b = Worker("a"), Worker("b")
    short = harness.entry(a, ["system"])
    long = harness.entry(a, ["system2", "system2 user"])
    assert harness.lookup(b, ["system2", "system2 user", "system2 user more"]) == (long, 1)
    assert harness.lookup(b, ["system", "system other"]) == (short, 0)
    assert harness.lookup(b, ["nothing"]) is None


def test_a_lookup_waits_for_the_entry_another_worker_announced(harness):
    a, b = Worker("a"), Worker("b")
    harness.store.receive(a, MSG_CACHE_PENDING, name("turn 1") + name("turn 1 answer"), [])
    assert harness.lookup(b, ["turn 1", "turn 1 answer", "turn 2"]) == "waiting"
    sent = len(harness.sent)
    number = harness.entry(a, ["turn 1", "turn 1 answer"])
    harness.store.answer(0.1)
    assert harness.answer(sent) == (number, 1)


def test_a_lookup_stops_waiting_when_the_announcer_exits_or_after_the_wait(harness):
    a, b = Worker("a"), Worker("b")
    harness.entry(a, ["old"])
    harness.store.receive(a, MSG_CACHE_PENDING, name("old") + name("old new"), [])
    assert harness.lookup(b, ["old", "old new"], now=10.0) == "waiting"
    harness.store.answer(10.0 + PENDING_WAIT + 0.1)
    assert harness.answer(-1)[1] == 0, "past the wait: the best entry there is"
    harness.store.receive(a, MSG_CACHE_PENDING, name("x"), [])
    assert harness.lookup(b, ["x"], now=20.0) == "waiting"
    harness.store.worker_gone(a, crashed=True)
    harness.store.answer(20.0)
    assert harness.answer(-1) is None


def test_a_worker_does_not_wait_for_its_own_announced_entry(harness):
    a = Worker("a")
    harness.store.receive(a, MSG_CACHE_PENDING, name("mine"), [])
    assert harness.lookup(a, ["mine"]) is None


def test_entries_stay_within_the_budget_least_recently_used_first_out():
    harness = Harness(budget=3 * MiB)
    a = Worker("a")
    first = harness.entry(a, ["one"])
    second = harness.entry(a, ["two"])
    third = harness.entry(a, ["three"])
    assert harness.lookup(a, ["one"]) == (first, 0)  # now the most recently used
    fourth = harness.entry(a, ["four"])
    assert set(harness.store.entries) == {first, third, fourth}, "the least recently used went"
    assert harness.store.size <= 3 * MiB
    assert second not in harness.store.entries and harness.lookup(a, ["two"]) is None
    harness.store.set_budget(MiB)
    assert list(harness.store.entries) == [fourth], "shrunk: the most recently used stays"
    harness.store.set_budget(0)
    assert not harness.store.entries
    harness.entry(a, ["five"])
    assert not harness.store.entries, "budget 0: the cache is off"


def test_an_entry_another_covers_goes_at_once(harness):
    a = Worker("a")
    turn_1 = harness.entry(a, ["s", "s u1"])
    title = harness.entry(a, ["s", "s title"])
    turn_2 = harness.entry(a, ["s", "s u1", "s u1 a1 u2"])
    assert set(harness.store.entries) == {title, turn_2}, "turn 1's prefixes are all in turn 2's entry"
    assert turn_1 not in harness.store.entries


def test_an_entry_a_worker_found_bad_is_dropped(harness):
    a, b = Worker("a"), Worker("b")
    number = harness.entry(a, ["p"])
    assert harness.lookup(b, ["p"]) == (number, 0)
    harness.store.receive(b, MSG_CACHE_BAD, b"%d" % number, [])
    assert not harness.store.entries and harness.lookup(b, ["p"]) is None


def test_an_entry_whose_restore_killed_a_worker_is_dropped_and_one_used_well_is_kept(harness):
    a, b, c = Worker("a"), Worker("b"), Worker("c")
    number = harness.entry(a, ["p"])
    assert harness.lookup(b, ["p"]) == (number, 0)
    harness.store.worker_gone(b, crashed=True)
    assert number not in harness.store.entries
    number = harness.entry(a, ["q"])
    assert harness.lookup(c, ["q"]) == (number, 0)
    harness.store.receive(c, MSG_CACHE_USED, b"%d" % number, [])
    harness.store.worker_gone(c, crashed=True)
    assert number in harness.store.entries, "it had been restored and used: the crash came later"


def test_memory_files_are_closed_when_entries_go(harness):
    a = Worker("a")
    number = harness.entry(a, ["p"])
    fd = harness.store.entries[number].fd
    harness.store.clear()
    with pytest.raises(OSError):
        os.fstat(fd)
    harness.store.receive(a, MSG_CACHE_ENTRY, b"", [])  # "nothing saved": no file, nothing to keep
    assert not harness.store.entries
