"""Helpers of the fast unit tier: an App on a FakeModel (tests/fake_model.py), requests, replies.

No model, no sockets. The `settings` fixture (settings from a fresh config.ini) is in conftest.py.
"""

from __future__ import annotations

import dataclasses
import json
import threading
import time
from typing import Any, Callable

import pytest

from apiserver import api
from apiserver.api import App, Request
from apiserver.engine import ModelRunner
from apiserver.model import TEMPLATES
from apiserver.routes import build_app
from apiserver.settings import Settings
from fake_model import FakeModel

ROUTE = "/gpt4all_api"


def make_app(settings: Settings, model: FakeModel | None = None, **overrides: Any) -> App:
    """An App on the settings (with overrides); its runner drives model, or None = still loading."""
    settings = dataclasses.replace(settings, **overrides)
    app = build_app(settings)
    if model is not None:
        app.runner = ModelRunner(model, settings, TEMPLATES["chatml"], heartbeat=lambda: None)
    return app


def make_request(method: str = "POST", path: str = ROUTE, body: Any = None, headers: dict[str, str] | None = None,
                 query: dict[str, str] | None = None, **kwargs: Any) -> Request:
    """A Request; a dict or list body is sent as JSON, a str body as its UTF-8 bytes."""
    headers = {name.lower(): value for name, value in (headers or {}).items()}
    if isinstance(body, (dict, list)):
        body = json.dumps(body).encode()
        headers.setdefault("content-type", "application/json")
    elif isinstance(body, str):
        body = body.encode()
    return Request(method, path, dict(query or {}), headers, body or b"", **kwargs)


def chatml(user: str, system: str | None = None) -> str:
    """The ChatML prompt for one user message, written out by hand."""
    text = f"<|im_start|>system\n{system}<|im_end|>\n" if system is not None else ""
    return text + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n"


def json_body(reply: api.Reply) -> Any:
    assert reply.headers["Content-Type"] == "application/json"
    return json.loads(reply.body)


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            pytest.fail(f"timed out waiting until {what}")
        time.sleep(0.005)


def run_in_thread(function: Callable[[], Any]) -> dict[str, Any]:
    """Start function in a thread; the dict gets "result" or "error", and "thread"."""
    outcome: dict[str, Any] = {}

    def target() -> None:
        try:
            outcome["result"] = function()
        except BaseException as error:
            outcome["error"] = error

    outcome["thread"] = threading.Thread(target=target, daemon=True)
    outcome["thread"].start()
    return outcome


def sse_events(reply: api.Reply) -> list[Any]:
    """Run a streamed reply; return its events, parsed JSON or the final "[DONE]"."""
    assert reply.stream is not None
    assert reply.headers["Content-Type"].startswith("text/event-stream")
    emitted: list[bytes] = []
    reply.stream(emitted.append)
    raw = b"".join(emitted).decode("utf-8")
    assert raw.endswith("\n\n")
    events = []
    for block in raw[:-2].split("\n\n"):
        assert block.startswith("data: "), block
        data = block[len("data: "):]
        events.append(data if data == "[DONE]" else json.loads(data))
    return events
