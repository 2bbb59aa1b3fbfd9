"""The prompt cache with the real model through real watchdogs in their default mode (a fresh worker
per request, forked from the zygote): a Home Assistant-like sequence and a chat of five turns answer
byte for byte as with prompt_cache = false, with cached_tokens where a prefix was reused and nowhere
else; the OpenAI, Ollama, original and raw-completion routes share one cache; and every fault (an entry damaged,
truncated or made by another setup, no memory for a save, a worker killed around its save, saved
contexts off) is answered by evaluating the whole prompt, with workers = 2."""

from __future__ import annotations

import configparser
import json
import os
import re
import resource
import signal
import time
from pathlib import Path
from typing import Any

import pytest

from conftest import Process, both, descendants, request, wait_until, write_config

# n_threads fixed, the same on both sides: the comparison is about the cache, not thread counts.
SETTINGS = {"model": {"n_threads": 1}}
HOUSE = ("You are the voice assistant of a house. Answer in one short sentence. The devices and their states: "
         + "; ".join(f"{kind} {number} in the {room} is {state}"
                     for number, (kind, room, state) in enumerate(
                         [(kind, room, state) for kind in ("lamp", "heater", "blind", "speaker")
                          for room, state in (("kitchen", "on"), ("hall", "off"), ("study", "on"),
                                              ("bedroom", "off"), ("garage", "on"), ("attic", "off"),
                                              ("cellar", "on"), ("porch", "off"), ("nursery", "on"),
                                              ("office", "off"))])) + ".")
QUESTIONS = ["Is the kitchen lamp on?", "Which rooms have their heater off?", "Turn off the speaker in the study."]
CHAT = ["What is a prime number?", "Give me an example.", "Is 9 one?", "Why not?", "Thanks."]
MAX_TOKENS = 16


def chat(process: Process, messages: list[dict[str, str]], route: str = "openai") -> tuple[str, int, int]:
    """(answer, prompt tokens, cached tokens) at temperature 0, through the OpenAI or the Ollama route."""
    if route == "ollama":
        body = {"model": "qwen", "messages": messages, "stream": False,
                "options": {"temperature": 0, "num_predict": MAX_TOKENS}}
        status, _, answer = request(process.base_url, "POST", "/api/chat", body, timeout=300)
        assert status == 200, answer
        document = json.loads(answer)
        return (document["message"]["content"], document["prompt_eval_count"],
                document.get("prompt_eval_cached_count", 0))
    body = {"messages": messages, "temperature": 0, "max_tokens": MAX_TOKENS}
    status, _, answer = request(process.base_url, "POST", "/v1/chat/completions", body, timeout=300)
    assert status == 200, answer
    document = json.loads(answer)
    usage = document["usage"]
    return (document["choices"][0]["message"]["content"], usage["prompt_tokens"],
            usage["prompt_tokens_details"]["cached_tokens"])


def past_self_loaded_workers(process: Process) -> Process:
    """Ready, its spare loaded, and past its first workers: those loaded their own model while the
    zygote loaded, and save nothing (the zygote's workers do). Short requests take them out of the
    way: they are the watchdog's children, the zygote's workers are the zygote's."""
    process.wait_ready(180)
    process.wait_for_spare(180)
    for _ in range(8):
        children = Path(f"/proc/{process.popen.pid}/task/{process.popen.pid}/children").read_text().split()
        names = [Path(f"/proc/{child}/comm").read_text().strip() for child in children
                 if Path(f"/proc/{child}/comm").exists()]
        if names and all(name == "gpt4all-zygote" for name in names):
            return process
        chat(process, [{"role": "user", "content": "Hi"}])
        time.sleep(0.5)
    process.fail("workers that loaded their own model are still there")


def started(directory: Path, overrides: dict[str, dict[str, Any]]) -> Process:
    merged = {section: {**SETTINGS.get(section, {}), **values} for section, values in overrides.items()}
    return past_self_loaded_workers(Process("watchdog.py", write_config(directory, {**SETTINGS, **merged})))


