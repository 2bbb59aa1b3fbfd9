"""The OpenAI-compatible API: `/v1/models`, `/v1/models/{id}`, `/v1/chat/completions` and
`/v1/completions`, whole or streamed as Server-Sent Events.

Owns the routes, OpenAI's request fields (messages, n, seed, penalties, stream_options), the reply
shapes and the SSE framing of api.TokenBatcher's stream; errors in the shape of api.error_reply,
which is OpenAI's. Imports settings, engine, api and fields.
"""

from __future__ import annotations

import dataclasses
import json
import time
import uuid
from typing import Any, Callable, Dict, List, Optional, Tuple

from apiserver.api import (ApiError, App, Reply, Request, Route, TokenBatcher, as_api_error, error_reply,
                           json_reply)
from apiserver.engine import ClientGone, GenerationParams
from apiserver.fields import parse_body_fields, parse_generation_params, read_flag, read_number
from apiserver.settings import Settings

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def model_object(app: App) -> Dict[str, Any]:
    return {"id": app.settings.model_id, "object": "model", "created": int(app.started_wall), "owned_by": "gpt4all_api"}


def handle_models(app: App, request: Request) -> Reply:
    return json_reply(200, {"object": "list", "data": [model_object(app)]})


def handle_model(app: App, request: Request) -> Reply:
    app.check_model_name(request.path[len("/v1/models/"):])
    return json_reply(200, model_object(app))


def parse_messages(fields: Dict[str, Any]) -> List[Dict[str, str]]:
    """OpenAI chat messages -> [{"role", "content"}] with text content."""
    messages = fields.get("messages")
    if not isinstance(messages, list) or not messages:
        raise ApiError(400, "'messages' must be a non-empty list", "invalid_value", "messages")
    parsed = []
    for index, message in enumerate(messages):
        param = f"messages[{index}]"
        if not isinstance(message, dict):
            raise ApiError(400, f"'{param}' must be an object", "invalid_type", param)
        role = message.get("role")
        if role == "developer":
            role = "system"
        if role not in ("system", "user", "assistant"):
            raise ApiError(400, f"'{param}.role' must be system, developer, user or assistant, got "
                                f"{json.dumps(role)}", "invalid_value", param)
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        if isinstance(content, list):
            if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                       for part in content):
                raise ApiError(400, f"'{param}.content' parts must be text parts", "invalid_value", param)
            content = "".join(part["text"] for part in content)
        if not isinstance(content, str):
            raise ApiError(400, f"'{param}.content' must be a string", "invalid_type", param)
        parsed.append({"role": role, "content": content})
    return parsed


def parse_openai_params(fields: Dict[str, Any], settings: Settings) -> GenerationParams:
    """The sampling fields, with OpenAI's names: max_completion_tokens, and the presence and frequency
    penalties mapped onto gpt4all's single repeat penalty (see the README)."""
    max_tokens = read_number(fields, "max_tokens", int, settings.max_tokens, 1, 1 << 31)
    max_tokens = read_number(fields, "max_completion_tokens", int, max_tokens, 1, 1 << 31)
    presence = read_number(fields, "presence_penalty", float, 0.0, -2.0, 2.0)
    frequency = read_number(fields, "frequency_penalty", float, 0.0, -2.0, 2.0)
    repeat_penalty = 1.0 + max(presence, frequency) / 2 if max(presence, frequency) > 0 else None
    params = parse_generation_params(fields, settings, repeat_penalty=repeat_penalty)
    return dataclasses.replace(params, max_tokens=min(max_tokens, settings.max_tokens_limit))


def parse_openai_fields(app: App, request: Request) -> Tuple[Dict[str, Any], GenerationParams, bool, bool]:
    """The fields both OpenAI routes share: (fields, params, stream, include_usage)."""
    fields = parse_body_fields(request)
    if fields.get("model") is not None:
        app.check_model_name(fields["model"])
    if read_number(fields, "n", int, 1, 1, 128) != 1:
        raise ApiError(400, "only n = 1 is supported", "unsupported_value", "n")
    read_number(fields, "seed", int, 0, -(1 << 63), 1 << 64)  # accepted; temperature 0 gives reproducibility
    if fields.get("logprobs") or fields.get("tools"):
        raise ApiError(400, "logprobs and tools are not supported", "unsupported_value")
    options = fields.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "invalid_type", "stream_options")
    params = parse_openai_params(fields, app.settings)
    return fields, params, read_flag(fields, "stream"), read_flag(options, "include_usage")


