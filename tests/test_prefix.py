"""The configured system prompt evaluated once: the engine continues after it, counts it in usage,
evaluates it again after a request from an empty context overwrote it; the pre-warm and its page probe."""

from __future__ import annotations

import ctypes
import dataclasses

from apiserver.api import dispatch
from apiserver.engine import ModelRunner
from apiserver.model import TEMPLATES
from apiserver.pages import populate, probe_written_pages
from apiserver.prefix import evaluate_prefix, pre_warm, prefix_text
from fake_model import FakeModel
from unit_helpers import chatml, json_body, make_app, make_request

SYSTEM = "You are a pirate who answers in rhymes."


def app_with_prefix(settings, system_prompt: str = SYSTEM, cache: bool = True):
    settings = dataclasses.replace(settings, system_prompt=system_prompt, system_prompt_cache=cache)
    model = FakeModel()
    template = TEMPLATES["chatml"]
    app = make_app(settings)
    app.runner = ModelRunner(model, settings, template, heartbeat=lambda: None,
                             prefix=evaluate_prefix(model, settings, template))
    model.calls.clear()
    return app, model


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
    prefix = app.runner.prefix
    assert prefix.n_past == len(prefix.text.split()) > 0
    document = chat(app, SYSTEM)
    call = model.calls[-1]
    assert call["reset_context"] is False and call["prompt"] == chatml("Hi", SYSTEM)[len(prefix.text):]
    whole = len(chatml("Hi", SYSTEM).split())
    assert document["usage"]["prompt_tokens"] == whole, "usage counts the whole prompt"
    assert document["usage"]["prompt_tokens_details"]["cached_tokens"] == prefix.n_past
    chat(app, SYSTEM, "Again")
    assert model.calls[-1]["reset_context"] is False, "the context goes back to the prefix after each answer"


def test_another_persona_or_none_starts_from_an_empty_context_and_the_prefix_comes_back(settings):
    app, model = app_with_prefix(settings)
    chat(app, "You are terse.")
    assert model.calls[-1]["reset_context"] is True and model.calls[-1]["prompt"] == chatml("Hi", "You are terse.")
    chat(app)
    assert model.calls[-1]["reset_context"] is True
    assert not app.runner.prefix_intact
    document = chat(app, SYSTEM)
    evaluated, continued = model.calls[-2:]
    assert evaluated["prompt"] == app.runner.prefix.text and evaluated["max_tokens"] == 0
    assert continued["reset_context"] is False
    assert document["usage"]["prompt_tokens_details"]["cached_tokens"] == app.runner.prefix.n_past


def test_the_seed_route_uses_the_prefix_for_its_default_persona(settings):
    app, model = app_with_prefix(settings)
    reply = dispatch(app, make_request("POST", "/gpt4all_api", {"prompt": "Hi"}))
    assert reply.status == 200 and model.calls[-1]["reset_context"] is False


def test_off_means_every_request_evaluates_its_whole_prompt(settings):
    app, model = app_with_prefix(settings, cache=False)
    assert app.runner.prefix is None
    chat(app, SYSTEM)
    assert model.calls[-1]["reset_context"] is True and model.calls[-1]["prompt"] == chatml("Hi", SYSTEM)


def test_the_pre_warm_evaluates_after_the_prefix_and_goes_back_to_it(settings):
    app, model = app_with_prefix(settings)
    pre_warm(model, app.settings, app.runner.template, app.runner.prefix)
    call = model.calls[-1]
    assert call["reset_context"] is False and call["max_tokens"] == 1
    assert model.model.context.n_past == app.runner.prefix.n_past
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
