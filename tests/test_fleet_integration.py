"""The fleet on one box, with real watchdogs and the real model: /metrics counted by the watchdog
across restarts and crashes, and `workers = 2` running two generations at once in fresh processes."""

from __future__ import annotations

import http.client
import json
import os
import signal
import threading
import time

from prometheus_client.parser import text_string_to_metric_families

from conftest import Process, request, wait_until

CHAT = "/v1/chat/completions"
SHORT = {"messages": [{"role": "user", "content": "Name a colour."}], "max_tokens": 8, "temperature": 0}
LONG = {"messages": [{"role": "user", "content": "Count from 1 to 300, separated by commas."}],
        "max_tokens": 150, "temperature": 0}


def scrape(process: Process) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of /metrics, parsed by Prometheus' own parser: {(name, labels): value}."""
    status, headers, body = request(process.base_url, "GET", "/metrics", timeout=30)
    assert status == 200, body
    assert headers["content-type"].startswith("text/plain; version=0.0.4")
    return {(sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(body.decode()) for sample in family.samples}


def value(samples: dict, name: str, **labels: str) -> float:
    return samples.get((name, tuple(sorted(labels.items()))), 0.0)


def counters(samples: dict) -> dict:
    return {key: number for key, number in samples.items()
            if key[0].endswith(("_total", "_count", "_sum", "_bucket"))}


def chat(process: Process, body: dict = SHORT) -> tuple[int, int, dict]:
    status, headers, answer = request(process.base_url, "POST", CHAT, body, timeout=180)
    return status, int(headers.get("x-worker-pid", 0)), json.loads(answer)


def test_metrics_count_every_answer_across_restarts_and_crashes(start):
    watchdog = start("watchdog.py")
    watchdog.wait_ready()
    watchdog.wait_for_spare()
    before = scrape(watchdog)
    pids, prompt_tokens, completion_tokens = set(), 0, 0
    for _ in range(5):
        status, pid, answer = chat(watchdog)
        assert status == 200, answer
        pids.add(pid)
        prompt_tokens += answer["usage"]["prompt_tokens"]
        completion_tokens += answer["usage"]["completion_tokens"]
    assert len(pids) == 5, "restart after every request: five answers, five processes"
    # A report leaves the worker as its answer does, and its restart follows: give the watchdog a
    # moment to count the last.
    wait_until(lambda: value(scrape(watchdog), "gpt4all_api_restarts_total", cause="planned") >= 5, 10,
               watchdog, "the fifth report and restart")
    after = scrape(watchdog)
    assert value(after, "gpt4all_api_requests_total", route=CHAT, status="200") == 5
    assert value(after, "gpt4all_api_prompt_tokens_total") == prompt_tokens
    assert value(after, "gpt4all_api_generated_tokens_total") == completion_tokens
    assert value(after, "gpt4all_api_time_to_first_token_seconds_count") == 5
    assert value(after, "gpt4all_api_request_duration_seconds_count", route=CHAT) == 5
    assert value(after, "gpt4all_api_restarts_total", cause="planned") == 5
    assert value(after, "gpt4all_api_tokens_per_second") > 0
    assert value(after, "gpt4all_api_workers", state="active") == 1

    victim = json.loads(request(watchdog.base_url, "GET", "/health")[2])["pid"]
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: value(scrape(watchdog), "gpt4all_api_crashes_total") >= 1, 30, watchdog, "the crash counted")
    status, pid, _ = chat(watchdog)
    assert status == 200 and pid != victim
    crashed = scrape(watchdog)
    assert value(crashed, "gpt4all_api_restarts_total", cause="crash") == 1
    for earlier, later in ((before, after), (after, crashed)):
        went_down = {key: (number, later.get(key)) for key, number in counters(earlier).items()
                     if later.get(key, 0.0) < number}
        assert not went_down, f"counters went down across restarts: {went_down}"


def stream_until_first_token(process: Process, body: dict) -> tuple[http.client.HTTPConnection, http.client.HTTPResponse]:
    connection = http.client.HTTPConnection("127.0.0.1", process.port, timeout=180)
    connection.request("POST", CHAT, json.dumps(dict(body, stream=True)), {"Content-Type": "application/json"})
    response = connection.getresponse()  # the head leaves with the first token
    assert response.status == 200
    return connection, response


def test_two_workers_generate_at_once_in_fresh_processes_and_one_crash_spares_the_other(start):
    watchdog = start("watchdog.py", {"watchdog": {"workers": 2}})
    watchdog.wait_ready()
    wait_until(lambda: value(scrape(watchdog), "gpt4all_api_workers", state="active") == 2, 60, watchdog,
               "two active workers")
    results: list[tuple[float, float, int, dict]] = []

    def timed() -> None:
        began = time.monotonic()
        status, pid, answer = chat(watchdog, LONG)
        assert status == 200, answer
        results.append((began, time.monotonic(), pid, answer))

    threads = [threading.Thread(target=timed) for _ in range(2)]
    for thread in threads:
        thread.start()
    time.sleep(1.0)
    samples = scrape(watchdog)  # answered while both generate
    assert value(samples, "gpt4all_api_generations_running") == 2, samples
    for thread in threads:
        thread.join(240)
    (start_a, end_a, pid_a, _), (start_b, end_b, pid_b, _) = results
    assert pid_a != pid_b, "two processes"
    assert start_a < end_b and start_b < end_a, "their timings overlap"
    overlap = min(end_a, end_b) - max(start_a, start_b)
    assert overlap > 0.5 * min(end_a - start_a, end_b - start_b), f"they ran mostly at once: {results}"
    next_pids = {chat(watchdog)[1] for _ in range(2)}
    assert not next_pids & {pid_a, pid_b} and len(next_pids) == 2, "fresh processes for the next two"

    # A SIGKILL of one worker mid-generation leaves the other's generation untouched.
    connection, response = stream_until_first_token(watchdog, LONG)
    victim = int(response.getheader("X-Worker-Pid"))
    survivor: dict[str, object] = {}
    other = threading.Thread(target=lambda: survivor.update(result=chat(watchdog, LONG)))
    other.start()
    wait_until(lambda: value(scrape(watchdog), "gpt4all_api_generations_running") == 2, 30, watchdog,
               "the second generation")
    os.kill(victim, signal.SIGKILL)
    try:
        response.read()
    except (http.client.IncompleteRead, OSError):
        pass
    connection.close()
    other.join(240)
    status, pid, answer = survivor["result"]
    assert status == 200 and pid != victim, answer
    assert answer["choices"][0]["finish_reason"] in ("stop", "length"), answer
    assert answer["choices"][0]["message"]["content"].startswith("1,"), answer
    assert answer["usage"]["completion_tokens"] >= 40, "a whole answer, not one cut short"
    assert value(scrape(watchdog), "gpt4all_api_restarts_total", cause="crash") == 1
