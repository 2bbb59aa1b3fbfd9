"""Tool formats: the prompts against the default model's own chat template (rendered by jinja2 from
the GGUF file), and the answer parser on bare, tagged, fenced, multiple, malformed and unknown calls."""

from __future__ import annotations

import json
from typing import Any

import jinja2
import pytest

from apiserver.constraints import JsonAnswer
from apiserver.json_output import InvalidJsonOutput, check_json_answer
from apiserver.model import TEMPLATES, ensure_model_file, read_gguf_metadata
from apiserver.settings import load_settings
from apiserver.tool_formats import FORMATS, QWEN_DEFAULT_SYSTEM, ToolCall, call_start, parse_tool_calls, tool_format_for
from conftest import write_config

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "Température à"}},
                   "required": ["city"]}}}
TIME = {"type": "function", "function": {"name": "get_time", "description": "The time in a city.",
                                         "parameters": {"type": "object", "properties": {"city": {"type": "string"}}}}}


@pytest.fixture(scope="module")
def qwen_template(tmp_path_factory) -> jinja2.Template:
    """The chat template stored in the default model's GGUF, as Hugging Face renders it."""
    settings = load_settings(write_config(tmp_path_factory.mktemp("qwen")))
    source = read_gguf_metadata(ensure_model_file(settings), ["tokenizer.chat_template"])["tokenizer.chat_template"]
    environment = jinja2.Environment(trim_blocks=True, lstrip_blocks=True)
    environment.filters["tojson"] = lambda value, indent=None: json.dumps(value, ensure_ascii=False, indent=indent)
    return environment.from_string(source)


