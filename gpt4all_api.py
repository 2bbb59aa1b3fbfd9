"""gpt4all_api: a local LLM HTTP API server on one GGUF model, loaded through gpt4all.

Routes: the original project's `POST /gpt4all_api` ({"prompt", "persona"} -> the answer as text),
`GET /health`, and an OpenAI-compatible API (`/v1/models`, `/v1/chat/completions`,
`/v1/completions`, with Server-Sent Events streaming).

`python gpt4all_api.py [--config FILE]` runs one server on its own socket (development, tests).
`watchdog.py` is the product's entry point: it holds the listening socket and runs this file as its
worker, handing over the socket, a sentinel file and a control pipe through environment variables
(apiserver/protocol.py and ../shared/DESIGN.md), or as its zygote (--zygote), which loads the model
once and forks the workers.

This file owns the process's life (WorkerLife: open or inherit the socket, load, wait for
activation, serve, drain, exit) and main(); the parts live in apiserver/ (its __init__.py shows the
layout; the zygote's loop is apiserver/zygote.py, the model's loading apiserver/preload.py).
Imports everything in apiserver; nothing imports this file.
"""

from __future__ import annotations

import argparse
import faulthandler
import logging
import os
import signal
import socket
import sys
import threading
import time
from pathlib import Path
from typing import Any

from apiserver.http_server import Server, serve_until_stopped
from apiserver.metrics import Box, Totals, accept_queue_length, render
from apiserver.pages import own_written_pages
from apiserver.preload import ModelLoader, Preloaded
from apiserver.protocol import (
    ENV_BACKGROUND,
    ENV_CONTROL_FD,
    ENV_LISTEN_FD,
    ENV_SENTINEL,
    EXIT_CANNOT_LOAD,
    EXIT_OK,
    HEARTBEAT_EVERY,
    MSG_LOADED,
    MSG_STOPPED_ACCEPTING,
    Sentinel,
    WatchdogLink,
)
from apiserver.routes import build_app
from apiserver.settings import Settings, add_address_arguments, configure_logging, load_settings
from apiserver.system import set_process_name
from apiserver.zygote import run_zygote

log = logging.getLogger("gpt4all_api")

HERE = Path(__file__).resolve().parent
DEFAULT_CONFIG = HERE / "config.ini"



