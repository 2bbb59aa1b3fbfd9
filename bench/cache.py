"""Prompt cache benchmarks: prompts that repeat, through watchdog.py in its default mode (a fresh
worker per request, forked from the zygote), against raw gpt4all evaluating the whole prompt in
the same run.

    python bench/cache.py [house|chat|miss|llama|all] [--rounds N]

house  a client system prompt of about 900 tokens (a house of 40 devices) and a new short question
       each time: time to the first streamed token of the second and later questions, against raw
       gpt4all (target <= 0.1x). Each round has a house of its own, so its first question is a miss
       (reported beside).
chat   a conversation of six turns, each answer fed back: time to first token of turns 3 - 6, the
       median ratio to raw (target <= 0.3x).
miss   prompts that match nothing (each request a system prompt of its own): latency with
       prompt_cache = true against false, both watchdogs restarting their worker after every
       request, up at once, taking turns in short blocks as bench.py watchdog does (target <= +10 ms).
llama  llama-cpp-python's own OpenAI server (bench-only, never a dependency; --cache on, so it keeps
       evaluated prompts as its cache_prompt does) on the house and chat scenarios, against the same
       raw baseline, when LLAMA_CPP_PYTHON names a Python that has llama_cpp.server installed
       (docs/benchmarks.md has the build line that runs on this machine).

Every time to first token is taken once the machine is quiet. Results are printed and written to
bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from apiserver.model import TEMPLATES  # noqa: E402
from apiserver.settings import load_settings  # noqa: E402
from bench import (  # noqa: E402
    LEARN_FROM,
    MAX_TOKENS,
    PASSES,
    PERSONA,
    RawModel,
    compare_to_keep_loaded,
    median,
    run_pass,
    running_watchdog,
    wait_until_quiet,
    watchdogs_past_learning,
)
from conftest import Process, free_port, request, write_config  # noqa: E402

CHATML = TEMPLATES["chatml"]
THREADS = os.cpu_count() or 1  # on both sides: raw gpt4all uses every core
ROOMS = ["kitchen", "hall", "study", "bedroom", "garage", "attic", "cellar", "porch", "nursery", "office"]
KINDS = [("ceiling lamp", "brightness {n}0 %, warm white"), ("radiator", "set to {n}1 degrees, eco mode"),
         ("window blind", "{n}0 % open, motorised"), ("smart speaker", "volume {n}, playing the radio")]
QUESTIONS = ["Is the lamp in the study on?", "Which rooms are warmer than 20 degrees?",
             "Close every blind on the ground floor.", "Turn the kitchen speaker down.", "Is anything on in the attic?"]
CHAT = ["What is a prime number?", "Give me three examples.", "Is 91 one of them?", "Why not?",
        "Which is the next prime after 91?", "Thanks, and the one after that?"]
FIRST_TOKENS = 4  # generated per timed request: the first is what is measured


def house(number: int) -> str:
    """A Home Assistant-like system prompt: the house's devices and their states (about 900 tokens)."""
    devices = [f"- {kind} {index + 1} in the {ROOMS[index % len(ROOMS)]}: "
               f"{'on' if (index + number) % 3 else 'off'}, {detail.format(n=(index + number) % 9 + 1)}"
               for index, (kind, detail) in enumerate(KINDS[index % len(KINDS)] for index in range(40))]
    return (f"You are the voice assistant of house number {number}. You control its devices and answer "
            "questions about them in one short sentence. The devices and their states:\n" + "\n".join(devices))


def stream(base_url: str, messages: list[dict[str, str]], max_tokens: int = FIRST_TOKENS,
           usage: dict | None = None) -> tuple[float, str]:
    """(seconds to the first streamed content, the whole answer) of a chat at temperature 0; with
    usage (a dict), the usage chunk is asked for and copied into it."""
    host, port = base_url.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=300)
    fields = {"model": "any", "messages": messages, "temperature": 0, "max_tokens": max_tokens, "stream": True}
    if usage is not None:
        fields["stream_options"] = {"include_usage": True}
    body = json.dumps(fields)
    started = time.monotonic()
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first, text = None, ""
    for line in response:
        if not line.startswith(b"data: {"):
            continue
        event = json.loads(line[6:])
        if usage is not None and event.get("usage"):
            usage.update(event["usage"])
        for choice in event["choices"]:
            if choice["delta"].get("content"):
                first = first or time.monotonic() - started
                text += choice["delta"]["content"]
    connection.close()
    if first is None:
        raise RuntimeError(f"no content streamed from {base_url}")
    return first, text


