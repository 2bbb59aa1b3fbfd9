"""Constrained JSON benchmarks: JSON mode, JSON schemas and tool-call arguments held to their grammar
by correction (apiserver/correction.py), through `python gpt4all_api.py` (one long-lived worker,
prompt reuse off so both sides evaluate every prompt in full).

    python bench/constrained.py [--rounds N]

rates        every prompt of tests/test_json_integration.py (JSON mode and schemas, OpenAI route):
             the share that parses and the share that validates (jsonschema), targets 100 % both;
             corrections per answer and the mean cost of one correction (the server's log lines).
overhead     the prompts whose answers needed no correction, timed through the chat route (JSON
             mode: the constraint follows every token) against the same rendered prompt through the
             raw completion route (no constraint, as many tokens as the constrained answer took), in
             alternating order, N rounds: the ratio of the medians (target <= 1.02x).

Results are printed and written to bench/results/.
"""

from __future__ import annotations

import argparse
import json
import re
import statistics
import sys
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import jsonschema  # noqa: E402
from test_json_integration import JSON_PROMPTS, SCHEMAS, rendered  # noqa: E402

from bench import run_benches  # noqa: E402
from conftest import Process, request, write_config  # noqa: E402

MAX_TOKENS = 400
CORRECTION_LINE = re.compile(r"constrained answer: (\d+) corrections?, (\d+) ms")


class Server:
    """gpt4all_api.py alone, 2 threads, prompt reuse off; its log read as it grows."""

    def __init__(self, workdir: Path):
        directory = workdir / "constrained"
        directory.mkdir(exist_ok=True)
        config = write_config(directory, {"model": {"n_threads": 2, "prompt_cache": "false",
                                                    "system_prompt_cache": "false"}})
        self.process = Process("gpt4all_api.py", config)
        self.process.wait_ready(timeout=300)
        self.log = directory / "logs" / "server.log"
        self.read = self.log.stat().st_size if self.log.exists() else 0

    def corrections(self) -> tuple[int, float]:
        """(corrections, their milliseconds) logged since the last call."""
        with open(self.log, "rb") as file:
            file.seek(self.read)
            text = file.read().decode(errors="replace")
            self.read = file.tell()
        found = CORRECTION_LINE.findall(text)
        return sum(int(count) for count, _ in found), sum(float(ms) for _, ms in found)


def chat(base_url: str, prompt: str, schema: dict[str, Any] | None) -> tuple[float, str, int]:
    """(seconds, content, completion tokens) of one JSON-mode chat request."""
    response_format = {"type": "json_object"} if schema is None else {
        "type": "json_schema", "json_schema": {"name": "answer", "schema": schema}}
    started = time.monotonic()
    status, _, body = request(base_url, "POST", "/v1/chat/completions", {
        "messages": [{"role": "user", "content": prompt}], "temperature": 0, "max_tokens": MAX_TOKENS,
        "response_format": response_format}, timeout=600)
    seconds = time.monotonic() - started
    assert status == 200, body
    document = json.loads(body)
    return seconds, document["choices"][0]["message"]["content"], document["usage"]["completion_tokens"]


def unconstrained(base_url: str, prompt: str, schema: dict[str, Any] | None, tokens: int) -> float:
    """Seconds of the same rendered prompt and opening through the raw completion route: no
    constraint, the same number of tokens (the chat route ends where the JSON closes)."""
    started = time.monotonic()
    status, _, body = request(base_url, "POST", "/v1/completions", {
        "prompt": rendered(prompt, schema), "temperature": 0,
        "max_tokens": tokens}, timeout=600)
    assert status == 200, body
    return time.monotonic() - started


def cases() -> list[tuple[str, dict[str, Any] | None]]:
    return [(prompt, None) for prompt in JSON_PROMPTS] + [(prompt, schema) for prompt, schema in SCHEMAS]


def bench_rates(server: Server) -> tuple[dict, list[tuple[str, dict | None, int]]]:
    parsed = valid = 0
    per_answer: list[int] = []
    total_ms = 0.0
    clean: list[tuple[str, dict | None, int]] = []
    for prompt, schema in cases():
        _, content, tokens = chat(server.process.base_url, prompt, schema)
        corrections, ms = server.corrections()
        per_answer.append(corrections)
        total_ms += ms
        try:
            document = json.loads(content)
        except ValueError:
            continue
        parsed += 1
        if jsonschema.Draft202012Validator(schema or {"type": "object"}).is_valid(document):
            valid += 1
        if corrections == 0:
            clean.append((prompt, schema, tokens))
    count = len(per_answer)
    corrected = sum(per_answer)
    return ({"answers": count, "parse_rate": parsed / count, "schema_valid_rate": valid / count,
             "answers_corrected": sum(1 for n in per_answer if n), "corrections_per_answer": round(corrected / count, 2),
             "most_corrections_in_one_answer": max(per_answer),
             "mean_ms_per_correction": round(total_ms / corrected, 1) if corrected else None}, clean)


def bench_overhead(server: Server, clean: list[tuple[str, dict | None, int]], rounds: int) -> dict:
    constrained: list[float] = []
    free: list[float] = []
    base_url = server.process.base_url
    for round_number in range(rounds):
        for index, (prompt, schema, tokens) in enumerate(clean):
            if (index + round_number) % 2:
                free.append(unconstrained(base_url, prompt, schema, tokens))
                constrained.append(chat(base_url, prompt, schema)[0])
            else:
                constrained.append(chat(base_url, prompt, schema)[0])
                free.append(unconstrained(base_url, prompt, schema, tokens))
    server.corrections()
    return {"prompts": len(clean), "rounds": rounds,
            "constrained_median_s": round(statistics.median(constrained), 3),
            "unconstrained_median_s": round(statistics.median(free), 3),
            "ratio_of_medians": round(statistics.median(constrained) / statistics.median(free), 4),
            "ratio_of_sums": round(sum(constrained) / sum(free), 4)}


def bench_constrained(workdir: Path, rounds: int) -> dict:
    server = Server(workdir)
    try:
        rates, clean = bench_rates(server)
        return {"rates": rates, "overhead": bench_overhead(server, clean, rounds)}
    finally:
        server.process.stop()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3, help="passes over the clean prompts (default %(default)s)")
    arguments = parser.parse_args()
    run_benches({"constrained": bench_constrained}, "constrained", arguments.rounds, "constrained")


if __name__ == "__main__":
    main()
