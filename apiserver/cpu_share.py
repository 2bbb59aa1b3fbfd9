"""The CPU share: how many threads a generation may use while other programs run (n_threads = 0).

Owns the /proc readers (usable CPUs, /proc/stat, a process family's CPU time) and CpuShare, which
turns them into a thread count. Imports settings and protocol (the watchdog's pid variable) only.
"""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Callable

from apiserver import system
from apiserver.protocol import ENV_WATCHDOG_PID
from apiserver.settings import Settings

log = logging.getLogger("gpt4all_api")


def usable_cpus() -> list[int]:
    """The CPUs this process may run on."""
    if hasattr(os, "sched_getaffinity"):
        return sorted(os.sched_getaffinity(0))
    return list(range(os.cpu_count() or 1))


def read_proc_stat() -> str:
    with open("/proc/stat", encoding="ascii") as stat:
        return stat.read()


def own_cpu_seconds() -> float:
    times = os.times()
    return times.user + times.system


def process_cpu_ticks(pid: int, reaped_children: bool = False, proc: Path = Path("/proc")) -> int:
    """A process's user + system CPU time in clock ticks (with its reaped children's, if asked)."""
    fields = (proc / str(pid) / "stat").read_text().rsplit(")", 1)[1].split()
    return sum(int(value) for value in fields[11:15 if reaped_children else 13])


def family_cpu_seconds(root: int, proc: Path = Path("/proc")) -> float:
    """CPU seconds of process root (a worker's watchdog) and of its descendants, reaped or not:
    under the watchdog, the other workers (the one before us still generating, the zygote and the
    workers it forked) are ours too."""
    return family_cpu_ticks(root, proc) / os.sysconf("SC_CLK_TCK")


def family_cpu_ticks(pid: int, proc: Path) -> int:
    ticks = process_cpu_ticks(pid, reaped_children=True, proc=proc)  # the reaped: their whole family's
    for child in (proc / str(pid) / "task" / str(pid) / "children").read_text().split():
        try:
            ticks += family_cpu_ticks(int(child), proc)
        except FileNotFoundError:
            pass  # reaped in between: counted, or lost for one reading
    return ticks


class CpuShare:
    """The thread count for n_threads = 0: every usable core, less those other programs keep busy.

    llama.cpp's threads wait for one another many times per token, so a thread that another program
    preempts stalls them all (docs/benchmarks.md has the figures). The others' load is the busy
    time /proc/stat counts on our CPUs less our own (a worker's own: its watchdog's family), read
    every half second or more, between tokens too. A reading taken during a generation acts at once;
    readings in between must agree for ten seconds before a core is given up (a client that computed
    for a few seconds before asking is no reason to generate on fewer threads). Others using half a
    core or more take one; under a quarter of a core, it is ours again.
    """

    WINDOW = 0.5  # seconds between two readings
    SHRINK_AT, GROW_BELOW = 0.5, 0.25  # cores of other programs' load, per core given up
    SUSTAINED = 20  # readings in a row, outside a generation, before a core is given up

    def __init__(self, cpus: list[int], read_stat: Callable[[], str] = read_proc_stat,
                 own_seconds: Callable[[], float] = own_cpu_seconds, clock: Callable[[], float] = time.monotonic):
        self.cpus, self.read_stat, self.own_seconds, self.clock = set(cpus), read_stat, own_seconds, clock
        self.ticks_per_second = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100
        self.threads = len(self.cpus)
        self.others = 0.0  # cores busy with other programs in the last window
        self.pressure = 0  # readings in a row that asked for fewer threads
        self.previous = self.sample()
        self.next_reading = self.clock() + self.WINDOW

    def sample(self) -> tuple[float, float, float] | None:
        """(time, seconds our CPUs were busy, seconds of our own CPU time); None without /proc."""
        try:
            busy_ticks = 0
            for line in self.read_stat().splitlines():
                name, *fields = line.split()
                if name.startswith("cpu") and name[3:].isdigit() and int(name[3:]) in self.cpus:
                    user, nice, system, _idle, _iowait, irq, softirq, steal = map(int, fields[:8])
                    busy_ticks += user + nice + system + irq + softirq + steal
            own = self.own_seconds()
        except (OSError, ValueError):
            return None
        return self.clock(), busy_ticks / self.ticks_per_second, own

    def begin_generation(self) -> None:
        """A generation starts: the next reading covers it alone (a client that computed just before
        asking must not count as a program competing with it)."""
        current = self.sample()
        if current is not None:
            self.previous, self.next_reading = current, current[0] + self.WINDOW

    def update(self, generating: bool = False) -> int:
        """Take a reading when the window has passed; return the thread count to use now.
        generating: the window overlapped one of our generations."""
        if self.previous is None or self.clock() < self.next_reading:
            return self.threads
        current = self.sample()
        if current is None:
            return self.threads
        elapsed = current[0] - self.previous[0]
        busy, own = current[1] - self.previous[1], current[2] - self.previous[2]
        self.previous, self.next_reading = current, current[0] + self.WINDOW
        if elapsed <= 0 or not 0 <= own <= elapsed * len(self.cpus) * 1.5:
            return self.threads  # a child reaped between two reads of the family: skip this one
        self.others = max(0.0, busy - own) / elapsed
        fewer = max(1, len(self.cpus) - int(self.others + 1 - self.SHRINK_AT))
        more = max(1, len(self.cpus) - int(self.others + 1 - self.GROW_BELOW))
        if fewer < self.threads:
            self.pressure += 1
            if generating or self.pressure >= self.SUSTAINED:
                self.threads, self.pressure = fewer, 0
        else:
            self.pressure = 0
            self.threads = max(self.threads, more)
        return self.threads


def watch_cpu_share(settings: Settings) -> CpuShare | None:
    """A CpuShare for n_threads = 0; None for a fixed count, or when /proc cannot tell the load."""
    if settings.n_threads:
        return None
    if not system.proc():
        log.info("n_threads = 0: generating on all %d cores (the CPU load is read from /proc, which this system "
                 "lacks)", len(usable_cpus()))
        return None
    watchdog = int(os.environ.get(ENV_WATCHDOG_PID, "0"))
    own_seconds = own_cpu_seconds
    if watchdog:
        try:
            family_cpu_seconds(watchdog)
            own_seconds = lambda: family_cpu_seconds(watchdog)  # noqa: E731
        except (OSError, ValueError):  # no /proc/PID/task/PID/children here: count this process only
            pass
    share = CpuShare(usable_cpus(), own_seconds=own_seconds)
    if share.previous is None:
        log.warning("cannot read the CPU load from /proc/stat: generating on all %d cores", len(share.cpus))
        return None
    return share
