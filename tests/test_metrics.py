"""Metrics: the totals, the text format (parsed by Prometheus' own parser, and promtool when it is
installed), the /metrics route and its API key, the engine's generation slots."""

from __future__ import annotations

import shutil
import subprocess
import threading

import pytest
from prometheus_client.parser import text_string_to_metric_families

from apiserver.api import dispatch
from apiserver.metrics import Box, Totals, generation_report, render
from apiserver.protocol import SlotRefused
from fake_model import FakeModel
from unit_helpers import json_body, make_app, make_request


def families(text: str) -> dict[str, object]:
    return {family.name: family for family in text_string_to_metric_families(text)}


def sample_value(text: str, name: str, **labels: str) -> float:
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and all(sample.labels.get(key) == value for key, value in labels.items()):
                return sample.value
    raise AssertionError(f"no sample {name} {labels} in:\n{text}")


def box(**fields: object) -> Box:
    defaults = dict(model="m.gguf", started_wall=1.0e9, workers={"active": 1, "ready": 1}, restarts={"crash": 2},
                    crashes=2, running=1, waiting=3, slots=2, backlog=4, model_load_seconds=1.5)
    defaults.update(fields)
    return Box(**defaults)


def test_totals_render_as_prometheus_text_that_its_parser_reads() -> None:
    totals = Totals()
    for seconds in (0.2, 3.0):
        totals.add({"route": "/v1/chat/completions", "status": 200, "seconds": seconds, "prompt_tokens": 10,
                    "completion_tokens": 20, "first_token_seconds": 0.3, "tokens_per_second": 40.0})
    totals.add({"route": "/health", "status": 200, "seconds": 0.001})
    totals.add({"route": 'we"ird\\path\n', "status": 404, "seconds": None})
    text = render(totals, box())
    found = families(text)
    assert found["gpt4all_api_requests"].type == "counter"
    assert sample_value(text, "gpt4all_api_requests_total", route="/v1/chat/completions", status="200") == 2
    assert sample_value(text, "gpt4all_api_requests_total", route='we"ird\\path\n', status="404") == 1
    assert sample_value(text, "gpt4all_api_prompt_tokens_total") == 20
    assert sample_value(text, "gpt4all_api_generated_tokens_total") == 40
    assert found["gpt4all_api_request_duration_seconds"].type == "histogram"
    assert sample_value(text, "gpt4all_api_request_duration_seconds_bucket", route="/v1/chat/completions", le="0.25") == 1
    assert sample_value(text, "gpt4all_api_request_duration_seconds_bucket", route="/v1/chat/completions", le="+Inf") == 2
    assert sample_value(text, "gpt4all_api_request_duration_seconds_sum", route="/v1/chat/completions") == 3.2
    assert sample_value(text, "gpt4all_api_time_to_first_token_seconds_count") == 2
    assert sample_value(text, "gpt4all_api_tokens_per_second") == 40.0
    assert sample_value(text, "gpt4all_api_queue_depth") == 3
    assert sample_value(text, "gpt4all_api_generations_running") == 1
    assert sample_value(text, "gpt4all_api_backlog_connections") == 4
    assert sample_value(text, "gpt4all_api_workers", state="ready") == 1
    assert sample_value(text, "gpt4all_api_restarts_total", cause="crash") == 2
    assert sample_value(text, "gpt4all_api_restarts_total", cause="planned") == 0
    assert sample_value(text, "gpt4all_api_crashes_total") == 2
    assert sample_value(text, "gpt4all_api_model_load_seconds") == 1.5


def test_a_malformed_report_counts_what_it_can_and_never_raises() -> None:
    totals = Totals()
    for report in ({}, {"route": 5, "status": "x", "seconds": "slow", "prompt_tokens": -3, "completion_tokens": True},
                   {"seconds": float("nan"), "tokens_per_second": -1}):
        totals.add(report)
    text = render(totals, box())
    assert sample_value(text, "gpt4all_api_requests_total", route="other", status="0") == 3
    assert sample_value(text, "gpt4all_api_prompt_tokens_total") == 0
    assert sample_value(text, "gpt4all_api_tokens_per_second") == 0


