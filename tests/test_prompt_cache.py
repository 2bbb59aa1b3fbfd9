"""The prompt cache's worker side with fakes: the self-test and its off switch (reuse_setup.py), an
entry found, checked and restored or refused (prompt_cache.py), and the runner going on from it,
announcing and saving its own (engine.py)."""

from __future__ import annotations

import ctypes
import dataclasses
import json
import logging
import os

import pytest

from apiserver import reuse_setup
from apiserver.cache_entry import memory_file, read_header, write_entry
from apiserver.engine import ModelRunner
from apiserver.kv_state import NativeUnavailable
from apiserver.model import TEMPLATES
from apiserver.prompt_cache import RestoreFailed
from apiserver.protocol import MSG_CACHE_BAD, MSG_CACHE_ENTRY, MSG_CACHE_PENDING, MSG_CACHE_USED
from apiserver.reuse_setup import ReuseSetup, prepare_reuse
from apiserver.turns import Evaluated, prefix_hashes, turn_offsets
from fake_model import FakeModel, FakeNative, fake_tokens, state_bytes
from unit_helpers import chatml, make_app

CHATML = TEMPLATES["chatml"]


@pytest.fixture
def fake_native(monkeypatch):
    monkeypatch.setattr(reuse_setup, "NativeContext", FakeNative)
    FakeNative.layout, FakeNative.misread = True, 0
    return FakeNative


@pytest.fixture
def model_settings(settings, tmp_path):
    model_file = tmp_path / "model.gguf"
    model_file.write_bytes(b"GGUF" + bytes(100))
    return dataclasses.replace(settings, model=str(model_file), n_threads=1)


def test_the_self_test_passes_and_learns_the_state_size(fake_native, model_settings):
    setup = prepare_reuse(FakeModel(), model_settings, CHATML, entries=True)
    assert setup.marker_ids == {151644} and setup.fingerprint is not None and not setup.entries_off
    assert setup.state_size.per_token == 96 + 16, "KV and cell bytes per token"
    assert setup.state_facts["kv_bytes_per_cell"] == 96
    assert setup.fingerprint["n_ctx"] == model_settings.n_ctx and setup.fingerprint["markers"] == [151644]


def test_a_pass_is_recorded_and_taken_by_the_next_process_instead_of_a_second_test(fake_native, model_settings,
                                                                                 tmp_path, monkeypatch, caplog):
    record = tmp_path / "run" / "prompt-cache-self-test-5000.json"
    first = prepare_reuse(FakeModel(), model_settings, CHATML, entries=True, record=record)
    assert record.exists() and first.fingerprint is not None

    def must_not_run(self):
        raise AssertionError("the self-test ran again")
    monkeypatch.setattr(reuse_setup.SelfTest, "saved_and_restored", must_not_run)
    with caplog.at_level(logging.INFO, logger="gpt4all_api"):
        second = prepare_reuse(FakeModel(), model_settings, CHATML, entries=True, record=record)
    assert (second.fingerprint, second.state_size, second.state_facts) == (
        first.fingerprint, first.state_size, first.state_facts)
    assert "passed in an earlier process" in caplog.text


@pytest.mark.parametrize("record_text", ["", "{not json", '{"fingerprint": {}, "state_size": [1, 2], "state_facts": {"a": 1}}',
                                         '{"fingerprint": "same", "state_size": [0, 0], "state_facts": {}}'])
def test_a_record_of_another_fingerprint_or_unreadable_is_not_taken(fake_native, model_settings, tmp_path,
                                                                    record_text):
    record = tmp_path / "prompt-cache-self-test-5000.json"
    expected = prepare_reuse(FakeModel(), model_settings, CHATML, entries=True)
    record.write_text(record_text.replace('"same"', json.dumps(expected.fingerprint)))
    setup = prepare_reuse(FakeModel(), model_settings, CHATML, entries=True, record=record)
    assert (setup.fingerprint, setup.state_size) == (expected.fingerprint, expected.state_size), "tested afresh"
    assert json.loads(record.read_text())["fingerprint"] == expected.fingerprint, "and the pass recorded"


