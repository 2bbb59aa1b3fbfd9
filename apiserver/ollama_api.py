"""The Ollama-compatible API, for the apps that speak only Ollama's (Open WebUI, Home Assistant,
Continue, the `ollama` clients): `/api/chat`, `/api/generate`, `/api/tags`, `/api/ps`, `/api/show`,
`/api/version`, `/api/pull`, `/api/create`, and `GET /` answering "Ollama is running".

Owns Ollama's request fields (`options`, `format`, `keep_alive`), its reply shapes (durations in
nanoseconds, tool call arguments as objects), its NDJSON stream framing (on by default) and its
error shape {"error": "…"}. Field names and types follow Ollama's docs/api.md. Imports settings,
engine, api, fields, model_facts, tool_formats and chat.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from typing import Any, Callable

from apiserver.api import ApiError, App, Reply, Request, Route, as_api_error, json_reply
from apiserver.chat import Answer, ChatRequest, StreamedAnswer, answer_once, build_chat
from apiserver.engine import ClientGone, GenerationParams
from apiserver.fields import parse_body_fields, parse_generation_params, read_flag, read_text
from apiserver.json_output import check_schema
from apiserver.model_facts import model_description, rfc3339
from apiserver.settings import Settings
from apiserver.tool_formats import ToolCall

OLLAMA_VERSION = "0.6.8"  # the Ollama release whose API this one follows
NDJSON_HEADERS = {"Content-Type": "application/x-ndjson", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
OPTION_FIELDS = {"num_predict": "max_tokens", "temperature": "temperature", "top_k": "top_k", "top_p": "top_p",
                 "min_p": "min_p", "repeat_penalty": "repeat_penalty", "repeat_last_n": "repeat_last_n",
                 "stop": "stop"}


def ollama_error(error: ApiError) -> Reply:
    """Ollama's error shape: {"error": "…"}, with the status the other APIs give."""
    return json_reply(error.status, {"error": error.message}, error.headers)


def model_name(app: App) -> str:
    return f"{app.settings.model_file.stem}:latest"


def check_model(app: App, name: Any) -> None:
    """name:latest and the bare name both match the served model; model_names decides the rest."""
    if not isinstance(name, str) or not name:
        raise ApiError(400, "'model' is required", "missing_field", "model")
    try:
        app.check_model_name(name[:-len(":latest")] if name.endswith(":latest") else name)
    except ApiError:
        raise ApiError(404, f"model '{name}' not found", "model_not_found", "model") from None


def parse_options(app: App, fields: dict[str, Any]) -> GenerationParams:
    """Ollama's options onto the shared sampling fields; unknown options are ignored."""
    options = fields.get("options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'options' must be an object", "invalid_type", "options")
    num_ctx = options.get("num_ctx")
    if num_ctx is not None and (isinstance(num_ctx, bool) or not isinstance(num_ctx, int)):
        raise ApiError(400, f"options.num_ctx must be an integer, got {json.dumps(num_ctx)}", "invalid_type",
                       "options.num_ctx")
    if num_ctx is not None and num_ctx > app.settings.n_ctx:
        raise ApiError(400, f"options.num_ctx {num_ctx} is larger than the loaded context of {app.settings.n_ctx} "
                            "tokens ([model] n_ctx)", "invalid_value", "options.num_ctx")
    sampling = {ours: options[theirs] for theirs, ours in OPTION_FIELDS.items() if options.get(theirs) is not None}
    if sampling.get("max_tokens") in (-1, -2):  # -1: no limit, -2: fill the context: our limit
        sampling["max_tokens"] = app.settings.max_tokens_limit
    try:
        return parse_generation_params(sampling, app.settings)
    except ApiError as error:  # named with Ollama's option names
        theirs = next((theirs for theirs, ours in OPTION_FIELDS.items() if ours == error.param), error.param)
        message = error.message.replace(f"'{error.param}'", f"options.{theirs}")
        raise ApiError(error.status, message, error.code, f"options.{theirs}") from None


