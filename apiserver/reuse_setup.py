"""What a model load learns so that evaluated prompts can be reused: the turn markers' token ids, a
tokenizer that gives the ids gpt4all evaluates, and whether a context saved in one process comes
back in another with the same answer (the self-test).

Run once where the model is loaded (the zygote, or a worker that loads its own), before the system
prompt's prefix is evaluated; the zygote's workers inherit the ReuseSetup. Each marker is evaluated
twice over from an empty context: two equal ids (three, after a BOS) make it one special token.
gpt4all's own tokenizer (kv_state.py) must then give exactly the ids a full evaluation of a chat
shows: prompts are cut at boundaries, and evaluated in batch sizes (turns.batch_size), only on its
word. The self-test goes the whole way a cached prompt goes: a short chat evaluated and answered
at temperature 0, its context written into a memory file as an entry (cache_entry.py), the context
overwritten by another prompt, the entry read back, checked and restored, the token list written,
and the same question evaluated from the boundary: the answer must be the same tokens, and gpt4all's
context laid out as kv_state expects before and after. Two saves of different lengths give the
state's size per token (its room is allocated before llama.cpp writes). A doubt about the
tokenizer turns all reuse off; a failed self-test turns the saved entries off (the reuse inside a
process and the configured system prompt's prefix go on); one log line says why. A pass is kept in
a record file (the watchdog's state_dir, removed at its start) with the fingerprint it was made on:
a spawned worker whose fingerprint matches takes the state's size and shape from it instead of
running the test again (2 - 3 s of one thread per worker, each of which is as fresh as the first).
Imports settings, model, model_facts, kv_state, turns and cache_entry.
"""

from __future__ import annotations

import dataclasses
import importlib.metadata
import json
import logging
import os
import time
from pathlib import Path
from typing import Any

from apiserver.cache_entry import (
    InvalidEntry,
    StateSize,
    memory_file,
    open_state,
    read_header,
    state_facts,
    write_entry,
)
from apiserver.kv_state import NativeContext, NativeUnavailable
from apiserver.model import PROMPT_AS_IS, ChatTemplate, running_threads
from apiserver.model_facts import file_digest
from apiserver.settings import Settings
from apiserver.turns import Evaluated, PromptTokenizer, batch_size, turn_offsets

log = logging.getLogger("gpt4all_api")

SELF_TEST_CHAT = [{"role": "system", "content": "You answer in one short sentence."},
                  {"role": "user", "content": "Which three colors are the primary colors of light?"}]
SELF_TEST_OTHER = "Count from one to ten in words, separated by commas."
SELF_TEST_TOKENS = 4  # tokens generated on both sides of the comparison
LAYOUT = "LLModelWrapper 2.8.2, std::vector<int32_t> tokens at +8"  # what kv_state writes into


class SelfTestFailed(Exception):
    """The saved context did not come back as it was: entries stay off."""


@dataclasses.dataclass(frozen=True)
class ReuseSetup:
    marker_ids: frozenset[int] = frozenset()  # the turn markers' ids (none: nothing is reused)
    sentinel: tuple[str, int] | None = None  # a marker and its id, for PromptTokenizer
    bos: int | None = None  # the id the model puts first in a context (None: nothing)
    fingerprint: dict[str, Any] | None = None  # what entries must match; None: no entries
    state_size: StateSize | None = None
    state_facts: dict[str, int] | None = None  # the shape every saved state of this setup has
    entries_off: str = ""  # why there are no entries, for the log
    # The loaded model's native context (kv_state.py); a forked worker inherits the zygote's.
    native: NativeContext | None = dataclasses.field(default=None, compare=False)

    def tokenizer(self) -> PromptTokenizer | None:
        """The prompt tokenizer (None: no reuse here)."""
        if self.sentinel is None or self.native is None:
            return None
        return PromptTokenizer(self.native.tokenize, self.sentinel[0], self.sentinel[1], self.bos)


class IdRecorder:
    """A gpt4all callback that keeps the token ids it sees and lets the model go on."""

    def __init__(self, ids: list[int]):
        self.ids = ids

    def __call__(self, token_id: int, piece: str = "") -> bool:
        self.ids.append(token_id)
        return True


def run_prompt(model: Any, text: str, reset: bool, tokens: int, n_batch: int) -> tuple[list[int], list[int]]:
    """(prompt ids evaluated, ids generated) of text at temperature 0."""
    evaluated: list[int] = []
    generated: list[int] = []
    model.model._prompt_callback = IdRecorder(evaluated)
    model.model.prompt_model(text, PROMPT_AS_IS, IdRecorder(generated),
                             n_predict=tokens, temp=0.0, top_k=1, n_batch=n_batch, reset_context=reset, special=True)
    return evaluated, generated


