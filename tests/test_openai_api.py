"""The OpenAI API's shapes, whole and streamed, through dispatch() on a FakeModel."""

from __future__ import annotations

import json
import time

from apiserver.api import dispatch
from fake_model import FakeModel, fake_tokens
from unit_helpers import chatml, json_body, make_app, make_request, sse_events

# --------------------------------------------------------------------------------------------
# 8. OpenAI shapes
# --------------------------------------------------------------------------------------------

MODEL_ID = "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"


def test_chat_completion_shape(settings):
    model = FakeModel(pieces=["Hello", " world"])
    app = make_app(settings, model)
    before = int(time.time())
    reply = dispatch(app, make_request(path="/v1/chat/completions", body={
        "model": "qwen2.5-coder-0.5b-instruct-q4_k_m", "max_tokens": 10,
        "messages": [{"role": "developer", "content": "Be brief."}, {"role": "user", "content": "Hi"}]}))
    assert reply.status == 200
    document = json_body(reply)
    assert document["id"].startswith("chatcmpl-") and len(document["id"]) > len("chatcmpl-")
    assert document["object"] == "chat.completion"
    assert before <= document["created"] <= int(time.time())
    assert document["model"] == MODEL_ID
    assert document["choices"] == [{"index": 0, "message": {"role": "assistant", "content": "Hello world"},
                                    "logprobs": None, "finish_reason": "stop"}]
    prompt_words = len(fake_tokens(chatml("Hi", "Be brief.")))
    assert document["usage"] == {"prompt_tokens": prompt_words, "completion_tokens": 2,
                                 "total_tokens": prompt_words + 2, "prompt_tokens_details": {"cached_tokens": 0}}
    assert model.calls[0]["prompt"] == chatml("Hi", "Be brief.")
    assert model.calls[0]["max_tokens"] == 10


def test_chat_content_as_text_parts_is_joined(settings):
    model = FakeModel()
    app = make_app(settings, model)
    reply = dispatch(app, make_request(path="/v1/chat/completions", body={"messages": [
        {"role": "user", "content": [{"type": "text", "text": "Hi "}, {"type": "text", "text": "there"}]}]}))
    assert reply.status == 200
    assert model.calls[0]["prompt"] == chatml("Hi there")


def test_chat_completion_stops_at_the_template_end_marker(settings):
    app = make_app(settings, FakeModel(pieces=["Hi", "<|im_", "end|>", "junk"]))
    reply = dispatch(app, make_request(path="/v1/chat/completions",
                                       body={"messages": [{"role": "user", "content": "x"}]}))
    assert json_body(reply)["choices"][0]["message"]["content"] == "Hi"


def test_text_completion_shape_sends_the_prompt_untemplated(settings):
    model = FakeModel(pieces=["4"])
    app = make_app(settings, model)
    reply = dispatch(app, make_request(path="/v1/completions", body={"prompt": ["2 + 2 ="], "model": MODEL_ID}))
    document = json_body(reply)
    assert document["id"].startswith("cmpl-")
    assert document["object"] == "text_completion"
    assert document["model"] == MODEL_ID
    assert document["choices"] == [{"index": 0, "text": "4", "logprobs": None, "finish_reason": "stop"}]
    assert document["usage"]["completion_tokens"] == 1
    assert model.calls[0]["prompt"] == "2 + 2 ="


def test_chat_stream_events(settings):
    app = make_app(settings, FakeModel(pieces=["Hel", "lo", " wor<|im", "ld"]))
    reply = dispatch(app, make_request(path="/v1/chat/completions", body={
        "stream": True, "stream_options": {"include_usage": True},
        "messages": [{"role": "user", "content": "Hi"}]}))
    assert reply.status == 200
    events = sse_events(reply)
    assert events[-1] == "[DONE]"
    chunks = events[:-1]
    assert len({chunk["id"] for chunk in chunks}) == 1 and chunks[0]["id"].startswith("chatcmpl-")
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert {chunk["model"] for chunk in chunks} == {MODEL_ID}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    text_chunks, finish, usage = chunks[1:-2], chunks[-2], chunks[-1]
    assert "".join(chunk["choices"][0]["delta"]["content"] for chunk in text_chunks) == "Hello wor<|imld"
    assert all(chunk["choices"][0]["finish_reason"] is None for chunk in chunks[:-2])
    assert all(chunk["usage"] is None for chunk in chunks[:-1])
    assert finish["choices"] == [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]
    assert usage["choices"] == []
    assert usage["usage"]["completion_tokens"] == 4
    assert reply.usage == usage["usage"]