@pytest.fixture(scope="module")
def on_and_off(tmp_path_factory):
    directory = tmp_path_factory.mktemp("prompt-cache")
    processes = [started(directory / "on", {"model": {"prompt_cache": "true"}}),
                 started(directory / "off", {"model": {"prompt_cache": "false"}})]
    yield processes
    for process in processes:
        process.stop()


def test_a_house_sequence_and_a_chat_answer_as_without_the_cache(on_and_off):
    on, off = on_and_off
    for number, question in enumerate(QUESTIONS):
        messages = [{"role": "system", "content": HOUSE}, {"role": "user", "content": question}]
        (text_on, prompt_on, cached_on), (text_off, prompt_off, cached_off) = both(
            on, off, lambda p: chat(p, messages))  # noqa: B023 (both() returns before the next question)
        assert text_on == text_off and text_on.strip(), f"question {number}: {text_on!r} != {text_off!r}"
        assert prompt_on == prompt_off > 400, "usage counts the whole prompt"
        assert cached_off == 0
        if number == 0:
            assert cached_on == 0, "nothing was asked with this system prompt before"
        else:
            assert 400 < cached_on < prompt_on, f"question {number}: the house's turn is reused ({cached_on})"
    messages: list[dict[str, str]] = []
    for turn, question in enumerate(CHAT):
        messages.append({"role": "user", "content": question})
        (text_on, prompt_on, cached_on), (text_off, _, cached_off) = both(on, off, lambda p: chat(p, messages))
        assert text_on == text_off, f"turn {turn}: {text_on!r} != {text_off!r}"
        assert cached_off == 0 and (cached_on == 0 if turn == 0 else 0 < cached_on < prompt_on), (turn, cached_on)
        messages.append({"role": "assistant", "content": text_on})
    metrics = request(on.base_url, "GET", "/metrics")[2].decode()
    hits = int(re.search(r"^gpt4all_api_prompt_cache_hits_total (\d+)", metrics, re.M).group(1))
    entries = int(re.search(r"^gpt4all_api_prompt_cache_entries (\d+)", metrics, re.M).group(1))
    assert hits >= len(QUESTIONS) - 1 + len(CHAT) - 1 and entries >= 2
    assert int(re.search(r"^gpt4all_api_prompt_cache_bytes (\d+)", metrics, re.M).group(1)) > 0


