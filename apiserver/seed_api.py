"""The original project's API: `POST /gpt4all_api` ({"prompt", "persona"} -> the answer) and
`GET /health`.

Owns the two routes and their replies (text, or JSON when the client accepts it); errors in the
shape of api.error_reply. Imports settings, api and fields.
"""

from __future__ import annotations

import os
import time

from apiserver.api import App, Reply, Request, Route, json_reply
from apiserver.fields import parse_body_fields, parse_generation_params, read_text
from apiserver.settings import Settings


def handle_health(app: App, request: Request) -> Reply:
    uptime = round(time.monotonic() - app.started, 1)
    if app.runner is None:
        return json_reply(503, {"status": "loading", "pid": os.getpid(), "uptime_s": uptime}, {"Retry-After": "1"})
    return json_reply(200, {"status": "ok", "model": app.settings.model_id, "pid": os.getpid(),
                            "requests_served": app.runner.completed, "uptime_s": uptime,
                            "busy": app.runner.busy, "waiting": app.runner.waiting, "threads": app.runner.threads})


def handle_prompt(app: App, request: Request) -> Reply:
    """The original project's route: {"prompt", "persona"} -> the answer as text (or JSON)."""
    fields = parse_body_fields(request)
    prompt = read_text(fields, "prompt", required=True) or ""
    persona = read_text(fields, "persona", default=app.settings.system_prompt)
    params = parse_generation_params(fields, app.settings)
    messages = [{"role": "user", "content": prompt}]
    if persona:
        messages.insert(0, {"role": "system", "content": persona})
    completion = app.complete(request, *app.chat_prompt(messages, params), logged_prompt=prompt)
    if "application/json" in request.headers.get("accept", ""):
        reply = json_reply(200, {"response": completion.text, "model": app.settings.model_id,
                                 "finish_reason": completion.finish_reason,
                                 "usage": {**completion.usage(),
                                           "prompt_tokens_details": {"cached_tokens": completion.cached_tokens}},
                                 "timings": completion.timings()})
    else:
        reply = Reply(200, {"Content-Type": "text/plain; charset=utf-8",
                            "X-Finish-Reason": completion.finish_reason}, completion.text.encode("utf-8"))
    reply.usage = completion.usage()
    return reply


def routes(settings: Settings) -> list[Route]:
    return [Route("/health", {"GET": handle_health}), Route(settings.route, {"POST": handle_prompt})]
