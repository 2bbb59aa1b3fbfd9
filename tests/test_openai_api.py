"""The OpenAI API's shapes, whole and streamed, through dispatch() on a FakeModel."""

from __future__ import annotations

import time


from apiserver.api import dispatch
from fake_model import FakeModel
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
    prompt_words = len(chatml("Hi", "Be brief.").split())
    assert document["usage"] == {"prompt_tokens": prompt_words, "completion_tokens": 2,
                                 "total_tokens": prompt_words + 2}
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
    missing = dispatch(app, make_request("GET", "/v1/models/gpt-4o"))
    assert missing.status == 404 and json_body(missing)["error"]["code"] == "model_not_found"
