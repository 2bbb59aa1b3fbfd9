"""The Ollama API's shapes through dispatch() on a FakeModel: NDJSON lines, the final line's fields,
tool calls with object arguments, load and unload, errors as {"error": "…"}."""

from __future__ import annotations

import json
from typing import Any

from apiserver.api import dispatch
from fake_model import FakeModel
from unit_helpers import make_app, make_request

FRANCE = [{"role": "user", "content": "Capital of France?"}]


def ndjson(reply) -> list[Any]:
    assert reply.headers["Content-Type"] == "application/x-ndjson" and reply.headers["X-Accel-Buffering"] == "no"
    emitted: list[bytes] = []
    reply.stream(emitted.append)
    return [json.loads(line) for line in b"".join(emitted).splitlines()]


def test_chat_streams_by_default_and_ends_with_the_durations(settings):
    app = make_app(settings, FakeModel(pieces=["Paris", " it is"]))
    lines = ndjson(dispatch(app, make_request(path="/api/chat", body={"model": "m", "messages": FRANCE})))
    assert "".join(line["message"]["content"] for line in lines) == "Paris it is"
    assert all(not line["done"] and line["model"] == "m" and line["message"]["role"] == "assistant"
               for line in lines[:-1])
    last = lines[-1]
    assert last["done"] and last["done_reason"] == "stop" and last["eval_count"] == 2
    assert all(isinstance(last[key], int) for key in ("total_duration", "load_duration", "prompt_eval_count",
                                                      "prompt_eval_duration", "eval_count", "eval_duration"))


def test_generate_whole_with_stream_false(settings):
    app = make_app(settings, FakeModel(pieces=["Hi"]))
    reply = dispatch(app, make_request(path="/api/generate", body={"model": "m", "prompt": "x", "stream": False,
                                                                   "options": {"num_predict": 1, "seed": 3}}))
    document = json.loads(reply.body)
    assert document["response"] == "Hi" and document["done"] and document["done_reason"] == "length"


def test_a_tool_call_has_object_arguments(settings):
    app = make_app(settings, FakeModel(pieces=['{"name": "get_weather", "arguments": {"city": "Paris"}}']))
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    reply = dispatch(app, make_request(path="/api/chat", body={"model": "m", "messages": FRANCE, "tools": tools,
                                                               "stream": False}))
    message = json.loads(reply.body)["message"]
    assert message["tool_calls"] == [{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]
    lines = ndjson(dispatch(app, make_request(path="/api/chat", body={"model": "m", "messages": FRANCE,
                                                                      "tools": tools})))
    assert [line["message"].get("tool_calls") for line in lines if line["message"].get("tool_calls")] == \
           [[{"function": {"name": "get_weather", "arguments": {"city": "Paris"}}}]]


def test_load_and_unload_do_not_generate(settings):
    model = FakeModel()
    app = make_app(settings, model)
    loaded = json.loads(dispatch(app, make_request(path="/api/generate", body={"model": "m"})).body)
    unloaded = json.loads(dispatch(app, make_request(path="/api/chat", body={"model": "m", "messages": [],
                                                                             "keep_alive": 0})).body)
    assert (loaded["done_reason"], unloaded["done_reason"]) == ("load", "unload") and not model.calls


def test_errors_are_ollama_shaped(settings):
    app = make_app(settings, FakeModel(), model_names=("llama3.2",))
    missing = dispatch(app, make_request(path="/api/chat", body={"model": "gpt-4o", "messages": FRANCE}))
    assert missing.status == 404 and json.loads(missing.body) == {"error": "model 'gpt-4o' not found"}
    assert dispatch(app, make_request(path="/api/chat", body={"model": "llama3.2:latest", "messages": FRANCE,
                                                              "stream": False})).status == 200
    too_big = dispatch(app, make_request(path="/api/chat", body={"model": "llama3.2", "messages": FRANCE,
                                                                 "options": {"num_ctx": 10 ** 6}}))
    assert too_big.status == 400 and "num_ctx" in json.loads(too_big.body)["error"]
    guarded = make_app(settings, FakeModel(), api_key="k")
    refused = dispatch(guarded, make_request("GET", "/api/tags"))
    assert refused.status == 401 and set(json.loads(refused.body)) == {"error"}
    probe = dispatch(guarded, make_request("GET", "/"))
    assert probe.status == 200 and probe.body == b"Ollama is running"


def test_bad_options_name_ollamas_field(settings):
    app = make_app(settings, FakeModel())
    for options, field in (({"num_predict": -5}, "options.num_predict"), ({"temperature": "hot"}, "options.temperature"),
                           ({"num_ctx": "big"}, "options.num_ctx")):
        reply = dispatch(app, make_request(path="/api/chat", body={"model": "m", "messages": FRANCE,
                                                                   "options": options}))
        assert reply.status == 400 and json.loads(reply.body)["error"].startswith(field), reply.body


def test_bad_tool_calls_in_history_and_bad_schemas_are_400s(settings):
    app = make_app(settings, FakeModel())
    tools = [{"type": "function", "function": {"name": "f"}}]
    for call in ({"function": {"name": 5, "arguments": {}}}, {"function": {"name": "f", "arguments": [[1, 2]]}}):
        reply = dispatch(app, make_request(path="/api/chat", body={"model": "m", "tools": tools, "messages": [
            {"role": "user", "content": "x"}, {"role": "assistant", "content": "", "tool_calls": [call]}]}))
        assert reply.status == 400 and "tool_calls" in json.loads(reply.body)["error"]
    reply = dispatch(app, make_request(path="/api/chat", body={"model": "m", "messages": FRANCE,
                                                               "format": {"required": [["x"]]}}))
    assert reply.status == 400


def test_null_stream_means_the_default_and_text_around_a_call_is_not_lost(settings):
    pieces = ["Sure {not json} then ", '<tool_call>{"name": "f", "arguments": {}}</tool_call>', " bye"]
    app = make_app(settings, FakeModel(pieces=pieces))
    tools = [{"type": "function", "function": {"name": "f"}}]
    lines = ndjson(dispatch(app, make_request(path="/api/chat", body={"model": "m", "messages": FRANCE,
                                                                      "tools": tools, "stream": None})))
    whole = json.loads(dispatch(app, make_request(path="/api/chat", body={
        "model": "m", "messages": FRANCE, "tools": tools, "stream": False})).body)["message"]
    assert "".join(line["message"]["content"] for line in lines) == whole["content"] == "Sure {not json} then bye"
