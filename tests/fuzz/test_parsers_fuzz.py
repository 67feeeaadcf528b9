"""The pure parsers under fuzzing: route matching, frame headers, close
payloads, UTF-8 checks, the HTTP/1.1 request head, reliable mode's acks and
replay counts, resume tokens.

Each one, fed anything, returns or raises only what it documents; where there
is an encoder, parse(encode(x)) == x; a resume token changed in any way never
verifies against the session it was made for.
"""

from __future__ import annotations

import hmac
import json
import os
from urllib.parse import unquote

import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway import config, frames, http1, reliable, tokens
from gateway.errors import Refusal
from gateway.paths import path_has_prefix
from gateway.routing import Router, encode_path, host_matches, strip_port, strip_query

SCALE = max(1, int(os.environ.get("FUZZ_SCALE", "1")))
N = 150 * SCALE
FUZZ = settings(deadline=None, derandomize=True, database=None, max_examples=N,
                suppress_health_check=[HealthCheck.too_slow])


class Tally:
    """Counts the examples one Hypothesis test ran and the ones that failed, and records them."""

    def __init__(self, record_property, input_: str, expected: str):
        self.cases = self.failures = 0
        self.record = record_property
        record_property("input", input_)
        record_property("expected", expected)

    def __call__(self, check):
        def run(args):
            self.cases += 1
            try:
                check(*args)
            except BaseException:
                self.failures += 1
                raise
        return run

    def done(self):
        self.record("cases", self.cases)
        self.record("failures", self.failures)
        assert self.cases > 0


@pytest.fixture
def tally(record_property):
    made = []

    def make(input_, expected):
        made.append(Tally(record_property, input_, expected))
        return made[-1]
    yield make
    for t in made:
        t.done()


def fuzz(tally, strategy, input_, expected, check):
    t = tally(input_, expected)
    FUZZ(given(st.tuples(*strategy))(t(check)))()


# ------------------------------------------------------------------ routing

segment = st.text(alphabet=st.sampled_from("abc/._-%?~é \x00"), max_size=12)
ROUTES = config.parse("""\
backends: {b: {type: builtin, handler: echo}}
routes:
  - {name: exact, match: {path: /chat, host: chat.example.com, headers: {x-t: a}}, backend: b}
  - {name: prefix, match: {path_prefix: /api/}, backend: b}
  - {name: wild, match: {path_prefix: /w, host: "*.example.com", query: {v: "2"}}, backend: b}
  - {name: all, match: {path_prefix: /}, backend: b}
""").routes


def test_router_matches_anything_without_raising(tally):
    router = Router(ROUTES)

    def check(path, host, headers, query):
        names = [r.name for r in router.candidates(path, host, headers, query)]
        assert names == [r.name for r in router.routes if r.holds(path, strip_port(host), headers, query)]
        if path.startswith("/"):  # parse_request lets no other path through
            assert "all" in names
        for r in router.routes:
            if r.name in names and r.match.path_prefix:
                rest = r.path_remainder(path)
                assert path == r.match.path_prefix.rstrip("/") + rest
    fuzz(tally, (st.just("/") | segment.map(lambda s: "/" + s) | segment, st.text(max_size=20),
                 st.dictionaries(st.sampled_from(["x-t", "host"]), st.text(max_size=3)),
                 st.dictionaries(st.sampled_from(["v", "w"]), st.text(max_size=3))),
         "random path, host, headers, query against 4 routes", "candidates in route order, no exception", check)


def test_path_prefix_and_host_matching_are_segment_and_label_aware(tally):
    def check(path, prefix, host, pattern):
        if path_has_prefix(path, prefix):
            base = prefix.rstrip("/") if prefix.endswith("/") else prefix
            assert path == base or path.startswith(base + "/") or path.startswith(prefix)
        if host_matches("*." + pattern, host):
            assert host.endswith("." + pattern) and len(host) > len(pattern) + 1
        assert isinstance(strip_port(host), str)
    fuzz(tally, (segment, segment, st.text(max_size=15), st.text(max_size=8)),
         "random path/prefix and host/pattern", "prefix only at a segment boundary, wildcard only below", check)


def test_encode_path_round_trips_and_strip_query_never_raises(tally):
    def check(path, query):
        enc = encode_path(path)
        assert unquote(enc, errors="strict") == path
        assert not any(c in enc for c in " ?#\r\n")
        strip_query(query, ("token", "access_token"))
    fuzz(tally, (st.text(max_size=30), st.text(max_size=30)), "random unicode path and query string",
         "unquote(encode_path(p)) == p", check)


# ------------------------------------------------------------------ frames

def test_parse_header_on_random_bytes(tally):
    def check(buf, pos):
        pos = min(pos, len(buf))
        h = frames.parse_header(buf, pos)
        if h is not None:
            b0, length, hlen, mask = h
            assert b0 == buf[pos] and hlen in (2, 4, 6, 8, 10, 14) and pos + hlen <= len(buf)
            assert (mask is None) == (not buf[pos + 1] & 0x80) and length >= 0
    fuzz(tally, (st.binary(max_size=20), st.integers(0, 20)), "random bytes at a random offset",
         "None (incomplete) or a header inside the buffer", check)


