"""Reliable mode on an HTTP backend (docs/reliable.md): the client speaks
gateway.reliable.v1 by hand, a real aiohttp backend answers every POSTed message
with a reply, and both ends are counted: the replies the client reads are
numbered, kept until acked, replayed after a drop or a drain with nothing twice;
the backend gets every message once, in order, without the kind byte."""

from __future__ import annotations

import asyncio

import pytest
from aiohttp import web

from gateway import frames

from ..helpers import until
from ..httppeer import http_peer
from .test_reliable import PROTO, Peer, _async, gone_from, hold_park, jwt_env, jwt_for, node_cfg, session_of

__all__ = ["http_peer", "jwt_env"]   # fixtures used by name


class Answering:
    """An HTTP backend: the connect event answers "welcome", each message m answers "r:m".
    `gate`: while clear, message POSTs wait (a slow backend)."""

    def __init__(self, peer_factory):
        self.factory = peer_factory
        self.gate = asyncio.Event()
        self.gate.set()
        self.peer = None

    async def start(self):
        async def answer(request, body):
            event = request.headers.get("Gateway-Event")
            if event == "connect":
                return web.Response(body=b"welcome", content_type="text/plain")
            if event == "message":
                await self.gate.wait()
                return web.Response(body=b"r:" + body, content_type="text/plain")
            return web.Response(status=204)
        self.peer = await self.factory(answer)
        return self

    def got(self, sid: str) -> list[str]:
        return [r.body.decode() for r in self.peer.of("message") if r.headers.get("Gateway-Session-Id") == sid]

    @property
    def url(self) -> str:
        return self.peer.url


def http_cfg(node_id: str, redis_url: str | None, backend_url: str, **rel) -> dict:
    cfg = node_cfg(node_id, redis_url, "ws://127.0.0.1:1/unused", **rel)
    cfg["backends"] = {"h": {"type": "http", "endpoints": [backend_url], "max_queue": 1000}}
    (route,) = cfg["routes"]
    route["backend"] = "h"
    route["events"] = {"connect": "h", "disconnect": "h"}
    return cfg


async def answering(http_peer) -> Answering:
    return await Answering(http_peer).start()


def replies(peer: Peer) -> list[bytes]:
    return [p for p in peer.got if p != b"welcome"]


async def test_replies_are_numbered_after_the_hello_and_the_backend_sees_plain_messages(gateway, http_peer, jwt_env):
    be = await answering(http_peer)
    gw = await gateway(http_cfg("node-a", None, be.url, ack_every=5, ack_ms=20))
    peer = await Peer.connect(gw.url, query=f"?access_token={jwt_for('ann')}")
    assert peer.raw.headers["sec-websocket-protocol"] == PROTO
    sid = peer.hello["session"]
    for i in range(1, 11):
        peer.send(f"m{i}")
    await peer.read_until(lambda: len(peer.got) >= 11 and peer.acks and peer.acks[-1] == 10, "replies and acks")
    # The connect event's reply is the first numbered message, right after the hello.
    assert peer.got == [b"welcome"] + [f"r:m{i}".encode() for i in range(1, 11)]
    assert be.got(sid) == [f"m{i}" for i in range(1, 11)]   # no kind byte, each once, in order
    s = session_of(gw)
    assert s.rel.window.sent == 11 and len(s.rel.window) == 11
    peer.ack()
    await until(lambda: _async(len(s.rel.window) == 0), what="the ack trimmed the window")


async def test_a_full_window_holds_the_posts_back_until_an_ack_and_loses_nothing(gateway, http_peer, jwt_env):
    """The client reads but does not ack: once the window is full the gateway POSTs no
    more (at most one reply goes past it), and an ack lets the rest through in order."""
    be = await answering(http_peer)
    gw = await gateway(http_cfg("node-a", None, be.url, max_unacked_messages=5))
    peer = await Peer.connect(gw.url, query=f"?access_token={jwt_for('bo')}")
    sid = peer.hello["session"]
    for i in range(1, 21):
        peer.send(f"m{i}")
    s = session_of(gw)
    await until(lambda: _async(s.rel.window.full and s.rel.room is not None), what="a worker waits for room")
    posted = len(be.got(sid))
    assert posted <= 5, posted             # the welcome and 4 replies fill it; one more in flight at most
    assert len(s.rel.window) <= 6
    for _ in range(40):                    # bounded: each ack lets one more through at least
        await peer.read_until(lambda: len(peer.got) == s.rel.window.sent, "what was sent")
        assert len(s.rel.window) <= 6
        if len(replies(peer)) == 20:
            break
        sent = s.rel.window.sent
        peer.ack()
        await until(lambda: _async(s.rel.window.sent > sent), what="more after the ack")
    assert replies(peer) == [f"r:m{i}".encode() for i in range(1, 21)]
    assert be.got(sid) == [f"m{i}" for i in range(1, 21)]