class WorkerLife:
    """One server process from start to exit: open or inherit the socket, load the model, wait for
    activation (under the watchdog), serve, drain, exit. Owns stop_accepting, the in-flight count
    and the restart policy (a worker stops accepting once restart_after_requests generations were
    admitted); the transport asks it through the Lifecycle methods."""

    def __init__(self, settings: Settings, preloaded: Preloaded | None = None):
        self.settings, self.preloaded = settings, preloaded
        self.worker = ENV_LISTEN_FD in os.environ  # run by the watchdog
        self.app = build_app(settings)
        self.app.on_generation_admitted = self.generation_admitted
        self.app.metrics_text = self.metrics_text
        # Under the watchdog: the control channel (activation, generation slots, metrics); alone,
        # this process keeps its own metrics.
        self.link = WatchdogLink(int(os.environ[ENV_CONTROL_FD])) if self.worker else None
        self.totals = Totals()
        path = os.environ.get(ENV_SENTINEL)
        self.sentinel = Sentinel(Path(path) if self.worker and path else None)
        self.stop_accepting = False  # set by SIGTERM, or when the restart after N requests is due
        self.restart_due = False  # the restart after N requests: the context is saved before the exit
        self.one_request_at_a_time = self.worker and settings.restart_after_requests > 0
        self.in_flight = 0  # requests begun (request line read) and not yet answered
        self.connections = 0  # accepted connections still open, silent and kept-alive ones included
        self.closed = False  # exiting: no request may begin any more
        self.lock = threading.Condition()  # notified when a request or a connection ends
        self.activated = threading.Event()
        self.loader: ModelLoader | None = None
        self.server_socket: socket.socket | None = None

    # -- the restart policy and the transport's questions ----------------------------------

    def generation_admitted(self, count: int) -> None:
        due = self.settings.restart_after_requests
        if self.worker and due and count >= due and not self.stop_accepting:
            self.stop_accepting = self.restart_due = True
            assert self.link is not None and self.app.runner is not None  # a worker, generating
            self.link.send(MSG_STOPPED_ACCEPTING)  # another worker takes the socket at once
            self.app.runner.exit_after_this()

    def report_request(self, report: dict[str, Any]) -> None:
        if self.link is not None:
            self.link.report(report)
        else:
            self.totals.add(report)

    def metrics_text(self) -> str | None:
        """The box's metrics: the watchdog's (all workers, every restart), or this lone server's."""
        if self.link is not None:
            text = self.link.metrics_text()
            return None if text is None else text.decode("utf-8", "replace")
        runner = self.app.runner
        return render(self.totals, Box(
            model=self.settings.model_id, started_wall=self.app.started_wall, workers={"active": 1}, restarts={},
            running=int(bool(runner and runner.busy)), waiting=runner.waiting if runner else 0,
            backlog=accept_queue_length(self.server_socket) if self.server_socket else None,
            model_load_seconds=self.loader.load_seconds if self.loader else None))

    def keeps_idle_connections(self) -> bool:
        return not (self.stop_accepting or self.one_request_at_a_time)

    def begin_request(self) -> bool:
        with self.lock:
            if self.closed:
                return False
            self.in_flight += 1
            return True

    def end_request(self) -> None:
        with self.lock:
            self.in_flight -= 1
            self.lock.notify_all()

    def count_connection(self, change: int) -> None:
        with self.lock:
            self.connections += change
            self.lock.notify_all()

    def close_when_idle(self, ignore_silent_connections: bool) -> bool:
        """True (and no request may begin any more) once no request is in flight and no connection
        is open, or, with ignore_silent_connections, none that has begun a request."""
        with self.lock:
            self.closed = self.in_flight == 0 and (self.connections == 0 or ignore_silent_connections)
            return self.closed

    # -- the life -----------------------------------------------------------------------

    def request_stop(self, signum: int, frame: Any) -> None:
        self.stop_accepting = True  # the main loop acts on it

    def open_server(self) -> Server | None:
        """The watchdog's socket (and its control pipe) for a worker; our own bound socket alone."""
        if self.worker:
            listen_socket: socket.socket | None = socket.socket(fileno=int(os.environ[ENV_LISTEN_FD]))
            assert self.link is not None  # every worker has its control channel
            self.link.on_activate = self.activated.set
            self.link.start()
        else:
            listen_socket = None
            self.activated.set()
        try:
            server = Server(self.app, self, listen_socket)
        except OSError as error:
            log.critical("cannot listen on %s:%s: %s", self.settings.host, self.settings.port, error)
            return None
        if not self.worker:
            self.server_socket = server.socket
            log.info("listening on http://%s:%s (model loading)", *server.server_address[:2])
        return server

    def idle_tick(self) -> None:
        """Between polls: take the loaded model when it is ready, beat, keep the thread count current."""
        app, loader = self.app, self.loader
        assert loader is not None  # started before the serve loop
        if app.runner is None and not loader.is_alive():
            if loader.error is not None or loader.runner is None:
                self.stop_accepting = True
                return
            runner = app.runner = loader.runner
            if self.link is not None:
                runner.gate = self.link
                runner.attach_cache(self.link)
                self.link.on_running = runner.set_running_on_box
                if loader.load_seconds is not None:
                    self.link.send(MSG_LOADED, f"{loader.load_seconds:.3f}".encode())
            self.sentinel.create()
            log.info("ready: model %s, pid %d", self.settings.model_id, os.getpid())
        if app.runner is not None and not app.runner.busy:
            self.sentinel.touch()  # during a generation only its callbacks beat: a stuck model goes silent
            app.runner.adapt_threads_when_idle()

    def run(self) -> int:
        """Load, serve until stopped or the restart is due, drain; return the exit code."""
        set_process_name("gpt4all-spare" if self.worker else "gpt4all-server")
        signal.signal(signal.SIGTERM, self.request_stop)
        signal.signal(signal.SIGINT, self.request_stop)
        if hasattr(signal, "SIGUSR1"):
            faulthandler.register(signal.SIGUSR1, all_threads=True)
        server = self.open_server()
        if server is None:
            return EXIT_CANNOT_LOAD
        background = self.worker and not self.preloaded and os.environ.get(ENV_BACKGROUND) == "1"
        self.loader = ModelLoader(self.settings, self.sentinel, self.preloaded, background, self.worker)
        self.loader.start()
        if self.worker:  # not accepting yet: clients wait in the watchdog's backlog
            while self.loader.is_alive() and not self.stop_accepting:
                self.loader.join(HEARTBEAT_EVERY)
        self.idle_tick()
        while not self.activated.wait(HEARTBEAT_EVERY) and not self.stop_accepting:
            self.idle_tick()
        if self.activated.is_set() and not self.stop_accepting:
            if self.worker:
                set_process_name("gpt4all-worker")
                log.info("activated: accepting connections")
            serve_until_stopped(server, self.idle_tick)
        if self.loader.error is not None:
            log.critical("%s", self.loader.error)
            return EXIT_CANNOT_LOAD
        # Let the requests already begun finish and reach their clients; connections accepted but
        # still silent get one more second to send theirs.
        silent_until = time.monotonic() + 1.0
        while True:
            with self.lock:  # (re-entrant) checked and waited for under one hold: no end goes unseen
                if self.close_when_idle(ignore_silent_connections=time.monotonic() > silent_until):
                    break
                self.lock.wait(0.05)
            self.idle_tick()
        if self.restart_due and self.app.runner is not None:
            self.app.runner.save_context()  # the reply has left: the next workers may go on from it
        self.sentinel.remove()
        count = self.app.generations_admitted
        if count and self.link is not None and self.preloaded is not None and self.preloaded.report_pages:
            try:
                self.link.report_pages(own_written_pages())  # the zygote's next workers copy them ahead
            except OSError as error:  # no pagemap here, or a report too big for the channel: none
                log.info("could not report the pages this worker wrote: %s", error)
        log.info("stopping after %d generation request%s", count, "" if count == 1 else "s")
        return EXIT_OK


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Serve a GGUF model over HTTP through gpt4all.")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="config file (default: %(default)s)")
    add_address_arguments(parser)
    parser.add_argument("--zygote", action="store_true", help=argparse.SUPPRESS)  # started by watchdog.py
    arguments = parser.parse_args(argv)
    try:
        settings = load_settings(arguments.config, host=arguments.host, port=arguments.port)
    except ValueError as error:
        print(f"gpt4all_api: {error}", file=sys.stderr)
        return EXIT_CANNOT_LOAD
    under_watchdog = ENV_LISTEN_FD in os.environ or arguments.zygote
    configure_logging(settings, None if under_watchdog else "server.log")
    faulthandler.enable()
    if arguments.zygote:
        code = run_zygote(settings, lambda preloaded: WorkerLife(settings, preloaded).run())
    else:
        code = WorkerLife(settings).run()
    logging.shutdown()
    return code


if __name__ == "__main__":
    sys.exit(main())
