"""JSON and a JSON schema followed a character at a time, and the shortest way back when an answer
leaves them: what lets an engine without a grammar (gpt4all 2.8.2) guarantee JSON that parses and
matches its schema, by correcting the answer instead of masking the sampler (correction.py).

Owns Checker: fed text, it says how much of it stays valid, when the document is complete, what to
write instead of a character that is not valid (correction) and how to end the document at once
(closing). It keeps live paths, each a stack of frames (json_frames.py, one per open value): an
anyOf, or a list of types that share a first character, forks the parse, and the paths live side
by side until the text tells them apart. Imports json_schema and json_frames.
"""

from __future__ import annotations

from apiserver.json_frames import DONE, ENDED, REJECTED, TAKEN, WHITESPACE, Frame, ValueFrame
from apiserver.json_schema import Grammar, Schema, SchemaError

MAX_CLOSING_STEPS = 256

# --------------------------------------------------------------------------------------------
# The checker: live paths (stacks of frames), fed a character at a time.
# --------------------------------------------------------------------------------------------

Path = list[Frame]


def clone_path(path: Path) -> Path:
    return [frame.clone() for frame in path]


OPEN, WITH, BEFORE = "open", "with", "before"  # the document goes on; ends with the char; ended before it


def advance(path: Path, char: str) -> tuple[list[Path], str]:
    """The paths after char (none: rejected), and whether the document is complete (WITH: char is
    its last character; BEFORE: it ended just before char, which is not part of it)."""
    path = clone_path(path)
    while path:
        top = path[-1]
        if isinstance(top, ValueFrame):
            if char in WHITESPACE:
                return [path], OPEN
            results: list[Path] = []
            for frame, outcome in top.openings(char):
                grown = path[:-1] + [frame]
                if outcome == DONE:
                    grown, whole = pop_done(grown)
                    if whole:
                        return [grown], WITH
                results.append(grown)
            return results, OPEN
        outcome = top.take(char)
        if outcome == TAKEN:
            return [path], OPEN
        if outcome == REJECTED:
            return [], OPEN
        if outcome == DONE:
            path, whole = pop_done(path)
            return [path], WITH if whole else OPEN
        if outcome == ENDED:
            path, whole = pop_done(path)
            if whole:
                return [path], BEFORE
            continue
        action, frames = outcome
        if action == "push":
            return [path + [frame] for frame in frames], OPEN
        path = path + frames  # "retry": the new frame takes the same char
    return [], OPEN


def pop_done(path: Path) -> tuple[Path, bool]:
    """The path with its top value complete; True when that was the whole document."""
    child = path.pop()
    if not path:
        return path, True
    path[-1].child_done(child)
    return path, False


class Checker:
    """An answer followed against JSON and a schema. feed(text) returns how many characters stay:
    fewer than given when one is not valid (rejected) or the document was complete before it."""

    def __init__(self, schema: Schema | None, grammar: Grammar | None = None):
        self.grammar = grammar or Grammar(schema)
        self.paths: list[Path] = [[ValueFrame(self.grammar, schema if schema is not None else {})]]
        self.complete = False
        self.text = ""

    def copy(self) -> Checker:
        twin = Checker.__new__(Checker)
        twin.grammar, twin.complete, twin.text = self.grammar, self.complete, self.text
        twin.paths = [clone_path(path) for path in self.paths]
        return twin

    def feed(self, text: str) -> int:
        for index, char in enumerate(text):
            if self.complete:
                return index
            following: list[Path] = []
            for path in self.paths:
                paths, status = advance(path, char)
                if status == BEFORE:
                    self.complete, self.paths = True, [[]]
                    return index
                if status == WITH:
                    following = [[]]
                    self.complete = True
                    break
                following.extend(paths)
            if not following:
                return index
            self.paths = following
            self.text += char
        return len(text)

    def can_end(self) -> bool:
        """The document is complete if the answer stopped here (a number or literal at the root)."""
        return self.complete or any(len(path) == 1 and path[0].endable() for path in self.paths)

    def correction(self, bad: str | None, final: bool = False) -> str:
        """What to write instead of bad (None: the answer stopped before the document was complete),
        checked to go on validly; final: toward the end by the shortest way. Empty: the document
        may end here (a number or literal at the root that bad does not go on)."""
        found: list[str] = []
        for path in self.paths:
            frames = clone_path(path)
            while frames and frames[-1].endable() and (bad is None or not self.continues(frames[-1], bad)):
                child = frames.pop()
                if not frames:
                    return ""
                frames[-1].child_done(child)
            text = frames[-1].correction(bad, final)
            if text and self.copy().feed(text) == len(text):
                found.append(text)
        # among the paths (anyOf's alternatives), the correction that begins as the model did
        return max(found, key=lambda text: resembles(text, bad), default="")

    @staticmethod
    def continues(frame: Frame, char: str) -> bool:
        return frame.clone().take(char) in (TAKEN, DONE)

    def closing(self) -> str:
        """The text that completes the document at once: open strings and containers closed, each
        missing required key written with the smallest value its schema allows."""
        trial, written = self.copy(), ""
        for _ in range(MAX_CLOSING_STEPS):
            if trial.can_end():
                return written
            text = trial.correction(None, final=True)
            if not text or trial.feed(text) != len(text):
                break
            written += text
        raise SchemaError("no valid ending found for this schema")


def resembles(text: str, bad: str | None) -> bool:
    """Whether a correction begins with the character the model wrote (ignoring case and a quote)."""
    if not bad:
        return False
    first = text[1:2] if text.startswith('"') and bad != '"' else text[:1]
    return first.lower() == bad.lower()


def follows(text: str, schema: Schema | None) -> bool:
    """Whether text (stripped) is one complete JSON document valid for schema, as far as the checker
    enforces it."""
    checker = Checker(schema)
    stripped = text.strip()
    return checker.feed(stripped) == len(stripped) and checker.can_end()
