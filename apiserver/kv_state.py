"""The model's context at gpt4all's native level: its token list read and written, its KV state
saved into and restored from memory, and text tokenized as gpt4all tokenizes a prompt.

gpt4all 2.8.2's Python bindings declare no signatures for llmodel_get_state_size,
llmodel_save_state_data and llmodel_restore_state_data (ctypes would cut the 64-bit pointer to an
int), and no C call sets the context's token list, against which the C++ prompt() checks n_past:
past its end the whole process aborts. The handle behind GPT4All.model.model points at
`struct LLModelWrapper { LLModel *model; PromptContext { std::vector<int32_t> tokens; int32_t
n_past; ... } }` (../shared/research/gpt4all-kv-state.md has the source and the disassembly).
NativeContext reads and writes that vector in place, with memory from libstdc++'s own operator new
(the vector frees it with operator delete), and only once layout_holds() has matched its three
pointers against what gpt4all itself reports after a prompt. gpt4all's tokenizer is reached the
same way: LLamaModel::tokenize (exported by the implementation library that holds the model's
vtable) called with a hand-made std::string and a returned std::vector. Imports only the standard
library: the caller passes the loaded model.
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Sequence
from typing import Any

from apiserver import system

# Offsets in LLModelWrapper (x86-64 and arm64, libstdc++ and libc++): the vector's three pointers, n_past.
VECTOR_BEGIN, VECTOR_END, VECTOR_CAPACITY, N_PAST = 0x08, 0x10, 0x18, 0x20
TOKEN_BYTES = 4
STATE_FUNCTIONS = ("llmodel_get_state_size", "llmodel_save_state_data", "llmodel_restore_state_data")
# std::vector<Token> LLamaModel::tokenize(PromptContext &, const std::string &, bool special), libstdc++'s ABI.
TOKENIZE = "_ZN10LLamaModel8tokenizeERN7LLModel13PromptContextERKNSt7__cxx1112basic_stringIcSt11char_traitsIcESaIcEEEb"


class NativeUnavailable(Exception):
    """This build of gpt4all (or this C++ runtime) does not offer what the prompt cache needs."""


def state_library() -> Any:
    """gpt4all's llmodel library with the three state functions declared (pointer in, size out)."""
    try:
        from gpt4all._pyllmodel import llmodel
        for name in STATE_FUNCTIONS:
            function = getattr(llmodel, name)
            function.argtypes = [ctypes.c_void_p] if name == "llmodel_get_state_size" else [ctypes.c_void_p] * 2
            function.restype = ctypes.c_uint64
    except (ImportError, AttributeError) as error:
        raise NativeUnavailable(f"gpt4all's state functions are missing: {error}") from None
    return llmodel


def cxx_allocator() -> Any:
    """libstdc++ (already loaded by gpt4all): operator new and operator delete, as the vector uses them."""
    try:
        library = ctypes.CDLL("libstdc++.so.6")
        allocate, free = library._Znwm, library._ZdlPv
    except (OSError, AttributeError) as error:
        raise NativeUnavailable(f"libstdc++'s operator new is not reachable: {error}") from None
    allocate.argtypes, allocate.restype = [ctypes.c_size_t], ctypes.c_void_p
    free.argtypes, free.restype = [ctypes.c_void_p], None
    return allocate, free


def mapped_file(address: int) -> str | None:
    """The file whose mapping holds address (/proc/self/maps), or None."""
    try:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as maps:
            for line in maps:
                fields = line.split(maxsplit=5)
                low, high = (int(bound, 16) for bound in fields[0].split("-"))
                if low <= address < high and len(fields) == 6:
                    return fields[5].strip()
    except OSError:
        return None
    return None