def test_the_openai_ollama_and_original_routes_share_the_cache(on_and_off):
    on, off = on_and_off
    system = "You are a librarian in a small town. " * 12
    first = [{"role": "system", "content": system}, {"role": "user", "content": "Name a classic novel."}]
    text, _, cached = chat(on, first)
    assert cached == 0
    follow_up = first + [{"role": "assistant", "content": text}, {"role": "user", "content": "Who wrote it?"}]
    (text_on, _, cached_on), (text_off, _, _) = both(on, off, lambda p: chat(p, follow_up, route="ollama"))
    assert text_on == text_off and cached_on > 100, "Ollama's /api/chat went on from the OpenAI request's entry"
    body = {"prompt": "Recommend a poem.", "persona": system, "temperature": 0, "max_tokens": MAX_TOKENS}
    replies = both(on, off, lambda p: request(p.base_url, "POST", "/gpt4all_api", body,
                                                headers={"Accept": "application/json"}, timeout=300))
    documents = [json.loads(answer) for status, _, answer in replies]
    assert documents[0]["response"] == documents[1]["response"]
    assert documents[0]["usage"]["prompt_tokens_details"]["cached_tokens"] > 100, "the persona's turn was reused"
    assert documents[1]["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    # A raw prompt (/v1/completions) is cut at the same markers: the same system turn, written out.
    raw = {"prompt": f"<|im_start|>system\n{system}<|im_end|>\n<|im_start|>user\nName a library.<|im_end|>\n"
                     "<|im_start|>assistant\n", "temperature": 0, "max_tokens": MAX_TOKENS}
    replies = both(on, off, lambda p: request(p.base_url, "POST", "/v1/completions", raw, timeout=300))
    documents = [json.loads(answer) for status, _, answer in replies]
    assert documents[0]["choices"][0]["text"] == documents[1]["choices"][0]["text"]
    assert documents[0]["usage"]["prompt_tokens_details"]["cached_tokens"] > 100, "a raw prompt's system turn too"


# -- faults, with workers = 2 ---------------------------------------------------------------------

SYSTEM = "You are a ship's quartermaster. You list stores, crew and cargo in metric units. " * 6


def ask(process: Process, question: str) -> tuple[str, int, int]:
    """chat(), once the worker that answered has saved its context and exited."""
    before = set(descendants(process.popen.pid))
    answer = chat(process, [{"role": "system", "content": SYSTEM}, {"role": "user", "content": question}])
    wait_until(lambda: len(before - set(descendants(process.popen.pid))) >= 1, 30, process, "the worker's exit")
    return answer


def memory_files(process: Process) -> list[Path]:
    """The watchdog's prompt cache entries, reached as its user can: /proc/<pid>/fd."""
    found = []
    for fd in Path(f"/proc/{process.popen.pid}/fd").iterdir():
        try:
            if "gpt4all_api prompt cache" in os.readlink(fd):
                found.append(fd)
        except OSError:
            pass
    return found


def server_log(process: Process) -> str:
    return (process.config.parent / "logs" / "server.log").read_text(errors="replace")


def watchdog_log(process: Process) -> str:
    return (process.config.parent / "logs" / "watchdog.log").read_text(errors="replace")


def damage(process: Process, how: str) -> None:
    """Flip a byte in every entry's state, or cut every entry short."""
    files = memory_files(process)
    assert files, "an entry to damage"
    for path in files:
        with open(path, "r+b") as handle:
            size = os.fstat(handle.fileno()).st_size
            if how == "truncate":
                handle.truncate(size - 4096)
            else:
                handle.seek(size - 5000)
                byte = handle.read(1)
                handle.seek(size - 5000)
                handle.write(bytes([byte[0] ^ 0xFF]))


def new_lines(before: str, after: str) -> str:
    return after[len(before):]


@pytest.fixture
def two_workers(start):
    return past_self_loaded_workers(start("watchdog.py", {**SETTINGS, "watchdog": {"workers": 2}}))


def test_every_fault_is_answered_by_evaluating_the_whole_prompt(two_workers):
    process = two_workers
    reference, _, cached = ask(process, "What do you keep in the stores?")
    assert cached == 0
    again, _, cached = ask(process, "What do you keep in the stores?")
    assert again == reference and cached > 100, "the entry is used when it is sound"

    for how, why in [("flip", "checksum"), ("truncate", "truncated")]:
        log_before = server_log(process)
        damage(process, how)
        answer, _, cached = ask(process, "What do you keep in the stores?")
        assert answer == reference and cached == 0, how
        assert why in new_lines(log_before, server_log(process)), f"the log says why ({how})"
        wait_until(lambda: "dropped: a worker found it bad" in watchdog_log(process), 10, process, "the drop")

    # No memory for a save (a full tmpfs, a memory limit; here RLIMIT_FSIZE makes the allocation fail).
    for process_id in descendants(process.popen.pid):
        resource.prlimit(process_id, resource.RLIMIT_FSIZE, (1 << 16, resource.RLIM_INFINITY))
    log_before = server_log(process)
    crew, _, _ = ask(process, "How many crew are aboard?")  # a new turn: this worker has one to save
    assert "this context is not saved" in new_lines(log_before, server_log(process))
    for process_id in descendants(process.popen.pid):
        try:
            resource.prlimit(process_id, resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
        except (ProcessLookupError, PermissionError):
            pass
    for _ in range(3):  # the workers forked under the limit are replaced
        assert ask(process, "How many crew are aboard?")[0] == crew

    # A worker killed around its save (announced, half written, or just handed over): the entry
    # never half exists, and the next request is answered all the same.
    for delay in (0.0, 0.002, 0.005, 0.02):
        status, headers, body = request(process.base_url, "POST", "/v1/chat/completions", {
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "What do you keep in the stores?"}],
            "temperature": 0, "max_tokens": MAX_TOKENS}, timeout=300)
        assert status == 200
        time.sleep(delay)
        try:
            os.kill(int(headers["x-worker-pid"]), signal.SIGKILL)
        except ProcessLookupError:
            pass
        answer, _, _ = ask(process, "What do you keep in the stores?")
        assert answer == reference, f"killed {delay * 1000:.0f} ms after its answer"

    # Another setup after a SIGHUP (n_ctx changed): the entries of the old one are refused.
    ask(process, "What do you keep in the stores?")
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(process.config)
    parser["model"]["n_ctx"] = "1536"
    with open(process.config, "w") as handle:
        parser.write(handle)
    log_before = server_log(process)
    os.kill(process.popen.pid, signal.SIGHUP)
    wait_until(lambda: "config reloaded" in watchdog_log(process).split("SIGHUP")[-1], 180, process,
               "the workers replaced by ones of the new setup")
    wait_until(lambda: "zygote: model" in new_lines(log_before, server_log(process)), 180, process, "the new zygote")
    for _ in range(3):  # until a worker of the new setup answers
        answer, _, _ = ask(process, "What do you keep in the stores?")
        if "made by another setup" in new_lines(log_before, server_log(process)):
            break
    assert "made by another setup (differs in n_ctx" in new_lines(log_before, server_log(process))
    assert answer == reference
    status, _, _ = request(process.base_url, "GET", "/health")
    assert status == 200
    assert "Traceback" not in server_log(process) and "Traceback" not in watchdog_log(process)


