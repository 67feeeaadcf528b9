"""The Python client's pure parts (clients/python/gateway_client): backoff,
the close-code and refusal table, the outbound queue, correlation, states,
and reliable mode's frames, hello, counts and window."""

from __future__ import annotations

import itertools

import pytest

from gateway_client import Action, Backoff, GatewayClient, QueueFull, State
from gateway_client.correlation import RequestIds, reply_id
from gateway_client.outbox import Outbox
from gateway_client.policy import (RESUME_RETRY_REASON, Verdict, after_close, after_refusal, after_reliable_close,
                                   parse_retry_after, resume_token)
from gateway_client.reliable import (ACK_EVERY, ACK_MS, Hello, ProtocolError, ReliableSession, decode_frame, encode_data,
                                     parse_ack, parse_hello)
from gateway_client.states import InvalidTransition, advance
from gateway_client.transport import refusal_reason

TOKEN = "s" * 16 + "." + "k" * 22


# ---------------------------------------------------------------- backoff
def test_backoff_window_doubles_from_base_to_the_cap():
    b = Backoff(base_s=0.5, max_s=30, random=lambda: 1.0)
    assert [b.delay(a) for a in range(8)] == [0.5, 1, 2, 4, 8, 16, 30, 30]
    assert b.delay(10_000) == 30       # no overflow however long it fails


def test_backoff_is_full_jitter_over_the_window():
    draws = iter([0.0, 0.25, 0.5, 0.999])
    b = Backoff(base_s=1, max_s=100, random=lambda: next(draws))
    assert [b.delay(3) for _ in range(4)] == [0.0, 2.0, 4.0, pytest.approx(7.992)]


def test_try_again_later_never_comes_sooner_than_its_minimum_and_grows():
    b = Backoff(base_s=0.5, max_s=30, try_again_min_s=5, random=lambda: 0.0)
    assert b.try_again_delay(0) == 5
    b = Backoff(base_s=0.5, max_s=30, try_again_min_s=5, random=lambda: 1.0)
    assert [b.try_again_delay(a) for a in (0, 1, 2, 6)] == [5.5, 6, 7, 30]
    assert b.try_again_delay(0) > b.delay(0)


def test_resume_and_retry_after_delays_are_small_jitter_around_what_was_asked():
    b = Backoff(resume_jitter_s=0.25, retry_after_jitter_s=1.0, random=lambda: 0.5)
    assert b.resume_delay() == 0.125
    assert b.retry_after_delay(5) == 5.5
    assert b.retry_after_delay(3600) == 30.5      # capped at max_s, plus jitter


def test_backoff_refuses_negative_settings():
    with pytest.raises(ValueError, match="base_s must be >= 0"):
        Backoff(base_s=-1)


# ---------------------------------------------------------------- what a close means
@pytest.mark.parametrize("code, action", [
    (1000, Action.STOP), (1001, Action.RECONNECT), (1006, Action.RECONNECT), (None, Action.RECONNECT),
    (1008, Action.REAUTH), (1011, Action.RECONNECT), (1012, Action.RECONNECT), (1013, Action.TRY_LATER),
    (1009, Action.RECONNECT), (4000, Action.RECONNECT),
])
def test_close_code_table(code, action):
    v = after_close(code, "")
    assert v.action is action and v.resume_token is None


def test_1012_with_a_resume_token_resumes_with_it():
    v = after_close(1012, f"resume={TOKEN}")
    assert v.action is Action.RESUME and v.resume_token == TOKEN


@pytest.mark.parametrize("reason", ["resume=", "resume=short.x", f"resume={TOKEN} extra", f"Resume={TOKEN}"])
def test_a_malformed_resume_reason_is_a_plain_restart(reason):
    assert after_close(1012, reason).action is Action.RECONNECT
    assert resume_token(reason) is None


def test_a_token_in_another_close_code_is_not_a_resume():
    assert after_close(1001, f"resume={TOKEN}").action is Action.RECONNECT


