"""The API core through dispatch() on a FakeModel: bad input, good input, the queue, the time limit, CORS.

No model, no sockets: the real server on the real model is tested by the integration tests.
"""

from __future__ import annotations

import json
import threading
import time
from typing import Any

import pytest

from apiserver import api
from apiserver.api import ApiError, dispatch
from apiserver.engine import ClientGone
from fake_model import CONTEXT_ERROR_TEXT, FakeModel, fake_tokens
from unit_helpers import ROUTE, chatml, json_body, make_app, make_request, run_in_thread, wait_until

# --------------------------------------------------------------------------------------------
# 2. Bad input: one row each -> status, JSON error document, headers; the model is never called.
# --------------------------------------------------------------------------------------------

FORM = {"Content-Type": "application/x-www-form-urlencoded"}
JSON = {"Content-Type": "application/json"}

BAD_INPUT = [
    # (id, request keyword arguments, settings overrides, status, code, param, headers)
    ("invalid json", dict(body=b'{"prompt": ', headers=JSON), {}, 400, "invalid_json", None, {}),
    ("invalid utf-8", dict(body=b'{"prompt": "\xff"}', headers=JSON), {}, 400, "invalid_json", None, {}),
    ("json list", dict(body=["hi"]), {}, 400, "invalid_json", None, {}),
    ("json string", dict(body=b'"hi"', headers=JSON), {}, 400, "invalid_json", None, {}),
    ("json number", dict(body=b"42", headers=JSON), {}, 400, "invalid_json", None, {}),
    ("json null", dict(body=b"null", headers=JSON), {}, 400, "invalid_json", None, {}),
    ("deeply nested json", dict(body=b"[" * 100_000, headers=JSON), {}, 400, "invalid_json", None, {}),
    ("missing prompt", dict(body={"persona": "x"}), {}, 400, "missing_field", "prompt", {}),
    ("no body at all", dict(), {}, 400, "missing_field", "prompt", {}),
    ("empty prompt", dict(body={"prompt": ""}), {}, 400, "empty_field", "prompt", {}),
    ("blank prompt", dict(body={"prompt": " \n "}), {}, 400, "empty_field", "prompt", {}),
    ("prompt number", dict(body={"prompt": 5}), {}, 400, "invalid_type", "prompt", {}),
    ("prompt list", dict(body={"prompt": ["hi"]}), {}, 400, "invalid_type", "prompt", {}),
    ("prompt null", dict(body={"prompt": None}), {}, 400, "missing_field", "prompt", {}),
    ("prompt lone surrogate", dict(body={"prompt": "\ud800"}), {}, 400, "invalid_value", "prompt", {}),
    ("persona number", dict(body={"prompt": "hi", "persona": 5}), {}, 400, "invalid_type", "persona", {}),
    ("max_tokens abc", dict(body={"prompt": "hi", "max_tokens": "abc"}), {}, 400, "invalid_value", "max_tokens", {}),
    ("max_tokens true", dict(body={"prompt": "hi", "max_tokens": True}), {}, 400, "invalid_type", "max_tokens", {}),
    ("max_tokens 1.5", dict(body={"prompt": "hi", "max_tokens": 1.5}), {}, 400, "invalid_type", "max_tokens", {}),
    ("max_tokens 0", dict(body={"prompt": "hi", "max_tokens": 0}), {}, 400, "out_of_range", "max_tokens", {}),
    ("max_tokens form abc", dict(body="prompt=hi&max_tokens=abc", headers=FORM), {}, 400, "invalid_value",
     "max_tokens", {}),
    ("temperature hot", dict(body={"prompt": "hi", "temperature": "hot"}), {}, 400, "invalid_value", "temperature", {}),
    ("temperature nan", dict(body=b'{"prompt": "hi", "temperature": NaN}', headers=JSON), {}, 400, "invalid_type",
     "temperature", {}),
    ("temperature -1", dict(body={"prompt": "hi", "temperature": -1}), {}, 400, "out_of_range", "temperature", {}),
    ("temperature 3", dict(body={"prompt": "hi", "temperature": 3}), {}, 400, "out_of_range", "temperature", {}),
    ("temperature huge integer", dict(body=b'{"prompt": "hi", "temperature": 1' + b"0" * 400 + b"}",
                                                  headers=JSON), {}, 400, "out_of_range", "temperature", {}),
    ("temp alias -1", dict(body={"prompt": "hi", "temp": -1}), {}, 400, "out_of_range", "temperature", {}),
    ("top_p 0", dict(body={"prompt": "hi", "top_p": 0}), {}, 400, "out_of_range", "top_p", {}),
    ("top_p 1.5", dict(body={"prompt": "hi", "top_p": 1.5}), {}, 400, "out_of_range", "top_p", {}),
    ("top_k 0", dict(body={"prompt": "hi", "top_k": 0}), {}, 400, "out_of_range", "top_k", {}),
    ("repeat_penalty 0", dict(body={"prompt": "hi", "repeat_penalty": 0}), {}, 400, "out_of_range",
     "repeat_penalty", {}),
    ("stop number", dict(body={"prompt": "hi", "stop": 5}), {}, 400, "invalid_value", "stop", {}),
    ("stop empty string", dict(body={"prompt": "hi", "stop": [""]}), {}, 400, "invalid_value", "stop", {}),
    ("stop 17 strings", dict(body={"prompt": "hi", "stop": [f"s{n}" for n in range(17)]}), {}, 400,
     "invalid_value", "stop", {}),
    ("stop too long", dict(body={"prompt": "hi", "stop": ["x" * 257]}), {}, 400, "invalid_value", "stop", {}),
    ("unknown path", dict(method="GET", path="/nope"), {}, 404, "not_found", None, {}),
    ("GET on the route", dict(method="GET"), {}, 405, "method_not_allowed", None, {"Allow": "POST, OPTIONS"}),
    ("POST on /health", dict(path="/health", body={}), {}, 405, "method_not_allowed", None,
     {"Allow": "GET, OPTIONS"}),
    ("DELETE on chat", dict(method="DELETE", path="/v1/chat/completions"), {}, 405, "method_not_allowed", None,
     {"Allow": "POST, OPTIONS"}),
    ("text/xml body", dict(body="<prompt>hi</prompt>", headers={"Content-Type": "text/xml"}), {}, 415,
     "unsupported_media_type", None, {}),
    ("malformed form", dict(body="prompt", headers=FORM), {}, 400, "invalid_form", None, {}),
    ("malformed multipart", dict(body="no parts here", headers={"Content-Type": "multipart/form-data; boundary=B"}),
     {}, 400, "invalid_form", None, {}),
    ("length required", dict(body_error=ApiError(411, "length required", "length_required")), {}, 411,
     "length_required", None, {}),
    ("body too large", dict(body_error=ApiError(413, "too large", "body_too_large"), query={"prompt": "hi"}), {},
     413, "body_too_large", None, {}),
    ("api key missing", dict(body={"prompt": "hi"}), {"api_key": "s3cret"}, 401, "invalid_api_key", None,
     {"WWW-Authenticate": "Bearer"}),
    ("api key wrong", dict(body={"prompt": "hi"}, headers={"Authorization": "Bearer s3cre"}), {"api_key": "s3cret"},
     401, "invalid_api_key", None, {"WWW-Authenticate": "Bearer"}),
    ("api key wrong scheme", dict(body={"prompt": "hi"}, headers={"Authorization": "Basic s3cret"}),
     {"api_key": "s3cret"}, 401, "invalid_api_key", None, {"WWW-Authenticate": "Bearer"}),
    ("api key on /v1/models", dict(method="GET", path="/v1/models"), {"api_key": "s3cret"}, 401, "invalid_api_key",
     None, {"WWW-Authenticate": "Bearer"}),
    ("openai unknown model", dict(path="/v1/chat/completions",
                                  body={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}),
     {"model_names": ("my-model",)}, 404, "model_not_found", "model", {}),
    ("openai n=5", dict(path="/v1/chat/completions", body={"n": 5, "messages": [{"role": "user", "content": "hi"}]}),
     {}, 400, "unsupported_value", "n", {}),
    ("openai logprobs", dict(path="/v1/chat/completions",
                             body={"logprobs": True, "messages": [{"role": "user", "content": "hi"}]}),
     {}, 400, "unsupported_value", "logprobs", {}),
    ("openai unknown response_format", dict(path="/v1/chat/completions", body={
        "response_format": {"type": "xml"}, "messages": [{"role": "user", "content": "hi"}]}),
     {}, 400, "invalid_value", "response_format.type", {}),
    ("openai tool_choice not offered", dict(path="/v1/chat/completions", body={
        "tools": [{"type": "function", "function": {"name": "a"}}],
        "tool_choice": {"type": "function", "function": {"name": "b"}}, "messages": [{"role": "user", "content": "hi"}]}),
     {}, 400, "invalid_value", "tool_choice", {}),
    ("openai tool_choice function not an object", dict(path="/v1/chat/completions", body={
        "tools": [{"type": "function", "function": {"name": "a"}}], "tool_choice": {"function": 5},
        "messages": [{"role": "user", "content": "hi"}]}), {}, 400, "invalid_value", "tool_choice", {}),
    ("openai json_schema not an object", dict(path="/v1/chat/completions", body={
        "response_format": {"type": "json_schema", "json_schema": 5}, "messages": [{"role": "user", "content": "hi"}]}),
     {}, 400, "invalid_value", "response_format.json_schema.schema", {}),
    ("openai json_schema required not a list", dict(path="/v1/chat/completions", body={
        "response_format": {"type": "json_schema", "json_schema": {"schema": {"required": 5}}},
        "messages": [{"role": "user", "content": "hi"}]}), {}, 400, "invalid_value",
     "response_format.json_schema.schema", {}),
    ("openai model not a string", dict(path="/v1/chat/completions", body={
        "model": ["x"], "messages": [{"role": "user", "content": "hi"}]}), {}, 400, "invalid_type", "model", {}),
    ("openai tool message without id", dict(path="/v1/chat/completions", body={
        "messages": [{"role": "user", "content": "hi"}, {"role": "tool", "content": "18 C"}]}),
     {}, 400, "missing_field", "messages[1]", {}),
    ("openai bad tool call arguments", dict(path="/v1/chat/completions", body={"messages": [
        {"role": "assistant", "content": None, "tool_calls": [{"id": "c", "type": "function",
                                                               "function": {"name": "a", "arguments": "{oops"}}]}]}),
     {}, 400, "invalid_value", "messages[0].tool_calls[0]", {}),
    ("openai messages missing", dict(path="/v1/chat/completions", body={"model": "qwen2.5-coder-0.5b-instruct-q4_k_m"}),
     {}, 400, "invalid_value", "messages", {}),
    ("openai messages not a list", dict(path="/v1/chat/completions", body={"messages": "hi"}), {}, 400,
     "invalid_value", "messages", {}),
    ("openai messages empty", dict(path="/v1/chat/completions", body={"messages": []}), {}, 400, "invalid_value",
     "messages", {}),
    ("openai message not an object", dict(path="/v1/chat/completions", body={"messages": ["hi"]}), {}, 400,
     "invalid_type", "messages[0]", {}),
    ("openai bad role", dict(path="/v1/chat/completions", body={"messages": [{"role": "robot", "content": "hi"}]}),
     {}, 400, "invalid_value", "messages[0]", {}),
    ("openai content number", dict(path="/v1/chat/completions",
                                   body={"messages": [{"role": "user", "content": 5}]}), {}, 400, "invalid_type",
     "messages[0]", {}),
    ("openai image part", dict(path="/v1/chat/completions",
                               body={"messages": [{"role": "user", "content": [{"type": "image_url"}]}]}), {}, 400,
     "invalid_value", "messages[0]", {}),
    ("openai stream maybe", dict(path="/v1/chat/completions",
                                 body={"stream": "maybe", "messages": [{"role": "user", "content": "hi"}]}), {},
     400, "invalid_type", "stream", {}),
    ("openai tool without a function", dict(path="/v1/chat/completions", body={
        "tools": [{"type": "function"}], "messages": [{"role": "user", "content": "hi"}]}), {},
     400, "invalid_value", "tools[0]", {}),
    ("completions prompt missing", dict(path="/v1/completions", body={}), {}, 400, "invalid_value", "prompt", {}),
    ("completions two prompts", dict(path="/v1/completions", body={"prompt": ["a", "b"]}), {}, 400, "invalid_value",
     "prompt", {}),
    ("unknown model by path", dict(method="GET", path="/v1/models/gpt-4"), {"model_names": ("my-model",)}, 404,
     "model_not_found", "model", {}),
]


