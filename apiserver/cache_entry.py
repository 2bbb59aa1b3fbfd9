"""A prompt cache entry: one worker's evaluated context, written into a memory file (a memfd, never
on disk) that the watchdog keeps for the workers after it.

Layout: a fixed head (magic, header length, header CRC-32); the header, JSON: the fingerprint of
what wrote it (gpt4all's version, the model file's digest, n_ctx, the state's size bound and shape,
the template and its markers' token ids), the prompt's text up to its last boundary, the boundaries
(marks) and the token ids; then, at a page boundary, the KV state as llama.cpp wrote it, with its
length and CRC-32 in the header. read_header, open_state and check_state check all of that, down
to the state's own fields (state_shape), before llama.cpp sees a byte: it asserts, and aborts the
process, on a state that does not fit its context. Imports turns only.
"""

from __future__ import annotations

import ctypes
import dataclasses
import json
import mmap
import os
import struct
import zlib
from collections.abc import Sequence
from typing import Any, Callable

from apiserver.turns import Evaluated

MAGIC = b"gpt4all_api kv 1"
HEAD = struct.Struct("<16sII")  # magic, header length, header CRC-32
PAGE = mmap.ALLOCATIONGRANULARITY
HEADER_ROOM = 128  # bytes the blob's fields add to the header once the blob is written
SLACK = 1 << 16  # bytes allocated beyond a state's estimated size
MAP_POPULATE = getattr(mmap, "MAP_POPULATE", 0x8000)  # Python 3.10+ names it; Linux's value


class InvalidEntry(Exception):
    """An entry that must not be restored; the message says why (for the log)."""


@dataclasses.dataclass(frozen=True)
class StateSize:
    """A saved state's bytes: fixed plus per_token for each token in the context (learned by
    the self-test from two saves), so that its room is allocated before llama.cpp writes."""
    fixed: int
    per_token: int

    def estimate(self, tokens: int) -> int:
        return self.fixed + self.per_token * tokens + SLACK


@dataclasses.dataclass(frozen=True)
class Entry:
    evaluated: Evaluated
    tokens: tuple[int, ...]
    blob_offset: int
    blob_length: int
    blob_crc32: int


