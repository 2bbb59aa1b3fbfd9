"""Tool calling formats: the offered tools and past calls written into the prompt the way each model
family's own chat template writes them, and the model's answer read back into calls.

Owns ToolCall, the three formats (Hermes/Qwen2.5 for ChatML models, Llama 3.1 JSON calls, a plain
JSON instruction for the others), the prefill that enforces a tool_choice without a grammar, and
parse_tool_calls (bare, tagged or fenced JSON, one or several calls). Knows nothing of HTTP or of
OpenAI's shapes. Imports only the standard library.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import uuid
from collections.abc import Sequence
from typing import Any

log = logging.getLogger("gpt4all_api")

Message = dict[str, Any]  # {"role", "content"}, plus "tool_calls" (assistant) or "tool_call_id" (tool)
QWEN_DEFAULT_SYSTEM = "You are Qwen, created by Alibaba Cloud. You are a helpful assistant."
CALL_OPEN, CALL_CLOSE = "<tool_call>", "</tool_call>"


def new_call_id() -> str:
    return "call_" + uuid.uuid4().hex[:24]


@dataclasses.dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: dict[str, Any]
    id: str = dataclasses.field(default_factory=new_call_id)


def to_json(value: Any, indent: int | None = None) -> str:
    """Jinja's tojson as Hugging Face templates use it: ", " and ": " separators, text kept as is."""
    return json.dumps(value, ensure_ascii=False, indent=indent)


@dataclasses.dataclass(frozen=True)
class ToolFormat:
    """How one model family offers tools, writes a call and gives back a result."""
    name: str
    arguments_key: str  # "arguments" (Hermes, plain) or "parameters" (Llama 3.1)

    @property
    def default_system(self) -> str | None:
        """The system message the family's template writes when tools come without one."""
        return QWEN_DEFAULT_SYSTEM if self.name == "hermes" else None

    def call_text(self, call: ToolCall) -> str:
        return f'{{"name": {to_json(call.name)}, "{self.arguments_key}": {to_json(call.arguments)}}}'

    def prefill(self, function: str | None) -> str:
        """The opening of the assistant's answer that forces a call (of function, when named)."""
        opening = f"{CALL_OPEN}\n" if self.name == "hermes" else ""
        if function is None:
            return opening + '{"name": "'
        return opening + f'{{"name": {to_json(function)}, "{self.arguments_key}": '

    def render(self, messages: Sequence[Message], tools: Sequence[dict[str, Any]]) -> list[dict[str, str]]:
        """The conversation as plain {"role", "content"} messages for the family's ChatTemplate;
        tools (the request's tool objects) empty: past calls and results only."""
        if self.name == "hermes":
            return render_hermes(messages, tools, self)
        if self.name == "llama3":
            return render_llama3(messages, tools, self)
        return render_plain(messages, tools, self)


FORMATS = {"hermes": ToolFormat("hermes", "arguments"), "llama3": ToolFormat("llama3", "parameters"),
           "plain": ToolFormat("plain", "arguments")}


def tool_format_for(template_name: str) -> ToolFormat:
    """The tool format of a chat template family: ChatML models (Qwen2.5, Hermes) use Hermes'."""
    return FORMATS[{"chatml": "hermes", "llama3": "llama3"}.get(template_name, "plain")]


def hermes_tools_section(tools: Sequence[dict[str, Any]]) -> str:
    """The '# Tools' section of Qwen2.5's template, word for word."""
    lines = "".join("\n" + to_json(tool) for tool in tools)
    return ("\n\n# Tools\n\nYou may call one or more functions to assist with the user query.\n\n"
            "You are provided with function signatures within <tools></tools> XML tags:\n<tools>" + lines +
            "\n</tools>\n\nFor each function call, return a json object with function name and arguments within "
            "<tool_call></tool_call> XML tags:\n<tool_call>\n{\"name\": <function-name>, \"arguments\": "
            "<args-json-object>}\n</tool_call>")


def system_with_tools(messages: Sequence[Message], tools: Sequence[dict[str, Any]], default_system: str,
                      section: str) -> tuple[list[dict[str, Any]], list[Message]]:
    """([the system message with the tools section], the other messages); no tools: ([], messages)."""
    rest = list(messages)
    if not tools:
        return [], rest
    system = rest.pop(0)["content"] if rest and rest[0]["role"] == "system" else default_system
    return [{"role": "system", "content": system + section}], rest


def calls_as_text(message: Message, fmt: ToolFormat, wrap: tuple[str, str] = ("", "")) -> str:
    """An assistant message's text and calls, one call per line."""
    calls = [wrap[0] + fmt.call_text(call) + wrap[1] for call in message["tool_calls"]]
    return "\n".join(([message["content"]] if message["content"] else []) + calls)


