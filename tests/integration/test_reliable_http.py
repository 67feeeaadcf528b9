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


class Room:
    """One reliable session on an HTTP route, in channel "room", and the management API
    to publish to it: `publish(text)` answers what the API answered; `resume(last)`
    comes back with the hello's token, what the first connection got already counted."""

    AUTH = {"Authorization": "Bearer rel-http-admin"}

    def __init__(self, gw, http, peer: Peer, token: str):
        self.gw, self.http, self.peer, self.token = gw, http, peer, token
        self.sid = peer.hello["session"]
        self.detached = gw.node.cluster.store.detached

    @classmethod
    async def join(cls, gateway, http_peer, http, monkeypatch, user: str, *said: str) -> "Room":
        monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "rel-http-admin")
        be = await answering(http_peer)
        gw = await gateway(http_cfg("node-a", None, be.url))
        token = jwt_for(user)
        peer = await Peer.connect(gw.url, query=f"?access_token={token}")
        for text in said:
            peer.send(text)
        want = [b"welcome"] + [b"r:" + t.encode() for t in said]
        await peer.read_until(lambda: peer.got == want, "the welcome and the replies, not acked")
        s = session_of(gw)
        async with http.put(f"{gw.admin_url}/v1/connections/{s.id}/channels/room", headers=cls.AUTH) as r:
            assert r.status == 200, await r.text()
        return cls(gw, http, peer, token)

    async def publish(self, text: str) -> dict:
        async with self.http.post(f"{self.gw.admin_url}/v1/channels/room/messages", data=text,
                                  headers=self.AUTH) as r:
            return await r.json()

    async def drop(self) -> None:
        """The client's transport goes, without a close."""
        self.peer.raw.writer.transport.abort()
        await until(lambda: gone_from(self.gw, self.sid), what="the session ended on the node, parking")

    def captured(self, text: str):
        (capture,) = self.gw.node.drainer.captures
        return lambda: _async(any(p == text.encode() for _, p in capture.pending))

    async def resume(self, last: int, n: int) -> list[bytes]:
        again = await Peer.connect(self.gw.url, query=f"?access_token={self.token}&resume={self.peer.hello['token']}"
                                                      f"&last={last}")
        again.got = list(self.peer.got)
        await again.read_until(lambda: len(again.got) >= n, f"{n} messages in all")
        return again.got


async def test_a_channel_message_published_while_a_dropped_session_is_parked_is_replayed(
        gateway, http_peer, http, jwt_env, monkeypatch):
    """An HTTP-backend session ends at once when its client goes (no upstream socket to
    wait for), before its parked record is written: a channel message published in that
    gap finds it on this node, not parked, and must still reach its replay buffer."""
    room = await Room.join(gateway, http_peer, http, monkeypatch, "dee")
    release = hold_park(room.gw)
    await room.drop()
    answer = asyncio.ensure_future(room.publish("in the gap"))   # answered once it is in the store: after the park
    await until(room.captured("in the gap"), what="the message captured")
    release.set()
    assert (await asyncio.wait_for(answer, 10))["delivered"] == 1, answer.result()
    assert await room.resume(1, 2) == [b"welcome", b"in the gap"]


async def test_a_message_published_after_the_park_before_the_window_is_written_is_not_taken_for_a_received_one(
        gateway, http_peer, http, jwt_env, monkeypatch):
    """The parked record is written, so a publisher finds the session detached and
    appends to its replay buffer, before the dropped session's capture has written
    its window (what the client was sent and has not acked). The window is numbered
    from its start all the same: the client, which had it, is sent the new message
    only, not the window's last message again in its place."""
    room = await Room.join(gateway, http_peer, http, monkeypatch, "fay", "m1")
    release = hold_after_park(room.gw)
    room.peer.raw.writer.transport.abort()
    await until(lambda: room.detached.get(room.sid), what="the parked record written")
    answer = await room.publish("after the park")
    assert answer == {"delivered": 1, "buffered": 1}, answer
    release.set()
    assert await room.resume(2, 3) == [b"welcome", b"r:m1", b"after the park"]


async def test_a_publishers_next_message_does_not_overtake_one_still_on_its_way_from_the_capture(
        gateway, http_peer, http, jwt_env, monkeypatch):
    """m1 reaches the dropped session on this node before its parked record is written,
    so it goes to the capture, whose writes wait for the park. The publisher's next
    message m2, sent once the record is written, finds the session parked and goes to
    the replay buffer straight away. m1's answer waits until m1 is in the store, so m2
    cannot come before it in the replay."""
    room = await Room.join(gateway, http_peer, http, monkeypatch, "gus")
    detached = room.detached
    release_park = hold_park(room.gw)
    release_capture, appended = asyncio.Event(), []
    append = detached.append

    async def append_held(sid, entries, *caps, **kw):
        if "seal" in kw:                 # the capture's writes (a publisher's append has no seal)
            await release_capture.wait()
        else:
            appended.append(entries)
        return await append(sid, entries, *caps, **kw)
    detached.append = append_held
    await room.drop()
    answers: list[dict] = []

    async def publisher() -> None:
        answers.append(await room.publish("m1"))
        await until(lambda: detached.get(room.sid), what="the parked record written")
        answers.append(await room.publish("m2"))

    task = asyncio.ensure_future(publisher())
    await until(room.captured("m1"), what="m1 in the capture, held")
    release_park.set()
    # Either m2 went to the store (m1's publish was answered before m1 was written),
    # or m1's publish is still waiting for the capture's write: let the capture write.
    await until(lambda: _async(bool(appended) or not answers), what="m2 appended, or m1 still unanswered")
    await until(lambda: detached.get(room.sid), what="the parked record written")
    release_capture.set()
    await asyncio.wait_for(task, 10)
    assert answers == [{"delivered": 1}, {"delivered": 1, "buffered": 1}], answers
    assert await room.resume(1, 3) == [b"welcome", b"m1", b"m2"]


async def test_a_message_that_reaches_the_capture_while_its_seal_is_on_its_way_is_kept(
        gateway, http_peer, http, jwt_env, monkeypatch):
    """A delivery that read the index before the park (another node's, say) can reach
    the capture after the session has ended, while the sealing write is in flight. It
    was counted as taken: it is written after the seal, and replayed."""
    room = await Room.join(gateway, http_peer, http, monkeypatch, "hal")
    detached = room.detached
    sealing, release = asyncio.Event(), asyncio.Event()
    append = detached.append

    async def seal_held(sid, entries, *caps, **kw):
        if kw.get("seal"):
            sealing.set()
            await release.wait()
        return await append(sid, entries, *caps, **kw)
    detached.append = seal_held
    await room.drop()
    (capture,) = room.gw.node.drainer.captures
    await asyncio.wait_for(sealing.wait(), 10)
    assert capture.add(frames.OP_TEXT, b"while sealing")
    release.set()
    await asyncio.wait_for(capture.done, 10)
    assert await room.resume(1, 2) == [b"welcome", b"while sealing"]


def hold_after_park(gw) -> asyncio.Event:
    """`gw` writes its parked records, then waits for the returned event before going
    on: what it would write to the replay buffer next waits too."""
    store = gw.node.cluster.store.detached
    release = asyncio.Event()
    park = store.park

    async def held(items):
        await park(items)
        await release.wait()
    store.park = held
    return release


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
