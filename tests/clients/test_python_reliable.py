"""The Python client in reliable mode (docs/reliable.md) against real gateways:
numbered messages both ways through connections cut without a close (an
in-test TCP proxy aborts its sockets, or stops forwarding and leaves them
open), a rolling restart of the nodes and a backend restart; counted at the
client and at the backend: nothing lost, nothing twice, order kept. And what
the gateway refuses: a route without reliable mode, a resume it cannot serve."""

from __future__ import annotations

import asyncio
import itertools
import logging

import pytest
from aiohttp import web

from gateway_client import GatewayClient, ReliableUnavailable, State
from gateway_client.reliable import ACK_EVERY

from ..conftest import proxy_config
from ..helpers import free_port, serve
from ..integration.fleet import Fleet, holds
from ..integration.numbered import NumberedBackend
from .test_python_client import (BOUND_S, FAST, Numbered, Recorder, backend_restart, env, flowing,  # noqa: F401
                                 jwt_for, node_cfg, read, rolling_restart, settle)


def reliable_node(node_id: str, redis_url: str, *endpoints: str, **limits) -> dict:
    cfg = node_cfg(node_id, redis_url, *endpoints, reliable=True)
    if limits:
        cfg["limits"] = limits
    return cfg


def reliable_numbered(sub: str, url, **options) -> Numbered:
    """test_python_client's numbered client, in reliable mode."""
    return Numbered(sub, url, reliable="require", **options)


class Proxy:
    """A TCP proxy between client and gateway. Each new connection goes to the next
    of `targets()` (ports, round robin). `cut()` aborts every socket it holds (the
    client sees its TCP reset, no close frame); `freeze()` stops forwarding on the
    connections it holds and closes nothing (a NAT timeout, a dead wifi): both
    ends think the connection lives. New connections pass as before, unless `held`:
    then they wait (the network is still down) until `held` is cleared."""

    def __init__(self, targets):
        self.targets = targets
        self.picks = itertools.count()
        self.server: asyncio.Server | None = None
        self.port = 0
        self.conns: list[dict] = []
        self.tasks: set[asyncio.Task] = set()
        self.open = asyncio.Event()
        self.open.set()

    @property
    def held(self) -> bool:
        return not self.open.is_set()

    @held.setter
    def held(self, value: bool) -> None:
        if value:
            self.open.clear()
        else:
            self.open.set()

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _conn(self, reader, writer) -> None:
        await self.open.wait()
        ports = self.targets()
        port = ports[next(self.picks) % len(ports)]
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            writer.transport.abort()
            return
        conn = {"writers": [writer, up_writer], "frozen": False}
        self.conns.append(conn)
        for r, w in ((reader, up_writer), (up_reader, writer)):
            task = asyncio.ensure_future(self._pump(conn, r, w))
            self.tasks.add(task)
            task.add_done_callback(self.tasks.discard)

    async def _pump(self, conn: dict, reader, writer) -> None:
        try:
            while data := await reader.read(65536):
                if not conn["frozen"]:
                    writer.write(data)
        except (ConnectionError, OSError):
            pass
        if not conn["frozen"]:
            writer.transport.abort()

    def cut(self) -> int:
        held, self.conns = self.conns, []
        for conn in held:
            for w in conn["writers"]:
                w.transport.abort()
        return len(held)

    def freeze(self) -> int:
        held, self.conns = self.conns, []
        for conn in held:
            conn["frozen"] = True
        self.frozen = held
        return len(held)

    async def stop(self) -> None:
        self.server.close()
        for conn in self.conns + getattr(self, "frozen", []):
            for w in conn["writers"]:
                w.transport.abort()
        for task in list(self.tasks):
            task.cancel()


def one_session(c: Numbered, fleet: Fleet) -> None:
    """Every reconnect of `c` was a resume of its one session (the backend saw one id)."""
    assert c.rec.opens[0] is False and c.rec.opens[1:] and all(c.rec.opens[1:]), c.rec.opens
    assert c.rec.resume_failures == []
    c.session(fleet)


@pytest.fixture
def free_port_url() -> str:
    return f"ws://127.0.0.1:{free_port()}"


