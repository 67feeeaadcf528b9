"""The Python client in reliable mode on a route whose backend is `type: http`
(docs/reliable.md, "On an HTTP backend"): a real aiohttp backend answers every
POSTed message with a numbered reply, two or three gateway nodes share a real
redis-server, and the client's connection is cut without a close, frozen
(half-open, taken over on resume), or drained node by node (a rolling restart).
Counted at both ends: the client got every reply once, in order; the backend got
every message once, in order, on one Gateway-Session-Id, the POSTs after the
first resume marked Gateway-Resumed: 1; every reconnect was a resume.

test_python_client's `rolling_restart` is not reused: it builds its own
WebSocket `Fleet` and counts one backend handshake per resume, which an HTTP
backend (no second `connect` after a resume) never has."""

from __future__ import annotations

import asyncio
import collections
import logging

import pytest
from aiohttp import web

from gateway_client import HandshakeRefused, State

from ..helpers import serve
from ..integration.fleet import holds
from .test_python_client import BOUND_S, Numbered, Rollout, env, flowing, node_cfg, settle  # noqa: F401
from .test_python_reliable import Proxy, reliable_numbered


class HttpFleet:
    """A real aiohttp HTTP backend with a numbered answer, keeping its state as
    test_python_client's `settle` reads a `Fleet`: per Gateway-Session-Id, the bodies
    of the messages POSTed (`got`) and the number of the last reply (`sent`). The
    reply to the n-th message of a session is "s<n>". `requests`: every request's
    headers and body, in arrival order. Every `slow_every`-th message is answered
    after `delay_s` (a backend with a slow request now and then; on average it keeps
    up with the clients). While `gate` is clear, messages are recorded on arrival and
    answered only once it is set (a stalled backend: the gateway's queue grows)."""

    def __init__(self, slow_every: int = 20, delay_s: float = 0.01):
        self.slow_every = slow_every
        self.delay_s = delay_s
        self.got: dict[str, list[str]] = collections.defaultdict(list)
        self.sent: dict[str, int] = collections.defaultdict(int)
        self.requests: list[tuple[dict[str, str], str]] = []
        self.quiet = False       # settle() sets it; an HTTP backend only ever answers
        self.gate = asyncio.Event()
        self.gate.set()
        self.runner = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    @property
    def handshakes(self) -> list[dict[str, str]]:
        """For Numbered.session(): each request names its session and subject."""
        return [h for h, _ in self.requests]

    async def start(self) -> "HttpFleet":
        app = web.Application()
        app.router.add_post("/events", self._handle)
        self.runner, self.port = await serve(app)
        return self

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _handle(self, request: web.Request) -> web.Response:
        body = (await request.read()).decode()
        headers = dict(request.headers)
        self.requests.append((headers, body))
        if headers.get("Gateway-Event") != "message":
            return web.Response(status=204)     # connect, disconnect: no message to the client
        sid = headers["Gateway-Session-Id"]
        self.got[sid].append(body)
        n = len(self.got[sid])
        self.sent[sid] = n
        await self.gate.wait()
        if n % self.slow_every == 0:
            await asyncio.sleep(self.delay_s)
        return web.Response(text=f"s{n}")

    async def stalled(self, clients: list[Numbered], n: int = 10) -> None:
        """Stall the backend until each client has `n` messages more queued at the
        gateway (taken and acked, not POSTed yet)."""
        self.gate.clear()
        await holds(lambda: all(c.sent - len(self.got[c.session(self)]) >= n for c in clients), BOUND_S,
                    f"{n} messages queued at the gateway for each client")

    def of(self, sid: str, event: str) -> list[dict[str, str]]:
        return [h for h, _ in self.requests if h.get("Gateway-Session-Id") == sid and h.get("Gateway-Event") == event]


