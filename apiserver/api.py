"""The API core: requests, replies, errors, the App the routes share, dispatch, the token stream.

Owns Request and Reply (a route is a pure function (App, Request) -> Reply), ApiError and the JSON
error body {"error": {"message", "type", "param", "code"}}, the engine's errors turned into statuses
(the only place that does), App, the route table and dispatch() (API key, CORS, 404/405, a catch-all
500), and TokenBatcher, the one batched token stream every wire format frames. It never imports a
wire protocol: routes.py builds the table from them. Imports settings and engine.
"""

from __future__ import annotations

import dataclasses
import hmac
import json
import logging
import threading
import time
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any, Callable

from apiserver.engine import (
    ClientGone,
    Completion,
    Constraint,
    EngineError,
    GenerationParams,
    ModelRunner,
    PromptNotUnicode,
    PromptTooLong,
    QueueFull,
)
from apiserver.settings import Settings

log = logging.getLogger("gpt4all_api")

ERROR_TYPES = {401: "authentication_error", 408: "timeout_error", 500: "server_error", 503: "service_unavailable"}
OPEN_PATHS = ("/health", "/")  # answered without the API key: health, and the "is it running" probe
STREAM_GROUP_SECONDS = 0.05  # streamed tokens are sent at most this often, the first one at once


class ApiError(Exception):
    """An error that becomes a JSON reply in the shape of the API it came to."""

    def __init__(self, status: int, message: str, code: str | None = None, param: str | None = None,
                 headers: dict[str, str] | None = None):
        super().__init__(message)
        self.status, self.message, self.code, self.param = status, message, code, param
        self.headers = headers or {}


@dataclasses.dataclass
class Request:
    method: str
    path: str
    query: dict[str, str] = dataclasses.field(default_factory=dict)
    headers: dict[str, str] = dataclasses.field(default_factory=dict)  # lower-case names
    body: bytes = b""
    body_error: ApiError | None = None  # raised once the route is known to want the body
    client_alive: Callable[[], bool] = lambda: True
    # Tells the accept loop what this request is (a generation was admitted, or the reply is ready),
    # so that a worker whose restart it makes due leaves the next request to its successor.
    mark_classified: Callable[[], None] = lambda: None
    route: str = "unmatched"  # the route that served it (a metrics label)
    completion: Completion | None = None  # its generation, once finished (for the metrics)


@dataclasses.dataclass
class Reply:
    status: int
    headers: dict[str, str]
    body: bytes = b""
    # A streamed reply calls stream(emit) instead of sending body; the status line and headers
    # leave with the first emit, so an ApiError raised before it still becomes a normal reply,
    # through error_reply (the route's error shape).
    stream: Callable[[Callable[[bytes], None]], None] | None = None
    usage: dict[str, int] = dataclasses.field(default_factory=dict)  # for the access log
    error_reply: Callable[[ApiError], Reply] | None = None


def json_reply(status: int, document: Any, headers: dict[str, str] | None = None) -> Reply:
    body = json.dumps(document, ensure_ascii=False).encode("utf-8")
    return Reply(status, {"Content-Type": "application/json", **(headers or {})}, body)


def internal_error() -> ApiError:
    return ApiError(500, "internal server error; the details are in the server log", "internal_error")


def error_reply(error: ApiError) -> Reply:
    """The error body used by the original route, the OpenAI API and the transport."""
    error_type = ERROR_TYPES.get(error.status, "invalid_request_error")
    document = {"error": {"message": error.message, "type": error_type, "param": error.param, "code": error.code}}
    return json_reply(error.status, document, error.headers)


def as_api_error(error: Exception, what: str) -> ApiError:
    """An ApiError as it is; anything else is a bug: logged with its traceback, a 500."""
    if isinstance(error, ApiError):
        return error
    log.error("unexpected error while %s", what, exc_info=error)
    return internal_error()


def engine_error(error: EngineError) -> ApiError:
    """The engine's errors as statuses."""
    if isinstance(error, QueueFull):
        return ApiError(503, f"the server is busy: {error.waiting} requests are waiting; retry later",
                        "queue_full", headers={"Retry-After": "5"})
    if isinstance(error, PromptTooLong):
        return ApiError(400, f"the prompt does not fit the context window of {error.n_ctx} tokens "
                             "(prompt plus max_tokens); shorten it", "context_length_exceeded", "prompt")
    if isinstance(error, PromptNotUnicode):
        return ApiError(400, "the prompt is not valid Unicode (it holds a lone surrogate)", "invalid_value", "prompt")
    return ApiError(500, str(error), "internal_error")


class TokenBatcher:
    """The answer's text on its way to a stream: the first piece leaves at once, then the pieces
    travel in groups at most every STREAM_GROUP_SECONDS (each write wakes the client on the cores
    that generate; docs/benchmarks.md has the cost of one write per token)."""

    def __init__(self, send: Callable[[str], None]):
        self.send = send
        self.pending = ""
        self.sent_any = False
        self.sent_at = 0.0

    def add(self, text: str) -> None:
        self.pending += text
        if not self.sent_any or time.monotonic() - self.sent_at >= STREAM_GROUP_SECONDS:
            self.flush()

    def flush(self) -> None:
        if self.pending:
            text, self.pending = self.pending, ""
            self.sent_any, self.sent_at = True, time.monotonic()
            self.send(text)


# --------------------------------------------------------------------------------------------
# The App the routes share, and the route table.
# --------------------------------------------------------------------------------------------

RouteHandler = Callable[["App", Request], Reply]


