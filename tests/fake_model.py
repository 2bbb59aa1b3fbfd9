"""A stand-in for gpt4all 2.8.2's GPT4All object, as ModelRunner uses it, for fast unit tests.

ModelRunner calls model.model.prompt_model(..., special=True), which lands in generate() here.
Like the real one, generate() feeds the prompt through model._prompt_callback (one call per token:
fake_tokens() splits at ChatML's special tokens first, then at whitespace), then hands the scripted
answer pieces to callback(token_id, piece) until it returns False or max_tokens pieces are out, and
returns the text handed out (answers, when given, scripts one list of pieces per call instead: a
model that goes on after a correction). A prompt larger than n_ctx tokens gets gpt4all's error text through
callback(-1, ...) instead, and that text is returned. A prompt that is not encodable as UTF-8
raises UnicodeEncodeError, as gpt4all's prompt.encode() does. Its context counts the prompt tokens
evaluated and the answer tokens handed out (context.n_past) and keeps their ids (tokens):
reset_context=False continues from n_past. Answer pieces pass through _callback_decoder as bytes, as
gpt4all's do.
"""

from __future__ import annotations

import ctypes
import os
import re
import struct
import threading
import time
import types
import zlib
from collections.abc import Sequence
from typing import Any, Callable

CONTEXT_ERROR_TEXT = "ERROR: The prompt size exceeds the context window size and cannot be processed."
SPECIAL_TOKENS = {"<|im_start|>": 151644, "<|im_end|>": 151645}  # Qwen's ids
SPECIAL = re.compile("(" + "|".join(re.escape(token) for token in SPECIAL_TOKENS) + ")")


def fake_tokens(text: str) -> list[int]:
    """The fake tokenizer: special tokens first (as llama.cpp's does), then each whitespace word."""
    ids: list[int] = []
    for part in SPECIAL.split(text):
        if part in SPECIAL_TOKENS:
            ids.append(SPECIAL_TOKENS[part])
        else:
            ids += [1000 + zlib.crc32(word.encode()) % 100000 for word in part.split()]
    return ids


class FakeLLModel:
    """The low-level model object: ModelRunner replaces its _prompt_callback and calls prompt_model()."""

    def __init__(self, owner: FakeModel):
        self.owner = owner
        self.special: bool | None = None
        self.threads = 2
        self.context = types.SimpleNamespace(n_past=0)  # what gpt4all's LLModelPromptContext holds
        self.tokens: list[int] = []  # the ids in the context, as gpt4all's token list holds them

    def thread_count(self) -> int:
        return self.threads

    def set_thread_count(self, threads: int) -> None:
        self.threads = threads

    @staticmethod
    def _prompt_callback(token_id: int) -> bool:
        return True

    @staticmethod
    def _callback_decoder(callback: Callable[[int, str], bool]) -> Callable[[int, bytes], bool]:
        return lambda token_id, data: callback(token_id, data.decode("utf-8"))

    def prompt_model(self, prompt: str, prompt_template: str, callback: Callable[[int, str], bool],
                     n_predict: int = 4096, top_k: int = 40, top_p: float = 0.9, min_p: float = 0.0,
                     temp: float = 0.1, n_batch: int = 8, repeat_penalty: float = 1.2, repeat_last_n: int = 10,
                     context_erase: float = 0.75, reset_context: bool = False, special: bool = False) -> None:
        assert prompt_template == "%1%2", "the runner must send the prompt as is, nothing after the reply"
        assert reset_context or self.context.n_past > 0, "continuing a context needs tokens in it"
        if reset_context:
            self.context.n_past = 0
        del self.tokens[self.context.n_past:]
        self.special = special
        raw = self._callback_decoder(callback)
        answered: list[int] = []

        def push_then_call(token_id: int, piece: str) -> bool:
            answered.append(token_id)
            return raw(token_id, piece.encode("utf-8"))
        self.owner.generate(prompt, max_tokens=n_predict, temp=temp, top_k=top_k, top_p=top_p, min_p=min_p,
                            repeat_penalty=repeat_penalty, repeat_last_n=repeat_last_n, n_batch=n_batch,
                            callback=push_then_call, reset_context=reset_context)
        self.context.n_past += len(fake_tokens(prompt)) + len(answered)
        self.tokens += fake_tokens(prompt) + answered


