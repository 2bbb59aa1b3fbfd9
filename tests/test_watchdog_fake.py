"""End to end in seconds: watchdog.py supervising tests/fake_worker.py (the protocol without a model).

Each test starts the watchdog as cron would (PATH=/usr/bin:/bin only, cwd /) through conftest's
`start` fixture, on a free port with its own config, logs and state, and waits against deadlines;
a failing wait shows the watchdog's output and both log files.
"""

from __future__ import annotations

import configparser
import json
import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import Any, Callable

from conftest import PORTABLE, PORTABLE_ENV, REPO, Process, descendants, free_port, linux_extra, request, wait_until, write_config

FAKE_WORKER = Path(__file__).resolve().parent / "fake_worker.py"
CRON_ENV = {"PATH": "/usr/bin:/bin", "GPT4ALL_API_WORKER_SCRIPT": str(FAKE_WORKER),
            **({PORTABLE_ENV: "1"} if PORTABLE else {})}


def start_watchdog(start: Callable[..., Process], env: dict[str, str] | None = None, **watchdog: Any) -> Process:
    settings = dict(poll_interval=0.02, heartbeat_timeout=5, stop_timeout=5, backoff_max=2)
    settings.update(watchdog)
    process = start("watchdog.py", {"watchdog": settings}, env={**CRON_ENV, **(env or {})}, cwd="/")
    wait_until(lambda: "watchdog started" in read_log(process, "watchdog.log"), 10, process, "the watchdog to start")
    return process


def read_log(process: Process, name: str) -> str:
    path = process.config.parent / "logs" / name
    return path.read_text(errors="replace") if path.exists() else ""


def get(process: Process, path: str = "/v1/completions", timeout: float = 20) -> dict[str, Any]:
    """The fake worker's answer: {"pid", "requests_served"}."""
    status, _, body = request(process.base_url, "GET", path, timeout=timeout)
    assert status == 200, body
    return json.loads(body)


def attempt(function: Callable[..., Any], *args: Any) -> Any:
    """The result, or the exception raised (a request to a worker that gets killed)."""
    try:
        return function(*args)
    except Exception as error:
        return error


def worker_pids(process: Process, zygote_too: bool = False) -> list[int]:
    """Live fake workers started for this config (their command line names it), orphans included;
    the zygote (which forks workers, and whose command line they share) only when asked."""
    log_file = process.config.parent / "logs" / "watchdog.log"
    zygotes = set(re.findall(r"zygote \(pid (\d+)\)", log_file.read_text())) if log_file.exists() else set()
    pids = []
    for entry in Path("/proc").iterdir():
        try:
            arguments = (entry / "cmdline").read_bytes().split(b"\0")
        except OSError:
            continue
        if str(FAKE_WORKER).encode() in arguments and str(process.config).encode() in arguments and (
                zygote_too or entry.name not in zygotes):
            pids.append(int(entry.name))
    return pids


def port_can_be_bound(port: int) -> bool:
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            probe.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def set_watchdog_option(process: Process, key: str, value: str) -> None:
    parser = configparser.ConfigParser(interpolation=None)
    parser.read(process.config, encoding="utf-8")
    parser["watchdog"][key] = value
    with open(process.config, "w", encoding="utf-8") as handle:
        parser.write(handle)


def test_each_request_gets_a_fresh_worker(start: Callable[..., Process]) -> None:
    watchdog = start_watchdog(start, restart_after_requests=1)
    answers = [get(watchdog) for _ in range(4)]
    assert len({answer["pid"] for answer in answers}) == 4
    assert all(answer["requests_served"] == 1 for answer in answers)
    assert "crashed" not in read_log(watchdog, "watchdog.log")


@linux_extra("the zygote")
def test_workers_forked_by_the_zygote_or_started_without_it(start: Callable[..., Process]) -> None:
    forked = start_watchdog(start, restart_after_requests=1)
    wait_until(lambda: "workers are forked from it" in read_log(forked, "watchdog.log"), 10, forked, "the zygote")
    assert "process model: zygote (zygote = auto, Linux, device = cpu)" in read_log(forked, "watchdog.log")
    assert len({get(forked)["pid"] for _ in range(3)}) == 3
    plain = start_watchdog(start, restart_after_requests=1, zygote="false")
    assert len({get(plain)["pid"] for _ in range(3)}) == 3
    assert "process model: spawn (zygote = false)" in read_log(plain, "watchdog.log")
    assert "zygote (pid" not in read_log(plain, "watchdog.log")
    # Each worker and the zygote: a process group of its own (signalled as a whole), in the watchdog's
    # session (Linux shares the CPU between sessions first: idle priority works only inside one).
    for watchdog in (forked, plain):
        for pid in worker_pids(watchdog, zygote_too=True):
            try:
                assert os.getpgid(pid) == pid and os.getsid(pid) == os.getsid(watchdog.popen.pid), pid
            except ProcessLookupError:
                pass  # a retired worker, gone since it was listed
    # The first worker loads with nobody serving; each spare beside an active worker.
    loads = re.findall(r"loading (at full speed|in the background)", read_log(plain, "server.log"))
    assert loads[0] == "at full speed" and set(loads[1:]) == {"in the background"}, loads


