"""The pre-warm of a forked worker: copy, before it is activated, the memory pages a generation writes.

A worker forked from the zygote shares the zygote's pages; the first time it writes one (its
context's KV cache, llama.cpp's scratch buffers, the logits, Python's heap) the kernel copies it.
Paid inside the first request, that was 60 - 90 ms of its first token. The zygote learns once
which pages those are: a probe child forks, runs a short generation, and reports the pages that
became its own (the "exclusively mapped" bit of /proc/self/pagemap), about 25 MB on the default
model. Each forked worker then copies exactly those with madvise(MADV_POPULATE_WRITE) (Linux 5.14),
which copies without changing a byte, in 15 - 25 ms, before it is ready. The probe's short
generation misses pages a real request writes (Python's, serving HTTP; the KV cache of longer
prompts): about 600 pages per request on the default model were still copied by faults inside the
generation. So the first LEARN_FROM workers report, after their request, the pages they made their
own (through the watchdog to the zygote, LearnedPages), and the workers forked after that copy
those too: 13 such faults per request instead of 618, for 5 MiB more copied ahead. Anything
unsupported (another OS, an older kernel, no pagemap) makes these functions do nothing. Imports
only the standard library.
"""

from __future__ import annotations

import ctypes
import json
import logging
import os
import select
import signal
import struct
import time
from typing import Callable

from apiserver import system

log = logging.getLogger("gpt4all_api")

Ranges = list[tuple[int, int]]  # (address, length in bytes)
MADV_POPULATE_WRITE = 23
PRESENT, EXCLUSIVE, FILE_OR_SHARED = 1 << 63, 1 << 56, 1 << 61  # /proc/PID/pagemap entry bits
PROBE_TIMEOUT = 60.0
LEARN_FROM = 12  # workers that report the pages they wrote: each costs it 30 - 50 ms (pagemap read) at its exit
MAX_LEARNED = 64 << 20  # bytes: a bound on each forked worker's pre-warm copy


def memory_mappings(maps: str | None = None) -> list[tuple[int, int, str, int, str]]:
    """This process's mappings, from /proc/self/maps (or the text given): (address, length,
    permissions, offset in the file, path or "")."""
    if maps is None:
        with open("/proc/self/maps", encoding="utf-8", errors="replace") as handle:
            maps = handle.read()
    found = []
    for line in maps.splitlines():
        fields = line.split(maxsplit=5)
        if len(fields) >= 5:
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
            found.append((low, high - low, fields[1], int(fields[2], 16), fields[5].strip() if len(fields) == 6 else ""))
    return found


def private_writable_mappings() -> Ranges:
    """This process's private writable mappings (anonymous memory, the heap, libraries' data)."""
    return [(low, size) for low, size, permissions, _, _ in memory_mappings()
            if permissions.startswith("rw") and permissions[3] == "p"]