def render_hermes(messages: Sequence[Message], tools: Sequence[dict[str, Any]], fmt: ToolFormat) -> list[dict[str, str]]:
    rendered, rest = system_with_tools(messages, tools, QWEN_DEFAULT_SYSTEM, hermes_tools_section(tools))
    for message in rest:
        if message["role"] == "assistant" and message.get("tool_calls"):
            text = calls_as_text(message, fmt, (f"{CALL_OPEN}\n", f"\n{CALL_CLOSE}"))
            rendered.append({"role": "assistant", "content": text})
        elif message["role"] == "tool":
            block = f"<tool_response>\n{message['content']}\n</tool_response>"
            if rendered and rendered[-1].get("tool_results"):  # results in a row share one user turn
                rendered[-1]["content"] += "\n" + block
            else:
                rendered.append({"role": "user", "content": block, "tool_results": True})
        else:
            rendered.append({"role": message["role"], "content": message["content"]})
    return [{"role": message["role"], "content": message["content"]} for message in rendered]


LLAMA3_INSTRUCTION = ("Given the following functions, please respond with a JSON for a function call with its proper "
                      "arguments that best answers the given prompt.\n\nRespond in the format {\"name\": function name, "
                      "\"parameters\": dictionary of argument name and its value}.Do not use variables.\n\n")


def render_llama3(messages: Sequence[Message], tools: Sequence[dict[str, Any]], fmt: ToolFormat) -> list[dict[str, str]]:
    """Llama 3.1's JSON tool calling (tools in the first user message, results as ipython turns)."""
    rendered: list[dict[str, str]] = []
    tools_pending = bool(tools)
    for message in messages:
        if message["role"] == "user" and tools_pending:
            listing = "".join(to_json(tool, indent=4) + "\n\n" for tool in tools)
            rendered.append({"role": "user", "content": LLAMA3_INSTRUCTION + listing + message["content"]})
            tools_pending = False
        elif message["role"] == "assistant" and message.get("tool_calls"):
            rendered.append({"role": "assistant", "content": calls_as_text(message, fmt)})
        elif message["role"] == "tool":
            rendered.append({"role": "ipython", "content": message["content"]})
        else:
            rendered.append({"role": message["role"], "content": message["content"]})
    return rendered


def plain_tools_section(tools: Sequence[dict[str, Any]]) -> str:
    listing = "\n".join(to_json(tool.get("function", tool)) for tool in tools)
    return ("\n\nYou can call these functions:\n" + listing + "\n\nTo call one, answer with only a JSON object "
            "{\"name\": <function name>, \"arguments\": <arguments object>} (one per line for several calls). "
            "Otherwise answer normally.")


def render_plain(messages: Sequence[Message], tools: Sequence[dict[str, Any]], fmt: ToolFormat) -> list[dict[str, str]]:
    rendered, rest = system_with_tools(messages, tools, "You are a helpful assistant.", plain_tools_section(tools))
    for message in rest:
        if message["role"] == "assistant" and message.get("tool_calls"):
            rendered.append({"role": "assistant", "content": calls_as_text(message, fmt)})
        elif message["role"] == "tool":
            rendered.append({"role": "user", "content": f"Result of the function call: {message['content']}"})
        else:
            rendered.append({"role": message["role"], "content": message["content"]})
    return rendered


def call_key(name: str, arguments: dict[str, Any]) -> str:
    return name + json.dumps(arguments, sort_keys=True)


def answered_calls(messages: Sequence[Message]) -> frozenset:
    """The calls made since the last user message that have results: asking again is a loop."""
    last_user = max((index for index, message in enumerate(messages) if message["role"] == "user"), default=-1)
    return frozenset(call_key(call.name, call.arguments) for message in messages[last_user + 1:]
                     for call in message.get("tool_calls", []))


def fold_tool_exchanges(messages: Sequence[Message]) -> list[dict[str, str]]:
    """The conversation with every call and its results written into the user message before them,
    as plain text and without tools: small models that repeat a call already answered in their own
    format answer from the results when they read them this way."""
    folded: list[dict[str, str]] = []
    calls: dict[str, ToolCall] = {}
    for message in messages:
        if message["role"] == "assistant" and message.get("tool_calls"):
            calls.update({call.id: call for call in message["tool_calls"]})
            if message["content"]:
                folded.append({"role": "assistant", "content": message["content"]})
            continue
        if message["role"] == "tool":
            call = calls.get(message.get("tool_call_id", ""))
            what = f"{call.name}({to_json(call.arguments)})" if call else "a tool call"
            note = f"\n\nThe function {what} returned: {message['content']}"
            if folded and folded[-1]["role"] == "user":
                folded[-1] = {"role": "user", "content": folded[-1]["content"] + note}
            else:
                folded.append({"role": "user", "content": note.strip()})
            continue
        folded.append({"role": message["role"], "content": message["content"]})
    return folded


