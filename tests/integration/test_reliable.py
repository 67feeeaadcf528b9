"""Reliable mode (docs/reliable.md), spoken by hand: a raw client sends and reads
the kind-byte frames itself, real backends number what they send, and every
message is counted at both ends."""

from __future__ import annotations

import asyncio
import json
import time

import jwt
import pytest

from gateway import frames
from gateway.frames import OP_BINARY, OP_TEXT

from ..conftest import proxy_config
from ..helpers import RawClient, until
from .test_drain_resume import numbered  # noqa: F401  (fixture)

PROTO = "gateway.reliable.v1"


def reliable_cfg(backend_url: str, **rel) -> dict:
    return proxy_config(backend_url, route={"reliable": rel or None})



class Peer:
    """The client's half of gateway.reliable.v1, by hand: counts both ways, acks on demand."""

    def __init__(self, raw: RawClient):
        self.raw = raw
        self.hello: dict | None = None
        self.got: list[bytes] = []       # d payloads, in order
        self.kinds: list[int] = []       # opcode of each d
        self.acks: list[int] = []        # acks from the gateway
        self.sent = 0
        self.close: tuple[int, str] | None = None

    @classmethod
    async def connect(cls, url: str, protocols: str = PROTO, query: str = "") -> "Peer":
        raw = await RawClient.connect(f"{url}/ws{query}", {"Sec-WebSocket-Protocol": protocols})
        assert raw.status == 101, raw.status
        peer = cls(raw)
        op, _, payload = await raw.recv_frame()
        assert op == OP_TEXT and payload[:1] == b"h", payload
        peer.hello = json.loads(payload[1:])
        return peer

    def send(self, text: str, opcode: int = OP_TEXT) -> None:
        self.sent += 1
        self.raw.send_frame(opcode, b"d" + text.encode())

    def ack(self, count: int | None = None) -> None:
        self.raw.send_frame(OP_TEXT, b"a%d" % (len(self.got) if count is None else count))

    async def read(self, timeout: float = 5.0) -> None:
        """One frame, filed by kind."""
        op, fin, payload = await self.raw.recv_frame(timeout)
        assert fin
        if op == frames.OP_CLOSE:
            self.close = frames.parse_close(payload)
            return
        if op == frames.OP_PING:
            self.raw.send_frame(frames.OP_PONG, payload)
            return
        kind, rest = payload[:1], payload[1:]
        if kind == b"d":
            self.got.append(rest)
            self.kinds.append(op)
        elif kind == b"a":
            assert op == OP_TEXT
            self.acks.append(int(rest))
        else:
            raise AssertionError(f"unexpected frame {payload[:40]!r}")

    async def read_until(self, check, what: str, max_frames: int = 100_000) -> None:
        for _ in range(max_frames):
            if check():
                return
            await self.read()
        raise AssertionError(f"{what}: not within {max_frames} frames")


def session_of(gw):
    (s,) = gw.node.sessions.values()
    return s


async def test_reliable_route_selects_the_subprotocol_and_says_hello_first(gateway, backend):
    b = await backend()
    gw = await gateway(reliable_cfg(b.url))
    peer = await Peer.connect(gw.url, f"chat.v2, {PROTO}")
    assert peer.raw.headers["sec-websocket-protocol"] == PROTO
    s = session_of(gw)
    assert peer.hello["v"] == 1 and peer.hello["session"] == s.session_id
    assert peer.hello["up"] == 0 and peer.hello["down"] == 0
    assert peer.hello["token"].startswith(s.session_id + ".")
    # Never forwarded: the backend is offered the rest of the client's list only.
    await until(lambda: _async(b.requests), what="backend handshake")
    assert b.requests[0].get("Sec-WebSocket-Protocol") == "chat.v2"
    peer.send("hi")
    await peer.read_until(lambda: peer.got, "echo")
    assert peer.got == [b"hi"]
    assert [(t.name, d) for t, d in b.received] == [("TEXT", "hi")]


async def _async(value):
    return value