def ours(messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    return TEMPLATES["chatml"].render(FORMATS["hermes"].render(messages, tools))


def theirs(template: jinja2.Template, messages: list[dict[str, Any]], tools: list[dict[str, Any]]) -> str:
    """The Jinja template's messages: tool calls with their arguments as objects."""
    jinja_messages = []
    for message in messages:
        message = dict(message)
        if message.get("tool_calls"):
            message["tool_calls"] = [{"type": "function", "function": {"name": call.name, "arguments": call.arguments}}
                                     for call in message["tool_calls"]]
        jinja_messages.append(message)
    return template.render(messages=jinja_messages, tools=tools or None, add_generation_prompt=True)


CONVERSATIONS = {
    "tools offered, a system message": ([{"role": "system", "content": "Be brief."},
                                         {"role": "user", "content": "Weather in Paris?"}], [WEATHER, TIME]),
    "tools offered, no system message": ([{"role": "user", "content": "Weather in Paris?"}], [WEATHER]),
    "a call, its result, the answer": ([
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Weather in Paris and Lyon?"},
        {"role": "assistant", "content": "", "tool_calls": [ToolCall("get_weather", {"city": "Paris"}),
                                                            ToolCall("get_weather", {"city": "Lyon"})]},
        {"role": "tool", "content": "18 C, sunny", "tool_call_id": "a"},
        {"role": "tool", "content": "{\"temperature\": 20}", "tool_call_id": "b"},
        {"role": "assistant", "content": "Paris 18 C, Lyon 20 C."},
        {"role": "user", "content": "And the time in Paris?"}], [WEATHER, TIME]),
    "text before a call": ([
        {"role": "system", "content": "Be brief."}, {"role": "user", "content": "Weather?"},
        {"role": "assistant", "content": "Let me look.", "tool_calls": [ToolCall("get_weather", {"city": "Nice"})]},
        {"role": "tool", "content": "25 C", "tool_call_id": "c"}], [WEATHER]),
}


@pytest.mark.parametrize("name", sorted(CONVERSATIONS))
def test_hermes_prompt_is_the_default_models_own_template_string_for_string(qwen_template, name):
    messages, tools = CONVERSATIONS[name]
    assert ours(messages, tools) == theirs(qwen_template, messages, tools)


def test_hermes_tools_section_exactly():
    text = ours([{"role": "user", "content": "Hi"}], [TIME])
    assert text == (
        f"<|im_start|>system\n{QWEN_DEFAULT_SYSTEM}\n\n# Tools\n\nYou may call one or more functions to assist with the "
        "user query.\n\nYou are provided with function signatures within <tools></tools> XML tags:\n<tools>\n"
        '{"type": "function", "function": {"name": "get_time", "description": "The time in a city.", "parameters": '
        '{"type": "object", "properties": {"city": {"type": "string"}}}}}\n</tools>\n\nFor each function call, return '
        "a json object with function name and arguments within <tool_call></tool_call> XML tags:\n<tool_call>\n"
        '{"name": <function-name>, "arguments": <args-json-object>}\n</tool_call><|im_end|>\n'
        "<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n")


def test_llama3_offers_tools_in_the_first_user_message_and_results_as_ipython():
    messages = [{"role": "user", "content": "Weather in Paris?"},
                {"role": "assistant", "content": "", "tool_calls": [ToolCall("get_weather", {"city": "Paris"})]},
                {"role": "tool", "content": "18 C", "tool_call_id": "a"}]
    text = TEMPLATES["llama3"].render(FORMATS["llama3"].render(messages, [WEATHER]))
    assert "Given the following functions" in text and '"name": "get_weather"' in text
    assert text.index("Given the following functions") < text.index("Weather in Paris?")
    assert '<|start_header_id|>assistant<|end_header_id|>\n\n{"name": "get_weather", "parameters": {"city": "Paris"}}' \
           "<|eot_id|>" in text
    assert "<|start_header_id|>ipython<|end_header_id|>\n\n18 C<|eot_id|>" in text
    assert tool_format_for("llama3").name == "llama3" and tool_format_for("gemma").name == "plain"


def test_plain_format_describes_the_json_to_answer_with():
    text = TEMPLATES["plain"].render(FORMATS["plain"].render([{"role": "user", "content": "Hi"}], [WEATHER]))
    assert '{"name": <function name>, "arguments": <arguments object>}' in text and "get_weather" in text


def test_prefill_forces_a_call_or_a_named_function():
    assert FORMATS["hermes"].prefill(None) == '<tool_call>\n{"name": "'
    assert FORMATS["hermes"].prefill("get_weather") == '<tool_call>\n{"name": "get_weather", "arguments": '
    assert FORMATS["llama3"].prefill("get_weather") == '{"name": "get_weather", "parameters": '


OFFERED = ["get_weather", "get_time"]
PARSED = [
    ("bare", '{"name": "get_weather", "arguments": {"city": "Paris"}}', "", [("get_weather", {"city": "Paris"})]),
    ("tagged", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call>', "",
     [("get_weather", {"city": "Paris"})]),
    ("fenced", '```json\n{"name": "get_time", "arguments": {"city": "Rome"}}\n```', "", [("get_time", {"city": "Rome"})]),
    ("text before", 'Let me check.\n{"name": "get_weather", "arguments": {"city": "Oslo"}}', "Let me check.",
     [("get_weather", {"city": "Oslo"})]),
    ("several", '{"name": "get_weather", "arguments": {"city": "Paris"}}\n{"name": "get_time", "arguments": '
                '{"city": "Paris"}}', "", [("get_weather", {"city": "Paris"}), ("get_time", {"city": "Paris"})]),
    ("several tagged", '<tool_call>\n{"name": "get_weather", "arguments": {"city": "A"}}\n</tool_call>\n<tool_call>\n'
                       '{"name": "get_weather", "arguments": {"city": "B"}}\n</tool_call>', "",
     [("get_weather", {"city": "A"}), ("get_weather", {"city": "B"})]),
    ("arguments as a string", '{"name": "get_weather", "arguments": "{\\"city\\": \\"Bern\\"}"}', "",
     [("get_weather", {"city": "Bern"})]),
    ("llama parameters", '{"name": "get_weather", "parameters": {"city": "Kyiv"}}', "", [("get_weather", {"city": "Kyiv"})]),
    ("malformed", '{"name": "get_weather", "arguments": {"city": "Paris"', None, []),
    ("unknown function", '{"name": "launch_rocket", "arguments": {}}', None, []),
    ("plain text with braces", "Use a dict like {1: 2} here.", None, []),
    ("json that is no call", '{"city": "Paris"}', None, []),
]


@pytest.mark.parametrize("case, text, content, calls", PARSED, ids=[row[0] for row in PARSED])
def test_parse_tool_calls(case, text, content, calls):
    parsed_content, parsed = parse_tool_calls(text, OFFERED)
    assert [(call.name, call.arguments) for call in parsed] == calls
    assert parsed_content == (text if content is None else content)
    assert all(call.id.startswith("call_") and len(call.id) > 10 for call in parsed)


def test_call_start_holds_back_what_may_begin_a_call():
    assert call_start("Hello there") == len("Hello there")
    assert call_start('Sure: {"name"') == len("Sure: ")
    assert call_start("Sure <tool_") == len("Sure ")
    assert call_start("Code: ``") == len("Code: ")


def test_json_answer_ends_where_the_object_closes_across_pieces_and_strings():
    answer = JsonAnswer(None, "{")  # after the prefilled "{"
    assert answer.feed('"a": "}{\\"", "b": [1, {') == len('"a": "}{\\"", "b": [1, {')
    assert answer.feed('"c": 2}]') == len('"c": 2}]')
    assert answer.feed('} and more') == 1 and answer.complete


def test_check_json_answer_with_and_without_a_schema():
    assert check_json_answer('{"a": 1}', None) == {"a": 1}
    for bad in ('{"a": ', "[1]"):
        with pytest.raises(InvalidJsonOutput):
            check_json_answer(bad, None)
    schema = {"type": "object", "required": ["name", "age"]}
    assert check_json_answer('{"name": "x", "age": 3}', schema)["age"] == 3
    with pytest.raises(InvalidJsonOutput, match="does not follow"):
        check_json_answer('{"name": "x"}', schema)
