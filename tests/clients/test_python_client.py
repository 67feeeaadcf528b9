"""The Python client (clients/python) against real gateways: echo, request/reply,
auth refusals and token refresh, close-code backoff, the outbound queue, and
the no-loss guarantee through gateway drains, a rolling restart of three
nodes and a backend restart, counted at the client and at the backend."""

from __future__ import annotations

import asyncio
import itertools
import json
import signal
import time

import jwt
import pytest

from gateway_client import (Action, AuthRefused, Backoff, ClientClosed, GatewayClient, HandshakeRefused, QueueFull,
                            State, TooManyRequests)

from ..conftest import proxy_config
from ..helpers import free_port, until
from ..integration.fleet import Fleet, holds, on, reattach_config
from ..integration.numbered import contiguous
from ..integration.test_lifecycle import Proc

SECRET = "p" * 64
BOUND_S = 15.0     # only trips on a hang; nothing here is timed
FAST = Backoff(base_s=0.01, max_s=0.05, try_again_min_s=0.05, resume_jitter_s=0.01, retry_after_jitter_s=0.01)


@pytest.fixture(autouse=True)
def env(monkeypatch):
    monkeypatch.setenv("PYCLIENT_JWT_SECRET", SECRET)


def jwt_for(sub: str, ttl_s: float = 3600) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time() + ttl_s)}, SECRET, algorithm="HS256")


def jwt_auth(**jwt_cfg) -> dict:
    return {"jwt": {"algorithms": ["HS256"], "keys": {"secret_env": "PYCLIENT_JWT_SECRET"}, "sources": ["header"],
                    **jwt_cfg}}


def echo_config(**top) -> dict:
    cfg = {"backends": {"echo": {"type": "builtin", "handler": "echo"}},
           "routes": [{"name": "echo", "match": {"path": "/echo"}, "auth": "none", "backend": "echo"}]}
    cfg.update(top)
    return cfg


class Recorder:
    """Every event a client emits, in order."""

    def __init__(self, client: GatewayClient):
        self.states: list[tuple[str, str]] = []
        self.opens: list[bool] = []
        self.closes: list[tuple[int | None, str, bool]] = []
        self.errors: list[BaseException] = []
        self.resume_failures: list[str] = []
        self.dropped: list[int] = []
        client.on("state", lambda old, new: self.states.append((str(old), str(new))))
        client.on("open", self.opens.append)
        client.on("close", lambda code, reason, retry: self.closes.append((code, reason, retry)))
        client.on("error", self.errors.append)
        client.on("resume_failed", self.resume_failures.append)
        client.on("dropped", self.dropped.append)


async def read(client: GatewayClient, n: int) -> list:
    out = []
    async with asyncio.timeout(BOUND_S):
        async for m in client:
            out.append(m)
            if len(out) == n:
                return out
    raise AssertionError(f"iteration ended after {out!r}")


# ---------------------------------------------------------------- basics
async def test_echo_text_and_binary_and_the_events_of_a_life(gateway):
    gw = await gateway(echo_config())
    client = GatewayClient(gw.url + "/echo")
    rec = Recorder(client)
    async with client:
        assert client.state is State.OPEN
        await client.send("hello")
        await client.send(b"\x00\xff")
        assert await read(client, 2) == ["hello", b"\x00\xff"]
    assert client.state is State.CLOSED
    assert rec.states == [("closed", "connecting"), ("connecting", "open"), ("open", "closed")]
    assert rec.opens == [False] and rec.closes == [(1000, "", False)] and rec.errors == []
    assert [m async for m in client] == []           # the iteration has ended
    with pytest.raises(ClientClosed):
        await client.send("late")


async def test_an_event_only_reader_never_fills_the_inbox(gateway):
    gw = await gateway(echo_config())
    got = []
    async with GatewayClient(gw.url + "/echo", iterate=False, max_inbox_messages=2) as client:
        client.on("message", got.append)
        for i in range(20):
            await client.send(f"m{i}")
        await until(lambda: asyncio.sleep(0, len(got) == 20), what="every echo as an event")
        with pytest.raises(RuntimeError, match="iterate=False"):
            await anext(aiter(client))
    assert got == [f"m{i}" for i in range(20)]


