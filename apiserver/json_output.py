"""JSON output without a grammar: the answer is prefilled with "{", cut where the first JSON value
closes, then checked.

Owns JsonCloser (finds where a JSON object closes, a piece at a time, strings and escapes
included), the system instruction that carries a JSON schema, and check_json_answer (parses, and
with a schema checks the top-level type and required keys: not a full schema validation). Imports
only the standard library.
"""

from __future__ import annotations

import json
from typing import Any, Dict, Optional

PREFILL = "{"


class JsonCloser:
    """Fed the generated text after the prefilled "{", returns the index just past the brace that
    closes the object (counted in the generated text), or None while it is still open."""

    def __init__(self) -> None:
        self.depth = 1  # the prefilled brace
        self.in_string = False
        self.escaped = False
        self.seen = 0

    def feed(self, piece: str) -> Optional[int]:
        for offset, char in enumerate(piece):
            if self.in_string:
                if self.escaped:
                    self.escaped = False
                elif char == "\\":
                    self.escaped = True
                elif char == '"':
                    self.in_string = False
            elif char == '"':
                self.in_string = True
            elif char in "{[":
                self.depth += 1
            elif char in "}]":
                self.depth -= 1
                if self.depth == 0:
                    return self.seen + offset + 1
        self.seen += len(piece)
        return None


def schema_instruction(schema: Optional[Dict[str, Any]]) -> str:
    """What the system message says in JSON mode."""
    if schema is None:
        return "Answer with one JSON object and nothing else."
    keys = schema.get("required") or list(schema.get("properties", {}))
    listing = f" with the keys {', '.join(keys)}" if keys else ""
    return (f"Answer with one JSON object{listing} and nothing else. It must follow this JSON schema:\n"
            + json.dumps(schema, ensure_ascii=False))


def prefill_for(schema: Optional[Dict[str, Any]]) -> str:
    """The answer's opening: "{", and with a schema its first required key, which small models
    otherwise often leave out."""
    keys = (schema or {}).get("required") or []
    if keys and isinstance(keys[0], str) and (schema or {}).get("type", "object") == "object":
        return "{" + json.dumps(keys[0], ensure_ascii=False) + ": "
    return PREFILL


def check_schema(schema: Dict[str, Any]) -> Optional[str]:
    """What is wrong with the parts of a JSON schema this server uses (required, properties), if anything."""
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(key, str) for key in required):
        return "'required' must be a list of strings"
    if not isinstance(schema.get("properties", {}), dict):
        return "'properties' must be an object"
    return None


class InvalidJsonOutput(ValueError):
    """The model's answer is not the JSON asked for."""


def check_json_answer(text: str, schema: Optional[Dict[str, Any]]) -> Any:
    """The parsed answer; InvalidJsonOutput when it does not parse, is not an object where the schema
    wants one, or lacks a required top-level key."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise InvalidJsonOutput(f"the model's answer is not valid JSON ({error})") from None
    if schema is None:
        if not isinstance(document, dict):
            raise InvalidJsonOutput("the model's answer is not a JSON object")
        return document
    if schema.get("type", "object") == "object":
        if not isinstance(document, dict):
            raise InvalidJsonOutput("the model's answer is not a JSON object")
        missing = [key for key in schema.get("required", []) if key not in document]
        if missing:
            raise InvalidJsonOutput(f"the model's answer lacks the required keys {missing}")
    return document
