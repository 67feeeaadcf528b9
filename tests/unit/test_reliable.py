"""gateway/reliable.py: the kind byte, acks, the hello, the window, the resume checks;
and the route key `reliable:` in config."""

from __future__ import annotations

import json
import textwrap

import pytest

from gateway import config, reliable
from gateway.errors import ConfigError, Refusal
from gateway.reliable import Inbound, Peer, Window


def test_kind_bytes_are_the_letters_of_the_spec():
    assert (bytes([reliable.DATA]), bytes([reliable.ACK]), bytes([reliable.HELLO])) == (b"d", b"a", b"h")


@pytest.mark.parametrize("raw, count", [(b"0", 0), (b"17", 17), (b"9" * 19, int("9" * 19))])
def test_an_ack_is_a_decimal_count(raw, count):
    assert reliable.parse_ack(raw) == count
    assert reliable.ack(count) == b"a" + raw


@pytest.mark.parametrize("raw", [b"", b"-1", b"+1", b" 1", b"1 ", b"1.0", b"0x10", b"9" * 20, "١".encode()])
def test_anything_else_is_not_an_ack(raw):
    assert reliable.parse_ack(raw) is None


def test_the_hello_carries_what_the_client_needs_to_carry_on():
    raw = reliable.hello("sess", "sess.secret", 41, 17)
    assert raw[:1] == b"h"
    assert json.loads(raw[1:]) == {"v": 1, "session": "sess", "token": "sess.secret", "up": 41, "down": 17}


def test_the_window_keeps_what_was_sent_until_acked():
    w = Window(max_bytes=100, max_messages=10)
    assert [w.add(1, b"x" * i) for i in (1, 2, 3)] == [1, 2, 3]
    assert (w.first, w.sent, w.size, len(w)) == (1, 3, 6, 3)
    assert w.ack(2)
    assert (w.first, w.size, list(w.items)) == (3, 3, [(1, b"xxx")])
    assert w.ack(1)                    # older than one seen: harmless
    assert w.first == 3
    assert not w.ack(4)                # above what was sent
    assert w.ack(3) and len(w) == 0 and w.size == 0 and w.first == 4


@pytest.mark.parametrize("bound, adds, full_after", [("messages", [1] * 5, 3), ("bytes", [4, 4, 4], 3)])
def test_the_window_is_full_at_either_bound_and_an_ack_makes_room(bound, adds, full_after):
    w = Window(max_bytes=10, max_messages=3) if bound == "messages" else Window(max_bytes=10, max_messages=99)
    fulls = []
    for n in adds[:full_after]:
        w.add(2, b"y" * n)
        fulls.append(w.full)
    assert fulls == [False] * (full_after - 1) + [True]
    w.ack(1)
    assert not w.full


def test_a_window_continues_the_count_of_a_resumed_session():
    w = Window(10, 10, sent=40)
    assert w.add(1, b"a") == 41 and w.first == 41
    w.add(1, b"b")
    assert w.after(40) == [(1, b"a"), (1, b"b")]
    assert w.after(41) == [(1, b"b")] and w.after(42) == []


def test_inbound_counts_and_acks_what_it_took():
    i = Inbound(ack_every=2, taken=5)
    assert i.acking() is None
    assert i.take() == 1 and i.take() == 2
    assert i.acking() == 7 and i.acking() is None


@pytest.mark.parametrize("last, first, sent, status, reason", [
    (3, 5, 9, 410, "resume refused: window (kept from 5)"),   # 4 was acked and dropped: the client lost state
    (10, 5, 9, 400, "resume refused: last out of range (sent 9)"),
])
def test_resume_checks_refuse_what_the_window_cannot_serve(last, first, sent, status, reason):
    with pytest.raises(Refusal) as exc:
        reliable.check_last(last, first, sent)
    assert exc.value.status == status and exc.value.reason.startswith(reason)


@pytest.mark.parametrize("last", [4, 5, 9])
def test_resume_checks_pass_inside_the_window(last):
    reliable.check_last(last, 5, 9)