def test_frame_round_trips_through_parse_header(tally):
    def check(opcode, payload, fin, mask, rsv1, lead):
        wire = lead + frames.frame(opcode, payload, fin=fin, mask=mask, rsv1=rsv1)
        b0, length, hlen, key = frames.parse_header(wire, len(lead))
        assert b0 == (0x80 if fin else 0) | (0x40 if rsv1 else 0) | opcode
        assert length == len(payload) and len(lead) + hlen + length == len(wire)
        body = wire[len(lead) + hlen:]
        assert (frames.unmask(body, key) if mask else body) == payload
        assert frames.parse_header(wire[:len(lead) + hlen - 1], len(lead)) is None
    fuzz(tally, (st.sampled_from([0, 1, 2, 8, 9, 10]),
                 st.binary(max_size=300) | st.builds(lambda n: b"x" * n, st.sampled_from([125, 126, 65535, 65536])),
                 st.booleans(), st.booleans(), st.booleans(), st.binary(max_size=3)),
         "frame(opcode, payload, fin, mask, rsv1) incl. 125/126/65535/65536-byte payloads",
         "parse_header + unmask give back the frame", check)


def test_unmask_at_any_offset_inverts(tally):
    def check(payload, key, offset):
        once = frames.unmask(payload, key, offset)
        assert frames.unmask(once, key, offset) == payload
        whole = frames.unmask(b"\0" * offset + payload, key)[offset:]
        assert once == whole
    fuzz(tally, (st.binary(max_size=64), st.binary(min_size=4, max_size=4), st.integers(0, 9)),
         "random payload, mask key, offset", "unmask is its own inverse and offset-consistent", check)


def test_parse_close_on_random_payloads_and_round_trip(tally):
    def check(payload, code, reason):
        got = frames.parse_close(payload)
        if got is not None:
            c, r = got
            assert (c == 1005 and not payload) or frames.valid_close_code(c)
            assert payload[2:].decode("utf-8") == r
        if frames.valid_close_code(code):
            c, r = frames.parse_close(frames.close_payload(code, reason))
            assert c == code and reason.startswith(r) and len(r.encode()) <= 123
        else:
            assert frames.parse_close(frames.close_payload(code, reason)) is None
    fuzz(tally, (st.binary(max_size=30), st.integers(0, 65535), st.text(max_size=80)),
         "random close payloads; close_payload(code, reason) for every 16-bit code",
         "None for bad codes/UTF-8, (code, reason) back otherwise", check)


def test_utf8_check_in_chunks_agrees_with_whole_decode(tally):
    def check(data, cuts):
        whole = frames.text_is_valid(data)
        assert whole == frames.utf8_ok(data)
        u = frames.Utf8Check()
        points = sorted({min(c, len(data)) for c in cuts}) + [len(data)]
        ok, last = True, 0
        for i, p in enumerate(points):
            ok = u.feed(data[last:p], i == len(points) - 1) and ok
            last = p
            if not ok:
                break
        assert ok == whole
    fuzz(tally, (st.binary(max_size=40) | st.text(max_size=20).map(str.encode), st.lists(st.integers(0, 40), max_size=4)),
         "random bytes / UTF-8 text split at random points", "incremental check == whole decode", check)


def test_valid_client_key_never_raises(tally):
    def check(key):
        assert frames.valid_client_key(key) in (True, False)
        assert frames.valid_client_key(frames.new_key())
    fuzz(tally, (st.text(max_size=30),), "random Sec-WebSocket-Key text", "True/False", check)


# ------------------------------------------------------------------ HTTP/1.1 heads

head_chars = st.sampled_from(list("GET /a?b=c%2F%zz HTTP/1.1\r\n:Host: x\t.\x00\x7f#é") + ["\r\n", "/..", "%00", "%2e%2e"])


def test_parse_request_refuses_or_parses(tally):
    def check(head):
        try:
            req = http1.parse_request(head)
        except Refusal as r:
            assert r.status in (400, 431)
            return
        assert req.method and req.target.startswith("/") and req.path.startswith("/")
        assert not any(seg in (".", "..") for seg in req.path.split("/"))
        assert not any(ord(c) < 0x20 or ord(c) == 0x7f for c in req.path)
    fuzz(tally, (st.binary(max_size=120) | st.lists(head_chars, max_size=40).map(lambda x: "".join(x).encode("utf-8")),),
         "random bytes and request-head-like fragments", "RequestHead or Refusal 400/431", check)