@pytest.fixture
async def pair(gateway, redis_server):
    """Two reliable nodes on one Redis in front of a numbered fleet endpoint."""
    fleet = Fleet()
    ep = await fleet.endpoint()
    nodes = [await gateway(reliable_node(f"node-{n}", redis_server.url, ep.url, ping_interval_s=30)) for n in "ab"]
    yield fleet, nodes
    await ep.stop()


# ---------------------------------------------------------------- the mode itself
async def test_reliable_mode_is_invisible_to_the_app_and_to_the_backend(gateway, backend):
    b = await backend()
    gw = await gateway(proxy_config(b.url, route={"reliable": {"ack_every": 4}}))
    client = GatewayClient(gw.url + "/ws", reliable="require", backoff=FAST)
    async with client:
        assert client.reliable
        for i in range(10):
            await client.send(f"m{i}")
        await client.send(b"\x00bin")
        assert await read(client, 11) == [f"m{i}" for i in range(10)] + [b"\x00bin"]   # no kind byte
        # The gateway acked what it took: nothing is kept any more.
        await holds(lambda: client.unacked == 0, BOUND_S, "the window acked")
    assert [d for _, d in b.received] == [f"m{i}" for i in range(10)] + [b"\x00bin"]
    assert "gateway.reliable.v1" not in b.requests[0].get("Sec-WebSocket-Protocol", "")


async def test_the_clients_acks_keep_a_small_gateway_window_flowing(gateway):
    """The gateway's window holds 8 and the client acks every 64 (the hello names no
    ack_every): only its ack_ms timer lets the backend's stream go past 8."""
    numbered = NumberedBackend(interval_s=0.001)
    await numbered.start()
    try:
        gw = await gateway(proxy_config(numbered.url, route={"reliable": {"max_unacked_messages": 8}}))
        async with GatewayClient(gw.url + "/ws", reliable="require", backoff=FAST) as client:
            got = await read(client, 40)
    finally:
        await numbered.stop()
    assert got == [f"s{i}" for i in range(1, 41)]


async def test_prefer_goes_plain_on_a_route_without_it_and_require_says_why(gateway, backend):
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    prefer = GatewayClient(gw.url + "/ws", reliable="prefer", backoff=FAST)
    await prefer.send("queued before connect")
    async with prefer:
        assert not prefer.reliable
        await prefer.send("dplain")
        assert await read(prefer, 2) == ["queued before connect", "dplain"]   # as sent: no kind byte taken
    require = GatewayClient(gw.url + "/ws", reliable="require", backoff=FAST)
    rec = Recorder(require)
    with pytest.raises(ReliableUnavailable, match="did not select gateway.reliable.v1"):
        await require.connect()
    assert require.state is State.CLOSED and isinstance(require.error, ReliableUnavailable)
    assert [type(e) for e in rec.errors] == [ReliableUnavailable]
    await require.close()
    with pytest.raises(ValueError, match="reliable must be"):
        GatewayClient(gw.url + "/ws", reliable="always")    # type: ignore[arg-type]


async def test_a_hello_whose_counts_do_not_match_starts_a_fresh_session_and_says_why():
    """A server speaking the wire format by hand: its first connection sends three `d`
    and drops without a close; the resume (resume= and last=3) gets a hello that
    resumes after message 1 (the server lost state): the client says so and starts a
    new session, where what it sent and did not see acked goes again."""
    seen: list[dict] = []
    got: list[str] = []

    async def ws(request):
        n = len(seen)
        seen.append(dict(request.query))
        resp = web.WebSocketResponse(protocols=["gateway.reliable.v1"])
        await resp.prepare(request)
        down = [0, 1, 0][min(n, 2)]
        await resp.send_str('h{"v": 1, "session": "s", "token": "s.t%d", "up": 0, "down": %d}' % (n, down))
        if n == 0:
            for i in range(1, 4):
                await resp.send_str(f"ds{i}")
            async for msg in resp:
                got.append(msg.data)
                if len(got) == 1:
                    request.transport.abort()    # no close frame: 1006 at the client
        else:
            async for msg in resp:
                got.append(msg.data)
        return resp

    app = web.Application()
    app.router.add_get("/ws", ws)
    runner, port = await serve(app)
    client = GatewayClient(f"ws://127.0.0.1:{port}/ws", reliable="require", backoff=FAST)
    rec = Recorder(client)
    try:
        await client.connect()
        assert await read(client, 3) == ["s1", "s2", "s3"]
        await client.send("c1")              # read all three first: the drop loses none of them
        await holds(lambda: len(seen) == 3 and client.state is State.OPEN, BOUND_S, "a third connection")
        assert seen == [{}, {"resume": "s.t0", "last": "3"}, {}]
        assert rec.resume_failures == ["the gateway resumed after message 1, this client has received 3"]
        assert rec.opens == [False, False]
        await holds(lambda: len(got) == 2, BOUND_S, "c1 sent again on the new session")
        assert got == ["dc1", "dc1"]          # with its kind byte, once per session
    finally:
        await client.close()
        await runner.cleanup()


