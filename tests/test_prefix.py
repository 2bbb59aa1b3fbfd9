"""The configured system prompt evaluated once: the engine continues after it and counts it in usage;
a request from an empty context overwrites it, and the next prompt that evaluates it brings it back;
with prompt_cache = false nothing else is kept; the pre-warm and its page probe."""

from __future__ import annotations

import ctypes
import dataclasses

import pytest

from apiserver import reuse_setup
from apiserver.api import dispatch
from apiserver.engine import ModelRunner
from apiserver.model import TEMPLATES
from apiserver.pages import populate, probe_written_pages
from apiserver.prefix import evaluate_prefix, pre_warm, prefix_text
from apiserver.reuse_setup import prepare_reuse
from apiserver.turns import Evaluated
from fake_model import FakeModel, FakeNative, fake_tokens
from unit_helpers import chatml, json_body, make_app, make_request

SYSTEM = "You are a pirate who answers in rhymes."


@pytest.fixture(autouse=True)
def fake_native(monkeypatch):
    monkeypatch.setattr(reuse_setup, "NativeContext", FakeNative)


def app_with_prefix(settings, system_prompt: str = SYSTEM, cache: bool = True, prompt_cache: bool = True):
    settings = dataclasses.replace(settings, system_prompt=system_prompt, system_prompt_cache=cache,
                                   prompt_cache=prompt_cache)
    model = FakeModel()
    template = TEMPLATES["chatml"]
    app = make_app(settings)
    reuse = prepare_reuse(model, settings, template, entries=False)
    assert reuse.marker_ids == {151644}
    app.runner = ModelRunner(model, settings, template, heartbeat=lambda: None,
                             prefix=evaluate_prefix(model, settings, template, reuse.tokenizer()), reuse=reuse)
    model.calls.clear()
    return app, model


def configured(app) -> Evaluated:
    """The system prompt's turn, as the zygote evaluated it."""
    return Evaluated(prefix_text(app.runner.template, app.settings.system_prompt),
                     ((len(prefix_text(app.runner.template, app.settings.system_prompt)),
                       len(fake_tokens(prefix_text(app.runner.template, app.settings.system_prompt)))),))


def chat(app, system=None, user="Hi"):
    messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": user}]
    reply = dispatch(app, make_request("POST", "/v1/chat/completions", {"messages": messages}))
    assert reply.status == 200, reply.body
    return json_body(reply)


def test_the_prefix_is_the_system_turn_where_a_special_token_follows():
    assert prefix_text(TEMPLATES["chatml"], SYSTEM) == f"<|im_start|>system\n{SYSTEM}<|im_end|>\n"
    assert chatml("Hi", SYSTEM).startswith(prefix_text(TEMPLATES["chatml"], SYSTEM))
    assert prefix_text(TEMPLATES["gemma"], SYSTEM) == "", "gemma merges the system prompt into the user turn"
    assert prefix_text(TEMPLATES["plain"], SYSTEM) == "", "no special token ends a plain turn"
    assert prefix_text(TEMPLATES["chatml"], "") == ""


def test_a_request_with_the_configured_system_prompt_evaluates_only_the_rest(settings):
    app, model = app_with_prefix(settings)
    prefix = configured(app)
    assert app.runner.context.evaluated == prefix and prefix.n_past > 0
    document = chat(app, SYSTEM)
    call = model.calls[-1]
    assert call["reset_context"] is False and call["prompt"] == chatml("Hi", SYSTEM)[len(prefix.text):]
    whole = len(fake_tokens(chatml("Hi", SYSTEM)))
    assert document["usage"]["prompt_tokens"] == whole, "usage counts the whole prompt"
    assert document["usage"]["prompt_tokens_details"]["cached_tokens"] == prefix.n_past
    chat(app, SYSTEM, "Again")
    assert model.calls[-1]["reset_context"] is False, "the context goes back to the prefix after each answer"


def test_another_persona_overwrites_the_prefix_and_the_next_prompt_with_it_brings_it_back(settings):
    app, model = app_with_prefix(settings, prompt_cache=False)
    chat(app, "You are terse.")
    assert model.calls[-1]["reset_context"] is True and model.calls[-1]["prompt"] == chatml("Hi", "You are terse.")
    assert app.runner.context.evaluated == Evaluated(), "prompt_cache = false keeps the configured turn alone"
    document = chat(app, SYSTEM)
    assert model.calls[-1]["reset_context"] is True and model.calls[-1]["prompt"] == chatml("Hi", SYSTEM)
    assert document["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert app.runner.context.evaluated == configured(app), "evaluated as part of that prompt, the turn is kept again"
    document = chat(app, SYSTEM, "Again")
    assert model.calls[-1]["reset_context"] is False
    assert document["usage"]["prompt_tokens_details"]["cached_tokens"] == configured(app).n_past


def test_the_seed_route_uses_the_prefix_for_its_default_persona(settings):
    app, model = app_with_prefix(settings)
    reply = dispatch(app, make_request("POST", "/gpt4all_api", {"prompt": "Hi"}))
    assert reply.status == 200 and model.calls[-1]["reset_context"] is False


def test_off_means_every_request_evaluates_its_whole_prompt(settings):
    app, model = app_with_prefix(settings, cache=False, prompt_cache=False)
    assert app.runner.context.evaluated == Evaluated()
    chat(app, SYSTEM)
    assert model.calls[-1]["reset_context"] is True and model.calls[-1]["prompt"] == chatml("Hi", SYSTEM)


def test_the_pre_warm_evaluates_after_the_prefix_and_goes_back_to_it(settings):
    app, model = app_with_prefix(settings)
    pre_warm(model, app.settings, app.runner.template,
             evaluate_prefix(model, app.settings, app.runner.template, app.runner.context.tokenizer))
    call = model.calls[-1]
    assert call["reset_context"] is False and call["max_tokens"] == 1
    assert model.model.context.n_past == configured(app).n_past
    chat(app, SYSTEM)
    assert model.calls[-1]["reset_context"] is False


def test_the_page_probe_reports_what_its_child_wrote_and_populate_copies_it():
    block = bytearray(8 << 20)  # 8 MiB, written by the parent before the probe: shared after the fork
    address = ctypes.addressof((ctypes.c_char * len(block)).from_buffer(block))

    def write_two_mebibytes() -> None:
        block[1 << 20:3 << 20] = b"x" * (2 << 20)

    ranges = probe_written_pages(write_two_mebibytes)
    inside = sum(max(0, min(start + length, address + len(block)) - max(start, address)) for start, length in ranges)
    assert 2 << 20 <= inside <= 2 << 20 + 8192, f"{inside} bytes of the block reported"
    assert block[1 << 20] == 0, "the child's writes stay in the child"
    assert populate(ranges) > 0
    assert block[1 << 20] == 0, "populate copies pages without changing a byte"