async def test_request_reply_matches_replies_by_id_in_any_order(gateway, backend):
    async def reverse(ws, request):
        """Answers requests two at a time, the second first; says "tick" in between."""
        held = []
        async for msg in ws:
            held.append(json.loads(msg.data))
            if len(held) == 2:
                await ws.send_str("tick")
                for req in reversed(held):
                    await ws.send_str(json.dumps({"ref": req["ref"], "echo": req["n"]}))
                held = []

    b = await backend(handler=reverse)
    gw = await gateway(proxy_config(b.url))
    async with GatewayClient(gw.url + "/ws", id_field="ref") as client:
        replies = await asyncio.gather(*(client.request({"n": i}, timeout=BOUND_S) for i in range(6)))
        assert [r["echo"] for r in replies] == list(range(6))
        assert len({r["ref"] for r in replies}) == 6
        assert await read(client, 3) == ["tick"] * 3    # not a reply: an ordinary message
        assert client.pending_requests == 0
        with pytest.raises(ValueError, match="sets the 'ref' field itself"):
            await client.request({"ref": "mine"})


async def test_request_timeout_removes_the_pending_entry_and_pending_is_bounded(gateway, backend):
    async def silent(ws, request):
        async for _ in ws:
            pass

    b = await backend(handler=silent)
    gw = await gateway(proxy_config(b.url))
    async with GatewayClient(gw.url + "/ws", max_pending_requests=2) as client:
        with pytest.raises(TimeoutError):
            await client.request({"q": 1}, timeout=0.05)
        assert client.pending_requests == 0
        waiting = [asyncio.ensure_future(client.request({"q": i}, timeout=BOUND_S)) for i in range(2)]
        await until(lambda: asyncio.sleep(0, client.pending_requests == 2), what="two requests pending")
        with pytest.raises(TooManyRequests, match="max_pending_requests=2"):
            await client.request({"q": 3})
    for w in waiting:   # close() fails what still waits
        with pytest.raises(ClientClosed):
            await w
    await until(lambda: asyncio.sleep(0, len(b.closes) == 1), what="the backend saw the close")


# ---------------------------------------------------------------- auth
def auth_config(backend_url: str, **jwt_cfg) -> dict:
    return proxy_config(backend_url, route={"auth": "required"}, auth=jwt_auth(**jwt_cfg))


async def test_a_refused_token_is_not_retried_without_a_new_one(gateway, backend):
    b = await backend()
    gw = await gateway(auth_config(b.url))
    client = GatewayClient(gw.url + "/ws", token="not-a-jwt", backoff=FAST)
    rec = Recorder(client)
    with pytest.raises(AuthRefused) as refused:
        await client.connect()
    assert refused.value.code == 401
    assert client.state is State.CLOSED and isinstance(client.error, AuthRefused)
    assert [e.status for e in rec.errors if isinstance(e, HandshakeRefused)] == [401]   # one attempt only
    assert b.sessions == 0
    await client.close()


async def test_token_provider_supplies_a_new_token_after_a_401(gateway, backend):
    b = await backend()
    gw = await gateway(auth_config(b.url))
    calls = []

    async def provider() -> str:
        calls.append(1)
        return jwt_for("carol")

    async with GatewayClient(gw.url + "/ws", token="stale", token_provider=provider, backoff=FAST) as client:
        await client.send("hi")
        assert await read(client, 1) == ["hi"]
    assert len(calls) == 1
    assert b.requests[0]["Gateway-Claim-sub"] == "carol"


async def test_a_provider_returning_the_same_token_stops(gateway, backend):
    b = await backend()
    gw = await gateway(auth_config(b.url))
    client = GatewayClient(gw.url + "/ws", token="stale", token_provider=lambda: "stale", backoff=FAST)
    with pytest.raises(AuthRefused):
        await client.connect()
    await client.close()


async def test_token_expiry_1008_retries_only_with_a_fresh_token_from_the_provider(gateway, backend):
    b = await backend()
    gw = await gateway(auth_config(b.url, leeway_s=0))
    tokens = iter([jwt_for("dave", ttl_s=1), jwt_for("dave")])
    client = GatewayClient(gw.url + "/ws", token_provider=lambda: next(tokens), backoff=FAST)
    rec = Recorder(client)
    async with client:
        await until(lambda: asyncio.sleep(0, len(rec.opens) == 2), timeout_s=BOUND_S, what="reopened")
        assert rec.closes == [(1008, "token expired", True)]
        await client.send("still here")
        assert await read(client, 1) == ["still here"]
    assert b.sessions == 2


