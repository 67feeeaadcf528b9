"""The seams resume and reattach build on: a session is not a connection, keeps
the limits it went live with, and can let go of its upstream at a frame
boundary and take another (relay.Session.detach_upstream / attach_upstream,
upstream.BackendPool.dial_any)."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import struct

import pytest
import yaml
from aiohttp import WSMsgType

from gateway import config, frames
from gateway.errors import InvalidTransition
from gateway.session import Link

from ..conftest import proxy_config
from ..helpers import RawClient
from ..httppeer import HttpPeer

BOUND_S = 10.0  # only trips on a hang; nothing here is timed


async def until(cond, what: str = "condition") -> None:
    """Poll `cond()` until it holds (bounded)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + BOUND_S
    while not cond():
        if loop.time() > deadline:
            raise AssertionError(f"not true within {BOUND_S} s: {what}")
        await asyncio.sleep(0.005)


def only_session(gw):
    assert len(gw.node.sessions) == 1
    return next(iter(gw.node.sessions.values()))


def two_backends(a_url: str, b_url: str, **top) -> dict:
    """Route /ws to backend `b` (A); backend `other` (B) is there to be dialled by hand."""
    cfg = proxy_config(a_url, **top)
    cfg["backends"]["other"] = {"type": "websocket", "endpoints": [b_url]}
    return cfg


async def dial_other(gw, s):
    pool = gw.node.routing.pools["other"]
    headers = [("Gateway-Connection-Id", s.id), ("Gateway-Session-Id", s.session_id)]
    return await pool.dial_any(None, lambda ep: ep.path, headers, 5.0)


# ------------------------------------------------------------ session != connection
async def test_session_id_and_connection_id_differ_and_reach_a_websocket_backend(gateway, backend, http):
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    async with http.ws_connect(gw.url + "/ws") as ws:
        await ws.send_str("hi")
        await ws.receive(timeout=5)
        s = only_session(gw)
        h = b.requests[0]
        assert h["Gateway-Connection-Id"] == s.id
        assert h["Gateway-Session-Id"] == s.session_id
        assert s.session_id != s.id


async def test_session_id_and_connection_id_differ_and_reach_an_http_backend(gateway, http):
    peer = HttpPeer()
    await peer.start()
    try:
        gw = await gateway({
            "backends": {"api": {"type": "http", "endpoints": [peer.url]}},
            "routes": [{"name": "api", "match": {"path_prefix": "/api"}, "auth": "none", "backend": "api"}],
        })
        async with http.ws_connect(gw.url + "/api") as ws:
            await ws.send_str("hello")
            await until(lambda: peer.requests, "the message POST")
            s = only_session(gw)
            h = peer.requests[0].headers
            assert h["Gateway-Connection-Id"] == s.id
            assert h["Gateway-Session-Id"] == s.session_id != s.id
    finally:
        await peer.stop()


# ------------------------------------------------------------ limits fixed at go-live
def _parsed(cfg: dict, like) -> config.Config:
    cfg = dict(cfg, listen={"host": "127.0.0.1", "port": 0}, admin={"host": "127.0.0.1", "port": 0},
               drain={"timeout_s": 2})
    return config.parse(yaml.safe_dump(cfg), source=like.config.source)


async def test_reload_does_not_change_a_live_sessions_limits(gateway, backend, http):
    b = await backend()
    gw = await gateway(proxy_config(b.url, limits={"max_message_bytes": 1000}))
    async with http.ws_connect(gw.url + "/ws") as old:
        await old.send_bytes(b"a")
        assert (await old.receive(timeout=5)).data == b"a"
        gw.node.reload(_parsed(proxy_config(b.url, limits={"max_message_bytes": 100}), gw.node))
        # The session that was live keeps 1000 bytes ...
        await old.send_bytes(b"x" * 500)
        assert (await old.receive(timeout=5)).data == b"x" * 500
        # ... a new one gets 100.
        async with http.ws_connect(gw.url + "/ws") as new:
            await new.send_bytes(b"y" * 100)
            assert (await new.receive(timeout=5)).data == b"y" * 100
            await new.send_bytes(b"y" * 500)
            msg = await new.receive(timeout=5)
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)
        await old.send_bytes(b"z" * 1000)
        assert (await old.receive(timeout=5)).data == b"z" * 1000