def learn_markers(model: Any, template: ChatTemplate, settings: Settings) -> tuple[dict[str, int], int | None]:
    """({marker: id} of the turn markers that are one special token, the BOS id or None)."""
    found: dict[str, int] = {}
    bos = None
    for marker in template.turn_start:
        evaluated, _ = run_prompt(model, marker * 2, reset=True, tokens=0, n_batch=settings.n_batch)
        if len(evaluated) in (2, 3) and evaluated[-1] == evaluated[-2]:
            found[marker] = evaluated[-1]
            bos = evaluated[0] if len(evaluated) == 3 else None
        else:
            log.info("the turn marker %r is not one token of this model: prompts are not cut there", marker)
    return found, bos


def make_fingerprint(native: NativeContext, settings: Settings, template: ChatTemplate,
                     marker_ids: frozenset[int]) -> dict[str, Any]:
    """What an entry must have been written by to be restored here."""
    stat = settings.model_file.stat()
    return {"gpt4all": importlib.metadata.version("gpt4all"), "layout": LAYOUT,
            "model": file_digest(settings.model_file, stat.st_size, stat.st_mtime_ns, settings),
            "n_ctx": settings.n_ctx, "state_bound": native.state_size_bound(), "template": template.name,
            "markers": sorted(marker_ids)}


def save_scratch(native: NativeContext, fingerprint: dict[str, Any], evaluated: Evaluated) -> tuple[int, int]:
    """The context saved into a new memory file as an entry: (its fd, its state's bytes)."""
    fd = memory_file("gpt4all_api prompt cache self-test")
    try:
        return fd, write_entry(fd, fingerprint, evaluated, native.tokens()[:evaluated.n_past], native.save_state, 0,
                               native.state_size_bound())
    except BaseException:
        os.close(fd)
        raise


class SelfTest:
    """The self-test's evaluations, each in the batch size every evaluation of the server uses."""

    def __init__(self, model: Any, native: NativeContext, settings: Settings, template: ChatTemplate,
                 setup: ReuseSetup):
        self.model, self.native, self.settings, self.template, self.setup = model, native, settings, template, setup
        tokenizer = setup.tokenizer()
        assert tokenizer is not None, "the self-test runs only where the native context is readable"
        self.tokenizer = tokenizer

    def run(self, text: str, reset: bool, tokens: int) -> tuple[list[int], list[int]]:
        count = len(self.tokenizer.ids(text, from_empty=reset))
        return run_prompt(self.model, text, reset, tokens, batch_size(count, self.settings.n_batch))

    def check_tokenizer(self) -> None:
        """The ids gpt4all's tokenizer gives a chat are those its evaluation shows."""
        prompt = self.template.render(SELF_TEST_CHAT)
        evaluated, _ = run_prompt(self.model, prompt, True, 0, self.settings.n_batch)
        if self.tokenizer.ids(prompt, from_empty=True) != evaluated:
            raise SelfTestFailed("gpt4all's tokenizer does not give the ids its evaluation shows")

    def saved_and_restored(self) -> tuple[dict[str, Any], StateSize, dict[str, int]]:
        """Save, overwrite, restore and compare (the module's docstring)."""
        native, template, marker_ids = self.native, self.template, self.setup.marker_ids
        prompt = template.render(SELF_TEST_CHAT)
        offsets = turn_offsets(prompt, template.turn_start)
        evaluated_ids, expected = self.run(prompt, reset=True, tokens=SELF_TEST_TOKENS)
        if not native.layout_holds():
            raise SelfTestFailed("gpt4all's context is not laid out as this version expects")
        evaluated = Evaluated().extended(prompt, offsets, (0, 0), evaluated_ids, marker_ids, True,
                                         lead=0 if self.setup.bos is None else 1)
        start = evaluated.start_for(prompt, offsets)
        if not start[1]:
            raise SelfTestFailed("no turn boundary was found in the evaluated tokens")
        fingerprint = make_fingerprint(native, self.settings, template, marker_ids)
        first_tokens = len(native.tokens())
        fd, first_size = save_scratch(native, fingerprint, evaluated.up_to(start[0]))
        try:
            self.run(template.render([{"role": "user", "content": SELF_TEST_OTHER}]), reset=True, tokens=1)
            second_tokens = len(native.tokens())
            other, second_size = save_scratch(native, fingerprint, Evaluated())
            os.close(other)
            entry = read_header(fd, fingerprint)
            facts = state_facts(fd, entry)
            state = open_state(fd, entry, facts)
            try:
                restored = native.restore_state(state.address)
            finally:
                state.close()
        finally:
            os.close(fd)
        if restored != entry.blob_length:
            raise SelfTestFailed(f"the model read {restored} bytes of a {entry.blob_length}-byte state")
        native.set_tokens(entry.tokens[:start[1]])
        self.model.model.context.n_past = start[1]
        _, answer = self.run(prompt[start[0]:], reset=False, tokens=SELF_TEST_TOKENS)
        if answer != expected or not native.layout_holds():
            raise SelfTestFailed(f"a restored context answered {answer}, a full evaluation {expected}")
        if second_tokens == first_tokens or (second_size - first_size) * (second_tokens - first_tokens) <= 0:
            raise SelfTestFailed("the state's size does not grow with the context")
        per_token = (second_size - first_size) // (second_tokens - first_tokens)
        return fingerprint, StateSize(first_size - per_token * first_tokens, per_token), facts


