"""Metrics: the box's counters and their Prometheus text exposition (format 0.0.4).

Owns Totals (what finished requests reported: requests by route and status, tokens, duration and
time-to-first-token histograms, the speed of the last generations), Box (what is true now: workers
by state, restarts by cause, generations running and waiting) and render(). The watchdog keeps one
Totals for its whole life, so counters survive every worker restart; a worker reports each finished
request to it and its GET /metrics asks the watchdog for the text (metrics_api.py). Names follow
Prometheus' conventions: one prefix, base units, _total for counters. Imports only the standard
library: the watchdog imports it.
"""

from __future__ import annotations

import collections
import dataclasses
import math
import socket
import struct
from collections.abc import Iterable, Mapping
from typing import Any

from apiserver import system

PREFIX = "gpt4all_api_"
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
DURATION_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0)
FIRST_TOKEN_BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
RECENT_GENERATIONS = 10  # tokens_per_second averages this many of the last generations
RESTART_CAUSES = ("planned", "crash", "hang", "memory", "reload")
MAX_ROUTES = 64  # route labels kept; a report naming yet another counts as "other"


class Histogram:
    """Cumulative buckets, sum and count, as Prometheus' histogram type wants them."""

    def __init__(self, bounds: tuple[float, ...]) -> None:
        self.bounds = bounds
        self.counts = [0] * len(bounds)
        self.sum = 0.0
        self.count = 0

    def observe(self, value: float) -> None:
        for index, bound in enumerate(self.bounds):
            if value <= bound:
                self.counts[index] += 1
        self.sum += value
        self.count += 1

    def samples(self, name: str, labels: dict[str, str]) -> list[str]:
        lines = [sample(f"{name}_bucket", {**labels, "le": number(bound)}, count)
                 for bound, count in zip(self.bounds, self.counts)]
        lines.append(sample(f"{name}_bucket", {**labels, "le": "+Inf"}, self.count))
        return lines + [sample(f"{name}_sum", labels, self.sum), sample(f"{name}_count", labels, self.count)]


def as_count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else 0


def as_seconds(value: Any) -> float | None:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value) and value >= 0
    return float(value) if ok else None


class Totals:
    """What the finished requests reported, since the watchdog started."""

    def __init__(self) -> None:
        self.requests: dict[tuple[str, str], int] = collections.Counter()
        self.prompt_tokens = 0
        self.generated_tokens = 0
        self.prompt_cache_hits = 0  # generations that went on from a context already evaluated
        self.prompt_cache_tokens = 0  # prompt tokens those did not evaluate
        self.durations: dict[str, Histogram] = {}
        self.first_token = Histogram(FIRST_TOKEN_BUCKETS)
        self.speeds: collections.deque[float] = collections.deque(maxlen=RECENT_GENERATIONS)

    def add(self, report: Mapping[str, Any]) -> None:
        """One finished request: {"route", "status", "seconds"} and, for a generation,
        "prompt_tokens", "completion_tokens", "first_token_seconds", "tokens_per_second". A field
        of the wrong type is ignored: a worker's report never breaks the watchdog."""
        route = report.get("route")
        route = route if isinstance(route, str) and route else "other"
        if route not in self.durations and len(self.durations) >= MAX_ROUTES:
            route = "other"
        self.requests[(route, str(as_count(report.get("status"))))] += 1
        seconds = as_seconds(report.get("seconds"))
        if seconds is not None:
            self.durations.setdefault(route, Histogram(DURATION_BUCKETS)).observe(seconds)
        self.prompt_tokens += as_count(report.get("prompt_tokens"))
        self.generated_tokens += as_count(report.get("completion_tokens"))
        cached = as_count(report.get("cached_tokens"))
        self.prompt_cache_hits += 1 if cached else 0
        self.prompt_cache_tokens += cached
        first_token = as_seconds(report.get("first_token_seconds"))
        if first_token is not None:
            self.first_token.observe(first_token)
        speed = as_seconds(report.get("tokens_per_second"))
        if speed is not None and speed > 0:
            self.speeds.append(speed)


@dataclasses.dataclass
class Box:
    """What is true at the time of the scrape."""
    model: str
    started_wall: float  # time.time() when the watchdog (or the lone server) started
    workers: dict[str, int]  # by state
    restarts: Mapping[str, int]  # by cause, since the start
    crashes: int = 0
    running: int = 0  # generations running
    waiting: int = 0  # generations waiting for a slot (the queue)
    slots: int = 1  # generations allowed to run at once ([watchdog] workers)
    backlog: int | None = None  # connections the kernel holds that no worker accepted yet
    model_load_seconds: float | None = None
    prompt_cache_entries: int = 0  # saved contexts the watchdog keeps
    prompt_cache_bytes: int = 0  # the memory they hold


def escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(float(value))


def sample(name: str, labels: dict[str, str], value: float) -> str:
    text = ",".join(f'{key}="{escape(str(item))}"' for key, item in labels.items())
    return f"{name}{{{text}}} {number(value)}" if text else f"{name} {number(value)}"


def family(name: str, kind: str, help_text: str, lines: Iterable[str]) -> list[str]:
    return [f"# HELP {name} {help_text}", f"# TYPE {name} {kind}", *lines]