def own_written_pages() -> Ranges:
    """This process's pages in private writable mappings that are present and exclusively its own
    (after a fork: the ones it has written since), merged into ranges."""
    page = os.sysconf("SC_PAGE_SIZE")
    ranges: Ranges = []
    with open("/proc/self/pagemap", "rb") as pagemap:
        for low, size in private_writable_mappings():
            high = low + size
            pagemap.seek(low // page * 8)
            data = pagemap.read((high - low) // page * 8)
            start = None
            for index, entry in enumerate(struct.unpack(f"{len(data) // 8}Q", data) + (0,)):
                mine = entry & PRESENT and entry & EXCLUSIVE and not entry & FILE_OR_SHARED
                if mine and start is None:
                    start = index
                elif not mine and start is not None:
                    ranges.append((low + start * page, (index - start) * page))
                    start = None
    return ranges


def merge_ranges(ranges: Ranges) -> Ranges:
    """Sorted, overlapping and adjacent ranges joined."""
    merged: Ranges = []
    for address, length in sorted(ranges):
        if merged and address <= merged[-1][0] + merged[-1][1]:
            end = max(merged[-1][0] + merged[-1][1], address + length)
            merged[-1] = (merged[-1][0], end - merged[-1][0])
        elif length > 0:
            merged.append((address, length))
    return merged


def clip_ranges(ranges: Ranges, within: Ranges) -> Ranges:
    """The parts of ranges inside within (both merged)."""
    clipped: Ranges = []
    for address, length in merge_ranges(ranges):
        for low, size in within:
            start, end = max(address, low), min(address + length, low + size)
            if start < end:
                clipped.append((start, end - start))
    return clipped


class LearnedPages:
    """The pages each forked worker copies before it is ready: the probe's, and those the first
    LEARN_FROM workers reported writing while they answered a real request. A fault inside the
    generation costs tens of microseconds while the other generation thread waits; the copy ahead
    costs a few, beside the other worker's generation or in its pauses. Kept inside this process's
    private writable mappings (what a worker created for itself is not the zygote's to copy), at
    most MAX_LEARNED bytes."""

    def __init__(self, probed: Ranges):
        self.ranges = merge_ranges(probed)
        self.reports = 0

    @property
    def wanted(self) -> bool:
        """Should the next worker report the pages it wrote?"""
        return self.reports < LEARN_FROM

    def receive(self, report: bytes) -> None:
        """A worker's report, as the watchdog forwards it: JSON [[address, length], ...]."""
        try:
            reported = [(int(address), int(length)) for address, length in json.loads(report)]
        except (ValueError, TypeError):
            return
        self.reports += 1
        merged = merge_ranges(self.ranges + clip_ranges(reported, merge_ranges(private_writable_mappings())))
        before, after = (sum(length for _, length in ranges) for ranges in (self.ranges, merged))
        if after > MAX_LEARNED:
            log.info("a worker's written pages would make the pre-warm %d MiB: kept at %d MiB", after >> 20, before >> 20)
            return
        self.ranges = merged
        log.info("pre-warm: %d KiB more learned from a worker's request, %.1f MiB in all", (after - before) >> 10,
                 after / 2**20)


def probe_written_pages(generate: Callable[[], None]) -> Ranges:
    """In a forked child: run generate(), report the pages it made its own. The caller (the
    zygote) must be single-threaded, as for any fork. [] when anything fails, or where the
    system has no page maps (system.page_control)."""
    if not system.page_control():
        return []
    reader, writer = os.pipe()
    try:
        child = os.fork()
    except OSError as error:
        os.close(reader)
        os.close(writer)
        log.warning("cannot probe the pages a generation writes (%s): no pre-warm", error)
        return []
    if child == 0:
        code = 1
        try:
            os.close(reader)
            generate()
            os.write(writer, json.dumps(own_written_pages()).encode())
            code = 0
        except BaseException as error:  # report nothing: the parent goes on without a pre-warm
            os.write(2, f"page probe failed: {error!r}\n".encode())
        finally:
            os._exit(code)
    os.close(writer)
    data, deadline = b"", time.monotonic() + PROBE_TIMEOUT
    try:
        while select.select([reader], [], [], max(0.0, deadline - time.monotonic()))[0]:
            chunk = os.read(reader, 1 << 20)
            if not chunk:
                break
            data += chunk
        else:
            log.warning("the page probe did not finish in %g s: no pre-warm", PROBE_TIMEOUT)
            os.kill(child, signal.SIGKILL)
            data = b""
    finally:
        os.close(reader)
        os.waitpid(child, 0)
    try:
        return [(int(address), int(length)) for address, length in json.loads(data or b"[]")]
    except (ValueError, TypeError):
        return []


def populate(ranges: Ranges) -> int:
    """Copy these pages into this process now (MADV_POPULATE_WRITE: content unchanged). Returns
    the bytes done; stops at the first refusal (an older kernel says EINVAL)."""
    if not ranges:
        return 0
    try:
        madvise = ctypes.CDLL(None, use_errno=True).madvise
    except (OSError, AttributeError):
        return 0
    madvise.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]
    done = 0
    for address, length in ranges:
        if madvise(address, length, MADV_POPULATE_WRITE) != 0:
            if ctypes.get_errno() == 22:  # EINVAL: not supported here
                break
            continue  # EFAULT/ENOMEM on a range that changed since the probe: skip it
        done += length
    return done
