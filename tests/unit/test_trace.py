"""The debug trace's pure core: redaction (gateway/redact.py) with hostile
input, the frame parser and its bounds (gateway/trace.py)."""

from __future__ import annotations

import base64
import json
import os
import secrets

import pytest

from gateway import frames, redact, trace
from gateway.errors import ApiError
from gateway.frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_TEXT
from gateway.redact import MARK, hex_head, text_head

from .test_layers import IO_LIBS, PKG, external_imports, internal_imports, modules

JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSIsImV4cCI6MTg5MzQ1NjAwMH0."
       "kq3hS7c2Wb0yQ9xM1nF8pZ4tR6uV5eL3jH2gD1sA0oI")


def r(text: str, **kw) -> str:
    return redact.redact(text, **kw)


# ------------------------------------------------------------------ redaction
def test_pure_modules_import_no_io():
    mods = modules()
    for name in ("redact", "trace"):
        assert not external_imports(PKG / f"{name}.py") & IO_LIBS, name
        assert internal_imports(name, mods[name], set(mods)) <= {"frames", "errors", "redact"}, name


@pytest.mark.parametrize("text", [
    JWT,
    "token " + JWT,
    f'{{"msg":"{JWT}"}}',
    JWT.replace(".", ""),                         # no dots
    JWT[:20],                                     # a part of one, cut by the head limit
    JWT.split(".")[0] + ".",
    "x" + JWT,                                    # glued to a word
])
def test_a_jwt_never_shows(text):
    out = r(text, cut_end=True)
    assert "eyJ" not in out and MARK in out
    for part in JWT.split("."):
        assert part[3:15] not in out


@pytest.mark.parametrize("text,secret", [
    ('{"user":"bob","password":"hunter2","n":1}', "hunter2"),
    ('{"Password" : "hun\\"ter2", "n": 1}', "ter2"),          # an escaped quote inside
    ('{"access_token": "abc', "abc"),                         # cut by the head limit
    ('{"refresh_token":12345}', "12345"),
    ('{"client_secret":"s"}', '"s"'),
    ('{"Authorization":"Basic dXNlcjpwYXNz"}', "dXNlcjpwYXNz"),
    ('{"X-Api-Key": "k-1"}', "k-1"),
    ('{"apiKey":"k1", "api_key":"k2"}', "k2"),
    ('"{\\"api_key\\":\\"s3cr\\"}"', "s3cr"),                 # JSON inside a JSON string
    ("{'secret': 'x\\'y', 'a': 1}", "y'"),
    ("GET /v1?access_token=abc123&x=1", "abc123"),
    ("password=pa55;next", "pa55"),
    ("Authorization: Bearer abc.def", "abc.def"),
    ("authorization: basic Zm9vOmJhcg==", "Zm9vOmJhcg"),
    ("Bearer x", " x"),
    ('{"session_key":"sk"}', "sk"),
    ("cookie: sid=abc", "sid=abc"),
    ('{"auth": "a1", "pin": 1234, "otp":"987"}', "a1"),
    ('{"pin": 1234}', "1234"),
    ('{"jwt":"x.y"}', "x.y"),
    ('{"passphrase":"correct horse"}', "horse"),
    ("key=abc", "abc"),
])
def test_secret_fields_and_schemes(text, secret):
    out = r(text)
    assert secret not in out, out
    assert MARK in out


def test_what_is_kept_visible():
    for text in ("hello world, this is fine", '{"user":"bob","n":1,"room":"lobby"}', '{"author":"ann","keys":3}',
                 "ping: 1, opinion=yes, keyboard: us",
                 "id 123e4567-e89b-12d3-a456-426614174000", "/usr/local/lib/python3.11/site-packages",
                 "conn r_o1_57pptFrZKs8", "sha 0123456789abcdef0123", "the word token alone", ""):
        assert r(text) == text
    # the field's name and the scheme stay: what was hidden is still readable as such
    assert r('{"password":"x","n":1}') == '{"password":[redacted],"n":1}'
    assert r("Authorization: Bearer abc") == "Authorization: Bearer [redacted]"


