"""HTTP: the transport. The handler reads a request, calls api.dispatch() and writes the reply.

Owns Handler (body limits, chunked bodies, streamed replies, one access line per request, the
standard library's own errors as JSON), Server (on its own socket or the watchdog's) and the accept
loop. What the process does between requests (in-flight count, when to stop accepting) it asks of a
Lifecycle, to which it also reports each finished request (the metrics). Imports engine (ClientGone),
api and metrics (the report's fields) only.
"""

from __future__ import annotations

import logging
import os
import select
import socket
import threading
import time
import traceback
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Callable, Protocol
from urllib.parse import parse_qsl, urlsplit

from apiserver.api import ApiError, App, Reply, Request, as_api_error, dispatch, error_reply
from apiserver.engine import ClientGone
from apiserver.metrics import generation_report

log = logging.getLogger("gpt4all_api")
access_log = logging.getLogger("gpt4all_api.access")


def client_connected(connection: socket.socket) -> bool:
    """False once the client has closed its side (readable with nothing to read)."""
    try:
        poller = select.poll()
        poller.register(connection, select.POLLIN)
        if not poller.poll(0):
            return True
        return connection.recv(1, socket.MSG_PEEK) != b""
    except (OSError, ValueError):
        return False


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "gpt4all_api"
    server: Server

    def setup(self) -> None:
        # socketserver reads the timeout from the handler; one per connection, set from the settings
        self.timeout = self.server.app.settings.socket_timeout  # type: ignore[misc]
        self.counted = False  # in app.in_flight: from its request line to its reply
        self.classified = self.server.classified_events.pop(self.request, threading.Event())
        super().setup()

    def handle(self) -> None:
        try:
            super().handle()
        finally:
            self.classified.set()
            if self.counted:
                self.server.life.end_request()
            self.server.life.count_connection(-1)

    def parse_request(self) -> bool:
        if not self.counted:
            if not self.server.life.begin_request():  # the worker is exiting
                self.close_connection = True
                return False
            self.counted = True
        return super().parse_request()

    def do_GET(self) -> None:
        self.handle_any()

    do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_HEAD = do_GET

    def handle_any(self) -> None:
        app = self.server.app
        started = time.monotonic()
        reply: Reply | None = None
        request: Request | None = None
        url = urlsplit(self.path)
        try:
            path = url.path.rstrip("/") or "/"
            request = Request(self.command, path, dict(parse_qsl(url.query, keep_blank_values=True)),
                              {name.lower(): value for name, value in self.headers.items()},
                              client_alive=lambda: client_connected(self.connection),
                              mark_classified=self.classified.set)
            try:
                request.body = self.read_body(bool(url.query))
            except ApiError as error:
                request.body_error = error
            reply = dispatch(app, request)
            self.send_reply(reply)
        except ClientGone:
            self.close_connection = True
            reply = None  # logged as 499
        finally:
            self.classified.set()
            if not self.close_connection:  # idle until its next request: not in flight
                self.counted = False
                self.server.life.end_request()
            status = reply.status if reply else 499  # 499: the client left first (nginx's code)
            tokens = reply.usage.get("completion_tokens", "-") if reply else "-"
            seconds = time.monotonic() - started
            self.log_access(url.path, status, f"{seconds:.3f}s", tokens)
            self.server.life.report_request(generation_report(request.route if request else "unmatched", status,
                                                              seconds, request.completion if request else None))

    def log_access(self, path: str, status: int, latency: str, tokens: Any) -> None:
        """One line per request; the path without its query, which may hold a prompt."""
        access_log.info("%s %s %s %d %s tokens=%s pid=%d", self.client_address[0], self.command or "-", path,
                        status, latency, tokens, os.getpid())

    def read_body(self, has_query: bool) -> bytes:
        """The body, within max_body_bytes; errors wait in Request.body_error for the route."""
        limit = self.server.app.settings.max_body_bytes
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            return self.read_chunked_body(limit)
        length_text = self.headers.get("Content-Length")
        if length_text is None:
            if self.command in ("POST", "PUT", "PATCH") and not has_query:
                raise ApiError(411, "a Content-Length header (or a chunked body) is required", "length_required")
            return b""
        if not (length_text.strip().isascii() and length_text.strip().isdigit()):
            self.close_connection = True
            raise ApiError(400, f"invalid Content-Length {length_text!r}", "invalid_content_length")
        length = int(length_text)
        if length > limit:
            self.unread_body = length
            raise ApiError(413, f"the body is {length} bytes; the limit is {limit}", "body_too_large")
        return self.read_exactly(length)

    def read_exactly(self, length: int) -> bytes:
        try:
            data = self.rfile.read(length)
        except socket.timeout:
            self.close_connection = True
            raise ApiError(408, "the client was too slow sending the body", "request_timeout") from None
        if len(data) < length:
            raise ClientGone()
        return data

    def read_chunked_body(self, limit: int) -> bytes:
        body = bytearray()
        while True:
            try:
                size_text = self.rfile.readline(1024).split(b";")[0].strip()
                if not size_text or size_text.strip(b"0123456789abcdefABCDEF"):
                    raise ValueError(size_text)
                size = int(size_text, 16)
            except socket.timeout:
                self.close_connection = True
                raise ApiError(408, "the client was too slow sending the body", "request_timeout") from None
            except ValueError:
                self.close_connection = True
                raise ApiError(400, "malformed chunked body", "invalid_chunked_body") from None
            if len(body) + size > limit:
                self.close_connection = True
                raise ApiError(413, f"the body exceeds the limit of {limit} bytes", "body_too_large")
            if size == 0:
                while self.rfile.readline(1024).strip():  # trailers
                    pass
                return bytes(body)
            body += self.read_exactly(size)
            self.read_exactly(2)

    def send_reply(self, reply: Reply) -> None:
        if not self.server.life.keeps_idle_connections():
            self.close_connection = True  # a worker that will be replaced keeps no idle connections
        if reply.stream is None:
            self.send_head(reply, len(reply.body))
            if self.command != "HEAD":
                self.write(reply.body)
        else:
            self.send_stream(reply)
        if getattr(self, "unread_body", 0):
            self.discard_unread_body()

    def send_head(self, reply: Reply, length: int | None) -> None:
        self.send_response(reply.status)
        self.send_header("X-Worker-Pid", str(os.getpid()))  # shows that each answer came from a fresh process
        for name, value in reply.headers.items():
            self.send_header(name, value)
        if length is None:
            self.close_connection = True  # the end of the stream is the end of the connection
        else:
            self.send_header("Content-Length", str(length))
        if self.close_connection:
            self.send_header("Connection", "close")
        self.end_headers()

    def send_stream(self, reply: Reply) -> None:
        opened: list[bool] = []

        def emit(data: bytes) -> None:
            if not opened:
                opened.append(True)
                self.send_head(reply, None)
            self.write(data)

        assert reply.stream is not None
        try:
            reply.stream(emit)
        except ClientGone:
            raise
        except Exception as error:  # the stream's framing handles errors after its first event
            if opened:
                raise
            failed = (reply.error_reply or error_reply)(as_api_error(error, f"streaming {self.path}"))
            reply.status, reply.usage = failed.status, failed.usage
            self.send_head(failed, len(failed.body))
            self.write(failed.body)

    def write(self, data: bytes) -> None:
        try:
            self.wfile.write(data)
        except (OSError, ValueError):  # broken pipe, reset, timeout: the client is gone
            self.close_connection = True
            raise ClientGone() from None

    def discard_unread_body(self) -> None:
        """Read what is left of a refused body, briefly, so closing does not reset the reply."""
        try:
            self.connection.shutdown(socket.SHUT_WR)
            self.connection.settimeout(1.0)
            remaining = self.unread_body
            while remaining > 0:
                data = self.connection.recv(min(remaining, 65536))
                if not data:
                    break
                remaining -= len(data)
        except OSError:
            pass
        self.close_connection = True

    def send_error(self, code: int, message: str | None = None, explain: str | None = None) -> None:
        """http.server's own errors (bad request line, header too long, unknown method) as JSON."""
        self.close_connection = True
        if self.request_version == "HTTP/0.9":  # the request line did not parse: still send a status line
            self.request_version = self.protocol_version
        text = message or self.responses.get(code, ("error",))[0]
        reply = error_reply(ApiError(code, f"{text}{': ' + explain if explain else ''}", "bad_request"))
        try:
            self.send_head(reply, len(reply.body))
            if self.command != "HEAD" and code >= 200 and code not in (204, 304):
                self.wfile.write(reply.body)
        except OSError:
            pass
        path = getattr(self, "path", None) or "-"  # unset when the request line did not parse
        self.log_access(path.split("?")[0], code, "-", "-")
        self.server.life.report_request(generation_report("unmatched", code, None))

    def log_message(self, format: str, *args: Any) -> None:
        log.debug("%s " + format, self.client_address[0], *args)

    def log_request(self, code: Any = "-", size: Any = "-") -> None:
        pass  # one access line per request is written by handle_any()