# ------------------------------------------------------------ detach / attach
async def test_detached_messages_are_held_and_reach_the_next_upstream_in_order(gateway, backend, http):
    a, b = await backend(), await backend()
    gw = await gateway(two_backends(a.url, b.url))
    async with http.ws_connect(gw.url + "/ws") as ws:
        await ws.send_str("m0")
        assert (await ws.receive(timeout=5)).data == "m0"
        s = only_session(gw)
        await asyncio.wait_for(s.detach_upstream(), BOUND_S)
        assert s.upstream.link is Link.DETACHED and s.endpoint is None
        await until(lambda: a.closes == [1001], "backend A closed with 1001")
        held = ["m1", "m2", "m3"]
        for m in held:
            await ws.send_str(m)
        await ws.send_bytes(b"\x00bin")
        await until(lambda: s.c_msgs == 5, "the held messages reached the gateway")
        ep, transport, _head, leftover = await dial_other(gw, s)
        s.attach_upstream(transport, leftover, ep)
        assert s.upstream.link is Link.ATTACHED and s.endpoint is ep
        for m in held:
            assert (await ws.receive(timeout=5)).data == m
        assert (await ws.receive(timeout=5)).data == b"\x00bin"
        await ws.send_str("m4")
        assert (await ws.receive(timeout=5)).data == "m4"
    await until(lambda: b.closes, "backend B saw the close")
    assert [d for _, d in a.received] == ["m0"]
    assert [d for _, d in b.received] == ["m1", "m2", "m3", b"\x00bin", "m4"]
    assert b.requests[0]["Gateway-Session-Id"] == a.requests[0]["Gateway-Session-Id"]


async def test_detach_mid_client_frame_waits_for_the_frame_boundary(gateway, backend):
    a, b = await backend(), await backend()
    gw = await gateway(two_backends(a.url, b.url))
    c = await RawClient.connect(gw.url + "/ws")
    assert c.status == 101
    first = bytes(range(256)) * 4  # over 125 bytes: streamed through, not checked whole
    wire = frames.frame(frames.OP_BINARY, first, mask=True)
    c.writer.write(wire[:300])
    s = only_session(gw)
    await until(lambda: s.c_remaining, "half the frame forwarded")
    waiter = s.detach_upstream()
    assert not waiter.done() and s.upstream.link is Link.DETACHING
    c.writer.write(wire[300:] + frames.frame(frames.OP_BINARY, b"second", mask=True))
    await asyncio.wait_for(waiter, BOUND_S)
    assert s.upstream.link is Link.DETACHED
    # The whole first frame went to A (and A's echo of it, at a boundary, may or may not
    # have been relayed before A was let go); the second waits for the next upstream.
    await until(lambda: a.received, "A got the first message")
    assert a.received == [(WSMsgType.BINARY, first)]
    ep, transport, _head, leftover = await dial_other(gw, s)
    s.attach_upstream(transport, leftover, ep)
    await until(lambda: b.received, "B got the held message")
    assert b.received == [(WSMsgType.BINARY, b"second")]
    while True:
        op, _, payload = await c.recv_frame()
        if payload == b"second":
            break
        assert payload == first  # only A's whole echo can come before
    c.close()


