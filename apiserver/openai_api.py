"""The OpenAI-compatible API: `/v1/models`, `/v1/models/{id}`, `/v1/chat/completions` and
`/v1/completions` (also without the `/v1` prefix), whole or streamed as Server-Sent Events, with
tool calls and JSON mode.

Owns the routes, OpenAI's request fields (openai_fields.py reads them), the reply shapes (tool calls
with arguments as a JSON string, n choices, system_fingerprint) and the SSE framing of
api.TokenBatcher's stream; errors in the shape of api.error_reply, which is OpenAI's. Imports
settings, engine, api, tool_formats, chat and openai_fields.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from typing import Any, Callable

from apiserver.api import App, Reply, Request, Route, as_api_error, error_reply, json_reply
from apiserver.chat import StreamedAnswer, answer_once
from apiserver.engine import ClientGone, Completion
from apiserver.openai_fields import OpenAIRequest, parse_chat_request, parse_completion_request, system_fingerprint
from apiserver.settings import Settings
from apiserver.tool_formats import ToolCall

log = logging.getLogger("gpt4all_api")

SSE_HEADERS = {"Content-Type": "text/event-stream; charset=utf-8", "Cache-Control": "no-cache",
               "X-Accel-Buffering": "no"}


def model_object(app: App) -> dict[str, Any]:
    return {"id": app.settings.model_id, "object": "model", "created": int(app.started_wall), "owned_by": "gpt4all_api"}


def handle_models(app: App, request: Request) -> Reply:
    return json_reply(200, {"object": "list", "data": [model_object(app)]})


def handle_model(app: App, request: Request) -> Reply:
    app.check_model_name(request.path.split("/models/", 1)[1])
    return json_reply(200, model_object(app))


def handle_chat_completions(app: App, request: Request) -> Reply:
    return openai_completion(app, request, parse_chat_request(app, request))


def handle_completions(app: App, request: Request) -> Reply:
    return openai_completion(app, request, parse_completion_request(app, request))


def tool_call_object(call: ToolCall, index: int | None = None) -> dict[str, Any]:
    head = {} if index is None else {"index": index}
    return {**head, "id": call.id, "type": "function",
            "function": {"name": call.name, "arguments": json.dumps(call.arguments, ensure_ascii=False)}}


def openai_completion(app: App, request: Request, oai: OpenAIRequest) -> Reply:
    """Answer in OpenAI's shapes, whole or as Server-Sent Events."""
    app.require_runner()  # 503 while loading, before a stream opens
    head = {"id": ("chatcmpl-" if oai.is_chat else "cmpl-") + uuid.uuid4().hex, "created": int(time.time()),
            "model": app.settings.model_id, "object": oai.object_name(), "system_fingerprint": system_fingerprint(app)}
    if oai.stream:
        reply = Reply(200, dict(SSE_HEADERS))
        reply.stream = EventStream(app, request, oai, head, reply)
        return reply
    choices, usage = [], new_usage()
    for index in range(oai.n):
        answer = answer_once(app, request, oai.chat)
        add_usage(usage, answer.completion)
        if not oai.is_chat:
            choices.append({"index": index, "text": answer.text, "logprobs": None, "finish_reason": answer.finish})
            continue
        message: dict[str, Any] = {"role": "assistant", "content": answer.text or (None if answer.calls else "")}
        if answer.calls:
            message["tool_calls"] = [tool_call_object(call) for call in answer.calls]
        choices.append({"index": index, "message": message, "logprobs": None, "finish_reason": answer.finish})
    reply = json_reply(200, {**head, "choices": choices, "usage": usage})
    reply.usage = usage
    return reply


def new_usage() -> dict[str, Any]:
    return {"prompt_tokens": 0, "completion_tokens": 0, "total_tokens": 0, "prompt_tokens_details": {"cached_tokens": 0}}


def add_usage(usage: dict[str, Any], completion: Completion) -> None:
    """Sum a completion into usage; cached_tokens: its prompt tokens the evaluated system prompt spared."""
    for key, value in completion.usage().items():
        usage[key] += value
    usage["prompt_tokens_details"]["cached_tokens"] += completion.cached_tokens


class EventStream:
    """The answers as Server-Sent Events, one choice after another: (chat) a role chunk, the text as
    TokenBatcher groups it, the tool calls once the answer has ended, the finish chunk; then the
    usage chunk when asked, and [DONE]. With tools offered, text that may begin a call is held back
    until it is known to be one (or not). An error after the first event becomes the last event;
    before it, it propagates and becomes an ordinary error reply."""

    def __init__(self, app: App, request: Request, oai: OpenAIRequest, head: dict[str, Any], reply: Reply):
        self.app, self.request, self.oai, self.chat, self.head, self.reply = app, request, oai, oai.chat, head, reply
        self.emit: Callable[[bytes], None] = lambda data: None
        self.opened = False
        self.index = 0
        self.role_sent = -1  # the last choice whose role chunk has left

    def __call__(self, emit: Callable[[bytes], None]) -> None:
        self.emit = emit
        chat, oai = self.chat, self.oai
        usage = new_usage()
        try:
            for self.index in range(oai.n):
                answer, rest = StreamedAnswer(chat, lambda text: self.send_choice(text, None)).run(
                    self.app, self.request)
                completion = answer.completion
                if rest:
                    self.send_choice(rest, None)
                for number, call in enumerate(answer.calls):
                    self.send_delta({"tool_calls": [tool_call_object(call, number)]})
                self.send_choice(None if oai.is_chat else "", answer.finish)
                add_usage(usage, completion)
            if oai.include_usage:
                self.send([], usage=usage)
            emit(b"data: [DONE]\n\n")
            self.reply.usage.update(usage)
        except ClientGone:
            raise
        except Exception as error:
            if not self.opened:
                raise
            self.emit(b"data: " + error_reply(as_api_error(error, f"streaming {self.request.path}")).body + b"\n\n")

    def send_delta(self, delta: dict[str, Any], finish: str | None = None) -> None:
        """A chat chunk of this choice; its role chunk goes first."""
        if self.role_sent < self.index:
            self.role_sent = self.index
            self.send_delta({"role": "assistant", "content": ""})
        self.send([{"index": self.index, "delta": delta, "logprobs": None, "finish_reason": finish}])

    def send_choice(self, text: str | None, finish: str | None) -> None:
        if not self.oai.is_chat:
            self.send([{"index": self.index, "text": text or "", "logprobs": None, "finish_reason": finish}])
        else:
            self.send_delta({"content": text} if text is not None else {}, finish)

    def send(self, choices: list[dict[str, Any]], **extra: Any) -> None:
        self.opened = True
        document = {**self.head, "choices": choices, **({"usage": None} if self.oai.include_usage else {}), **extra}
        self.emit(b"data: " + json.dumps(document, ensure_ascii=False).encode("utf-8") + b"\n\n")


def routes(settings: Settings) -> list[Route]:
    """The /v1 routes, and the same without the prefix, for clients whose base URL has none."""
    table = []
    for prefix in ("/v1", ""):
        table += [Route(f"{prefix}/models", {"GET": handle_models}),
                  Route(f"{prefix}/chat/completions", {"POST": handle_chat_completions}),
                  Route(f"{prefix}/completions", {"POST": handle_completions}),
                  Route(f"{prefix}/models/", {"GET": handle_model}, prefix=True)]
    return table