def test_chat_stream_never_sends_a_split_end_marker(settings):
    app = make_app(settings, FakeModel(pieces=["Hi", " there<|im", "_end|>", "junk"]))
    reply = dispatch(app, make_request(path="/v1/chat/completions", body={
        "stream": "true", "messages": [{"role": "user", "content": "Hi"}]}))
    events = sse_events(reply)
    contents = [event["choices"][0]["delta"].get("content") for event in events[:-1]]
    assert contents == ["", "Hi", " there", None]
    assert events[-2]["choices"][0]["finish_reason"] == "stop"
    assert all("usage" not in event for event in events[:-1])


def test_chat_stream_sends_a_held_back_prefix_at_the_end(settings):
    app = make_app(settings, FakeModel(pieces=["Hi", " <|im"]))
    reply = dispatch(app, make_request(path="/v1/chat/completions", body={
        "stream": True, "messages": [{"role": "user", "content": "Hi"}]}))
    contents = [event["choices"][0]["delta"].get("content") for event in sse_events(reply)[:-1]]
    assert contents[:2] == ["", "Hi"] and contents[-1] is None, "role, the first token at once, the finish"
    assert "".join(contents[1:-1]) == "Hi <|im", "the held-back text is sent at the end"


def test_text_completion_stream_events(settings):
    app = make_app(settings, FakeModel(pieces=["a", "b", "c"]))
    reply = dispatch(app, make_request(path="/v1/completions", body={"prompt": "x", "stream": True,
                                                                      "max_tokens": 2}))
    events = sse_events(reply)
    assert events[-1] == "[DONE]"
    assert {event["object"] for event in events[:-1]} == {"text_completion"}
    assert [event["choices"][0]["text"] for event in events[:-1]] == ["a", "b", ""]
    assert events[-2]["choices"][0]["finish_reason"] == "length"


def test_models_list_and_single_model(settings):
    app = make_app(settings, FakeModel())
    document = json_body(dispatch(app, make_request("GET", "/v1/models")))
    assert document["object"] == "list"
    assert [(entry["id"], entry["object"], entry["owned_by"]) for entry in document["data"]] == [
        (MODEL_ID, "model", "gpt4all_api")]
    single = dispatch(app, make_request("GET", f"/v1/models/{MODEL_ID}"))
    assert (single.status, json_body(single)["id"]) == (200, MODEL_ID)


def test_model_retrieve_by_id_and_unknown_id(settings):
    app = make_app(settings, FakeModel())
    model_id = settings.model_id
    found = dispatch(app, make_request("GET", f"/v1/models/{model_id}"))
    assert found.status == 200 and json_body(found)["id"] == model_id
    answered = dispatch(app, make_request("GET", "/v1/models/gpt-4o"))
    assert answered.status == 200 and json_body(answered)["id"] == model_id, "model_names = * answers any name"
    strict = make_app(settings, FakeModel(), model_names=("my-model",))
    assert dispatch(strict, make_request("GET", "/v1/models/my-model")).status == 200
    missing = dispatch(strict, make_request("GET", "/v1/models/gpt-4o"))
    assert missing.status == 404 and json_body(missing)["error"]["code"] == "model_not_found"


# --------------------------------------------------------------------------------------------
# Tool calls, JSON mode, n
# --------------------------------------------------------------------------------------------

WEATHER = {"type": "function", "function": {"name": "get_weather", "parameters": {
    "type": "object", "properties": {"city": {"type": "string"}}}}}
CALL_PIECES = ['{"name": "get_', 'weather", "arguments": ', '{"city": "Paris"}}']


def chat_request(**body):
    return make_request(path="/v1/chat/completions", body={"messages": [{"role": "user", "content": "Weather?"}],
                                                           **body})