class HalfFrameBackend:
    """A raw WebSocket server that sends a 1000-byte binary frame in two halves, on cue."""

    def __init__(self):
        self.payload = bytes(range(250)) * 4
        self.second_half = asyncio.Event()
        self.got = bytearray()
        self.server = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.server.close()

    async def _serve(self, reader, writer) -> None:
        head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        key = next(line.split(":", 1)[1].strip() for line in head.split("\r\n")
                   if line.lower().startswith("sec-websocket-key:"))
        accept = base64.b64encode(hashlib.sha1((key + "258EAFA5-E914-47DA-95CA-C5AB0DC85B11").encode())
                                  .digest()).decode()
        writer.write(f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Accept: {accept}\r\n\r\n".encode())
        wire = b"\x82\x7e" + struct.pack("!H", len(self.payload)) + self.payload
        writer.write(wire[:400])
        await self.second_half.wait()
        writer.write(wire[400:])
        try:
            while chunk := await reader.read(65536):
                self.got += chunk
        except ConnectionError:
            pass
        writer.close()


async def test_detach_mid_upstream_frame_lets_it_finish_first(gateway, backend):
    a = HalfFrameBackend()
    await a.start()
    b = await backend()
    try:
        gw = await gateway(two_backends(f"ws://127.0.0.1:{a.port}/ws", b.url))
        c = await RawClient.connect(gw.url + "/ws")
        assert c.status == 101
        s = only_session(gw)
        await until(lambda: s.u_remaining, "half of A's frame relayed")
        waiter = s.detach_upstream()
        assert not waiter.done()
        c.send_frame(frames.OP_TEXT, b"held")  # the client stream is at a boundary: held at once
        await until(lambda: s.c_msgs == 1, "the held message reached the gateway")
        a.second_half.set()
        await asyncio.wait_for(waiter, BOUND_S)
        assert await c.recv_frame() == (frames.OP_BINARY, True, a.payload)  # whole, not torn
        await until(lambda: a.got, "A got its close")
        assert a.got[0] == 0x88 and b"held" not in a.got  # a close frame, and not the held message
        ep, transport, _head, leftover = await dial_other(gw, s)
        s.attach_upstream(transport, leftover, ep)
        assert await c.recv_frame() == (frames.OP_TEXT, True, b"held")  # B's echo
        c.close()
    finally:
        await a.stop()


async def test_the_hold_is_bounded_and_pauses_the_client(gateway, backend, http):
    a, b = await backend(), await backend()
    gw = await gateway(two_backends(a.url, b.url, limits={"send_buffer_bytes": 65536}))
    async with http.ws_connect(gw.url + "/ws") as ws:
        await ws.send_str("start")
        await ws.receive(timeout=5)
        s = only_session(gw)
        await asyncio.wait_for(s.detach_upstream(), BOUND_S)
        blobs = [bytes([i]) * 30_000 for i in range(20)]   # 600 KB against a 64 KiB hold
        for blob in blobs:
            await ws.send_bytes(blob)
        await until(lambda: s.held.paused, "the client paused")
        assert len(s.held.buf) < 65536 + 300_000  # one read past the bound at most
        ep, transport, _head, leftover = await dial_other(gw, s)
        s.attach_upstream(transport, leftover, ep)
        for blob in blobs:
            msg = await ws.receive(timeout=10)
            assert msg.data == blob
    assert [d for _, d in b.received] == blobs


async def test_detach_and_attach_refuse_what_the_tables_forbid(gateway, backend, http):
    a, b = await backend(), await backend()
    gw = await gateway(two_backends(a.url, b.url))
    async with http.ws_connect(gw.url + "/ws") as ws:
        await ws.send_str("x")
        await ws.receive(timeout=5)
        s = only_session(gw)
        ep, transport, _head, leftover = await dial_other(gw, s)
        with pytest.raises(InvalidTransition):
            s.attach_upstream(transport, leftover, ep)  # still attached
        await asyncio.wait_for(s.detach_upstream(), BOUND_S)
        with pytest.raises(InvalidTransition):
            s.detach_upstream()  # already detached
        s.attach_upstream(transport, leftover, ep)
        await ws.send_str("y")
        assert (await ws.receive(timeout=5)).data == "y"


async def test_client_dropping_while_detached_ends_the_session(gateway, backend):
    a, b = await backend(), await backend()
    gw = await gateway(two_backends(a.url, b.url))
    c = await RawClient.connect(gw.url + "/ws")
    c.send_frame(frames.OP_TEXT, b"x")
    await c.recv_frame()
    s = only_session(gw)
    await asyncio.wait_for(s.detach_upstream(), BOUND_S)
    c.writer.transport.abort()  # no close frame: nothing is owed to a held upstream either
    await until(lambda: not gw.node.sessions and gw.node.sockets == 0, "the session ended")
    assert s.close_code == 1006


async def test_a_close_while_detached_is_held_for_the_next_upstream(gateway, backend):
    a, b = await backend(), await backend()
    gw = await gateway(two_backends(a.url, b.url))
    c = await RawClient.connect(gw.url + "/ws")
    c.send_frame(frames.OP_TEXT, b"x")
    await c.recv_frame()
    s = only_session(gw)
    await asyncio.wait_for(s.detach_upstream(), BOUND_S)
    c.send_frame(frames.OP_TEXT, b"last")
    c.send_frame(frames.OP_CLOSE, frames.close_payload(1000, "bye"))
    await until(lambda: s.client.received, "the client's close reached the gateway")
    ep, transport, _head, leftover = await dial_other(gw, s)
    s.attach_upstream(transport, leftover, ep)
    assert await c.recv_frame() == (frames.OP_TEXT, True, b"last")
    assert (await c.recv_close())[0] == 1000  # B's answer to the client's own close
    assert await c.eof()
    await until(lambda: not gw.node.sessions, "the session ended")
    assert b.received[0] == (WSMsgType.TEXT, "last") and b.closes == [1000]