async def closing(gateway, backend, *closes: tuple[int, str]):
    """A gateway in front of a backend that closes each session at once with the
    next of `closes` (code, reason), then with 1000. Returns (gateway, backend)."""
    left = iter(closes)

    async def close(ws, request):
        code, reason = next(left, (1000, ""))
        await ws.close(code=code, message=reason.encode())

    b = await backend(handler=close)
    return await gateway(proxy_config(b.url)), b


async def test_a_1008_without_a_provider_closes_the_client(gateway, backend):
    gw, b = await closing(gateway, backend, (1008, "rate limit"))
    client = GatewayClient(gw.url + "/ws", backoff=FAST)
    rec = Recorder(client)
    await client.connect()
    await until(lambda: asyncio.sleep(0, client.state is State.CLOSED), what="closed")
    assert rec.closes == [(1008, "rate limit", False)]
    assert isinstance(client.error, AuthRefused) and client.error.code == 1008
    assert b.sessions == 1
    await client.close()


async def test_a_normal_close_from_the_server_is_final_unless_configured(gateway, backend):
    gw, _ = await closing(gateway, backend, (1000, "done"))
    client = GatewayClient(gw.url + "/ws", backoff=FAST)
    await client.connect()
    await until(lambda: asyncio.sleep(0, client.state is State.CLOSED), what="closed")
    assert client.error is None and (client.close_code, client.close_reason) == (1000, "done")
    again = GatewayClient(gw.url + "/ws", backoff=FAST, close_actions={1000: "reconnect"})
    rec = Recorder(again)
    await again.connect()
    await until(lambda: asyncio.sleep(0, len(rec.opens) >= 3), what="reconnected after 1000")
    await again.close()
    assert all(retry for _, _, retry in rec.closes[:2])
    await client.close()


# ---------------------------------------------------------------- backoff
async def test_1013_backs_off_longer_than_other_drops(gateway, backend):
    gw, _ = await closing(gateway, backend, (1013, ""), (1013, ""), (1011, ""), (4000, ""))
    draws = itertools.cycle([0.5])
    client = GatewayClient(gw.url + "/ws", backoff=Backoff(base_s=0.02, max_s=1, try_again_min_s=0.2,
                                                           random=lambda: next(draws)))
    rec = Recorder(client)
    await client.connect()
    await until(lambda: asyncio.sleep(0, client.state is State.CLOSED), timeout_s=BOUND_S, what="the last close")
    assert [c for c, _, _ in rec.closes] == [1013, 1013, 1011, 4000, 1000]
    # attempt 0, 1, 2, 3: uniform draws of 0.5 over windows 0.02, 0.04, 0.08, 0.16; 1013 adds its 0.2 minimum.
    assert list(client.delays) == [("try_later", pytest.approx(0.21)), ("try_later", pytest.approx(0.22)),
                                   ("reconnect", pytest.approx(0.04)), ("reconnect", pytest.approx(0.08))]
    assert rec.states[-1] == ("open", "closed") and rec.states.count(("open", "reconnecting")) == 4
    await client.close()


@pytest.mark.parametrize("step_s, windows", [(0.0, [0.02, 0.04, 0.08]), (10.0, [0.02, 0.02, 0.02])])
async def test_the_attempt_counter_resets_once_a_connection_stayed_open(gateway, backend, step_s, windows):
    """With an injected clock: connections that lasted stable_after_s (5 s) start the backoff over."""
    gw, _ = await closing(gateway, backend, (1011, ""), (1011, ""), (1011, ""))
    ticks = itertools.count(0.0, step_s)
    client = GatewayClient(gw.url + "/ws", clock=lambda: next(ticks),
                           backoff=Backoff(base_s=0.02, max_s=1, random=lambda: 0.5))
    await client.connect()
    await until(lambda: asyncio.sleep(0, client.state is State.CLOSED), timeout_s=BOUND_S, what="the final 1000")
    assert list(client.delays) == [("reconnect", pytest.approx(w / 2)) for w in windows]
    await client.close()


