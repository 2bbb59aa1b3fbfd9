"""Benchmarks: the server and the watchdog against raw gpt4all, measured in the same run.

    python bench/bench.py [server|watchdog|restart|paced|spawn|stream|ollama|tools|prefix|busy|all] [--rounds N]

server    raw in-process generate() vs POST /gpt4all_api on the same prompts (temperature 0, same
          token counts): median latency ratio; /health p99 during a generation; start-to-ready vs
          raw model load.
watchdog  back-to-back requests through watchdog.py: restart after every request with the warm
          spare, without it, each with and without the zygote (without both: the original project's
          behaviour, the model load paid by the next request), and restart_after_requests = 0;
          all six watchdogs up at once, taking turns in short blocks (each after the machine
          is quiet), compared prompt by prompt, with a standard error from pass to pass;
          connection errors; the watchdog's idle CPU.
restart   the same for the target pair alone (keep-loaded, restart with spare and zygote): more
          rounds of fresh watchdogs in the same time.
paced     keep-loaded vs restart after every request with the warm spare and the zygote, as a
          person or a bot uses the server: a pause of half a second between requests.
spawn     the process models against keep-loaded: the zygote's, the spawn model (zygote = false:
          each worker loads the model itself, the warm spare hiding the load) and the spawn model
          with Linux's extras off (GPT4ALL_API_PORTABLE=1, as on macOS: a framed control channel,
          the spare's load at normal priority); back to back (as `watchdog` measures), and with
          SPAWN_PAUSE seconds between one watchdog's requests.
stream    time to first token and tokens/s of a streamed /v1/chat/completions vs raw generate()
          with a callback.
ollama    the same as stream, through Ollama's streamed /api/chat (NDJSON).
tools     tool-call answers through the server vs the same prompt through raw gpt4all, and the share of
          20 weather prompts that come back as valid tool_calls.
prefix    a 300-token configured system prompt (evaluated once, in the zygote) and a short question:
          time to first token through the watchdog (restart after every request) vs raw gpt4all
          evaluating the whole prompt; and the streamed tokens/s of back-to-back generations with
          a spare forked and pre-warmed for each (warm_spare; since the spare waits for the end of
          the generation it would slow, it is made beside the next request's prompt) vs with no
          spare made at all.
busy      the server beside one busy program (another session, one core): n_threads = 0, which
          leaves that core alone, vs n_threads = every core; both against the idle machine
          (at most 2 passes: the fixed count can take tens of seconds per request).

Ratios compare against the baseline measured in the same run, so a slow or busy machine shows in
both. Results are printed and written to bench/results/.
"""

from __future__ import annotations

import argparse
import contextlib
import http.client
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "tests"))

from apiserver.cpu_share import process_cpu_ticks, read_proc_stat  # noqa: E402
from apiserver.model import TEMPLATES, ensure_model_file  # noqa: E402
from apiserver.pages import LEARN_FROM  # noqa: E402
from apiserver.settings import Settings, load_settings  # noqa: E402
from apiserver.tool_formats import FORMATS  # noqa: E402
from conftest import Process, request, write_config  # noqa: E402

PERSONA = "You are a helpful assistant."
PROMPTS = ["What is the capital of France?", "Name three primary colors.",
           "Write a Python function that adds two numbers.", "Count from 1 to 20 separated by commas."]
MAX_TOKENS = 48


def chatml(prompt: str) -> str:
    return TEMPLATES["chatml"].render([{"role": "system", "content": PERSONA},
                                                   {"role": "user", "content": prompt}])


def median(values):
    return statistics.median(values) if values else float("nan")


def percentile(values, fraction):
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(fraction * (len(ordered) - 1))))]


def raw_load_seconds(settings: Settings, repeats: int = 3) -> float:
    """Fresh python: import gpt4all and load the model (what a server start must at least pay)."""
    code = ("import time; t = time.monotonic(); from gpt4all import GPT4All; "
            f"m = GPT4All({settings.model_id!r}, model_path={str(settings.model_path)!r}, allow_download=False, "
            f"device='cpu', n_threads={os.cpu_count()}, n_ctx={settings.n_ctx}); m.model.thread_count(); "
            "print(time.monotonic() - t)")
    times = []
    for _ in range(repeats):
        output = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
        times.append(float(output.strip().splitlines()[-1]))
    return median(times)


