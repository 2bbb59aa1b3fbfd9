"""JSON schemas as the constrained generation follows them (json_grammar.py): local references
resolved, anyOf / oneOf spelled out as alternatives and allOf merged, the kinds of value and the
literals each alternative allows, the smallest valid value of a schema (what an answer forced to end
gets), and how a value begins when the model wrote something else. The keywords followed: type,
properties, required, additionalProperties, items, enum, const, anyOf, oneOf (as anyOf), allOf
(merged), local $ref, minItems, maxItems, minLength, maxLength; any other is accepted, not enforced.
Imports only the standard library.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

Schema = dict[str, Any]

KINDS = ("object", "array", "string", "number", "boolean", "null")  # a schema without "type": any, in this order
MAX_REF_DEPTH = 32


class SchemaError(ValueError):
    """A schema the checker cannot follow (a $ref that does not resolve, a loop of references)."""


# --------------------------------------------------------------------------------------------
# Schemas: references resolved, alternatives spelled out, the kinds of value each allows.
# --------------------------------------------------------------------------------------------

class Grammar:
    """A schema made ready to follow: local references resolved against its root."""

    def __init__(self, schema: Schema | None):
        self.root: Schema = schema if schema is not None else {}

    def resolve(self, schema: Any) -> Schema:
        depth = 0
        while isinstance(schema, dict) and isinstance(schema.get("$ref"), str):
            depth += 1
            if depth > MAX_REF_DEPTH:
                raise SchemaError("the schema's $ref chain does not end")
            target: Any = self.root
            reference = schema["$ref"]
            if not reference.startswith("#"):
                raise SchemaError(f"only local references are supported, got {reference!r}")
            for part in [p for p in reference[1:].split("/") if p]:
                part = part.replace("~1", "/").replace("~0", "~")
                if isinstance(target, dict) and part in target:
                    target = target[part]
                elif isinstance(target, list) and part.isdigit() and int(part) < len(target):
                    target = target[int(part)]
                else:
                    raise SchemaError(f"the schema's $ref {reference!r} does not resolve")
            rest = {key: value for key, value in schema.items() if key != "$ref"}
            schema = {**target, **rest} if isinstance(target, dict) else rest
        return schema if isinstance(schema, dict) else {}

    def alternatives(self, schema: Any, depth: int = 0) -> list[Schema]:
        """The schema as a list of plain alternatives: anyOf / oneOf spelled out, allOf merged."""
        schema = self.resolve(schema)
        if depth > MAX_REF_DEPTH:
            raise SchemaError("the schema's alternatives nest too deep")
        if isinstance(schema.get("allOf"), list):
            merged = {key: value for key, value in schema.items() if key != "allOf"}
            for part in schema["allOf"]:
                merged = merge(merged, self.resolve(part))
            return self.alternatives(merged, depth + 1)
        for keyword in ("anyOf", "oneOf"):
            if isinstance(schema.get(keyword), list) and schema[keyword]:
                base = {key: value for key, value in schema.items() if key not in ("anyOf", "oneOf")}
                found: list[Schema] = []
                for part in schema[keyword]:
                    found.extend(self.alternatives(merge(base, self.resolve(part)), depth + 1))
                return found
        return [schema]


def merge(base: Schema, extra: Schema) -> Schema:
    """Two schemas that must both hold, as one: properties merged, required joined."""
    merged = {**base, **extra}
    if isinstance(base.get("properties"), dict) and isinstance(extra.get("properties"), dict):
        merged["properties"] = {**base["properties"], **extra["properties"]}
    if isinstance(base.get("required"), list) and isinstance(extra.get("required"), list):
        merged["required"] = list(dict.fromkeys(base["required"] + extra["required"]))
    return merged


def kinds_of(schema: Schema) -> tuple[str, ...]:
    """The JSON kinds a plain alternative allows, "integer" kept apart from "number"."""
    declared = schema.get("type")
    if isinstance(declared, str):
        return (declared,)
    if isinstance(declared, list) and declared:
        return tuple(kind for kind in declared if isinstance(kind, str))
    if "properties" in schema or "required" in schema or "additionalProperties" in schema:
        return ("object",) + tuple(kind for kind in KINDS if kind != "object")
    if "items" in schema or "minItems" in schema or "maxItems" in schema:
        return ("array",) + tuple(kind for kind in KINDS if kind != "array")
    return KINDS


def literals_of(schema: Schema) -> list[str] | None:
    """The JSON texts an enum or const allows (spelled the ways models write them), or None."""
    if "const" in schema:
        values = [schema["const"]]
    elif isinstance(schema.get("enum"), list):
        values = schema["enum"]
    else:
        return None
    texts: list[str] = []
    for value in values:
        for text in (json.dumps(value, ensure_ascii=False), json.dumps(value),
                     json.dumps(value, ensure_ascii=False, separators=(",", ":"))):
            if text not in texts:
                texts.append(text)
    return texts


def minimal_value(grammar: Grammar, schema: Any, depth: int = 0) -> str:
    """The shortest JSON text valid for schema: what an answer forced to end gets for a missing value."""
    schema = grammar.alternatives(schema)[0]
    literals = literals_of(schema)
    if literals:
        return literals[0]
    kinds = kinds_of(schema)
    if "null" in kinds and depth > 0:
        return "null"
    kind = kinds[0] if kinds != KINDS else ("object" if depth == 0 else "null")
    if kind == "string":
        return json.dumps("_" * int_keyword(schema, "minLength", 0))
    if kind in ("number", "integer"):
        return "0"
    if kind == "boolean":
        return "false"
    if kind == "array":
        item = minimal_value(grammar, schema.get("items", {}), depth + 1)
        return "[" + ", ".join([item] * int_keyword(schema, "minItems", 0)) + "]"
    if kind == "object":
        properties = schema.get("properties", {}) if isinstance(schema.get("properties"), dict) else {}
        pairs = [f"{json.dumps(key, ensure_ascii=False)}: {minimal_value(grammar, properties.get(key, {}), depth + 1)}"
                 for key in required_keys(schema)]
        return "{" + ", ".join(pairs) + "}"
    return "null"


def int_keyword(schema: Schema, keyword: str, default: int | None) -> Any:
    value = schema.get(keyword, default)
    return value if isinstance(value, int) and not isinstance(value, bool) else default


def required_keys(schema: Schema) -> list[str]:
    required = schema.get("required", [])
    return [key for key in required if isinstance(key, str)] if isinstance(required, list) else []


def opening_for(grammar: Grammar, option: Schema, bad: str | None) -> str:
    """How a value of option begins, guessed from the character the model wrote instead."""
    literals = literals_of(option)
    if literals is not None:
        return best_literal(literals, "", bad)
    kinds = kinds_of(option)
    low = (bad or "").lower()
    if "boolean" in kinds and low in ("t", "y", "1"):
        return "true"
    if "boolean" in kinds and low in ("f", "n", "0"):
        return "false"
    if "null" in kinds and low == "n":
        return "null"
    if "string" in kinds and (bad is None or bad not in ",}]"):
        return '"'
    if ("number" in kinds or "integer" in kinds) and (bad is None or bad in "\"'"):
        return "0"
    if "object" in kinds and bad is not None and bad in "{(":
        return "{"
    if "array" in kinds and bad is not None and bad in "[(":
        return "["
    return ""


def best_literal(literals: Sequence[str], written: str, bad: str | None) -> str:
    """The rest of the literal that best goes on from written (the one whose next character is bad,
    ignoring case, or the first)."""
    matching = [text for text in literals if text.startswith(written)]
    for text in matching:
        rest = text[len(written):]
        if bad is not None and rest and rest[0].lower() == bad.lower():
            return rest
        if bad is not None and rest[:1] == '"' and rest[1:2].lower() == bad.lower():
            return rest
    return matching[0][len(written):] if matching else ""