def test_a_gpu_device_spawns_each_worker_and_a_forced_zygote_is_refused(start: Callable[..., Process]) -> None:
    """Forking a process that set up a GPU backend is unsafe: device = gpu takes the spawn model
    (decided from the setting: the watchdog loads no model; the fake worker stands in for the GPU)."""
    fast = {"poll_interval": 0.02, "restart_after_requests": 1}
    gpu = start("watchdog.py", {"watchdog": fast, "model": {"device": "gpu"}}, env=dict(CRON_ENV), cwd="/")
    wait_until(lambda: "watchdog started" in read_log(gpu, "watchdog.log"), 10, gpu, "the watchdog to start")
    assert len({get(gpu)["pid"] for _ in range(3)}) == 3
    log = read_log(gpu, "watchdog.log")
    assert "process model: spawn (zygote = auto, device = gpu: a GPU context does not survive a fork)" in log, log
    assert "zygote (pid" not in log
    refused = start("watchdog.py", {"watchdog": {**fast, "zygote": "true"}, "model": {"device": "gpu"}},
                    env=dict(CRON_ENV), cwd="/")
    assert refused.popen.wait(10) == 2
    assert "zygote = true is refused here: device = gpu" in refused.output_path.read_text()


@linux_extra("the zygote")
def test_a_spare_waits_for_the_loading_zygote_and_is_forked_from_it(start: Callable[..., Process]) -> None:
    watchdog = start_watchdog(start, restart_after_requests=0, env={"FAKE_WORKER_LOAD_SECONDS": "1.5"})
    wait_until(lambda: "workers are forked from it" in read_log(watchdog, "watchdog.log"), 15, watchdog, "the zygote")
    wait_until(lambda: "worker 2 " in read_log(watchdog, "watchdog.log"), 5, watchdog, "the spare")
    logs = read_log(watchdog, "watchdog.log")
    assert logs.index("workers are forked from it") < logs.index("worker 2 "), logs
    assert "in the background" not in read_log(watchdog, "server.log"), "no spare was started the ordinary way"


def zombies_under(pid: int) -> list[int]:
    return [child for child in descendants(pid) if process_state(child) == "Z"]


def process_state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return ""


@linux_extra("the zygote")
def test_the_workers_of_a_killed_zygote_serve_on_and_are_reaped(start: Callable[..., Process]) -> None:
    """The zygote is its workers' parent and tells the watchdog their exits; when it dies they become
    the watchdog's children (a subreaper), which then waits for them itself."""
    watchdog = start_watchdog(start, restart_after_requests=1)
    wait_until(lambda: "workers are forked from it" in read_log(watchdog, "watchdog.log"), 10, watchdog, "the zygote")
    served = {get(watchdog)["pid"] for _ in range(3)}
    wait_until(lambda: not zombies_under(watchdog.popen.pid), 5, watchdog, "the zygote to reap its workers")
    zygote = int(re.findall(r"zygote \(pid (\d+)\) ready", read_log(watchdog, "watchdog.log"))[-1])
    orphans = set(worker_pids(watchdog))
    assert orphans and all(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1] == str(zygote)
                           for pid in orphans), "the zygote forks the workers itself"
    os.kill(zygote, signal.SIGKILL)
    served |= {get(watchdog)["pid"] for _ in range(3)}  # the orphans first, then workers started without it
    assert len(served) == 6
    wait_until(lambda: not set(worker_pids(watchdog)) & orphans, 10, watchdog, "the orphans to be done")
    wait_until(lambda: not zombies_under(watchdog.popen.pid), 5, watchdog, "no zombie left")
    wait_until(lambda: read_log(watchdog, "watchdog.log").count("workers are forked from it") == 2, 10, watchdog,
               "the next zygote")
    assert "crashed" not in read_log(watchdog, "watchdog.log")