def parse_format(fields: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """format: "json", or a JSON schema object."""
    value = fields.get("format")
    if value in (None, ""):
        return False, None
    if value == "json":
        return True, None
    if isinstance(value, dict) and not check_schema(value):
        return True, value
    raise ApiError(400, "'format' must be \"json\" or a JSON schema object", "invalid_value", "format")


def unloading(fields: dict[str, Any]) -> bool:
    return fields.get("keep_alive") in (0, "0", "0s", "0m")


def parse_messages(fields: dict[str, Any]) -> list[dict[str, Any]]:
    messages = fields.get("messages")
    if messages is None:
        return []
    if not isinstance(messages, list):
        raise ApiError(400, "'messages' must be a list", "invalid_type", "messages")
    parsed = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or message.get("role") not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"messages[{index}] must have a role of system, user, assistant or tool",
                           "invalid_value", f"messages[{index}]")
        content = message.get("content") or ""
        if not isinstance(content, str):
            raise ApiError(400, f"messages[{index}].content must be a string", "invalid_type", f"messages[{index}]")
        item: dict[str, Any] = {"role": message["role"], "content": content}
        calls = message.get("tool_calls") or []
        if message["role"] == "assistant" and calls:
            functions = [call.get("function") if isinstance(call, dict) else None for call in calls] \
                if isinstance(calls, list) else [None]
            if not all(isinstance(function, dict) and isinstance(function.get("name"), str)
                       and isinstance(function.get("arguments", {}), dict) for function in functions):
                raise ApiError(400, f"messages[{index}].tool_calls must be [{{\"function\": {{\"name\", "
                                    "\"arguments\": {{…}}}}}}]", "invalid_value", f"messages[{index}]")
            item["tool_calls"] = [ToolCall(function["name"], function.get("arguments") or {})
                                  for function in functions if isinstance(function, dict)]
        parsed.append(item)
    return parsed


def done_fields(answer: Answer, started: float) -> dict[str, Any]:
    """The final object's counts as Ollama gives them: prompt_eval_count is the whole prompt, its
    cached part (reused, not evaluated) in prompt_eval_cached_count when there is one (Ollama's
    own field since its prompt caching; older clients ignore it)."""
    completion = answer.completion
    fields = {"done_reason": "length" if answer.finish == "length" else "stop", "done": True,
              "total_duration": int((time.monotonic() - started) * 1e9), "load_duration": 0,
              "prompt_eval_count": completion.prompt_tokens,
              "prompt_eval_duration": int(completion.prompt_seconds * 1e9), "eval_count": completion.completion_tokens,
              "eval_duration": int(completion.generation_seconds * 1e9)}
    if completion.cached_tokens:
        fields["prompt_eval_cached_count"] = completion.cached_tokens
    return fields


def handle_chat(app: App, request: Request) -> Reply:
    fields = parse_body_fields(request)
    check_model(app, fields.get("model"))
    messages = parse_messages(fields)
    if not messages:  # apps load (and unload) a model this way
        return json_reply(200, {"model": fields["model"], "created_at": rfc3339(), "message": {
            "role": "assistant", "content": ""}, "done_reason": "unload" if unloading(fields) else "load",
            "done": True})
    tools = fields.get("tools") or []
    if not isinstance(tools, list) or not all(
            isinstance(tool, dict) and isinstance(tool.get("function"), dict) and isinstance(tool["function"].get("name"), str)
            and isinstance(tool["function"].get("parameters", {}), dict) for tool in tools):
        raise ApiError(400, "'tools' must be a list of {\"type\": \"function\", \"function\": {\"name\", …}}",
                       "invalid_value", "tools")
    json_mode, schema = parse_format(fields)
    chat = build_chat(app, messages, parse_options(app, fields), tools=tools, choice="auto" if tools else "none",
                      json_mode=json_mode, json_schema=schema)
    return ollama_answer(app, request, fields, chat, chat_shape=True)


def handle_generate(app: App, request: Request) -> Reply:
    fields = parse_body_fields(request)
    check_model(app, fields.get("model"))
    prompt = read_text(fields, "prompt", default="")
    if fields.get("suffix"):
        raise ApiError(400, "'suffix' (fill in the middle) is not supported by this server's model runner",
                       "unsupported_value", "suffix")
    if not prompt:
        return json_reply(200, {"model": fields["model"], "created_at": rfc3339(), "response": "",
                                "done_reason": "unload" if unloading(fields) else "load", "done": True})
    json_mode, schema = parse_format(fields)
    params = parse_options(app, fields)
    if read_flag(fields, "raw"):
        if json_mode:
            raise ApiError(400, "'format' needs the chat template: leave raw out", "unsupported_value", "format")
        chat = ChatRequest(prompt, params)
    else:
        system = read_text(fields, "system", default=app.settings.system_prompt)
        messages = ([{"role": "system", "content": system}] if system else []) + [{"role": "user", "content": prompt}]
        chat = build_chat(app, messages, params, json_mode=json_mode, json_schema=schema)
    return ollama_answer(app, request, fields, chat, chat_shape=False)


def ollama_answer(app: App, request: Request, fields: dict[str, Any], chat: ChatRequest, chat_shape: bool) -> Reply:
    """The answer, streamed as NDJSON (Ollama's default) or as one object."""
    app.require_runner()
    started = time.monotonic()
    stream = read_flag(fields, "stream", default=True)
    framing = Framing(str(fields["model"]), chat_shape)
    if stream:
        reply = Reply(200, dict(NDJSON_HEADERS))
        reply.stream = LineStream(app, request, chat, framing, started, reply)
        return reply
    answer = answer_once(app, request, chat)
    reply = json_reply(200, {**framing.piece(answer.text, answer.calls), **done_fields(answer, started)})
    reply.usage = answer.completion.usage()
    return reply