async def test_a_503_with_retry_after_is_waited_out_with_jitter(gateway):
    gw = await gateway(echo_config(limits={"max_connections": 0}))   # every upgrade: 503, Retry-After: 5
    draws = itertools.cycle([0.5])
    client = GatewayClient(gw.url + "/echo", backoff=Backoff(max_s=0.3, retry_after_jitter_s=0.1,
                                                             random=lambda: next(draws)))
    rec = Recorder(client)
    connecting = asyncio.ensure_future(client.connect())
    await until(lambda: asyncio.sleep(0, len(client.delays) >= 2), what="two refusals")
    assert list(client.delays)[:2] == [("retry_after", pytest.approx(0.35))] * 2   # min(5, max_s) + 0.5 * 0.1
    assert {e.status for e in rec.errors} == {503} and client.state is State.CONNECTING
    await client.close()
    with pytest.raises(ClientClosed):
        await connecting


# ---------------------------------------------------------------- the outbound queue
async def test_queued_messages_go_out_in_order_on_open_before_new_ones(gateway):
    port = free_port()
    client = GatewayClient(f"ws://127.0.0.1:{port}/echo", backoff=FAST, max_queue_messages=3,
                           overflow="drop_oldest")
    rec = Recorder(client)
    connecting = asyncio.ensure_future(client.connect())
    await until(lambda: asyncio.sleep(0, len(rec.errors) >= 1), what="a refused connection")
    for i in range(5):
        await client.send(f"q{i}")
    assert client.queued == 3 and client.dropped == 2 and rec.dropped == [1, 1]
    await gateway(echo_config(listen={"host": "127.0.0.1", "port": port}))
    await asyncio.wait_for(connecting, BOUND_S)
    await client.send("new")
    assert await read(client, 4) == ["q2", "q3", "q4", "new"]
    assert client.queued == 0
    await client.close()


async def test_a_full_queue_raises_with_the_raise_policy(gateway):
    port = free_port()
    client = GatewayClient(f"ws://127.0.0.1:{port}/echo", backoff=FAST, max_queue_messages=10, max_queue_bytes=8)
    connecting = asyncio.ensure_future(client.connect())
    await client.send("1234")
    await client.send(b"5678")
    with pytest.raises(QueueFull, match="max 10 messages, 8 bytes"):
        await client.send("9")
    assert client.queued == 2 and client.dropped == 0
    await gateway(echo_config(listen={"host": "127.0.0.1", "port": port}))
    await asyncio.wait_for(connecting, BOUND_S)
    assert await read(client, 2) == ["1234", b"5678"]
    await client.close()


# ---------------------------------------------------------------- no loss: drains, rolling restarts, backends
def node_cfg(node_id: str, redis_url: str, *endpoints: str, reliable: bool = False) -> dict:
    """`reliable`: the route has `reliable:` (the doc's defaults)."""
    route = {"auth": "required", **({"reliable": None} if reliable else {})}
    cfg = reattach_config(*endpoints, route=route, auth=jwt_auth())
    cfg.update({
        "node_id": node_id,
        "redis": {"url": redis_url, "heartbeat_s": 0.2, "node_ttl_s": 1, "timeout_s": 0.5},
        "drain": {"timeout_s": 5, "rate_per_s": 1000},
    })
    return cfg


class Numbered:
    """A GatewayClient sending "c1", "c2", ... and recording what it receives.

    A message counts as sent once client.send() returned: from then on the
    client owes its delivery (written, or queued for the next connection)."""

    def __init__(self, sub: str, url, interval_s: float = 0.003, **options):
        self.sub = sub
        self.client = GatewayClient(url, token=jwt_for(sub), backoff=FAST, **options)
        self.rec = Recorder(self.client)
        self.interval_s = interval_s
        self.sent = 0
        self.got: list = []
        self.stop = asyncio.Event()

    async def start(self) -> None:
        await self.client.connect()
        self.reader = asyncio.ensure_future(self._read())
        self.sender = asyncio.ensure_future(self._send())

    async def _read(self) -> None:
        async for m in self.client:
            self.got.append(m)

    async def _send(self) -> None:
        while not self.stop.is_set():
            await self.client.send(f"c{self.sent + 1}")
            self.sent += 1
            await asyncio.sleep(self.interval_s)

    async def stop_sending(self) -> None:
        self.stop.set()
        await self.sender   # raises whatever send() raised

    def session(self, fleet: Fleet) -> str:
        sids = {h["Gateway-Session-Id"] for h in fleet.handshakes if h.get("Gateway-Claim-sub") == self.sub}
        assert len(sids) == 1, f"{self.sub} had sessions {sids}: one of its resumes started over"
        return sids.pop()


