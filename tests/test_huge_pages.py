"""The zygote's memory in huge pages (apiserver/huge_pages.py): the model's weights moved from the
file's mapping into anonymous memory, on a real read-only mapping of a file in this process; the
other memory collapsed."""

from __future__ import annotations

import logging
import mmap
import os
import sys
from pathlib import Path

import pytest

from apiserver import huge_pages
from apiserver.huge_pages import file_mappings, huge_pages_available, move_weights_into_huge_pages

pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux: /proc/self/maps, mremap")


@pytest.fixture
def mapped_file(tmp_path: Path):
    """A file of 3 MiB and a bit (its last page runs past the end), mapped read-only and shared as
    llama.cpp maps a model; (path, its bytes, the mapping)."""
    path = tmp_path / "model.gguf"
    content = os.urandom(3 * (1 << 20) + 1234)
    path.write_bytes(content)
    with open(path, "rb") as handle:
        mapping = mmap.mmap(handle.fileno(), 0, flags=mmap.MAP_SHARED, prot=mmap.PROT_READ)
    yield path, content, mapping
    mapping.close()


def test_the_kernels_setting_decides_whether_huge_pages_are_there(tmp_path: Path):
    setting = tmp_path / "enabled"
    for text, available in (("always [madvise] never\n", True), ("[always] madvise never\n", True),
                            ("always madvise [never]\n", False)):
        setting.write_text(text)
        assert huge_pages_available(setting) is available
    assert huge_pages_available(tmp_path / "missing") is False


def test_mappings_of_the_file_are_found_in_the_maps_text(tmp_path: Path):
    path = tmp_path / "model.gguf"
    path.write_bytes(b"x")
    maps = (f"7f0000000000-7f0000400000 r--s 00000000 fd:01 1234                       {path}\n"
            f"7f0000400000-7f0000600000 r--s 00600000 fd:01 1234                       {path}\n"
            "7f0000600000-7f0000700000 rw-p 00000000 00:00 0 \n"
            f"7f0000650000-7f0000660000 rw-p 00000000 fd:01 1234                       {path}\n"
            f"7f0000700000-7f0000800000 r--s 00000000 fd:01 99                         {path}.other\n")
    assert file_mappings(path, maps) == [(0x7F0000000000, 0x400000, 0), (0x7F0000400000, 0x200000, 0x600000)]


def test_the_mapping_becomes_anonymous_memory_holding_the_same_bytes(mapped_file, monkeypatch):
    path, content, mapping = mapped_file
    monkeypatch.setattr(huge_pages, "huge_pages_available", lambda: True)  # the move works without them too
    (address, length, _), = file_mappings(path)
    assert length == -(-len(content) // mmap.PAGESIZE) * mmap.PAGESIZE
    assert move_weights_into_huge_pages(path) == length
    assert file_mappings(path) == []  # the file is no longer mapped here
    assert mapping[:] == content  # the same address reads the same bytes
    with open("/proc/self/maps", encoding="utf-8") as maps:
        line = next(line for line in maps if int(line.split("-")[0], 16) <= address < int(line.split()[0].split("-")[1], 16))
    assert line.split()[1] == "r--p" and line.split()[4] == "0"  # read-only, private, anonymous


def test_without_huge_pages_or_memory_the_file_stays_mapped(mapped_file, monkeypatch, caplog):
    path, content, mapping = mapped_file
    monkeypatch.setattr(huge_pages, "huge_pages_available", lambda: False)
    with caplog.at_level(logging.INFO, logger="gpt4all_api"):
        assert move_weights_into_huge_pages(path) == 0
    assert "transparent huge pages are off" in caplog.text
    monkeypatch.setattr(huge_pages, "huge_pages_available", lambda: True)
    monkeypatch.setattr(huge_pages, "proc_kib_field", lambda path, field: 5 << 20)
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="gpt4all_api"):
        assert move_weights_into_huge_pages(path) == 0
    assert "a copy needs twice that" in caplog.text
    assert len(file_mappings(path)) == 1 and mapping[:] == content
    assert move_weights_into_huge_pages(path.with_name("other.gguf")) == 0  # nothing mapped: nothing done


def test_a_failed_copy_leaves_the_file_mapped_and_nothing_behind(mapped_file, monkeypatch, caplog):
    path, content, mapping = mapped_file
    monkeypatch.setattr(huge_pages, "huge_pages_available", lambda: True)

    def failing_read(fd: int, address: int, length: int, offset: int) -> None:
        raise OSError(5, "Input/output error")
    monkeypatch.setattr(huge_pages, "read_into", failing_read)
    with open("/proc/self/maps", encoding="utf-8") as maps:
        before = maps.read().count("\n")
    with caplog.at_level(logging.INFO, logger="gpt4all_api"):
        assert move_weights_into_huge_pages(path) == 0
    assert "Input/output error" in caplog.text and "left mapped from the file" in caplog.text
    with open("/proc/self/maps", encoding="utf-8") as maps:
        assert maps.read().count("\n") <= before  # the reserved copy was unmapped again
    assert len(file_mappings(path)) == 1 and mapping[:] == content


def test_private_anonymous_mappings_are_read_from_the_maps_text():
    maps = ("55d000000000-55d000400000 rw-p 00000000 00:00 0                          [heap]\n"
            "7f0000000000-7f0000800000 rw-p 00000000 00:00 0 \n"
            "7f0000800000-7f0000900000 r--p 00000000 00:00 0 \n"
            "7f0000900000-7f0000a00000 rw-p 00001000 fd:01 77                         /usr/lib/libx.so\n"
            "7ffc00000000-7ffc00100000 rw-p 00000000 00:00 0                          [stack]\n")
    assert huge_pages.private_anonymous_mappings(maps) == [(0x55D000000000, 0x400000), (0x7F0000000000, 0x800000)]


def test_dense_anonymous_memory_is_collapsed_into_huge_pages_with_its_bytes_unchanged(monkeypatch):
    monkeypatch.setattr(huge_pages, "huge_pages_available", lambda: True)
    block = mmap.mmap(-1, 8 << 20)  # private anonymous memory, written all over
    content = os.urandom(8 << 20)
    block[:] = content
    collapsed = huge_pages.collapse_into_huge_pages()
    assert block[:] == content and collapsed >= 0
    release = tuple(int(part) for part in os.uname().release.split("-")[0].split(".")[:2])
    if release >= (6, 1) and huge_pages_available():
        assert collapsed >= 2 << 20  # at least the aligned part of this block
    block.close()