class Framing:
    """One line of Ollama's answer: {"model", "created_at", "message" | "response", "done": false}."""

    def __init__(self, model: str, chat_shape: bool):
        self.model, self.chat_shape = model, chat_shape

    def piece(self, text: str, calls: Sequence[ToolCall] = ()) -> dict[str, Any]:
        head = {"model": self.model, "created_at": rfc3339()}
        if not self.chat_shape:
            return {**head, "response": text, "done": False}
        message: dict[str, Any] = {"role": "assistant", "content": text}
        if calls:
            message["tool_calls"] = [{"function": {"name": call.name, "arguments": call.arguments}} for call in calls]
        return {**head, "message": message, "done": False}


class LineStream:
    """The answer as NDJSON lines as TokenBatcher groups it, tool calls once the answer has ended,
    then the final line with done and the durations. An error after the first line is a last line
    {"error": …}; before it, an ordinary error reply."""

    def __init__(self, app: App, request: Request, chat: ChatRequest, framing: Framing, started: float, reply: Reply):
        self.app, self.request, self.chat, self.framing, self.started, self.reply = app, request, chat, framing, \
            started, reply
        self.emit: Callable[[bytes], None] = lambda data: None
        self.opened = False

    def __call__(self, emit: Callable[[bytes], None]) -> None:
        self.emit = emit
        try:
            answer, rest = StreamedAnswer(self.chat, lambda text: self.send(self.framing.piece(text))).run(
                self.app, self.request)
            if rest or answer.calls:
                self.send(self.framing.piece(rest, answer.calls))
            last = {**self.framing.piece(""), **done_fields(answer, self.started)}
            self.send(last)
            self.reply.usage.update(answer.completion.usage())
        except ClientGone:
            raise
        except Exception as error:
            if not self.opened:
                raise
            self.send({"error": as_api_error(error, f"streaming {self.request.path}").message})

    def send(self, document: dict[str, Any]) -> None:
        self.opened = True
        self.emit(json.dumps(document, ensure_ascii=False).encode("utf-8") + b"\n")


def handle_tags(app: App, request: Request) -> Reply:
    return json_reply(200, {"models": [model_description(app.settings, model_name(app))]})


def handle_ps(app: App, request: Request) -> Reply:
    description = model_description(app.settings, model_name(app))
    expires = rfc3339(time.time() + 3600 * 24 * 365)  # loaded for as long as the server runs
    return json_reply(200, {"models": [{**description, "expires_at": expires, "size_vram": 0}]})


def handle_show(app: App, request: Request) -> Reply:
    fields = parse_body_fields(request)
    check_model(app, fields.get("model", fields.get("name")))
    description = model_description(app.settings, model_name(app), with_info=True)
    template = app.require_runner().template
    settings = app.settings
    parameters = "\n".join(f"{name:<15} {value}" for name, value in (
        ("temperature", settings.temperature), ("top_k", settings.top_k), ("top_p", settings.top_p),
        ("repeat_penalty", settings.repeat_penalty), ("num_ctx", settings.n_ctx), ("stop", json.dumps(template.end))))
    return json_reply(200, {
        "modelfile": f"FROM {settings.model_file}\nSYSTEM \"\"\"{settings.system_prompt}\"\"\"\n{parameters}\n",
        "parameters": parameters, "template": description.pop("chat_template", ""),
        "details": description["details"], "model_info": description.pop("model_info", {}),
        "capabilities": ["completion", "tools"], "modified_at": description["modified_at"]})


def handle_version(app: App, request: Request) -> Reply:
    return json_reply(200, {"version": OLLAMA_VERSION})


def handle_root(app: App, request: Request) -> Reply:
    return Reply(200, {"Content-Type": "text/plain; charset=utf-8"}, b"Ollama is running")


def handle_pull(app: App, request: Request) -> Reply:
    """Pull or create the served model: nothing to do (another model is a 404). Home Assistant pulls a
    model it does not see listed."""
    fields = parse_body_fields(request)
    check_model(app, fields.get("model", fields.get("name")))
    return json_reply(200, {"status": "success"})


def routes(settings: Settings) -> list[Route]:
    table = {"/api/chat": {"POST": handle_chat}, "/api/generate": {"POST": handle_generate},
             "/api/tags": {"GET": handle_tags}, "/api/ps": {"GET": handle_ps}, "/api/show": {"POST": handle_show},
             "/api/version": {"GET": handle_version}, "/api/pull": {"POST": handle_pull},
             "/api/create": {"POST": handle_pull}, "/": {"GET": handle_root}}
    return [Route(path, methods, error_reply=ollama_error) for path, methods in table.items()]