def test_1013_after_a_resume_that_could_not_finish_keeps_the_token():
    held = after_close(1013, RESUME_RETRY_REASON, resume_token_held=TOKEN)
    assert held.action is Action.TRY_LATER and held.resume_token == TOKEN
    assert after_close(1013, "slow consumer", resume_token_held=TOKEN).resume_token is None


def test_the_caller_can_change_what_a_code_means():
    assert after_close(1000, "", overrides={1000: Action.RECONNECT}).action is Action.RECONNECT
    assert after_close(4001, "", overrides={4001: Action.STOP}).action is Action.STOP


# ---------------------------------------------------------------- what a refused upgrade means
@pytest.mark.parametrize("status, retry_after, action", [
    (401, None, Action.REAUTH), (403, None, Action.REAUTH), (503, 5.0, Action.RETRY_AFTER),
    (503, None, Action.RECONNECT), (429, None, Action.TRY_LATER), (502, None, Action.RECONNECT),
    (500, None, Action.RECONNECT), (404, None, Action.STOP), (400, None, Action.STOP), (426, None, Action.STOP),
    (410, None, Action.STOP),
])
def test_refusal_table_for_a_fresh_session(status, retry_after, action):
    v = after_refusal(status, "", retry_after)
    assert v.action is action and v.resume_token is None
    assert v.retry_after_s == (retry_after if action is Action.RETRY_AFTER else None)


@pytest.mark.parametrize("status, reason", [
    (410, "resume refused: the resume window has ended; start a new session"),
    (410, "resume refused: the replay buffer overflowed, messages would be missing"),
    (401, "resume refused: the token does not match the session"),
    (410, ""),
])
def test_a_refused_resume_falls_back_to_a_fresh_session(status, reason):
    v = after_refusal(status, reason, None, resume_token_held=TOKEN)
    assert v.action is Action.RESUME_FAILED and v.resume_token is None


def test_refused_credentials_during_a_resume_keep_the_token_for_a_new_jwt():
    v = after_refusal(401, "token expired", None, resume_token_held=TOKEN)
    assert v.action is Action.REAUTH and v.resume_token == TOKEN


def test_a_503_during_a_resume_keeps_the_token_and_waits_as_asked():
    v = after_refusal(503, "resume refused: the session's previous node is still writing its replay; retry",
                      1.0, resume_token_held=TOKEN)
    assert (v.action, v.resume_token, v.retry_after_s) == (Action.RETRY_AFTER, TOKEN, 1.0)


@pytest.mark.parametrize("value, seconds", [("5", 5.0), (" 1 ", 1.0), ("0.5", 0.5), (None, None), ("-1", None),
                                            ("Wed, 21 Oct 2015 07:28:00 GMT", None)])
def test_retry_after(value, seconds):
    assert parse_retry_after(value) == seconds


def test_refusal_reason_reads_the_gateways_json_body():
    assert refusal_reason(b'{"error": "no route"}') == "no route"
    assert refusal_reason(b'{"reason": "window"}') == "window"
    assert refusal_reason(b"plain text\n") == "plain text"
    assert refusal_reason(b"[1]") == ""


# ---------------------------------------------------------------- the outbound queue
def test_queue_raises_at_its_message_bound():
    q = Outbox(max_messages=2, max_bytes=100, overflow="raise")
    q.push("a")
    q.push(b"b")
    with pytest.raises(QueueFull, match=r"max 2 messages"):
        q.push("c")
    assert [q.pop(), q.pop()] == ["a", b"b"] and len(q) == 0


def test_queue_raises_at_its_byte_bound_counting_utf8():
    q = Outbox(max_messages=10, max_bytes=5, overflow="raise")
    q.push("éé")              # 4 bytes
    with pytest.raises(QueueFull, match="5 bytes"):
        q.push("xx")
    assert q.bytes == 4