async def test_route_without_reliable_does_not_select_it_and_passes_frames_as_they_are(gateway, backend):
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    raw = await RawClient.connect(f"{gw.url}/ws", {"Sec-WebSocket-Protocol": PROTO})
    assert raw.status == 101
    assert "sec-websocket-protocol" not in raw.headers
    raw.send_frame(OP_TEXT, b"dplain")
    op, _, payload = await raw.recv_frame()
    assert (op, payload) == (OP_TEXT, b"dplain")    # no hello, no kind byte added or taken
    assert "Sec-WebSocket-Protocol" not in b.requests[0]


async def test_numbered_both_ways_acked_both_ways_and_the_window_trimmed(gateway, numbered):
    gw = await gateway(reliable_cfg(numbered.url, ack_every=16, ack_ms=50))
    peer = await Peer.connect(gw.url)
    s = session_of(gw)
    sid = s.session_id
    for i in range(1, 101):
        peer.send(f"c{i}")
    # Acks every 16 messages, then the rest after ack_ms: 16, 32, ..., 96, 100.
    await peer.read_until(lambda: peer.acks and peer.acks[-1] == 100, "acks up to 100")
    assert peer.acks == [16, 32, 48, 64, 80, 96, 100]
    await until(lambda: _async(len(numbered.got[sid]) == 100), what="backend got 100")
    assert numbered.got[sid] == [f"c{i}" for i in range(1, 101)]   # plain, in order, once each
    await peer.read_until(lambda: len(peer.got) >= 200, "200 from the backend")
    assert peer.got[:200] == [f"s{i}".encode() for i in range(1, 201)]
    assert set(peer.kinds) == {OP_TEXT}
    assert len(s.rel.window) >= 200    # nothing acked yet: everything sent is kept
    peer.ack(150)
    await until(lambda: _async(s.rel.window.first == 151), what="window trimmed by the ack")
    assert s.rel.window.sent == len(s.rel.window) + 150


async def test_a_full_window_stops_reading_the_upstream_until_an_ack(gateway, numbered):
    gw = await gateway(reliable_cfg(numbered.url, max_unacked_messages=5))
    peer = await Peer.connect(gw.url)
    s = session_of(gw)
    sid = s.session_id
    # The backend keeps sending (into socket buffers); the gateway takes no more than 5.
    await until(lambda: _async(numbered.sent[sid] >= 60), what="backend sent 60")
    assert s.rel.window.sent == 5 and s.rel.window.full
    await peer.read_until(lambda: len(peer.got) == 5, "the first 5")
    peer.ack()
    await peer.read_until(lambda: len(peer.got) == 10, "5 more after the ack")
    assert s.rel.window.sent == 10
    for want in range(15, 35, 5):
        peer.ack()
        await peer.read_until(lambda: len(peer.got) == want, f"{want} after the next ack")
        assert s.rel.window.sent == want
    assert peer.got[:30] == [f"s{i}".encode() for i in range(1, 31)]


async def test_a_push_past_the_window_is_refused_as_buffer_full(gateway, backend, http, monkeypatch):
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "t")
    b = await backend(compress=False)
    gw = await gateway(reliable_cfg(b.url, max_unacked_messages=5))
    peer = await Peer.connect(gw.url)
    s = session_of(gw)
    for i in range(5):
        peer.send(f"e{i}")     # five echoes fill the window
    await until(lambda: _async(s.rel.window.full), what="the window full")

    async def push():
        async with http.post(f"{gw.admin_url}/v1/connections/{s.id}/messages?type=text", data=b"pushed",
                             headers={"Authorization": "Bearer t"}) as r:
            assert r.status == 200
            return await r.json()
    assert await push() == {"delivered": 0, "buffer_full": 1}
    await peer.read_until(lambda: len(peer.got) == 5, "the window's 5")
    peer.ack()
    await until(lambda: _async(not s.rel.window.full), what="room again")
    assert (await push())["delivered"] == 1
    await peer.read_until(lambda: b"pushed" in peer.got, "the push once there is room")
    assert peer.got.count(b"pushed") == 1


async def test_the_window_bound_counts_bytes_too(gateway, backend):
    async def big(ws, request):
        for i in range(20):
            await ws.send_bytes(bytes([i]) * 1000)
        async for _ in ws:
            pass
    b = await backend(handler=big)
    gw = await gateway(reliable_cfg(b.url, max_unacked_bytes=3000))
    peer = await Peer.connect(gw.url)
    s = session_of(gw)
    await peer.read_until(lambda: len(peer.got) == 3, "3 KB")
    assert s.rel.window.size == 3000 and s.rel.window.full and peer.kinds == [OP_BINARY] * 3
    peer.ack()
    await peer.read_until(lambda: len(peer.got) == 6, "3 KB more")
    assert peer.got == [bytes([i]) * 1000 for i in range(6)]