@dataclasses.dataclass(frozen=True)
class Route:
    """Methods on one path (or on every path below it, with prefix) and the error shape of their API."""
    path: str
    methods: Mapping[str, RouteHandler]
    prefix: bool = False
    error_reply: Callable[[ApiError], Reply] = error_reply
    public: Callable[[Settings], bool] = lambda settings: False  # True: no API key asked


class App:
    """What the routes share: settings, the route table, the runner (None while the model loads)."""

    def __init__(self, settings: Settings, routes: Iterable[Route], not_found_hint: str = ""):
        self.settings = settings
        self.routes = {route.path: route for route in routes if not route.prefix}
        self.prefix_routes = [route for route in routes if route.prefix]
        self.not_found_hint = not_found_hint
        self.runner: ModelRunner | None = None
        self.started, self.started_wall = time.monotonic(), time.time()
        self.generations_admitted = 0
        # Called with the count after each admitted generation: the worker's restart policy.
        self.on_generation_admitted: Callable[[int], None] = lambda count: None
        # The metrics' text (metrics_api.py), or None when it cannot be had in time: set by the process.
        self.metrics_text: Callable[[], str | None] = lambda: None
        self.lock = threading.Lock()

    def find_route(self, path: str) -> Route | None:
        route = self.routes.get(path)
        if route is None:
            route = next((route for route in self.prefix_routes if path.startswith(route.path)), None)
        return route

    def admit_generation(self, request: Request) -> None:
        with self.lock:
            self.generations_admitted += 1
            count = self.generations_admitted
        self.on_generation_admitted(count)
        request.mark_classified()

    def require_runner(self) -> ModelRunner:
        if self.runner is None:
            raise ApiError(503, "the model is still loading; retry in a moment", "model_loading",
                           headers={"Retry-After": "1"})
        return self.runner

    def complete(self, request: Request, prompt: str, params: GenerationParams,
                 on_text: Callable[[str], None] | None = None, logged_prompt: str | None = None,
                 constraint: Constraint | None = None) -> Completion:
        """One generation for this request: admitted (it counts towards the restart), run, logged."""
        try:
            completion = self.require_runner().complete(prompt, params, request.client_alive, on_text=on_text,
                                                        on_admitted=lambda: self.admit_generation(request),
                                                        constraint=constraint)
        except EngineError as error:
            raise engine_error(error) from None
        request.completion = completion
        if self.settings.log_prompts:
            log.info("prompt %r -> answer %r", prompt if logged_prompt is None else logged_prompt, completion.text)
        return completion

    def chat_prompt(self, messages: list[dict[str, str]], params: GenerationParams) -> tuple[str, GenerationParams]:
        """Messages through the model's chat template; its end marker joins the stop strings."""
        template = self.require_runner().template
        return template.render(messages), dataclasses.replace(params, stop=params.stop + (template.end,))

    def check_model_name(self, name: Any) -> None:
        """A name [model] model_names does not accept gets a 404, never a silent fallback (with the
        default "*", any name is answered by the loaded model, whose real id every reply carries)."""
        model_id = self.settings.model_id
        if not isinstance(name, str):
            raise ApiError(400, f"'model' must be a string, got {json.dumps(name)}", "invalid_type", "model")
        if "*" in self.settings.model_names:
            return
        if name not in {model_id, Path(model_id).stem, self.settings.model, *self.settings.model_names}:
            raise ApiError(404, f"the model {name!r} does not exist; this server serves {model_id!r}",
                           "model_not_found", "model")


# --------------------------------------------------------------------------------------------
# Dispatch: the API key, CORS, 404 and 405, and every failure as a reply in the route's shape.
# --------------------------------------------------------------------------------------------


def check_api_key(settings: Settings, request: Request) -> None:
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise ApiError(401, "missing or wrong API key: send the header 'Authorization: Bearer <key>'",
                       "invalid_api_key", headers={"WWW-Authenticate": "Bearer"})


def cors_headers(settings: Settings, request: Request) -> dict[str, str]:
    origin = request.headers.get("origin")
    allowed = settings.cors_origins
    if not origin or not ("*" in allowed or origin in allowed):
        return {}
    headers = {"Access-Control-Allow-Origin": "*" if "*" in allowed else origin, "Vary": "Origin"}
    if request.method == "OPTIONS":
        headers.update({"Access-Control-Allow-Methods": "GET, POST, OPTIONS", "Access-Control-Max-Age": "600",
                        "Access-Control-Allow-Headers": request.headers.get("access-control-request-headers")
                        or "Authorization, Content-Type"})
    return headers


def route_request(app: App, route: Route | None, request: Request) -> Reply:
    if route is None:
        raise ApiError(404, f"no route {request.path!r}; {app.not_found_hint}", "not_found")
    allow = ", ".join(sorted(route.methods) + ["OPTIONS"])
    if request.method == "OPTIONS":
        return Reply(204, {"Allow": allow})
    handler = route.methods.get("GET" if request.method == "HEAD" else request.method)
    if handler is None:
        raise ApiError(405, f"{request.method} is not allowed on {request.path}; use {allow}",
                       "method_not_allowed", headers={"Allow": allow})
    if app.settings.api_key and request.path not in OPEN_PATHS and not route.public(app.settings):
        check_api_key(app.settings, request)
    return handler(app, request)


def dispatch(app: App, request: Request) -> Reply:
    """Route a request; every failure becomes a JSON error reply here (ClientGone excepted)."""
    route = app.find_route(request.path)
    shape = route.error_reply if route else error_reply
    if route is not None:
        request.route = route.path
    try:
        reply = route_request(app, route, request)
    except ClientGone:
        raise
    except Exception as error:
        reply = shape(as_api_error(error, f"serving {request.method} {request.path}"))
    if reply.error_reply is None:
        reply.error_reply = shape
    reply.headers.update(cors_headers(app.settings, request))
    return reply