# ---------------------------------------------------------------- unplanned drops
async def cut_and_park(proxy: Proxy, nodes) -> None:
    """Cut every connection through `proxy` and keep the network down until the
    gateway has let the sessions go (parked), as a real outage does."""
    proxy.held = True
    proxy.cut()
    await holds(lambda: not any(n.node.sessions for n in nodes), BOUND_S, "the sessions parked")
    proxy.held = False


async def test_connections_cut_without_a_close_resume_and_lose_nothing(pair):
    """The proxy aborts the clients' TCP connections (1006 at the client) three times;
    each comes back with resume= and last= to the other node once the network is back."""
    fleet, nodes = pair
    proxy = Proxy(lambda: [n.ports[0] for n in nodes])
    await proxy.start()
    clients = [reliable_numbered(f"cut{i}", proxy.url + "/ws") for i in range(3)]
    try:
        for c in clients:
            await c.start()
        await flowing(clients)
        for cut in range(3):
            assert len(proxy.conns) == len(clients)
            await cut_and_park(proxy, nodes)
            await holds(lambda: all(len(c.rec.opens) == cut + 2 and c.client.state is State.OPEN for c in clients),
                        BOUND_S, f"every client resumed after cut {cut + 1}")
            await flowing(clients)
        await settle(clients, fleet)
    finally:
        for c in clients:
            await c.client.close()
        await proxy.stop()
    for c in clients:
        one_session(c, fleet)
        assert [code for code, _, _ in c.rec.closes[:-1]] == [None] * 3    # no close frame: 1006
        assert [e for e in c.rec.errors if not isinstance(e, (OSError, ConnectionError))] == []
    assert sum(1 for h in fleet.handshakes if h.get("Gateway-Resumed") == "1") == 3 * len(clients)


async def test_a_half_open_connection_is_taken_over_and_loses_nothing(pair, caplog):
    """The proxy stops forwarding and closes nothing: the gateway still holds the
    session on the old connection; the client's missing pong ends it on its side,
    and the resume makes the gateway let the old connection go."""
    fleet, nodes = pair
    proxy = Proxy(lambda: [n.ports[0] for n in nodes])
    await proxy.start()
    c = reliable_numbered("frozen", proxy.url + "/ws", heartbeat_s=0.2)
    caplog.set_level(logging.INFO, logger="gateway.cluster")
    try:
        await c.start()
        await flowing([c])
        sid = c.session(fleet)
        assert proxy.freeze() == 1
        await holds(lambda: len(c.rec.opens) == 2 and c.client.state is State.OPEN, BOUND_S, "resumed")
        await flowing([c])
        await settle([c], fleet)
        assert sum(len(n.node.sessions) for n in nodes) == 1     # the old connection is gone
    finally:
        await c.client.close()
        await proxy.stop()
    one_session(c, fleet)
    assert c.session(fleet) == sid and c.rec.closes[0][0] is None
    assert [r.getMessage() for r in caplog.records if r.name == "gateway.cluster"].count("reliable_takeover") == 1


