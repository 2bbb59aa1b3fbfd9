"""The Ollama-compatible API on the real model, through the watchdog with a fresh worker per answer:
the official `ollama` client, and the raw calls Open WebUI and Home Assistant make."""

from __future__ import annotations

import json
from typing import Any

import ollama
import pytest

from conftest import Process, request, write_config

API_KEY = "ollama-test-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
FRANCE = [{"role": "user", "content": "What is the capital of France?"}]
OPTIONS = {"temperature": 0, "num_predict": 24}
SERVED = "qwen2.5-coder-0.5b-instruct-q4_k_m:latest"


@pytest.fixture(scope="module")
def watchdog(tmp_path_factory) -> Process:
    config = write_config(tmp_path_factory.mktemp("ollama"), {"server": {"api_key": API_KEY},
                                                               "model": {"model_names": "llama3.2"}})
    process = Process("watchdog.py", config)
    try:
        process.wait_ready()
        yield process
    finally:
        process.stop()


@pytest.fixture
def client(watchdog) -> ollama.Client:
    return ollama.Client(host=watchdog.base_url, headers=AUTH, timeout=120)


def call(watchdog: Process, method: str, path: str, body: Any = None, headers: dict[str, str] = AUTH):
    status, response_headers, raw = request(watchdog.base_url, method, path, body, headers=headers, timeout=120)
    return status, response_headers, raw


def test_list_show_and_ps_describe_the_served_model(client):
    models = client.list().models
    assert [model.model for model in models] == [SERVED]
    details = models[0].details
    assert (details.format, details.family, details.parameter_size, details.quantization_level) == \
           ("gguf", "qwen2", "0.5B", "Q4_K_M")
    assert len(models[0].digest) == 64 and models[0].size > 400_000_000
    shown = client.show(SERVED)
    assert "tools" in shown.capabilities and "<|im_start|>" in shown.template
    assert shown.modelinfo["general.architecture"] == "qwen2"
    running = client.ps().models
    assert running[0].model == SERVED and running[0].size_vram == 0 and running[0].expires_at


def test_chat_streamed_joins_to_the_whole_answer(client):
    whole = client.chat(model="llama3.2", messages=FRANCE, options=OPTIONS)
    assert "Paris" in whole.message.content and whole.done and whole.done_reason == "stop"
    assert whole.eval_count > 0 and whole.prompt_eval_count > 0 and whole.total_duration >= whole.eval_duration > 0
    pieces = list(client.chat(model="llama3.2", messages=FRANCE, options=OPTIONS, stream=True))
    assert "".join(piece.message.content for piece in pieces) == whole.message.content
    assert pieces[-1].done and not any(piece.done for piece in pieces[:-1]) and len(pieces) > 2


def test_generate_streamed_joins_to_the_whole_answer(client):
    whole = client.generate(model=SERVED, prompt="What is the capital of France?", options=OPTIONS)
    assert "Paris" in whole.response and whole.done_reason == "stop"
    pieces = list(client.generate(model=SERVED, prompt="What is the capital of France?", options=OPTIONS, stream=True))
    assert "".join(piece.response for piece in pieces) == whole.response


def test_chat_with_a_tool_gets_a_call_with_object_arguments(client):
    def get_weather(city: str) -> str:
        """Get the current weather in a city.

        Args:
          city: The city
        """
        return "18 C"

    answer = client.chat(model=SERVED, messages=[{"role": "user", "content": "What's the weather in Paris?"}],
                         tools=[get_weather], options={"temperature": 0})
    calls = answer.message.tool_calls
    assert calls and calls[0].function.name == "get_weather" and calls[0].function.arguments == {"city": "Paris"}


def test_format_json_answers_parse(client):
    answer = client.chat(model=SERVED, messages=[{"role": "user", "content": "List three colors."}], format="json",
                         options={"temperature": 0, "num_predict": 100})
    assert isinstance(json.loads(answer.message.content), dict)


def test_open_webui_connects(watchdog):
    for path in ("/api/version", "/api/tags", "/api/ps"):
        status, _, body = call(watchdog, "GET", path)
        assert status == 200, (path, body)
    assert json.loads(call(watchdog, "GET", "/api/version")[2])["version"]
    status, headers, body = call(watchdog, "GET", "/", headers={})
    assert (status, body) == (200, b"Ollama is running"), "apps probe / without a key"


def test_home_assistant_lists_pulls_and_chats_streamed_with_keep_alive(watchdog):
    listed = json.loads(call(watchdog, "GET", "/api/tags")[2])["models"][0]["model"]
    status, _, body = call(watchdog, "POST", "/api/pull", {"model": listed, "stream": False})
    assert status == 200 and json.loads(body) == {"status": "success"}
    status, headers, body = call(watchdog, "POST", "/api/chat", {"model": listed, "messages": FRANCE, "stream": True,
                                                                  "keep_alive": "5m", "options": OPTIONS})
    assert status == 200 and headers["content-type"] == "application/x-ndjson"
    assert headers["x-accel-buffering"] == "no"
    lines = [json.loads(line) for line in body.splitlines()]
    assert lines[-1]["done"] and "Paris" in "".join(line["message"]["content"] for line in lines)
    for key in ("total_duration", "load_duration", "prompt_eval_count", "prompt_eval_duration", "eval_count",
                "eval_duration"):
        assert isinstance(lines[-1][key], int), key
    assert lines[0]["created_at"].endswith("+00:00") or "T" in lines[0]["created_at"]


def test_keep_alive_zero_unloads_without_generating(watchdog):
    status, _, body = call(watchdog, "POST", "/api/generate", {"model": SERVED, "keep_alive": 0, "stream": False})
    document = json.loads(body)
    assert status == 200 and document["done_reason"] == "unload" and document["response"] == ""
    status, _, body = call(watchdog, "POST", "/api/chat", {"model": SERVED, "messages": []})
    assert json.loads(body)["done_reason"] == "load"


@pytest.mark.parametrize("method, path, body, headers, status, fragment", [
    ("POST", "/api/chat", {"model": "no-such-model", "messages": FRANCE}, {}, 404, None),
    ("POST", "/api/chat", b"{not json", {}, 400, "not valid JSON"),
    ("POST", "/api/chat", {"model": SERVED, "messages": FRANCE, "options": {"num_ctx": 999999}}, {}, 400, "num_ctx"),
    ("POST", "/api/generate", {"model": SERVED, "prompt": "x", "suffix": "y"}, {}, 400, "suffix"),
    ("GET", "/api/tags", None, {"Authorization": "Bearer wrong"}, 401, "API key"),
], ids=["wrong model", "bad body", "num_ctx too large", "suffix", "missing key"])
def test_errors_in_ollamas_shape(watchdog, method, path, body, headers, status, fragment):
    sent_headers = dict(AUTH, **headers)
    if isinstance(body, bytes):
        sent_headers["Content-Type"] = "application/json"
    got, _, raw = call(watchdog, method, path, body, headers=sent_headers)
    document = json.loads(raw)
    assert got == status and set(document) == {"error"} and isinstance(document["error"], str), (got, raw)
    if fragment is None:
        assert document["error"] == "model 'no-such-model' not found"
    else:
        assert fragment in document["error"]
