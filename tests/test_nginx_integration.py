"""The documented nginx configuration (docs/operations.md) in front of two real watchdogs: a box killed
mid-load, streams, metrics.

nginx runs the block that follows `<!-- nginx-config -->` in docs/operations.md as it is, only its ports
changed, inside a minimal nginx.conf in tmp_path (its own pid, logs and temp files; no root needed).
Two watchdogs on the real model stand behind it. One of them is SIGKILLed with all its workers while
4 clients send 40 requests through nginx; every request not in flight on that box at that moment must
be answered. Then streams through nginx must bring their first token as soon as streams straight to
the surviving box do, and that box's /metrics must count the answers it gave. A second test puts two
stand-in boxes whose queues are full behind the same configuration: nginx must answer 503 with
Retry-After, never its own 502 page.
"""

from __future__ import annotations

import grp
import http.client
import http.server
import json
import os
import pwd
import queue
import re
import shutil
import signal
import socket
import statistics
import subprocess
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import pytest

from conftest import REPO, Process, free_port, request, wait_until


def find_nginx() -> str | None:
    """nginx on PATH, or Debian's (/usr/sbin is not on every user's PATH)."""
    if shutil.which("nginx"):
        return shutil.which("nginx")
    return "/usr/sbin/nginx" if os.access("/usr/sbin/nginx", os.X_OK) else None


NGINX = find_nginx()
pytestmark = pytest.mark.skipif(NGINX is None, reason="nginx is not installed (Debian: apt-get install nginx-light; "
                                                      ".ci/run installs it when it runs as root)")

API_KEY = "fleet-test-key"
AUTHORIZATION = {"Authorization": f"Bearer {API_KEY}"}
CLIENTS, REQUESTS, KILL_AFTER = 4, 40, 10
CHAT_ROUTE = "/v1/chat/completions"
STREAMS_EACH_WAY = 5
STREAMED_QUESTION = "Write a short poem about the sea."  # its 40 tokens take a second or more
FIRST_TOKEN_SLACK = 0.100  # seconds: the bound on what the nginx hop may add to the first token
# nginx names the box that answered in a header (the config's location sets no add_header of its own,
# so it inherits this one from the http level).
UPSTREAM_HEADER = "x-test-upstream"


# --------------------------------------------------------------------------------------------
# nginx: the documented block, in a configuration of its own.
# --------------------------------------------------------------------------------------------

def documented_nginx_block() -> str:
    """The ```nginx block that directly follows the line <!-- nginx-config --> in docs/operations.md."""
    match = re.search(r"^<!-- nginx-config -->\n```nginx\n(.*?)^```$", (REPO / "docs" / "operations.md").read_text(),
                      re.DOTALL | re.MULTILINE)
    assert match, "docs/operations.md has no ```nginx block right after <!-- nginx-config -->"
    return match.group(1)


def with_ports(block: str, upstream_ports: list[int], listen_port: int) -> str:
    """The block with its upstream servers' ports and its listen port replaced (loopback only)."""
    servers = re.findall(r"^\s*server\s+127\.0\.0\.1:(\d+)", block, re.MULTILINE)
    assert len(servers) == len(upstream_ports), f"expected {len(upstream_ports)} upstream servers, found {servers}"
    ports = iter(upstream_ports)
    block = re.sub(r"^(\s*server\s+127\.0\.0\.1:)\d+", lambda match: f"{match.group(1)}{next(ports)}", block,
                   flags=re.MULTILINE)
    block, listens = re.subn(r"^(\s*)listen\s+\d+\s*;", rf"\g<1>listen 127.0.0.1:{listen_port};", block,
                             flags=re.MULTILINE)
    assert listens == 1, "expected one `listen PORT;` line"
    return block


