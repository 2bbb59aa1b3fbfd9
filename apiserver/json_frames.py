"""The frames of the JSON checker (json_grammar.py): one per open value (a value due, an object, an
array, a string, a number, a literal), each taking a character at a time against its schema and
knowing the shortest valid text to write where the model wrote an invalid one.
Imports json_schema.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from apiserver.json_schema import (
    Grammar,
    Schema,
    best_literal,
    int_keyword,
    kinds_of,
    literals_of,
    minimal_value,
    opening_for,
    required_keys,
)

WHITESPACE = " \t\n\r"
DIGITS = "0123456789"

# --------------------------------------------------------------------------------------------
# Frames: one per open value. take(char) answers TAKEN, REJECTED, DONE (the char closed the value)
# or ENDED (the value ended before the char: the frame below takes it).
# --------------------------------------------------------------------------------------------

TAKEN, REJECTED, DONE, ENDED = "taken", "rejected", "done", "ended"


class Frame:
    grammar: Grammar

    def take(self, char: str) -> Any:
        raise NotImplementedError

    def clone(self) -> Frame:
        raise NotImplementedError

    def endable(self) -> bool:
        """The value is complete if the text ended here (a number, a literal without a closing mark)."""
        return False

    def child_done(self, child: Frame) -> None:
        """A value this frame opened is complete."""

    def correction(self, bad: str | None, final: bool) -> str:
        """The text to write instead of bad (None: the answer wants to stop here); final: end the
        value as soon as possible."""
        raise NotImplementedError


class ValueFrame(Frame):
    """A value is due: its first character chooses among the schema's alternatives (forks when
    several take it)."""

    def __init__(self, grammar: Grammar, schema: Any):
        self.grammar, self.schema = grammar, schema
        self.options = grammar.alternatives(schema)

    def clone(self) -> ValueFrame:
        return self  # nothing in it changes

    def openings(self, char: str) -> list[tuple[Frame, str]]:
        """The frames that begin with char (having taken it), one per alternative that allows it,
        each with TAKEN, or DONE when char is the whole value."""
        frames: list[tuple[Frame, str]] = []
        for option in self.options:
            literals = literals_of(option)
            if literals is not None:
                literal = LiteralFrame(self.grammar, literals)
                outcome = literal.take(char)
                if outcome in (TAKEN, DONE):
                    frames.append((literal, outcome))
                continue
            frame: Frame | None = None
            kinds = kinds_of(option)
            if char == "{" and "object" in kinds:
                frame = ObjectFrame(self.grammar, option)
            elif char == "[" and "array" in kinds:
                frame = ArrayFrame(self.grammar, option)
            elif char == '"' and "string" in kinds:
                frame = StringFrame(option)
            elif (char == "-" or char in DIGITS) and ("number" in kinds or "integer" in kinds):
                frame = NumberFrame("number" not in kinds, char)
            elif char in "tfn":
                allowed = [word for word, kind in (("true", "boolean"), ("false", "boolean"), ("null", "null"))
                           if kind in kinds and word[0] == char]
                frame = LiteralFrame(self.grammar, allowed, char) if allowed else None
            if frame is not None:
                frames.append((frame, TAKEN))
        return frames

    def correction(self, bad: str | None, final: bool) -> str:
        option = self.options[0]
        if final:
            return minimal_value(self.grammar, option, depth=1)
        for option in self.options:  # an alternative whose value the bad character resembles
            guess = opening_for(self.grammar, option, bad)
            if guess:
                return guess
        return minimal_value(self.grammar, self.options[0], depth=1)


class LiteralFrame(Frame):
    """One of a few exact JSON texts: an enum, a const, true, false, null, an object key from a
    closed list."""

    def __init__(self, grammar: Grammar, literals: Sequence[str], written: str = ""):
        self.grammar, self.literals, self.written = grammar, list(literals), written

    def clone(self) -> LiteralFrame:
        return LiteralFrame(self.grammar, self.literals, self.written)

    def take(self, char: str) -> Any:
        grown = self.written + char
        if any(text.startswith(grown) for text in self.literals):
            self.written = grown
            if grown in self.literals and not any(len(text) > len(grown) and text.startswith(grown)
                                                  for text in self.literals):
                return DONE
            return TAKEN
        return ENDED if self.written in self.literals else REJECTED

    def endable(self) -> bool:
        return self.written in self.literals

    @property
    def value(self) -> Any:
        return json.loads(self.written)

    def correction(self, bad: str | None, final: bool) -> str:
        return best_literal(self.literals, self.written, bad)


class StringFrame(Frame):
    """A string: escapes, no raw control characters, minLength / maxLength in characters."""

    def __init__(self, schema: Schema):
        self.schema = schema
        self.min_length = int_keyword(schema, "minLength", 0)
        self.max_length = int_keyword(schema, "maxLength", None)
        self.raw = '"'
        self.length = 0
        self.escape = ""  # "" outside an escape; "\\" after a backslash; "u" + hex digits read

    def clone(self) -> StringFrame:
        twin = StringFrame.__new__(StringFrame)
        twin.__dict__.update(self.__dict__)
        return twin

    def room(self) -> bool:
        return self.max_length is None or self.length < self.max_length

    def take(self, char: str) -> Any:
        if self.escape == "\\":
            if char in '"\\/bfnrt':
                self.escape, self.length = "", self.length + 1
            elif char == "u":
                self.escape = "u"
            else:
                return REJECTED
        elif self.escape:
            if char not in "0123456789abcdefABCDEF":
                return REJECTED
            self.escape += char
            if len(self.escape) == 5:
                self.escape, self.length = "", self.length + 1
        elif char == '"':
            if self.length < self.min_length:
                return REJECTED
            self.raw += char
            return DONE
        elif char == "\\":
            if not self.room():
                return REJECTED
            self.escape = "\\"
        elif ord(char) < 0x20 or not self.room():
            return REJECTED
        else:
            self.length += 1
        self.raw += char
        return TAKEN

    @property
    def value(self) -> str:
        return json.loads(self.raw)

    def correction(self, bad: str | None, final: bool) -> str:
        if self.escape == "\\":
            return "\\"  # a backslash that escapes nothing valid: written as a backslash
        if self.escape:
            return "0" * (5 - len(self.escape))
        if bad is not None and ord(bad) < 0x20 and self.room() and not final:
            return {"\n": "\\n", "\t": "\\t", "\r": "\\r"}.get(bad, f"\\u{ord(bad):04x}")
        return "_" * max(0, self.min_length - self.length) + '"'


class NumberFrame(Frame):
    """A number as JSON spells it; an integer has no fraction and no exponent."""

    FINAL = ("zero", "int", "frac", "exp")

    def __init__(self, integer: bool, first: str):
        self.integer = integer
        self.state = {"-": "minus", "0": "zero"}.get(first, "int")

    def clone(self) -> NumberFrame:
        twin = NumberFrame(self.integer, "1")
        twin.state = self.state
        return twin

    def take(self, char: str) -> Any:
        state, digit = self.state, char in DIGITS
        if state in ("minus", "dot", "e", "esign"):
            if digit:
                self.state = {"minus": "zero" if char == "0" else "int", "dot": "frac", "e": "exp",
                              "esign": "exp"}[state]
                return TAKEN
            if state == "e" and char in "+-":
                self.state = "esign"
                return TAKEN
            return REJECTED
        if digit:
            if state == "zero":
                return REJECTED
            return TAKEN
        if char == "." and state in ("zero", "int") and not self.integer:
            self.state = "dot"
            return TAKEN
        if char in "eE" and state in ("zero", "int", "frac") and not self.integer:
            self.state = "e"
            return TAKEN
        return ENDED

    def endable(self) -> bool:
        return self.state in self.FINAL

    def correction(self, bad: str | None, final: bool) -> str:
        return "0"  # only asked in a state that needs a digit


class ObjectFrame(Frame):
    """An object: keys from properties (only those with additionalProperties false), each value
    against its property's schema, every required key before the closing brace."""

    def __init__(self, grammar: Grammar, schema: Schema):
        self.grammar, self.schema = grammar, schema
        properties = schema.get("properties")
        self.properties: dict[str, Any] = properties if isinstance(properties, dict) else {}
        extra = schema.get("additionalProperties", True)
        self.closed = extra is False
        self.extra_schema = extra if isinstance(extra, dict) else {}
        self.required = required_keys(schema)
        self.seen: list[str] = []
        self.state = "open"  # open, key (after a comma), colon, after_value
        self.key = ""

    def clone(self) -> ObjectFrame:
        twin = ObjectFrame.__new__(ObjectFrame)
        twin.__dict__.update(self.__dict__)
        twin.seen = list(self.seen)
        return twin

    def missing(self) -> list[str]:
        return [key for key in self.required if key not in self.seen]

    def free_keys(self) -> list[str]:
        """The keys still allowed when the object is closed to others (properties not written yet)."""
        return [key for key in self.properties if key not in self.seen]

    def more_allowed(self) -> bool:
        return not self.closed or bool(self.free_keys())

    def key_frame(self) -> Frame:
        if self.closed:
            spellings = [json.dumps(key, ensure_ascii=False) for key in self.free_keys()]
            spellings += [json.dumps(key) for key in self.free_keys()]
            return LiteralFrame(self.grammar, list(dict.fromkeys(spellings)), '"')
        return StringFrame({})

    def take(self, char: str) -> Any:
        if char in WHITESPACE:
            return TAKEN
        if self.state in ("open", "key"):
            if char == '"' and self.more_allowed():
                return ("push", [self.key_frame()])
            if char == "}" and self.state == "open" and not self.missing():
                return DONE
            return REJECTED
        if self.state == "colon":
            if char != ":":
                return REJECTED
            self.state = "value"
            schema = self.properties.get(self.key, self.extra_schema)
            return ("push", [ValueFrame(self.grammar, schema)])
        if char == "," and self.more_allowed():
            self.state = "key"
            return TAKEN
        if char == "}" and not self.missing():
            return DONE
        return REJECTED

    def child_done(self, child: Frame) -> None:
        if self.state in ("open", "key"):
            self.key = child.value  # type: ignore[attr-defined]
            self.seen.append(self.key)
            self.state = "colon"
        else:
            self.state = "after_value"

    def correction(self, bad: str | None, final: bool) -> str:
        missing = self.missing()
        if self.state in ("open", "key"):
            if missing:
                return json.dumps(missing[0], ensure_ascii=False) + ": "
            if final or not self.more_allowed():
                return "}" if self.state == "open" else self.key_frame_opening()
            return '"' if self.state == "key" or (bad is not None and (bad.isalpha() or bad in "'_")) else "}"
        if self.state == "colon":
            return ": "
        if missing:
            return ", " + json.dumps(missing[0], ensure_ascii=False) + ": "
        if not final and bad == '"' and self.more_allowed():
            return ", "
        return "}"

    def key_frame_opening(self) -> str:
        """After a comma with no key left to write: the first allowed key (only reached when the
        comma was allowed, so one is)."""
        keys = self.free_keys()
        return (json.dumps(keys[0], ensure_ascii=False) + ": ") if keys else '"_": '