@pytest.mark.parametrize("case, request_arguments, overrides, status, code, param, headers", BAD_INPUT,
                         ids=[row.values[0] if hasattr(row, "values") else row[0] for row in BAD_INPUT])
def test_bad_input_gets_a_json_error(settings, case, request_arguments, overrides, status, code, param, headers):
    model = FakeModel()
    app = make_app(settings, model, **overrides)
    reply = dispatch(app, make_request(**request_arguments))
    assert reply.status == status, reply.body
    error = json_body(reply)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["code"] == code
    assert error["param"] == param
    assert error["type"] == api.ERROR_TYPES.get(status, "invalid_request_error")
    assert isinstance(error["message"], str) and error["message"]
    for name, value in headers.items():
        assert reply.headers.get(name) == value, name
    assert model.calls == []


def test_api_key_guards_all_but_health(settings):
    app = make_app(settings, FakeModel(), api_key="s3cret")
    assert dispatch(app, make_request("GET", "/health")).status == 200
    assert dispatch(app, make_request(body={"prompt": "hi"}, headers={"Authorization": "Bearer s3cret"})).status == 200
    assert dispatch(app, make_request("GET", "/v1/models", headers={"Authorization": "bearer s3cret"})).status == 200


def test_while_the_model_loads_generation_gets_503_with_retry_after(settings):
    app = make_app(settings, model=None)
    reply = dispatch(app, make_request(body={"prompt": "hi"}))
    assert reply.status == 503
    assert reply.headers["Retry-After"] == "1"
    assert json_body(reply)["error"]["code"] == "model_loading"
    assert json_body(reply)["error"]["type"] == "service_unavailable"
    health = dispatch(app, make_request("GET", "/health"))
    assert (health.status, json_body(health)["status"], health.headers["Retry-After"]) == (503, "loading", "1")


