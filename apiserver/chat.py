"""The chat core every wire protocol shares: a conversation (with tools, a tool choice, JSON mode)
turned into a prompt, and the model's answer read back into text and tool calls.

Owns ChatRequest, build_chat (the prompt in the model's own tool format, the prefill that enforces a
tool choice or JSON mode), Answer (the answer checked: calls parsed, JSON validated), answer_once
(one generation, with the fallback for a model that repeats a call already answered) and
StreamedAnswer (the text of one answer on its way to a stream). The wire protocols (openai_api,
ollama_api) only read their fields into build_chat and frame its answers.
Imports settings, engine, api, tool_formats, json_output and constraints.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any, Callable

from apiserver.api import ApiError, App, Request, TokenBatcher
from apiserver.constraints import JsonAnswer, ToolCalls
from apiserver.engine import Completion, Constraint, GenerationParams
from apiserver.json_output import InvalidJsonOutput, check_json_answer, prefill_for, schema_instruction
from apiserver.tool_formats import (
    CallHoldBack,
    ToolCall,
    answered_calls,
    call_key,
    fold_tool_exchanges,
    parse_tool_calls,
    tool_format_for,
    unsent_text,
)

log = logging.getLogger("gpt4all_api")


@dataclasses.dataclass(frozen=True)
class ChatRequest:
    """What to generate and how to read the answer."""
    prompt: str
    params: GenerationParams
    prefill: str = ""  # the answer's opening, written by us (a tool_choice, JSON mode)
    tool_names: tuple[str, ...] = ()  # the offered functions, when calls are to be read from the answer
    tools: tuple[dict[str, Any], ...] = ()  # their definitions: a call's arguments follow its parameters
    arguments_key: str = "arguments"  # where the tool format writes a call's arguments
    parallel_tool_calls: bool = True
    json_mode: bool = False
    json_schema: dict[str, Any] | None = None
    answered: frozenset = frozenset()  # calls already answered in this turn (tool_formats.call_key)
    fallback_prompt: str = ""  # the conversation without tools, for a model that repeats such a call

    def constraint(self) -> Constraint | None:
        """What the answer is held to while it is generated: JSON (with its schema), or the calls'
        names and arguments while tools are offered."""
        if self.json_mode:
            return JsonAnswer(self.json_schema, self.prefill)
        if self.tool_names:
            return ToolCalls(self.tools, self.arguments_key, self.prefill)
        return None

    def without_tools(self) -> ChatRequest:
        """The request answered in text from the results (the fallback for a repeated call)."""
        return dataclasses.replace(self, prompt=self.fallback_prompt, prefill="", tool_names=(), tools=())


def with_system_note(messages: list[dict[str, str]], note: str, default_system: str) -> list[dict[str, str]]:
    """The messages with note added to the system message (one made from default_system if none)."""
    if messages and messages[0]["role"] == "system":
        return [{"role": "system", "content": f"{messages[0]['content']}\n\n{note}"}] + messages[1:]
    return [{"role": "system", "content": f"{default_system}\n\n{note}".strip()}] + messages


def build_chat(app: App, messages: Sequence[dict[str, Any]], params: GenerationParams,
               tools: Sequence[dict[str, Any]] = (), choice: str = "none", parallel_tool_calls: bool = True,
               json_mode: bool = False, json_schema: dict[str, Any] | None = None) -> ChatRequest:
    """The prompt for a conversation: tools in the model's own format (unless choice is "none"),
    choice "required" or a function name enforced by the answer's opening, or JSON mode."""
    if json_mode and choice != "none":
        raise ApiError(400, "JSON output and tools together are not supported; leave the tools out",
                       "unsupported_value", "response_format")
    template = app.require_runner().template
    tool_format = tool_format_for(template.name)
    plain = tool_format.render(messages, tools if choice != "none" else [])
    prefill = ""
    if json_mode:
        plain = with_system_note(plain, schema_instruction(json_schema), app.settings.system_prompt)
        prefill = prefill_for(json_schema)
    elif choice not in ("auto", "none"):
        prefill = tool_format.prefill(None if choice == "required" else choice)
    prompt, params = app.chat_prompt(plain, params)
    answered = answered_calls(messages) if choice == "auto" else frozenset()
    fallback = ""
    if answered:  # only a call already answered can be repeated: only then is a fallback needed
        folded = fold_tool_exchanges(messages)
        if folded[0]["role"] != "system":
            folded.insert(0, {"role": "system", "content": tool_format.default_system or app.settings.system_prompt})
        fallback = template.render(folded)
    offered = tuple(tools) if choice != "none" else ()
    names = tuple(tool["function"]["name"] for tool in offered)
    return ChatRequest(prompt + prefill, params, prefill=prefill, tool_names=names, tools=offered,
                       arguments_key=tool_format.arguments_key,
                       parallel_tool_calls=parallel_tool_calls, json_mode=json_mode, json_schema=json_schema,
                       answered=answered, fallback_prompt=fallback)