def handle_chat_completions(app: App, request: Request) -> Reply:
    fields, params, stream, include_usage = parse_openai_fields(app, request)
    prompt, params = app.chat_prompt(parse_messages(fields), params)
    return openai_completion(app, request, prompt, params, Shape(chat=True, stream=stream), include_usage)


def handle_completions(app: App, request: Request) -> Reply:
    fields, params, stream, include_usage = parse_openai_fields(app, request)
    prompt = fields.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string (or a list of one)", "invalid_value", "prompt")
    return openai_completion(app, request, prompt, params, Shape(chat=False, stream=stream), include_usage)


@dataclasses.dataclass(frozen=True)
class Shape:
    """Which of OpenAI's four answer shapes: chat or text completion, whole or streamed."""
    chat: bool
    stream: bool

    def choice(self, text: Optional[str], finish: Optional[str], role: bool = False) -> Dict[str, Any]:
        reason = None if finish is None else ("length" if finish == "timeout" else finish)
        if not self.chat:
            return {"index": 0, "text": text or "", "logprobs": None, "finish_reason": reason}
        content = {"content": text} if text is not None else {}
        key = "delta" if self.stream else "message"
        return {"index": 0, key: ({"role": "assistant"} if role else {}) | content, "logprobs": None,
                "finish_reason": reason}

    def object_name(self) -> str:
        if self.chat:
            return "chat.completion.chunk" if self.stream else "chat.completion"
        return "text_completion"


def openai_completion(app: App, request: Request, prompt: str, params: GenerationParams, shape: Shape,
                      include_usage: bool) -> Reply:
    """Answer in OpenAI's shapes, whole or as Server-Sent Events."""
    app.require_runner()  # 503 while loading, before a stream opens
    head = {"id": ("chatcmpl-" if shape.chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
            "model": app.settings.model_id, "object": shape.object_name()}
    if not shape.stream:
        completion = app.complete(request, prompt, params)
        reply = json_reply(200, {**head, "choices": [shape.choice(completion.text, completion.finish_reason, role=True)],
                                 "usage": completion.usage()})
        reply.usage = completion.usage()
        return reply
    reply = Reply(200, dict(SSE_HEADERS))
    reply.stream = EventStream(app, request, prompt, params, shape, include_usage, head, reply)
    return reply


class EventStream:
    """One answer as Server-Sent Events: (chat) a role chunk, the text as TokenBatcher groups it, the
    finish chunk, the usage chunk when asked, then [DONE]. An error after the first event becomes
    the last event; before it, it propagates and becomes an ordinary error reply."""

    def __init__(self, app: App, request: Request, prompt: str, params: GenerationParams, shape: Shape,
                 include_usage: bool, head: Dict[str, Any], reply: Reply):
        self.app, self.request, self.prompt, self.params = app, request, prompt, params
        self.shape, self.include_usage, self.head, self.reply = shape, include_usage, head, reply
        self.emit: Callable[[bytes], None] = lambda data: None
        self.opened = False

    def __call__(self, emit: Callable[[bytes], None]) -> None:
        self.emit = emit
        try:
            batcher = TokenBatcher(lambda text: self.send([self.shape.choice(text, None)]))
            completion = self.app.complete(self.request, self.prompt, self.params, on_text=batcher.add)
            batcher.flush()
            self.send([self.shape.choice(None if self.shape.chat else "", completion.finish_reason)])
            if self.include_usage:
                self.send([], usage=completion.usage())
            emit(b"data: [DONE]\n\n")
            self.reply.usage.update(completion.usage())
        except ClientGone:
            raise
        except Exception as error:
            if not self.opened:
                raise
            self.emit(b"data: " + error_reply(as_api_error(error, f"streaming {self.request.path}")).body + b"\n\n")

    def send(self, choices: List[Dict[str, Any]], **extra: Any) -> None:
        if not self.opened:
            self.opened = True
            if self.shape.chat:
                self.send([self.shape.choice("", None, role=True)])
        document = {**self.head, "choices": choices, **({"usage": None} if self.include_usage else {}), **extra}
        self.emit(b"data: " + json.dumps(document, ensure_ascii=False).encode("utf-8") + b"\n\n")


def routes(settings: Settings) -> List[Route]:
    return [Route("/v1/models", {"GET": handle_models}),
            Route("/v1/chat/completions", {"POST": handle_chat_completions}),
            Route("/v1/completions", {"POST": handle_completions}),
            Route("/v1/models/", {"GET": handle_model}, prefix=True)]
