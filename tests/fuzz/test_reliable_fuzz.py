"""Reliable mode's acks and resumes under fuzzing (docs/reliable.md), against a real
gateway with a reliable route in front of real aiohttp backends.

- Acks on a live session: random `a` payloads (digits around what was sent, huge
  counts, signs, spaces, unicode digits, other kind bytes), replayed and older acks,
  an `a` in a binary frame. The reference below says, per docs/reliable.md "Frames",
  which are harmless (a count up to what the gateway sent; acks are cumulative) and
  which close 1002 (anything else); the gateway must agree exactly, trim its window to
  the highest ack, and keep echoing in order after a harmless one.
- Malformed frames on a reliable route (the reliable relay checks them itself): the same
  exact close codes as the raw relay (1002, 1007, 1009), a healthy reliable session alongside.
- Resumes of a dropped session: forged tokens (random, bit flips of the right one, the
  right secret under another session's id, another subject), `last=` values out of range,
  not counts, absent; each gets its documented status (401 / 400 / 410) and none takes
  the session: the right resume afterwards gets every message it missed, in order; that
  token replayed is 410, and an expired session's token is 410.
"""

from __future__ import annotations

import asyncio
import os
import struct
from urllib.parse import quote

import pytest

from hypothesis import HealthCheck, assume, given, settings, strategies as st

from gateway import reliable
from gateway.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT

from ..helpers import until
from ..integration import test_drain_resume, test_reliable
from ..integration.test_reliable import Peer, gone_from, jwt_for, node_cfg, refused, reliable_cfg
from .test_raw_socket import FIN, MAX, masked

numbered = test_drain_resume.numbered   # fixtures: a backend numbering what it sends; the JWT secret
jwt_env = test_reliable.jwt_env

SCALE = max(1, int(os.environ.get("FUZZ_SCALE", "1")))
FUZZ = dict(deadline=None, derandomize=True, database=None, suppress_health_check=list(HealthCheck))


def on_loop(loop, coro, timeout: float = 30):
    return asyncio.run_coroutine_threadsafe(coro, loop).result(timeout)


# ------------------------------------------------------------------ acks on a live session

def ack_verdict(frames_: list[tuple[int, bytes]], sent: int) -> tuple[bool, int]:
    """docs/reliable.md "Frames": (still open, highest count acked). A text `a` whose
    payload is 1-19 ASCII digits naming at most `sent` messages is harmless, however
    often and in whatever order; anything else closes 1002."""
    best = 0
    for opcode, payload in frames_:
        kind, rest = payload[:1], payload[1:]
        if opcode != OP_TEXT or kind != b"a" or not (1 <= len(rest) <= 19) \
                or not all(0x30 <= c <= 0x39 for c in rest) or int(rest) > sent:
            return False, best
        best = max(best, int(rest))
    return True, best


def ack_frames(sent: int):
    count = st.integers(0, sent + 2).map(lambda n: b"a%d" % n)
    odd = st.sampled_from([b"a", b"a-1", b"a+1", b"a 1", b"a1 ", b"a01", b"a0x1", b"a1e3", b"a9" * 10,
                           b"a" + b"9" * 19, b"a" + b"0" * 19, b"a" + b"0" * 20, "a١".encode(), "a¹".encode(),
                           b"", b"x1", b"h{}", b"A1"])
    text = st.text(max_size=6).map(lambda t: b"a" + t.encode())
    one = st.tuples(st.sampled_from([OP_TEXT] * 5 + [OP_BINARY]), st.one_of(count, count, odd, text))
    return st.lists(one, min_size=1, max_size=4)


async def ack_round(url: str, gw, sent: int, acks: list[tuple[int, bytes]]) -> bool:
    """A fresh reliable session: `sent` messages echoed (so the gateway sent that many),
    then the acks. Returns whether it stayed open; checks the gateway did what
    ack_verdict says."""
    open_, best = ack_verdict(acks, sent)
    peer = await Peer.connect(url)
    try:
        for i in range(sent):
            peer.send(f"m{i}")
        await peer.read_until(lambda: len(peer.got) >= sent, f"{sent} echoes")
        for opcode, payload in acks:
            peer.raw.send_frame(opcode, payload)
        peer.send("after")
        await peer.read_until(lambda: peer.close is not None or b"after" in peer.got, "the echo or a close")
        if not open_:
            if peer.close is None:   # the echo came first: the close must follow
                await peer.read_until(lambda: peer.close is not None, "the close")
            assert peer.close[0] == 1002, (acks, sent, peer.close)
            return False
        assert peer.close is None, (acks, sent, peer.close)
        assert peer.got == [f"m{i}".encode() for i in range(sent)] + [b"after"]
        s = next(s for s in gw.node.sessions.values() if s.session_id == peer.hello["session"])
        assert s.rel.window.first == best + 1, (acks, best, s.rel.window.first)   # trimmed to the highest ack
        return True
    finally:
        peer.raw.close()


