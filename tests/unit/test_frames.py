"""gateway/frames.py and gateway/http1.py: pure protocol helpers."""

from __future__ import annotations

import os

import pytest

from gateway import frames, http1
from gateway.errors import Refusal


def test_accept_key_matches_rfc_example():
    # RFC 6455 1.3
    assert frames.accept_key("dGhlIHNhbXBsZSBub25jZQ==") == "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="


@pytest.mark.parametrize("n", [0, 1, 125, 126, 65535, 65536, 70000])
def test_frame_roundtrip_through_header_parser(n):
    payload = os.urandom(n)
    for mask in (False, True):
        data = frames.frame(frames.OP_BINARY, payload, mask=mask)
        b0, length, hlen, key = frames.parse_header(data, 0)
        assert (b0 & 0x0F, length) == (frames.OP_BINARY, n)
        body = data[hlen:]
        assert (frames.unmask(body, key) if mask else body) == payload


def test_parse_header_incomplete_returns_none():
    data = frames.frame(frames.OP_TEXT, b"x" * 300, mask=True)
    for cut in range(0, 8):
        assert frames.parse_header(data[:cut], 0) is None
    assert frames.parse_header(data[:8], 0) is not None


def test_unmask_with_offset_continues_the_mask_cycle():
    key = os.urandom(4)
    payload = os.urandom(37)
    masked = frames.unmask(payload, key)
    assert frames.unmask(masked[:5], key) + frames.unmask(masked[5:], key, 5) == payload


@pytest.mark.parametrize("payload,expected", [
    (b"", (1005, "")), (b"\x03\xe8", (1000, "")), (b"\x0f\xa1bye", (4001, "bye")),
    (b"\x03", None), (b"\x03\xed", None), (b"\x03\xee", None), (b"\x00\x00", None), (b"\x13\x88", None),
    (b"\x03\xe8\xff", None),
])
def test_parse_close_validates_code_and_reason(payload, expected):
    assert frames.parse_close(payload) == expected


def test_close_payload_never_exceeds_125_bytes_or_splits_utf8():
    p = frames.close_payload(1001, "é" * 200)
    assert len(p) <= 125
    assert frames.parse_close(p) is not None


def test_utf8_check_across_fragments():
    check = frames.Utf8Check()
    assert check.feed(b"\xe2\x82", False)
    assert check.feed(b"\xac", True)
    assert not frames.Utf8Check().feed(b"\xe2\x82", True)


def test_parse_request_joins_repeated_headers():
    head = http1.parse_request(b"GET /a%20b?x=1&y=2 HTTP/1.1\r\nHost: h\r\nCookie: a=1\r\nCookie: b=2\r\n"
                               b"X-A: 1\r\nx-a: 2")
    assert head.path == "/a b" and head.query == {"x": "1", "y": "2"}
    assert head.headers["cookie"] == "a=1; b=2" and head.headers["x-a"] == "1, 2"


@pytest.mark.parametrize("raw", [b"GET / HTTP/2\r\nHost: h", b"GET nopath HTTP/1.1", b"GET / HTTP/1.1\r\nNoColon",
                                 b"GET / HTTP/1.1\r\nBad Name: x"])
def test_parse_request_refuses_malformed_heads(raw):
    with pytest.raises(Refusal) as exc:
        http1.parse_request(raw)
    assert exc.value.status == 400


def test_refusal_response_is_json_without_internals():
    body = http1.response(401, "token expired")
    assert body.startswith(b"HTTP/1.1 401 Unauthorized\r\n")
    assert body.endswith(b'{"error": "token expired"}')