class RawModel:
    """The baseline: gpt4all in this process, same template, same sampling, same n_batch."""

    def __init__(self, settings: Settings):
        from gpt4all import GPT4All
        self.settings = settings
        self.model = GPT4All(settings.model_id, model_path=str(settings.model_path), allow_download=False,
                             device="cpu", n_threads=os.cpu_count(), n_ctx=settings.n_ctx)

    def generate(self, prompt: str, rendered: str | None = None):
        """(seconds, text, tokens, seconds to first token); rendered: the whole prompt, written already."""
        pieces, first = [], []
        started = time.monotonic()

        def callback(token_id, piece):
            if not first:
                first.append(time.monotonic() - started)
            pieces.append(piece)
            return True

        s = self.settings
        # generate() without a chat session, but with the template's markers parsed as special tokens,
        # as the server sends them (GPT4All.generate() itself would spell them out as text)
        self.model.model.prompt_model(
            rendered or chatml(prompt), "%1%2", callback, n_predict=MAX_TOKENS, temp=0.0, top_k=s.top_k, top_p=s.top_p,
            min_p=s.min_p, repeat_penalty=s.repeat_penalty, repeat_last_n=s.repeat_last_n, n_batch=s.n_batch,
            reset_context=True, special=True)
        text = "".join(pieces)
        return time.monotonic() - started, text.replace("<|im_end|>", ""), len(pieces), first[0] if first else None


def post_generate(base_url: str, prompt: str):
    """(seconds, answer, completion tokens, worker pid) of one request."""
    started = time.monotonic()
    status, headers, body = request(base_url, "POST", "/gpt4all_api", {"prompt": prompt, "persona": PERSONA,
                                                                  "temperature": 0, "max_tokens": MAX_TOKENS},
                              headers={"Accept": "application/json"})
    elapsed = time.monotonic() - started
    if status != 200:
        raise RuntimeError(f"status {status}: {body[:200]!r}")
    document = json.loads(body)
    return elapsed, document["response"], document["usage"]["completion_tokens"], int(headers["x-worker-pid"])


def bench_server(workdir: Path, rounds: int) -> dict:
    config = write_config(workdir / "server")
    settings = load_settings(config)
    ensure_model_file(settings)
    load = raw_load_seconds(settings)
    started = time.monotonic()
    server = Process("gpt4all_api.py", config)
    try:
        server.wait_ready()
        ready = time.monotonic() - started
        raw = RawModel(settings)
        raw_times, server_times, mismatches = [], [], 0
        for prompt in PROMPTS:  # warm both
            raw.generate(prompt)
            post_generate(server.base_url, prompt)
        for _ in range(rounds):
            for prompt in PROMPTS:
                raw_seconds, raw_text, raw_tokens, _ = raw.generate(prompt)
                server_seconds, server_text, server_tokens, _ = post_generate(server.base_url, prompt)
                raw_times.append(raw_seconds)
                server_times.append(server_seconds)
                mismatches += raw_tokens != server_tokens or raw_text.strip() != server_text.strip()
        health = []
        done = threading.Event()
        worker = threading.Thread(target=lambda: (post_generate(server.base_url, "Count from 1 to 300."), done.set()))
        worker.start()
        while not done.is_set():
            probe = time.monotonic()
            request(server.base_url, "GET", "/health")
            health.append(time.monotonic() - probe)
            time.sleep(0.01)
        worker.join()
    finally:
        server.stop()
    return {
        "raw_median_s": median(raw_times), "server_median_s": median(server_times),
        "latency_ratio": median(server_times) / median(raw_times), "answers_differing": mismatches,
        "requests": len(server_times), "health_probes": len(health),
        "health_p99_ms": percentile(health, 0.99) * 1000, "raw_load_s": load, "start_to_ready_s": ready,
        "ready_minus_load_s": ready - load,
    }


@contextlib.contextmanager
def running_watchdog(config: Path, env: dict | None = None):
    """A ready watchdog on config, its zygote and spares loaded; stopped on the way out."""
    watchdog = Process("watchdog.py", config, env=env)
    try:
        watchdog.wait_ready()
        time.sleep(3)  # let the zygote and the warm spare load: they are there before the first request
        yield watchdog
    finally:
        watchdog.stop()