async def settle(clients: list[Numbered], fleet: Fleet) -> None:
    """Stop the traffic both ways and check every stream at both ends: each message
    arrived once, in order, and nothing is missing (the counts are equal)."""
    for c in clients:
        await c.stop_sending()
    fleet.quiet = True
    for c in clients:
        sid = c.session(fleet)
        await holds(lambda: len(fleet.got[sid]) >= c.sent and c.client.queued == 0, BOUND_S,
                    f"the backend got {c.sub}'s {c.sent} messages")
        await holds(lambda: len(c.got) >= fleet.sent[sid], BOUND_S, f"{c.sub} got the backend's messages")
        assert contiguous("c", fleet.got[sid]) == c.sent
        assert contiguous("s", c.got) == fleet.sent[sid]
        assert c.rec.resume_failures == []


async def flowing(clients: list[Numbered], n: int = 10) -> None:
    marks = [(len(c.got), c.sent) for c in clients]
    await holds(lambda: all(len(c.got) >= g + n and c.sent >= s + n for c, (g, s) in zip(clients, marks)),
                BOUND_S, "traffic flows both ways")


async def test_a_drained_client_resumes_on_another_node_and_nothing_is_lost_or_doubled(gateway, redis_server):
    fleet = Fleet()
    ep = await fleet.endpoint()
    a = await gateway(node_cfg("node-a", redis_server.url, ep.url))
    b = await gateway(node_cfg("node-b", redis_server.url, ep.url))
    live = [a]
    c = Numbered("alice", lambda: live[0].url + "/ws")
    try:
        await c.start()
        await flowing([c])
        live[0] = b
        await a.stop()                       # drain: 1012 + token, the client comes back to B
        await holds(lambda: c.rec.opens == [False, True] and len(b.node.sessions) == 1, BOUND_S, "resumed on B")
        await flowing([c])
        await settle([c], fleet)
        ((code, reason, retry),) = c.rec.closes
        assert code == 1012 and reason.startswith("resume=") and retry
        assert [h.get("Gateway-Resumed") for h in fleet.handshakes] == [None, "1"]
        assert ("open", "reconnecting") in c.rec.states and ("reconnecting", "open") in c.rec.states
        assert c.client.attempt == 0
        # The token is single use: presented again, it is refused and the client starts over, saying so.
        again = GatewayClient(b.url + "/ws", token=jwt_for("alice"), backoff=FAST)
        again.resume_token = reason.removeprefix("resume=")
        rec = Recorder(again)
        async with again:
            pass
        assert rec.resume_failures == ["resume refused: the session was resumed already; start a new session"]
        assert rec.opens == [False]
    finally:
        await c.client.close()
        await ep.stop()


@pytest.mark.parametrize("nodes", ["in_process", "processes"])
async def test_a_rolling_restart_of_three_nodes_loses_nothing(nodes, gateway, redis_server, http, tmp_path):
    await rolling_restart(nodes, gateway, redis_server, http, tmp_path)


class Rollout:
    """Gateway nodes made from `make_cfg(node_id)`, in this process or as `gateway run`
    processes (`nodes`), for a rolling restart: `start()` adds one, `drain(node)` lets one
    go as an operator would (in-process: stop(); processes: SIGTERM), `url()` picks the
    live nodes in turn."""

    def __init__(self, nodes: str, make_cfg, gateway, http, tmp_path):
        self.nodes, self.make_cfg, self.gateway, self.http, self.tmp_path = nodes, make_cfg, gateway, http, tmp_path
        self.made = itertools.count()
        self.pick = itertools.count()
        self.procs: list[Proc] = []
        self.live: list = []

    async def start(self):
        cfg = self.make_cfg(f"n{next(self.made)}")
        if self.nodes == "in_process":
            return await self.gateway(cfg)
        p = Proc(self.tmp_path, cfg, name=cfg["node_id"])
        self.procs.append(p)
        await p.ready(self.http)
        return p

    async def drain(self, node) -> None:
        if self.nodes == "in_process":
            await node.stop()
            assert not node.node.sessions
        else:
            node.p.send_signal(signal.SIGTERM)
            assert await node.wait(30) == 0

    def url(self) -> str:
        return self.live[next(self.pick) % len(self.live)].url + "/ws"

    def stop(self) -> None:
        for p in self.procs:
            p.stop()

    def check_drains(self) -> None:
        """The first three processes drained with every buffer sealed (nothing to check in-process)."""
        if self.procs:
            drained = [e for p in self.procs[:3] for e in p.logs() if e["event"] == "drain_done"]
            assert len(drained) == 3 and all(e["buffers_unsealed"] == 0 for e in drained), drained


