"""OpenAI's request fields, read into an OpenAIRequest: the chat to answer (chat.build_chat: tools,
tool_choice, response_format) and the shape of the answer (n, stream).

Owns the readers of messages (with tool calls and tool results), tools, tool_choice, response_format,
OpenAI's sampling names, and the system fingerprint. Every error names the field that is wrong.
Imports settings, engine, api, fields, tool_formats and chat.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import json
from typing import Any

from apiserver.api import ApiError, App, Request
from apiserver.chat import ChatRequest, build_chat
from apiserver.engine import GenerationParams
from apiserver.fields import parse_body_fields, parse_generation_params, read_flag, read_number
from apiserver.json_output import check_schema
from apiserver.settings import Settings
from apiserver.tool_formats import ToolCall, new_call_id

API_VERSION = "gpt4all_api-2"  # part of the system fingerprint: changes when answers may change
MAX_CHOICES = 4


@dataclasses.dataclass(frozen=True)
class OpenAIRequest:
    """One OpenAI request, read: the chat to answer and the shape of the answer."""
    chat: ChatRequest
    is_chat: bool
    stream: bool
    include_usage: bool
    n: int = 1

    def object_name(self) -> str:
        if self.is_chat:
            return "chat.completion.chunk" if self.stream else "chat.completion"
        return "text_completion"


@functools.lru_cache(maxsize=8)
def fingerprint_of(model_file: str, size: int, mtime_ns: int) -> str:
    return "fp_" + hashlib.sha256(f"{API_VERSION}:{model_file}:{size}:{mtime_ns}".encode()).hexdigest()[:10]


def system_fingerprint(app: App) -> str:
    """Stable for one model file and one version of this server."""
    try:
        stat = app.settings.model_file.stat()
        return fingerprint_of(str(app.settings.model_file), stat.st_size, stat.st_mtime_ns)
    except OSError:
        return fingerprint_of(str(app.settings.model_file), 0, 0)


def text_content(content: Any, param: str) -> str:
    if isinstance(content, list):
        if not all(isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)
                   for part in content):
            raise ApiError(400, f"'{param}.content' parts must be text parts", "invalid_value", param)
        content = "".join(part["text"] for part in content)
    if not isinstance(content, str):
        raise ApiError(400, f"'{param}.content' must be a string", "invalid_type", param)
    return content


def parse_history_call(call: Any, param: str) -> ToolCall:
    """An assistant message's tool call; arguments as a JSON string (OpenAI's shape) or an object."""
    function = call.get("function") if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise ApiError(400, f"'{param}' must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}",
                       "invalid_value", param)
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except ValueError:
            raise ApiError(400, f"'{param}.function.arguments' is not valid JSON", "invalid_value", param) from None
    if not isinstance(arguments, dict):
        raise ApiError(400, f"'{param}.function.arguments' must be a JSON object", "invalid_value", param)
    return ToolCall(function["name"], arguments, id=str(call.get("id") or new_call_id()))


def parse_messages(fields: dict[str, Any]) -> list[dict[str, Any]]:
    """OpenAI chat messages -> [{"role", "content"}] with text content, plus "tool_calls" on an
    assistant message and "tool_call_id" on a tool result."""
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
        if role not in ("system", "user", "assistant", "tool"):
            raise ApiError(400, f"'{param}.role' must be system, developer, user, assistant or tool, got "
                                f"{json.dumps(role)}", "invalid_value", param)
        content = message.get("content")
        if content is None and role == "assistant":
            content = ""
        item: dict[str, Any] = {"role": role, "content": text_content(content, param)}
        if role == "assistant" and message.get("tool_calls"):
            calls = message["tool_calls"]
            if not isinstance(calls, list):
                raise ApiError(400, f"'{param}.tool_calls' must be a list", "invalid_type", param)
            item["tool_calls"] = [parse_history_call(call, f"{param}.tool_calls[{number}]")
                                  for number, call in enumerate(calls)]
        if role == "tool":
            if not isinstance(message.get("tool_call_id"), str):
                raise ApiError(400, f"'{param}.tool_call_id' is required for a tool message", "missing_field", param)
            item["tool_call_id"] = message["tool_call_id"]
        parsed.append(item)
    return parsed


def parse_tools(fields: dict[str, Any]) -> list[dict[str, Any]]:
    tools = fields.get("tools") or []
    if not isinstance(tools, list):
        raise ApiError(400, "'tools' must be a list", "invalid_type", "tools")
    for index, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if not isinstance(tool, dict) or tool.get("type", "function") != "function" or not isinstance(function, dict) \
                or not isinstance(function.get("name"), str) or not function["name"]:
            raise ApiError(400, f"'tools[{index}]' must be {{\"type\": \"function\", \"function\": {{\"name\", "
                                "\"description\", \"parameters\"}}}}", "invalid_value", f"tools[{index}]")
        if not isinstance(function.get("parameters", {}), dict):
            raise ApiError(400, f"'tools[{index}].function.parameters' must be a JSON schema object", "invalid_value",
                           f"tools[{index}].function.parameters")
    return tools


def parse_tool_choice(fields: dict[str, Any], names: list[str]) -> str:
    """"auto", "none", "required", or the name of the function to call."""
    choice = fields.get("tool_choice")
    if choice is None:
        return "auto" if names else "none"
    if choice in ("auto", "none", "required"):
        if choice == "required" and not names:
            raise ApiError(400, "'tool_choice' is required but no tools are offered", "invalid_value", "tool_choice")
        return choice
    function = choice.get("function") if isinstance(choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str) or name not in names:
        raise ApiError(400, "'tool_choice' must be auto, none, required or {\"type\": \"function\", \"function\": "
                            f"{{\"name\"}}}} naming an offered tool ({', '.join(names) or 'none offered'})",
                       "invalid_value", "tool_choice")
    return name


def parse_response_format(fields: dict[str, Any]) -> tuple[bool, dict[str, Any] | None]:
    """(JSON mode, the schema) of response_format."""
    response_format = fields.get("response_format")
    if response_format is None:
        return False, None
    kind = response_format.get("type") if isinstance(response_format, dict) else None
    if kind == "text":
        return False, None
    if kind == "json_object":
        return True, None
    if kind == "json_schema":
        wrapper = response_format.get("json_schema")
        schema = wrapper.get("schema") if isinstance(wrapper, dict) else None
        if not isinstance(schema, dict) or check_schema(schema):
            raise ApiError(400, "'response_format.json_schema.schema' must be a JSON schema object"
                           + (f": {check_schema(schema)}" if isinstance(schema, dict) else ""), "invalid_value",
                           "response_format.json_schema.schema")
        return True, schema
    raise ApiError(400, f"'response_format.type' must be text, json_object or json_schema, got {json.dumps(kind)}",
                   "invalid_value", "response_format.type")


def parse_openai_params(fields: dict[str, Any], settings: Settings) -> GenerationParams:
    """The sampling fields, with OpenAI's names: max_completion_tokens, and the presence and frequency
    penalties mapped onto gpt4all's single repeat penalty (docs/api.md)."""
    max_tokens = read_number(fields, "max_tokens", int, settings.max_tokens, 1, 1 << 31)
    max_tokens = read_number(fields, "max_completion_tokens", int, max_tokens, 1, 1 << 31)
    presence = read_number(fields, "presence_penalty", float, 0.0, -2.0, 2.0)
    frequency = read_number(fields, "frequency_penalty", float, 0.0, -2.0, 2.0)
    repeat_penalty = 1.0 + max(presence, frequency) / 2 if max(presence, frequency) > 0 else None
    params = parse_generation_params(fields, settings, repeat_penalty=repeat_penalty)
    return dataclasses.replace(params, max_tokens=min(max_tokens, settings.max_tokens_limit))


