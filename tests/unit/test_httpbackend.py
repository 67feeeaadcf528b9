"""HTTP backend helpers: reply kinds, headers built per session."""

from __future__ import annotations

import pytest

from gateway import frames
from gateway.httpbackend import SessionLink, base_headers, reply_opcode


class Route:
    name = "api"


class FakeSession:
    def __init__(self, claims=None):
        self.id = "c1"
        self.session_id = "s1"
        self.ip = "10.0.0.9"
        self.route = Route()
        self.claims = claims
        self.sink_state = None


@pytest.mark.parametrize("ctype,body,op", [
    (None, b"hi", frames.OP_TEXT),
    ("text/plain; charset=utf-8", "ü".encode(), frames.OP_TEXT),
    ("application/json", b'{"a":1}', frames.OP_TEXT),
    ("application/problem+json", b"{}", frames.OP_TEXT),
    ("text/plain", b"\xff\xfe", frames.OP_BINARY),       # not UTF-8: binary
    (None, b"\xff", frames.OP_BINARY),
    ("application/octet-stream", b"hi", frames.OP_BINARY),
    ("image/png", b"hi", frames.OP_BINARY),
])
def test_reply_opcode(ctype, body, op):
    assert reply_opcode(ctype, body) == op


def test_base_headers_without_claims():
    h = base_headers(FakeSession(None))
    assert h == {"Gateway-Connection-Id": "c1", "Gateway-Session-Id": "s1", "Gateway-Route": "api",
                 "Gateway-Client-IP": "10.0.0.9"}


def test_base_headers_forward_only_configured_claims():
    h = base_headers(FakeSession({"sub": "alice", "tenant": "acme", "secret": "no"}), ("sub", "tenant"))
    assert h["Gateway-Claim-sub"] == "alice" and h["Gateway-Claim-tenant"] == "acme"
    assert "Gateway-Claim-secret" not in h


def test_claims_that_could_inject_headers_are_dropped():
    h = base_headers(FakeSession({"sub": "evil\r\nX-Injected: 1", "n": 42}), ("sub", "n"))
    assert "Gateway-Claim-sub" not in h and h["Gateway-Claim-n"] == "42"


def test_message_headers_are_built_once_per_session_and_kind():
    link = SessionLink(FakeSession())
    t1, t2 = link.message_headers(frames.OP_TEXT), link.message_headers(frames.OP_TEXT)
    b = link.message_headers(frames.OP_BINARY)
    assert t1 is t2
    assert t1["Content-Type"] == "text/plain; charset=utf-8" and t1["Gateway-Event"] == "message"
    assert b["Content-Type"] == "application/octet-stream"
