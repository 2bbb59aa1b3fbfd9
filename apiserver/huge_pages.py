"""The zygote's memory in transparent huge pages: fewer page-table entries for each fork to copy,
each forked worker to fault in, and each exit to remove.

A fresh process per request costs, besides the page copies of the pre-warm (pages.py), the
page-table work of making and ending processes on the cores the next generation runs on. Two
changes shrink it, both done once in the zygote before it forks:
- The model's weights. gpt4all (llama.cpp) maps the GGUF file read-only and shared. Linux does not
  copy a file mapping's page-table entries at fork: every forked worker refilled them by faulting
  through the weights during its first token (fault-around maps 16 pages per fault), and its exit
  removed them again, one entry per 4 KiB page. Moved into anonymous memory with transparent huge
  pages (same bytes, same address, read-only), they are a few hundred 2 MiB entries: a fork copies
  them, the worker takes no fault on them, its exit drops them. The price, as with llama.cpp's
  --no-mmap: the copy at the zygote's start, and the weights become the zygote's own memory (shared
  by every worker it forks) instead of page cache, which the kernel cannot reclaim without swap.
- The zygote's other memory (the KV cache, llama.cpp's buffers, Python's heap), collapsed into huge
  pages where it is dense (madvise(MADV_COLLAPSE), Linux 6.1): each fork copies and each exit drops
  fewer entries. A worker that writes into such a page copies only the 4 KiB it writes, as before.

Done only when the kernel gives huge pages (transparent_hugepage "always" or "madvise": 4 KiB
anonymous pages would make forks slower, not faster); the weights only when the memory available
holds a second copy while it is made. Anything else leaves the memory as it is, with a log line.
Imports pages (its reader of /proc/self/maps) and the standard library.
"""

from __future__ import annotations

import ctypes
import logging
import os
import time
from pathlib import Path

from apiserver import system
from apiserver.pages import memory_mappings

log = logging.getLogger("gpt4all_api")

HUGE_PAGE = 2 << 20
THP_SETTING = Path("/sys/kernel/mm/transparent_hugepage/enabled")
PROT_READ, PROT_WRITE = 1, 2
MAP_PRIVATE, MAP_ANONYMOUS = 0x02, 0x20
MADV_HUGEPAGE, MADV_COLLAPSE = 14, 25
MREMAP_MAYMOVE, MREMAP_FIXED = 1, 2
READ_CHUNK = 64 << 20

Mapping = tuple[int, int, int]  # (address, length, offset in the file)


def huge_pages_available(setting: Path = THP_SETTING) -> bool:
    """Whether madvise(MADV_HUGEPAGE) gets transparent huge pages here."""
    if not system.page_control():
        return False
    try:
        chosen = setting.read_text(encoding="ascii")
    except OSError:
        return False
    return "[always]" in chosen or "[madvise]" in chosen


def proc_kib_field(path: str, field: str) -> int:
    """A "Field:   123 kB" line of a /proc file, in bytes (0 when unknown)."""
    try:
        with open(path, encoding="ascii") as lines:
            for line in lines:
                if line.startswith(field + ":"):
                    return int(line.split()[1]) << 10
    except (OSError, ValueError, IndexError):
        pass
    return 0


def file_mappings(path: Path, maps: str | None = None) -> list[Mapping]:
    """This process's read-only mappings of the file at path, from /proc/self/maps (or the text
    given): a writable one may hold bytes the file does not."""
    wanted = str(path.resolve())
    return [(low, size, offset) for low, size, permissions, offset, name in memory_mappings(maps)
            if name == wanted and "w" not in permissions]


class _Libc:
    """The four calls this needs, with their argument types."""

    def __init__(self) -> None:
        libc = ctypes.CDLL(None, use_errno=True)
        self.mmap, self.munmap, self.mremap = libc.mmap, libc.munmap, libc.mremap
        self.madvise, self.mprotect = libc.madvise, libc.mprotect
        self.mmap.restype, self.mremap.restype = ctypes.c_void_p, ctypes.c_void_p
        self.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int,
                              ctypes.c_long]
        self.mremap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_size_t, ctypes.c_int, ctypes.c_void_p]
        self.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        self.madvise.argtypes = self.mprotect.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int]

    def error(self, call: str) -> OSError:
        code = ctypes.get_errno()
        return OSError(code, f"{call}: {os.strerror(code)}")


