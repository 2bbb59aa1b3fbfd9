"""CpuShare: the thread count under other programs' load, and the runner applying it."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from apiserver import cpu_share
from apiserver.engine import ModelRunner
from apiserver.fields import parse_generation_params
from apiserver.model import TEMPLATES
from apiserver.settings import Settings
from fake_model import FakeModel

# --- CpuShare: the thread count under other programs' load ---------------------------------------

class FakeCpus:
    """A /proc/stat of two CPUs, our own CPU time and a clock, moved by the test."""

    def __init__(self) -> None:
        self.now = 100.0
        self.ticks = {0: [0] * 8, 1: [0] * 8}  # user nice system idle iowait irq softirq steal
        self.own = 0.0

    def stat(self) -> str:
        total = [sum(column) for column in zip(*self.ticks.values())]
        lines = ["cpu  " + " ".join(map(str, total + [0, 0]))]
        lines += [f"cpu{cpu} " + " ".join(map(str, ticks + [0, 0])) for cpu, ticks in self.ticks.items()]
        return "\n".join(lines + ["intr 12345", "ctxt 678"]) + "\n"

    def run(self, seconds: float, cpu: int, column: int = 0, own: bool = False) -> None:
        """Account `seconds` of CPU time on one CPU in one column (0 user, 1 nice, 7 steal)."""
        self.ticks[cpu][column] += round(seconds * 100)
        if own:
            self.own += seconds

    def share(self, cpus: list[int] | None = None) -> cpu_share.CpuShare:
        share = cpu_share.CpuShare(cpus or [0, 1], read_stat=self.stat, own_seconds=lambda: self.own,
                                     clock=lambda: self.now)
        share.ticks_per_second = 100
        return share

    def reading(self, share: cpu_share.CpuShare, others: float, generating: bool = False,
                own: float = 0.0, column: int = 0) -> int:
        """Half a second in which other programs use `others` cores (on CPU 1, then 0) and we `own`."""
        self.now += 0.5
        self.run(min(others, 1.0) * 0.5, 1, column)
        self.run(max(others - 1.0, 0.0) * 0.5, 0, column)
        self.run(own * 0.5, 0, own=True)
        return share.update(generating)


def test_cpu_share_uses_every_core_when_only_we_and_light_programs_run() -> None:
    cpus = FakeCpus()
    share = cpus.share()
    assert [cpus.reading(share, 0.2, own=1.8, generating=True) for _ in range(6)] == [2] * 6
    assert share.others == pytest.approx(0.2)


def test_cpu_share_gives_a_core_at_once_to_a_program_busy_during_a_generation() -> None:
    cpus = FakeCpus()
    share = cpus.share()
    assert cpus.reading(share, 1.0, own=1.0, generating=True) == 1
    assert cpus.reading(share, 0.4, own=1.0, generating=True) == 1, "between a quarter and half a core: no change"
    assert cpus.reading(share, 0.1, own=1.0, generating=True) == 2, "the program has stopped: the core is ours"


def test_cpu_share_reading_in_a_generation_covers_the_generation_alone() -> None:
    cpus = FakeCpus()
    share = cpus.share()
    cpus.now += 0.4
    cpus.run(0.4, 0)
    cpus.run(0.4, 1)  # the client computed on both cores just before it asked
    share.begin_generation()
    assert cpus.reading(share, 0.0, own=2.0, generating=True) == 2 and share.others == pytest.approx(0.0)


def test_cpu_share_between_generations_waits_ten_seconds_before_giving_a_core() -> None:
    cpus = FakeCpus()
    share = cpus.share()
    # A client that computed for nine and a half seconds before asking takes nothing from the answer.
    assert [cpus.reading(share, 1.0) for _ in range(19)] + [cpus.reading(share, 0.0)] == [2] * 20
    # A program that stays busy does.
    assert [cpus.reading(share, 1.0) for _ in range(20)] == [2] * 19 + [1]


def test_cpu_share_counts_nice_and_steal_and_ignores_other_cpus() -> None:
    cpus = FakeCpus()
    share = cpus.share()
    assert cpus.reading(share, 1.0, generating=True, column=1) == 1, "nice only ranks within one session"
    assert cpus.reading(share, 0.0, generating=True) == 2
    assert cpus.reading(share, 0.6, generating=True, column=7) == 1, "the hypervisor took CPU 1"
    only_cpu_0 = cpus.share([0])  # the affinity mask leaves CPU 1 out: its load is not ours to share
    assert cpus.reading(only_cpu_0, 1.0, generating=True) == 1 and only_cpu_0.others == pytest.approx(0.0)


def test_cpu_share_skips_a_reading_where_our_own_time_went_backwards() -> None:
    cpus = FakeCpus()
    share = cpus.share()
    cpus.own = 50.0
    assert cpus.reading(share, 0.0, generating=True) == 2, "our family's time jumped: skipped"
    cpus.own = 10.0  # a reaped child's time is missing for one reading
    assert cpus.reading(share, 0.0, generating=True) == 2
    assert cpus.reading(share, 1.0, generating=True) == 1, "the readings after it count again"


def test_cpu_share_without_proc_stat_is_off() -> None:
    def missing() -> str:
        raise FileNotFoundError("/proc/stat")
    share = cpu_share.CpuShare([0, 1, 2, 3], read_stat=missing)
    assert share.previous is None and share.update(True) == 4


def test_family_cpu_seconds_adds_the_watchdog_and_its_descendants_reaped_and_live(tmp_path: Path) -> None:
    def stat(pid: int, utime: int, stime: int, cutime: int, cstime: int, children: str = "") -> None:
        (tmp_path / str(pid) / "task" / str(pid)).mkdir(parents=True)
        fields = ["S"] + ["0"] * 10 + [str(utime), str(stime), str(cutime), str(cstime)] + ["0"] * 30
        (tmp_path / str(pid) / "stat").write_text(f"{pid} (python (x) y) " + " ".join(fields) + "\n")
        (tmp_path / str(pid) / "task" / str(pid) / "children").write_text(children)
    stat(10, 100, 50, 1000, 200, "11 12 ")  # 12: gone before we read it
    stat(11, 300, 30, 7, 7, "13")  # the zygote: the workers it reaped, and the one still running
    stat(13, 40, 4, 0, 0)
    ticks = cpu_share.os.sysconf("SC_CLK_TCK")
    assert cpu_share.family_cpu_seconds(10, proc=tmp_path) == pytest.approx(
        (100 + 50 + 1000 + 200 + 330 + 14 + 44) / ticks)


def test_runner_sets_the_thread_count_between_tokens_and_logs_it(caplog: pytest.LogCaptureFixture) -> None:
    cpus = FakeCpus()
    model = FakeModel(pieces=["a"] * 5)
    settings = Settings(config_file=Path("config.ini"))
    runner = ModelRunner(model, settings, TEMPLATES["chatml"], lambda: None, cpus.share())
    with caplog.at_level("INFO"):
        for _ in range(cpu_share.CpuShare.SUSTAINED):
            cpus.now += 0.5
            cpus.run(0.5, 1)  # another program spins on CPU 1
            runner.adapt_threads_when_idle()
    assert runner.threads == 1 and model.model.threads == 1
    assert "generating on 1 of 2 cores: other programs keep 1.0 cores busy" in caplog.text
    cpus.now += 0.5
    runner.complete("hi", parse_generation_params({}, settings), lambda: True)
    assert model.model.threads == 2, "the other program stopped: both cores again"
    assert cpu_share.watch_cpu_share(dataclasses.replace(settings, n_threads=2)) is None, "a fixed count"
