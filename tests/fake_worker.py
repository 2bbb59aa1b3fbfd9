"""A stand-in for gpt4all_api.py as a watchdog worker: the worker protocol, no model.

The watchdog runs it when GPT4ALL_API_WORKER_SCRIPT points here. Like the real worker it "loads"
(sleeps), creates its sentinel, touches it as a heartbeat, waits for b"A" on its control pipe, then
accepts on the inherited socket; it exits 4 at once on EOF of the control pipe, retires after
[watchdog] restart_after_requests requests or on SIGTERM (stop accepting, finish the requests in
flight, remove the sentinel, exit 0) and dumps its stacks on SIGUSR1. Every request except
GET /health counts and is answered with {"pid": ..., "requests_served": n} after ?delay=SECONDS;
?hang=1 stops the heartbeat and never answers, like a stuck native generation.

Knobs (environment): FAKE_WORKER_LOAD_SECONDS (default 0.2); FAKE_WORKER_EXIT_AT_START=CODE exits
with CODE instead of becoming ready (3 = cannot load, with a one-line reason);
FAKE_WORKER_EXIT_AFTER_READY=CODE becomes ready, then exits with CODE a moment later (a worker that
crashes as soon as it has started, before any answer).
"""

from __future__ import annotations

import configparser
import faulthandler
import json
import logging
import os
import selectors
import signal
import socket
import sys
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, urlsplit

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from apiserver.forking import serve_fork_requests  # noqa: E402
from apiserver.protocol import (  # noqa: E402
    ENV_BACKGROUND,
    ENV_CONTROL_FD,
    ENV_LISTEN_FD,
    ENV_SENTINEL,
    ENV_ZYGOTE_FD,
    Sentinel,
    read_control_pipe,
)
from apiserver.settings import LOG_FORMAT  # noqa: E402

log = logging.getLogger("fake_worker")
HEARTBEAT_EVERY = 0.2


class FakeWorker:
    def __init__(self, restart_after_requests: int) -> None:
        self.restart_after_requests = restart_after_requests
        self.requests_served = 0
        self.lock = threading.Lock()
        self.activated = False
        self.hung = False  # a request asked to hang: no more heartbeats
        self.retiring = False  # set by SIGTERM or by the last request: stop accepting

    def activate(self) -> None:
        self.activated = True

    def count_request(self) -> int:
        with self.lock:
            self.requests_served += 1
            if self.restart_after_requests and self.requests_served >= self.restart_after_requests:
                self.retiring = True
            return self.requests_served


class Handler(BaseHTTPRequestHandler):
    worker: FakeWorker

    def do_GET(self) -> None:
        query = parse_qs(urlsplit(self.path).query)
        served = self.worker.requests_served if urlsplit(self.path).path == "/health" else self.worker.count_request()
        log.info("request %d: %s", served, self.path)
        if "hang" in query:
            self.worker.hung = True
            threading.Event().wait()
        time.sleep(float(query.get("delay", ["0"])[0]))
        body = json.dumps({"pid": os.getpid(), "requests_served": served}).encode()
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    do_POST = do_GET

    def log_message(self, format: str, *args: object) -> None:
        log.info("%s %s", self.address_string(), format % args)


def keep_heartbeat(sentinel: Sentinel, worker: FakeWorker) -> None:
    while not worker.hung:
        sentinel.touch()
        time.sleep(HEARTBEAT_EVERY)


def serve(listener: socket.socket, worker: FakeWorker) -> None:
    """Accept until retiring, then wait for the requests in flight (server_close joins them)."""
    Handler.worker = worker
    server = ThreadingHTTPServer(("127.0.0.1", 0), Handler, bind_and_activate=False)
    server.daemon_threads = False  # so that server_close() waits for the requests in flight
    server.socket.close()
    server.socket = listener
    selector = selectors.DefaultSelector()
    selector.register(listener, selectors.EVENT_READ)
    while not worker.retiring:
        if selector.select(0.05) and not worker.retiring:
            try:
                connection, address = listener.accept()
            except BlockingIOError:
                continue
            connection.setblocking(True)
            server.process_request(connection, address)
    server.server_close()


def run_zygote() -> int:
    """--zygote: the watchdog's zygote protocol, through gpt4all_api's own loop (nothing to share)."""
    channel = socket.socket(fileno=int(os.environ.pop(ENV_ZYGOTE_FD)))
    time.sleep(float(os.environ.get("FAKE_WORKER_LOAD_SECONDS", "0.2")))
    exit_code = os.environ.get("FAKE_WORKER_EXIT_AT_START")
    if exit_code:
        log.error("zygote: cannot load the model: FAKE_WORKER_EXIT_AT_START=%s", exit_code)
        return int(exit_code)
    return serve_fork_requests(channel, run_worker)


def main() -> int:
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT, stream=sys.stderr)
    return run_zygote() if "--zygote" in sys.argv else run_worker()


def run_worker() -> int:
    config = configparser.ConfigParser(interpolation=None)
    config.read(sys.argv[sys.argv.index("--config") + 1])
    worker = FakeWorker(config.getint("watchdog", "restart_after_requests", fallback=1))
    faulthandler.register(signal.SIGUSR1, all_threads=True)
    signal.signal(signal.SIGTERM, lambda signum, frame: setattr(worker, "retiring", True))
    threading.Thread(target=read_control_pipe, args=(int(os.environ[ENV_CONTROL_FD]), worker.activate),
                     daemon=True).start()
    listener = socket.socket(fileno=int(os.environ[ENV_LISTEN_FD]))
    listener.setblocking(False)
    sentinel = Sentinel(Path(os.environ[ENV_SENTINEL]), every=0)

    log.info("loading%s", " in the background" if os.environ.get(ENV_BACKGROUND) == "1" else " at full speed")
    time.sleep(float(os.environ.get("FAKE_WORKER_LOAD_SECONDS", "0.2")))
    exit_code = os.environ.get("FAKE_WORKER_EXIT_AT_START")
    if exit_code:
        log.error("cannot load the model: FAKE_WORKER_EXIT_AT_START=%s", exit_code)
        return int(exit_code)
    sentinel.create()
    exit_code = os.environ.get("FAKE_WORKER_EXIT_AFTER_READY")
    if exit_code:
        time.sleep(0.1)
        log.error("crashing right after becoming ready: FAKE_WORKER_EXIT_AFTER_READY=%s", exit_code)
        return int(exit_code)
    threading.Thread(target=keep_heartbeat, args=(sentinel, worker), daemon=True).start()
    log.info("ready, waiting for activation")
    while not (worker.activated or worker.retiring):
        time.sleep(0.02)
    if not worker.retiring:
        log.info("active")
        serve(listener, worker)
    sentinel.remove()
    log.info("retired after %d requests, exiting", worker.requests_served)
    return 0


if __name__ == "__main__":
    sys.exit(main())