@pytest.mark.parametrize("payload, opcode", [
    (b"xhello", OP_TEXT),     # unknown kind
    (b"", OP_TEXT),           # no kind byte at all
    (b"a12x", OP_TEXT),       # an ack that is not a count
    (b"a5", OP_TEXT),         # an ack above what was sent
    (b"a1", OP_BINARY),       # acks are text
    (b"h{}", OP_TEXT),        # hellos go one way only
])
async def test_a_frame_outside_the_format_closes_1002(gateway, backend, payload, opcode):
    b = await backend()
    gw = await gateway(reliable_cfg(b.url))
    peer = await Peer.connect(gw.url)
    peer.raw.send_frame(opcode, payload)
    await peer.read_until(lambda: peer.close is not None, "close")
    assert peer.close[0] == 1002
    assert b.received == []


async def test_a_push_to_a_reliable_session_is_numbered_like_the_backends_messages(gateway, numbered):
    gw = await gateway(reliable_cfg(numbered.url, ack_every=1))
    peer = await Peer.connect(gw.url)
    s = session_of(gw)
    await peer.read_until(lambda: len(peer.got) >= 3, "3 from the backend")
    assert s.send_message(OP_TEXT, b"pushed")
    await peer.read_until(lambda: b"pushed" in peer.got, "the push")
    n = peer.got.index(b"pushed") + 1
    assert s.rel.window.items[n - s.rel.window.first] == (OP_TEXT, b"pushed")
    assert [g for g in peer.got if g != b"pushed"] == [f"s{i}".encode() for i in range(1, len(peer.got))]


async def test_a_traced_reliable_session_keeps_the_reliable_relay_and_gets_it_back(gateway, backend, http,
                                                                                   monkeypatch):
    from gateway.reliable_session import ReliableSession
    from gateway.traced import TracedReliableSession

    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "t")
    b = await backend(compress=False)
    gw = await gateway(reliable_cfg(b.url))
    peer = await Peer.connect(gw.url)
    s = session_of(gw)
    assert type(s) is ReliableSession
    async with http.post(f"{gw.admin_url}/v1/connections/{s.id}/trace", json={"max_frames": 4},
                         headers={"Authorization": "Bearer t"}) as r:
        assert r.status == 200
    assert type(s) is TracedReliableSession
    for i in range(4):
        peer.send(f"m{i}")
        await peer.read_until(lambda: len(peer.got) == i + 1, f"echo {i}")
    await until(lambda: _async(type(s) is ReliableSession), what="the trace ended at max_frames")
    assert s.transport.get_protocol().data_received.__func__ is ReliableSession.from_client_relay
    peer.send("after")
    await peer.read_until(lambda: len(peer.got) == 5, "after the trace")
    assert peer.got == [b"m0", b"m1", b"m2", b"m3", b"after"]
    assert [d for _, d in b.received] == ["m0", "m1", "m2", "m3", "after"]


# ------------------------------------------------------------ drain and resume
SECRET = "r" * 64