def read_into(fd: int, address: int, length: int, offset: int) -> None:
    """Read length bytes of the file from offset into memory at address. The mapping's last page runs
    past the file's end, where the mapping reads zeros: so does fresh anonymous memory."""
    length = max(0, min(length, os.fstat(fd).st_size - offset))
    view = memoryview((ctypes.c_char * length).from_address(address)).cast("B")
    done = 0
    while done < length:
        count = os.preadv(fd, [view[done:done + min(READ_CHUNK, length - done)]], offset + done)
        if count <= 0:
            raise OSError(f"{length - done} bytes of the file could not be read")
        done += count


def move_mapping(libc: _Libc, fd: int, mapping: Mapping) -> None:
    """Replace one read-only file mapping with anonymous huge pages holding the same bytes."""
    address, length, offset = mapping
    reserved = length + HUGE_PAGE
    base = libc.mmap(None, reserved, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0)
    if base in (None, ctypes.c_void_p(-1).value):
        raise libc.error("mmap")
    # Same offset inside a huge page as the mapping, so that mremap moves whole huge pages.
    copy = base + (address - base) % HUGE_PAGE
    try:
        libc.madvise(copy, length, MADV_HUGEPAGE)
        read_into(fd, copy, length, offset)
        if libc.mprotect(copy, length, PROT_READ) != 0:
            raise libc.error("mprotect")
        if libc.mremap(copy, length, length, MREMAP_MAYMOVE | MREMAP_FIXED, address) != address:
            raise libc.error("mremap")
    except BaseException:
        libc.munmap(base, reserved)
        raise
    libc.munmap(base, copy - base)  # the alignment slack either side; the copy itself has moved
    libc.munmap(copy + length, base + reserved - copy - length)


def move_weights_into_huge_pages(model_file: Path) -> int:
    """Move every mapping of model_file in this process into anonymous huge pages; the bytes moved
    (0, and a log line saying why, when it is not done). The caller is single-threaded and nothing
    reads the weights meanwhile."""
    mappings = file_mappings(model_file)
    total = sum(length for _, length, _ in mappings)
    if not mappings:
        log.info("model weights: no mapping of %s found, left as they are", model_file)
        return 0
    if not huge_pages_available():
        log.info("model weights: left mapped from the file (transparent huge pages are off here)")
        return 0
    available = proc_kib_field("/proc/meminfo", "MemAvailable")
    if total * 2 > available:
        log.info("model weights: left mapped from the file (%d MiB, %d MiB of memory available: a copy "
                 "needs twice that)", total >> 20, available >> 20)
        return 0
    moved, started = 0, time.monotonic()
    try:
        libc = _Libc()
        with open(model_file, "rb") as handle:
            for mapping in mappings:
                move_mapping(libc, handle.fileno(), mapping)
                moved += mapping[1]
    except (OSError, AttributeError) as error:
        log.warning("model weights: cannot move them into huge pages (%s): %d of %d MiB left mapped from the "
                    "file", error, (total - moved) >> 20, total >> 20)
    else:
        log.info("model weights: %d MiB moved into huge pages in %.2f s", moved >> 20, time.monotonic() - started)
    return moved


def private_anonymous_mappings(maps: str | None = None) -> list[tuple[int, int]]:
    """This process's private writable anonymous mappings (and the heap) as (address, length)."""
    return [(low, size) for low, size, permissions, _, name in memory_mappings(maps)
            if permissions == "rw-p" and name in ("", "[heap]")]


def collapse_into_huge_pages() -> int:
    """Collapse this process's private anonymous memory into huge pages where the kernel finds it
    worth it (some memory is refused: nothing there, or pages pinned); the bytes now in huge pages
    that were not before (0, with a log line, when the kernel cannot). Content unchanged."""
    if not huge_pages_available():
        return 0
    try:
        libc = _Libc()
    except (OSError, AttributeError):
        return 0
    before, refused, started = proc_kib_field("/proc/self/smaps_rollup", "AnonHugePages"), set(), time.monotonic()
    for address, length in private_anonymous_mappings():
        low = -(-address // HUGE_PAGE) * HUGE_PAGE
        high = (address + length) // HUGE_PAGE * HUGE_PAGE
        if high <= low:
            continue
        if libc.madvise(low, high - low, MADV_COLLAPSE) != 0:
            # EINVAL before Linux 6.1; EAGAIN, ENOMEM, or a mapping with nothing worth collapsing
            refused.add(os.strerror(ctypes.get_errno()))
    collapsed = proc_kib_field("/proc/self/smaps_rollup", "AnonHugePages") - before
    if collapsed > 0:
        log.info("memory: %d MiB collapsed into huge pages in %.2f s", collapsed >> 20, time.monotonic() - started)
    elif refused:
        log.info("memory: not collapsed into huge pages (madvise(MADV_COLLAPSE), Linux 6.1: %s)",
                 ", ".join(sorted(refused)))
    return max(0, collapsed)
