"""The watchdog's own answers while no worker can serve: a 503 with the reason, at once.

Owns UnavailableResponder, a small non-blocking HTTP/1.x responder driven by the watchdog's
selector. While the supervisor says nothing will accept soon (the model cannot load, a backoff
runs), the watchdog accepts on the held socket itself, reads each request's head (never its body),
answers GET /health with {"status": "unavailable", "reason", "retry_in_s"} and anything else with
the JSON error body of api.error_reply (code model_unavailable), both with Retry-After, and closes.
It never accepts while a worker is active, ready or starting. Imports only the standard library: a
leaf that watchdog.py may import.
"""

from __future__ import annotations

import json
import logging
import math
import selectors
import socket
import time
from typing import Callable
from urllib.parse import urlsplit

log = logging.getLogger("watchdog")

MAX_REASON = 300  # characters of the reason a client is shown (the whole line is in the log)
MAX_HEAD_BYTES = 16384  # a request head larger than this is answered without reading the rest
HEAD_SECONDS = 2.0  # a client silent this long is answered anyway
DRAIN_SECONDS = 1.0  # after the answer, what the client still sends is read and dropped, so that
                     # closing does not reset the connection before it has read the answer


def unavailable_reply(method: str, path: str, reason: str, retry_in: float) -> bytes:
    """The whole HTTP response: /health in its own shape, any other path in api.error_reply's."""
    seconds = max(1, math.ceil(retry_in))
    if path == "/health":
        document = {"status": "unavailable", "reason": reason, "retry_in_s": seconds}
    else:
        document = {"error": {"message": f"{reason}; next try in {seconds} s", "type": "service_unavailable",
                              "param": None, "code": "model_unavailable"}}
    body = json.dumps(document, ensure_ascii=False).encode("utf-8")
    head = (f"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            f"Retry-After: {seconds}\r\nConnection: close\r\n\r\n")
    return head.encode("ascii") + (b"" if method == "HEAD" else body)


class Client:
    """One accepted connection: its head so far, then (answered) the time it may drain until."""

    def __init__(self, connection: socket.socket, now: float):
        self.connection = connection
        self.head = b""
        self.deadline = now + HEAD_SECONDS
        self.answered = False


class UnavailableResponder:
    """Accepts on the held socket while there is a reason to; answers each client with a 503."""

    def __init__(self, selector: selectors.BaseSelector, clock: Callable[[], float] = time.monotonic):
        self.selector, self.clock = selector, clock
        self.listener: socket.socket | None = None  # registered while unavailable
        self.reason = "no worker can serve"
        self.retry_at = 0.0
        self.clients: dict[socket.socket, Client] = {}
        self.answered = 0
        self.on_answer: Callable[[], None] = lambda: None  # each 503 sent (the watchdog counts it)

    def update(self, listener: socket.socket, unavailable: tuple[str, float] | None) -> None:
        """Call once per loop, before select(): accept while unavailable is (reason, retry_in)."""
        now = self.clock()
        if unavailable is not None:
            self.reason, self.retry_at = unavailable[0][:MAX_REASON], now + unavailable[1]
            if self.listener is None:
                self.listener = listener
                self.selector.register(listener, selectors.EVENT_READ, self.accept)
                log.warning("no worker can serve: answering clients 503 (%s)", self.reason)
        elif self.listener is not None:
            self.selector.unregister(self.listener)
            self.listener = None
            log.info("a worker is coming: clients wait for it again (%d answered 503)", self.answered)
        for client in [client for client in self.clients.values() if now >= client.deadline]:
            if client.answered:
                self.close(client)
            else:
                self.answer(client)

    def accept(self) -> None:
        while self.listener is not None:  # the listener is non-blocking (the watchdog sets it so)
            try:
                connection, _ = self.listener.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as error:  # out of file descriptors, a reset before accept: try next poll
                log.warning("cannot accept: %s", error)
                return
            connection.setblocking(False)
            client = self.clients[connection] = Client(connection, self.clock())
            self.selector.register(connection, selectors.EVENT_READ, lambda client=client: self.read(client))

    def read(self, client: Client) -> None:
        try:
            data = client.connection.recv(4096)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if client.answered:
            if not data:
                self.close(client)
            return
        client.head += data
        if not data or b"\r\n\r\n" in client.head or len(client.head) >= MAX_HEAD_BYTES:
            self.answer(client)
            if not data:
                self.close(client)

    def answer(self, client: Client) -> None:
        request_line = client.head.split(b"\r\n", 1)[0].decode("latin-1").split()
        method = request_line[0] if request_line else "GET"
        try:
            path = (urlsplit(request_line[1]).path.rstrip("/") or "/") if len(request_line) > 1 else "/"
        except ValueError:  # a target urlsplit refuses ("//[", ...): whatever it is, it gets the 503
            path = "/"
        reply = unavailable_reply(method, path, self.reason, self.retry_at - self.clock())
        try:
            client.connection.send(reply)  # a few hundred bytes: the socket's buffer takes them at once
            client.connection.shutdown(socket.SHUT_WR)
        except OSError:
            self.close(client)
            return
        self.answered += 1
        self.on_answer()
        client.answered, client.deadline = True, self.clock() + DRAIN_SECONDS

    def close(self, client: Client) -> None:
        if self.clients.pop(client.connection, None) is not None:
            self.selector.unregister(client.connection)
            client.connection.close()