def nginx_conf(block: str, directory: Path) -> str:
    """A whole nginx.conf around the block: in the foreground, every file inside directory."""
    user = ""
    if os.geteuid() == 0:  # a root master starts its workers as nobody:nobody, and Debian has no such group
        user = f"user {pwd.getpwuid(os.getuid()).pw_name} {grp.getgrgid(os.getgid()).gr_name};"
    temp_paths = "\n".join(f"    {kind}_temp_path {directory / kind};"
                           for kind in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    return f"""{user}
daemon off;
worker_processes 1;
pid {directory / "nginx.pid"};
error_log {directory / "error.log"} warn;
events {{}}
http {{
    log_format upstreams '$request $status upstream=$upstream_addr upstream_status=$upstream_status '
                         'time=$request_time';
    access_log {directory / "access.log"} upstreams;
    add_header {UPSTREAM_HEADER} $upstream_addr always;
{temp_paths}
{block}
}}
"""


class Nginx:
    """nginx in the foreground on the documented configuration, its output and logs in its directory."""

    def __init__(self, directory: Path, upstream_ports: list[int]) -> None:
        directory.mkdir()
        self.directory = directory
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        config = directory / "nginx.conf"
        config.write_text(nginx_conf(with_ports(documented_nginx_block(), upstream_ports, self.port), directory))
        command = [NGINX, "-p", str(directory), "-c", str(config), "-e", str(directory / "error.log")]
        check = subprocess.run(command + ["-t"], capture_output=True, text=True)
        if check.returncode != 0:
            pytest.fail(f"nginx -t refused the configuration:\n{check.stderr}\n{config.read_text()}")
        self.output = open(directory / "nginx.out", "wb")
        self.popen = subprocess.Popen(command, stdout=self.output, stderr=subprocess.STDOUT, start_new_session=True)

    def logs(self) -> str:
        return "\n".join(f"----- nginx {name} -----\n{(self.directory / name).read_text(errors='replace')[-6000:]}"
                         for name in ("nginx.out", "error.log", "access.log") if (self.directory / name).exists())

    def wait_listening(self, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.popen.poll() is not None:
                pytest.fail(f"nginx exited with code {self.popen.returncode}\n{self.logs()}")
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.05)
        pytest.fail(f"nginx did not listen within {timeout} s\n{self.logs()}")

    def stop(self) -> None:
        if self.popen.poll() is None:
            self.popen.terminate()
            try:
                self.popen.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(self.popen.pid, signal.SIGKILL)
        self.popen.wait()
        self.output.close()


@pytest.fixture
def nginx_in_front(tmp_path):
    """nginx_in_front(upstream_ports) -> Nginx, listening; stopped at the end of the test."""
    started = []

    def start_nginx(upstream_ports: list[int]) -> Nginx:
        server = Nginx(tmp_path / "nginx", upstream_ports)
        started.append(server)
        server.wait_listening()
        return server

    yield start_nginx
    for server in started:
        server.stop()


# --------------------------------------------------------------------------------------------
# Killing a box: its watchdog and every process it started.
# --------------------------------------------------------------------------------------------

def session_members(session: int) -> list[int]:
    """Pids of the live processes in a session (the watchdog's: its workers have their own process
    groups, but not their own sessions)."""
    members = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = Path(f"/proc/{entry}/stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if fields[0] != "Z" and int(fields[3]) == session:
            members.append(int(entry))
    return members


def kill_box(watchdog: Process) -> int:
    """SIGKILL the watchdog first (so it starts nothing more), then everything left in its session;
    returns how many processes were killed."""
    killed = {watchdog.popen.pid}
    os.kill(watchdog.popen.pid, signal.SIGKILL)
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        members = session_members(watchdog.popen.pid)
        if not members:
            return len(killed)
        for pid in members:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.add(pid)
            except ProcessLookupError:
                pass
        time.sleep(0.02)
    watchdog.fail(f"processes of the killed box still alive: {session_members(watchdog.popen.pid)}")


# --------------------------------------------------------------------------------------------
# Clients.
# --------------------------------------------------------------------------------------------

@dataclass
class Outcome:
    number: int
    started: float
    ended: float
    status: int = 0
    upstream: str = ""  # nginx's $upstream_addr: every box it tried, the one that answered last
    error: str = ""

    def in_flight_during(self, begin: float, end: float) -> bool:
        return self.started <= end and self.ended >= begin

    @property
    def answered_by(self) -> str:
        return self.upstream.rsplit(",", 1)[-1].strip()


def chat_body(question: str, max_tokens: int, stream: bool = False) -> dict:
    return {"messages": [{"role": "user", "content": question}], "max_tokens": max_tokens, "temperature": 0,
            "stream": stream}


def ask_through(server_url: str, number: int) -> Outcome:
    started = time.monotonic()
    body = chat_body(f"Reply with one word: the colour of ripe fruit {number}.", 8)
    try:
        status, headers, answer = request(server_url, "POST", CHAT_ROUTE, body, AUTHORIZATION, timeout=120)
        outcome = Outcome(number, started, time.monotonic(), status, headers.get(UPSTREAM_HEADER, ""))
        if status != 200:
            outcome.error = answer.decode(errors="replace")[:300]
        return outcome
    except (OSError, http.client.HTTPException) as error:
        return Outcome(number, started, time.monotonic(), error=repr(error))


class Load:
    """CLIENTS threads sending REQUESTS requests in all, one at a time each, through nginx."""

    def __init__(self, server_url: str) -> None:
        self.server_url = server_url
        self.numbers: queue.Queue[int] = queue.Queue()
        for number in range(REQUESTS):
            self.numbers.put(number)
        self.outcomes: list[Outcome] = []
        self.lock = threading.Lock()
        self.threads = [threading.Thread(target=self.client, daemon=True) for _ in range(CLIENTS)]

    def client(self) -> None:
        while True:
            try:
                number = self.numbers.get_nowait()
            except queue.Empty:
                return
            outcome = ask_through(self.server_url, number)
            with self.lock:
                self.outcomes.append(outcome)

    def start(self) -> None:
        for thread in self.threads:
            thread.start()

    def completed(self) -> int:
        with self.lock:
            return len(self.outcomes)

    def join(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        assert not any(thread.is_alive() for thread in self.threads), f"the clients did not finish in {timeout} s"


def stream_timings(base_url: str) -> tuple[float, float]:
    """(seconds to the first token, seconds to the end) of one streamed chat completion, a long one:
    a proxy that buffered it would hold the first token back until its buffer filled."""
    host, port = base_url.split("//")[1].split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=120)
    started = time.monotonic()
    first_token = None
    try:
        connection.request("POST", CHAT_ROUTE, body=json.dumps(chat_body(STREAMED_QUESTION, 40, stream=True)),
                           headers={"Content-Type": "application/json", **AUTHORIZATION})
        response = connection.getresponse()
        assert response.status == 200, response.read()
        while True:
            line = response.readline()
            if not line:
                break
            if not line.startswith(b"data: {"):
                continue
            choices = json.loads(line[len(b"data: "):])["choices"]
            if first_token is None and choices and choices[0]["delta"].get("content"):
                first_token = time.monotonic() - started
        assert first_token is not None, "the stream had no content"
        return first_token, time.monotonic() - started
    finally:
        connection.close()


def chat_answers_counted(box: Process) -> float:
    """The box's gpt4all_api_requests_total for 200 answers of the chat route, from its /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    status, _, body = request(box.base_url, "GET", "/metrics", headers=AUTHORIZATION, timeout=30)
    assert status == 200, (status, body[:300])
    return sum(sample.value for family in text_string_to_metric_families(body.decode())
               for sample in family.samples
               if sample.name == "gpt4all_api_requests_total"
               and sample.labels.get("route") == CHAT_ROUTE and sample.labels.get("status") == "200")


# --------------------------------------------------------------------------------------------
# Two real boxes, one killed.
# --------------------------------------------------------------------------------------------

def test_nginx_in_front_of_two_boxes_one_killed_mid_load(start, nginx_in_front):
    pytest.importorskip("prometheus_client", reason="prometheus_client (requirements-dev.txt) parses /metrics")
    overrides = {"server": {"api_key": API_KEY}}
    survivor = start("watchdog.py", overrides)
    survivor.wait_ready()  # one after the other: the first start assembles the model into models/
    victim = start("watchdog.py", overrides)
    victim.wait_ready()
    server = nginx_in_front([survivor.port, victim.port])

    def fail(reason: str) -> None:
        pytest.fail(f"{reason}\n{server.logs()}\n----- surviving box -----\n{survivor.logs()[-6000:]}")

    # 40 requests from 4 clients; the victim is killed with its workers once 10 are answered.
    load = Load(server.base_url)
    load.start()
    wait_until(lambda: load.completed() >= KILL_AFTER, 120, survivor, f"{KILL_AFTER} answers through nginx")
    killed_at = time.monotonic()
    killed = kill_box(victim)
    kill_done = time.monotonic()
    load.join(180)
    outcomes = sorted(load.outcomes, key=lambda outcome: outcome.number)
    assert len(outcomes) == REQUESTS
    lost = [outcome for outcome in outcomes if outcome.status != 200]
    not_excused = [outcome for outcome in lost if not outcome.in_flight_during(killed_at, kill_done)]
    if not_excused:
        fail(f"requests not in flight at the kill failed: {not_excused}")
    assert len(lost) <= CLIENTS, lost
    survivor_address = f"127.0.0.1:{survivor.port}"
    after_kill = [outcome for outcome in outcomes if outcome.started > kill_done]
    if not all(outcome.answered_by == survivor_address for outcome in after_kill if outcome.status == 200):
        fail(f"answers after the kill not from the surviving box: {after_kill}")

    # Streams: the first token through nginx comes as soon as it comes straight from the box. The two
    # ways take turns at going first (the request after another meets the new spare's start).
    direct, through_nginx = [], []
    for number in range(STREAMS_EACH_WAY):
        ways = [(direct, survivor.base_url), (through_nginx, server.base_url)]
        for timings, base_url in ways if number % 2 == 0 else reversed(ways):
            timings.append(stream_timings(base_url))
    first_direct = statistics.median(first for first, _ in direct)
    first_nginx = statistics.median(first for first, _ in through_nginx)
    total_direct = statistics.median(total for _, total in direct)
    total_nginx = statistics.median(total for _, total in through_nginx)
    victim_address = f"127.0.0.1:{victim.port}"
    caught = [outcome for outcome in outcomes
              if outcome.in_flight_during(killed_at, kill_done) and outcome.upstream.startswith(victim_address)]
    print(f"\nkilled {killed} processes of the victim box after {KILL_AFTER} answers, {len(caught)} requests in "
          f"flight on it; {len(lost)} requests lost; {sum(',' in outcome.upstream for outcome in outcomes)} resent "
          f"by nginx to the other box; "
          f"streamed, median of {STREAMS_EACH_WAY}: first token {first_nginx * 1000:.0f} ms through nginx vs "
          f"{first_direct * 1000:.0f} ms direct, whole stream {total_nginx * 1000:.0f} ms vs "
          f"{total_direct * 1000:.0f} ms")
    assert total_direct - first_direct > 0.5, f"streams too short to show buffering: {direct}"
    if first_nginx > first_direct + FIRST_TOKEN_SLACK:
        fail(f"first token through nginx {first_nginx:.3f} s vs {first_direct:.3f} s direct: nginx buffers "
             f"the stream? direct {direct}, through nginx {through_nginx}")

    # The surviving box counted every answer it gave: the load's, and the streams both ways.
    served = sum(outcome.status == 200 and outcome.answered_by == survivor_address for outcome in outcomes)
    expected = served + 2 * STREAMS_EACH_WAY
    assert served > 0
    deadline = time.monotonic() + 10  # a worker reports its answer to the watchdog just after sending it
    counted = chat_answers_counted(survivor)
    while counted < expected and time.monotonic() < deadline:
        time.sleep(0.05)
        counted = chat_answers_counted(survivor)
    assert counted == expected, f"/metrics counted {counted} answers of the surviving box, it gave {expected}"


# --------------------------------------------------------------------------------------------
# A fleet that is full.
# --------------------------------------------------------------------------------------------

class FullBox(http.server.BaseHTTPRequestHandler):
    """A box whose queue is full: every request gets the 503 queue_full a real box sends then."""

    protocol_version = "HTTP/1.1"

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        body = json.dumps({"error": {"message": "the server is busy", "type": "service_unavailable", "param": None,
                                     "code": "queue_full"}}).encode()
        self.send_response(503)
        for name, value in (("Content-Type", "application/json"), ("Content-Length", str(len(body))),
                            ("Retry-After", "5"), ("Connection", "close")):  # none left open for nginx to reset
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args) -> None:
        pass


def test_a_full_fleet_answers_503_with_retry_after_never_502(nginx_in_front):
    """Every box answered 503, so nginx counts each as failed (max_fails) and, for fail_timeout, has no
    box left: its own answer then is a 502 page, which the documented error_page turns into a 503."""
    boxes = [http.server.ThreadingHTTPServer(("127.0.0.1", 0), FullBox) for _ in range(2)]
    for box in boxes:
        threading.Thread(target=box.serve_forever, daemon=True).start()
    try:
        server = nginx_in_front([box.server_address[1] for box in boxes])
        codes = []
        for number in range(4):
            status, headers, body = request(server.base_url, "POST", CHAT_ROUTE, chat_body("Hello", 8), timeout=30)
            assert status == 503 and headers.get("retry-after"), (number, status, headers, body, server.logs())
            codes.append(json.loads(body)["error"]["code"])
        # The first is the boxes' own answer (nginx asked both); then nginx has no box left for 10 s.
        assert codes[0] == "queue_full" and "no_box_available" in codes[1:], (codes, server.logs())
    finally:
        for box in boxes:
            box.shutdown()
            box.server_close()
