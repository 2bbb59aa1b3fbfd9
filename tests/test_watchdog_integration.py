"""The watchdog on the real model: restarts after every request, crashes, hangs, signals, cron.

Each test runs `watchdog.py` as a subprocess on a free port with its own config, state and logs,
and talks HTTP to it; deadlines, not sleeps.
"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from conftest import PORTABLE, REPO, Process, descendants, linux_extra, request, wait_until, write_config

QUESTION = {"prompt": "What is the capital of France?", "persona": "You are a geography teacher.",
            "temperature": 0, "max_tokens": 12}
LONG = {"prompt": "Count from 1 to 500, separated by commas.", "temperature": 0, "max_tokens": 400}


def ask(process: Process, body: dict = QUESTION, timeout: float = 120):
    """(status, worker pid, text) of one generation request."""
    status, headers, answer = request(process.base_url, "POST", "/gpt4all_api", body, timeout=timeout)
    return status, int(headers.get("x-worker-pid", 0)), answer.decode()




def worker_pids(watchdog_pid: int) -> set:
    """Pids of the watchdog's descendants: the zygote and the workers it forked."""
    return set(descendants(watchdog_pid))


def process_alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as handle:
            return handle.read().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):  # gone (also between the open and the read)
        return False


def active_pid(process: Process) -> int:
    status, _, body = request(process.base_url, "GET", "/health", timeout=30)
    assert status == 200, body
    return json.loads(body)["pid"]


def test_each_request_gets_a_fresh_worker(start):
    watchdog = start("watchdog.py")
    watchdog.wait_ready()
    pids = []
    for _ in range(5):
        status, pid, text = ask(watchdog)
        assert status == 200 and "Paris" in text, (status, text)
        pids.append(pid)
    assert len(set(pids)) == 5, pids
    health = json.loads(request(watchdog.base_url, "GET", "/health")[2])
    assert health["pid"] not in pids and health["requests_served"] == 0


@linux_extra("the zygote's fork of the next spare after the answer")
def test_the_next_spare_is_forked_after_the_answer_not_beside_the_generation(start):
    watchdog = start("watchdog.py")
    watchdog.wait_ready()
    server_log = watchdog.config.parent / "logs" / "server.log"
    watchdog_log = watchdog.config.parent / "logs" / "watchdog.log"
    wait_until(lambda: "forked from the zygote" in server_log.read_text(), 120, watchdog, "a spare forked from the zygote")
    started = watchdog_log.read_text().count(") started")
    answer = {}
    asking = threading.Thread(target=lambda: answer.update(reply=ask(watchdog, {
        "prompt": "Count from 1 to 60, separated by commas.", "temperature": 0, "max_tokens": 120})))
    asking.start()
    wait_until(lambda: watchdog_log.read_text().count(") active") >= 2, 30, watchdog, "the spare on the socket")
    while asking.is_alive():  # the whole generation: the spare on the socket, none forked yet
        assert watchdog_log.read_text().count(") started") == started, watchdog_log.read_text()
        asking.join(0.1)
    assert answer["reply"][0] == 200, answer
    wait_until(lambda: watchdog_log.read_text().count(") started") == started + 1, 30, watchdog, "the next spare")
    log_text = watchdog_log.read_text()
    assert log_text.rindex("removed its sentinel") < log_text.rindex(") started"), log_text
    status, pid, text = ask(watchdog)
    assert status == 200 and "Paris" in text, (status, text)


def test_a_silent_connection_does_not_hold_up_the_restart(start):
    watchdog = start("watchdog.py")
    watchdog.wait_ready()
    with socket.create_connection(("127.0.0.1", watchdog.port)):  # connects, never sends a request
        started = time.monotonic()
        for _ in range(2):
            status, _, text = ask(watchdog)
            assert status == 200 and "Paris" in text
        elapsed = time.monotonic() - started
    # Held up, the first request alone would wait socket_timeout (30 s); each costs about 2 s, 6 on a busy machine.
    assert elapsed < 20, f"two requests took {elapsed:.1f} s behind a silent connection (socket_timeout is 30 s)"