def test_upgrade_request_round_trips_through_parse_request(tally):
    name = st.text(alphabet="abcxyz-", min_size=1, max_size=6).map(lambda n: "x-" + n)
    value = st.text(alphabet=st.characters(min_codepoint=0x20, max_codepoint=0x7e), max_size=10).map(str.strip)

    def check(path, headers):
        target = "/" + encode_path(path).lstrip("/")
        key = frames.new_key()
        head = http1.upgrade_request(target, "example.com", key, headers)
        assert head.endswith(b"\r\n\r\n")
        try:
            req = http1.parse_request(head[:-4])
        except Refusal:
            assert "." in path  # dot segments are refused on purpose
            return
        assert req.target == target and req.headers["sec-websocket-key"] == key
        for n, v in headers:
            assert v in req.headers[n]
    fuzz(tally, (st.text(alphabet="ab/é ?%", max_size=10) | st.just("a/./b"), st.lists(st.tuples(name, value), max_size=4)),
         "upgrade_request(target, host, key, headers) with random path and headers",
         "parse_request gives back target, key and headers", check)


def test_parse_response_raises_only_value_error(tally):
    def check(head):
        try:
            resp = http1.parse_response(head)
        except ValueError:
            return
        assert 0 <= resp.status
    fuzz(tally, (st.binary(max_size=80) | st.just(b"HTTP/1.1 101 Switching\r\nUpgrade: websocket"),),
         "random bytes as an upstream response head", "ResponseHead or ValueError", check)


# ------------------------------------------------------------------ reliable mode

def test_parse_ack_and_ack_round_trip(tally):
    def check(payload, n):
        got = reliable.parse_ack(payload)
        assert got is None or (payload.isdigit() and got == int(payload))
        wire = reliable.ack(n)
        assert wire[:1] == bytes((reliable.ACK,)) and reliable.parse_ack(wire[1:]) == n
    fuzz(tally, (st.binary(max_size=25) | st.integers(0, 10**25).map(lambda i: str(i).encode()), st.integers(0, 2**63 - 1)),
         "random ack payloads; ack(n) for n up to 2**63-1", "None or the count; parse_ack(ack(n)[1:]) == n", check)


def test_parse_last_refuses_or_counts(tally):
    def check(value):
        try:
            got = reliable.parse_last(value)
        except Refusal as r:
            assert r.status == 400
            return
        assert got is None and value is None or got == int(value)
    fuzz(tally, (st.none() | st.text(max_size=25),), "random last= query values", "None, a count, or Refusal 400", check)


def test_split_replay_never_raises(tally):
    counts = st.fixed_dictionaries({"first": st.integers() | st.floats() | st.text(max_size=3), "up": st.integers()})
    payload = st.binary(max_size=20) | counts.map(lambda m: json.dumps(m).encode()) | st.just(b'{"first": 1e999, "up": 0}')

    def check(entries):
        got = reliable.split_replay(entries)
        if got is not None:
            first, up, rest = got
            assert len(rest) == len(entries) - 1 and all(isinstance(x, int) for x in (first, up))
            assert not any(opcode & reliable.WINDOWED for _, opcode, _ in rest)   # window marks taken off
    opcodes = st.sampled_from([0, 1, 2, 1 | reliable.WINDOWED, 2 | reliable.WINDOWED])
    fuzz(tally, (st.lists(st.tuples(st.text(max_size=3), opcodes, payload), max_size=5),),
         "random replay buffers with random META payloads (incl. 1e999)", "None or (first, up, messages)", check)


# ------------------------------------------------------------------ resume tokens

SID = st.text(alphabet="abcdefghijklmnopqrstuvwxyzABC0123456789_-", min_size=8, max_size=32)


def _verifies(token: str, sid: str, stored: str) -> bool:
    """What the store checks at a take: the session id, and the secret's hash against the one it kept."""
    parsed = tokens.parse(token)
    return parsed is not None and parsed[0] == sid and hmac.compare_digest(parsed[1], stored)


def test_token_parse_never_raises(tally):
    def check(text):
        got = tokens.parse(text)
        assert got is None or (len(got) == 2 and len(got[1]) == 64)
    fuzz(tally, (st.text(max_size=100) | st.text(alphabet="ab._-9", max_size=90),), "random text as a resume token",
         "None or (session id, sha256 hex)", check)


def test_bit_flipped_or_forged_token_never_verifies(tally):
    def check(sid, at, bit, forged):
        token, stored = tokens.new(sid)
        assert _verifies(token, sid, stored)
        assert tokens.reason(token).startswith(tokens.REASON_PREFIX) and len(tokens.reason(token).encode()) <= 123
        raw = bytearray(token.encode())
        raw[at % len(raw)] ^= 1 << bit
        flipped = raw.decode("latin-1")
        assert not _verifies(flipped, sid, stored), flipped
        assert not _verifies(forged, sid, stored)
        assert not _verifies(f"{sid}.{forged}", sid, stored)
    fuzz(tally, (SID, st.integers(0, 200), st.integers(0, 7), st.text(alphabet="abcAB09_-.", max_size=40)),
         "tokens.new(sid) with one bit flipped anywhere; forged tokens and secrets for the same session",
         "never verifies", check)