def test_another_model_file_is_tested_afresh(fake_native, model_settings, tmp_path, monkeypatch):
    record = tmp_path / "prompt-cache-self-test-5000.json"
    prepare_reuse(FakeModel(), model_settings, CHATML, entries=True, record=record)
    model_settings.model_file.write_bytes(b"GGUF" + bytes(200))  # replaced: another size and digest
    ran = []
    saved_and_restored = reuse_setup.SelfTest.saved_and_restored
    monkeypatch.setattr(reuse_setup.SelfTest, "saved_and_restored", lambda self: ran.append(1) or saved_and_restored(self))
    prepare_reuse(FakeModel(), model_settings, CHATML, entries=True, record=record)
    assert ran == [1]


@pytest.mark.parametrize("fault", ["answer", "misread", "layout"])
def test_a_failed_self_test_turns_saved_contexts_off_with_one_log_line(fake_native, model_settings, monkeypatch,
                                                                       caplog, fault):
    model = FakeModel()
    if fault == "answer":
        restore = FakeNative.restore_state

        def restore_and_answer_otherwise(self, address):
            self.model.pieces = ["Something", " else"]
            return restore(self, address)
        monkeypatch.setattr(FakeNative, "restore_state", restore_and_answer_otherwise)
    elif fault == "misread":
        FakeNative.misread = 4
    else:
        FakeNative.layout = False
    with caplog.at_level(logging.WARNING, logger="gpt4all_api"):
        setup = prepare_reuse(model, model_settings, CHATML, entries=True)
    assert setup.fingerprint is None and setup.entries_off.startswith("the self-test failed")
    assert setup.marker_ids == {151644}, "reuse inside a process needs only the markers"
    lines = [record.getMessage() for record in caplog.records if "prompt cache" in record.getMessage()]
    assert len(lines) == 1 and "saved contexts are off" in lines[0], lines


@pytest.mark.parametrize("fault", ["native", "tokenizer"])
def test_without_gpt4all_s_own_tokenizer_nothing_is_reused(fake_native, model_settings, monkeypatch, caplog, fault):
    """Prompts are cut, and batch sizes chosen, on the tokenizer's word: without it (or when its ids
    are not what an evaluation shows) every prompt is evaluated whole, as before the cache."""
    if fault == "native":
        def unavailable(model):
            raise NativeUnavailable("gpt4all's tokenizer is not reachable")
        monkeypatch.setattr(reuse_setup, "NativeContext", unavailable)
    else:
        monkeypatch.setattr(FakeNative, "tokenize", lambda self, text: fake_tokens(text)[:-1])
    with caplog.at_level(logging.WARNING, logger="gpt4all_api"):
        setup = prepare_reuse(FakeModel(), model_settings, CHATML, entries=True)
    assert setup.marker_ids == frozenset() and setup.tokenizer() is None
    assert "prompts are evaluated whole" in caplog.text and "tokenizer" in caplog.text
    model = FakeModel()
    app = make_app(model_settings)
    app.runner = ModelRunner(model, app.settings, CHATML, heartbeat=lambda: None, reuse=setup)
    app.runner.complete(FIRST, app_params(app), client_alive=lambda: True)
    app.runner.complete(FIRST, app_params(app), client_alive=lambda: True)
    assert model.calls[-1]["reset_context"] is True and model.calls[-1]["n_batch"] == model_settings.n_batch


def test_no_markers_no_reuse(model_settings):
    setup = prepare_reuse(FakeModel(), model_settings, TEMPLATES["plain"], entries=True)
    assert setup == ReuseSetup(entries_off="the plain template has no special token that begins a turn")


class FakeLink:
    """protocol.WatchdogLink as PromptCache uses it: the answer to a lookup, and what was sent."""

    def __init__(self) -> None:
        self.sent: list[tuple[bytes, bytes, int]] = []
        self.found: tuple[int, int, int] | None = None
        self.asked: list[bytes] = []

    def ask_cache(self, names: bytes) -> int:
        self.asked.append(names)
        return len(self.asked)

    def cache_answer(self, number: int, timeout: float):
        assert number == len(self.asked)
        found, self.found = self.found, None
        return found

    def send(self, kind: bytes, payload: bytes = b"", fds=()) -> None:
        self.sent.append((kind, payload, os.dup(fds[0]) if fds else -1))


