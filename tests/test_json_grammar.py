"""The incremental JSON checker and its corrections (apiserver/json_grammar.py): valid documents
pass whatever the pieces they arrive in, the first invalid character is found, every correction goes
on validly, and an answer driven by a model that keeps leaving the grammar still ends as a document
that parses and that jsonschema (the judge) accepts."""

from __future__ import annotations

import json
import random

import jsonschema
import pytest

from apiserver.json_grammar import Checker, follows
from apiserver.json_schema import SchemaError

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}

SCHEMAS = {
    "object": {"type": "object"},
    "person": PERSON,
    "nested": {"type": "object", "properties": {"owner": PERSON, "pets": {"type": "array", "items": {"type": "string"}}},
               "required": ["owner", "pets"]},
    "array_of_objects": {"type": "array", "items": PERSON, "minItems": 2, "maxItems": 3},
    "enum": {"type": "object", "properties": {"unit": {"enum": ["celsius", "fahrenheit"]}}, "required": ["unit"]},
    "integers": {"type": "object", "properties": {"values": {"type": "array", "items": {"type": "integer"}}},
                 "required": ["values"]},
    "booleans": {"type": "object", "properties": {"ok": {"type": "boolean"}, "done": {"type": "boolean"}},
                 "required": ["ok", "done"]},
    "nullable": {"type": "object", "properties": {"note": {"type": ["string", "null"]},
                                                  "score": {"anyOf": [{"type": "number"}, {"type": "null"}]}},
                 "required": ["note", "score"]},
    "lengths": {"type": "object", "properties": {"code": {"type": "string", "minLength": 3, "maxLength": 5}},
                "required": ["code"]},
    "const_root": {"const": "foooooo"},
    "const_inside": {"type": "object", "properties": {"answer": {"const": "foooooo"}}, "required": ["answer"]},
    "string_root": {"type": "string"},
    "number_root": {"type": "number"},
    "array_root": {"type": "array", "items": {"type": "number"}},
    "any_of_objects": {"anyOf": [{"type": "object", "properties": {"cat": {"type": "string"}}, "required": ["cat"],
                                  "additionalProperties": False},
                                 {"type": "object", "properties": {"dog": {"type": "integer"}}, "required": ["dog"],
                                  "additionalProperties": False}]},
    "refs": {"$defs": {"point": {"type": "object", "properties": {"x": {"type": "number"}, "y": {"type": "number"}},
                                 "required": ["x", "y"]}},
             "type": "object", "properties": {"start": {"$ref": "#/$defs/point"}, "end": {"$ref": "#/$defs/point"}},
             "required": ["start", "end"]},
    "min_items_empty_forbidden": {"type": "object", "properties": {"tags": {"type": "array", "minItems": 1,
                                                                            "items": {"type": "string", "minLength": 1}}},
                                  "required": ["tags"]},
}


def pieces(text: str, cuts: list[int]) -> list[str]:
    bounds = [0] + sorted(cuts) + [len(text)]
    return [text[start:end] for start, end in zip(bounds, bounds[1:])]


@pytest.mark.parametrize("text", [
    '{"a": [1, -2.5e+3, 0, true, false, null], "b": {"c": "x\\n\\"y\\" \\u00e9"}}',
    '{"greeting": "你好！ 🙂", "empty": {}, "list": []}',
    '  {"a" :\n 1 }',
])
def test_valid_json_passes_in_any_pieces(text: str) -> None:
    rng = random.Random(7)
    for _ in range(40):
        checker = Checker(None)
        cuts = rng.sample(range(1, len(text)), k=min(6, len(text) - 1))
        for piece in pieces(text, cuts):
            assert checker.feed(piece) == len(piece)
        assert checker.complete


@pytest.mark.parametrize("text, bad_at", [
    ('{"a": 01}', 7),  # a leading zero
    ("{'a': 1}", 1),  # single quotes
    ('{"a": 1,}', 8),  # a trailing comma
    ('{"a": "x\ny"}', 8),  # a raw newline inside a string
    ('{"a": "\\x"}', 8),  # an escape that does not exist
    ('{"a": True}', 6),  # Python's True
    ('{"a": 1.}', 8),  # a fraction without digits
    ('{"a" 1}', 5),  # no colon
    ('{"a": -}', 7),  # a sign alone
])
def test_the_first_invalid_character_is_found(text: str, bad_at: int) -> None:
    checker = Checker(None)
    assert checker.feed(text) == bad_at
    assert not checker.complete


def test_the_document_ends_where_the_root_value_closes() -> None:
    checker = Checker(None)
    assert checker.feed('{"a": 1}\n\nThat is all.') == len('{"a": 1}')
    assert checker.complete
    number = Checker({"type": "integer"})
    assert number.feed("42") == 2 and not number.complete and number.can_end()
    assert number.feed(" and more") == 0 and number.complete


def test_multibyte_text_split_inside_a_character_sequence() -> None:
    checker = Checker({"type": "object", "properties": {"word": {"type": "string", "maxLength": 2}}})
    for piece in ['{"word": "', "你", "好", '"}']:
        assert checker.feed(piece) == len(piece)
    assert checker.complete
    longer = Checker({"type": "object", "properties": {"word": {"type": "string", "maxLength": 2}}})
    assert longer.feed('{"word": "你好！"}') == len('{"word": "你好')