def raw_first_token(raw: RawModel, messages: list[dict[str, str]]) -> float:
    wait_until_quiet()
    return raw.generate("", CHATML.render(messages))[3]


def server_first_token(base_url: str, messages: list[dict[str, str]], usage: dict | None,
                       max_tokens: int = FIRST_TOKENS) -> tuple[float, str]:
    wait_until_quiet()
    return stream(base_url, messages, max_tokens, usage)


@contextlib.contextmanager
def watchdog_and_raw(workdir: Path, name: str) -> Iterator[tuple[Process, RawModel]]:
    """The watchdog on the committed defaults (n_threads fixed, as raw's), past its first workers
    (those loaded their own model while the zygote loaded: the zygote's workers save contexts),
    and the raw baseline beside it."""
    config = write_config(workdir / name, {"model": {"n_threads": THREADS}})
    with running_watchdog(config) as watchdog:
        for _ in range(3):
            request(watchdog.base_url, "POST", "/gpt4all_api", {"prompt": "Hi", "max_tokens": 1})
        yield watchdog, RawModel(load_settings(config))


def house_rounds(base_url: str, raw: RawModel, rounds: int, offset: int = 0, ours: bool = True) -> dict:
    """ours: our server, whose usage says how many tokens each prompt had and reused."""
    firsts, raws, misses, miss_raws, usages = [], [], [], [], []
    for round_index in range(rounds):
        system = house(round_index + offset)
        for index, question in enumerate(QUESTIONS):
            messages = [{"role": "system", "content": system}, {"role": "user", "content": question}]
            raw_seconds = raw_first_token(raw, messages)
            usage: dict | None = {} if ours else None
            seconds, _ = server_first_token(base_url, messages, usage)
            (misses if index == 0 else firsts).append(seconds)
            (miss_raws if index == 0 else raws).append(raw_seconds)
            usages.append(usage)
    results = {"raw_first_token_ms": round(median(raws) * 1000, 1),
               "first_token_ms_questions_2_on": round(median(firsts) * 1000, 1),
               "ratio_questions_2_on": round(median(firsts) / median(raws), 3),
               "first_question_ms": round(median(misses) * 1000, 1),
               "first_question_ratio": round(median(misses) / median(miss_raws), 3), "questions": len(firsts)}
    if ours:
        results["prompt_tokens"] = median([usage["prompt_tokens"] for usage in usages])
        results["cached_tokens_questions_2_on"] = median(
            [usage["prompt_tokens_details"]["cached_tokens"] for index, usage in enumerate(usages)
             if index % len(QUESTIONS)])
    return results


def chat_rounds(base_url: str, raw: RawModel, rounds: int) -> dict:
    ratios: dict[int, list[float]] = {turn: [] for turn in range(len(CHAT))}
    seconds_by_turn: dict[int, list[float]] = {turn: [] for turn in range(len(CHAT))}
    for round_index in range(rounds):
        messages: list[dict[str, str]] = []
        for turn, question in enumerate(CHAT):
            opener = f"(conversation {round_index + 1}) " if turn == 0 else ""
            messages.append({"role": "user", "content": opener + question})
            raw_seconds = raw_first_token(raw, messages)
            seconds, answer = server_first_token(base_url, messages, None, MAX_TOKENS)  # the answer is fed back
            messages.append({"role": "assistant", "content": answer})
            ratios[turn].append(seconds / raw_seconds)
            seconds_by_turn[turn].append(seconds)
    later = [ratio for turn in range(2, len(CHAT)) for ratio in ratios[turn]]
    return {"ratio_turns_3_to_6": round(median(later), 3),
            "ratio_by_turn": [round(median(ratios[turn]), 3) for turn in range(len(CHAT))],
            "first_token_ms_by_turn": [round(median(seconds_by_turn[turn]) * 1000, 1) for turn in range(len(CHAT))]}


def bench_house(workdir: Path, rounds: int) -> dict:
    with watchdog_and_raw(workdir, "house") as (watchdog, raw):
        return house_rounds(watchdog.base_url, raw, rounds)


def bench_chat(workdir: Path, rounds: int) -> dict:
    with watchdog_and_raw(workdir, "chat") as (watchdog, raw):
        return chat_rounds(watchdog.base_url, raw, rounds)