def http_node(node_id: str, redis_url: str, backend_url: str, **limits) -> dict:
    """test_python_client's reliable node (JWT auth, the route's `reliable:` defaults),
    its backend an HTTP one with the connect and disconnect events."""
    cfg = node_cfg(node_id, redis_url, "ws://127.0.0.1:1/unused", reliable=True)
    cfg["backends"] = {"h": {"type": "http", "endpoints": [backend_url], "max_queue": 1000}}
    (route,) = cfg["routes"]
    route["backend"] = "h"
    route["events"] = {"connect": "h", "disconnect": "h"}
    if limits:
        cfg["limits"] = limits
    return cfg


@pytest.fixture
async def http_fleet():
    fleet = await HttpFleet().start()
    yield fleet
    await fleet.stop()


@pytest.fixture
async def http_pair(gateway, redis_server, http_fleet):
    """Two reliable nodes on one Redis in front of the numbered HTTP backend."""
    nodes = [await gateway(http_node(f"node-{n}", redis_server.url, http_fleet.url, ping_interval_s=30))
             for n in "ab"]
    return http_fleet, nodes


def one_http_session(c: Numbered, fleet: HttpFleet) -> str:
    """Every reconnect of `c` was a resume of its one session: the backend saw one
    Gateway-Session-Id and one connect; its message POSTs are unmarked up to some
    point and all carry Gateway-Resumed: 1 after it (the first resume), both parts
    non-empty. Returns the session id."""
    assert c.rec.opens[0] is False and c.rec.opens[1:] and all(c.rec.opens[1:]), c.rec.opens
    assert c.rec.resume_failures == []
    sid = c.session(fleet)
    assert len(fleet.of(sid, "connect")) == 1
    marks = [h.get("Gateway-Resumed") for h in fleet.of(sid, "message")]
    first = marks.index("1")       # ValueError: no POST after a resume
    assert first > 0 and marks == [None] * first + ["1"] * (len(marks) - first), marks
    assert len(marks) == c.sent
    return sid


async def closed(c: Numbered, fleet: HttpFleet, sid: str) -> None:
    """Close the client; the backend gets the session's one disconnect, after its messages."""
    await c.client.close()
    await holds(lambda: fleet.of(sid, "disconnect"), BOUND_S, f"{c.sub}'s disconnect event")
    assert len(fleet.of(sid, "disconnect")) == 1
    last = [h.get("Gateway-Event") for h, _ in fleet.requests if h.get("Gateway-Session-Id") == sid][-1]
    assert last == "disconnect"


# ---------------------------------------------------------------- unplanned drops
@pytest.mark.parametrize("wait", ["parked", "at_once"])
async def test_connections_cut_without_a_close_resume_on_an_http_backend_and_lose_nothing(http_pair, wait):
    """The proxy aborts the clients' TCP connections (1006 at the client) three times,
    each while the backend is stalled with messages queued at the gateway for it (the
    old node POSTs them after the cut). `parked`: the network stays down until both
    nodes have let the sessions go; `at_once`: the clients come back at once, to the
    other node, while the old one may still be parking them and POSTing."""
    fleet, nodes = http_pair
    proxy = Proxy(lambda: [n.ports[0] for n in nodes])
    await proxy.start()
    clients = [reliable_numbered(f"hcut{i}", proxy.url + "/ws") for i in range(3)]
    try:
        for c in clients:
            await c.start()
        await flowing(clients)
        for cut in range(3):
            assert len(proxy.conns) == len(clients)
            await fleet.stalled(clients)
            proxy.held = wait == "parked"
            assert proxy.cut() == len(clients)
            fleet.gate.set()
            if wait == "parked":
                await holds(lambda: not any(n.node.sessions for n in nodes), BOUND_S, "the sessions parked")
                proxy.held = False
            await holds(lambda: all(len(c.rec.opens) == cut + 2 and c.client.state is State.OPEN for c in clients),
                        BOUND_S, f"every client resumed after cut {cut + 1}")
            await flowing(clients)
        await settle(clients, fleet)
        sids = [one_http_session(c, fleet) for c in clients]
        for c in clients:
            assert [code for code, _, _ in c.rec.closes] == [None] * 3    # no close frame: 1006
            assert [e for e in c.rec.errors if not isinstance(e, (OSError, ConnectionError))] == []
        for c, sid in zip(clients, sids):
            await closed(c, fleet, sid)
    finally:
        for c in clients:
            await c.client.close()
        await proxy.stop()