SYSTEM = "You are the house. " * 10
FIRST = chatml("Turn off the lamp.", SYSTEM)
SECOND = chatml("Is the door locked?", SYSTEM)


def runner_with_cache(model_settings, fake_native):
    model = FakeModel()
    setup = prepare_reuse(model, model_settings, CHATML, entries=True)
    app = make_app(model_settings, prompt_cache=True, restart_after_requests=1)
    app.runner = ModelRunner(model, app.settings, CHATML, heartbeat=lambda: None, reuse=setup)
    link = FakeLink()
    app.runner.attach_cache(link)
    return app, model, link


def saved_entry(setup: ReuseSetup, prompt: str, tokens: int = 0) -> tuple[int, Evaluated]:
    """An entry for prompt as a worker saves it (its state of the right shape)."""
    evaluated = Evaluated().extended(prompt, turn_offsets(prompt, CHATML.turn_start), (0, 0), fake_tokens(prompt),
                                     frozenset({151644}), True)
    fd = memory_file("test entry")
    blob = state_bytes(cells=tokens or len(fake_tokens(prompt)), kv_size=2048)
    write_entry(fd, setup.fingerprint, evaluated, fake_tokens(prompt)[:evaluated.n_past],
                lambda address: ctypes.memmove(address, blob, len(blob)) and len(blob), 0, 1 << 22)
    return fd, evaluated


def test_a_fresh_worker_goes_on_from_an_entry_and_says_it_was_sound(model_settings, fake_native):
    app, model, link = runner_with_cache(model_settings, fake_native)
    fd, evaluated = saved_entry(app.runner.context.reuse, FIRST)
    offsets = [offset for offset in turn_offsets(SECOND, CHATML.turn_start) if offset]
    assert len(app.runner.context.cut_points(SECOND, offsets)) == 1, \
        "the system turn; the assistant's opening leaves fewer than MIN_BATCH tokens (of the fake tokenizer)"
    link.found = (7, 0, fd)  # the entry holds the first boundary: the system turn
    completion = app.runner.complete(SECOND, app_params(app), client_alive=lambda: True)
    call = model.calls[-1]
    system_turn = evaluated.marks[0]
    assert call["reset_context"] is False and call["prompt"] == SECOND[system_turn[0]:]
    assert completion.cached_tokens == system_turn[1] and completion.prompt_tokens == len(fake_tokens(SECOND))
    assert link.asked == [b"".join(prefix_hashes(SECOND, offsets))], "every boundary beyond what the process holds"
    assert (MSG_CACHE_USED, b"7", -1) in link.sent
    assert model.model.tokens[:system_turn[1]] == fake_tokens(SECOND)[:system_turn[1]], "the token list restored"
    app, model, link = runner_with_cache(model_settings, fake_native)
    link.found = (8, 1, saved_entry(app.runner.context.reuse, SECOND)[0])
    completion = app.runner.complete(SECOND, app_params(app), client_alive=lambda: True)
    assert len(link.asked) == 1 and completion.cached_tokens == 0 and model.calls[-1]["reset_context"] is True
    assert (MSG_CACHE_BAD, b"8", -1) not in link.sent, "an entry found for a boundary leaving too few tokens is left alone"


def test_an_entry_that_fails_its_checks_is_reported_and_the_whole_prompt_evaluated(model_settings, fake_native,
                                                                                  caplog):
    app, model, link = runner_with_cache(model_settings, fake_native)
    fd, _ = saved_entry(app.runner.context.reuse, FIRST)
    entry = read_header(fd, app.runner.context.reuse.fingerprint)
    byte = os.pread(fd, 1, entry.blob_offset + 40)
    os.pwrite(fd, bytes([byte[0] ^ 1]), entry.blob_offset + 40)
    link.found = (3, 0, fd)
    with caplog.at_level(logging.WARNING, logger="gpt4all_api"):
        completion = app.runner.complete(SECOND, app_params(app), client_alive=lambda: True)
    assert model.calls[-1]["reset_context"] is True and completion.cached_tokens == 0
    assert (MSG_CACHE_BAD, b"3", -1) in link.sent
    assert "entry 3 not used" in caplog.text and "checksum" in caplog.text


