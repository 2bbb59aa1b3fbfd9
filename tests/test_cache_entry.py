"""A prompt cache entry (apiserver/cache_entry.py) written and read back, and every way one can be
unfit to restore: damaged, truncated, written by another setup, or a state of another shape."""

from __future__ import annotations

import ctypes
import os
import struct

import pytest

from apiserver.cache_entry import (
    InvalidEntry,
    StateSize,
    memory_file,
    open_state,
    read_header,
    state_facts,
    state_shape,
    write_entry,
)
from apiserver.turns import Evaluated
from fake_model import CELL_BYTES, VOCAB, state_bytes

FINGERPRINT = {"gpt4all": "2.8.2", "model": "abc", "n_ctx": 64, "state_bound": 1 << 20}


def saver(blob: bytes):
    def save_state(address: int) -> int:
        ctypes.memmove(address, blob, len(blob))
        return len(blob)
    return save_state


SYSTEM_TURN = "<|im_start|>system\nS<|im_end|>\n"
CONTEXT = Evaluated(SYSTEM_TURN, ((len(SYSTEM_TURN), 5),))


@pytest.fixture
def entry_file():
    fd = memory_file("test entry")
    write_entry(fd, FINGERPRINT, CONTEXT, [1, 2, 3, 4, 5, 6], saver(state_bytes()), 4096, 1 << 20)
    yield fd
    os.close(fd)


def facts(fd: int) -> dict[str, int]:
    return state_facts(fd, read_header(fd, FINGERPRINT))


def test_an_entry_reads_back_as_it_was_written(entry_file):
    entry = read_header(entry_file, FINGERPRINT)
    assert entry.evaluated == CONTEXT and entry.tokens == (1, 2, 3, 4, 5, 6)
    assert entry.blob_length == len(state_bytes()) and entry.blob_offset % 4096 == 0
    assert os.fstat(entry_file).st_size == entry.blob_offset + entry.blob_length, "the file is cut to its state"
    state = open_state(entry_file, entry, facts(entry_file))
    try:
        assert bytes(state.view())[:20] == state_bytes()[:20]
    finally:
        state.close()
    assert facts(entry_file) == {"logits_per_output": VOCAB, "kv_size": 64, "v_trans": 1,
                                 "kv_bytes_per_cell": CELL_BYTES}


def flip(fd: int, offset: int) -> None:
    byte = os.pread(fd, 1, offset)
    os.pwrite(fd, bytes([byte[0] ^ 0xFF]), offset)


def test_a_damaged_header_or_state_is_refused(entry_file):
    known = facts(entry_file)
    entry = read_header(entry_file, FINGERPRINT)
    flip(entry_file, entry.blob_offset + 100)
    with pytest.raises(InvalidEntry, match="checksum"):
        open_state(entry_file, entry, known)
    flip(entry_file, 30)
    with pytest.raises(InvalidEntry, match="header is damaged"):
        read_header(entry_file, FINGERPRINT)


def test_a_truncated_entry_is_refused(entry_file):
    entry = read_header(entry_file, FINGERPRINT)
    os.ftruncate(entry_file, entry.blob_offset + entry.blob_length - 1)
    with pytest.raises(InvalidEntry, match="truncated"):
        read_header(entry_file, FINGERPRINT)
    os.ftruncate(entry_file, 10)
    with pytest.raises(InvalidEntry, match="truncated"):
        read_header(entry_file, FINGERPRINT)


def test_an_entry_of_another_setup_is_refused(entry_file):
    with pytest.raises(InvalidEntry, match=r"another setup \(differs in n_ctx\)"):
        read_header(entry_file, {**FINGERPRINT, "n_ctx": 128})
    with pytest.raises(InvalidEntry, match="model"):
        read_header(entry_file, {**FINGERPRINT, "model": "def"})


def test_a_state_of_another_shape_is_refused_before_the_model_reads_it(entry_file):
    known = facts(entry_file)
    for blob, why in [(state_bytes(kv_size=128), "another context size"),
                      (state_bytes(v_trans=0), "another V layout"),
                      (state_bytes(cell=struct.pack("<iQi", 70, 1, 0)), "a cell past the context"),
                      (state_bytes(cell=struct.pack("<iQi", 1, 1, 3)), "another sequence"),
                      (state_bytes()[:-8], "cut inside its cells")]:
        fd = memory_file("test entry")
        try:
            write_entry(fd, FINGERPRINT, CONTEXT, [1, 2, 3, 4, 5, 6], saver(blob), 0, 1 << 20)
            with pytest.raises(InvalidEntry):
                state = open_state(fd, read_header(fd, FINGERPRINT), known)
                state.close()
                pytest.fail(f"a state with {why} was accepted")
        finally:
            os.close(fd)


def test_the_shape_walk_stops_at_the_end_of_a_short_buffer():
    with pytest.raises(InvalidEntry, match="ends inside"):
        state_shape(state_bytes()[:30])


def test_boundaries_beyond_the_tokens_are_refused():
    fd = memory_file("test entry")
    try:
        write_entry(fd, FINGERPRINT, CONTEXT, [1, 2], saver(state_bytes()), 0, 1 << 20)
        with pytest.raises(InvalidEntry, match="boundaries"):
            read_header(fd, FINGERPRINT)
    finally:
        os.close(fd)


def test_no_room_for_the_state_is_an_error_before_anything_is_written():
    """posix_fallocate reserves the state's memory first: a full tmpfs or a memory limit is an
    OSError there, never a SIGBUS while llama.cpp writes (RLIMIT_FSIZE stands in for both)."""
    pid = os.fork()
    if pid == 0:
        import resource
        code = 1
        try:
            resource.setrlimit(resource.RLIMIT_FSIZE, (1 << 16, 1 << 16))
            fd = memory_file("test entry")
            try:
                write_entry(fd, FINGERPRINT, CONTEXT, [1, 2, 3, 4, 5, 6], saver(state_bytes()),
                            StateSize(0, 0).estimate(1 << 20), 1 << 22)
            except OSError:
                code = 0
        finally:
            os._exit(code)
    _, status = os.waitpid(pid, 0)
    assert os.waitstatus_to_exitcode(status) == 0