@pytest.mark.parametrize("schema, text, valid", [
    (PERSON, '{"name": "Ann", "age": 3}', True),
    (PERSON, '{"name": "Ann"}', False),  # a required key missing
    (PERSON, '{"name": "Ann", "age": 3.5}', False),  # an integer with a fraction
    (PERSON, '{"name": "Ann", "age": 3, "x": 1}', False),  # additionalProperties false
    (SCHEMAS["enum"], '{"unit": "kelvin"}', False),
    (SCHEMAS["enum"], '{"unit": "celsius"}', True),
    (SCHEMAS["array_of_objects"], '[{"name": "A", "age": 1}]', False),  # minItems
    (SCHEMAS["lengths"], '{"code": "ab"}', False),
    (SCHEMAS["lengths"], '{"code": "abcdef"}', False),
    (SCHEMAS["const_root"], '"foooooo"', True),
    (SCHEMAS["const_inside"], '{"answer": 42}', False),
    (SCHEMAS["any_of_objects"], '{"dog": 3}', True),
    (SCHEMAS["any_of_objects"], '{"dog": "x"}', False),
    (SCHEMAS["nullable"], '{"note": null, "score": 1.5}', True),
    (SCHEMAS["refs"], '{"start": {"x": 1, "y": 2}, "end": {"x": 3}}', False),
])
def test_schemas_are_followed(schema: dict, text: str, valid: bool) -> None:
    assert follows(text, schema) is valid
    assert jsonschema.Draft202012Validator(schema).is_valid(json.loads(text)) is valid


def drive(schema: dict | None, model_pieces: list[str], budget: int = 64) -> tuple[str, int]:
    """What the engine does: feed the model's pieces; where one is rejected keep its valid part,
    write the correction instead and let the model go on; when the model stops early, correct
    toward the end; past the budget, close."""
    checker = Checker(schema)
    text, corrections = "", 0
    queue = list(model_pieces)
    while queue and not checker.complete:
        piece = queue.pop(0)
        taken = checker.feed(piece)
        text += piece[:taken]
        if checker.complete or taken == len(piece):
            continue
        if corrections == budget:
            break
        fix = checker.correction(piece[taken])
        if not fix:  # a number or literal at the root ends here
            assert checker.can_end(), f"no correction after {text!r} for {piece[taken]!r}"
            break
        assert checker.feed(fix) == len(fix)
        text += fix
        corrections += 1
    while not checker.can_end() and corrections < budget:
        fix = checker.correction(None)
        assert checker.feed(fix) == len(fix)
        text, corrections = text + fix, corrections + 1
    closing = checker.closing()
    assert checker.feed(closing) == len(closing)
    return text + closing, corrections


@pytest.mark.parametrize("name", sorted(SCHEMAS))
def test_a_model_that_keeps_leaving_the_grammar_still_ends_valid(name: str) -> None:
    schema = SCHEMAS[name]
    validator = jsonschema.Draft202012Validator(schema)
    rng = random.Random(name)
    alphabet = list('{}[]",:. \n\\-0123456789eEtruefalsnlxyzABC你\'')
    for trial in range(150):
        junk = "".join(rng.choice(alphabet) for _ in range(rng.randint(0, 60)))
        text, _ = drive(schema, pieces(junk, rng.sample(range(1, max(2, len(junk))), k=min(5, max(0, len(junk) - 1)))))
        document = json.loads(text)
        assert validator.is_valid(document), (trial, junk, text, list(validator.iter_errors(document))[:1])


@pytest.mark.parametrize("answer, schema, expected", [
    ('{"name": "Ann", "age": "3"}', PERSON, '{"name": "Ann", "age": 0}'),
    ('{"name": "Ann"}', PERSON, '{"name": "Ann", "age": 0}'),
    ('{"unit": "Celsius"}', SCHEMAS["enum"], '{"unit": "celsius"}'),
    ('{"answer": 42}', SCHEMAS["const_inside"], '{"answer": "foooooo"}'),
    ('{"a": "line one\nline two"}', None, '{"a": "line one\\nline two"}'),
    ('{"a": 1 "b": 2}', None, '{"a": 1 , "b": 2}'),
    ('{"ok": True, "done": False}', SCHEMAS["booleans"], '{"ok": true, "done": false}'),
])
def test_corrections_keep_what_the_model_meant_where_they_can(answer: str, schema: dict | None, expected: str) -> None:
    # the model writes its answer a character at a time and, after a correction, goes on with what
    # it meant: the rejected character again if the correction was written before it, else what
    # follows the characters the correction replaced
    checker = Checker(schema)
    text, position = "", 0
    while position < len(answer) and not checker.complete:
        char = answer[position]
        if checker.feed(char) == 1:
            text, position = text + char, position + 1
            continue
        fix = checker.correction(char)
        assert checker.feed(fix) == len(fix)
        text += fix
        while position < len(answer) and checker.copy().feed(answer[position]) == 0:
            position += 1
    if not checker.can_end():
        closing = checker.closing()
        text += closing
    assert text == expected


def test_closing_completes_every_open_value_with_required_keys() -> None:
    checker = Checker(SCHEMAS["nested"])
    checker.feed('{"owner": {"name": "Bo')
    closing = checker.closing()
    assert closing == '", "age": 0}, "pets": []}'
    assert follows('{"owner": {"name": "Bo' + closing, SCHEMAS["nested"])


def test_an_unresolvable_reference_is_a_schema_error() -> None:
    with pytest.raises(SchemaError):
        Checker({"$ref": "#/$defs/missing"}).closing()