def render(totals: Totals, box: Box) -> str:
    """The exposition text: every family, always present (zero until something happens)."""
    p = PREFIX
    out: list[str] = []
    out += family(f"{p}info", "gauge", "The model served, as a label; always 1.", [sample(f"{p}info", {"model": box.model}, 1)])
    out += family(f"{p}start_time_seconds", "gauge", "Unix time the watchdog (or the lone server) started.",
                  [sample(f"{p}start_time_seconds", {}, round(box.started_wall, 3))])
    out += family(f"{p}requests_total", "counter", "Requests answered, by route and HTTP status.",
                  [sample(f"{p}requests_total", {"route": route, "status": status}, count)
                   for (route, status), count in sorted(totals.requests.items())])
    out += family(f"{p}prompt_tokens_total", "counter", "Prompt tokens evaluated.",
                  [sample(f"{p}prompt_tokens_total", {}, totals.prompt_tokens)])
    out += family(f"{p}generated_tokens_total", "counter", "Tokens generated.",
                  [sample(f"{p}generated_tokens_total", {}, totals.generated_tokens)])
    out += family(f"{p}prompt_cache_hits_total", "counter",
                  "Generations whose prompt began with turns already evaluated (reused, not evaluated again).",
                  [sample(f"{p}prompt_cache_hits_total", {}, totals.prompt_cache_hits)])
    out += family(f"{p}prompt_cache_tokens_total", "counter", "Prompt tokens reused instead of evaluated.",
                  [sample(f"{p}prompt_cache_tokens_total", {}, totals.prompt_cache_tokens)])
    out += family(f"{p}prompt_cache_entries", "gauge", "Saved contexts the watchdog keeps for the next workers.",
                  [sample(f"{p}prompt_cache_entries", {}, box.prompt_cache_entries)])
    out += family(f"{p}prompt_cache_bytes", "gauge", "Memory those saved contexts hold.",
                  [sample(f"{p}prompt_cache_bytes", {}, box.prompt_cache_bytes)])
    out += family(f"{p}request_duration_seconds", "histogram", "Time from the request line to the end of the reply.",
                  [line for route, histogram in sorted(totals.durations.items())
                   for line in histogram.samples(f"{p}request_duration_seconds", {"route": route})])
    out += family(f"{p}time_to_first_token_seconds", "histogram",
                  "Time from the start of a generation request to its first token (queue included).",
                  totals.first_token.samples(f"{p}time_to_first_token_seconds", {}))
    speeds = totals.speeds
    out += family(f"{p}tokens_per_second", "gauge",
                  f"Generation speed, the mean of the last {RECENT_GENERATIONS} generations (0 before the first).",
                  [sample(f"{p}tokens_per_second", {}, round(sum(speeds) / len(speeds), 3) if speeds else 0.0)])
    out += family(f"{p}generations_running", "gauge", "Generations running now.",
                  [sample(f"{p}generations_running", {}, box.running)])
    out += family(f"{p}generation_slots", "gauge", "Generations allowed to run at once ([watchdog] workers).",
                  [sample(f"{p}generation_slots", {}, box.slots)])
    out += family(f"{p}queue_depth", "gauge", "Generation requests waiting for a slot.",
                  [sample(f"{p}queue_depth", {}, box.waiting)])
    if box.backlog is not None:
        out += family(f"{p}backlog_connections", "gauge", "Connections waiting in the kernel for a worker to accept.",
                      [sample(f"{p}backlog_connections", {}, box.backlog)])
    out += family(f"{p}workers", "gauge", "Worker processes by state.",
                  [sample(f"{p}workers", {"state": state}, count) for state, count in box.workers.items()])
    out += family(f"{p}restarts_total", "counter", "Workers replaced, by cause.",
                  [sample(f"{p}restarts_total", {"cause": cause}, box.restarts.get(cause, 0))
                   for cause in RESTART_CAUSES])
    out += family(f"{p}crashes_total", "counter", "Workers that died unexpectedly (crash or cannot load).",
                  [sample(f"{p}crashes_total", {}, box.crashes)])
    if box.model_load_seconds is not None:
        out += family(f"{p}model_load_seconds", "gauge", "Seconds the last model load took.",
                      [sample(f"{p}model_load_seconds", {}, round(box.model_load_seconds, 3))])
    return "\n".join(out) + "\n"


def generation_report(route: str, status: int, seconds: float | None, completion: Any = None) -> dict[str, Any]:
    """The report of one finished request; completion is the engine's Completion, if it generated."""
    report: dict[str, Any] = {"route": route, "status": status,
                              "seconds": None if seconds is None else round(seconds, 6)}
    if completion is not None:
        report.update(prompt_tokens=completion.prompt_tokens, completion_tokens=completion.completion_tokens,
                      cached_tokens=completion.cached_tokens,
                      first_token_seconds=round(completion.queue_seconds + completion.prompt_seconds, 6))
        if completion.generation_seconds > 0 and completion.completion_tokens:
            report["tokens_per_second"] = round(completion.completion_tokens / completion.generation_seconds, 3)
    return report


def accept_queue_length(listener: socket.socket) -> int | None:
    """Connections waiting in a listening TCP socket's accept queue (Linux: tcp_info's unacked
    field holds it for a listening socket); None where that cannot be read (system.tcp_info)."""
    if not system.tcp_info():
        return None
    try:
        return struct.unpack_from("I", listener.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 104), 24)[0]
    except (OSError, AttributeError, struct.error):
        return None