async def test_random_acks_close_1002_or_trim_the_window(gateway, backend, record_property):
    b = await backend()
    gw = await gateway(reliable_cfg(b.url))
    loop = asyncio.get_running_loop()
    seen = {"cases": 0, "failures": 0, "open": 0, "closed": 0}

    @settings(max_examples=60 * SCALE, **FUZZ)
    @given(st.integers(0, 4).flatmap(lambda n: st.tuples(st.just(n), ack_frames(n))))
    def run(case):
        sent, acks = case
        seen["cases"] += 1
        try:
            seen["open" if on_loop(loop, ack_round(gw.url, gw, sent, acks)) else "closed"] += 1
        except BaseException:
            seen["failures"] += 1
            raise

    record_property("input", "1-4 ack frames after 0-4 echoed messages: counts around what was sent, "
                             "replayed/older acks, huge/signed/spaced/unicode counts, binary acks, other kinds")
    record_property("expected", "close 1002 unless each is a text ack of 1-19 ASCII digits <= sent; else window trimmed")
    try:
        await asyncio.to_thread(run)
    finally:
        record_property("cases", seen["cases"])
        record_property("failures", seen["failures"])
    assert seen["open"] and seen["closed"], seen
    assert b.received and all(d == "after" or d[:1] == "m" for _t, d in b.received), "an ack reached the backend"


# ------------------------------------------------------------------ malformed frames on a reliable route

RELIABLE_CASES = {   # the reliable relay (reliable_session.py) checks frames as the raw relay does
    "RSV1 on a d text (no deflate on reliable routes)": (masked(FIN | 0x40 | OP_TEXT, b"dhi"), 1002),
    "unmasked d frame": (masked(FIN | OP_TEXT, b"dhi", mask=False), 1002),
    "ping of 126 bytes": (masked(FIN | OP_PING, b"p" * 126), 1002),
    "a new d message inside a fragmented one": (masked(OP_TEXT, b"da") + masked(FIN | OP_TEXT, b"db"), 1002),
    "continuation without a start": (masked(FIN | OP_CONT, b"x"), 1002),
    "64-bit length with the top bit set": (struct.pack("!BBQ", FIN | OP_BINARY, 0xFF, (1 << 63) | 5) + b"abcd", 1002),
    "close code 1005": (masked(FIN | OP_CLOSE, struct.pack("!H", 1005)), 1002),
    "close reason invalid UTF-8": (masked(FIN | OP_CLOSE, struct.pack("!H", 1000) + b"\xff"), 1002),
    "d text invalid UTF-8": (masked(FIN | OP_TEXT, b"dok \xc3\x28"), 1007),
    "d text invalid UTF-8 split over fragments": (masked(OP_TEXT, b"d\xe2\x82") + masked(FIN | OP_CONT, b"\x28"), 1007),
    "d binary over max_message_bytes": (masked(FIN | OP_BINARY, b"d" + b"x" * MAX), 1009),
    "d fragments summing over max_message_bytes": (masked(OP_BINARY, b"d" + b"x" * (MAX - 1)) + masked(FIN | OP_CONT, b"yy"), 1009),
    "length header over max_message_bytes": (struct.pack("!BBQ", FIN | OP_BINARY, 0xFF, 1 << 40) + b"abcd", 1009),
    "an ack split over fragments of a text message": (masked(OP_TEXT, b"a") + masked(FIN | OP_CONT, b"9"), 1002),
}