def test_random_keys_and_tokens():
    for _ in range(50):
        for key in (secrets.token_urlsafe(24), base64.b64encode(os.urandom(24)).decode(), secrets.token_hex(16)):
            if not redact._mixed(key) and not all(c in "0123456789abcdef" for c in key):
                continue   # a run without upper, lower and digits is not judged a key (rare for 32 chars)
            out = r(f"key {key} end")
            assert key not in out and out.startswith("key ") and out.endswith(" end")
    # shorter where the head was cut: the start of a continuation, the end of the head
    piece = "Xy12Zz98Qq77"
    assert r("abc " + piece) == "abc " + piece
    assert r("abc " + piece, cut_end=True) == "abc " + MARK
    assert r(piece + " rest", cut_start=True) == MARK + " rest"
    assert r("ab " + "0123456789abcdef", cut_end=True) == "ab " + MARK


@pytest.mark.parametrize("text", [
    '"' * 500, "\\" * 500, '{"token":' * 100, '{"token":"' + "\\" * 301, "eyJ" * 200, "a=" * 300,
    "Bearer " * 100, "\x00\xff" * 100, "token=" + "x" * 5000, '{"password":"' + "é" * 100,
    "".join(chr(c) for c in range(0, 0x3000, 7)),
])
def test_hostile_input_is_handled(text):
    out = r(text, cut_start=True, cut_end=True)
    assert isinstance(out, str)
    spans = redact.secret_spans(text, True, True)
    assert spans == sorted(spans)
    assert all(a < b <= c for (_, a), (b, c) in zip(spans, spans[1:])) or len(spans) < 2


def test_heads_of_text_and_binary():
    assert text_head(b"caf\xc3\xa9 \xff ok") == "café \ufffd ok"
    assert text_head("é".encode()[:1], cut_end=True) == "\ufffd"      # a sequence broken by the cut
    assert hex_head(b"\x00\x01\xfe") == "0001fe"
    h = hex_head(b"\x00\x01Bearer abcdef\xff")
    assert h == "0001" + b"Bearer ".hex() + MARK + "ff"
    h = hex_head(b"\x08\x01" + JWT.encode()[:40], cut_end=True)
    assert h == "0801" + MARK


# ------------------------------------------------------------------ limits
def test_limits_defaults_caps_and_bad_values():
    assert trace.limits({}) == (200, 60.0)
    assert trace.limits({"max_frames": 10_000, "max_s": 600}) == (10_000, 600.0)
    assert trace.limits({"max_frames": 1, "max_s": 0.5}) == (1, 0.5)
    for body, needle in (({"max_frames": 0}, "max_frames"), ({"max_frames": 10_001}, "10000"),
                         ({"max_frames": 2.5}, "whole number"), ({"max_frames": True}, "max_frames"),
                         ({"max_frames": "9"}, "max_frames"), ({"max_s": 0}, "max_s"), ({"max_s": 601}, "600"),
                         ({"max_s": float("nan")}, "max_s"), ({"max_s": float("inf")}, "max_s"),
                         ({"max_s": None}, "max_s"), ({"frames": 3}, "unknown field")):
        with pytest.raises(ApiError) as e:
            trace.limits(body)
        assert e.value.status == 400 and needle in e.value.message, body


# ------------------------------------------------------------------ the frame parser
def client_frame(opcode: int, payload: bytes, fin: bool = True) -> bytes:
    return frames.frame(opcode, payload, fin=fin, mask=True)


def records(t: trace.Trace) -> list[tuple]:
    return [(f["dir"], f["opcode"], f["fin"], f["size"], f["head"]) for f in t.as_json()["frames"]]


def test_frames_in_any_pieces_masked_and_not():
    t = trace.Trace("c", "s", 100, 60)
    stream = (client_frame(OP_TEXT, b"hello") + client_frame(OP_BINARY, b"\x00\x01\x02" * 30)
              + client_frame(OP_TEXT, b"x" * 70000, fin=False) + client_frame(OP_CONT, b"tail")
              + client_frame(OP_PING, b"p") + client_frame(OP_CLOSE, frames.close_payload(1000, "bye")))
    for i in range(len(stream)):       # one byte at a time: every split of every header
        t.up.feed(stream[i:i + 1])
    t.down.feed(frames.frame(OP_TEXT, b"world") + frames.frame(OP_TEXT, b""))
    t.end("stopped")
    t.flush()
    assert records(t) == [
        ("up", "text", True, 5, "hello"),
        ("up", "binary", True, 90, (b"\x00\x01\x02" * 16).hex()),
        ("up", "text", False, 70000, "x" * 48),
        ("up", "continuation", True, 4, "tail"),
        ("up", "ping", True, 1, "70"),
        ("up", "close", True, 5, "1000 bye"),
        ("down", "text", True, 5, "world"),
        ("down", "text", True, 0, ""),
    ]
    times = [f["t_ms"] for f in t.as_json()["frames"]]
    assert times == sorted(times) and times[0] >= 0