def test_drop_oldest_makes_room_and_counts():
    q = Outbox(max_messages=3, max_bytes=1000, overflow="drop_oldest")
    dropped = [q.push(f"m{i}") for i in range(5)]
    assert dropped == [0, 0, 0, 1, 1] and q.dropped == 2
    assert [q.pop() for _ in range(3)] == ["m2", "m3", "m4"]
    q = Outbox(max_messages=10, max_bytes=6, overflow="drop_oldest")
    q.push("aa")
    q.push("bb")
    assert q.push("ccccc") == 2 and q.bytes == 5


def test_a_message_larger_than_the_whole_queue_is_refused_whatever_the_policy():
    q = Outbox(max_messages=10, max_bytes=4, overflow="drop_oldest")
    q.push("ab")
    with pytest.raises(QueueFull, match="larger than the whole queue"):
        q.push("abcde")
    assert len(q) == 1


def test_a_message_leaves_the_queue_only_when_popped():
    q = Outbox()
    q.push("x")
    assert q.peek() == "x" and len(q) == 1


def test_queue_options_are_checked():
    with pytest.raises(ValueError, match="overflow must be"):
        Outbox(overflow="drop_newest")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="max_queue_messages=0"):
        Outbox(max_messages=0)


# ---------------------------------------------------------------- correlation
def test_request_ids_are_unique_per_client_and_across_clients():
    a, b = RequestIds(), RequestIds()
    ids = [a.next() for _ in range(1000)] + [b.next() for _ in range(1000)]
    assert len(set(ids)) == 2000


def test_a_reply_is_a_json_object_whose_field_matches_a_pending_id():
    pending = {"p-1", "p-2"}
    assert reply_id('{"id": "p-2", "ok": true}', "id", pending) == "p-2"
    assert reply_id(' {"ref": "p-1"}', "ref", pending) == "p-1"
    assert reply_id('{"id": "p-3"}', "id", pending) is None       # nobody waits for it
    assert reply_id('{"id": 1}', "id", {"1"}) is None              # ids are strings
    assert reply_id('{"id": "p-1"', "id", pending) is None         # not JSON
    assert reply_id('["p-1"]', "id", pending) is None
    assert reply_id(b'{"id": "p-1"}', "id", pending) is None       # binary is never a reply
    assert reply_id('{"id": "p-1"}', "id", set()) is None          # nothing pending: not even parsed


# ---------------------------------------------------------------- states and options
def test_state_table():
    allowed = {(State.CLOSED, State.CONNECTING), (State.CONNECTING, State.OPEN), (State.CONNECTING, State.CLOSED),
               (State.OPEN, State.RECONNECTING), (State.OPEN, State.CLOSED), (State.RECONNECTING, State.OPEN),
               (State.RECONNECTING, State.CLOSED)}
    for old, new in itertools.product(State, State):
        if (old, new) in allowed:
            assert advance(old, new) is new
        else:
            with pytest.raises(InvalidTransition, match=f"from {old} to {new}"):
                advance(old, new)


@pytest.mark.parametrize("source", ["query", "cookie", "headers", "query:", "subprotocol:x"])
def test_token_source_is_checked_like_the_gateways(source):
    with pytest.raises(ValueError, match="token_source"):
        GatewayClient("ws://127.0.0.1:1/", token_source=source)


def test_unknown_event_names_are_refused():
    c = GatewayClient("ws://127.0.0.1:1/")
    with pytest.raises(ValueError, match="unknown event 'opened'"):
        c.on("opened", print)  # type: ignore[call-overload]


