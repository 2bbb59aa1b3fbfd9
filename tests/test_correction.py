"""Constrained generation by correction through the engine, on a scripted fake model: the token that
leaves the grammar is taken back (the context's n_past and token list), the correction is evaluated
in its place, the model goes on; an early stop is corrected; the correction budget ends in a closed
document; the token limit inside the JSON gives finish "length" and the text so far; a stream
never carries rejected text; and the API routes answer 200 where they answered 500."""

from __future__ import annotations

import json
from collections.abc import Sequence

import pytest

from apiserver import correction
from apiserver.api import dispatch
from apiserver.constraints import JsonAnswer, ToolCalls
from apiserver.engine import GenerationParams
from fake_model import FakeModel, fake_tokens
from unit_helpers import json_body, make_app, make_request

PERSON = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
          "required": ["name", "age"], "additionalProperties": False}
PROMPT = "<|im_start|>user\nWho?<|im_end|>\n<|im_start|>assistant\n"


def params(max_tokens: int = 50) -> GenerationParams:
    return GenerationParams(max_tokens=max_tokens, temperature=0.0, top_k=40, top_p=0.9, min_p=0.0,
                            repeat_penalty=1.0, repeat_last_n=64)


def run(settings, answers: Sequence[Sequence[str]], constraint, max_tokens: int = 50):
    model = FakeModel(answers=answers)
    app = make_app(settings, model)
    streamed: list[str] = []
    completion = app.runner.complete(PROMPT, params(max_tokens), lambda: True, on_text=streamed.append,
                                     constraint=constraint)
    return model, completion, "".join(streamed)


def piece_id(piece: str) -> int:
    return (fake_tokens(piece) or [1000])[0]


def test_a_rejected_token_is_taken_back_and_the_correction_evaluated_in_its_place(settings):
    answers = [[' "Ann"', ', "age": ', '"3"', "}"], ["}"]]
    model, completion, streamed = run(settings, answers, JsonAnswer(PERSON, '{"name": '))
    assert completion.text == ' "Ann", "age": 0}'
    assert streamed == completion.text  # the rejected '"3"' never left
    assert completion.corrections == 1 and completion.finish_reason == "stop"
    assert completion.constrained_complete is True
    assert model.calls[1]["prompt"] == "0" and model.calls[1]["reset_context"] is False
    # the context holds the prompt, the two accepted tokens, the correction, the last token: not '"3"'
    assert model.model.tokens == fake_tokens(PROMPT) + [piece_id(' "Ann"'), piece_id(', "age": ')] + \
        fake_tokens("0") + [piece_id("}")]


def test_a_model_that_stops_before_the_json_is_complete_is_led_to_its_end(settings):
    answers = [[' "Ann"'], [" 5"], []]
    _, completion, _ = run(settings, answers, JsonAnswer(PERSON, '{"name": '))
    assert completion.text == ' "Ann", "age":  5}'
    assert json.loads('{"name": ' + completion.text) == {"name": "Ann", "age": 5}
    assert completion.corrections == 2


def test_past_the_budget_the_engine_closes_the_json_itself(settings, monkeypatch):
    monkeypatch.setattr(correction, "MAX_CORRECTIONS", 3)
    answers = [[' "Ann"', ", oops"]] + [["oops"]] * 5
    _, completion, _ = run(settings, answers, JsonAnswer(PERSON, '{"name": '))
    assert completion.corrections == 3
    assert json.loads('{"name": ' + completion.text)["name"] == "Ann"


def test_the_token_limit_inside_the_json_ends_it_with_length_and_the_text_so_far(settings):
    answers = [[' "Ann"', ', "age": ', "3"]]
    _, completion, _ = run(settings, answers, JsonAnswer(PERSON, '{"name": '), max_tokens=3)
    assert completion.finish_reason == "length"
    assert completion.text == ' "Ann", "age": 3'


def test_an_offered_function_name_is_completed_and_its_arguments_follow_its_parameters(settings):
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {
        "type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"]}}}]
    answers = [['{"name": "get_', 'wether"'], [', "arguments": {"city": ', "{"], ['Paris", "unit": "C'], ["}}"]]
    _, completion, _ = run(settings, answers, ToolCalls(tools, "arguments", ""))
    call = json.loads(completion.text)
    assert call == {"name": "get_weather", "arguments": {"city": "Paris", "unit": "celsius"}}


def test_text_in_words_is_not_constrained_when_tools_are_offered(settings):
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object"}}}]
    answers = [["It is ", "sunny {not json"]]
    _, completion, _ = run(settings, answers, ToolCalls(tools, "arguments", ""))
    assert completion.text == "It is sunny {not json" and completion.corrections == 0


@pytest.mark.parametrize("stream", [False, True])
def test_json_mode_answers_200_with_finish_length_where_it_answered_500(settings, stream):
    model = FakeModel(pieces=['"colors": ', '["red", ', '"blue"'])
    app = make_app(settings, model)
    reply = dispatch(app, make_request(path="/v1/chat/completions", body={
        "messages": [{"role": "user", "content": "Colors?"}], "response_format": {"type": "json_object"},
        "max_tokens": 3, "stream": stream}))
    assert reply.status == 200
    if not stream:
        choice = json_body(reply)["choices"][0]
        assert choice["finish_reason"] == "length"
        assert choice["message"]["content"] == '{"colors": ["red", "blue"'


def test_a_schema_no_answer_can_follow_is_refused_up_front(settings):
    app = make_app(settings, FakeModel())
    reply = dispatch(app, make_request(path="/v1/chat/completions", body={
        "messages": [{"role": "user", "content": "x"}],
        "response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
            "type": "string", "minLength": 3, "maxLength": 1}}}}))
    assert reply.status == 400
    assert json_body(reply)["error"]["param"] == "response_format.json_schema.schema"
