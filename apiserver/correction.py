"""Constrained generation by correction, for an engine without a grammar (gpt4all 2.8.2): the
answer is followed by a Constraint (constraints.py) token by token; a token that leaves the grammar
is taken back (the context's n_past set back to the last token accepted), the valid start of its
text and the constraint's correction are evaluated in its place, and the model goes on from there.

Owns Constraint (what the engine needs of a grammar), TokenCounter (every token gpt4all hands back,
where the context's positions are counted), MAX_CORRECTIONS and Correction (one answer's
corrections: take() for each piece in gpt4all's callback, run() after gpt4all returns). The engine
owns the Generation it works on (Correctable). Imports model.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Callable, Protocol

from apiserver.model import PROMPT_AS_IS

log = logging.getLogger("gpt4all_api")

# Corrections one answer may take before the engine closes its JSON itself. An answer needs none
# to a few (a forgotten key, Python's True, a quoted number); a model that fights the grammar more
# often than this is lost, and each correction costs about one token's evaluation plus a call
# (docs/benchmarks.md), so the bound keeps a worst case near a second.
MAX_CORRECTIONS = 24


class Constraint(Protocol):
    """Follows an answer against a grammar. feed(piece) returns how many of its characters stay:
    fewer when one leaves the grammar (the answer is corrected there) or when the answer was
    complete before it (complete is then True). correction(bad) is the text to write instead of
    bad (None: the model stopped too early), "" when the answer may end there; closing() ends it."""

    @property
    def complete(self) -> bool: ...
    def feed(self, piece: str) -> int: ...
    def can_end(self) -> bool: ...
    def correction(self, bad: str | None) -> str: ...
    def closing(self) -> str: ...


class TokenCounter:
    """Counts every token gpt4all hands back, those its UTF-8 decoder holds back included (the first
    bytes of a character split between tokens never reach the callback): the context's positions
    are counted in these, so a correction knows how far to take the context back."""

    def __init__(self, llmodel: Any):
        self.count = 0
        self.decoder = llmodel._callback_decoder
        llmodel._callback_decoder = self.counting_decoder  # gpt4all 2.8.2 wraps each callback with it

    def counting_decoder(self, callback: Callable[[int, str], bool]) -> Callable[[int, bytes], bool]:
        decode = self.decoder(callback)

        def count_then_decode(token_id: int, response: bytes) -> bool:
            self.count += 1
            return decode(token_id, response)
        return count_then_decode


class Correctable(Protocol):
    """The engine's Generation, as a correction sees it."""
    finish: str | None
    error: BaseException | None
    tokens: int
    params: Any

    @property
    def stopped(self) -> bool: ...  # a stop string cut the answer

    def emit(self, text: str) -> None: ...
    def on_token(self, token_id: int, piece: str) -> bool: ...
    def on_correction_token(self, token_id: int) -> bool: ...


class Correction:
    """One constrained answer: where the last accepted token ends, what was rejected, and the
    corrections made (how many, and the time spent evaluating them)."""

    def __init__(self, constraint: Constraint, counter: TokenCounter):
        self.constraint, self.counter = constraint, counter
        self.rejected: tuple[str, str] | None = None  # (the valid start of a piece, its first invalid char)
        self.boundary = counter.count  # the count after the last token the constraint accepted
        self.count = 0
        self.seconds = 0.0
        self.since: float | None = None  # a correction is being evaluated since then

    def take(self, piece: str) -> str | None:
        """In gpt4all's callback: the piece as far as the answer keeps it; None when it leaves the
        grammar (the generation stops there and run() corrects it)."""
        if self.since is not None:
            self.seconds += time.monotonic() - self.since
            self.since = None
        kept = self.constraint.feed(piece)
        if kept < len(piece) and not self.constraint.complete:
            self.rejected = (piece[:kept], piece[kept])
            return None
        self.boundary = self.counter.count
        return piece[:kept]

    def run(self, generation: Correctable, llmodel: Any, n_ctx: int, n_batch: int) -> None:
        """After gpt4all returns: while the answer left its grammar (or the model stopped before it
        was complete), correct it and let the model go on. Past MAX_CORRECTIONS the constraint
        closes the answer itself (written, not evaluated); out of tokens, the answer ends as it
        stands with finish "length", as OpenAI cuts it."""
        params = generation.params
        while generation.error is None and (self.rejected is not None or generation.finish is None):
            valid, bad = self.rejected if self.rejected is not None else ("", None)
            self.rejected = None
            if bad is None and self.constraint.can_end():
                break
            n_past = llmodel.context.n_past - (self.counter.count - self.boundary)
            remaining = params.max_tokens - generation.tokens
            fix = self.constraint.correction(bad) if self.count < MAX_CORRECTIONS else ""
            if fix and (remaining <= 0 or n_past + len((valid + fix).encode()) + 2 >= n_ctx):
                generation.emit(valid)
                generation.finish = "length"
                break
            if not fix:
                self.close(generation, valid)
                break
            if self.constraint.feed(fix) != len(fix):
                log.error("a correction did not follow its own grammar (a bug): %r", fix)
                self.close(generation, valid)
                break
            self.count += 1
            generation.emit(valid + fix)
            if generation.stopped or self.constraint.complete:
                generation.finish = "stop"
                break
            llmodel.context.n_past = n_past
            self.boundary = self.counter.count
            llmodel._prompt_callback = generation.on_correction_token
            self.since = time.monotonic()
            llmodel.prompt_model(valid + fix, PROMPT_AS_IS, generation.on_token, n_predict=remaining,
                                 temp=params.temperature, top_k=params.top_k, top_p=params.top_p, min_p=params.min_p,
                                 repeat_penalty=params.repeat_penalty, repeat_last_n=params.repeat_last_n,
                                 n_batch=n_batch, reset_context=False, special=False)
            if self.since is not None:  # the model stopped without a token
                self.seconds += time.monotonic() - self.since
                self.since = None
        if self.count:
            log.info("constrained answer: %d correction%s, %.0f ms", self.count, "" if self.count == 1 else "s",
                     self.seconds * 1000)

    def close(self, generation: Correctable, valid: str) -> None:
        """The answer ends now: its valid text, then what closes it."""
        try:
            closing = self.constraint.closing()
        except ValueError as error:  # a schema no text satisfies is refused up front: a bug
            log.error("cannot close the constrained answer (%s): it is returned as it stands", error)
            closing = ""
        self.constraint.feed(closing)
        generation.emit(valid + closing)
        if generation.finish is None:
            generation.finish = "stop"