# ---------------------------------------------------------------- reliable mode (docs/reliable.md)
def test_reliable_frames_carry_one_kind_byte_in_the_frame_type_of_the_message():
    assert encode_data("hi") == "dhi" and encode_data(b"\x00") == b"d\x00"
    assert decode_frame("dhi") == ("d", "hi") and decode_frame(b"d\x00") == ("d", b"\x00")
    assert decode_frame("a12") == ("a", "12") and decode_frame('h{"v":1}') == ("h", '{"v":1}')
    for bad in ("", "xhi", b"", b"a12", b"h{}"):      # acks and hellos are text
        with pytest.raises(ProtocolError, match="unknown kind byte"):
            decode_frame(bad)


def test_an_ack_is_plain_digits():
    assert parse_ack("0") == 0 and parse_ack("9" * 19) == int("9" * 19)
    assert [parse_ack(p) for p in ("", "-1", "1.0", " 1", "1x", "9" * 20, "١")] == [None] * 7


def test_the_hello_is_checked_and_takes_the_doc_defaults():
    h = parse_hello('{"v": 1, "session": "s", "token": "s.t", "up": 3, "down": 4}')
    assert (h.token, h.up, h.down, h.session, h.ack_every, h.ack_ms) == ("s.t", 3, 4, "s", ACK_EVERY, ACK_MS)
    assert (ACK_EVERY, ACK_MS) == (64, 200)
    h = parse_hello('{"v": 1, "token": "t", "up": 0, "down": 0, "ack_every": 2, "ack_ms": 5}')
    assert (h.session, h.ack_every, h.ack_ms) == (None, 2, 5.0)
    for bad in ("nope", "[]", '{"v": 2, "token": "t", "up": 0, "down": 0}', '{"v": 1, "token": "", "up": 0, "down": 0}',
                '{"v": 1, "token": "t", "up": -1, "down": 0}', '{"v": 1, "token": "t", "up": true, "down": 0}',
                '{"v": 1, "token": "t", "up": 0, "down": 0, "ack_every": 0}',
                '{"v": 1, "token": "t", "up": 0, "down": 0, "ack_ms": 0}'):
        with pytest.raises(ProtocolError, match="hello"):
            parse_hello(bad)


def hello(up: int = 0, down: int = 0, **more) -> Hello:
    return Hello(token=TOKEN, up=up, down=down, **more)


def live_session(sent: int, **bounds) -> ReliableSession:
    """A session whose first connection took its hello and wrote m1..m<sent>."""
    rel = ReliableSession(**bounds)
    rel.start(hello())
    for i in range(1, sent + 1):
        rel.push(f"m{i}")
        assert rel.next_unsent() == f"m{i}"
    return rel


def test_what_was_sent_is_kept_until_acked_and_a_bad_ack_is_refused():
    rel = live_session(5)
    assert len(rel) == 5 and rel.unsent == 0
    rel.on_ack("3")
    assert (rel.base, len(rel), rel.window.at(0)) == (3, 2, "m4")
    rel.on_ack("2")                      # lower than one seen: harmless
    assert (rel.base, len(rel)) == (3, 2)
    for bad in ("6", "x", ""):           # more than was sent, not a count
        with pytest.raises(ProtocolError, match="bad ack"):
            rel.on_ack(bad)
    rel.on_ack("5")
    assert len(rel) == 0 and rel.base == 5


def test_acks_go_every_ack_every_messages_and_cover_all_received():
    rel = ReliableSession()
    assert rel.ack() is None                         # not live: nothing to ack on
    rel.start(hello(ack_every=3))
    assert [rel.on_data() for _ in range(3)] == [False, False, True]
    assert rel.ack() == "a3" and rel.ack() is None and not rel.ack_pending
    assert rel.on_data() is False and rel.ack_pending   # the ack_ms timer's turn
    assert rel.ack() == "a4"


def test_a_resume_hello_trims_what_the_gateway_took_and_the_rest_goes_again_in_order():
    rel = live_session(5)
    for _ in range(7):
        rel.on_data()
    rel.push("m6")                       # written only on the next connection
    rel.closed()
    assert rel.unsent == 6 and not rel.live
    h = hello(up=3, down=7)
    assert rel.check(h, resuming=True) is None
    rel.start(h)
    assert [rel.next_unsent() for _ in range(rel.unsent)] == ["m4", "m5", "m6"]
    assert (rel.base, rel.acked, rel.token) == (3, 7, TOKEN)   # last= told the gateway of the 7