MISS_MODES = {"prompt_cache_off": ({"restart_after_requests": 1}, {"prompt_cache": "false"}),
              "prompt_cache_on": ({"restart_after_requests": 1}, {"prompt_cache": "true"})}


def unmatched(base_url: str, prompt: str, serial: int) -> float:
    """Seconds of one request through the original route with a persona of its own."""
    started = time.monotonic()
    status, _, body = request(base_url, "POST", "/gpt4all_api", {
        "prompt": prompt, "persona": f"{PERSONA} This is conversation {serial}.", "temperature": 0,
        "max_tokens": MAX_TOKENS}, headers={"Accept": "application/json"})
    if status != 200:
        raise RuntimeError(f"status {status}: {body[:200]!r}")
    return time.monotonic() - started


def bench_miss(workdir: Path, rounds: int) -> dict:
    """Both modes' watchdogs at once, fresh each round, past LEARN_FROM + 1 requests; in each pass
    each takes its turn (shuffled) for one block once the machine is quiet: one request not counted,
    then each prompt once, back to back, every request with a persona of its own. Compared prompt
    by prompt as bench.py compares the watchdog modes, prompt_cache_off the baseline."""
    seconds: dict[str, list] = {name: [] for name in MISS_MODES}
    serials = {name: 0 for name in MISS_MODES}  # the same personas, in the same order, on both sides
    shuffles = random.Random(17)
    for round_index in range(rounds):
        with contextlib.ExitStack() as stack:
            watchdogs = watchdogs_past_learning(stack, workdir / f"miss-{round_index}", MISS_MODES)
            def ask(name: str, prompt: str) -> float:
                serials[name] += 1
                return unmatched(watchdogs[name].base_url, prompt, serials[name])  # noqa: B023 (called in this round)
            for _ in range(PASSES):
                run_pass(list(MISS_MODES), shuffles, seconds, ask)
            metrics = request(watchdogs["prompt_cache_on"].base_url, "GET", "/metrics")[2].decode()
    results = compare_to_keep_loaded(seconds, PASSES, baseline="prompt_cache_off")
    results["prompt_cache_on"]["entries_at_the_end"] = next(
        line.split()[1] for line in metrics.splitlines() if line.startswith("gpt4all_api_prompt_cache_entries "))
    results["learned_from"] = LEARN_FROM
    return results


def up(base_url: str) -> bool:
    try:
        return request(base_url, "GET", "/v1/models", timeout=5)[0] == 200
    except OSError:
        return False


@contextlib.contextmanager
def llama_cpp_server(workdir: Path, python: str) -> Iterator[str]:
    """llama-cpp-python's OpenAI server on the default model, its prompt cache on (--cache)."""
    settings = load_settings(write_config(workdir / "llama"))
    port = free_port()
    log = open(workdir / "llama-server.log", "wb")
    server = subprocess.Popen([python, "-m", "llama_cpp.server", "--model", str(settings.model_file), "--n_ctx",
                               str(settings.n_ctx), "--n_threads", str(THREADS), "--n_batch", str(settings.n_batch),
                               "--cache", "true", "--host", "127.0.0.1", "--port", str(port)],
                              stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while not up(base_url):
            if server.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"llama-cpp-python's server did not start: see {log.name}")
            time.sleep(0.5)
        yield base_url
    finally:
        server.terminate()
        server.wait()
        log.close()


def bench_llama(workdir: Path, rounds: int) -> dict:
    python = os.environ.get("LLAMA_CPP_PYTHON")
    if not python:
        return {"skipped": "set LLAMA_CPP_PYTHON to a Python with llama-cpp-python[server] installed"}
    settings = load_settings(write_config(workdir / "raw"))
    raw = RawModel(settings)
    with llama_cpp_server(workdir, python) as base_url:
        return {"house": house_rounds(base_url, raw, rounds, offset=100, ours=False),
                "chat": chat_rounds(base_url, raw, rounds)}


def main() -> None:
    from bench import run_benches
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", default="all", choices=["house", "chat", "miss", "llama", "all"])
    parser.add_argument("--rounds", type=int, default=3, help="rounds of each scenario (default %(default)s)")
    arguments = parser.parse_args()
    run_benches({"house": bench_house, "chat": bench_chat, "miss": bench_miss, "llama": bench_llama},
                arguments.which, arguments.rounds, f"cache-{arguments.which}")


if __name__ == "__main__":
    main()
