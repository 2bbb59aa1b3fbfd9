"""The prompt cache, watchdog side: the contexts workers saved, kept across their restarts.

A worker that answered saves its evaluated context into a memory file (cache_entry.py) and hands
the file over (MSG_CACHE_ENTRY) before it exits; a later worker asks which entry holds the longest
prefix of its prompt (MSG_CACHE_LOOKUP) and gets that file. Prefixes travel as names (their
hashes, turns.prefix_hashes): the watchdog never sees a prompt, and never reads an entry (the
worker checks it before restoring). A worker announces the entry it will save before its reply
leaves (MSG_CACHE_PENDING): a lookup that the announced entry would answer best waits for it (up
to PENDING_WAIT), so the next turn of a chat never misses the turn just answered.

Entries are kept within the budget ([model] prompt_cache_mb, the memory their files hold), the
least recently used out first. An entry whose every prefix a newer one holds too (the previous
turn of a chat, once the next is saved) goes at once. An entry a worker found bad (MSG_CACHE_BAD),
or that a worker died restoring, is dropped. Imports protocol (the message kinds) only: the
watchdog imports this module.
"""

from __future__ import annotations

import collections
import dataclasses
import logging
import os
from collections.abc import Sequence
from typing import Any, Callable

from apiserver.protocol import (
    MSG_CACHE_BAD,
    MSG_CACHE_ENTRY,
    MSG_CACHE_FOUND,
    MSG_CACHE_LOOKUP,
    MSG_CACHE_PENDING,
    MSG_CACHE_USED,
)

log = logging.getLogger("watchdog")

NAME_BYTES = 16  # turns.HASH_BYTES
PENDING_WAIT = 3.0  # seconds a lookup waits for an announced entry (a save takes milliseconds)

Send = Callable[[Any, bytes, bytes, Sequence[int]], None]  # (worker, kind, payload, fds)


@dataclasses.dataclass
class StoredEntry:
    number: int
    fd: int
    names: set[bytes]
    size: int  # bytes of memory its file holds


@dataclasses.dataclass
class Lookup:
    worker: Any
    number: bytes  # the worker's number for it, echoed in the answer
    names: list[bytes]  # shortest prefix first
    deadline: float | None = None  # after this, announced entries are no longer waited for


def split_names(payload: bytes) -> list[bytes]:
    return [payload[index:index + NAME_BYTES] for index in range(0, len(payload) - NAME_BYTES + 1, NAME_BYTES)]


def memory_held(fd: int) -> int:
    """The bytes of memory a file holds (its allocated blocks, not its length)."""
    return os.fstat(fd).st_blocks * 512


class CacheStore:
    """The entries, the names that find them, the lookups waiting and the entries being restored."""

    def __init__(self, budget: int, send: Send):
        self.budget, self.send = budget, send
        self.entries: collections.OrderedDict[int, StoredEntry] = collections.OrderedDict()  # least recent first
        self.holders: dict[bytes, set[int]] = {}  # name -> numbers of the entries holding that prefix
        self.pending: dict[Any, set[bytes]] = {}  # worker -> names of the entry it announced
        self.lookups: list[Lookup] = []  # waiting for an announced entry
        self.restoring: dict[Any, int] = {}  # worker -> entry handed to it, not yet confirmed sound
        self.numbers = 0

    @property
    def size(self) -> int:
        return sum(entry.size for entry in self.entries.values())

    def set_budget(self, budget: int) -> None:
        """Bytes the entries may hold (0: the cache is off, every entry is refused)."""
        self.budget = budget
        while self.entries and self.size > budget:
            self.drop(next(iter(self.entries)), "")

    def receive(self, worker: Any, kind: bytes, payload: bytes, fds: Sequence[int]) -> bool:
        """A cache message from a worker (True), or not one (False: fds untouched). Lookups are
        answered by answer(), once every message that arrived with them has been read."""
        if kind == MSG_CACHE_LOOKUP:
            self.lookups.append(Lookup(worker, payload[:4], split_names(payload[4:])))
        elif kind == MSG_CACHE_PENDING:
            self.pending[worker] = set(split_names(payload))
        elif kind == MSG_CACHE_ENTRY:
            self.pending.pop(worker, None)
            if fds:
                self.add(fds[0], set(split_names(payload)))
        elif kind in (MSG_CACHE_USED, MSG_CACHE_BAD):
            number = int(payload or b"0")
            if self.restoring.get(worker) == number:
                del self.restoring[worker]
            if kind == MSG_CACHE_BAD:
                self.drop(number, "a worker found it bad")
        else:
            return False
        for fd in fds[1 if kind == MSG_CACHE_ENTRY else 0:]:
            os.close(fd)
        return True

    def add(self, fd: int, names: set[bytes]) -> None:
        size = memory_held(fd)
        if not names or size > self.budget:
            if self.budget:
                log.info("prompt cache: an entry of %.1f MiB is not kept (prompt_cache_mb = %d)", size / 2**20,
                         self.budget >> 20)
            os.close(fd)
            return
        for number in [number for number, entry in self.entries.items() if entry.names <= names]:
            self.drop(number, "")  # a newer entry holds every prefix it held
        self.numbers += 1
        self.entries[self.numbers] = StoredEntry(self.numbers, fd, names, size)
        for name in names:
            self.holders.setdefault(name, set()).add(self.numbers)
        self.set_budget(self.budget)  # the least recently used go

    def drop(self, number: int, why: str) -> None:
        entry = self.entries.pop(number, None)
        if entry is None:
            return
        for name in entry.names:
            holders = self.holders.get(name, set())
            holders.discard(number)
            if not holders:
                self.holders.pop(name, None)
        os.close(entry.fd)
        if why:
            log.warning("prompt cache: entry %d dropped: %s", number, why)

    def answer(self, now: float) -> None:
        """Answer every lookup that can be answered now (after the messages that arrived with it)."""
        waiting = []
        for lookup in self.lookups:
            if not self.answer_one(lookup, now):
                waiting.append(lookup)
        self.lookups = waiting

    def answer_one(self, lookup: Lookup, now: float) -> bool:
        """False while an entry announced by another worker would be its best answer."""
        if lookup.deadline is None:
            lookup.deadline = now + PENDING_WAIT
        for index in range(len(lookup.names) - 1, -1, -1):
            name = lookup.names[index]
            if now < lookup.deadline and any(name in names for worker, names in self.pending.items()
                                             if worker is not lookup.worker):
                return False
            holders = self.holders.get(name)
            if holders:
                order = list(self.entries)
                number = max(holders, key=order.index)  # the most recently used
                self.entries.move_to_end(number)
                self.restoring[lookup.worker] = number
                self.send(lookup.worker, MSG_CACHE_FOUND, b"%d %d %d" % (int.from_bytes(lookup.number, "big"),
                                                                         number, index), [self.entries[number].fd])
                return True
        self.send(lookup.worker, MSG_CACHE_FOUND, b"%d" % int.from_bytes(lookup.number, "big"), [])
        return True

    def worker_gone(self, worker: Any, crashed: bool) -> None:
        """A worker exited: its announced entry will not come; one it died restoring is dropped."""
        self.pending.pop(worker, None)
        self.lookups = [lookup for lookup in self.lookups if lookup.worker is not worker]
        number = self.restoring.pop(worker, None)
        if crashed and number is not None:
            self.drop(number, "the worker that restored it died before it went on")

    def clear(self) -> None:
        for number in list(self.entries):
            self.drop(number, "")