def round_up(value: int, step: int) -> int:
    return -(-value // step) * step


def write_entry(fd: int, fingerprint: dict[str, Any], evaluated: Evaluated, tokens: Sequence[int],
                save_state: Callable[[int], int], estimate: int, bound: int) -> int:
    """Write an entry into the memory file fd through save_state(address) -> bytes written, where
    estimate bytes are allocated ahead (posix_fallocate: no memory raises OSError here, never a
    SIGBUS inside llama.cpp) and bound is the most save_state may write. Returns the state's bytes."""
    document: dict[str, Any] = {"fingerprint": fingerprint, "text": evaluated.text, "marks": evaluated.marks,
                                "tokens": list(tokens)}
    draft = json.dumps(document, ensure_ascii=False).encode("utf-8")
    blob_offset = round_up(HEAD.size + len(draft) + HEADER_ROOM, PAGE)
    os.posix_fallocate(fd, 0, blob_offset + estimate)
    os.ftruncate(fd, blob_offset + bound)
    with mmap.mmap(fd, blob_offset + bound) as mapping:
        length = save_state(ctypes.addressof(ctypes.c_char.from_buffer(mapping, blob_offset)))
        if not 0 < length <= bound:
            raise OSError(f"the model saved {length} bytes of state (at most {bound} fit)")
        with memoryview(mapping) as view:
            crc = zlib.crc32(view[blob_offset:blob_offset + length])
    document.update(blob_offset=blob_offset, blob_length=length, blob_crc32=crc)
    header = json.dumps(document, ensure_ascii=False).encode("utf-8")
    os.ftruncate(fd, blob_offset + length)
    os.pwrite(fd, HEAD.pack(MAGIC, len(header), zlib.crc32(header)) + header, 0)
    return length


def read_header(fd: int, fingerprint: dict[str, Any]) -> Entry:
    """The entry in fd, every field checked against its file and against our fingerprint."""
    size = os.fstat(fd).st_size
    head = os.pread(fd, HEAD.size, 0)
    if len(head) < HEAD.size:
        raise InvalidEntry(f"truncated: {size} bytes")
    magic, header_length, header_crc = HEAD.unpack(head)
    if magic != MAGIC:
        raise InvalidEntry("not a prompt cache entry of this version")
    header = os.pread(fd, header_length, HEAD.size) if header_length <= size else b""
    if len(header) != header_length or zlib.crc32(header) != header_crc:
        raise InvalidEntry("its header is damaged (length or checksum)")
    try:
        document = json.loads(header)
        theirs = document["fingerprint"]
        entry = Entry(Evaluated(document["text"], tuple((int(a), int(b)) for a, b in document["marks"])),
                      tuple(int(token) for token in document["tokens"]), int(document["blob_offset"]),
                      int(document["blob_length"]), int(document["blob_crc32"]))
    except (ValueError, KeyError, TypeError) as error:
        raise InvalidEntry(f"its header does not parse: {error!r}") from None
    different = sorted(key for key in set(fingerprint) | set(theirs) if fingerprint.get(key) != theirs.get(key))
    if different:
        raise InvalidEntry(f"made by another setup (differs in {', '.join(different)})")
    marks = entry.evaluated.marks
    if (entry.blob_offset % PAGE or entry.blob_offset < HEAD.size + header_length or entry.blob_length <= 0
            or size < entry.blob_offset + entry.blob_length):
        raise InvalidEntry(f"truncated: {size} bytes, its state ends at {entry.blob_offset + entry.blob_length}")
    increasing = all(a[0] < b[0] and a[1] < b[1] for a, b in zip(((0, 0),) + marks, marks))
    if not marks or not increasing or marks[-1][1] > len(entry.tokens) or marks[-1][0] != len(entry.evaluated.text):
        raise InvalidEntry("its boundaries do not match its tokens")
    return entry


@dataclasses.dataclass(frozen=True)
class StateShape:
    """The fields of a state as llama.cpp (gpt4all 2.8.2's, session format 7) writes it: the rng as
    text, the output ids, the logits, the embeddings, the KV cache's header and data, then each
    cell's position and sequence ids."""
    outputs: int
    logits: int  # floats
    embeddings: int  # floats
    kv_bytes: int
    kv_head: int  # cells written
    kv_size: int  # cells in the context
    kv_used: int
    v_trans: int
    end: int  # bytes, when every cell is well formed (each holds sequence 0 only, at a position in the context)


def state_shape(state: Any) -> StateShape:
    """Walk a state's fields (state: a buffer); InvalidEntry when they run past its end."""
    try:
        rng_length, = struct.unpack_from("<Q", state, 0)
        offset = 8 + rng_length
        outputs, = struct.unpack_from("<Q", state, offset)
        offset += 8 + 4 * outputs
        logits, = struct.unpack_from("<Q", state, offset)
        offset += 8 + 4 * logits
        embeddings, = struct.unpack_from("<Q", state, offset)
        offset += 8 + 4 * embeddings
        kv_bytes, kv_head, kv_size, kv_used, v_trans = struct.unpack_from("<QIIII", state, offset)
        offset += 24 + kv_bytes
        for _ in range(kv_head if kv_head <= kv_size else 0):
            position, sequences = struct.unpack_from("<iQ", state, offset)
            if sequences != 1 or not 0 <= position < kv_size or struct.unpack_from("<i", state, offset + 12)[0]:
                offset = -1
                break
            offset += 16
    except struct.error:
        raise InvalidEntry("its state ends inside its own fields") from None
    return StateShape(outputs, logits, embeddings, kv_bytes, kv_head, kv_size, kv_used, v_trans, offset)


def shape_facts(shape: StateShape) -> dict[str, int]:
    """What every state of one model and context shares (the self-test's state tells; part of
    the fingerprint): logits per output, cells, the V layout, the KV bytes per cell."""
    return {"logits_per_output": shape.logits // max(1, shape.outputs), "kv_size": shape.kv_size,
            "v_trans": shape.v_trans, "kv_bytes_per_cell": shape.kv_bytes // max(1, shape.kv_head)}


def check_state(state: Any, length: int, facts: dict[str, int]) -> None:
    """InvalidEntry unless the state has the shape llama.cpp will read without an assertion."""
    shape = state_shape(state)
    if (shape.end != length or shape.outputs != 1 or shape.embeddings
            or shape.logits != facts["logits_per_output"] or shape.kv_size != facts["kv_size"]
            or shape.v_trans != facts["v_trans"] or not 0 < shape.kv_head <= shape.kv_size
            or shape.kv_used > shape.kv_head or shape.kv_bytes != facts["kv_bytes_per_cell"] * shape.kv_head):
        raise InvalidEntry("its state does not have this model's shape")


class MappedState:
    """An entry's state mapped read-only (shared, populated: nothing is copied); address for llama.cpp."""

    def __init__(self, fd: int, entry: Entry):
        self.libc = ctypes.CDLL(None, use_errno=True)
        self.libc.mmap.restype = ctypes.c_void_p
        self.libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                                   ctypes.c_long]
        self.libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.length = entry.blob_length
        address = self.libc.mmap(None, self.length, mmap.PROT_READ, mmap.MAP_SHARED | MAP_POPULATE, fd,
                                 entry.blob_offset)
        if address in (None, ctypes.c_void_p(-1).value):
            raise InvalidEntry(f"cannot map it: {os.strerror(ctypes.get_errno())}")
        self.address: int = address

    def view(self) -> Any:
        """The state as a buffer (read-only memory: nothing may write through it)."""
        return (ctypes.c_char * self.length).from_address(self.address)

    def close(self) -> None:
        self.libc.munmap(self.address, self.length)


def state_facts(fd: int, entry: Entry) -> dict[str, int]:
    """shape_facts of an entry's state (the self-test's own, which the others must share)."""
    state = MappedState(fd, entry)
    try:
        return shape_facts(state_shape(state.view()))
    finally:
        state.close()


def open_state(fd: int, entry: Entry, facts: dict[str, int]) -> MappedState:
    """The entry's state, mapped, checked against its checksum and its shape."""
    state = MappedState(fd, entry)
    try:
        if zlib.crc32(state.view()) != entry.blob_crc32:
            raise InvalidEntry("its state is damaged (checksum)")
        check_state(state.view(), entry.blob_length, facts)
    except InvalidEntry:
        state.close()
        raise
    return state


def memory_file(name: str = "gpt4all_api prompt cache") -> int:
    """A new memory file (memfd): in RAM, owned by this user, gone with the last descriptor."""
    return os.memfd_create(name, getattr(os, "MFD_CLOEXEC", 1))