class NativeContext:
    """One loaded model's context: its token list, n_past, its KV state as bytes, its tokenizer."""

    def __init__(self, model: Any):
        self.llmodel = model.model  # gpt4all's LLModel
        self.handle = int(self.llmodel.model)  # the LLModelWrapper's address
        self.library = state_library()
        self.allocate, self.free = cxx_allocator()
        self.tokenize_function = self.find_tokenize()

    def find_tokenize(self) -> Any:
        """LLamaModel::tokenize of the implementation library the model's vtable lies in (gpt4all
        loads several variants; only that one's code goes with this object)."""
        if not system.proc():
            raise NativeUnavailable("gpt4all's tokenizer is found through /proc/self/maps, which this system lacks")
        model = self.pointer(0)
        path = mapped_file(ctypes.c_uint64.from_address(model).value) if model else None
        try:
            function = getattr(ctypes.CDLL(path, mode=os.RTLD_NOLOAD), TOKENIZE) if path else None
        except (OSError, AttributeError):
            function = None
        if function is None:
            raise NativeUnavailable(f"gpt4all's tokenizer is not reachable (model code in {path})")
        function.argtypes = [ctypes.c_void_p] * 4 + [ctypes.c_bool]
        function.restype = None  # the vector comes back through the first (hidden) pointer
        return function

    def tokenize(self, text: str) -> list[int]:
        """The ids gpt4all gives text (special tokens parsed); a BOS first when the model adds one
        and the last prompt started from an empty context."""
        data = text.encode("utf-8")
        buffer = ctypes.create_string_buffer(data, len(data) + 1)
        string = (ctypes.c_uint64 * 4)(ctypes.addressof(buffer), len(data), len(data), 0)  # pointer, size, capacity
        vector = (ctypes.c_uint64 * 3)()
        self.tokenize_function(ctypes.addressof(vector), self.pointer(0), self.handle + VECTOR_BEGIN,
                               ctypes.addressof(string), True)
        count = (vector[1] - vector[0]) // TOKEN_BYTES
        ids = list((ctypes.c_int32 * count).from_address(vector[0])) if count else []
        if vector[0]:
            self.free(vector[0])
        return ids

    def pointer(self, offset: int) -> int:
        return ctypes.c_uint64.from_address(self.handle + offset).value

    def write_pointer(self, offset: int, value: int) -> None:
        ctypes.c_uint64.from_address(self.handle + offset).value = value

    def layout_holds(self) -> bool:
        """After a prompt: the vector where we expect it holds what gpt4all reported (its data, its
        size, n_past). False means a wrapper laid out otherwise: touch nothing."""
        context = self.llmodel.context
        if context is None or context.tokens_size == 0:
            return False
        begin, end, capacity = (self.pointer(offset) for offset in (VECTOR_BEGIN, VECTOR_END, VECTOR_CAPACITY))
        return (begin == ctypes.cast(context.tokens, ctypes.c_void_p).value and begin <= end <= capacity
                and (end - begin) // TOKEN_BYTES == context.tokens_size
                and ctypes.c_int32.from_address(self.handle + N_PAST).value == context.n_past)

    def tokens(self) -> list[int]:
        """The ids in the context, in order (what gpt4all evaluated and generated)."""
        begin, end = self.pointer(VECTOR_BEGIN), self.pointer(VECTOR_END)
        count = (end - begin) // TOKEN_BYTES
        return list((ctypes.c_int32 * count).from_address(begin)) if count else []

    def set_tokens(self, ids: Sequence[int]) -> None:
        """Make ids the context's token list, as if gpt4all had evaluated them (it evaluates nothing)."""
        count = len(ids)
        begin, capacity = self.pointer(VECTOR_BEGIN), self.pointer(VECTOR_CAPACITY)
        if capacity - begin < count * TOKEN_BYTES:
            room = max(count, self.llmodel.context.n_ctx if self.llmodel.context else 0, 1)
            storage = self.allocate(room * TOKEN_BYTES)
            if begin:
                self.free(begin)
            begin = storage
            self.write_pointer(VECTOR_BEGIN, begin)
            self.write_pointer(VECTOR_CAPACITY, begin + room * TOKEN_BYTES)
        if count:
            ctypes.memmove(begin, (ctypes.c_int32 * count)(*ids), count * TOKEN_BYTES)
        self.write_pointer(VECTOR_END, begin + count * TOKEN_BYTES)

    def state_size_bound(self) -> int:
        """The most bytes a saved state can take (logits room for a whole batch: far above real use)."""
        return int(self.library.llmodel_get_state_size(self.handle))

    def save_state(self, address: int) -> int:
        """Write the KV state (rng, logits, cells) at address; returns the bytes written."""
        return int(self.library.llmodel_save_state_data(self.handle, address))

    def restore_state(self, address: int) -> int:
        """Read a state written by save_state (validated by the caller: llama.cpp asserts, and
        aborts the process, on a blob that does not fit); returns the bytes read."""
        return int(self.library.llmodel_restore_state_data(self.handle, address))