WATCHDOG_MODES = {  # name: [watchdog] settings, and [model] ones (and the environment's additions)
    "keep_loaded": ({"restart_after_requests": 0}, {}),
    "restart_with_spare": ({"restart_after_requests": 1}, {}),
    "restart_with_spare_weights_file_mapped": ({"restart_after_requests": 1}, {"huge_pages": "false"}),
    "restart_with_spare_no_zygote": ({"restart_after_requests": 1, "zygote": "false"}, {}),
    "restart_without_spare": ({"restart_after_requests": 1, "warm_spare": "false"}, {}),
    "seed_style_no_spare_no_zygote": ({"restart_after_requests": 1, "warm_spare": "false", "zygote": "false"}, {}),
}
PASSES = 3  # per round: in each pass every watchdog takes its turn for one block


def watchdogs_past_learning(stack: contextlib.ExitStack, workdir: Path, modes: dict) -> dict:
    """A fresh watchdog per mode ({name: ([watchdog] settings, [model] settings)}, n_threads fixed
    at the core count), each taken past its first workers, which report their pages (pages.py)."""
    watchdogs = {name: stack.enter_context(running_watchdog(write_config(
        workdir / name, {"watchdog": watchdog, "model": {"n_threads": os.cpu_count(), **model}}),
        dict(os.environ, **env[0]) if env else None))
        for name, (watchdog, model, *env) in modes.items()}
    for watchdog in watchdogs.values():
        for _ in range(LEARN_FROM + 1):
            request(watchdog.base_url, "POST", "/gpt4all_api", {"prompt": "Hi", "max_tokens": 1},
                    headers={"Accept": "application/json"})
    return watchdogs


QUIET_CORES = 0.15  # the machine's CPU use, in cores, under which it counts as quiet between blocks


def machine_busy_seconds() -> float:
    """CPU seconds the machine has spent busy since boot (another guest's share, steal, not counted)."""
    user, nice, system, _idle, _iowait, irq, softirq = map(int, read_proc_stat().split()[1:8])
    return (user + nice + system + irq + softirq) / os.sysconf("SC_CLK_TCK")


def wait_until_quiet(window: float = 0.3, limit: float = 20.0) -> None:
    """Wait until the machine used less than QUIET_CORES over window seconds (at most limit
    seconds), so that what the last block left running (a spare's fork, a model's load) is over
    before the next block starts."""
    deadline = time.monotonic() + limit
    while time.monotonic() < deadline:
        before = machine_busy_seconds()
        time.sleep(window)
        if (machine_busy_seconds() - before) / window < QUIET_CORES:
            return


def run_pass(names: list, shuffles: random.Random, seconds: dict, ask) -> None:
    """One pass: each mode (the order shuffled) takes its turn for one block, once the machine is
    quiet: one request not counted, then each prompt once, back to back. ask(name, prompt) returns
    the seconds it took, or None when it failed; seconds[name] gets the block {prompt: [seconds]}."""
    shuffles.shuffle(names)
    for name in names:
        block: dict = {prompt: [] for prompt in range(len(PROMPTS))}
        seconds[name].append(block)
        wait_until_quiet()
        for index in range(-1, len(PROMPTS)):
            elapsed = ask(name, PROMPTS[max(index, 0)])
            if index >= 0 and elapsed is not None:
                block[index].append(elapsed)


