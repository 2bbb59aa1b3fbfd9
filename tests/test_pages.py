"""The forked worker's pre-warm, learned from real requests (apiserver/pages.py), and its path from a
worker through the watchdog to the zygote (forking.serve_fork_requests)."""

from __future__ import annotations

import ctypes
import json
import logging
import socket
import threading

import pytest

from apiserver import pages
from apiserver.forking import serve_fork_requests
from apiserver.pages import LEARN_FROM, LearnedPages, clip_ranges, merge_ranges, private_writable_mappings
from apiserver.protocol import EXIT_OK, ZYGOTE_PAGES


def test_ranges_merge_and_clip():
    assert merge_ranges([(30, 10), (0, 10), (10, 5), (12, 1), (50, 0)]) == [(0, 15), (30, 10)]
    assert clip_ranges([(0, 100), (150, 100)], [(50, 120), (400, 10)]) == [(50, 50), (150, 20)]
    assert clip_ranges([(0, 10)], []) == []


def test_a_workers_report_adds_only_pages_inside_the_zygotes_own_private_mappings(caplog: pytest.LogCaptureFixture):
    block = bytearray(1 << 20)  # private writable memory of this process
    address = ctypes.addressof((ctypes.c_char * len(block)).from_buffer(block))
    assert any(low <= address < low + size for low, size in private_writable_mappings())
    learned = LearnedPages([(address, 4096)])
    reported = [(address + 8192, 8192), (address + 4096, 4096), (8, 4096)]  # the last is no mapping of ours
    with caplog.at_level(logging.INFO, logger="gpt4all_api"):
        learned.receive(json.dumps(reported).encode())
    assert learned.ranges == [(address, 16384)]
    assert "16 KiB more learned" not in caplog.text and "12 KiB more learned" in caplog.text
    for garbage in (b"not json", b"[[1]]", b'{"a": 1}', b"[[\"x\", 2]]"):
        learned.receive(garbage)  # a malformed report changes nothing and raises nothing
    assert learned.ranges == [(address, 16384)]


def test_reports_are_wanted_from_the_first_workers_only_and_the_copy_stays_bounded(
        caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch):
    learned = LearnedPages([])
    for _ in range(LEARN_FROM):
        assert learned.wanted
        learned.receive(b"[]")
    assert not learned.wanted
    block = bytearray(1 << 20)
    address = ctypes.addressof((ctypes.c_char * len(block)).from_buffer(block))
    monkeypatch.setattr(pages, "MAX_LEARNED", 8192)
    bounded = LearnedPages([(address, 4096)])
    with caplog.at_level(logging.INFO, logger="gpt4all_api"):
        bounded.receive(json.dumps([(address + 4096, 4096)]).encode())  # 8 KiB in all: kept
        bounded.receive(json.dumps([(address + 8192, 4096)]).encode())  # 12 KiB: refused
    assert bounded.ranges == [(address, 8192)] and "would make the pre-warm" in caplog.text


def test_the_zygotes_loop_passes_forwarded_pages_on_and_ends_when_the_watchdog_hangs_up():
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_SEQPACKET)
    got, result = [], []
    loop = threading.Thread(target=lambda: result.append(serve_fork_requests(theirs, lambda: 0, on_pages=got.append)))
    loop.start()
    assert ours.recv(64).startswith(b"ready ")
    big = json.dumps([[index * 8192, 4096] for index in range(5000)]).encode()  # larger than one page of text
    ours.send(ZYGOTE_PAGES + b"[[4096, 8192]]")
    ours.send(ZYGOTE_PAGES + big)
    ours.close()
    loop.join(5)
    assert result == [EXIT_OK] and got == [b"[[4096, 8192]]", big]
    theirs.close()