async def test_a_half_open_connection_on_an_http_backend_is_taken_over_and_loses_nothing(http_pair, caplog):
    """The proxy stops forwarding and closes nothing, twice, each while messages are
    queued for the stalled backend: the gateway still holds the session on the old
    connection; the client's missing pong ends it on its side, and the resume makes
    the gateway let the old connection go."""
    fleet, nodes = http_pair
    proxy = Proxy(lambda: [n.ports[0] for n in nodes])
    await proxy.start()
    c = reliable_numbered("hfrozen", proxy.url + "/ws", heartbeat_s=0.2)
    caplog.set_level(logging.INFO, logger="gateway.cluster")
    try:
        await c.start()
        await flowing([c])
        for freeze in range(2):
            await fleet.stalled([c])
            assert proxy.freeze() == 1
            fleet.gate.set()
            await holds(lambda: len(c.rec.opens) == freeze + 2 and c.client.state is State.OPEN, BOUND_S,
                        f"resumed after freeze {freeze + 1}")
            await flowing([c])
        await settle([c], fleet)
        assert sum(len(n.node.sessions) for n in nodes) == 1     # the old connections are gone
        sid = one_http_session(c, fleet)
        assert [code for code, _, _ in c.rec.closes] == [None, None]
        takeovers = [r.getMessage() for r in caplog.records if r.name == "gateway.cluster"].count("reliable_takeover")
        assert takeovers == 2
        await closed(c, fleet, sid)
    finally:
        await c.client.close()
        await proxy.stop()


def seal_pending(e: Exception) -> bool:
    return isinstance(e, HandshakeRefused) and e.status == 503 and "still writing its replay" in str(e)


# ---------------------------------------------------------------- planned: a rolling restart
@pytest.mark.parametrize("nodes", ["in_process", "processes"])
async def test_a_rolling_restart_in_reliable_mode_on_an_http_backend_loses_nothing(
        nodes, gateway, redis_server, http_fleet, http, tmp_path):
    """Three nodes on one Redis; each in turn is replaced: the new one starts, the old
    one drains (in-process: stop(); processes: `gateway run` and SIGTERM; 1012 with a
    resume token) while the backend is stalled with messages queued for it. Five
    clients come back with last= to the nodes still up, while the old node still
    POSTs what it took."""
    fleet = http_fleet
    roll = Rollout(nodes, lambda node_id: http_node(node_id, redis_server.url, fleet.url), gateway, http, tmp_path)
    live = roll.live
    live += [await roll.start(), await roll.start(), await roll.start()]
    clients = [reliable_numbered(f"hroll{i}", roll.url) for i in range(5)]
    try:
        for c in clients:
            await c.start()
        await flowing(clients)
        for old in list(live):
            fresh = await roll.start()       # the replacement is up before the old node goes
            live.remove(old)
            live.append(fresh)
            await fleet.stalled(clients)
            closes = sum(len(c.rec.closes) for c in clients)
            draining = asyncio.ensure_future(roll.drain(old))
            await holds(lambda: sum(len(c.rec.closes) for c in clients) > closes or draining.done(), BOUND_S,
                        "a 1012 from the draining node")
            fleet.gate.set()                 # the old node POSTs its queue while its clients resume
            await draining
            await flowing(clients)
        await settle(clients, fleet)
        for c in clients:
            one_http_session(c, fleet)
            assert c.rec.closes and all(code == 1012 and retry for code, _, retry in c.rec.closes), c.rec.closes
            # A resume that comes while the old node still POSTs what it took is told 503
            # with Retry-After (its replay is not sealed yet) and tried again: nothing else.
            assert c.rec.resume_failures == [] and [e for e in c.rec.errors if not seal_pending(e)] == []
        for c in clients:
            await closed(c, fleet, c.session(fleet))
    finally:
        for c in clients:
            await c.client.close()
        roll.stop()
    roll.check_drains()
