"""GET /metrics: the box's metrics in Prometheus' text format.

Owns the route: the API key applies as on every route but /health, unless [server]
metrics_public = true. The text comes from App.metrics_text, which the process sets (the
watchdog's totals through the control channel, or the lone server's own). Imports settings, api
and metrics.
"""

from __future__ import annotations

from apiserver.api import ApiError, App, Reply, Request, Route
from apiserver.metrics import CONTENT_TYPE
from apiserver.settings import Settings


def handle_metrics(app: App, request: Request) -> Reply:
    text = app.metrics_text()
    if text is None:
        raise ApiError(503, "the watchdog did not answer with the metrics in time; retry", "metrics_unavailable",
                       headers={"Retry-After": "1"})
    return Reply(200, {"Content-Type": CONTENT_TYPE}, text.encode("utf-8"))


def routes(settings: Settings) -> list[Route]:
    return [Route("/metrics", {"GET": handle_metrics}, public=lambda settings: settings.metrics_public)]