def prepare_reuse(model: Any, settings: Settings, template: ChatTemplate, entries: bool,
                  record: Path | None = None) -> ReuseSetup:
    """Learn the markers and check the tokenizer; with entries (saved and restored across
    processes), run the self-test, or take its pass from record (the module's docstring). What is
    off says why, in one log line."""
    setup = learn_and_test(model, settings, template, entries, record)
    if not setup.marker_ids:
        log.warning("prompts are evaluated whole (no reuse of evaluated turns): %s", setup.entries_off)
    elif entries and setup.fingerprint is None:
        log.warning("prompt cache: saved contexts are off: %s", setup.entries_off)
    return setup


def learn_and_test(model: Any, settings: Settings, template: ChatTemplate, entries: bool,
                   record: Path | None) -> ReuseSetup:
    if not template.turn_start:
        return ReuseSetup(entries_off=f"the {template.name} template has no special token that begins a turn")
    started = time.monotonic()
    try:
        with running_threads(model, 1):  # beside a generation, one thread slows it least
            native = NativeContext(model)
            found, bos = learn_markers(model, template, settings)
            if not found:
                return ReuseSetup(entries_off="no turn marker is a special token of this model")
            sentinel = next(iter(found.items()))
            setup = ReuseSetup(frozenset(found.values()), sentinel, bos, native=native)
            test = SelfTest(model, native, settings, template, setup)
            test.check_tokenizer()
    except (NativeUnavailable, SelfTestFailed) as error:
        return ReuseSetup(entries_off=str(error))
    if not entries:
        return setup
    if settings.device != "cpu":
        return dataclasses.replace(setup, entries_off=f"device = {settings.device}: saved contexts are restored "
                                                      "on the cpu only")
    if record is not None and native.layout_holds():
        fingerprint = make_fingerprint(native, settings, template, setup.marker_ids)
        known = recorded_pass(record, fingerprint)
        if known is not None:
            log.info("prompt cache: the self-test passed in an earlier process of this watchdog (%s), on the same "
                     "model, settings and gpt4all: not run again", record.name)
            return dataclasses.replace(setup, fingerprint=fingerprint, state_size=known[0], state_facts=known[1])
    try:
        with running_threads(model, 1):
            fingerprint, state_size, facts = test.saved_and_restored()
    except (SelfTestFailed, InvalidEntry, OSError) as error:
        return dataclasses.replace(setup, entries_off=f"the self-test failed: {error}")
    log.info("prompt cache: self-test passed in %.2f s (a restored context answers as a full evaluation; "
             "%d bytes of state per token)", time.monotonic() - started, state_size.per_token)
    record_pass(record, fingerprint, state_size, facts)
    return dataclasses.replace(setup, fingerprint=fingerprint, state_size=state_size, state_facts=facts)


def recorded_pass(record: Path, fingerprint: dict[str, Any]) -> tuple[StateSize, dict[str, int]] | None:
    """(the state's size, its shape) a pass of the self-test on this fingerprint left in record;
    None when there is none, or it is of another fingerprint or unreadable."""
    try:
        document = json.loads(record.read_text())
        if document["fingerprint"] != fingerprint:
            return None
        fixed, per_token = (int(value) for value in document["state_size"])
        facts = {str(name): int(value) for name, value in document["state_facts"].items()}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return None
    if fixed <= 0 or per_token <= 0 or not facts:
        return None
    return StateSize(fixed, per_token), facts


def record_pass(record: Path | None, fingerprint: dict[str, Any], state_size: StateSize,
                facts: dict[str, int]) -> None:
    """Keep a pass for the processes started after this one (written whole, then renamed)."""
    if record is None:
        return
    temporary = record.with_name(f".{record.name}.{os.getpid()}")
    try:
        record.parent.mkdir(parents=True, exist_ok=True)
        temporary.write_text(json.dumps({"fingerprint": fingerprint, "state_size": [state_size.fixed,
                                                                                     state_size.per_token],
                                         "state_facts": facts}))
        os.replace(temporary, record)
    except OSError as error:
        temporary.unlink(missing_ok=True)
        log.warning("cannot keep the self-test's pass in %s (%s): each worker runs it", record, error)