def test_no_client_is_refused_during_continuous_restarts(start):
    watchdog = start("watchdog.py")
    watchdog.wait_ready()
    failures, answers = [], []

    def client(number: int) -> None:
        for index in range(15):
            body = {"prompt": f"Repeat exactly: apple{number}{index}", "temperature": 0, "max_tokens": 6}
            try:
                status, pid, text = ask(watchdog, body)
                answers.append(pid) if status == 200 else failures.append((status, text))
            except OSError as error:
                failures.append(repr(error))

    threads = [threading.Thread(target=client, args=(n,)) for n in range(3)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(600)
    assert not failures, failures
    assert len(answers) == 45 and len(set(answers)) == 45


def kill_the_active_worker_mid_generation(watchdog: Process) -> float:
    """SIGKILL the active worker during a long generation with three requests waiting in the
    backlog; check that those three are served by other workers. Returns when the first was,
    in seconds after the kill."""
    victim = active_pid(watchdog)
    outcome = {}
    long_request = threading.Thread(target=lambda: outcome.update(result=_try(ask, watchdog, LONG)))
    long_request.start()
    time.sleep(1.0)  # the generation is under way
    waiting = []
    waiters = [threading.Thread(target=lambda: waiting.append((_try(ask, watchdog), time.monotonic())))
               for _ in range(3)]
    for waiter in waiters:
        waiter.start()
    time.sleep(0.3)
    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()
    long_request.join(60)
    result = outcome["result"]
    assert isinstance(result, Exception) or result[0] >= 500 or result[1] != victim, result
    for waiter in waiters:
        waiter.join(120)
    assert [result[0] for result, _ in waiting] == [200, 200, 200], waiting
    assert all("Paris" in result[2] and result[1] != victim for result, _ in waiting), waiting
    status, pid, text = ask(watchdog)
    assert status == 200 and "Paris" in text
    assert "SIGKILL" in watchdog.logs()
    return min(finished for _, finished in waiting) - killed_at


def test_sigkill_of_the_active_worker_mid_generation(start):
    watchdog = start("watchdog.py")
    watchdog.wait_ready()
    watchdog.wait_for_spare()
    first_served = kill_the_active_worker_mid_generation(watchdog)
    assert first_served < 3, f"the first waiting request was served {first_served:.1f} s after the crash"


def test_sigkill_of_the_only_worker_mid_generation(start):
    """No spare ready (here: none at all): the replacement starts at once (the killed worker had
    started: no backoff) and loads at full speed, not at a spare's idle priority, and serves the
    requests that waited."""
    watchdog = start("watchdog.py", {"watchdog": {"warm_spare": "false", "zygote": "false"}})
    watchdog.wait_ready()
    first_served = kill_the_active_worker_mid_generation(watchdog)
    assert first_served < 15, f"the first waiting request was served {first_served:.1f} s after the crash"
    logs = (watchdog.config.parent / "logs" / "watchdog.log").read_text()
    assert "replaced at once" in logs and "next worker in" not in logs, logs
    # It had taken its one request: busy (no longer accepting) when it was killed.
    assert "worker 2 " in logs.split("crashed while busy")[1], logs


def _try(function, *args):
    try:
        return function(*args)
    except Exception as error:  # the client of a killed worker may see a closed connection
        return error


def test_a_stopped_worker_is_replaced_after_the_heartbeat_timeout(start):
    watchdog = start("watchdog.py", {"watchdog": {"heartbeat_timeout": 6, "stop_timeout": 2}})  # 6 s: a busy machine
    watchdog.wait_ready()
    victim = active_pid(watchdog)
    os.kill(victim, signal.SIGSTOP)
    try:
        status, pid, text = ask(watchdog, timeout=60)
        assert status == 200 and "Paris" in text and pid != victim
        wait_until(lambda: not process_alive(victim), 10, watchdog, "the hung worker to be killed")
    finally:
        try:
            os.kill(victim, signal.SIGKILL)
        except ProcessLookupError:
            pass
    assert "hang" in watchdog.logs().lower()


def test_a_missing_model_backs_off_without_spinning(start):
    watchdog = start("watchdog.py", {"model": {"model": "no-such-model.gguf"}, "watchdog": {"backoff_max": 4}})
    time.sleep(9)  # observe the backoff over a fixed window: this test is about time passing
    assert watchdog.popen.poll() is None, watchdog.logs()
    logs = (watchdog.config.parent / "logs" / "watchdog.log").read_text()
    assert "CRITICAL" in logs and "no-such-model.gguf" in logs, logs
    fields = Path(f"/proc/{watchdog.popen.pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu_seconds = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    assert cpu_seconds < 1.0, f"the watchdog used {cpu_seconds} s of CPU in 9 s"
    assert "next worker in 1 s" in logs and "next worker in 4 s" in logs, "growing delays"
    starts = logs.count("cannot load")
    assert 2 <= starts <= 5, logs


def test_a_second_watchdog_exits_at_once(start):
    first = start("watchdog.py")
    first.wait_ready()
    started = time.monotonic()
    second = subprocess.run([sys.executable, str(REPO / "watchdog.py"), "--config", str(first.config)],
                            capture_output=True, text=True, timeout=10)
    assert second.returncode != 0
    assert time.monotonic() - started < 3
    assert str(first.popen.pid) in second.stderr + second.stdout
    assert active_pid(first)


def test_workers_die_with_their_watchdog(start):
    watchdog = start("watchdog.py")
    watchdog.wait_ready()
    expected = 2 if PORTABLE else 3  # the active worker, the warm spare, and (Linux) the zygote
    wait_until(lambda: len(worker_pids(watchdog.popen.pid)) == expected, 60, watchdog, "the warm spare (and the zygote)")
    workers = worker_pids(watchdog.popen.pid)
    watchdog.popen.send_signal(signal.SIGKILL)
    watchdog.popen.wait()
    killed = time.monotonic()
    wait_until(lambda: not any(process_alive(pid) for pid in workers), 5, watchdog, "orphaned workers to exit")
    assert time.monotonic() - killed < 2.5
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", watchdog.port))


def test_sigterm_lets_the_generation_finish(start):
    watchdog = start("watchdog.py")
    watchdog.wait_ready()
    outcome = {}
    body = {"prompt": "Count from 1 to 40, separated by commas.", "temperature": 0, "max_tokens": 120}
    client = threading.Thread(target=lambda: outcome.update(result=ask(watchdog, body)))
    client.start()
    time.sleep(0.8)
    workers = worker_pids(watchdog.popen.pid)
    watchdog.popen.send_signal(signal.SIGTERM)
    client.join(60)
    status, _, text = outcome["result"]
    assert status == 200 and "40" in text, text
    assert watchdog.popen.wait(30) == 0
    assert not any(process_alive(pid) for pid in workers)
    with socket.socket() as probe:
        probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        probe.bind(("127.0.0.1", watchdog.port))


def test_starts_as_cron_would(tmp_path):
    config = write_config(tmp_path)
    process = Process("watchdog.py", config, env={"PATH": "/usr/bin:/bin"}, cwd="/",
                      command=[os.path.abspath(sys.executable), str(REPO / "watchdog.py"), "--config", str(config)])
    try:
        process.wait_ready()
        status, _, text = ask(process)
        assert status == 200 and "Paris" in text
    finally:
        assert process.stop() == 0