def jwt_for(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


def node_cfg(node_id: str, redis_url: str | None, backend_url: str, **rel) -> dict:
    cfg = proxy_config(backend_url, route={"auth": "required", "reliable": rel or None})
    cfg.update({
        "node_id": node_id,
        "auth": {"jwt": {"algorithms": ["HS256"], "keys": {"secret_env": "RELIABLE_JWT_SECRET"},
                         "sources": ["query:access_token"]}},
        "drain": {"timeout_s": 5, "rate_per_s": 1000},
    })
    if redis_url is not None:
        cfg["redis"] = {"url": redis_url, "heartbeat_s": 0.2, "node_ttl_s": 1, "timeout_s": 0.5}
    return cfg


@pytest.fixture
def jwt_env(monkeypatch):
    monkeypatch.setenv("RELIABLE_JWT_SECRET", SECRET)


async def resume_and_count(peer: Peer, url: str, query: str, numbered, up: int, sent: int, more: int) -> Peer:
    """Resume `peer`'s session at `url` (`query` with the token; last= is what `peer`
    kept), check the hello (`up`: what the backend took), send c<up+1>..c<sent>, read
    `more` past `last`; then each way: nothing lost, nothing twice, order kept, plain
    messages at the backend, which saw the resume."""
    sid = peer.hello["session"]
    last = len(peer.got)
    again = await Peer.connect(url, query=f"{query}&last={last}")
    # The hello: a fresh token, what the backend took, and where the client's count stands.
    assert again.hello["session"] == sid and again.hello["up"] == up and again.hello["down"] == last
    assert again.hello["token"] != peer.hello["token"]
    assert len(numbered.got[sid]) == up
    for i in range(up + 1, sent + 1):   # what the gateway did not take, then new ones
        again.send(f"c{i}")
    again.got = list(peer.got)
    await again.read_until(lambda: len(again.got) >= last + more, f"{more} more after the resume")
    assert again.got == [f"s{i}".encode() for i in range(1, len(again.got) + 1)]
    await until(lambda: _async(len(numbered.got[sid]) == sent), what=f"the backend got c1..c{sent}")
    assert numbered.got[sid] == [f"c{i}" for i in range(1, sent + 1)]
    assert numbered.handshakes[-1]["Gateway-Session-Id"] == sid
    assert numbered.handshakes[-1].get("Gateway-Resumed") == "1"
    return again


@pytest.mark.parametrize("kept", ["all", 15])
async def test_a_drained_reliable_session_resumes_with_last_on_another_node(gateway, redis_server, numbered,
                                                                           jwt_env, kept):
    """`kept`: how many of the gateway's messages the client still has; 15 (fewer than it
    read, more than it acked) is served from what the window held at the drain."""
    a = await gateway(node_cfg("node-a", redis_server.url, numbered.url))
    b = await gateway(node_cfg("node-b", redis_server.url, numbered.url))
    token = jwt_for("alice")
    peer = await Peer.connect(a.url, query=f"?access_token={token}")
    sid = peer.hello["session"]
    for i in range(1, 21):
        peer.send(f"c{i}")
    await peer.read_until(lambda: len(peer.got) >= 30, "30 from the backend")
    peer.ack(10)   # 11... stay in the gateway's window: the replay starts there
    await until(lambda: _async(session_of(a).rel.window.first == 11), what="ack taken")
    drain = asyncio.ensure_future(a.stop())
    await peer.read_until(lambda: peer.close is not None, "the drain's close", 10_000)
    code, reason = peer.close
    assert code == 1012 and reason.startswith("resume=")
    # Sent after the 1012, before the client's close: these still reach the backend and count.
    for i in range(21, 24):
        peer.send(f"c{i}")
    peer.raw.send_frame(frames.OP_CLOSE, frames.close_payload(1000, ""))
    await asyncio.wait_for(drain, 10)
    if kept != "all":
        del peer.got[kept:]
    last = len(peer.got)
    # c21..c23 were sent after the 1012: the backend has them all.
    again = await resume_and_count(peer, b.url, f"?access_token={token}&{reason}", numbered, 23, 30, 30)
    assert "last=" not in numbered.handshakes[-1].get("Gateway-Original-URI", "")
    assert PROTO not in numbered.handshakes[-1].get("Sec-WebSocket-Protocol", "")
    # The replayed messages are in the new window until acked, as live ones.
    s = session_of(b)
    assert s.rel.window.first == last + 1
    again.ack()
    await until(lambda: _async(s.rel.window.first > last + 30), what="acked on B")


# ------------------------------------------------------------ an unplanned drop
async def nodes(gateway, request, store: str, backend_url: str, **rel):
    """Two nodes on one redis-server, or (memory store) one node twice: a resume comes back to it."""
    if store == "memory":
        a = await gateway(node_cfg("node-a", None, backend_url, **rel))
        return a, a
    url = request.getfixturevalue("redis_server").url
    return (await gateway(node_cfg("node-a", url, backend_url, **rel)),
            await gateway(node_cfg("node-b", url, backend_url, **rel)))


async def gone_from(gw, sid: str) -> bool:
    return not any(s.session_id == sid for s in gw.node.sessions.values())


async def with_traffic(gw, numbered, token: str) -> tuple[Peer, str]:
    """A reliable session on `gw` that sent c1..c3 (the backend has them) and read 10: (its peer, its id)."""
    peer = await Peer.connect(gw.url, query=f"?access_token={token}")
    sid = peer.hello["session"]
    for i in range(1, 4):
        peer.send(f"c{i}")
    await peer.read_until(lambda: len(peer.got) >= 10, "traffic")
    await until(lambda: _async(len(numbered.got[sid]) == 3), what="the backend got c1..c3")
    return peer, sid


def hold_park(gw) -> asyncio.Event:
    """`gw` writes no parked record until the returned event is set."""
    store = gw.node.cluster.store.detached
    release = asyncio.Event()
    park = store.park

    async def held(items):
        await release.wait()
        return await park(items)
    store.park = held
    return release


def record_takeovers(gw) -> list[bool]:
    """What each take-over `gw` asks for is answered, in order."""
    delivery = gw.node.cluster.delivery
    take_over = delivery.parked.take_over
    asked: list[bool] = []

    async def recorded(*args):
        asked.append(await take_over(*args))
        return asked[-1]
    delivery.parked.take_over = recorded
    return asked


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_dropped_connection_is_parked_and_resumed_with_what_the_client_missed(
        gateway, request, numbered, jwt_env, store):
    """The client's TCP goes without a close. What the gateway sent and the client did
    not ack is replayed after `last`; what the client wrote and the gateway never took
    (queued while the network was gone) is sent again after `up`."""
    a, b = await nodes(gateway, request, store, numbered.url, ack_every=5, ack_ms=20)
    token = jwt_for("carol")
    peer = await Peer.connect(a.url, query=f"?access_token={token}")
    sid = peer.hello["session"]
    for i in range(1, 11):
        peer.send(f"c{i}")
    await peer.read_until(lambda: len(peer.got) >= 20 and peer.acks and peer.acks[-1] == 10, "traffic and acks")
    peer.ack(5)
    await until(lambda: _async(len(numbered.got[sid]) == 10), what="the backend got c1..c10")
    # c11..c13 never leave the client (a library's queue while the network is gone).
    peer.sent += 3
    peer.raw.writer.transport.abort()
    await until(lambda: gone_from(a, sid), what="the session left node A")
    kept = min(len(peer.got), 12)    # it lost some of what it had read too
    del peer.got[kept:]
    await resume_and_count(peer, b.url, f"?access_token={token}&resume={peer.hello['token']}", numbered, 10, 20, 40)


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_resume_right_after_the_drop_waits_for_the_park(gateway, request, numbered, jwt_env, store):
    """The client is back before the old node has written the detached record (it is
    still closing the upstream): the resume waits for it instead of being told 401."""
    a, b = await nodes(gateway, request, store, numbered.url)
    token = jwt_for("hank")
    peer, sid = await with_traffic(a, numbered, token)
    s = session_of(a)
    release = hold_park(a)   # the session is dropped, its record not written, when the resume comes
    asked = record_takeovers(b)
    peer.raw.writer.transport.abort()
    await until(lambda: _async(s.capture is not None), what="dropped, parking")
    resuming = asyncio.ensure_future(
        resume_and_count(peer, b.url, f"?access_token={token}&resume={peer.hello['token']}", numbered, 3, 6, 20))
    await until(lambda: _async(asked), what="the resume asked for the session")
    assert asked == [True] and not resuming.done()   # told to wait: the session is being parked
    release.set()
    await asyncio.wait_for(resuming, 10)


async def test_a_push_to_a_parked_reliable_session_is_replayed_after_the_rest(gateway, numbered, jwt_env, http,
                                                                               monkeypatch):
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "t")
    gw, peer, url = await dropped_session(gateway, numbered)
    sid = peer.hello["session"]
    await until(lambda: _async(numbered.active == 0), what="the old upstream closed")
    await until(lambda: gw.node.cluster.store.detached.get(sid), what="parked")
    async with http.post(f"{gw.admin_url}/v1/connections/{sid}/messages?type=text", data=b"while away",
                         headers={"Authorization": "Bearer t"}) as r:
        assert r.status == 200, await r.text()
        assert (await r.json())["buffered"] == 1
    sent = numbered.sent[sid]   # all of it before the drop's upstream closed
    again = await Peer.connect(gw.url, query=url[len(gw.url) + 3:] + "&last=20")
    await again.read_until(lambda: len(again.got) >= sent - 20 + 1 + 5, "the replay, the push, live ones")
    # The replay, then the push (numbered after it), then the resumed upstream's.
    replay = [f"s{i}".encode() for i in range(21, sent + 1)]
    assert again.got[:len(replay) + 1] == replay + [b"while away"]
    assert again.got[len(replay) + 1:] == [f"s{i}".encode() for i in range(sent + 1, sent + len(again.got) - len(replay))]


