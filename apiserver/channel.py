"""The control channel between the watchdog and one worker: whole messages, each with the file
descriptors it carries, over whichever socket pair this system has (system.seqpacket).

A SOCK_SEQPACKET pair (Linux) keeps each message whole by itself. Elsewhere (macOS has no
SEQPACKET for AF_UNIX) the pair is a stream and each message is framed: a header of its length
and its count of file descriptors, then the message; the descriptors ride on the frame's first
byte (SCM_RIGHTS), so they arrive no later than the frame that owns them and are taken from a queue
in order. Either end tells which kind it holds from the socket itself, so nothing else is passed.
Imports system.
"""

from __future__ import annotations

import collections
import os
import socket
import struct
import threading
from collections.abc import Sequence

from apiserver import system

MAX_MESSAGE = 1 << 20
MAX_FDS = 4  # file descriptors a message may carry
HEADER = struct.Struct("!IB")  # a framed message's length, and how many descriptors ride on it
CHUNK = 1 << 16  # bytes read at a time from a stream
FDS_PER_READ = 8 * MAX_FDS  # room for the descriptors of several frames read at once
SEND_TIMEOUT = 2.0  # seconds a framed send may wait on a full stream (the other end reads always)

Message = tuple[bytes, list[int]]


def channel_pair() -> tuple[socket.socket, socket.socket]:
    """(watchdog's end, worker's end), neither inheritable (pass_fds or SCM_RIGHTS hand it over)."""
    kind = socket.SOCK_SEQPACKET if system.seqpacket() else socket.SOCK_STREAM
    return socket.socketpair(socket.AF_UNIX, kind)


def is_packet_socket(sock: socket.socket) -> bool:
    return sock.type == getattr(socket, "SOCK_SEQPACKET", None)


def close_all(fds: Sequence[int]) -> None:
    for fd in fds:
        os.close(fd)


class Channel:
    """One end of a control channel. send() from any thread; one reader, either receive() on a
    blocking socket or receive_ready() on a non-blocking one (the watchdog's selector loop)."""

    def __init__(self, sock: socket.socket) -> None:
        self.socket = sock
        self.framed = not is_packet_socket(sock)
        self.buffer = bytearray()
        self.fds: collections.deque[int] = collections.deque()  # received, not yet given to a message
        self.ready: collections.deque[Message] = collections.deque()  # read, not yet taken by receive()
        self.eof = False
        self.send_lock = threading.Lock()

    def close(self) -> None:
        close_all(self.fds)
        self.fds.clear()
        for _, fds in self.ready:
            close_all(fds)
        self.ready.clear()
        self.socket.close()

    def send(self, message: bytes, fds: Sequence[int] = ()) -> None:
        """One message; OSError when it could not go (the other end is gone, or, on a stream, did
        not read for SEND_TIMEOUT: the stream is then shut, as a half-sent frame would garble it)."""
        if not self.framed:
            if fds:
                socket.send_fds(self.socket, [message], list(fds))
            else:
                self.socket.send(message)
            return
        frame = HEADER.pack(len(message), len(fds)) + message
        with self.send_lock:
            non_blocking = self.socket.gettimeout() == 0.0
            if non_blocking:
                self.socket.settimeout(SEND_TIMEOUT)
            sent = 0
            try:
                sent = socket.send_fds(self.socket, [frame], list(fds)) if fds else self.socket.send(frame)
                if sent < len(frame):
                    self.socket.sendall(memoryview(frame)[sent:])
            except OSError:
                if sent:
                    self.socket.shutdown(socket.SHUT_RDWR)
                raise
            finally:
                if non_blocking:
                    self.socket.setblocking(False)

    def read_once(self) -> list[Message]:
        """One read from the socket: the messages it completed. BlockingIOError when nothing is
        there (non-blocking); at the end of the channel, eof is set."""
        try:
            data, fds, _, _ = socket.recv_fds(self.socket, CHUNK if self.framed else MAX_MESSAGE,
                                              FDS_PER_READ if self.framed else MAX_FDS)
        except (BlockingIOError, InterruptedError):
            raise
        except OSError:
            data, fds = b"", []
        if not data:
            close_all(fds)
            self.eof = True
            return []
        if not self.framed:
            return [(data, fds)]
        self.buffer += data
        self.fds.extend(fds)
        return self.complete_frames()

    def complete_frames(self) -> list[Message]:
        messages = []
        while len(self.buffer) >= HEADER.size:
            length, count = HEADER.unpack_from(self.buffer)
            if len(self.buffer) < HEADER.size + length:
                break
            message = bytes(self.buffer[HEADER.size:HEADER.size + length])
            del self.buffer[:HEADER.size + length]
            messages.append((message, [self.fds.popleft() for _ in range(min(count, len(self.fds)))]))
        return messages

    def receive_ready(self) -> list[Message]:
        """Every message that has arrived (non-blocking socket); eof is set at the channel's end."""
        messages: list[Message] = []
        while not self.eof:
            try:
                messages += self.read_once()
            except (BlockingIOError, InterruptedError):
                break
        return messages

    def receive(self) -> Message | None:
        """The next message (blocking socket); None at the channel's end."""
        while not self.ready:
            if self.eof:
                return None
            try:
                self.ready.extend(self.read_once())
            except InterruptedError:
                continue
        return self.ready.popleft()