def test_without_warm_spare_each_request_gets_a_fresh_worker_too(start: Callable[..., Process]) -> None:
    watchdog = start_watchdog(start, restart_after_requests=1, warm_spare="false")
    assert len({get(watchdog)["pid"] for _ in range(3)}) == 3
    wait_until(lambda: len(worker_pids(watchdog)) == 1, 5, watchdog, "exactly one worker, no spare")
    time.sleep(0.5)  # and no spare appears later
    assert len(worker_pids(watchdog)) == 1


def test_concurrent_clients_get_no_connection_errors_across_restarts(start: Callable[..., Process]) -> None:
    watchdog = start_watchdog(start, {"FAKE_WORKER_LOAD_SECONDS": "0"}, restart_after_requests=1)
    pids: list[int] = []
    errors: list[str] = []

    def client() -> None:
        for _ in range(15):
            try:
                pids.append(get(watchdog, "/v1/completions?delay=0.01")["pid"])
            except Exception as error:  # a refused or reset connection, a timeout: all count
                errors.append(repr(error))

    clients = [threading.Thread(target=client) for _ in range(3)]
    for thread in clients:
        thread.start()
    for thread in clients:
        thread.join(120)
    assert errors == [] and len(pids) == 45
    assert len(set(pids)) >= 10, "the workers restarted under load"


def test_a_killed_active_worker_is_replaced(start: Callable[..., Process]) -> None:
    watchdog = start_watchdog(start, restart_after_requests=0)
    victim = get(watchdog)["pid"]
    os.kill(victim, signal.SIGKILL)
    assert get(watchdog)["pid"] != victim
    wait_until(lambda: "killed by SIGKILL: out of memory?" in read_log(watchdog, "watchdog.log"), 5, watchdog,
               "the crash report")


def test_a_stopped_worker_hangs_and_is_replaced(start: Callable[..., Process]) -> None:
    watchdog = start_watchdog(start, restart_after_requests=0, heartbeat_timeout=1, stop_timeout=1)
    victim = get(watchdog)["pid"]
    os.kill(victim, signal.SIGSTOP)
    stopped_at = time.monotonic()
    assert get(watchdog, timeout=15)["pid"] != victim
    assert time.monotonic() - stopped_at < 5
    assert "hangs (no heartbeat for" in read_log(watchdog, "watchdog.log")
    wait_until(lambda: victim not in worker_pids(watchdog), 5, watchdog, "the stopped worker to be killed")


def test_a_stuck_request_has_its_stacks_dumped_and_its_worker_replaced(start: Callable[..., Process]) -> None:
    watchdog = start_watchdog(start, restart_after_requests=0, heartbeat_timeout=1, stop_timeout=1)
    victim = get(watchdog)["pid"]
    outcome: list[Any] = []
    stuck = threading.Thread(target=lambda: outcome.append(attempt(get, watchdog, "/v1/completions?hang=1")))
    stuck.start()
    wait_until(lambda: "hangs (no heartbeat for" in read_log(watchdog, "watchdog.log"), 5, watchdog, "the hang")
    assert get(watchdog)["pid"] != victim
    wait_until(lambda: victim not in worker_pids(watchdog), 5, watchdog, "the stuck worker to be killed")
    log = read_log(watchdog, "watchdog.log")
    assert f"pid {victim}: " in log and "in do_GET" in log, "its stack dump is in watchdog.log"
    assert "SIGKILL" in log
    stuck.join(15)
    assert isinstance(outcome[0], OSError), "the stuck request dies with its worker"