def test_a_state_the_model_misreads_means_a_context_from_zero(model_settings, fake_native):
    app, model, link = runner_with_cache(model_settings, fake_native)
    fd, _ = saved_entry(app.runner.context.reuse, FIRST)
    link.found = (5, 0, fd)
    FakeNative.misread = 8
    cache, offsets = app.runner.context.cache, turn_offsets(SECOND, CHATML.turn_start)
    with pytest.raises(RestoreFailed):
        cache.restore(cache.ask(SECOND, offsets, 0), SECOND, offsets)
    link.found = (5, 0, saved_entry(app.runner.context.reuse, FIRST)[0])
    completion = app.runner.complete(SECOND, app_params(app), client_alive=lambda: True)
    assert model.calls[-1]["reset_context"] is True and completion.cached_tokens == 0
    assert [kind for kind, _, _ in link.sent].count(MSG_CACHE_BAD) == 2


def test_the_last_generation_announces_its_entry_and_the_exit_saves_it(model_settings, fake_native):
    app, model, link = runner_with_cache(model_settings, fake_native)
    app.runner.exit_after_this()
    app.runner.complete(FIRST, app_params(app), client_alive=lambda: True)
    pending = [payload for kind, payload, _ in link.sent if kind == MSG_CACHE_PENDING]
    evaluated = app.runner.context.evaluated
    names = b"".join(prefix_hashes(FIRST, [offset for offset, _ in evaluated.marks]))
    assert pending == [names] and evaluated.text == FIRST[:evaluated.marks[-1][0]]
    app.runner.save_context()
    kind, payload, fd = link.sent[-1]
    assert kind == MSG_CACHE_ENTRY and payload == names
    entry = read_header(fd, app.runner.context.reuse.fingerprint)
    assert entry.evaluated == evaluated and list(entry.tokens) == fake_tokens(FIRST)[:evaluated.n_past]
    os.close(fd)


def test_a_save_without_room_says_no_entry_is_coming(model_settings, fake_native, monkeypatch, caplog):
    app, model, link = runner_with_cache(model_settings, fake_native)
    app.runner.exit_after_this()
    app.runner.complete(FIRST, app_params(app), client_alive=lambda: True)

    def no_room(fd, offset, length):
        raise OSError(28, "No space left on device")
    monkeypatch.setattr(os, "posix_fallocate", no_room)
    with caplog.at_level(logging.WARNING, logger="gpt4all_api"):
        app.runner.save_context()
    assert link.sent[-1] == (MSG_CACHE_ENTRY, b"", -1), "no file: the announced entry will not come"
    assert "not saved" in caplog.text and "No space left" in caplog.text


def test_a_worker_that_keeps_serving_saves_nothing(model_settings, fake_native):
    app, model, link = runner_with_cache(model_settings, fake_native)
    app.runner.complete(FIRST, app_params(app), client_alive=lambda: True)
    app.runner.complete(SECOND, app_params(app), client_alive=lambda: True)
    assert model.calls[-1]["reset_context"] is False, "its own context: the system turn"
    assert not [kind for kind, _, _ in link.sent if kind in (MSG_CACHE_PENDING, MSG_CACHE_ENTRY)]


def app_params(app):
    from apiserver.engine import GenerationParams
    settings = app.settings
    return GenerationParams(max_tokens=4, temperature=0.0, top_k=settings.top_k, top_p=settings.top_p,
                            min_p=settings.min_p, repeat_penalty=settings.repeat_penalty,
                            repeat_last_n=settings.repeat_last_n)


def test_every_prompt_is_evaluated_in_batches_of_three_tokens_or_more(model_settings, fake_native):
    """A prompt (or the rest of one) whose last batch would hold one or two tokens is evaluated in a
    smaller batch size that leaves none: llama.cpp computes such small batches otherwise."""
    app, model, link = runner_with_cache(model_settings, fake_native)
    sizes = set()
    for words in range(120, 140):
        prompt = chatml(" ".join(["word"] * words), "Be brief.")
        app.runner.complete(prompt, app_params(app), client_alive=lambda: True)
        call = model.calls[-1]
        count = len(fake_tokens(call["prompt"]))
        assert count < 3 or (count % call["n_batch"] or call["n_batch"]) >= 3, (count, call["n_batch"])
        sizes.add(call["n_batch"])
    assert sizes - {model_settings.n_batch}, "some counts needed another batch size"
