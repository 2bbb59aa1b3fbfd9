"""The OpenAI-compatible API through the official `openai` client, behind the watchdog with a
restart after every request (so every call below is answered by a fresh worker)."""

from __future__ import annotations

import time

import openai
import pytest

from conftest import PORTABLE

API_KEY = "test-key-123"
FRANCE = [{"role": "system", "content": "You are a geography teacher."},
          {"role": "user", "content": "What is the capital of France?"}]


@pytest.fixture(scope="module")
def watchdog(tmp_path_factory):
    from conftest import Process, write_config
    config = write_config(tmp_path_factory.mktemp("openai"), {"server": {"api_key": API_KEY},
                                                               "model": {"model_names": "qwen-local"}})
    process = Process("watchdog.py", config)
    try:
        deadline = time.monotonic() + 120
        client = openai.OpenAI(base_url=process.base_url + "/v1", api_key=API_KEY, max_retries=0)
        while True:
            try:
                client.models.list()
                break
            except openai.APIConnectionError:
                if time.monotonic() > deadline or process.popen.poll() is not None:
                    process.fail("the watchdog did not become ready")
                time.sleep(0.1)
        yield process
    finally:
        process.stop()


@pytest.fixture
def client(watchdog):
    return openai.OpenAI(base_url=watchdog.base_url + "/v1", api_key=API_KEY, max_retries=0, timeout=120)


def model_id(client) -> str:
    return client.models.list().data[0].id


def test_models_list(client):
    models = client.models.list().data
    assert [model.id for model in models] == ["qwen2.5-coder-0.5b-instruct-q4_k_m.gguf"]
    assert client.models.retrieve(models[0].id).id == models[0].id


def test_chat_completion_answers_paris(client):
    answer = client.chat.completions.create(model=model_id(client), messages=FRANCE, temperature=0, max_tokens=20)
    assert "Paris" in answer.choices[0].message.content
    assert answer.choices[0].message.role == "assistant"
    assert answer.choices[0].finish_reason == "stop"
    assert answer.usage.prompt_tokens > 10 and answer.usage.completion_tokens > 0
    assert answer.object == "chat.completion" and answer.id.startswith("chatcmpl-")


def test_streaming_joins_to_the_same_answer(client):
    whole = client.chat.completions.create(model=model_id(client), messages=FRANCE, temperature=0, max_tokens=30)
    chunks = list(client.chat.completions.create(model=model_id(client), messages=FRANCE, temperature=0,
                                                 max_tokens=30, stream=True, stream_options={"include_usage": True}))
    contents = [chunk.choices[0].delta.content for chunk in chunks if chunk.choices and chunk.choices[0].delta.content]
    assert len(contents) >= 3
    assert "".join(contents) == whole.choices[0].message.content
    assert chunks[0].choices[0].delta.role == "assistant"
    finishes = [chunk.choices[0].finish_reason for chunk in chunks if chunk.choices and chunk.choices[0].finish_reason]
    assert finishes == ["stop"]
    assert chunks[-1].usage.completion_tokens == whole.usage.completion_tokens


def test_text_completion(client):
    answer = client.completions.create(model=model_id(client), prompt="def add(a, b):", max_tokens=16, temperature=0)
    assert answer.object == "text_completion" and answer.choices[0].text
    assert answer.usage.completion_tokens <= 16


def test_wrong_model_is_not_found_and_a_listed_name_is_answered_by_the_real_model(client):
    with pytest.raises(openai.NotFoundError) as raised:
        client.chat.completions.create(model="gpt-4o", messages=FRANCE)
    assert raised.value.body["code"] == "model_not_found"
    answer = client.chat.completions.create(model="qwen-local", messages=FRANCE, temperature=0, max_tokens=12)
    assert answer.model.endswith(".gguf") and "Paris" in answer.choices[0].message.content


def test_missing_key_is_refused(watchdog):
    anonymous = openai.OpenAI(base_url=watchdog.base_url + "/v1", api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        anonymous.chat.completions.create(model="x", messages=FRANCE)


def test_too_long_prompt_is_a_bad_request(client):
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model_id(client), max_tokens=8,
                                       messages=[{"role": "user", "content": "word " * 4000}])
    assert raised.value.body["code"] == "context_length_exceeded"


def test_stop_and_max_tokens_are_honoured(client):
    counting = [{"role": "user", "content": "Count from 1 to 20, separated by commas."}]
    stopped = client.chat.completions.create(model=model_id(client), messages=counting, temperature=0, stop=["5"])
    assert stopped.choices[0].finish_reason == "stop"
    assert "5" not in stopped.choices[0].message.content and "4" in stopped.choices[0].message.content
    limited = client.chat.completions.create(model=model_id(client), messages=counting, temperature=0, max_tokens=4)
    assert limited.choices[0].finish_reason == "length" and limited.usage.completion_tokens == 4


def test_an_abandoned_stream_frees_the_model(client, watchdog):
    model = model_id(client)
    stream = client.chat.completions.create(model=model, stream=True, temperature=0, max_tokens=1000,
                                            messages=[{"role": "user", "content": "Count from 1 to 1000."}])
    for index, _ in enumerate(stream):
        if index == 2:
            break
    # The next request must wait for the abandoned generation, not for a model load.
    watchdog.wait_for_spare()
    stream.close()
    abandoned = time.monotonic()
    answer = client.chat.completions.create(model=model, messages=FRANCE, temperature=0, max_tokens=1, stream=True)
    first = next(iter(answer))
    started = time.monotonic() - abandoned
    answer.close()
    assert first.choices[0].delta.role == "assistant"
    print(f"first token after {started:.3f} s")
    # Portable run: the next spare's load (normal priority there, no SCHED_IDLE) shares the 2 cores.
    limit = 2.0 if PORTABLE else 1.0
    assert started < limit, f"the next request answered its first token {started:.2f} s after the abandoned stream"
