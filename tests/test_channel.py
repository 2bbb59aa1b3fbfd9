"""The control channel (apiserver/channel.py) on both socket pairs: whole messages, in order, with
their file descriptors, whatever the reads cut; the stream's framing is what macOS runs."""

from __future__ import annotations

import os
import socket
import threading

import pytest

from apiserver import channel as channel_module
from apiserver import system
from apiserver.channel import HEADER, MAX_FDS, Channel, channel_pair

KINDS = ["stream", "seqpacket"]


def pair(kind: str) -> tuple[Channel, Channel]:
    family = socket.SOCK_STREAM if kind == "stream" else socket.SOCK_SEQPACKET
    ours, theirs = socket.socketpair(socket.AF_UNIX, family)
    return Channel(ours), Channel(theirs)


def file_with(text: bytes) -> int:
    reader, writer = os.pipe()
    os.write(writer, text)
    os.close(writer)
    return reader


@pytest.mark.parametrize("kind", KINDS)
def test_messages_arrive_whole_and_in_order_with_their_descriptors(kind: str) -> None:
    sender, receiver = pair(kind)
    big = b"x" * 150_000  # bigger than a stream's read: sent by a thread, as a reader takes it

    def send_all() -> None:
        sender.send(b"Afirst")
        sender.send(b"fwith two files", [file_with(b"one"), file_with(b"two")])
        sender.send(big)
        sender.send(b"Dlast")
    writer = threading.Thread(target=send_all)
    writer.start()
    received = []
    for _ in range(4):
        message = receiver.receive()
        assert message is not None
        received.append(message)
    writer.join()
    assert [data[:1] for data, _ in received] == [b"A", b"f", b"x", b"D"]
    assert received[2][0] == big
    assert [os.read(fd, 10) for fd in received[1][1]] == [b"one", b"two"]
    assert all(not fds for index, (_, fds) in enumerate(received) if index != 1)
    sender.close()
    assert receiver.receive() is None
    receiver.close()


@pytest.mark.parametrize("kind", KINDS)
def test_a_non_blocking_reader_gets_every_ready_message_then_the_end(kind: str) -> None:
    sender, receiver = pair(kind)
    receiver.socket.setblocking(False)
    assert receiver.receive_ready() == [] and not receiver.eof
    for number in range(50):
        fds = [file_with(str(number).encode())] if number % 7 == 0 else []
        sender.send(b"R" + str(number).encode(), fds)
    messages = receiver.receive_ready()
    assert [data for data, _ in messages] == [b"R" + str(number).encode() for number in range(50)]
    for number, (_, fds) in enumerate(messages):
        assert [os.read(fd, 10) for fd in fds] == ([str(number).encode()] if number % 7 == 0 else [])
    sender.close()
    assert receiver.receive_ready() == [] and receiver.eof


def test_a_frame_cut_anywhere_is_put_back_together() -> None:
    """The stream gives bytes as they come: one byte at a time must still make whole messages."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    receiver = Channel(theirs)
    frames = b"".join(HEADER.pack(len(message), 0) + message for message in (b"Mone", b"N2", b"m" + b"z" * 999))
    writer = threading.Thread(target=lambda: [ours.send(frames[i:i + 1]) for i in range(len(frames))])
    writer.start()
    assert [receiver.receive()[0] for _ in range(3)] == [b"Mone", b"N2", b"m" + b"z" * 999]  # type: ignore[index]
    writer.join()
    ours.close()
    assert receiver.receive() is None


def test_a_non_blocking_sender_waits_for_a_full_stream_then_gives_up_and_shuts_it(monkeypatch) -> None:
    """The watchdog's end is non-blocking: a stuck worker must not hold it longer than SEND_TIMEOUT,
    and a half-sent frame must not garble what follows (the stream is shut: the worker sees EOF)."""
    monkeypatch.setattr(channel_module, "SEND_TIMEOUT", 0.2)
    sender, receiver = pair("stream")
    sender.socket.setblocking(False)
    with pytest.raises(OSError):
        for _ in range(1000):  # nobody reads: the buffers fill
            sender.send(b"m" + b"y" * 100_000)
    assert sender.socket.gettimeout() == 0.0  # back to non-blocking for the selector loop
    sender.close()
    received = 0
    while receiver.receive() is not None:
        received += 1
    assert received >= 1  # the whole frames before the cut arrived, then the end


def test_the_pair_is_a_packet_pair_on_linux_and_a_stream_where_the_extras_are_off(monkeypatch) -> None:
    monkeypatch.delenv(system.PORTABLE_ENV, raising=False)
    ours, theirs = channel_pair()
    assert Channel(ours).framed is (not system.seqpacket())
    assert not ours.get_inheritable() and not theirs.get_inheritable()
    monkeypatch.setenv(system.PORTABLE_ENV, "1")
    ours, theirs = channel_pair()
    assert Channel(ours).framed and Channel(theirs).framed
    assert MAX_FDS >= 3  # a fork request carries the socket, the channel and the output pipe