class FakeModel:
    def __init__(self, pieces: Sequence[str] = ("Hello", " world"), n_ctx: int = 2048,
                 delay: float = 0.0, gate: threading.Event | None = None,
                 error: BaseException | None = None, answers: Sequence[Sequence[str]] | None = None):
        self.model = FakeLLModel(self)
        self.pieces = list(pieces)
        self.answers = [list(answer) for answer in answers] if answers is not None else None
        self.n_ctx = n_ctx
        self.delay = delay  # seconds before each answer piece
        self.gate = gate  # when given, generate() waits for it before answering
        self.error = error  # raised inside generate(), as a broken model would
        self.calls: list[dict[str, Any]] = []  # the prompt and keyword arguments of every call
        self.started = threading.Event()  # set when a generate() call begins

    def generate(self, prompt: str, *, max_tokens: int = 200, temp: float = 0.7, top_k: int = 40,
                 top_p: float = 0.4, min_p: float = 0.0, repeat_penalty: float = 1.18, repeat_last_n: int = 64,
                 n_batch: int = 8, callback: Callable[[int, str], bool] = lambda token_id, piece: True,
                 reset_context: bool = True) -> str:
        self.calls.append({"prompt": prompt, "max_tokens": max_tokens, "temp": temp, "top_k": top_k,
                           "top_p": top_p, "min_p": min_p, "repeat_penalty": repeat_penalty,
                           "repeat_last_n": repeat_last_n, "n_batch": n_batch, "reset_context": reset_context})
        self.started.set()
        prompt.encode()  # as gpt4all's prompt_model() does before calling llmodel_prompt
        if self.gate is not None and not self.gate.wait(timeout=10):
            raise RuntimeError("FakeModel: the gate was never opened")
        if self.error is not None:
            raise self.error
        tokens = fake_tokens(prompt)
        if len(tokens) > self.n_ctx:
            callback(-1, CONTEXT_ERROR_TEXT)
            return CONTEXT_ERROR_TEXT
        for token_id in tokens:
            if not self.model._prompt_callback(token_id):
                return ""
        answer = ""
        pieces = self.answers.pop(0) if self.answers else ([] if self.answers is not None else self.pieces)
        for piece in pieces[:max_tokens]:
            token_id = (fake_tokens(piece) or [1000])[0]
            if self.delay:
                time.sleep(self.delay)
            answer += piece
            if not callback(token_id, piece):
                break
        return answer


# --------------------------------------------------------------------------------------------
# A stand-in for kv_state.NativeContext on a FakeModel, and the states it saves.
# --------------------------------------------------------------------------------------------

VOCAB, CELL_BYTES, CELLS = 10, 96, 20


def state_bytes(cells: int = CELLS, kv_size: int = 64, v_trans: int = 1, cell: bytes = b"") -> bytes:
    """A state shaped as llama.cpp writes one (rng, outputs, logits, embeddings, KV, cells)."""
    rng = b"1 2 3 4 5"
    data = struct.pack("<Q", len(rng)) + rng + struct.pack("<Qi", 1, 0)
    data += struct.pack("<Q", VOCAB) + bytes(4 * VOCAB) + struct.pack("<Q", 0)
    data += struct.pack("<QIIII", CELL_BYTES * cells, cells, kv_size, cells, v_trans) + os.urandom(CELL_BYTES * cells)
    return data + b"".join(cell or struct.pack("<iQi", position, 1, 0) for position in range(cells))



KV_HEAD_AT = len(state_bytes(cells=0)) - 24 + 8  # the KV header (24 bytes) ends an empty state; kv_head is its 2nd field


class FakeNative:
    """kv_state.NativeContext on a FakeModel: the token list is the fake's, the tokenizer
    fake_tokens, a state is state_bytes() with a cell per token (its size grows with the context)."""

    layout = True  # what layout_holds() answers
    misread = 0  # bytes restore_state reads wrong

    def __init__(self, model: FakeModel):
        self.model = model
        self.restored: list[int] = []

    def layout_holds(self) -> bool:
        return self.layout

    def tokenize(self, text: str) -> list[int]:
        return fake_tokens(text)

    def tokens(self) -> list[int]:
        return list(self.model.model.tokens)

    def set_tokens(self, ids: Sequence[int]) -> None:
        self.model.model.tokens[:] = ids

    def state_size_bound(self) -> int:
        return 1 << 22

    def save_state(self, address: int) -> int:
        blob = state_bytes(cells=max(1, len(self.model.model.tokens)), kv_size=2048)
        ctypes.memmove(address, blob, len(blob))
        return len(blob)

    def restore_state(self, address: int) -> int:
        cells = ctypes.c_uint32.from_address(address + KV_HEAD_AT).value
        self.restored.append(cells)
        return len(state_bytes(cells=cells, kv_size=2048)) - self.misread