def bench_watchdog(workdir: Path, rounds: int, modes: dict | None = None) -> dict:
    """Every mode's watchdog (WATCHDOG_MODES, or the modes given) runs at once, started afresh for
    each round. A round is PASSES passes; in a pass each watchdog takes its turn (the order
    shuffled, the same shuffles every run) for one block: once the machine is quiet, one short
    request (not counted: after it the watchdog is in its steady state, a restart mode's next spare
    forked beside the next request) and then each prompt once, back to back. Short blocks keep each
    mode's requests close in time to the others': this machine's speed swings by 20 % to 2x over
    tens of seconds (another guest on the host), which long blocks turned into differences between
    modes. Modes are compared prompt by prompt: the median latency of each prompt, the difference
    to keep_loaded's, averaged over the prompts; and pass by pass, which gives a standard error.
    Before its turns, each watchdog answers LEARN_FROM + 1 short requests: the first workers' page
    reports cost them time at their exit, once in a zygote's life, not in its steady state. Fresh
    watchdogs each round, because a process's speed may stay with it for its life: two zygotes of
    the same code, side by side, once differed by 37 ms per request over a whole run. (A median
    over all requests would fall between the short and the long answers, where a few requests
    decide it.) n_threads is fixed: with 0, a worker's thread count answers the other watchdogs'
    idle ticks, which is not what is measured here."""
    modes = WATCHDOG_MODES if modes is None else modes
    seconds = {name: [] for name in modes}
    errors, pids = {name: 0 for name in modes}, {name: set() for name in modes}
    shuffles = random.Random(13)
    for round_index in range(rounds):
        with contextlib.ExitStack() as stack:
            watchdogs = watchdogs_past_learning(stack, workdir / f"round-{round_index}", modes)
            def ask(name: str, prompt: str) -> float | None:
                started = time.monotonic()
                try:
                    # called within this round only (run_pass below): the round's watchdogs are meant
                    pids[name].add(post_generate(watchdogs[name].base_url, prompt)[3])  # noqa: B023
                except (OSError, http.client.HTTPException, RuntimeError):
                    errors[name] += 1
                    return None
                return time.monotonic() - started
            for _ in range(PASSES):
                run_pass(list(modes), shuffles, seconds, ask)
            if round_index == rounds - 1:
                idle_cpu = idle_cpu_fractions({name: watchdog.popen.pid for name, watchdog in watchdogs.items()},
                                              10.0)
    results = compare_to_keep_loaded(seconds, PASSES)
    for name in modes:
        results[name].update({"errors": errors[name], "worker_pids": len(pids[name]), "idle_cpu_fraction": idle_cpu[name]})
    return results


TARGET_PAIR = ("keep_loaded", "restart_with_spare")


def bench_restart(workdir: Path, rounds: int) -> dict:
    """The issue's target pair alone (keep_loaded, restart_with_spare), measured as bench_watchdog
    measures: a third of its time per round, so more rounds of fresh watchdogs, each a new draw of
    where their memory landed, in the same time."""
    return bench_watchdog(workdir, rounds, {name: WATCHDOG_MODES[name] for name in TARGET_PAIR})


def compare_to_keep_loaded(seconds: dict, blocks_per_round: int, baseline: str = "keep_loaded") -> dict:
    """seconds[mode][block][prompt]: latencies, the blocks in the order they ran, blocks_per_round
    of them for each round of fresh watchdogs; block i of every mode ran in the same pass. Per
    mode: each prompt's median, and those medians minus the baseline mode's (keep_loaded unless
    said), averaged over the prompts (in ms): over all blocks, round by round, and pass by pass
    (with the mean and standard error of those)."""
    prompts = range(len(next(iter(seconds.values()))[0]))

    def minus_baseline(name: str, blocks: range) -> float:
        def by_prompt(mode: str) -> list:
            return [median([value for index in blocks for value in seconds[mode][index][prompt]])
                    for prompt in prompts]
        return statistics.mean((mine - base) * 1000 for mine, base in zip(by_prompt(name), by_prompt(baseline)))

    count = len(seconds[baseline])
    everything = range(count)
    rounds = [range(start, start + blocks_per_round) for start in range(0, count, blocks_per_round)]
    results = {}
    for name in seconds:
        passes = [minus_baseline(name, range(index, index + 1)) for index in everything]
        results[name] = {
            "median_s_per_prompt": [round(median([value for block in seconds[name] for value in block[prompt]]), 4)
                                    for prompt in prompts],
            f"minus_{baseline}_ms": minus_baseline(name, everything),
            f"minus_{baseline}_ms_by_round": [round(minus_baseline(name, blocks), 1) for blocks in rounds],
            f"minus_{baseline}_ms_pass_by_pass": {
                "mean": round(statistics.mean(passes), 1),
                "standard_error": round(statistics.stdev(passes) / len(passes) ** 0.5, 1) if len(passes) > 1 else None,
                "passes": len(passes)},
            "requests": sum(len(values) for block in seconds[name] for values in block.values())}
    return results


def timed_generate(base_url: str, prompt: str) -> float | None:
    """Seconds one generation took through base_url, or None when it failed."""
    started = time.monotonic()
    try:
        post_generate(base_url, prompt)
    except (OSError, http.client.HTTPException, RuntimeError):
        return None
    return time.monotonic() - started


PAUSE = 0.5  # seconds between paced requests: more than a spare takes to be forked and pre-warmed


