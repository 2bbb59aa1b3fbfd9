"""The configured system prompt evaluated once, with the real model through real watchdogs: answers
at temperature 0 are byte-identical with the prefix on and off (the configured persona, another,
none; the OpenAI and the original routes; streamed and not), usage counts the whole prompt, and a
SIGHUP that changes system_prompt gives the workers forked after it the new prefix."""

from __future__ import annotations

import configparser
import json
import os
import re
import signal
from typing import Any

import pytest

from apiserver.huge_pages import huge_pages_available
from conftest import Process, both, request, wait_until

PERSONA = ("You are Captain Ada, the quartermaster of a research ship. You answer questions about the "
           "ship's stores, its crew of twelve and its route from Lisbon to Reykjavik. You are precise "
           "and brief, you never invent cargo, and you give quantities in metric units. When you do not "
           "know, you say so and name the crew member who would.")
OTHER = "You are a terse assistant."
# n_threads fixed, the same on both sides: the comparison is about the prefix, not thread counts.
SETTINGS = {"model": {"system_prompt": PERSONA, "n_threads": 1}}


def chat(process: Process, system: str | None, stream: bool = False) -> tuple[str, dict[str, Any]]:
    """(answer text, usage) of a chat at temperature 0, streamed or not."""
    messages = ([{"role": "system", "content": system}] if system else []) + \
        [{"role": "user", "content": "How many people are on board, and where do we sail?"}]
    body = {"messages": messages, "temperature": 0, "max_tokens": 24, "stream": stream}
    if stream:
        body["stream_options"] = {"include_usage": True}
    status, _, answer = request(process.base_url, "POST", "/v1/chat/completions", body, timeout=180)
    assert status == 200, answer
    if not stream:
        document = json.loads(answer)
        return document["choices"][0]["message"]["content"], document["usage"]
    text, usage = "", {}
    for line in answer.decode().splitlines():
        if line.startswith("data: {"):
            event = json.loads(line[6:])
            usage = event.get("usage") or usage
            text += "".join(choice["delta"].get("content") or "" for choice in event["choices"])
    return text, usage


def seed(process: Process, persona: str | None) -> tuple[str, dict[str, Any]]:
    body = {"prompt": "What do you keep in the stores?", "temperature": 0, "max_tokens": 24}
    if persona is not None:
        body["persona"] = persona
    status, _, answer = request(process.base_url, "POST", "/gpt4all_api", body,
                                headers={"Accept": "application/json"}, timeout=180)
    assert status == 200, answer
    document = json.loads(answer)
    return document["response"], document["usage"]


CASES = [("openai, the configured persona", lambda p: chat(p, PERSONA), True),
         ("openai streamed, the configured persona", lambda p: chat(p, PERSONA, stream=True), True),
         ("openai, another persona", lambda p: chat(p, OTHER), False),
         ("openai streamed, no persona", lambda p: chat(p, None, stream=True), False),
         ("original route, the configured persona (its default)", lambda p: seed(p, None), True),
         ("original route, another persona", lambda p: seed(p, OTHER), False)]


@pytest.fixture
def on_and_off(start):
    # The zygote's memory in huge pages (huge_pages.py) is on with the prefix and off without it:
    # neither may change an answer. The prompt cache (tests/test_prompt_cache_integration.py) is off
    # on both sides: what is reused here is the configured system prompt's turn alone.
    on = start("watchdog.py", {**SETTINGS, "model": {**SETTINGS["model"], "system_prompt_cache": "true",
                                                     "prompt_cache": "false", "huge_pages": "true"}})
    off = start("watchdog.py", {**SETTINGS, "model": {**SETTINGS["model"], "system_prompt_cache": "false",
                                                      "prompt_cache": "false", "huge_pages": "false"}})
    for process in (on, off):
        process.wait_ready()
        process.wait_for_spare()
    return on, off


def test_answers_are_identical_with_the_prefix_on_and_off(on_and_off):
    on, off = on_and_off
    for name, ask, cached in CASES:
        (text_on, usage_on), (text_off, usage_off) = both(on, off, ask)
        assert text_on == text_off, f"{name}: {text_on!r} != {text_off!r}"
        assert text_on.strip(), name
        assert usage_on["prompt_tokens"] == usage_off["prompt_tokens"], f"{name}: usage counts the whole prompt"
        if "prompt_tokens_details" in usage_on:
            hit = usage_on["prompt_tokens_details"]["cached_tokens"]
            assert (hit > 60) if cached else (hit == 0), f"{name}: cached_tokens {hit}"
            assert usage_off["prompt_tokens_details"]["cached_tokens"] == 0
    # The first workers told the zygote which pages their requests wrote; the workers forked after
    # that copied those too before they were ready (and answered the later cases above identically).
    server_log = (on.config.parent / "logs" / "server.log").read_text()
    assert "more learned from a worker's request" in server_log
    copied = [int(mib) for mib in re.findall(r"pre-warmed: (\d+) MiB copied", server_log)]
    assert len(copied) >= 3 and max(copied) > copied[0], copied
    if huge_pages_available():
        assert re.search(r"model weights: \d+ MiB moved into huge pages", server_log), server_log[-3000:]
        assert "memory: " in server_log and "collapsed into huge pages" in server_log
    assert "huge pages" not in (off.config.parent / "logs" / "server.log").read_text()


def test_a_worker_forked_after_a_sighup_uses_the_new_system_prompt(on_and_off):
    on, off = on_and_off
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(on.config)
    parser["model"]["system_prompt"] = OTHER
    with open(on.config, "w") as handle:
        parser.write(handle)
    old_worker = json.loads(request(on.base_url, "GET", "/health")[2])["pid"]
    os.kill(on.popen.pid, signal.SIGHUP)
    watchdog_log = on.config.parent / "logs" / "watchdog.log"
    wait_until(lambda: "config reloaded" in watchdog_log.read_text().split("SIGHUP")[-1], 120, on,
               "the active worker replaced by one forked from the new zygote")
    wait_until(lambda: not os.path.exists(f"/proc/{old_worker}/cmdline") or
               f"(pid {old_worker}) exited" in watchdog_log.read_text(), 60, on, "the old worker's exit")
    (text_new, usage_new), (text_off, _) = both(on, off, lambda p: chat(p, OTHER))
    assert usage_new["prompt_tokens_details"]["cached_tokens"] > 0, "the new system prompt is the prefix"
    assert text_new == text_off
    (_, usage_old), _ = both(on, off, lambda p: chat(p, PERSONA))
    assert usage_old["prompt_tokens_details"]["cached_tokens"] == 0, "the old one no longer is"
