"""Turn boundaries: where a prompt may be cut so that what precedes it is reused, evaluated already.

A boundary is an offset in the prompt's text where a special token that begins a turn starts
(ChatTemplate.turn_start: <|im_start|> for ChatML). gpt4all's tokenizer splits the text at special
tokens before anything else, so the text before a boundary and the text after it tokenize exactly
as the whole does: a context holding the first part's tokens can go on with the second. Chat
prompts and raw prompts (/v1/completions, Ollama's raw) are cut at the same places.

Owns turn_offsets (the boundaries of a text), Evaluated (what a model's context holds: a text and,
at each of its boundaries, the tokens evaluated up to there), the choice of where a new prompt can
start on it, the boundaries found in the token ids a prompt evaluated, and prefix_hashes (how the
watchdog's cache finds a prefix without holding its text). Imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import hashlib
from collections.abc import Collection, Iterable, Sequence
from typing import Callable

HASH_BYTES = 16  # blake2b digest size: a prefix's name in the watchdog's cache
MIN_BATCH = 3  # the smallest batch llama.cpp computes as it computes large ones

Mark = tuple[int, int]  # (offset in the text, tokens in the context up to there)


def turn_offsets(text: str, markers: Iterable[str]) -> list[int]:
    """Every offset where a marker begins, in order (0 included when the text starts with one)."""
    offsets = set()
    for marker in markers:
        start = text.find(marker)
        while start >= 0:
            offsets.add(start)
            start = text.find(marker, start + len(marker))
    return sorted(offsets)


@dataclasses.dataclass(frozen=True)
class Evaluated:
    """What a model's context holds: text's tokens, and at each boundary of it (marks) how many
    tokens precede it. Tokens after the last mark (the rest of a turn, a generated answer) are in
    the context too, but nothing can start from them."""
    text: str = ""
    marks: tuple[Mark, ...] = ()

    @property
    def n_past(self) -> int:
        return self.marks[-1][1] if self.marks else 0

    def start_for(self, prompt: str, offsets: Collection[int]) -> Mark:
        """Where prompt (whose boundaries are offsets) can start on this context: the longest mark
        that is a boundary of both, whose text both share, and that leaves at least one token of
        prompt to evaluate (the context's logits belong to its own last prompt). (0, 0): nowhere."""
        for offset, n_past in reversed(self.marks):
            if offset < len(prompt) and offset in offsets and prompt.startswith(self.text[:offset]):
                return offset, n_past
        return 0, 0

    def up_to(self, offset: int) -> Evaluated:
        """The same context cut at one of its marks (what remains once n_past is set back there)."""
        marks = tuple(mark for mark in self.marks if mark[0] <= offset)
        return Evaluated(self.text[:marks[-1][0]] if marks else "", marks)

    def extended(self, prompt: str, offsets: Sequence[int], start: Mark, evaluated_ids: Sequence[int],
                 marker_ids: Collection[int], complete: bool, lead: int = 0) -> Evaluated:
        """This context once prompt (boundaries: offsets) was evaluated from start: the marks up to
        start, and those the evaluated ids show, each marker token being the next boundary of the
        text (lead: ids evaluated before the text, a BOS). Ids cut short (complete False: the
        generation stopped inside its prompt) give the marks they reach; ids that do not match the
        text give none beyond start."""
        kept = self.up_to(start[0]).marks if start[1] else ()
        ahead = [offset for offset in offsets if offset >= start[0]]
        positions = [index for index, token in enumerate(evaluated_ids) if token in marker_ids and index >= lead]
        misplaced = bool(ahead) and ahead[0] == start[0] and (not positions or positions[0] != lead)
        if misplaced or len(positions) > len(ahead) or (complete and len(positions) != len(ahead)):
            return Evaluated(prompt[:kept[-1][0]] if kept else "", kept)
        found = tuple((offset, start[1] + position) for offset, position in zip(ahead, positions)
                      if offset > start[0])
        marks = kept + found
        return Evaluated(prompt[:marks[-1][0]] if marks else "", marks)


def batch_size(count: int, limit: int) -> int:
    """The largest batch size up to limit that evaluates count tokens in batches of MIN_BATCH or
    more (count itself below MIN_BATCH: nothing helps, and every evaluation of it does the same)."""
    if count <= limit:
        return limit
    return next((size for size in range(limit, MIN_BATCH - 1, -1) if count % size == 0 or count % size >= MIN_BATCH),
                limit)


class PromptTokenizer:
    """A text's ids as gpt4all evaluates them after its context's last token (gpt4all's own
    tokenizer, tokenize: text -> ids, special tokens parsed). The text is tokenized after a
    sentinel special token whose id is known, so that whatever the tokenizer would put first (a BOS
    when the last prompt began from an empty context) is cut off with it; bos is the id the model
    puts first when a prompt does begin from an empty context (None: it puts nothing)."""

    def __init__(self, tokenize: Callable[[str], list[int]], sentinel: str, sentinel_id: int, bos: int | None):
        self.tokenize, self.sentinel, self.sentinel_id, self.bos = tokenize, sentinel, sentinel_id, bos

    def ids(self, text: str, from_empty: bool) -> list[int]:
        ids = self.tokenize(self.sentinel + text)
        first = ids.index(self.sentinel_id) + 1 if self.sentinel_id in ids else len(ids)
        return ([self.bos] if from_empty and self.bos is not None else []) + ids[first:]


def prefix_hashes(text: str, offsets: Iterable[int]) -> list[bytes]:
    """The name of text[:offset] for each offset (ascending), as the watchdog's cache indexes it."""
    hasher = hashlib.blake2b(digest_size=HASH_BYTES)
    names, done = [], 0
    for offset in offsets:
        hasher.update(text[done:offset].encode("utf-8", "surrogatepass"))
        done = offset
        names.append(hasher.copy().digest())
    return names