def parse_common(app: App, request: Request) -> tuple[dict[str, Any], dict[str, Any]]:
    """The fields both routes share, checked: (fields, ChatRequest keyword arguments)."""
    fields = parse_body_fields(request)
    if fields.get("model") is not None:
        app.check_model_name(fields["model"])
    n = read_number(fields, "n", int, 1, 1, 128)
    if n > MAX_CHOICES:
        raise ApiError(400, f"'n' must be at most {MAX_CHOICES} (answers are generated one after another)",
                       "unsupported_value", "n")
    read_number(fields, "seed", int, 0, -(1 << 63), 1 << 64)  # accepted; temperature 0 gives reproducibility
    for name in ("logprobs", "top_logprobs"):
        if fields.get(name):
            raise ApiError(400, f"'{name}' is not supported: gpt4all does not give token probabilities",
                           "unsupported_value", name)
    options = fields.get("stream_options") or {}
    if not isinstance(options, dict):
        raise ApiError(400, "'stream_options' must be an object", "invalid_type", "stream_options")
    return fields, {"params": parse_openai_params(fields, app.settings), "stream": read_flag(fields, "stream"),
                    "include_usage": read_flag(options, "include_usage"), "n": n}


def parse_chat_request(app: App, request: Request) -> OpenAIRequest:
    fields, common = parse_common(app, request)
    messages = parse_messages(fields)
    tools = parse_tools(fields)
    choice = parse_tool_choice(fields, [tool["function"]["name"] for tool in tools])
    parallel = read_flag(fields, "parallel_tool_calls", default=True)
    json_mode, schema = parse_response_format(fields)
    chat = build_chat(app, messages, common.pop("params"), tools=tools, choice=choice, parallel_tool_calls=parallel,
                      json_mode=json_mode, json_schema=schema)
    return OpenAIRequest(chat, True, **common)


def parse_completion_request(app: App, request: Request) -> OpenAIRequest:
    fields, common = parse_common(app, request)
    if fields.get("tools"):
        raise ApiError(400, "'tools' work on /v1/chat/completions only", "unsupported_value", "tools")
    prompt = fields.get("prompt")
    if isinstance(prompt, list) and len(prompt) == 1:
        prompt = prompt[0]
    if not isinstance(prompt, str) or not prompt:
        raise ApiError(400, "'prompt' must be a non-empty string (or a list of one)", "invalid_value", "prompt")
    return OpenAIRequest(ChatRequest(prompt, common.pop("params")), False, **common)