def bench_paced(workdir: Path, rounds: int) -> dict:
    """keep_loaded against restart_with_spare as a person or a bot uses a server: a pause between
    requests. Both watchdogs run at once, started afresh each round; after LEARN_FROM + 1 short
    requests each, their requests alternate one by one (PASSES passes over the prompts), PAUSE
    seconds apart. Compared as bench_watchdog compares."""
    modes = TARGET_PAIR
    seconds = {name: [] for name in modes}
    errors = {name: 0 for name in modes}
    for round_index in range(rounds):
        with contextlib.ExitStack() as stack:
            watchdogs = watchdogs_past_learning(stack, workdir / f"paced-{round_index}",
                                                {name: WATCHDOG_MODES[name] for name in modes})
            order = modes if round_index % 2 == 0 else modes[::-1]
            for _ in range(PASSES):
                blocks = {name: {prompt: [] for prompt in range(len(PROMPTS))} for name in modes}
                for name in modes:
                    seconds[name].append(blocks[name])
                for prompt in range(len(PROMPTS)):
                    for name in order:
                        time.sleep(PAUSE)
                        elapsed = timed_generate(watchdogs[name].base_url, PROMPTS[prompt])
                        if elapsed is None:
                            errors[name] += 1
                        else:
                            blocks[name][prompt].append(elapsed)
    results = compare_to_keep_loaded(seconds, PASSES)
    for name in modes:
        results[name]["errors"] = errors[name]
    return results


SPAWN_MODES = {
    "keep_loaded": WATCHDOG_MODES["keep_loaded"],
    "zygote": WATCHDOG_MODES["restart_with_spare"],
    "spawn": WATCHDOG_MODES["restart_with_spare_no_zygote"],
    "spawn_portable": ({"restart_after_requests": 1}, {}, {"GPT4ALL_API_PORTABLE": "1"}),
    # Linux's extras off cost even a kept-loaded server (no turn reuse, no system prompt evaluated
    # ahead: gpt4all's tokenizer is found through /proc): spawn_portable is also compared to this.
    "keep_loaded_portable": ({"restart_after_requests": 0}, {}, {"GPT4ALL_API_PORTABLE": "1"}),
}
SPAWN_BASELINES = {"spawn_portable": "keep_loaded_portable"}  # a second ratio, against a baseline of its kind
SPAWN_PAUSE = 2.0  # seconds between two requests to one watchdog in the paced half


def bench_spawn(workdir: Path, rounds: int) -> dict:
    """SPAWN_MODES back to back (bench_watchdog), then paced: all watchdogs up at once, started
    afresh each round; in each pass every watchdog (the order shuffled) takes its turn for one block,
    each prompt once, each request SPAWN_PAUSE seconds after the previous answer of that watchdog.
    Both compared to keep_loaded, prompt by prompt. The warm spare must hide the spawn model's load
    when requests are SPAWN_PAUSE apart."""
    back_to_back = bench_watchdog(workdir / "back-to-back", rounds, SPAWN_MODES)
    seconds: dict = {name: [] for name in SPAWN_MODES}
    errors = {name: 0 for name in SPAWN_MODES}
    shuffles = random.Random(29)
    for round_index in range(rounds):
        with contextlib.ExitStack() as stack:
            watchdogs = watchdogs_past_learning(stack, workdir / f"spawn-paced-{round_index}", SPAWN_MODES)
            time.sleep(SPAWN_PAUSE)
            for _ in range(PASSES):
                names = list(SPAWN_MODES)
                shuffles.shuffle(names)
                for name in names:
                    block: dict = {prompt: [] for prompt in range(len(PROMPTS))}
                    seconds[name].append(block)
                    for prompt in range(len(PROMPTS)):
                        time.sleep(SPAWN_PAUSE)
                        elapsed = timed_generate(watchdogs[name].base_url, PROMPTS[prompt])
                        if elapsed is None:
                            errors[name] += 1
                        else:
                            block[prompt].append(elapsed)
    paced = compare_to_keep_loaded(seconds, PASSES)
    for name in SPAWN_MODES:
        paced[name]["errors"] = errors[name]
    for results in (back_to_back, paced):  # the mean over the prompts of each one's median latency ratio
        for name in SPAWN_MODES:
            for baseline in ("keep_loaded", SPAWN_BASELINES.get(name)):
                if baseline:
                    results[name][f"vs_{baseline}"] = round(statistics.mean(
                        mine / base for mine, base in zip(results[name]["median_s_per_prompt"],
                                                          results[baseline]["median_s_per_prompt"])), 4)
    return {"back_to_back": back_to_back, f"paced_{SPAWN_PAUSE:g}s": paced}