class Answer:
    """One answer as a client sees it: text, the calls read out of it, why it ended."""

    def __init__(self, chat: ChatRequest, completion: Completion):
        self.chat, self.completion = chat, completion
        self.text = chat.prefill + completion.text
        self.finish = "length" if completion.finish_reason == "timeout" else completion.finish_reason
        self.calls: list[ToolCall] = []
        if chat.json_mode:
            # Cut by the token limit or the client's stop string, the JSON is as far as it got (as
            # OpenAI answers); complete, it follows its schema by construction.
            if completion.finish_reason == "stop" and completion.constrained_complete:
                try:
                    check_json_answer(self.text, chat.json_schema)
                except InvalidJsonOutput as error:
                    log.error("a constrained JSON answer failed its final check (a bug): %s", error)
                    raise ApiError(500, f"{error}; this should not happen, please report it",
                                   "invalid_json_output") from None
        elif chat.tool_names:
            content, calls = parse_tool_calls(self.text, chat.tool_names)
            if calls:
                self.text, self.calls = content, calls if chat.parallel_tool_calls else calls[:1]
                self.finish = "tool_calls"

    @property
    def repeats_answered_calls(self) -> bool:
        """Every call was already made and answered in this turn: a loop, not a request for data."""
        return bool(self.calls) and all(call_key(call.name, call.arguments) in self.chat.answered
                                        for call in self.calls)


def answer_once(app: App, request: Request, chat: ChatRequest, on_text: Callable[[str], None] | None = None,
                on_retry: Callable[[], None] = lambda: None) -> Answer:
    """One answer; a model that repeats a call already answered in this turn (small models do,
    instead of reading the results) answers again from the results written as text, without tools."""
    answer = Answer(chat, app.complete(request, chat.prompt, chat.params, on_text=on_text, constraint=chat.constraint()))
    if answer.repeats_answered_calls:
        log.info("the model repeated %s, already answered: answering from the results without tools",
                 ", ".join(call.name for call in answer.calls))
        plain = chat.without_tools()
        first = answer.completion
        on_retry()
        answer = Answer(plain, app.complete(request, plain.prompt, plain.params, on_text=on_text))
        answer.completion.prompt_tokens += first.prompt_tokens
        answer.completion.completion_tokens += first.completion_tokens
    return answer


class StreamedAnswer:
    """The text of one answer on its way to a stream, for any framing: the prefilled opening leaves
    with the first piece (so nothing leaves before the generation was admitted, and a refusal is
    still an ordinary error reply), the pieces in TokenBatcher's groups, and with tools offered,
    what may begin a call held back until the answer is classified. send(text) frames the text."""

    def __init__(self, chat: ChatRequest, send: Callable[[str], None]):
        self.chat, self.send = chat, send
        self.prefill_due = bool(chat.prefill)
        self.holdback = CallHoldBack(bool(chat.tool_names))
        self.batcher = TokenBatcher(self.release)
        self.streamed = ""  # the text sent so far

    def run(self, app: App, request: Request) -> tuple[Answer, str]:
        """Generate; return the answer and its text not streamed yet (held back, or around a call)."""
        answer = answer_once(app, request, self.chat, on_text=self.add, on_retry=self.restart)
        self.add("")
        self.batcher.flush()
        return answer, unsent_text(answer.text, self.streamed) if answer.calls else self.holdback.held

    def add(self, text: str) -> None:
        if self.prefill_due:
            text, self.prefill_due = self.chat.prefill + text, False
        if text:
            self.batcher.add(text)

    def restart(self) -> None:
        """The held call repeated an answered one: the answer starts again, in text."""
        self.holdback.drop()
        self.streamed = ""
        self.batcher = TokenBatcher(self.release)

    def release(self, text: str) -> None:
        text = self.holdback.feed(text)
        if text:
            self.streamed += text
            self.send(text)