def test_a_jwt_in_a_message_is_redacted_in_its_head():
    t = trace.Trace("c", "s", 10, 60)
    t.up.feed(client_frame(OP_TEXT, json.dumps({"type": "auth", "token": JWT}).encode()))
    t.down.feed(frames.frame(OP_TEXT, f"welcome {JWT}".encode()))
    t.flush()
    (_, up), (_, down) = [(f["dir"], f["head"]) for f in t.as_json()["frames"]]
    assert up == '{"type": "auth", "token": ' + MARK
    assert down == "welcome " + MARK
    assert "eyJ" not in json.dumps(t.as_json())


def test_max_frames_ends_it_and_nothing_more_is_recorded():
    t = trace.Trace("c", "s", 3, 60)
    t.up.feed(b"".join(client_frame(OP_TEXT, b"m%d" % i) for i in range(10)))
    assert t.ended == "max_frames"
    t.down.feed(frames.frame(OP_TEXT, b"late"))
    t.end("closed")                       # the first reason stays
    assert t.ended == "max_frames"
    assert [f["head"] for f in t.as_json()["frames"]] == ["m0", "m1", "m2"]
    assert t.as_json()["active"] is False


def test_a_switched_stream_starts_over():
    t = trace.Trace("c", "s", 10, 60)
    t.down.feed(frames.frame(OP_TEXT, b"x" * 300)[:20])     # an upstream let go mid-frame
    t.down.reset()
    t.down.feed(frames.frame(OP_TEXT, b"next"))
    t.flush()
    assert [(f["size"], f["head"]) for f in t.as_json()["frames"]] == [(300, "x" * 16), (4, "next")]


def test_garbage_is_parsed_without_failing_and_memory_is_bounded():
    t = trace.Trace("c", "s", 10_000, 60)
    junk = os.urandom(1 << 16)
    for i in range(0, len(junk), 1000):
        t.up.feed(junk[i:i + 1000])
    t.flush()
    assert len(t.up.partial) < 14
    assert all(len(f["head"]) <= 2 * redact.HEAD_BYTES + 40 for f in t.as_json()["frames"])


def test_compressed_frames_show_in_hex():
    t = trace.Trace("c", "s", 10, 60)
    data = bytearray(client_frame(OP_TEXT, b"\x4a\x4c\x4e"))
    data[0] |= 0x40
    t.up.feed(bytes(data))
    t.flush()
    assert t.as_json()["frames"][0]["head"] == "4a4c4e"


# ------------------------------------------------------------------ the node's traces
def test_one_trace_per_session_and_a_bounded_number():
    ts = trace.Traces(max_active=2, max_kept=2, keep_s=100)
    a = ts.begin("c1", "s1", 5, 60)
    assert ts.find("c1") is a and ts.find("s1") is a
    with pytest.raises(ApiError) as e:
        ts.begin("c1", "s1", 5, 60)
    assert e.value.status == 409
    ts.begin("c2", "s2", 5, 60)
    with pytest.raises(ApiError) as e:
        ts.begin("c3", "s3", 5, 60)
    assert e.value.status == 429 and "max 2" in e.value.message
    a.end("stopped")
    again = ts.begin("c1", "s1", 7, 60)          # a finished one is replaced
    assert ts.find("s1") is again and again.max_frames == 7
    again.end("closed")
    ts.begin("c3", "s3", 5, 60)
    assert ts.active() == 2


def test_finished_traces_are_kept_for_a_while_and_a_few():
    ts = trace.Traces(max_active=10, max_kept=2, keep_s=100)
    done = [ts.begin(f"c{i}", f"s{i}", 5, 60) for i in range(4)]
    for i, t in enumerate(done):
        t.end("closed")
        t.ended_at = 1000.0 + i
    ts.prune(now=1004.0)
    assert [ts.by_id.get(f"c{i}") for i in range(4)] == [None, None, done[2], done[3]]
    ts.prune(now=1102.5)
    assert ts.by_id.get("c2") is None and ts.by_id.get("c3") is done[3]
    ts.prune(now=1200.0)
    assert ts.by_id == {}