async def test_a_resume_the_gateway_cannot_serve_is_refused_and_a_fresh_session_says_so(gateway, redis_server):
    """The client stops reading (a full inbox), so the gateway's window fills past the
    replay buffer's bound; after the cut the buffer has overflowed: 410, and the client
    starts a new session with resume_failed naming the reason."""
    fleet = Fleet()
    ep = await fleet.endpoint()
    cfg = reliable_node("node-a", redis_server.url, ep.url)
    cfg["drain"]["replay_max_messages"] = 5
    gw = await gateway(cfg)
    proxy = Proxy(lambda: [gw.ports[0]])
    await proxy.start()
    client = GatewayClient(proxy.url + "/ws", token=jwt_for("slow"), reliable="require", backoff=FAST,
                           max_inbox_messages=1)
    rec = Recorder(client)
    got: list = []
    client.on("message", got.append)
    reader = None
    try:
        await client.connect()
        (first,) = {h["Gateway-Session-Id"] for h in fleet.handshakes}
        await holds(lambda: fleet.sent[first] >= 50, BOUND_S, "the backend sent 50 the client does not read")
        await cut_and_park(proxy, [gw])
        reader = asyncio.ensure_future(read(client, 10**9))   # the client reads again: it sees the cut
        reader.add_done_callback(lambda t: t.cancelled() or t.exception())
        await holds(lambda: len(rec.opens) == 2 and client.state is State.OPEN, BOUND_S, "a fresh session")
        assert len(rec.resume_failures) == 1 and "overflowed" in rec.resume_failures[0], rec.resume_failures
        assert rec.opens == [False, False]
        assert [h.get("Gateway-Resumed") for h in fleet.handshakes] == [None, None]
        (second,) = {h["Gateway-Session-Id"] for h in fleet.handshakes} - {first}
        await holds(lambda: got.count("s1") == 2, BOUND_S, "the new session's first message")
        assert fleet.sent[second] >= 1
    finally:
        if reader is not None:
            reader.cancel()
        await client.close()
        await proxy.stop()
        await ep.stop()


async def test_a_resume_asking_for_what_was_acked_already_is_refused_window(gateway, redis_server, free_port_url):
    """A client that kept its token but not its messages (an app restarted) asks from
    message 1; the gateway trimmed what was acked: 410 window, and a fresh session."""
    fleet = Fleet()
    ep = await fleet.endpoint()
    gw = await gateway(reliable_node("node-a", redis_server.url, ep.url))
    proxy = Proxy(lambda: [gw.ports[0]])
    await proxy.start()
    target = [proxy.url]
    old = GatewayClient(lambda: target[0] + "/ws", token=jwt_for("restarted"), reliable="require", backoff=FAST,
                        iterate=False)
    got: list = []
    old.on("message", got.append)
    new = GatewayClient(gw.url + "/ws", token=jwt_for("restarted"), reliable="require", backoff=FAST)
    rec = Recorder(new)
    try:
        await old.connect()
        await holds(lambda: len(got) > ACK_EVERY, BOUND_S, "more than one ack's worth read")
        (sid,) = {h["Gateway-Session-Id"] for h in fleet.handshakes}
        await holds(lambda: acked(gw, sid) > 1, BOUND_S, "the gateway trimmed what the client acked")
        target[0] = free_port_url                 # the old client's resumes go nowhere
        token = old.reliable_token
        await cut_and_park(proxy, [gw])
        new.resume_token = token
        await new.connect()
        assert len(rec.resume_failures) == 1 and rec.resume_failures[0].startswith("resume refused: window"), \
            rec.resume_failures
        assert rec.opens == [False]
        assert len({h["Gateway-Session-Id"] for h in fleet.handshakes}) == 2
    finally:
        await old.close()
        await new.close()
        await proxy.stop()
        await ep.stop()


def acked(gw, sid: str) -> int:
    """The first number the gateway still keeps for session `sid` (0: not attached here)."""
    for s in gw.node.sessions.values():
        if s.session_id == sid:
            return s.rel.window.first
    return 0


# ---------------------------------------------------------------- planned: nodes and backends
@pytest.mark.parametrize("nodes", ["in_process", "processes"])
async def test_a_rolling_restart_in_reliable_mode_loses_nothing(nodes, gateway, redis_server, http, tmp_path):
    """test_python_client's rolling restart of three nodes, the route and the clients in
    reliable mode: each drain's 1012 token resumes with last=."""
    for c in await rolling_restart(nodes, gateway, redis_server, http, tmp_path, reliable="require"):
        assert c.rec.resume_failures == [] and c.rec.errors == []


async def test_a_backend_restart_in_reliable_mode_is_reattached_and_the_client_stays_open(gateway):
    c = await backend_restart(gateway, reliable="require")
    assert c.rec.resume_failures == [] and c.rec.errors == []