def test_spawned_workers_test_the_cache_once_and_share_it(on_and_off, start):
    """The spawn process model (zygote = false): each worker loads its own model; the first one runs
    the self-test, the next ones take its pass from the record and restore what it saved."""
    off = on_and_off[1]
    process = start("watchdog.py", {**SETTINGS, "model": {**SETTINGS["model"], "prompt_cache": "true"},
                                    "watchdog": {"zygote": "false"}})
    process.wait_ready(180)
    process.wait_for_spare(180)
    for number, question in enumerate(reversed(QUESTIONS)):
        messages = [{"role": "system", "content": HOUSE}, {"role": "user", "content": question}]
        (text, prompt, cached), (reference, _, _) = both(process, off, lambda p: chat(p, messages))  # noqa: B023
        assert text == reference, f"question {number}: {text!r} != {reference!r}"
        assert (cached == 0) if number == 0 else (400 < cached < prompt), (number, cached)
    log = server_log(process)
    assert log.count("prompt cache: self-test passed in") == 1, "the first worker tests"
    assert log.count("the self-test passed in an earlier process of this watchdog") >= 3, "the next ones do not"
    assert "process model: spawn" in watchdog_log(process)


def test_no_reuse_still_answers_every_request(start):
    """A setup whose prompts cannot be cut (here llama3's turn markers, which are not special tokens
    of the default model) turns all reuse off with one log line; every request is answered."""
    process = start("watchdog.py", {**SETTINGS, "model": {**SETTINGS["model"], "chat_template": "llama3"}})
    process.wait_ready(180)
    process.wait_for_spare(180)
    for _ in range(3):
        status, _, answer = request(process.base_url, "POST", "/v1/chat/completions", {
            "messages": [{"role": "system", "content": SYSTEM}, {"role": "user", "content": "Hello"}],
            "temperature": 0, "max_tokens": 4}, timeout=300)
        assert status == 200, answer
        assert json.loads(answer)["usage"]["prompt_tokens_details"]["cached_tokens"] == 0
    assert not memory_files(process), "nothing saved"
    off = [line for line in server_log(process).splitlines() if "prompts are evaluated whole" in line]
    assert off and all("no turn marker is a special token" in line for line in off), off