def test_route_labels_are_capped() -> None:
    totals = Totals()
    for index in range(200):
        totals.add({"route": f"/r{index}", "status": 200, "seconds": 0.1})
    assert len({route for route, _ in totals.requests}) <= 65


@pytest.mark.skipif(not shutil.which("promtool"), reason="promtool (Prometheus) is not installed")
def test_promtool_accepts_the_text() -> None:
    totals = Totals()
    totals.add({"route": "/v1/completions", "status": 200, "seconds": 0.5, "completion_tokens": 3})
    result = subprocess.run(["promtool", "check", "metrics"], input=render(totals, box()), text=True,
                            capture_output=True)
    assert result.returncode == 0, result.stdout + result.stderr


def test_the_lone_server_route_answers_and_the_api_key_applies_unless_metrics_public(settings) -> None:
    app = make_app(settings, FakeModel(), api_key="k")
    app.metrics_text = lambda: render(Totals(), box())
    assert dispatch(app, make_request("GET", "/metrics")).status == 401
    reply = dispatch(app, make_request("GET", "/metrics", headers={"authorization": "Bearer k"}))
    assert reply.status == 200 and reply.headers["Content-Type"].startswith("text/plain; version=0.0.4")
    assert dispatch(app, make_request("GET", "/health")).status == 200
    public = make_app(settings, FakeModel(), api_key="k", metrics_public=True)
    public.metrics_text = lambda: "x 1\n"
    assert dispatch(public, make_request("GET", "/metrics")).status == 200
    assert dispatch(public, make_request("GET", "/v1/models")).status == 401
    public.metrics_text = lambda: None  # the watchdog did not answer
    reply = dispatch(public, make_request("GET", "/metrics"))
    assert reply.status == 503 and json_body(reply)["error"]["code"] == "metrics_unavailable"


def test_a_generation_reports_its_tokens_and_route(settings) -> None:
    app = make_app(settings, FakeModel())
    request = make_request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]})
    assert dispatch(app, request).status == 200
    report = generation_report(request.route, 200, 0.5, request.completion)
    assert report["route"] == "/v1/chat/completions" and report["completion_tokens"] == 2
    assert report["prompt_tokens"] > 0 and report["first_token_seconds"] >= 0


class Gate:
    """A fake box: answers acquire_slot from a script."""

    def __init__(self, answer: object) -> None:
        self.answer, self.released = answer, 0
        self.asked = threading.Event()

    def acquire_slot(self, still_wanted) -> int:
        self.asked.set()
        if isinstance(self.answer, Exception):
            raise self.answer
        return self.answer

    def release_slot(self) -> None:
        self.released += 1


@pytest.mark.parametrize("answer, status, code", [(1, 200, None), (SlotRefused(), 503, "queue_full")])
def test_a_generation_waits_for_a_slot_of_the_box(settings, answer: object, status: int, code: str) -> None:
    app = make_app(settings, FakeModel())
    gate = app.runner.gate = Gate(answer)
    reply = dispatch(app, make_request("POST", "/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}]}))
    assert reply.status == status and gate.asked.is_set()
    assert gate.released == (1 if status == 200 else 0)
    if code:
        assert json_body(reply)["error"]["code"] == code


def test_the_free_cores_are_divided_by_the_generations_running_on_the_box(settings) -> None:
    app = make_app(settings, FakeModel())
    runner = app.runner
    calls: list[int] = []

    class Share:
        cpus, others, threads = [0, 1, 2, 3], 0.0, 4

        def update(self, generating: bool = False) -> int:
            return 4

    runner.cpu_share, runner.threads = Share(), 4
    runner.model.model.set_thread_count = calls.append
    runner.busy = True
    runner.set_running_on_box(2)
    runner.adapt_threads(generating=True)
    runner.set_running_on_box(3)
    runner.adapt_threads(generating=True)
    runner.busy = False
    runner.adapt_threads()
    assert calls == [2, 1, 4]
