"""What the model's context holds, and where a new prompt starts on it.

Owns ModelContext: the turns evaluated so far (turns.Evaluated: the configured system prompt's turn
from the zygote, prefix.py, then each prompt evaluated), where a prompt starts (the longest turn
boundary both share, or a longer one restored from the watchdog's cache, prompt_cache.py, that
leaves at least MIN_BATCH tokens to evaluate), the batch size it is evaluated in (turns.batch_size,
by gpt4all's own tokenizer), and, after the generation, what the context holds then, announced to
the cache when this worker will save it. With prompt_cache = false only the configured system
prompt's turn is kept, as before the cache. The engine calls it around each generation, holding its
generation lock. Imports settings, protocol, model, prefix, turns, reuse_setup and prompt_cache.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from typing import Any

from apiserver.model import ChatTemplate
from apiserver.prefix import Prefix
from apiserver.prompt_cache import PromptCache, RestoreFailed
from apiserver.protocol import WatchdogLink
from apiserver.reuse_setup import ReuseSetup
from apiserver.settings import Settings
from apiserver.turns import MIN_BATCH, Evaluated, Mark, batch_size, turn_offsets

log = logging.getLogger("gpt4all_api")


class ModelContext:
    def __init__(self, model: Any, settings: Settings, template: ChatTemplate, prefix: Prefix | None,
                 reuse: ReuseSetup):
        self.model, self.settings, self.reuse = model, settings, reuse
        # gpt4all's tokenizer: where prompts may be cut, and the batch sizes (turns.batch_size).
        self.tokenizer = reuse.tokenizer()
        self.markers = template.turn_start if self.tokenizer else ()
        self.evaluated = Evaluated(prefix.text, ((len(prefix.text), prefix.n_past),)) if prefix else Evaluated()
        self.configured = self.evaluated if not settings.prompt_cache else None  # kept alone (prompt_cache off)
        self.cache: PromptCache | None = None  # under the watchdog, with saved entries: attach_cache()
        self.unsaved = False  # the context holds turns no entry holds yet

    def attach_cache(self, link: WatchdogLink) -> None:
        """Under the watchdog, with a worker per request (or per few): the cache of saved contexts."""
        if (self.reuse.fingerprint is not None and self.settings.prompt_cache and self.settings.restart_after_requests
                and self.tokenizer is not None and self.reuse.native is not None):
            self.cache = PromptCache(self.model, self.reuse, link, self.reuse.native, self.tokenizer)

    def boundaries(self, prompt: str) -> list[int]:
        return turn_offsets(prompt, self.markers)

    def cut_points(self, prompt: str, offsets: Sequence[int]) -> list[int]:
        """The boundaries a prompt may start from: those that leave at least MIN_BATCH tokens to
        evaluate (the last ones may leave fewer: a chat template's short assistant opening, a raw
        prompt that ends just after a marker)."""
        usable = list(offsets)
        while usable and self.tokenizer and len(self.tokenizer.ids(prompt[usable[-1]:], False)) < MIN_BATCH:
            usable.pop()
        return usable

    def batch_for(self, text: str, from_empty: bool) -> int:
        """The batch size that evaluates text in batches of MIN_BATCH tokens or more. A text of no
        more bytes than a batch holds fewer tokens: one batch, nothing to count."""
        if self.tokenizer is None or len(text.encode("utf-8")) + 2 <= self.settings.n_batch:
            return self.settings.n_batch
        return batch_size(len(self.tokenizer.ids(text, from_empty)), self.settings.n_batch)

    def start_for(self, prompt: str, offsets: Sequence[int]) -> Mark:
        """Where prompt starts: the longest usable boundary the context holds, or a longer one
        restored from the cache; the context is set back (n_past) to it. (0, 0): from empty."""
        # The lookup goes out first: the watchdog answers while the prompt's tail is tokenized.
        lookup = self.cache.ask(prompt, offsets, self.evaluated.start_for(prompt, offsets)[0]) if self.cache else None
        usable = self.cut_points(prompt, offsets)
        start = self.evaluated.start_for(prompt, usable)
        if self.cache is not None and lookup is not None:
            try:
                restored = self.cache.restore(lookup, prompt, usable)
            except RestoreFailed as error:
                log.warning("prompt cache: %s; the whole prompt is evaluated", error)
                self.evaluated = Evaluated()
                return 0, 0
            if restored is not None:
                self.evaluated = restored
                return restored.marks[-1]
        if start[1]:
            self.model.model.context.n_past = start[1]
        return start

    def evaluated_from(self, prompt: str, offsets: Sequence[int], start: Mark, evaluated_ids: Sequence[int],
                       complete: bool, shifted: bool) -> None:
        """After a generation: what the context now holds (its prompt's turns; nothing when gpt4all
        may have shifted the context to go on). Announced when this worker will save it."""
        if shifted:
            self.evaluated = Evaluated()
        else:
            lead = 1 if not start[1] and self.reuse.bos is not None else 0  # the BOS before the prompt
            self.evaluated = self.evaluated.extended(prompt, offsets, start, evaluated_ids, self.reuse.marker_ids,
                                                     complete, lead)
        if self.configured is not None:
            held = self.evaluated.up_to(len(self.configured.text))
            self.evaluated = held if held == self.configured else Evaluated()
        self.unsaved = self.unsaved or self.evaluated.n_past > start[1]
        if self.cache is not None:
            self.cache.went_on()
            if self.cache.saves and self.unsaved:
                self.cache.announce(self.evaluated)

    def exit_after_this(self) -> None:
        """The worker exits after the request being admitted: its context will be saved then."""
        if self.cache is not None:
            self.cache.saves = True

    def save(self) -> None:
        """Before the worker exits: its context, for the workers after it (announced already)."""
        if self.cache is not None:
            self.cache.save(self.evaluated)