def test_a_worker_that_cannot_load_is_retried_at_the_maximum_backoff(start: Callable[..., Process]) -> None:
    watchdog = start_watchdog(start, {"FAKE_WORKER_EXIT_AT_START": "3"}, backoff_max=1.5)
    wait_until(lambda: read_log(watchdog, "watchdog.log").count(" started\n") >= 3, 10, watchdog, "three attempts")
    log = read_log(watchdog, "watchdog.log")
    assert "CRITICAL" in log and "cannot load the model: FAKE_WORKER_EXIT_AT_START=3" in log
    assert "backoff: next worker in 1 s" in log and "backoff: next worker in 1.5 s" in log, "growing delays"
    starts = [line for line in log.splitlines() if line.endswith(" started")]
    times = [time.mktime(time.strptime(line[:19], "%Y-%m-%d %H:%M:%S")) + int(line[20:23]) / 1000 for line in starts]
    gaps = [later - earlier for earlier, later in zip(times, times[1:])]
    assert gaps[0] >= 1.0 and all(gap >= 1.5 for gap in gaps[1:]), gaps
    assert watchdog.popen.poll() is None, "the watchdog stays up"
    fields = Path(f"/proc/{watchdog.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
    assert (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK") < 0.6, "CPU seconds used"


def test_a_worker_that_crashes_once_ready_backs_off_with_growing_delays(start: Callable[..., Process]) -> None:
    watchdog = start_watchdog(start, {"FAKE_WORKER_EXIT_AFTER_READY": "70"}, backoff_max=2, crash_loop_limit=3)
    wait_until(lambda: "backoff: next worker in 2 s" in read_log(watchdog, "watchdog.log"), 20, watchdog,
               "the crash loop's backoff to grow")
    log = read_log(watchdog, "watchdog.log")
    assert "replaced at once (1 of the 3" in log and "replaced at once (2 of the 3" in log
    assert "crash loop: 3 workers died within 60 s without one answer" in log
    assert log.index("backoff: next worker in 1 s") < log.index("backoff: next worker in 2 s"), "growing delays"
    assert watchdog.popen.poll() is None, "the watchdog stays up"


def test_while_no_worker_can_load_every_client_gets_a_503_with_the_reason_at_once(
        start: Callable[..., Process]) -> None:
    watchdog = start_watchdog(start, {"FAKE_WORKER_EXIT_AT_START": "3"}, backoff_max=30)
    wait_until(lambda: "next worker in 30 s" in read_log(watchdog, "watchdog.log"), 10, watchdog, "the long backoff")
    started = time.monotonic()
    status, headers, body = request(watchdog.base_url, "GET", "/health", timeout=5)
    assert time.monotonic() - started < 1
    health = json.loads(body)
    assert status == 503 and health["status"] == "unavailable", (status, body)
    assert health["reason"] == "cannot load the model: FAKE_WORKER_EXIT_AT_START=3", health
    assert 1 <= health["retry_in_s"] <= 30 and headers["retry-after"] == str(health["retry_in_s"])
    started = time.monotonic()
    status, headers, body = request(watchdog.base_url, "POST", "/v1/chat/completions", {"messages": []}, timeout=5)
    assert time.monotonic() - started < 1
    error = json.loads(body)["error"]
    assert status == 503 and error["code"] == "model_unavailable" and error["type"] == "service_unavailable"
    assert error["message"].startswith("cannot load the model: FAKE_WORKER_EXIT_AT_START=3; next try in ")
    assert "retry-after" in headers
    status, headers, body = request(watchdog.base_url, "HEAD", "/", timeout=5)
    assert status == 503 and body == b""
    with socket.create_connection(("127.0.0.1", watchdog.port), timeout=5) as silent:
        started = time.monotonic()
        assert silent.recv(100).startswith(b"HTTP/1.1 503 "), "a silent client is answered after 2 s"
        assert 1.5 < time.monotonic() - started < 4
    assert "answering clients 503" in read_log(watchdog, "watchdog.log")


def test_two_watchdogs_on_two_ports_share_a_folder_and_a_third_on_a_used_port_is_refused(
        start: Callable[..., Process]) -> None:
    first = start_watchdog(start)
    second_port = free_port()
    second = Process("watchdog.py", first.config, env=CRON_ENV, cwd="/",
                     command=[sys.executable, str(REPO / "watchdog.py"), "--config", str(first.config),
                              "--port", str(second_port)])
    try:
        second.port, second.base_url = second_port, f"http://127.0.0.1:{second_port}"
        first_pid, second_pid = get(first)["pid"], get(second)["pid"]
        assert first_pid != second_pid
        state_dir = first.config.parent / "run"
        assert (state_dir / f"watchdog-{first.port}.lock").exists() and (state_dir / f"watchdog-{second_port}.lock").exists()
        third = subprocess.run([sys.executable, str(REPO / "watchdog.py"), "--config", str(first.config), "--port",
                                str(second_port)], capture_output=True, text=True, timeout=30, env=CRON_ENV)
        assert third.returncode == 1 and f"another watchdog (pid {second.popen.pid})" in third.stderr
        names = {Path(f"/proc/{pid}/comm").read_text().strip() for pid in (first.popen.pid, second.popen.pid)}
        assert (names.isdisjoint({"gpt4all-watcher"}) if PORTABLE else names == {"gpt4all-watcher"})  # prctl names them
    finally:
        second.stop()


SYSTEMD_LAUNCHER = """
import os, socket, sys
listener = socket.create_server(("127.0.0.1", int(sys.argv[1])))
os.dup2(listener.fileno(), 3)
os.set_inheritable(3, True)  # also when the socket already was fd 3
os.environ.update(LISTEN_FDS="1", LISTEN_PID=str(os.getpid()))
os.execv(sys.executable, [sys.executable] + sys.argv[2:])
"""


def test_systemd_socket_activation_is_used_instead_of_binding(tmp_path: Path) -> None:
    activated_port = free_port()
    config = write_config(tmp_path)
    watchdog = Process("watchdog.py", config, env=CRON_ENV, cwd="/", command=[
        sys.executable, "-c", SYSTEMD_LAUNCHER, str(activated_port), str(REPO / "watchdog.py"), "--config", str(config)])
    try:
        wait_until(lambda: "watchdog started" in read_log(watchdog, "watchdog.log"), 10, watchdog, "the watchdog to start")
        status, _, body = request(f"http://127.0.0.1:{activated_port}", "GET", "/v1/completions", timeout=20)
        assert status == 200 and json.loads(body)["pid"] in worker_pids(watchdog)
        assert port_can_be_bound(watchdog.port), "the configured port stays free"
    finally:
        assert watchdog.stop() == 0


def test_a_second_watchdog_exits_at_once(start: Callable[..., Process]) -> None:
    first = start_watchdog(start)
    began = time.monotonic()
    second = subprocess.run([sys.executable, str(REPO / "watchdog.py"), "--config", str(first.config)],
                            capture_output=True, text=True, timeout=10)
    assert time.monotonic() - began < 1.5
    assert second.returncode == 1
    assert f"pid {first.popen.pid}" in second.stderr
    assert get(first)["pid"] in worker_pids(first), "the first one still serves"


def test_a_killed_watchdog_leaves_no_worker_and_frees_the_port(start: Callable[..., Process]) -> None:
    watchdog = start_watchdog(start, restart_after_requests=0)
    get(watchdog)
    wait_until(lambda: read_log(watchdog, "watchdog.log").count("ready after") >= 2, 10, watchdog, "the spare")
    assert len(worker_pids(watchdog)) == 2
    watchdog.popen.kill()
    watchdog.popen.wait()
    killed_at = time.monotonic()
    wait_until(lambda: not worker_pids(watchdog, zygote_too=True), 2, watchdog, "the orphaned workers to exit")
    wait_until(lambda: port_can_be_bound(watchdog.port), 2 - (time.monotonic() - killed_at), watchdog, "the port")


def test_sigterm_finishes_the_request_in_flight_and_exits_0(start: Callable[..., Process]) -> None:
    watchdog = start_watchdog(start, restart_after_requests=0)
    get(watchdog)
    answers: list[dict[str, Any]] = []
    slow = threading.Thread(target=lambda: answers.append(get(watchdog, "/v1/completions?delay=1")))
    slow.start()
    wait_until(lambda: "delay=1" in read_log(watchdog, "server.log"), 5, watchdog, "the slow request")
    watchdog.popen.send_signal(signal.SIGTERM)
    assert watchdog.popen.wait(10) == 0
    slow.join(5)
    assert len(answers) == 1
    assert worker_pids(watchdog) == []
    assert port_can_be_bound(watchdog.port)
    assert list((watchdog.config.parent / "run").iterdir()) == [], "no lock file or sentinel left"


def test_sighup_rolls_the_workers_without_dropping_a_request(start: Callable[..., Process]) -> None:
    watchdog = start_watchdog(start, restart_after_requests=0)
    wait_until(lambda: read_log(watchdog, "watchdog.log").count("ready after") >= 2, 10, watchdog, "the spare")
    old_pids = set(worker_pids(watchdog))
    assert get(watchdog)["pid"] in old_pids

    set_watchdog_option(watchdog, "restart_after_requests", "not a number")
    watchdog.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: "SIGHUP: keeping the old settings" in read_log(watchdog, "watchdog.log"), 5, watchdog,
               "the bad config to be refused")
    assert get(watchdog)["pid"] in old_pids

    errors: list[str] = []
    pids: list[int] = []
    rolled = threading.Event()

    def client() -> None:
        while not rolled.is_set():
            try:
                pids.append(get(watchdog)["pid"])
            except Exception as error:  # a refused or reset connection, a timeout: all count
                errors.append(repr(error))

    thread = threading.Thread(target=client)
    thread.start()
    set_watchdog_option(watchdog, "restart_after_requests", "1")
    watchdog.popen.send_signal(signal.SIGHUP)
    wait_until(lambda: pids and pids[-1] not in old_pids, 10, watchdog, "a worker on the new config")
    rolled.set()
    thread.join(20)
    assert errors == []
    fresh = [get(watchdog)["pid"] for _ in range(2)]
    assert len(set(fresh)) == 2 and not set(fresh) & old_pids, "the new config restarts after each request"
    wait_until(lambda: not set(worker_pids(watchdog)) & old_pids, 10, watchdog, "the old workers to exit")
