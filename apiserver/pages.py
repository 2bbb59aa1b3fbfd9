"""The pre-warm of a forked worker: copy, before it is activated, the memory pages a generation writes.

A worker forked from the zygote shares the zygote's pages; the first time it writes one (its
context's KV cache, llama.cpp's scratch buffers, the logits, Python's heap) the kernel copies it.
Paid inside the first request, that was 60 - 90 ms of its first token. The zygote learns once
which pages those are: a probe child forks, runs a short generation, and reports the pages that
became its own (the "exclusively mapped" bit of /proc/self/pagemap), about 25 MB on the default
model. Each forked worker then copies exactly those with madvise(MADV_POPULATE_WRITE) (Linux 5.14),
which copies without changing a byte, in 15 - 25 ms, before it is ready. Anything unsupported
(another OS, an older kernel, no pagemap) makes these functions do nothing. Imports only the
standard library.
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
from typing import Callable, List, Tuple

log = logging.getLogger("gpt4all_api")

Ranges = List[Tuple[int, int]]  # (address, length in bytes)
MADV_POPULATE_WRITE = 23
PRESENT, EXCLUSIVE, FILE_OR_SHARED = 1 << 63, 1 << 56, 1 << 61  # /proc/PID/pagemap entry bits
PROBE_TIMEOUT = 60.0


def own_written_pages() -> Ranges:
    """This process's pages in private writable mappings that are present and exclusively its own
    (after a fork: the ones it has written since), merged into ranges."""
    page = os.sysconf("SC_PAGE_SIZE")
    ranges: Ranges = []
    with open("/proc/self/maps", encoding="ascii", errors="replace") as maps, open("/proc/self/pagemap", "rb") as pagemap:
        for line in maps:
            fields = line.split()
            if not fields[1].startswith("rw") or fields[1][3] != "p":
                continue
            low, high = (int(bound, 16) for bound in fields[0].split("-"))
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


def probe_written_pages(generate: Callable[[], None]) -> Ranges:
    """In a forked child: run generate(), report the pages it made its own. The caller (the
    zygote) must be single-threaded, as for any fork. [] when anything fails."""
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