async def rolling_restart(nodes: str, gateway, redis_server, http, tmp_path, **options) -> list[Numbered]:
    """Three nodes on one Redis; each in turn is replaced: the new one starts, the old
    one drains (in-process: stop(); processes: `gateway run` and SIGTERM). `options`:
    the clients' (reliable=: the route has reliable: too). Returns the clients, settled."""
    fleet = Fleet()
    ep = await fleet.endpoint()
    roll = Rollout(nodes, lambda node_id: node_cfg(node_id, redis_server.url, ep.url, reliable="reliable" in options),
                   gateway, http, tmp_path)
    live = roll.live
    live += [await roll.start(), await roll.start(), await roll.start()]
    clients = [Numbered(f"u{i}", roll.url, **options) for i in range(5)]
    try:
        for c in clients:
            await c.start()
        await flowing(clients)
        for old in list(live):
            fresh = await roll.start()       # the replacement is up before the old node goes
            live.remove(old)
            live.append(fresh)
            await roll.drain(old)
            await flowing(clients)
        await settle(clients, fleet)
    finally:
        for c in clients:
            await c.client.close()
        await ep.stop()
        roll.stop()
    for c in clients:
        assert c.rec.opens[0] is False and c.rec.opens[1:] and all(c.rec.opens[1:]), c.rec.opens
        assert all(code == 1012 and retry for code, _, retry in c.rec.closes[:-1]), c.rec.closes
    resumes = sum(len(c.rec.opens) - 1 for c in clients)
    assert sum(1 for h in fleet.handshakes if h.get("Gateway-Resumed") == "1") == resumes
    roll.check_drains()
    return clients


async def test_a_backend_restart_is_reattached_and_the_client_stays_open(gateway):
    await backend_restart(gateway)


async def backend_restart(gateway, **options) -> Numbered:
    """One backend endpoint of two restarts under the traffic; the client, with `options`
    (reliable=: the route has reliable: too), does not even see it. Returns it, settled."""
    fleet = Fleet()
    e1, e2 = await fleet.endpoint(), await fleet.endpoint()
    route = {"auth": "required", **({"reliable": None} if "reliable" in options else {})}
    gw = await gateway(reattach_config(e1.url, e2.url, route=route, auth=jwt_auth()))
    c = Numbered("erin", gw.url + "/ws", **options)
    try:
        await c.start()
        await flowing([c])
        old = e1 if on(gw, e1.url) else e2
        await old.restart()                  # 1012 from the backend: the gateway moves the session
        await holds(lambda: on(gw, (e2 if old is e1 else e1).url) == 1, BOUND_S, "moved to the other endpoint")
        await flowing([c])
        await settle([c], fleet)
    finally:
        await c.client.close()
        await e1.stop()
        await e2.stop()
    assert c.rec.opens == [False] and c.rec.closes == [(1000, "", False)]
    assert c.rec.states == [("closed", "connecting"), ("connecting", "open"), ("open", "closed")]
    return c


async def test_a_refused_resume_starts_a_fresh_session_and_says_so(gateway, backend):
    b = await backend()
    gw = await gateway(auth_config(b.url))
    client = GatewayClient(gw.url + "/ws", token=jwt_for("frank"), backoff=FAST)
    client.resume_token = "x" * 16 + "." + "y" * 22     # well formed, but no such session
    rec = Recorder(client)
    async with client:
        await client.send("fresh")
        assert await read(client, 1) == ["fresh"]
    assert rec.resume_failures == ["resume refused: unknown session (token forged, or forgotten since)"]
    assert rec.opens == [False] and b.sessions == 1
    assert "Gateway-Resumed" not in b.requests[0]