# ------------------------------------------------------------ half-open
class Blackhole:
    """A TCP proxy that can stop forwarding without closing anything: what a NAT
    timeout or a dead wifi leaves behind (both ends still think the connection lives)."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.frozen = False
        self.server = None
        self.port = 0
        self.tasks: list[asyncio.Task] = []
        self.writers: list[asyncio.StreamWriter] = []

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _conn(self, reader, writer) -> None:
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        self.writers += [writer, up_writer]
        self.tasks += [asyncio.ensure_future(self._pump(reader, up_writer)),
                       asyncio.ensure_future(self._pump(up_reader, writer))]

    async def _pump(self, reader, writer) -> None:
        while True:
            data = await reader.read(65536)
            if not data:
                writer.close()
                return
            if not self.frozen:      # frozen: what is in flight is lost, nothing is closed
                writer.write(data)

    async def stop(self) -> None:
        for t in self.tasks:
            t.cancel()
        for w in self.writers:
            w.transport.abort()
        self.server.close()


@pytest.mark.parametrize("store", ["memory", "redis"])
async def test_a_half_open_session_is_taken_over_by_the_resume(gateway, request, numbered, jwt_env, store):
    a, b = await nodes(gateway, request, store, numbered.url)
    hole = Blackhole(a.ports[0])
    await hole.start()
    try:
        token = jwt_for("dave")
        peer = await Peer.connect(f"ws://127.0.0.1:{hole.port}", query=f"?access_token={token}")
        sid = peer.hello["session"]
        for i in range(1, 6):
            peer.send(f"c{i}")
        await peer.read_until(lambda: len(peer.got) >= 10, "traffic through the proxy")
        await until(lambda: _async(len(numbered.got[sid]) == 5), what="the backend got c1..c5")
        hole.frozen = True
        peer.send("c6")                       # lost in the network
        sent_before = numbered.sent[sid]
        await until(lambda: _async(numbered.sent[sid] >= sent_before + 20), what="the backend sends on")
        assert not await gone_from(a, sid)     # node A still thinks the old connection lives
        await resume_and_count(peer, b.url, f"?access_token={token}&resume={peer.hello['token']}", numbered, 5, 10,
                               sent_before + 40 - len(peer.got))
        assert await gone_from(a, sid) or a is b
    finally:
        await hole.stop()


async def test_a_keepalive_timeout_parks_a_reliable_session(gateway, numbered, jwt_env):
    cfg = node_cfg("node-a", None, numbered.url)
    cfg["limits"] = {"ping_interval_s": 0.1}
    gw = await gateway(cfg)
    hole = Blackhole(gw.ports[0])
    await hole.start()
    try:
        token = jwt_for("gina")
        peer = await Peer.connect(f"ws://127.0.0.1:{hole.port}", query=f"?access_token={token}")
        sid = peer.hello["session"]
        await peer.read_until(lambda: len(peer.got) >= 200, "traffic through the proxy, pings answered")
        assert not await gone_from(gw, sid)
        hole.frozen = True   # pings unanswered from here
        await until(lambda: gone_from(gw, sid), what="parked after the keepalive timeout")
        last = len(peer.got)
        again = await Peer.connect(gw.url, query=f"?access_token={token}&resume={peer.hello['token']}&last={last}")
        again.got = list(peer.got)
        await again.read_until(lambda: len(again.got) >= last + 20, "the replay and more")
        assert again.got == [f"s{i}".encode() for i in range(1, len(again.got) + 1)]
    finally:
        await hole.stop()


async def test_a_resume_with_a_wrong_token_does_not_cut_a_live_session(gateway, redis_server, numbered, jwt_env):
    a = await gateway(node_cfg("node-a", redis_server.url, numbered.url))
    b = await gateway(node_cfg("node-b", redis_server.url, numbered.url))
    token = jwt_for("erin")
    peer = await Peer.connect(a.url, query=f"?access_token={token}")
    sid = peer.hello["session"]
    forged = f"{sid}.{'x' * 22}"
    raw = await RawClient.connect(f"{b.url}/ws?access_token={token}&resume={forged}&last=0",
                                  {"Sec-WebSocket-Protocol": PROTO})
    assert raw.status == 401
    n = len(peer.got)
    await peer.read_until(lambda: len(peer.got) >= n + 10, "the old connection goes on")
    assert not await gone_from(a, sid)


# ------------------------------------------------------------ refusals
async def refused(url: str, protocols: str | None = PROTO) -> tuple[int, str]:
    raw = await RawClient.connect(url, {"Sec-WebSocket-Protocol": protocols} if protocols else {})
    body = json.loads(await asyncio.wait_for(raw.reader.read(), 5)) if raw.status != 101 else {}
    raw.writer.close()
    return raw.status, body.get("error", "")


async def dropped_session(gateway, numbered, **drain) -> tuple:
    """A reliable session that read 20, acked 10, and lost its connection."""
    cfg = node_cfg("node-a", None, numbered.url)
    cfg["drain"].update(drain)
    gw = await gateway(cfg)
    token = jwt_for("frank")
    peer = await Peer.connect(gw.url, query=f"?access_token={token}")
    await peer.read_until(lambda: len(peer.got) >= 20, "20 read")
    peer.ack(10)
    await until(lambda: _async(session_of(gw).rel.window.first == 11), what="ack taken")
    sid = peer.hello["session"]
    peer.raw.writer.transport.abort()
    await until(lambda: gone_from(gw, sid), what="parked")
    return gw, peer, f"{gw.url}/ws?access_token={token}&resume={peer.hello['token']}"


async def test_resume_refusals_say_why_and_leave_the_session_for_a_right_one(gateway, numbered, jwt_env):
    gw, peer, url = await dropped_session(gateway, numbered)
    status, why = await refused(f"{url}&last=5")             # 6..10 were acked and dropped
    assert status == 410 and why.startswith("resume refused: window"), why
    status, why = await refused(f"{url}&last=100000")
    assert status == 400 and why.startswith("resume refused: last out of range"), why
    status, why = await refused(url)
    assert status == 400 and "last=" in why
    status, why = await refused(f"{url}&last=-1")
    assert status == 400 and "last must be a count" in why
    status, why = await refused(f"{url}&last=12", protocols=None)
    assert status == 400 and PROTO in why
    # None of these took the session: the right resume still gets all it missed.
    again = await Peer.connect(gw.url, query=url[len(gw.url) + 3:] + "&last=12")
    assert again.hello["down"] == 12
    await again.read_until(lambda: len(again.got) >= 30, "the replay from 13")
    assert again.got[:30] == [f"s{i}".encode() for i in range(13, 43)]
    status, why = await refused(f"{url}&last=12")             # single use
    assert status == 410 and "resumed already" in why


async def test_a_replay_buffer_that_overflowed_is_refused_not_half_served(gateway, numbered, jwt_env):
    gw, peer, url = await dropped_session(gateway, numbered, replay_max_messages=5)
    status, why = await refused(f"{url}&last=20")
    assert status == 410 and "overflowed" in why, why


async def test_large_and_fragmented_messages_cross_whole_both_ways(gateway, backend):
    """A client message in three fragments reaches the backend whole without its kind
    byte; the 300 KB echo comes back over many reads, whole, with one."""
    b = await backend(compress=False)
    gw = await gateway(reliable_cfg(b.url))
    peer = await Peer.connect(gw.url)
    big = bytes(range(256)) * 1200
    peer.raw.send_frame(OP_BINARY, b"d" + big[:100_000], fin=False)
    peer.raw.send_frame(frames.OP_CONT, big[100_000:200_000], fin=False)
    peer.raw.send_frame(frames.OP_CONT, big[200_000:], fin=True)
    await peer.read_until(lambda: peer.got, "the echo")
    assert peer.got == [big] and peer.kinds == [OP_BINARY]
    assert b.received[0][1] == big
    assert session_of(gw).rel.window.size == len(big)