def idle_cpu_fractions(pids: dict, seconds: float) -> dict:
    """CPU time each process used while idle, as a fraction of one core."""
    def cpu_seconds(pid: int) -> float:
        return process_cpu_ticks(pid) / os.sysconf("SC_CLK_TCK")
    before = {name: cpu_seconds(pid) for name, pid in pids.items()}
    time.sleep(seconds)
    return {name: (cpu_seconds(pid) - before[name]) / seconds for name, pid in pids.items()}


def stream_chat(base_url: str, prompt: str):
    """(seconds to first content token, content tokens/s after it, text) from a streamed chat."""
    host, port = base_url.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    body = json.dumps({"messages": [{"role": "system", "content": PERSONA}, {"role": "user", "content": prompt}],
                       "temperature": 0, "max_tokens": MAX_TOKENS, "stream": True,
                       "stream_options": {"include_usage": True}})
    started = time.monotonic()
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first, text, tokens = None, "", 0
    for line in response:
        if not line.startswith(b"data: ") or line.strip() == b"data: [DONE]":
            continue
        event = json.loads(line[6:])
        if event.get("usage"):
            tokens = event["usage"]["completion_tokens"]
        for choice in event["choices"]:
            if choice["delta"].get("content"):
                first = first or time.monotonic() - started
                text += choice["delta"]["content"]
    total = time.monotonic() - started
    connection.close()
    return first, (tokens - 1) / (total - first) if total > first else float("nan"), text


def ollama_chat(base_url: str, prompt: str):
    """(seconds to first content token, content tokens/s after it, text) from a streamed /api/chat."""
    host, port = base_url.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    body = json.dumps({"model": "any", "messages": [{"role": "system", "content": PERSONA},
                                                    {"role": "user", "content": prompt}],
                       "options": {"temperature": 0, "num_predict": MAX_TOKENS}})
    started = time.monotonic()
    connection.request("POST", "/api/chat", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first, text, tokens = None, "", 0
    for line in response:
        event = json.loads(line)
        if event["done"]:
            tokens = event["eval_count"]
        elif event["message"]["content"]:
            first = first or time.monotonic() - started
            text += event["message"]["content"]
    total = time.monotonic() - started
    connection.close()
    return first, (tokens - 1) / (total - first) if total > first else float("nan"), text


def bench_ollama(workdir: Path, rounds: int) -> dict:
    return bench_stream(workdir, rounds, streamer=ollama_chat)


@contextlib.contextmanager
def server_and_raw(workdir: Path, name: str):
    """A ready standalone server on the committed defaults, and the raw baseline beside it."""
    config = write_config(workdir / name)
    server = Process("gpt4all_api.py", config)
    try:
        server.wait_ready()
        yield server, RawModel(load_settings(config))
    finally:
        server.stop()


def bench_stream(workdir: Path, rounds: int, streamer=stream_chat) -> dict:
    with server_and_raw(workdir, "stream") as (server, raw):
        raw_first, raw_speed, server_first, server_speed = [], [], [], []
        for prompt in PROMPTS:
            raw.generate(prompt)
            streamer(server.base_url, prompt)
        for _ in range(rounds):
            for prompt in PROMPTS:
                seconds, _, tokens, first = raw.generate(prompt)
                raw_first.append(first)
                raw_speed.append((tokens - 1) / (seconds - first))
                first, speed, _ = streamer(server.base_url, prompt)
                server_first.append(first)
                server_speed.append(speed)
    return {"raw_first_token_ms": median(raw_first) * 1000, "server_first_token_ms": median(server_first) * 1000,
            "first_token_delta_ms": (median(server_first) - median(raw_first)) * 1000,
            "raw_tokens_per_s": median(raw_speed), "server_tokens_per_s": median(server_speed),
            "tokens_per_s_ratio": median(server_speed) / median(raw_speed)}


def median_beside(workdir: Path, name: str, overrides, rounds: int, busy: bool) -> float:
    """Median latency of a standalone server, with or without a busy program in another session."""
    server = Process("gpt4all_api.py", write_config(workdir / name, overrides))
    try:
        server.wait_ready()
        for prompt in PROMPTS:
            post_generate(server.base_url, prompt)
        hog = subprocess.Popen([sys.executable, "-c", "while True: pass"], start_new_session=True) if busy else None
        try:
            time.sleep(1.5)  # a program that has been running for a while
            times = [post_generate(server.base_url, prompt)[0] for _ in range(rounds) for prompt in PROMPTS]
        finally:
            if hog:
                hog.kill()
                hog.wait()
    finally:
        server.stop()
    return median(times)


WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}
TOOL_PROMPTS = [
    "What's the weather in Paris?", "Is it raining in Tokyo right now?", "How warm is it in Madrid today?",
    "Should I take an umbrella in London?", "weather berlin", "Tell me the current weather for New York.",
    "Is it sunny in Rome?", "What is the temperature in Cairo?", "Do I need a coat in Oslo today?",
    "Check the weather in Sydney please.", "How's the weather looking in Toronto?", "Is it snowing in Moscow?",
    "Current conditions in Mumbai?", "What's it like outside in Lisbon?", "Weather report for Nairobi.",
    "Is it windy in Chicago?", "Can you look up the weather in Seoul?", "Will I be cold in Reykjavik?",
    "How hot is Dubai right now?", "What's the forecast in Buenos Aires?"]


