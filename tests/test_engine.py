"""The engine: stop strings cut across pieces, finish reasons."""

from __future__ import annotations

from apiserver.api import dispatch
from apiserver.engine import StopScanner
from fake_model import FakeModel
from unit_helpers import json_body, make_app, make_request

# --------------------------------------------------------------------------------------------
# 4. Stop strings
# --------------------------------------------------------------------------------------------


def feed_all(scanner: StopScanner, pieces: list[str]) -> list[str]:
    """What the scanner releases for each piece, then at the end."""
    released = []
    for piece in pieces:
        released.append(scanner.feed(piece))
        if scanner.stopped:
            break
    released.append(scanner.flush())
    return released


def test_stop_split_across_pieces_is_cut_and_never_released():
    scanner = StopScanner(["<|im_end|>"])
    assert feed_all(scanner, ["Hello <|im", "_en", "d|> more"]) == ["Hello ", "", "", ""]
    assert (scanner.text, scanner.stopped) == ("Hello ", True)


def test_held_back_prefix_is_released_when_no_stop_follows():
    scanner = StopScanner(["<|im_end|>"])
    assert feed_all(scanner, ["Hello <|im", "ag", "e"]) == ["Hello ", "<|imag", "e", ""]
    scanner = StopScanner(["<|im_end|>"])
    assert feed_all(scanner, ["Hello <|im"]) == ["Hello ", "<|im"]
    assert (scanner.text, scanner.stopped) == ("Hello <|im", False)


def test_earliest_of_several_stops_wins():
    scanner = StopScanner(["world", "lo"])
    assert feed_all(scanner, ["Hello world"]) == ["Hel", ""]
    scanner = StopScanner(["abcd", "c"])
    assert feed_all(scanner, ["ab", "c", "d"]) == ["", "ab", ""]
    assert scanner.text == "ab"
    scanner = StopScanner(["abcd", "c"])  # both complete in one piece: the one that starts first wins
    assert feed_all(scanner, ["ab", "cd"]) == ["", "", ""]
    assert scanner.text == ""


def test_stop_overlapping_its_own_prefix_is_found():
    scanner = StopScanner(["aab"])
    assert "".join(feed_all(scanner, ["a", "a", "a", "b", "c"])) == "a"
    assert scanner.stopped


def test_no_stops_release_everything_at_once():
    scanner = StopScanner([])
    assert feed_all(scanner, ["a", "b"]) == ["a", "b", ""]


def test_chatml_end_marker_written_as_text_ends_the_answer(settings):
    app = make_app(settings, FakeModel(pieces=["1,2,3", ",<|im", "_end|>", "more"]))
    reply = dispatch(app, make_request(body={"prompt": "count"}, headers={"Accept": "application/json"}))
    document = json_body(reply)
    assert (document["response"], document["finish_reason"]) == ("1,2,3,", "stop")
    assert document["usage"]["completion_tokens"] == 3


def test_request_stop_string_ends_the_answer(settings):
    app = make_app(settings, FakeModel(pieces=["one", " two", " three"]))
    reply = dispatch(app, make_request(body={"prompt": "count", "stop": " tw"}))
    assert (reply.body, reply.headers["X-Finish-Reason"]) == (b"one", "stop")


def test_max_tokens_reached_gives_finish_reason_length(settings):
    model = FakeModel(pieces=["a "] * 10)
    app = make_app(settings, model)
    reply = dispatch(app, make_request(body={"prompt": "hi", "max_tokens": 3}, headers={"Accept": "application/json"}))
    document = json_body(reply)
    assert (document["response"], document["finish_reason"]) == ("a a a ", "length")
    assert document["usage"]["completion_tokens"] == 3


def test_answer_ending_on_its_own_gives_finish_reason_stop(settings):
    app = make_app(settings, FakeModel(pieces=["a "] * 3))
    reply = dispatch(app, make_request(body={"prompt": "hi", "max_tokens": 5}))
    assert (reply.body, reply.headers["X-Finish-Reason"]) == (b"a a a ", "stop")