@pytest.mark.parametrize("name", list(RELIABLE_CASES))
async def test_malformed_frames_on_a_reliable_route_get_exact_close_code(name, gateway, backend, record_property):
    data, code = RELIABLE_CASES[name]
    record_property("input", f"reliable route, after the hello and one d echo: {name}")
    record_property("cases", 1)
    record_property("expected", f"close {code}")
    failures = 1
    b = await backend()
    cfg = reliable_cfg(b.url)
    cfg["limits"] = {"max_message_bytes": MAX}
    gw = await gateway(cfg)
    healthy = await Peer.connect(gw.url)
    try:
        for i in range(5):
            healthy.send(f"h{i}")
        await healthy.read_until(lambda: len(healthy.got) >= 5, "5 healthy echoes")
        peer = await Peer.connect(gw.url)
        peer.send("warm")
        await peer.read_until(lambda: peer.got, "the warm-up echo")
        peer.raw.writer.write(data)
        await peer.read_until(lambda: peer.close is not None, "the close")
        assert peer.close[0] == code, (name, peer.close)
        assert await peer.raw.eof()
        peer.raw.close()
        for i in range(5, 10):
            healthy.send(f"h{i}")
        await healthy.read_until(lambda: len(healthy.got) >= 10, "5 more healthy echoes")
        assert healthy.got == [f"h{i}".encode() for i in range(10)] and healthy.close is None
        record_property("other_sessions", "unaffected")
        failures = 0
    finally:
        record_property("failures", failures)
        healthy.raw.close()


# ------------------------------------------------------------------ resumes

async def dropped(gw, sub: str) -> tuple[Peer, str]:
    """A reliable session of `sub` that read 20, acked 10 and lost its connection."""
    peer = await Peer.connect(gw.url, query=f"?access_token={jwt_for(sub)}")
    await peer.read_until(lambda: len(peer.got) >= 20, "20 read")
    peer.ack(10)
    sid = peer.hello["session"]
    await until(lambda: _window_first(gw, sid, 11), what="ack taken")
    peer.raw.writer.transport.abort()
    await until(lambda: gone_from(gw, sid), what="parked")
    return peer, sid


async def _window_first(gw, sid: str, first: int) -> bool:
    return any(s.session_id == sid and s.rel.window.first == first for s in gw.node.sessions.values())


async def kept(gw, sid: str) -> tuple[int, int]:
    """(first, sent): the numbers the parked session's replay buffer holds."""
    async def sealed():
        return reliable.split_replay(await gw.node.cluster.store.detached.read(sid)) is not None
    await until(sealed, what="the buffer sealed")
    first, _up, data = reliable.split_replay(await gw.node.cluster.store.detached.read(sid))
    return first, first + len(data) - 1


def flip(token: str, at: int, to: str) -> str:
    """The token with one character of its secret replaced (never by the same one)."""
    sid, _, secret = token.partition(".")
    i = at % len(secret)
    if secret[i] == to:
        to = "A" if to != "A" else "B"
    return f"{sid}.{secret[:i]}{to}{secret[i + 1:]}"


def resume_verdict(kind: str, last: str | None, first: int, sent: int) -> tuple[int, str]:
    """The documented answer (docs/reliable.md step 3, gateway/resume.py's table): the token
    and subject first (401), then last= (400 absent or not a count, 400 above what was sent,
    410 below what was kept)."""
    if kind != "right":
        return 401, "resume refused:"
    if last is None:
        return 400, "last=<count>"
    raw = last.encode("ascii", "replace")
    if not (1 <= len(raw) <= 19 and raw.isdigit()):
        return 400, "last must be a count"
    if int(last) > sent:
        return 400, "last out of range"
    if int(last) < first - 1:
        return 410, "window"
    return 101, ""