def bench_tools(workdir: Path, rounds: int) -> dict:
    """Tool-call answers: the server vs the same prompt through raw gpt4all, and how many come back
    as valid tool_calls."""
    with server_and_raw(workdir, "tools") as (server, raw):
        rendered = {prompt: TEMPLATES["chatml"].render(FORMATS["hermes"].render(
            [{"role": "user", "content": prompt}], [WEATHER_TOOL])) for prompt in TOOL_PROMPTS}
        raw_times, server_times, valid = [], [], 0
        for round_number in range(max(1, min(rounds, 2))):
            for prompt in TOOL_PROMPTS:
                raw_times.append(raw.generate(prompt, rendered[prompt])[0])
                started = time.monotonic()
                status, _, body = request(server.base_url, "POST", "/v1/chat/completions", {
                    "messages": [{"role": "user", "content": prompt}], "tools": [WEATHER_TOOL], "temperature": 0,
                    "max_tokens": MAX_TOKENS})
                server_times.append(time.monotonic() - started)
                message = json.loads(body)["choices"][0]["message"] if status == 200 else {}
                calls = message.get("tool_calls") or []
                if round_number == 0 and len(calls) == 1 and calls[0]["function"]["name"] == "get_weather" and \
                        json.loads(calls[0]["function"]["arguments"]).get("city"):
                    valid += 1
    return {"raw_median_s": median(raw_times), "server_median_s": median(server_times),
            "latency_ratio": median(server_times) / median(raw_times),
            "valid_tool_calls": f"{valid} of {len(TOOL_PROMPTS)}"}


LONG_PERSONA = " ".join([
    "You are Ada, the quartermaster of the research ship Meridian.",
    "The ship carries twelve crew: the captain, two mates, three scientists, two engineers, a cook,",
    "a medic, a radio officer and you. It sails from Lisbon to Reykjavik by way of the Azores and the",
    "Faroe Islands, a voyage of twenty-three days. The stores hold four thousand litres of fresh water,",
    "nine hundred kilograms of dry food, two hundred kilograms of frozen food, sixty litres of olive oil,",
    "thirty kilograms of coffee, spare parts for the two diesel generators, three spare propeller blades,",
    "a desalination unit that makes six hundred litres a day, a medical cabinet for twelve people for",
    "forty days, and the scientific cargo: two hundred sample jars, four plankton nets, a CTD probe and",
    "six weather balloons. You answer questions about the stores, the crew and the route. You are",
    "precise and brief. You give quantities in metric units. You never invent cargo that is not on this",
    "list, and when you do not know an answer you say so and name the crew member who would know it.",
    "Fuel: ninety thousand litres of marine diesel, enough for thirty days at cruising speed.",
])


def streamed_first_token(base_url: str, system: str, question: str):
    host, port = base_url.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    body = json.dumps({"messages": [{"role": "system", "content": system}, {"role": "user", "content": question}],
                       "temperature": 0, "max_tokens": 8, "stream": True})
    started = time.monotonic()
    connection.request("POST", "/v1/chat/completions", body=body, headers={"Content-Type": "application/json"})
    response = connection.getresponse()
    first = None
    for line in response:
        if first is None and line.startswith(b"data: {") and b'"content"' in line:
            first = time.monotonic() - started
    connection.close()
    return first


