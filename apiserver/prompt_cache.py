"""The prompt cache, worker side: a fresh worker goes on from the context an earlier worker evaluated.

Before a prompt is evaluated, PromptCache asks the watchdog (cache_store.py) which saved entry holds
the longest prefix of it beyond what this process's own context offers (names only, turns.py), then
checks that entry (cache_entry.py) and restores it: the KV state, the token list and n_past
(kv_state.py). After its last generation the worker announces the entry it will save, and once its
reply has left (and before it exits) it saves its context into a new memory file and hands it over.
Every fault (an entry damaged, truncated or made by another setup, memory short, no answer in
time) means the whole prompt is evaluated instead, with one log line: never a failed request.
Imports protocol, kv_state, turns, cache_entry and reuse_setup.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Collection, Sequence
from typing import Any, NamedTuple

from apiserver.cache_entry import InvalidEntry, memory_file, open_state, read_header, write_entry
from apiserver.kv_state import NativeContext
from apiserver.protocol import MSG_CACHE_BAD, MSG_CACHE_ENTRY, MSG_CACHE_PENDING, MSG_CACHE_USED, WatchdogLink
from apiserver.reuse_setup import ReuseSetup
from apiserver.turns import Evaluated, PromptTokenizer, prefix_hashes

log = logging.getLogger("gpt4all_api")

LOOKUP_TIMEOUT = 5.0  # seconds: the watchdog waits up to cache_store.PENDING_WAIT for an announced entry


class Lookup(NamedTuple):
    number: int  # the link's number for it
    offsets: list[int]  # the boundaries whose names were sent, in order


class RestoreFailed(Exception):
    """The model read a state other than the one given: its context is undefined, start from zero."""


def entry_names(evaluated: Evaluated) -> bytes:
    return b"".join(prefix_hashes(evaluated.text, [offset for offset, _ in evaluated.marks]))


class PromptCache:
    """This worker's side of the watchdog's cache: lookup and restore, announce, save."""

    def __init__(self, model: Any, setup: ReuseSetup, link: WatchdogLink, native: NativeContext,
                 tokenizer: PromptTokenizer):
        assert setup.fingerprint is not None and setup.state_size is not None and setup.state_facts is not None
        self.model, self.setup, self.link, self.native, self.tokenizer = model, setup, link, native, tokenizer
        self.fingerprint, self.state_size, self.state_facts = setup.fingerprint, setup.state_size, setup.state_facts
        self.bound = self.native.state_size_bound()
        self.restored: int | None = None  # the entry restored for the generation running
        self.saves = False  # this worker exits after its current request: it saves its context then
        self.announced = False

    def ask(self, prompt: str, offsets: Sequence[int], local: int) -> Lookup | None:
        """Ask the watchdog which entry holds the longest prefix of prompt ending at one of its
        boundaries (offsets) beyond local (where this process could start); restore() takes the
        answer, so that the caller works meanwhile. None: nothing to ask."""
        positive = [offset for offset in offsets if 0 < offset < len(prompt)]
        beyond = [index for index, offset in enumerate(positive) if offset > local]
        if not beyond:
            return None
        names = prefix_hashes(prompt, positive)
        return Lookup(self.link.ask_cache(b"".join(names[beyond[0]:])), positive[beyond[0]:])

    def restore(self, lookup: Lookup, prompt: str, usable: Collection[int]) -> Evaluated | None:
        """The answer's entry, checked and restored if it holds a usable boundary (one leaving
        enough tokens to evaluate): n_past set, its marks up to there returned. None: nothing
        better, keep the context as it is. RestoreFailed: the context is now undefined."""
        found = self.link.cache_answer(lookup.number, LOOKUP_TIMEOUT)
        if found is None:
            return None
        number, index, fd = found
        offset = lookup.offsets[index] if index < len(lookup.offsets) else -1
        if offset not in usable:
            os.close(fd)
            self.link.send(MSG_CACHE_USED, b"%d" % number)  # not restored: not to blame for what follows
            return None
        started = time.monotonic()
        try:
            entry = read_header(fd, self.fingerprint)
            n_past = dict(entry.evaluated.marks).get(offset)
            if n_past is None or not prompt.startswith(entry.evaluated.text[:offset]):
                raise InvalidEntry("it does not hold the prefix it was found for")
            if list(entry.tokens[:n_past]) != self.tokenizer.ids(prompt[:offset], from_empty=True):
                raise InvalidEntry("its tokens are not this prompt's")
            state = open_state(fd, entry, self.state_facts)
        except (InvalidEntry, OSError) as error:
            log.warning("prompt cache: entry %d not used, the whole prompt is evaluated: %s", number, error)
            self.link.send(MSG_CACHE_BAD, b"%d" % number)
            return None
        finally:
            os.close(fd)
        try:
            read = self.native.restore_state(state.address)
        finally:
            state.close()
        if read != entry.blob_length:
            self.link.send(MSG_CACHE_BAD, b"%d" % number)
            raise RestoreFailed(f"the model read {read} bytes of entry {number}'s {entry.blob_length}")
        self.native.set_tokens(entry.tokens[:n_past])
        self.model.model.context.n_past = n_past
        self.restored = number
        log.debug("prompt cache: %d tokens restored from entry %d in %.1f ms", n_past, number,
                  (time.monotonic() - started) * 1000)
        return entry.evaluated.up_to(offset)

    def went_on(self) -> None:
        """The prompt was evaluated from the restored context: the entry is sound."""
        if self.restored is not None:
            self.link.send(MSG_CACHE_USED, b"%d" % self.restored)
            self.restored = None

    def announce(self, evaluated: Evaluated) -> None:
        """Before the reply leaves: the entry this worker will save (a lookup for it waits for it)."""
        self.link.send(MSG_CACHE_PENDING, entry_names(evaluated))
        self.announced = True

    def save(self, evaluated: Evaluated) -> None:
        """After the reply: the context into a new memory file, handed to the watchdog."""
        if not self.announced:
            return
        fd = memory_file()
        try:
            tokens = self.native.tokens()
            write_entry(fd, self.fingerprint, evaluated, tokens[:evaluated.n_past], self.native.save_state,
                        self.state_size.estimate(len(tokens)), self.bound)
        except OSError as error:
            log.warning("prompt cache: this context is not saved: %s", error)
            self.link.send(MSG_CACHE_ENTRY)  # the announced entry will not come
        else:
            self.link.send(MSG_CACHE_ENTRY, entry_names(evaluated), [fd])
        finally:
            os.close(fd)