# --------------------------------------------------------------------------------------------
# Reading calls back from the answer.
# --------------------------------------------------------------------------------------------

CALL_STARTS = (CALL_OPEN, "```", "{")  # where a call may begin in an answer


class NotACall(ValueError):
    """The text from here is not a well-formed series of calls."""


def skip(text: str, position: int, *tokens: str) -> int:
    """Past whitespace and any of tokens, as often as they come."""
    while True:
        while position < len(text) and text[position].isspace():
            position += 1
        for token in tokens:
            if text.startswith(token, position):
                position += len(token)
                if token == "```":  # a fence's language tag
                    while position < len(text) and text[position].isalnum():
                        position += 1
                break
        else:
            return position


def read_calls(text: str, start: int, offered: Sequence[str]) -> tuple[list[ToolCall], int]:
    """The calls from start on: bare JSON objects, each optionally in <tool_call> tags or a fence."""
    decoder = json.JSONDecoder()
    calls: list[ToolCall] = []
    position = skip(text, start, CALL_OPEN, "```")
    while position < len(text) and text[position] == "{":
        try:
            document, position = decoder.raw_decode(text, position)
        except (ValueError, RecursionError) as error:
            raise NotACall(f"not valid JSON ({error})") from None
        if not isinstance(document, dict) or not isinstance(document.get("name"), str):
            raise NotACall("a JSON object without a function name")
        arguments = document.get("arguments", document.get("parameters", {}))
        if isinstance(arguments, str):
            try:
                arguments = json.loads(arguments)
            except (ValueError, RecursionError):
                raise NotACall("arguments that are not JSON") from None
        if not isinstance(arguments, dict):
            raise NotACall("arguments that are not an object")
        if document["name"] not in offered:
            raise NotACall(f"a call of {document['name']!r}, which was not offered")
        calls.append(ToolCall(document["name"], arguments))
        position = skip(text, position, CALL_CLOSE, "```", CALL_OPEN)
    if not calls:
        raise NotACall("no JSON object")
    return calls, position


def parse_tool_calls(text: str, offered: Sequence[str]) -> tuple[str, list[ToolCall]]:
    """(content, calls) of an answer: the text before the first call is content; an answer whose
    call does not parse, or names a function that was not offered, is all content (and logged)."""
    problem = None
    for start in sorted({index for marker in CALL_STARTS for index in find_all(text, marker)}):
        try:
            calls, end = read_calls(text, start, offered)
        except NotACall as error:
            problem = problem or str(error)
            continue
        content = (text[:start].rstrip() + " " + text[end:].strip()).strip()
        return content, calls
    if problem:
        log.info("the answer looks like a tool call but is not one (%s): returned as text", problem)
    return text, []


def find_all(text: str, marker: str) -> list[int]:
    positions, index = [], text.find(marker)
    while index >= 0:
        positions.append(index)
        index = text.find(marker, index + 1)
    return positions


def call_start(text: str) -> int:
    """Where text may begin a call (len(text) when it cannot), counting a marker cut at the end."""
    found = [index for index in (text.find(marker) for marker in CALL_STARTS) if index >= 0]
    for marker in (CALL_OPEN, "```"):
        for size in range(len(marker) - 1, 0, -1):
            if text.endswith(marker[:size]):
                found.append(len(text) - size)
                break
    return min(found, default=len(text))


def unsent_text(content: str, streamed: str) -> str:
    """The part of an answer's content that a stream has not sent yet, once its calls are known
    (text around a call that was held back while it might have begun one)."""
    if content.startswith(streamed):
        return content[len(streamed):]
    sent = streamed.rstrip()  # the content was trimmed where the call began; the space has left
    return content[len(sent):].lstrip() if content.startswith(sent) else ""


class CallHoldBack:
    """Streamed text on its way out while tools are offered: what may begin a call waits in held
    until the answer is classified; the rest passes."""

    def __init__(self, active: bool):
        self.active = active
        self.held = ""

    def feed(self, text: str) -> str:
        if not self.active:
            return text
        text = self.held + text
        start = call_start(text)
        self.held = text[start:]
        return text[:start]

    def drop(self) -> None:
        """The held text was a call answered otherwise: forget it, hold nothing more."""
        self.held, self.active = "", False
