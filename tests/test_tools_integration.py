"""Tool calling and JSON mode on the real model, through clients nobody here wrote: the `openai` SDK
and LangChain's ChatOpenAI, against `python gpt4all_api.py` on a free port."""

from __future__ import annotations

import json
from typing import Any

import openai
import pytest
from langchain_core.messages import HumanMessage, ToolMessage
from langchain_core.tools import tool
from langchain_openai import ChatOpenAI

from conftest import Process, write_config

WEATHER_TOOL = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the current weather in a city.",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "description": "The city"}},
                   "required": ["city"]}}}
PARIS = [{"role": "user", "content": "What's the weather in Paris?"}]
WEATHER_RESULT = json.dumps({"temperature_c": 18, "sky": "sunny"})


@pytest.fixture(scope="module")
def server(tmp_path_factory) -> Process:
    process = Process("gpt4all_api.py", write_config(tmp_path_factory.mktemp("tools")))
    process.wait_ready()
    yield process
    process.stop()


@pytest.fixture(scope="module")
def client(server) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base_url + "/v1", api_key="x", max_retries=0, timeout=120)


def only_call(message: Any) -> Any:
    assert message.tool_calls and len(message.tool_calls) == 1, message
    call = message.tool_calls[0]
    assert call.type == "function" and call.id.startswith("call_")
    return call


def test_the_sdk_gets_a_tool_call_then_an_answer_that_uses_the_result(client):
    first = client.chat.completions.create(model="gpt-4o", messages=PARIS, tools=[WEATHER_TOOL], temperature=0)
    assert first.choices[0].finish_reason == "tool_calls" and first.model.endswith(".gguf")
    call = only_call(first.choices[0].message)
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    history = PARIS + [first.choices[0].message.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": call.id, "content": WEATHER_RESULT}]
    second = client.chat.completions.create(model="gpt-4o", messages=history, tools=[WEATHER_TOOL], temperature=0)
    assert second.choices[0].finish_reason == "stop", second
    answer = second.choices[0].message.content
    assert "18" in answer and "sunny" in answer.lower(), answer


def test_the_sdk_assembles_a_streamed_tool_call(client):
    with client.chat.completions.stream(model="gpt-4o", messages=PARIS, tools=[WEATHER_TOOL], temperature=0) as stream:
        events = [event.type for event in stream]
        final = stream.get_final_completion()
    assert final.choices[0].finish_reason == "tool_calls"
    call = only_call(final.choices[0].message)
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == {"city": "Paris"}
    assert "tool_calls.function.arguments.done" in events


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "get_weather"}}],
                         ids=["required", "named"])
def test_tool_choice_forces_a_call(client, choice):
    response = client.chat.completions.create(
        model="gpt-4o", messages=[{"role": "user", "content": "Tell me something about Berlin."}],
        tools=[WEATHER_TOOL], tool_choice=choice, temperature=0, max_tokens=60)
    call = only_call(response.choices[0].message)
    assert call.function.name == "get_weather" and "Berlin" in json.loads(call.function.arguments)["city"]
    assert response.choices[0].finish_reason == "tool_calls"


def test_tool_choice_none_answers_in_text(client):
    response = client.chat.completions.create(model="gpt-4o", messages=PARIS, tools=[WEATHER_TOOL],
                                              tool_choice="none", temperature=0, max_tokens=40)
    assert not response.choices[0].message.tool_calls and response.choices[0].message.content


def test_langchain_without_a_model_name_binds_tools_and_runs_a_two_step_loop(server):
    @tool
    def get_weather(city: str) -> str:
        """Get the current weather in a city."""
        return WEATHER_RESULT

    chat = ChatOpenAI(base_url=server.base_url + "/v1", api_key="x", temperature=0, max_retries=0, timeout=120)
    with_tools = chat.bind_tools([get_weather])
    messages: list[Any] = [HumanMessage("What's the weather in Paris?")]
    first = with_tools.invoke(messages)
    assert len(first.tool_calls) == 1 and first.tool_calls[0]["name"] == "get_weather", first
    assert first.tool_calls[0]["args"] == {"city": "Paris"}
    messages += [first, ToolMessage(get_weather.invoke(first.tool_calls[0]["args"]),
                                    tool_call_id=first.tool_calls[0]["id"])]
    second = with_tools.invoke(messages)
    assert not second.tool_calls and "18" in second.content, second


def test_n_two_choices_a_fingerprint_and_routes_without_v1(server):
    bare = openai.OpenAI(base_url=server.base_url, api_key="x", max_retries=0, timeout=120)
    response = bare.chat.completions.create(model="gpt-4o", messages=[{"role": "user", "content": "Say hi."}],
                                            n=2, temperature=0, max_tokens=8)
    assert [choice.index for choice in response.choices] == [0, 1]
    assert response.choices[0].message.content == response.choices[1].message.content, "temperature 0"
    assert response.system_fingerprint.startswith("fp_")
    assert [model.id for model in bare.models.list()] == [response.model]
