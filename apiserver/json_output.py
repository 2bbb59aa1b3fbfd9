"""JSON output: what the system message asks for, the answer's opening written by the server, the
schemas accepted, and the final check of an answer generated under constraints.JsonAnswer.

Owns schema_instruction, prefill_for (an object's "{", and its first required key, which small
models otherwise often leave out), check_schema (refuses up front what no answer could follow) and
check_json_answer (the answer parses and follows its schema: true by construction, so a failure is
a bug). Imports json_grammar.
"""

from __future__ import annotations

import json
from typing import Any

from apiserver.json_grammar import Checker, follows
from apiserver.json_schema import SchemaError

PREFILL = "{"


def object_root(schema: dict[str, Any] | None) -> bool:
    """Whether the answer is an object: JSON mode without a schema, or a schema whose root is one."""
    if schema is None:
        return True
    if any(keyword in schema for keyword in ("anyOf", "oneOf", "allOf", "$ref", "const", "enum")):
        return False
    declared = schema.get("type")
    return declared == "object" or (declared is None and ("properties" in schema or "required" in schema))


def schema_instruction(schema: dict[str, Any] | None) -> str:
    """What the system message says in JSON mode."""
    if schema is None:
        return "Answer with one JSON object and nothing else."
    if not object_root(schema):
        return ("Answer with one JSON value and nothing else. It must follow this JSON schema:\n"
                + json.dumps(schema, ensure_ascii=False))
    keys = schema.get("required") or list(schema.get("properties", {}))
    listing = f" with the keys {', '.join(keys)}" if keys else ""
    return (f"Answer with one JSON object{listing} and nothing else. It must follow this JSON schema:\n"
            + json.dumps(schema, ensure_ascii=False))


def prefill_for(schema: dict[str, Any] | None) -> str:
    """The answer's opening: "{" for an object, and with a schema its first required key; nothing
    for another root (the constraint opens it)."""
    if not object_root(schema):
        return ""
    keys = (schema or {}).get("required") or []
    if keys and isinstance(keys[0], str):
        return "{" + json.dumps(keys[0], ensure_ascii=False) + ": "
    return PREFILL


def check_schema(schema: dict[str, Any]) -> str | None:
    """What is wrong with a JSON schema, if anything: the shape of the keywords this server follows,
    references that resolve, and at least one value that satisfies it."""
    required = schema.get("required", [])
    if not isinstance(required, list) or not all(isinstance(key, str) for key in required):
        return "'required' must be a list of strings"
    if not isinstance(schema.get("properties", {}), dict):
        return "'properties' must be an object"
    try:
        Checker(schema).closing()
    except SchemaError as error:
        return str(error)
    except RecursionError:
        return "the schema requires itself without end"
    return None


class InvalidJsonOutput(ValueError):
    """The model's answer is not the JSON asked for."""


def check_json_answer(text: str, schema: dict[str, Any] | None) -> Any:
    """The parsed answer; InvalidJsonOutput when it does not parse or does not follow the schema."""
    try:
        document = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise InvalidJsonOutput(f"the model's answer is not valid JSON ({error})") from None
    if not follows(text, schema if schema is not None else {"type": "object"}):
        raise InvalidJsonOutput("the model's answer does not follow the schema")
    return document