def bench_prefix(workdir: Path, rounds: int) -> dict:
    questions = ["How much water is on board?", "Who would know about the generators?",
                 "How long is the voyage?", "What scientific cargo do we carry?"]
    config = write_config(workdir / "prefix", {"model": {"system_prompt": LONG_PERSONA}})
    settings = load_settings(config)
    template = TEMPLATES["chatml"]
    raw = RawModel(settings)
    raw_first, server_first = [], []
    with running_watchdog(config) as watchdog:
        _, _, body = request(watchdog.base_url, "POST", "/v1/chat/completions",
                             {"messages": [{"role": "system", "content": LONG_PERSONA},
                                           {"role": "user", "content": questions[0]}], "max_tokens": 1})
        usage = json.loads(body)["usage"]
        prompt_tokens, cached_tokens = usage["prompt_tokens"], usage["prompt_tokens_details"]["cached_tokens"]
        for _ in range(rounds):
            for question in questions:
                rendered = template.render([{"role": "system", "content": LONG_PERSONA},
                                            {"role": "user", "content": question}])
                raw_first.append(raw.generate(question, rendered)[3])
                server_first.append(streamed_first_token(watchdog.base_url, LONG_PERSONA, question))
    del raw
    with_spare = median_stream_speed(workdir, "spare_on", {}, rounds)
    without_spare = median_stream_speed(workdir, "spare_off", {"watchdog": {"warm_spare": "false"}}, rounds)
    return {"prompt_tokens": prompt_tokens, "cached_tokens": cached_tokens, "raw_first_token_ms": median(raw_first) * 1000,
            "server_first_token_ms": median(server_first) * 1000,
            "first_token_ratio": median(server_first) / median(raw_first),
            "tokens_per_s_while_a_spare_is_made": with_spare, "tokens_per_s_no_spare_made": without_spare,
            "spare_vs_no_spare": with_spare / without_spare}


def median_stream_speed(workdir: Path, name: str, overrides: dict, rounds: int) -> float:
    """Streamed tokens/s through the watchdog, restart after every request (a spare is forked and
    pre-warmed for each request when warm_spare is on)."""
    with running_watchdog(write_config(workdir / name, overrides)) as watchdog:
        speeds = [stream_chat(watchdog.base_url, prompt)[1] for _ in range(rounds) for prompt in PROMPTS]
    return median(speeds)


def bench_busy(workdir: Path, rounds: int) -> dict:
    rounds = min(rounds, 2)
    every_core = {"model": {"n_threads": len(os.sched_getaffinity(0))}}
    idle = median_beside(workdir, "idle", None, rounds, busy=False)
    adaptive = median_beside(workdir, "busy_adaptive", None, rounds, busy=True)
    fixed = median_beside(workdir, "busy_fixed", every_core, rounds, busy=True)
    return {"idle_median_s": idle, "busy_adaptive_median_s": adaptive, "busy_every_core_median_s": fixed,
            "adaptive_vs_idle": adaptive / idle, "every_core_vs_idle": fixed / idle}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("which", nargs="?", default="all", choices=["server", "watchdog", "restart", "paced", "spawn", "stream",
                                                                    "ollama", "busy", "tools", "prefix", "all"])
    parser.add_argument("--rounds", type=int, default=5, help="passes over the prompts (default %(default)s)")
    arguments = parser.parse_args()
    run_benches({"server": bench_server, "watchdog": bench_watchdog, "restart": bench_restart, "paced": bench_paced,
                 "spawn": bench_spawn,
                 "stream": bench_stream, "busy": bench_busy,
                 "tools": bench_tools, "ollama": bench_ollama, "prefix": bench_prefix},
                arguments.which, arguments.rounds, arguments.which)


def run_benches(benches: dict, which: str, rounds: int, label: str) -> None:
    """Run one bench (or "all"), print each result, write them all to bench/results/."""
    chosen = list(benches) if which == "all" else [which]
    results = {"cpu_count": os.cpu_count(), "max_tokens": MAX_TOKENS, "rounds": rounds}
    with tempfile.TemporaryDirectory() as workdir:
        for name in chosen:
            results[name] = benches[name](Path(workdir), rounds)
            print(f"== {name}")
            print(json.dumps(results[name], indent=2))
    output = REPO / "bench" / "results" / f"{time.strftime('%Y%m%d-%H%M%S')}-{label}.json"
    output.parent.mkdir(exist_ok=True)
    output.write_text(json.dumps(results, indent=2))
    print(f"written to {output}")


if __name__ == "__main__":
    main()