@pytest.mark.parametrize("path, body", [
    (ROUTE, {"prompt": " ".join(["word"] * 50)}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": " ".join(["word"] * 50)}]}),
    ("/v1/completions", {"prompt": " ".join(["word"] * 50)}),
])
def test_prompt_beyond_the_context_gets_400_never_200_with_the_error_text(settings, path, body):
    model = FakeModel(n_ctx=20)
    app = make_app(settings, model)
    reply = dispatch(app, make_request(path=path, body=body))
    assert reply.status == 400
    assert CONTEXT_ERROR_TEXT.encode() not in reply.body
    error = json_body(reply)["error"]
    assert (error["code"], error["param"]) == ("context_length_exceeded", "prompt")
    assert len(model.calls) == 1
    assert app.runner.completed == 0


def test_prompt_beyond_the_context_in_a_stream_raises_before_anything_is_sent(settings):
    app = make_app(settings, FakeModel(n_ctx=20))
    reply = dispatch(app, make_request(path="/v1/chat/completions", body={
        "stream": True, "messages": [{"role": "user", "content": " ".join(["word"] * 50)}]}))
    emitted: list[bytes] = []
    with pytest.raises(ApiError) as raised:
        reply.stream(emitted.append)
    assert (raised.value.status, raised.value.code) == (400, "context_length_exceeded")
    assert emitted == []


def test_model_exception_gets_500_and_the_next_request_is_served(settings, caplog):
    model = FakeModel(error=RuntimeError("the model broke"))
    app = make_app(settings, model)
    reply = dispatch(app, make_request(body={"prompt": "hi"}))
    assert reply.status == 500
    error = json_body(reply)["error"]
    assert (error["type"], error["code"]) == ("server_error", "internal_error")
    assert "the model broke" not in error["message"]
    assert "the model broke" in caplog.text  # the traceback goes to the log
    assert not app.runner.busy
    model.error = None
    reply = dispatch(app, make_request(body={"prompt": "hi"}))
    assert (reply.status, reply.body) == (200, b"Hello world")


# --------------------------------------------------------------------------------------------
# 3. Good input
# --------------------------------------------------------------------------------------------

MULTIPART = ("--XyZ\r\nContent-Disposition: form-data; name=\"prompt\"\r\n\r\nHi there\r\n"
             "--XyZ\r\nContent-Disposition: form-data; name=\"persona\"\r\n\r\nBe brief.\r\n"
             "--XyZ\r\nContent-Disposition: form-data; name=\"max_tokens\"\r\n\r\n1\r\n--XyZ--\r\n")


@pytest.mark.parametrize("request_arguments", [
    dict(body={"prompt": "Hi there", "persona": "Be brief.", "max_tokens": 1}),
    dict(body={"prompt": "Hi there", "persona": "Be brief.", "max_tokens": 1},
         headers={"Content-Type": "application/json; charset=utf-8"}),
    dict(body="prompt=Hi+there&persona=Be%20brief.&max_tokens=1", headers=FORM),
    dict(query={"prompt": "Hi there", "persona": "Be brief.", "max_tokens": "1"}),
    dict(query={"prompt": "ignored", "max_tokens": "9"},
         body={"prompt": "Hi there", "persona": "Be brief.", "max_tokens": 1}),
    dict(body=MULTIPART, headers={"Content-Type": "multipart/form-data; boundary=XyZ"}),
    dict(body=json.dumps({"prompt": "Hi there", "persona": "Be brief.", "max_tokens": 1}), headers=FORM),
], ids=["json", "json charset", "form", "query", "body overrides query", "multipart", "curl form with json"])
def test_good_input_in_every_encoding_reaches_the_model(settings, request_arguments):
    model = FakeModel(pieces=["Hello", " world"])
    app = make_app(settings, model)
    reply = dispatch(app, make_request(**request_arguments))
    assert reply.status == 200, reply.body
    assert reply.headers["Content-Type"] == "text/plain; charset=utf-8"
    assert reply.headers["X-Finish-Reason"] == "length"
    assert reply.body == b"Hello"
    assert [call["prompt"] for call in model.calls] == [chatml("Hi there", system="Be brief.")]
    assert model.calls[0]["max_tokens"] == 1


def test_accept_json_gives_the_json_reply(settings):
    app = make_app(settings, FakeModel(pieces=["Hello", " world"]))
    reply = dispatch(app, make_request(body={"prompt": "Hi there"}, headers={"Accept": "application/json"}))
    assert reply.status == 200
    document = json_body(reply)
    assert document["response"] == "Hello world"
    assert document["model"] == "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"
    assert document["finish_reason"] == "stop"
    prompt_words = len(fake_tokens(chatml("Hi there", system=settings.system_prompt)))
    assert document["usage"] == {"prompt_tokens": prompt_words, "completion_tokens": 2,
                                 "total_tokens": prompt_words + 2, "prompt_tokens_details": {"cached_tokens": 0}}
    assert set(document["timings"]) == {"queue_ms", "prompt_ms", "generation_ms", "tokens_per_second"}
    assert all(value >= 0 for value in document["timings"].values())
    assert reply.usage == {key: document["usage"][key] for key in ("prompt_tokens", "completion_tokens", "total_tokens")}


def test_sampling_fields_reach_the_model_and_temp_is_an_alias(settings):
    model = FakeModel()
    app = make_app(settings, model)
    dispatch(app, make_request(body={"prompt": "hi", "temp": 0.2, "top_k": 5, "top_p": 0.5, "min_p": 0.1,
                                     "repeat_penalty": 1.3, "repeat_last_n": 7, "max_tokens": 9}))
    dispatch(app, make_request(body={"prompt": "hi", "temp": 0.2, "temperature": 1.5}))
    dispatch(app, make_request(body={"prompt": "hi"}))
    sent = [{key: value for key, value in call.items() if key != "prompt"} for call in model.calls]
    assert sent[0] == {"max_tokens": 9, "temp": 0.2, "top_k": 5, "top_p": 0.5, "min_p": 0.1, "repeat_penalty": 1.3,
                       "repeat_last_n": 7, "n_batch": settings.n_batch, "reset_context": True}
    assert sent[1]["temp"] == 1.5
    assert sent[2] == {"max_tokens": settings.max_tokens, "temp": settings.temperature, "top_k": settings.top_k,
                       "top_p": settings.top_p, "min_p": settings.min_p, "repeat_penalty": settings.repeat_penalty,
                       "repeat_last_n": settings.repeat_last_n, "n_batch": settings.n_batch, "reset_context": True}


def test_max_tokens_is_capped_at_the_limit(settings):
    model = FakeModel(pieces=["a"] * 10)
    app = make_app(settings, model, max_tokens_limit=4)
    reply = dispatch(app, make_request(body={"prompt": "hi", "max_tokens": 100}))
    assert model.calls[0]["max_tokens"] == 4
    assert reply.body == b"aaaa"


@pytest.mark.parametrize("persona, prompt", [
    ("Answer in French.", chatml("Hi", system="Answer in French.")),
    ("", chatml("Hi")),
    (None, chatml("Hi", system="You are a helpful assistant.")),
], ids=["persona", "empty persona", "no persona"])
def test_persona_becomes_the_system_message(settings, persona, prompt):
    model = FakeModel()
    app = make_app(settings, model)
    body = {"prompt": "Hi"} if persona is None else {"prompt": "Hi", "persona": persona}
    assert dispatch(app, make_request(body=body)).status == 200
    assert model.calls[0]["prompt"] == prompt


def test_health_reports_the_model_and_counters(settings):
    app = make_app(settings, FakeModel())
    dispatch(app, make_request(body={"prompt": "hi"}))
    reply = dispatch(app, make_request("GET", "/health"))
    document = json_body(reply)
    assert reply.status == 200
    assert (document["status"], document["model"], document["requests_served"]) == (
        "ok", "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf", 1)
    assert (document["busy"], document["waiting"]) == (False, 0)


# --------------------------------------------------------------------------------------------
# 5. Queue
# --------------------------------------------------------------------------------------------


def test_queue_full_gives_503_with_retry_after(settings):
    gate = threading.Event()
    model = FakeModel(gate=gate)
    app = make_app(settings, model, queue_size=1)
    running = run_in_thread(lambda: dispatch(app, make_request(body={"prompt": "first"})))
    try:
        wait_until(lambda: model.started.is_set() and app.runner.busy, "the first request runs")
        waiting = run_in_thread(lambda: dispatch(app, make_request(body={"prompt": "second"})))
        wait_until(lambda: app.runner.waiting == 1, "the second request waits")
        third = run_in_thread(lambda: dispatch(app, make_request(body={"prompt": "third"})))
        third["thread"].join(5)
        assert "result" in third, "the third request was queued instead of refused"
    finally:
        gate.set()
    running["thread"].join(5)
    waiting["thread"].join(5)
    refused = third["result"]
    assert refused.status == 503
    assert refused.headers["Retry-After"] == "5"
    assert json_body(refused)["error"]["code"] == "queue_full"
    assert running["result"].status == 200
    assert waiting["result"].status == 200
    assert [call["prompt"] for call in model.calls] == [chatml("first", settings.system_prompt),
                                                        chatml("second", settings.system_prompt)]
    assert app.generations_admitted == 2


def test_waiting_request_whose_client_left_leaves_the_queue(settings):
    gate = threading.Event()
    model = FakeModel(gate=gate)
    app = make_app(settings, model, queue_size=1)
    running = run_in_thread(lambda: dispatch(app, make_request(body={"prompt": "first"})))
    client = threading.Event()
    client.set()
    try:
        wait_until(lambda: model.started.is_set() and app.runner.busy, "the first request runs")
        waiting = run_in_thread(lambda: dispatch(app, make_request(body={"prompt": "second"},
                                                                   client_alive=client.is_set)))
        wait_until(lambda: app.runner.waiting == 1, "the second request waits")
        client.clear()
        wait_until(lambda: app.runner.waiting == 0, "the second request leaves the queue")
        waiting["thread"].join(5)
        assert isinstance(waiting.get("error"), ClientGone)
    finally:
        gate.set()
    running["thread"].join(5)
    assert running["result"].status == 200
    assert len(model.calls) == 1


def test_client_leaving_during_generation_stops_the_model(settings):
    client = threading.Event()
    client.set()

    class LeavingModel(FakeModel):
        def generate(self, prompt: str, **kwargs: Any) -> str:
            callback = kwargs["callback"]

            def leave_after_first_piece(token_id: int, piece: str) -> bool:
                keep_going = callback(token_id, piece)
                client.clear()
                return keep_going
            return super().generate(prompt, **{**kwargs, "callback": leave_after_first_piece})

    model = LeavingModel(pieces=["a", "b", "c", "d"])
    app = make_app(settings, model)
    with pytest.raises(ClientGone):
        dispatch(app, make_request(body={"prompt": "hi"}, client_alive=client.is_set))
    assert not app.runner.busy
    assert app.runner.completed == 0


# --------------------------------------------------------------------------------------------
# 6. Time limit
# --------------------------------------------------------------------------------------------


def test_time_limit_returns_the_partial_answer_with_finish_reason_timeout(settings):
    model = FakeModel(pieces=["a "] * 100, delay=0.02)
    app = make_app(settings, model, max_seconds=0.15)
    started = time.monotonic()
    reply = dispatch(app, make_request(body={"prompt": "hi"}, headers={"Accept": "application/json"}))
    assert time.monotonic() - started < 1.5
    document = json_body(reply)
    assert document["finish_reason"] == "timeout"
    assert 0 < document["usage"]["completion_tokens"] < 100
    assert document["response"] == "a " * document["usage"]["completion_tokens"]


def test_time_limit_in_openai_shape_is_finish_reason_length(settings):
    app = make_app(settings, FakeModel(pieces=["a "] * 100, delay=0.02), max_seconds=0.1)
    reply = dispatch(app, make_request(path="/v1/completions", body={"prompt": "hi"}))
    choice = json_body(reply)["choices"][0]
    assert choice["finish_reason"] == "length"
    assert choice["text"].startswith("a ") and len(choice["text"]) < 200


def test_answer_that_completes_after_the_deadline_keeps_finish_reason_stop(settings):
    app = make_app(settings, FakeModel(pieces=["done<|im_end|>"], delay=0.15), max_seconds=0.05)
    reply = dispatch(app, make_request(body={"prompt": "hi"}))
    assert reply.body == b"done"
    assert reply.headers["X-Finish-Reason"] == "stop"


# --------------------------------------------------------------------------------------------
# CORS: off by default; allowed origins get the headers, preflight needs no API key.
# --------------------------------------------------------------------------------------------

PREFLIGHT = {"Origin": "https://app.example", "Access-Control-Request-Method": "POST",
             "Access-Control-Request-Headers": "authorization, content-type"}


def test_cors_is_off_by_default(settings):
    app = make_app(settings, FakeModel())
    preflight = dispatch(app, make_request("OPTIONS", "/v1/chat/completions", headers=PREFLIGHT))
    assert preflight.status == 204 and preflight.headers["Allow"] == "POST, OPTIONS"
    assert "Access-Control-Allow-Origin" not in preflight.headers
    reply = dispatch(app, make_request(body={"prompt": "hi"}, headers={"Origin": "https://app.example"}))
    assert reply.status == 200 and "Access-Control-Allow-Origin" not in reply.headers


def test_cors_preflight_and_reply_for_an_allowed_origin(settings):
    app = make_app(settings, FakeModel(), cors_origins=("https://app.example",), api_key="s3cret")
    preflight = dispatch(app, make_request("OPTIONS", "/v1/chat/completions", headers=PREFLIGHT))
    assert preflight.status == 204, "a preflight carries no credentials: it needs no key"
    assert preflight.headers["Access-Control-Allow-Origin"] == "https://app.example"
    assert preflight.headers["Access-Control-Allow-Headers"] == "authorization, content-type"
    assert "POST" in preflight.headers["Access-Control-Allow-Methods"]
    reply = dispatch(app, make_request(body={"prompt": "hi"}, headers={
        "Origin": "https://app.example", "Authorization": "Bearer s3cret"}))
    assert reply.status == 200 and reply.headers["Access-Control-Allow-Origin"] == "https://app.example"
    refused = dispatch(app, make_request(body={"prompt": "hi"}, headers={"Origin": "https://app.example"}))
    assert refused.status == 401 and refused.headers["Access-Control-Allow-Origin"] == "https://app.example", \
        "a browser must be able to read the error"


def test_cors_ignores_other_origins_and_allows_any_with_a_star(settings):
    app = make_app(settings, FakeModel(), cors_origins=("https://app.example",))
    other = dispatch(app, make_request("OPTIONS", ROUTE, headers={**PREFLIGHT, "Origin": "https://evil.example"}))
    assert "Access-Control-Allow-Origin" not in other.headers
    star = make_app(settings, FakeModel(), cors_origins=("*",))
    reply = dispatch(star, make_request("OPTIONS", ROUTE, headers={**PREFLIGHT, "Origin": "https://evil.example"}))
    assert reply.headers["Access-Control-Allow-Origin"] == "*"
