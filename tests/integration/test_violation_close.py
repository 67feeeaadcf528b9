"""A client that breaks the protocol and at once half-closes still gets the close frame.

RFC 6455 7.1.7: having failed the connection, the endpoint SHOULD send a close
frame with the status code before it closes the TCP connection. A client that
sends a malformed frame and then `shutdown(SHUT_WR)` (EOF on the gateway's side
of the socket) can still read: the 1002 must reach it before the gateway's own
EOF, on the raw relay (a websocket backend, relay.from_client_relay) and on a
builtin backend (relay.from_client_messages). Each case has a healthy session
beside it that must echo whole and in order before and after.

Two ways the EOF arrives: in a TCP segment of its own after the bad frame, and
in the same segment as the bad frame (TCP_CORK holds the frame until the
shutdown, whose FIN the kernel then puts on it; the client's tcp_info segment
count shows it went as one).
"""

from __future__ import annotations

import asyncio
import os
import socket
import struct

import pytest

from gateway import frames
from gateway.frames import OP_CLOSE, OP_TEXT

from ..conftest import proxy_config
from ..helpers import RawClient

FIN = 0x80


def _frame(b0: int, payload: bytes, *, mask: bool = True) -> bytes:
    head = struct.pack("!BB", b0, (0x80 if mask else 0) | len(payload))
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + frames.unmask(payload, key)


BAD = {
    "reserved bit RSV1": _frame(FIN | 0x40 | OP_TEXT, b"hi"),
    "unmasked frame": _frame(FIN | OP_TEXT, b"hi", mask=False),
}
KINDS = ["websocket", "builtin"]
HALF = 10
TCPI_SEGS_OUT = 136   # offset of tcpi_segs_out in Linux's struct tcp_info (since 4.2)


async def start(gateway, backend, kind: str):
    b = await backend()
    cfg = proxy_config(b.url)
    if kind == "builtin":
        cfg["backends"]["b"] = {"type": "builtin", "handler": "echo"}
    return await gateway(cfg)


async def open_session(gw) -> RawClient:
    c = await RawClient.connect(gw.url + "/ws")
    assert c.status == 101, c.status
    return c


async def echo(c: RawClient, tag: str, count: int) -> None:
    for i in range(count):
        c.send_frame(OP_TEXT, f"{tag}{i}".encode())
    await c.writer.drain()
    got = [await c.recv_frame() for _ in range(count)]
    assert got == [(OP_TEXT, True, f"{tag}{i}".encode()) for i in range(count)]


def segs_out(sock) -> int:
    info = sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 256)
    return struct.unpack_from("I", info, TCPI_SEGS_OUT)[0]


async def read_to_eof(c: RawClient) -> list[tuple[int, bool, bytes]]:
    """Every frame the gateway sends until its EOF (a reset or a timeout fails the test)."""
    got = []
    for _ in range(100):
        try:
            got.append(await c.recv_frame(timeout=5))
        except asyncio.IncompleteReadError as e:
            assert e.partial == b"", ("EOF inside a frame", got, e.partial)
            return got
    raise AssertionError(f"no EOF after {len(got)} frames")


def close_code(got) -> list:
    return [frames.parse_close(p) for op, _, p in got if op == OP_CLOSE]


async def violate_and_half_close(gw, data: bytes, one_segment: bool) -> list:
    """A warmed-up session sends `data`, then shuts its write side; returns what it then reads."""
    c = await open_session(gw)
    try:
        await echo(c, "w", 1)
        sock = c.writer.get_extra_info("socket")
        if one_segment:
            # Straight to the socket (the transport would queue the write to the end of the
            # loop's iteration), through a duplicate of its fd: the same connection.
            with socket.socket(fileno=os.dup(sock.fileno())) as raw:
                raw.setsockopt(socket.IPPROTO_TCP, socket.TCP_CORK, 1)
                before = segs_out(raw)
                assert raw.send(data) == len(data)   # held by the cork
                raw.shutdown(socket.SHUT_WR)         # the FIN joins the held frame
                sent = segs_out(raw) - before
            if sent != 1:
                return [("segments", sent)]
        else:
            c.writer.write(data)
            await c.writer.drain()
            c.writer.write_eof()
        return await read_to_eof(c)
    finally:
        c.close()


@pytest.mark.parametrize("one_segment", [False, True], ids=["fin-apart", "fin-in-segment"])
@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("name", list(BAD))
async def test_bad_frame_then_half_close_gets_1002_before_eof(name, kind, one_segment, gateway, backend):
    gw = await start(gateway, backend, kind)
    healthy = await open_session(gw)
    try:
        await echo(healthy, "h", HALF)
        for _ in range(5):   # the one-segment case: again if an ACK went out between the two readings
            got = await violate_and_half_close(gw, BAD[name], one_segment)
            if not (got and got[0][0] == "segments"):
                break
        else:
            pytest.fail(f"could not get the frame and the FIN into one segment: {got}")
        codes = close_code(got)
        assert codes and codes[0][0] == 1002, (name, kind, got)
        assert got[-1][0] == OP_CLOSE, ("frames after the close frame", got)
        await echo(healthy, "h", HALF)
    finally:
        healthy.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_bad_frame_without_half_close_still_gets_1002(kind, gateway, backend):
    """The case that always worked: no half-close, the close frame, then EOF."""
    gw = await start(gateway, backend, kind)
    c = await open_session(gw)
    try:
        await echo(c, "w", 1)
        c.writer.write(BAD["reserved bit RSV1"])
        await c.writer.drain()
        got = await read_to_eof(c)
        assert close_code(got)[:1] == [(1002, "reserved bits set")], got
    finally:
        c.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_half_close_inside_a_frame_still_gets_no_close_frame(kind, gateway, backend):
    """Not a violation: EOF in the middle of a frame. The gateway ends its side without a close
    frame, as before (tests/fuzz/test_raw_socket.py's "partial" outcome)."""
    gw = await start(gateway, backend, kind)
    c = await open_session(gw)
    try:
        await echo(c, "w", 1)
        c.writer.write(_frame(FIN | OP_TEXT, b"abcdef")[:5])
        await c.writer.drain()
        c.writer.write_eof()
        got = await read_to_eof(c)
        assert close_code(got) == [], got
    finally:
        c.close()


@pytest.mark.parametrize("kind", KINDS)
async def test_close_frame_then_half_close_gets_the_answer_before_eof(kind, gateway, backend):
    """The same rule for a client's own close: the answer (the backend's, forwarded, or the
    builtin's echo) still reaches a client that shut its write side after its close frame."""
    gw = await start(gateway, backend, kind)
    c = await open_session(gw)
    try:
        await echo(c, "w", 1)
        c.writer.write(_frame(FIN | OP_CLOSE, struct.pack("!H", 4001) + b"bye"))
        await c.writer.drain()
        c.writer.write_eof()
        got = await read_to_eof(c)
        # aiohttp's backend answers a close with 1000; the builtin echoes the code.
        assert close_code(got)[:1] == [(1000 if kind == "websocket" else 4001, "")], got
    finally:
        c.close()