class ArrayFrame(Frame):
    """An array: items against items, minItems / maxItems."""

    def __init__(self, grammar: Grammar, schema: Schema):
        self.grammar, self.schema = grammar, schema
        items = schema.get("items", {})
        self.items = items if isinstance(items, dict) else {}
        self.min_items = int_keyword(schema, "minItems", 0)
        self.max_items = int_keyword(schema, "maxItems", None)
        self.count = 0
        self.state = "open"  # open, item (after a comma), after_item

    def clone(self) -> ArrayFrame:
        twin = ArrayFrame.__new__(ArrayFrame)
        twin.__dict__.update(self.__dict__)
        return twin

    def room(self) -> bool:
        return self.max_items is None or self.count < self.max_items

    def take(self, char: str) -> Any:
        if char in WHITESPACE:
            return TAKEN
        if self.state == "after_item":
            if char == "," and self.room():
                self.state = "item"
                return TAKEN
            if char == "]" and self.count >= self.min_items:
                return DONE
            return REJECTED
        if char == "]" and self.state == "open" and self.count >= self.min_items:
            return DONE
        if not self.room():
            return REJECTED
        return ("retry", [ValueFrame(self.grammar, self.items)])

    def child_done(self, child: Frame) -> None:
        self.count += 1
        self.state = "after_item"

    def correction(self, bad: str | None, final: bool) -> str:
        if self.state == "after_item":
            if self.count < self.min_items:
                return ", "
            if not final and self.room() and bad is not None and (bad in '"{[-' or bad in DIGITS):
                return ", "
            return "]"
        if self.state == "open" and self.count >= self.min_items and (final or not self.room() or bad in (None, "}")):
            return "]"
        if final:
            return minimal_value(self.grammar, self.items, depth=1)
        return ValueFrame(self.grammar, self.items).correction(bad, final)
