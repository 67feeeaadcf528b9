"""Request smuggling on the upgrade (SECURITY.md, "The upgrade request"): every
ambiguous upgrade gets one status, or one reading, and nothing smuggled reaches a
backend. The bytes after the request head are WebSocket frames, read by the relay's
frame parser and nothing else: a pipelined HTTP request there is a broken frame
(close 1002), never a second request."""

from __future__ import annotations

import pytest

from gateway import frames

from .support import exchange, record, ws_key

SMUGGLED = b"GET /ws/smuggled HTTP/1.1\r\nHost: gw\r\n\r\n"


def head(*extra: str, first: str = "GET /ws HTTP/1.1", host=("Host: gw",), key: str | None = None,
         body: bytes = b"", base=True) -> bytes:
    lines = [first, *host]
    if base:
        lines += ["Upgrade: websocket", "Connection: Upgrade", f"Sec-WebSocket-Key: {key or ws_key()}",
                  "Sec-WebSocket-Version: 13"]
    lines += list(extra)
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


K = ws_key()
FRAME = frames.frame(frames.OP_TEXT, b"smuggled", mask=True)

# (what, request bytes, the status, whether it opens and then closes 1002 for what followed)
CASES = [
    ("two Upgrade: websocket", head("Upgrade: websocket"), 101, False),
    ("Upgrade: websocket and Upgrade: h2c", head("Upgrade: h2c"), 101, False),
    ("two Connection: Upgrade", head("Connection: Upgrade"), 101, False),
    ("two different Sec-WebSocket-Key", head(f"Sec-WebSocket-Key: {ws_key()}"), 400, False),
    ("the same Sec-WebSocket-Key twice", head(f"Sec-WebSocket-Key: {K}", key=K), 400, False),
    ("a second, empty Sec-WebSocket-Key", head("Sec-WebSocket-Key:"), 400, False),
    ("two Sec-WebSocket-Version: 13", head("Sec-WebSocket-Version: 13"), 426, False),
    ("Sec-WebSocket-Version 13 and 8", head("Sec-WebSocket-Version: 8"), 426, False),
    ("two Host", head(host=("Host: gw", "Host: evil")), 400, False),
    ("one Host naming two", head(host=("Host: gw, evil",)), 400, False),
    ("Content-Length with a body", head("Content-Length: 8", body=b"smuggled"), 400, False),
    ("Content-Length framing a masked frame", head(f"Content-Length: {len(FRAME)}", body=FRAME), 400, False),
    ("Transfer-Encoding: chunked with a body", head("Transfer-Encoding: chunked", body=b"8\r\nsmuggled\r\n0\r\n\r\n"),
     400, False),
    ("Content-Length and Transfer-Encoding", head("Content-Length: 3", "Transfer-Encoding: chunked",
                                                  body=b"0\r\n\r\n"), 400, False),
    ("Content-Length 0 and 5", head("Content-Length: 0", "Content-Length: 5", body=b"smugg"), 400, False),
    ("Transfer-Encoding with a space before the colon", head("Transfer-Encoding : chunked", body=b"0\r\n\r\n"),
     400, False),
    ("an obs-fold continuation line", head("X-A: 1", " Transfer-Encoding: chunked"), 400, False),
    ("Content-Length: 0", head("Content-Length: 0"), 101, False),
    ("HTTP/1.0", head(first="GET /ws HTTP/1.0"), 400, False),
    ("HTTP/1.1x", head(first="GET /ws HTTP/1.1x"), 400, False),
    ("HTTP/2.0", head(first="GET /ws HTTP/2.0"), 400, False),
    ("absolute-form target", head(first="GET http://gw/ws HTTP/1.1"), 400, False),
    ("two spaces in the request line", head(first="GET  /ws HTTP/1.1"), 400, False),
    ("POST upgrade", head(first="POST /ws HTTP/1.1"), 405, False),
    ("lowercase method", head(first="get /ws HTTP/1.1"), 405, False),
    ("a request pipelined after the upgrade", head() + SMUGGLED, 101, True),
    ("an upgrade pipelined after the upgrade", head() + head(first="GET /ws/smuggled HTTP/1.1"), 101, True),
]


def config(mode: str, url: str) -> dict:
    if mode == "websocket":
        backend = {"type": "websocket", "endpoints": [url]}
        extra = {"forward_path": True}
    else:
        backend = {"type": "http", "endpoints": [url]}
        extra = {"events": {"connect": "b"}}
    return {"backends": {"b": backend},
            "routes": [{"name": "r", "match": {"path_prefix": "/ws"}, "auth": "none", "backend": "b", **extra}]}


@pytest.mark.parametrize("mode", ["websocket", "http"])
async def test_ambiguous_upgrades_get_one_answer_and_nothing_smuggled_reaches_the_backend(
        gateway, backend, http_peer, mode, record_property):
    if mode == "websocket":
        b = await backend()
        gw = await gateway(config(mode, b.url))

        def seen():
            return [*b.paths, *(repr(d) for _, d in b.received)]
    else:
        p = await http_peer()
        gw = await gateway(config(mode, p.url))

        def seen():
            return [f"{r.event} {r.headers.get('Gateway-Path')} {r.body!r}" for r in p.requests]
    failures = []
    for what, data, status, breaks in CASES:
        before = len(seen())
        a = await exchange(gw.ports[0], data)
        if a.status != status:
            failures.append(f"{what}: {a.status}, wanted {status}")
        if a.status == 101:
            if breaks:
                # Enough bytes to complete the "frame" the smuggled text declares (an HTTP
                # backend's message parser judges a frame's header once the frame is whole).
                a.writer.write(b"\0" * 200)
            else:
                a.writer.write(frames.frame(frames.OP_CLOSE, frames.close_payload(1000, ""), mask=True))
            try:
                closed = await a.closed()
            except TimeoutError:
                closed = "no close within 5 s"
            if breaks and (closed is None or closed[0] != 1002):
                failures.append(f"{what}: closed {closed}, wanted 1002 (the bytes after the head are frames)")
        a.close()
        new = seen()[before:]
        if any("smuggled" in x for x in new):
            failures.append(f"{what}: the backend saw {new!r}")
        if len(new) != (1 if status == 101 else 0):
            failures.append(f"{what}: {len(new)} handshakes/requests at the backend: {new!r}")
    record(record_property, f"{mode} backend: duplicate Upgrade/Connection/Key/Version/Host, CL+TE, body, "
           "HTTP/1.0, pipelining", len(CASES), "one status each (400/405/426, or 101); nothing smuggled",
           failures)
    assert not failures, failures
