"""The grammars an answer is held to while it is generated (engine.Constraint), on json_grammar's
Checker: JsonAnswer for JSON mode (one document, with or without a schema; the answer ends where it
closes) and ToolCalls while tools are offered (a call, bare JSON at the start of the answer or after
another call, names an offered function and its arguments follow that function's parameters; an
answer in words is left alone). Imports json_grammar and tool_formats.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from apiserver.json_grammar import Checker
from apiserver.json_schema import Grammar, Schema
from apiserver.tool_formats import CALL_OPEN


class JsonAnswer:
    """JSON mode: the answer is one JSON document valid for schema (an object without one); prefill,
    the answer's opening written by the server, is part of it."""

    def __init__(self, schema: Schema | None, prefill: str):
        self.checker = Checker(schema if schema is not None else {"type": "object"})
        if self.checker.feed(prefill) != len(prefill):
            raise ValueError(f"the answer's opening {prefill!r} does not follow the schema")

    @property
    def complete(self) -> bool:
        return self.checker.complete

    def feed(self, piece: str) -> int:
        return self.checker.feed(piece)

    def can_end(self) -> bool:
        return self.checker.can_end()

    def correction(self, bad: str | None) -> str:
        return self.checker.correction(bad)

    def closing(self) -> str:
        return self.checker.closing()


def rebase_references(schema: Any, prefix: str) -> Any:
    """schema with its local references ("#/$defs/x") pointing into where it is placed (prefix)."""
    if isinstance(schema, dict):
        return {key: (prefix + value[1:] if key == "$ref" and isinstance(value, str) and value.startswith("#")
                      else rebase_references(value, prefix)) for key, value in schema.items()}
    if isinstance(schema, list):
        return [rebase_references(value, prefix) for value in schema]
    return schema


def call_schema(tools: Sequence[dict[str, Any]], arguments_key: str) -> Schema:
    """One call of any offered function: its name, and arguments that follow its parameters."""
    options: list[Schema] = []
    for index, tool in enumerate(tools):
        function = tool.get("function", tool)
        parameters = function.get("parameters") or {"type": "object"}
        parameters = rebase_references(parameters, f"#/anyOf/{index}/properties/{arguments_key}")
        options.append({"type": "object", "properties": {"name": {"const": function["name"]}, arguments_key: parameters},
                        "required": ["name", arguments_key], "additionalProperties": False})
    return {"anyOf": options}


class ToolCalls:
    """Tools offered: each call the answer makes (a JSON object where the answer begins, or after
    another call) is held to call_schema; text in words is not constrained, nor what follows it."""

    complete = False  # calls never end the answer: the model may make several

    def __init__(self, tools: Sequence[dict[str, Any]], arguments_key: str, prefill: str):
        schema = call_schema(tools, arguments_key)
        self.schema, self.grammar = schema, Grammar(schema)
        self.call: Checker | None = None  # the call being written
        self.words = False  # the answer is text: nothing more is constrained
        opening = prefill.replace(CALL_OPEN, "")
        if self.feed(opening) != len(opening):
            raise ValueError(f"the answer's opening {prefill!r} is not a call of an offered function")

    def feed(self, piece: str) -> int:
        index = 0
        while index < len(piece) and not self.words:
            if self.call is None:
                char = piece[index]
                if char == "{":
                    self.call = Checker(self.schema, self.grammar)
                elif char.isspace():
                    index += 1
                else:
                    self.words = True
                continue
            taken = self.call.feed(piece[index:])
            index += taken
            if self.call.complete:
                self.call = None
            elif index < len(piece):
                return index
        return len(piece)

    def can_end(self) -> bool:
        return self.call is None or self.call.can_end()

    def correction(self, bad: str | None) -> str:
        return self.call.correction(bad) if self.call is not None else ""

    def closing(self) -> str:
        return self.call.closing() if self.call is not None else ""