@pytest.mark.parametrize("how", ["drop", "drain"])
async def test_a_reliable_http_session_resumes_on_another_node_with_nothing_lost_or_twice(
        gateway, redis_server, http_peer, jwt_env, how):
    """Messages queued for a slow backend when the client goes (a TCP cut, or the node's
    drain): the old node still POSTs them, their replies go to the replay buffer, and the
    resume on node B gets every reply the client had not read, in order, after `last`."""
    be = await answering(http_peer)
    a = await gateway(http_cfg("node-a", redis_server.url, be.url, ack_every=5, ack_ms=20))
    b = await gateway(http_cfg("node-b", redis_server.url, be.url, ack_every=5, ack_ms=20))
    token = jwt_for("cy")
    peer = await Peer.connect(a.url, query=f"?access_token={token}")
    sid = peer.hello["session"]
    for i in range(1, 6):
        peer.send(f"m{i}")
    await peer.read_until(lambda: len(peer.got) >= 6 and peer.acks and peer.acks[-1] == 5, "m1..m5 answered")
    peer.ack(3)
    be.gate.clear()                        # the backend slows down: m6..m10 queue on node A
    for i in range(6, 11):
        peer.send(f"m{i}")
    await peer.read_until(lambda: peer.acks[-1] == 10, "m6..m10 taken")
    if how == "drop":
        peer.raw.writer.transport.abort()
        reason = f"resume={peer.hello['token']}"
    else:
        drain = asyncio.ensure_future(a.stop())
        await peer.read_until(lambda: peer.close is not None, "the drain's close", 1000)
        code, reason = peer.close
        assert code == 1012 and reason.startswith("resume="), peer.close
        peer.raw.send_frame(frames.OP_CLOSE, frames.close_payload(1000, ""))
    await until(lambda: _async(not a.node.sessions), what="the session left node A")
    be.gate.set()
    if how == "drain":
        await asyncio.wait_for(drain, 10)
    del peer.got[4:]                       # it lost some of what it had read, past what it acked
    last = len(peer.got)
    again = await Peer.connect(b.url, query=f"?access_token={token}&{reason}&last={last}")
    assert again.hello["session"] == sid and again.hello["up"] == 10 and again.hello["down"] == last
    for i in range(11, 16):
        again.send(f"m{i}")
    again.got = list(peer.got)
    await again.read_until(lambda: len(again.got) >= 16, "every reply")
    assert again.got == [b"welcome"] + [f"r:m{i}".encode() for i in range(1, 16)]
    await until(lambda: _async(len(be.got(sid)) == 15), what="the backend got m1..m15")
    assert be.got(sid) == [f"m{i}" for i in range(1, 16)]
    resumed = [r for r in be.peer.of("message") if r.headers.get("Gateway-Session-Id") == sid][10:]
    assert all(r.headers.get("Gateway-Resumed") == "1" for r in resumed)
    assert len(be.peer.of("connect")) == 1 and not be.peer.of("disconnect")   # one session all along
    again.raw.close()


async def test_a_channel_message_published_while_a_dropped_session_is_parked_is_replayed(
        gateway, http_peer, http, jwt_env, monkeypatch):
    """An HTTP-backend session ends at once when its client goes (no upstream socket to
    wait for), before its parked record is written: a channel message published in that
    gap finds it on this node, not parked, and must still reach its replay buffer."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "rel-http-admin")
    auth = {"Authorization": "Bearer rel-http-admin"}
    be = await answering(http_peer)
    gw = await gateway(http_cfg("node-a", None, be.url))
    token = jwt_for("dee")
    peer = await Peer.connect(gw.url, query=f"?access_token={token}")
    await peer.read_until(lambda: peer.got == [b"welcome"], "the welcome")
    s = session_of(gw)
    async with http.put(f"{gw.admin_url}/v1/connections/{s.id}/channels/room", headers=auth) as r:
        assert r.status == 200, await r.text()
    release = hold_park(gw)
    peer.raw.writer.transport.abort()
    await until(lambda: gone_from(gw, peer.hello["session"]), what="the session ended on the node, parking")
    async with http.post(f"{gw.admin_url}/v1/channels/room/messages", data="in the gap", headers=auth) as r:
        answer = await r.json()
    assert answer["delivered"] == 1, answer
    release.set()
    again = await Peer.connect(gw.url, query=f"?access_token={token}&resume={peer.hello['token']}&last=1")
    again.got = list(peer.got)
    await again.read_until(lambda: len(again.got) >= 2, "the message from the gap")
    assert again.got == [b"welcome", b"in the gap"]


@pytest.mark.parametrize("frame, why", [(b"xhello", "reliable: unknown kind byte"), (b"a999", "reliable: bad ack"),
                                        (b"", "reliable: unknown kind byte")])
async def test_a_frame_outside_the_format_on_an_http_route_closes_1002_and_is_not_posted(
        gateway, http_peer, jwt_env, frame, why):
    """The kind byte is checked before anything reaches the HTTP backend: a message that
    is neither `d` nor a valid ack closes the session 1002, saying why, and is never POSTed."""
    be = await answering(http_peer)
    gw = await gateway(http_cfg("node-a", None, be.url))
    peer = await Peer.connect(gw.url, query=f"?access_token={jwt_for('eve')}")
    sid = peer.hello["session"]
    peer.send("m1")
    await peer.read_until(lambda: len(peer.got) >= 2, "the welcome and m1's reply")
    peer.raw.send_frame(frames.OP_TEXT, frame)
    await peer.read_until(lambda: peer.close is not None, "the close")
    assert peer.close == (1002, why)
    assert be.got(sid) == ["m1"]