async def test_forged_out_of_range_and_replayed_resumes_get_their_refusal(gateway, numbered, jwt_env,
                                                                          record_property):
    cfg = node_cfg("node-a", None, numbered.url)
    gw = await gateway(cfg)
    peer, sid = await dropped(gw, "frank")
    other, other_sid = await dropped(gw, "grace")
    first, sent = await kept(gw, sid)
    assert first == 11 and sent >= 20
    token = peer.hello["token"]
    base = f"{gw.url}/ws?access_token={jwt_for('frank')}"
    loop = asyncio.get_running_loop()
    seen = {"cases": 0, "failures": 0}
    statuses: dict = {}

    right = st.just(("right", token))
    tokens_ = st.one_of(
        right, right, right, right, right,
        st.tuples(st.integers(0, 40), st.sampled_from("aZ09_-")).map(lambda t: ("flipped", flip(token, *t))),
        st.just(("other session's id", f"{other_sid}.{token.partition('.')[2]}")),
        st.just(("other subject", token)),
        st.just(("truncated", token[:-1])),
        st.text(alphabet="abcXYZ019_-.", min_size=1, max_size=60).map(lambda t: ("random", t)),
    )
    lasts = st.one_of(
        st.none(), st.sampled_from([first - 2, first - 1, first, sent - 1, sent, sent + 1]).map(str),
        st.integers(0, first - 2).map(str), st.integers(0, sent + 3).map(str), st.integers(sent + 1, 10**19).map(str),
        st.sampled_from(["", "-1", "+12", " 12", "12 ", "1e1", "0x10", "١٢", "12.0", "9" * 20, "0" * 19 + "12"]),
        st.text(max_size=8))

    @settings(max_examples=50 * SCALE, **FUZZ)
    @given(tokens_, lasts)
    def run(kind_tok, last):
        kind, tok = kind_tok
        status, why = resume_verdict(kind, last, first, sent)
        assume(status != 101)   # a right one takes the session: it comes last, once, below
        seen["cases"] += 1
        try:
            sub = "mallory" if kind == "other subject" else "frank"
            url = f"{gw.url}/ws?access_token={jwt_for(sub)}&resume={quote(tok, safe='')}"
            if last is not None:
                url += f"&last={quote(last, safe='')}"
            got, text = on_loop(loop, refused(url))
            assert (got, why in text) == (status, True), (kind, tok, last, got, text)
            statuses[got] = statuses.get(got, 0) + 1
        except BaseException:
            seen["failures"] += 1
            raise

    record_property("input", "resume of a dropped reliable session with forged/flipped/other-id/other-subject/"
                             "truncated tokens and last= absent, non-count, below the window, above what was sent")
    record_property("expected", "401 token, 400 last not a count or out of range, 410 window; session not taken")
    try:
        await asyncio.to_thread(run)
        assert {400, 401, 410} <= set(statuses), statuses
        # The edges: one below what was kept, one above what was sent.
        for last, want in ((first - 2, (410, "window")), (sent + 1, (400, "last out of range"))):
            seen["cases"] += 1
            status, why = await refused(f"{base}&resume={token}&last={last}")
            assert (status, want[1] in why) == (want[0], True), (last, status, why)
        # None took the session: the right resume at the window's edge gets first.. in order,
        # after which the token is spent.
        seen["cases"] += 1
        again = await Peer.connect(gw.url, query=f"?access_token={jwt_for('frank')}&resume={token}&last={first - 1}")
        assert again.hello["session"] == sid and again.hello["down"] == first - 1
        await again.read_until(lambda: len(again.got) >= 30, "the replay from the first kept")
        assert again.got[:30] == [f"s{i}".encode() for i in range(first, first + 30)]
        for last in ("12", "15", "0"):
            seen["cases"] += 1
            status, why = await refused(f"{base}&resume={token}&last={last}")
            assert status == 410 and "resumed already" in why, (last, status, why)
        # The other session was left alone by its id being borrowed: its own token still works.
        o = await Peer.connect(gw.url, query=f"?access_token={jwt_for('grace')}&resume={other.hello['token']}"
                                             f"&last={len(other.got)}")
        assert o.hello["session"] == other_sid
        again.raw.close()
        o.raw.close()
        record_property("other_sessions", "unaffected")
    finally:
        record_property("cases", seen["cases"])
        record_property("failures", seen["failures"])


async def test_an_expired_session_token_is_410(gateway, numbered, jwt_env, record_property):
    cfg = node_cfg("node-a", None, numbered.url)
    cfg["drain"]["resume_window_s"] = 1
    gw = await gateway(cfg)
    peer, sid = await dropped(gw, "frank")
    url = f"{gw.url}/ws?access_token={jwt_for('frank')}&resume={peer.hello['token']}"
    record_property("input", "resume with a right token after drain.resume_window_s (1 s) ended")
    record_property("expected", "410 resume window has ended")
    record_property("cases", 1)
    failures = 1
    try:
        # last=-1 is refused 400 while the session waits (without taking it), 410 once it is gone.
        async def expired():
            return (await refused(f"{url}&last=-1"))[0] == 410
        await until(expired, timeout_s=10, what="the resume window to end")
        status, why = await refused(f"{url}&last=12")
        assert status == 410 and ("window has ended" in why or "unknown" in why), (status, why)
        failures = 0
    finally:
        record_property("failures", failures)