def test_last_is_parsed_strictly():
    assert reliable.parse_last(None) is None and reliable.parse_last("12") == 12
    for bad in ("", "-1", "1e3", "x"):
        with pytest.raises(Refusal) as exc:
            reliable.parse_last(bad)
        assert exc.value.status == 400


# ---------------------------------------------------------------- config
BASE = """\
backends:
  b: {type: websocket, endpoints: ["ws://127.0.0.1:1/"]}
  h: {type: http, endpoints: ["http://127.0.0.1:1/"]}
routes:
  - name: r
    match: {path: /ws}
    backend: %s
"""


def parse(route_extra: str, backend: str = "b"):
    return config.parse(BASE % backend + textwrap.indent(route_extra, "    "), source="routes.yaml")


def test_reliable_defaults_as_the_doc_says():
    route = parse("reliable:\n").routes[0]
    assert route.reliable == config.Reliable(max_unacked_bytes=1_048_576, max_unacked_messages=10_000,
                                             ack_every=64, ack_ms=200)
    assert parse("").routes[0].reliable is None
    p = Peer(parse("reliable: {ack_ms: 50, ack_every: 8}\n").routes[0].reliable, up=3, down=4)
    assert (p.ack_s, p.inbound.ack_every, p.inbound.taken, p.window.sent) == (0.05, 8, 3, 4)


def test_reliable_unknown_key_and_bad_values_name_file_and_line():
    with pytest.raises(ConfigError) as exc:
        parse("reliable:\n  max_unacked_byte: 10\n  ack_every: 0\n")
    problems = exc.value.problems
    assert any(p.startswith("routes.yaml:9:") and "max_unacked_byte" in p and "max_unacked_bytes" in p
               for p in problems), problems
    assert any(p.startswith("routes.yaml:10:") and "ack_every" in p and "at least 1" in p for p in problems), problems


BUILTIN = """\
backends:
  e: {type: builtin, handler: echo}
routes:
  - name: r
    match: {path: /ws}
    backend: e
    reliable: {}
"""


def test_reliable_takes_websocket_and_http_backends_not_builtin():
    assert parse("reliable: {}\n", backend="h").routes[0].reliable is not None
    with pytest.raises(ConfigError) as exc:
        config.parse(BUILTIN, source="routes.yaml")
    assert any("reliable" in p and "websocket or http backend" in p and "e" in p for p in exc.value.problems), \
        exc.value.problems


def test_a_replay_buffer_ends_with_the_counts_a_resume_needs():
    entries = [("1", 1, b"s5"), ("2", 1, b"s6"), ("3", reliable.META, reliable.meta(5, 12))]
    assert reliable.split_replay(entries) == (5, 12, entries[:2])
    assert reliable.split_replay([("1", reliable.META, reliable.meta(3, 0))]) == (3, 0, [])
    pushed = entries + [("4", 2, b"pushed while parked")]
    assert reliable.split_replay(pushed) == (5, 12, entries[:2] + pushed[3:])
    for broken in ([], entries[:2], [("1", reliable.META, b"{}")], [("1", reliable.META, b"not json")]):
        assert reliable.split_replay(broken) is None


def test_the_windows_messages_are_numbered_first_wherever_a_publisher_got_in_before_them():
    w = reliable.WINDOWED
    entries = [("1", 1, b"published"), ("2", 1 | w, b"w5"), ("3", 2 | w, b"w6"), ("4", 1, b"from the backend"),
               ("5", reliable.META, reliable.meta(5, 3)), ("6", 1, b"pushed after the seal")]
    assert reliable.split_replay(entries) == (5, 3, [("2", 1, b"w5"), ("3", 2, b"w6"), ("1", 1, b"published"),
                                                     ("4", 1, b"from the backend"), ("6", 1, b"pushed after the seal")])


@pytest.mark.parametrize("n", [0, 125, 126, 65535, 65536])
def test_masked_head_is_the_head_frames_builds(n):
    from gateway import frames
    whole = frames.frame(frames.OP_BINARY, b"z" * n, mask=True)
    head = reliable.masked_head(frames.OP_BINARY, n)
    assert whole.startswith(head) and len(whole) == len(head) + 4 + n