def test_a_hello_whose_counts_do_not_match_says_why():
    rel = live_session(2)
    for _ in range(4):
        rel.on_data()
    rel.closed()
    assert "resumed after message 3, this client has received 4" in rel.check(hello(up=2, down=3), resuming=True)
    assert "took 3 messages, this client sent 2" in rel.check(hello(up=3, down=4), resuming=True)
    assert "expected 0, 0" in rel.check(hello(up=1, down=0), resuming=False)
    rel.fresh()                           # a new session: the window is sent again from its start
    assert rel.check(hello(), resuming=False) is None and rel.received == 0 and rel.unsent == 2


def test_the_window_is_bounded_as_the_queue_and_drop_oldest_keeps_the_numbers():
    rel = live_session(3, max_messages=3, overflow="raise")
    with pytest.raises(QueueFull):
        rel.push("m4")
    rel = live_session(3, max_messages=3, overflow="drop_oldest")
    assert rel.push("m4") == 1            # m1 was written (numbered 1): the window now starts at 2
    assert (rel.base, rel.written, rel.window.at(0)) == (1, 2, "m2")
    rel.on_ack("3")
    assert len(rel) == 1 and rel.next_unsent() == "m4"
    offline = ReliableSession(max_messages=2, overflow="drop_oldest")
    for m in ("q1", "q2", "q3"):          # before any connection
        offline.push(m)
    offline.start(hello())                # the gateway took none: q2 goes first, as number 1
    assert offline.base == 0 and [offline.next_unsent() for _ in range(2)] == ["q2", "q3"]


@pytest.mark.parametrize("code, reason, expected", [
    (None, "", Verdict(Action.RESUME, TOKEN)),             # no close frame: the network lost
    (1006, "", Verdict(Action.RESUME, TOKEN)),
    (1001, "going away", Verdict(Action.RESUME, TOKEN)),
    (1011, "", Verdict(Action.RESUME, TOKEN)),
    (1012, "resume=" + "d" * 16 + "." + "r" * 22, Verdict(Action.RESUME, "d" * 16 + "." + "r" * 22)),
    (1012, "", Verdict(Action.RESUME, TOKEN)),
    (1013, "", Verdict(Action.TRY_LATER, TOKEN)),
    (1000, "", Verdict(Action.STOP)),
    (1008, "token expired", Verdict(Action.REAUTH)),
])
def test_a_reliable_session_resumes_after_any_close_but_1000_and_1008(code, reason, expected):
    assert after_reliable_close(code, reason, token=TOKEN) == expected


def test_reliable_close_overrides_win_and_a_400_to_a_resume_is_a_fresh_session():
    assert after_reliable_close(1006, "", token=TOKEN, overrides={1006: Action.STOP}) == Verdict(Action.STOP)
    assert after_refusal(400, "resume refused: last out of range", None, resume_token_held=TOKEN,
                         reliable=True) == Verdict(Action.RESUME_FAILED)
    assert after_refusal(400, "bad", None, resume_token_held=TOKEN) == Verdict(Action.STOP)
    assert after_refusal(410, "resume refused: overflowed", None, resume_token_held=TOKEN,
                         reliable=True) == Verdict(Action.RESUME_FAILED)


def test_reliable_takes_prefer_or_require():
    with pytest.raises(ValueError, match="reliable must be None, 'prefer' or 'require'"):
        GatewayClient("ws://127.0.0.1:1/", reliable="yes")   # type: ignore[arg-type]
    client = GatewayClient("ws://127.0.0.1:1/", reliable="prefer")
    assert client.reliable and client.unacked == 0