def test_a_tool_call_answer_has_openai_shape(settings):
    app = make_app(settings, FakeModel(pieces=CALL_PIECES))
    choice = json_body(dispatch(app, chat_request(tools=[WEATHER])))["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    message = choice["message"]
    assert message["content"] is None and len(message["tool_calls"]) == 1
    call = message["tool_calls"][0]
    assert call["id"].startswith("call_") and call["type"] == "function"
    assert call["function"] == {"name": "get_weather", "arguments": '{"city": "Paris"}'}, "arguments: a JSON string"


def test_a_streamed_tool_call_is_held_back_and_sent_as_one_delta(settings):
    app = make_app(settings, FakeModel(pieces=["Sure. "] + CALL_PIECES))
    events = sse_events(dispatch(app, chat_request(tools=[WEATHER], stream=True)))
    deltas = [event["choices"][0]["delta"] for event in events[:-1]]
    assert "".join(delta.get("content") or "" for delta in deltas) == "Sure. ", "the call's text never leaks"
    calls = [delta["tool_calls"] for delta in deltas if "tool_calls" in delta]
    assert len(calls) == 1 and calls[0][0]["index"] == 0 and calls[0][0]["function"]["name"] == "get_weather"
    assert events[-2]["choices"][0]["finish_reason"] == "tool_calls" and events[-1] == "[DONE]"


def test_a_call_of_a_function_not_offered_is_corrected_to_an_offered_one(settings):
    answers = [['{"name": "launch", "arguments": {}}'], [', "arguments": {"city": "Rome"}}']]
    app = make_app(settings, FakeModel(answers=answers))
    choice = json_body(dispatch(app, chat_request(tools=[WEATHER])))["choices"][0]
    assert choice["finish_reason"] == "tool_calls"
    call = choice["message"]["tool_calls"][0]["function"]
    assert call["name"] == "get_weather" and json.loads(call["arguments"]) == {"city": "Rome"}


def test_a_named_tool_choice_prefills_the_call(settings):
    model = FakeModel(pieces=['{"city": "Rome"}}'])
    app = make_app(settings, model)
    choice = json_body(dispatch(app, chat_request(tools=[WEATHER], tool_choice={
        "type": "function", "function": {"name": "get_weather"}})))["choices"][0]
    assert model.calls[0]["prompt"].endswith('<|im_start|>assistant\n<tool_call>\n{"name": "get_weather", "arguments": ')
    assert choice["message"]["tool_calls"][0]["function"]["arguments"] == '{"city": "Rome"}'


def test_a_repeated_answered_call_is_answered_from_the_results_in_text(settings):
    model = FakeModel(pieces=CALL_PIECES)
    app = make_app(settings, model)
    history = [{"role": "user", "content": "Weather?"},
               {"role": "assistant", "content": None, "tool_calls": [
                   {"id": "call_1", "type": "function",
                    "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
               {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}]
    choice = json_body(dispatch(app, make_request(path="/v1/chat/completions", body={
        "messages": history, "tools": [WEATHER]})))["choices"][0]
    assert len(model.calls) == 2, "asked again, without tools"
    assert 'The function get_weather({"city": "Paris"}) returned: 18 C' in model.calls[1]["prompt"]
    assert "# Tools" not in model.calls[1]["prompt"]
    assert choice["finish_reason"] == "stop" and not choice["message"].get("tool_calls")


def test_json_mode_prefills_stops_at_the_closing_brace_and_corrects_broken_json(settings):
    model = FakeModel(pieces=['"a": 1', "} trailing", " words"])
    app = make_app(settings, model)
    reply = dispatch(app, chat_request(response_format={"type": "json_object"}))
    assert json_body(reply)["choices"][0]["message"]["content"] == '{"a": 1}'
    assert model.calls[0]["prompt"].endswith("<|im_start|>assistant\n{")
    assert "Answer with one JSON object" in model.calls[0]["prompt"]
    corrected = dispatch(make_app(settings, FakeModel(answers=[['"a": ', "oops}"], ['oops"}']])), chat_request(
        response_format={"type": "json_object"}))
    assert json_body(corrected)["choices"][0]["message"]["content"] == '{"a": "oops"}'


def test_n_choices_are_generated_one_after_another_and_usage_sums_them(settings):
    model = FakeModel(pieces=["Hi"])
    app = make_app(settings, model)
    document = json_body(dispatch(app, chat_request(n=3)))
    assert [choice["index"] for choice in document["choices"]] == [0, 1, 2] and len(model.calls) == 3
    assert document["usage"]["completion_tokens"] == 3
    assert document["system_fingerprint"].startswith("fp_")
    events = sse_events(dispatch(app, chat_request(n=2, stream=True)))
    assert {event["choices"][0]["index"] for event in events[:-1]} == {0, 1}


def test_routes_without_the_v1_prefix(settings):
    app = make_app(settings, FakeModel())
    assert dispatch(app, make_request(path="/chat/completions", body={
        "messages": [{"role": "user", "content": "x"}]})).status == 200
    assert json_body(dispatch(app, make_request("GET", "/models")))["data"][0]["id"] == MODEL_ID