class Lifecycle(Protocol):
    """What the transport asks of the process it serves in (gpt4all_api.py's WorkerLife)."""
    stop_accepting: bool  # leave new connections in the backlog, for a successor or nobody
    one_request_at_a_time: bool  # learn what each request is before accepting the next

    def begin_request(self) -> bool: ...  # False: the process is exiting, refuse the request
    def end_request(self) -> None: ...
    def count_connection(self, change: int) -> None: ...
    def keeps_idle_connections(self) -> bool: ...  # False: close each connection after its reply
    def report_request(self, report: dict[str, Any]) -> None: ...  # one finished request, for the metrics


class Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, app: App, life: Lifecycle, listen_socket: socket.socket | None = None):
        self.app, self.life = app, life
        self.classified_events: dict[socket.socket, threading.Event] = {}  # set once a request is known
        self.request_queue_size = app.settings.backlog
        settings = app.settings
        if listen_socket is None:
            super().__init__((settings.host, settings.port), Handler)
        else:  # the watchdog's socket, already bound and listening
            super().__init__(listen_socket.getsockname()[:2], Handler, bind_and_activate=False)
            self.socket.close()
            self.socket = listen_socket
            self.server_address = listen_socket.getsockname()[:2]
        self.socket.setblocking(False)  # another process may win the accept() race: never block in it

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.error("error while serving %s:\n%s", client_address, traceback.format_exc())


def serve_until_stopped(server: Server, idle_tick: Callable[[], None]) -> None:
    """Accept connections until life.stop_accepting; idle_tick runs between polls (heartbeat)."""
    life = server.life
    poller = select.poll()
    poller.register(server.socket, select.POLLIN)
    while not life.stop_accepting:
        if poller.poll(100) and not life.stop_accepting:  # SIGTERM while it waited: leave it to the successor
            try:
                connection, address = server.get_request()
            except OSError:  # BlockingIOError when another worker took it first
                continue
            classified = server.classified_events[connection] = threading.Event()
            life.count_connection(+1)
            server.process_request(connection, address)
            if life.one_request_at_a_time:
                # Know what this request is before taking the next one: a worker whose restart it
                # makes due must leave the next request in the backlog, for its successor. A client
                # that stays silent gets half a second.
                classified.wait(0.5)
        idle_tick()
