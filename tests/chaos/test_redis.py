"""The cluster store failing under traffic: Redis stopped and started again, and a
Sentinel failover. Sessions stay up through it; new clients follow `redis.on_outage`
(`serve`: served, /readyz 200 with "store": "unavailable"; `reject_new`: 503 with
Retry-After, /readyz 503); once the store is back, a drain of
node A moves A's sessions to node B with 1012 + resume, nothing lost or twice. B's
own sessions never notice."""

from __future__ import annotations

import asyncio
import time

import aiohttp
import jwt
import orjson
import pytest

from ..conftest import proxy_config
from ..integration.fleet import BOUND_S, Fleet, holds
from ..integration.numbered import NumberedClient, contiguous
from .counts import SCALE, Row

SECRET = "chaos-redis-secret-0123456789abcdef"
N = 3 * SCALE


@pytest.fixture(autouse=True)
def env(monkeypatch):
    monkeypatch.setenv("CHAOS_JWT_SECRET", SECRET)


def url_for(gw, sub: str) -> str:
    tok = jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")
    return f"{gw.url}/ws?access_token={tok}"


def node_cfg(node_id: str, store: dict, backend_url: str) -> dict:
    cfg = proxy_config(backend_url, route={"auth": "required"})
    cfg.update({
        "node_id": node_id,
        "redis": {**store, "heartbeat_s": 0.2, "node_ttl_s": 3, "timeout_s": 0.5, "request_timeout_s": 1},
        "auth": {"jwt": {"algorithms": ["HS256"], "keys": {"secret_env": "CHAOS_JWT_SECRET"},
                         "sources": ["query:access_token"]}},
        "drain": {"timeout_s": 5, "rate_per_s": 1000},
    })
    return cfg


async def store_is(http, gw, state: str, status: int = 200) -> None:
    async def check():
        async with http.get(gw.admin_url + "/readyz") as r:
            return r.status == status and (await r.json())["store"] == state
    await holds_async(check, f"{gw.admin_url} store {state}")


async def holds_async(check, what: str, timeout_s: float = 30):
    from ..helpers import until
    return await until(check, timeout_s, what, interval_s=0.1)


def live_sessions(fleet, clients) -> dict[str, tuple[str, str, str]]:
    """session id -> (node, connection id, subject) of each client's first session, from
    the headers the gateway sent the backend: clients[:N] on node A, the rest on B."""
    out = {}
    for i, _ in enumerate(clients):
        h = next(h for h in fleet.handshakes if h.get("Gateway-Claim-sub") == f"u{i}")
        out[h["Gateway-Session-Id"]] = ("chaos-a" if i < N else "chaos-b", h["Gateway-Connection-Id"], f"u{i}")
    return out


def records_in(redis_client, live: dict[str, tuple[str, str, str]]) -> bool:
    """Redis holds each live session's record and index entries (gateway/store/redis.py:
    session:<id>, conn:<connection>, node:<node>:sessions, sub:<subject>; prefix gw:)."""
    with redis_client() as c:
        for node in {n for n, _, _ in live.values()}:
            members = {m.decode() for m in c.smembers(f"gw:node:{node}:sessions")}
            if not {sid for sid, (n, _, _) in live.items() if n == node} <= members:
                return False
        p = c.pipeline(transaction=False)
        for sid, (node, conn, sub) in live.items():
            p.get(f"gw:session:{sid}")
            p.get(f"gw:conn:{conn}")
            p.hget(f"gw:sub:{sub}", sid)
        got = iter(p.execute())
    for sid, (node, conn, sub) in live.items():
        raw, by_conn, by_sub = next(got), next(got), next(got)
        if raw is None or by_conn != sid.encode() or by_sub != node.encode():
            return False
        rec = orjson.loads(raw)
        if (rec["session"], rec["node"], rec["connection"], rec["sub"]) != (sid, node, conn, sub):
            return False
    return True


async def scenario(gateway, http, record_property, store: dict, fault: str, break_store, mend_store,
                   outage_seen: bool, on_outage: str = "serve", emptied=None):
    """`emptied`: a client of the store when it comes back empty (a restarted
    redis-server): the nodes must write their live sessions into it again."""
    store = {**store, "on_outage": on_outage}
    fleet = Fleet(interval_s=0.005)
    ep = await fleet.endpoint()
    a = await gateway(node_cfg("chaos-a", store, ep.url))
    b = await gateway(node_cfg("chaos-b", store, ep.url))
    stop = asyncio.Event()
    clients, runs = [], []
    for i in range(2 * N):
        node = a if i < N else b
        c = NumberedClient(http, url_for(node, f"u{i}"), interval_s=0.005)
        await c.connect()
        clients.append(c)
        runs.append(asyncio.ensure_future(c.run(stop, next_url=lambda i=i: url_for(b, f"u{i}"))))
    on_a, on_b = clients[:N], clients[N:]
    row = Row(record_property, fault + "; then node A drained (1012 + resume on node B)",
              f"{2 * N} sessions on 2 nodes, numbered both ways every 5 ms")

    async def flowing(cs, more=10):
        marks = [len(c.got) for c in cs]
        await holds(lambda: all(len(c.got) > m + more for c, m in zip(cs, marks)), 30, "traffic flows")

    try:
        await flowing(clients)
        await asyncio.to_thread(break_store)
        if outage_seen:       # a failover may be too quick to see; a stopped Redis is not
            await store_is(http, a, "unavailable", 200 if on_outage == "serve" else 503)
        await flowing(clients)           # sessions stay up through the outage
        late = 0
        if on_outage == "serve":         # a new client is served meanwhile
            extra = NumberedClient(http, url_for(a, "late"))
            await extra.connect()
            assert (await extra.ws.receive(timeout=BOUND_S)).data == "s1"
            await extra.close()
            late = 1
        elif outage_seen:                # reject_new: 503 with Retry-After, the live ones stay
            with pytest.raises(aiohttp.WSServerHandshakeError) as refused:
                await http.ws_connect(url_for(a, "late"))
            assert refused.value.status == 503 and refused.value.headers.get("Retry-After")
        await asyncio.to_thread(mend_store)
        await store_is(http, a, "ok")
        await store_is(http, b, "ok")
        if emptied is not None:          # resync: each node rewrote its live sessions' records
            live = live_sessions(fleet, clients)
            await holds_async(lambda: asyncio.to_thread(records_in, emptied, live),
                              "every live session's record and index entries back in the restarted Redis")
        await flowing(clients)
        drain = asyncio.ensure_future(a.stop())
        await holds(lambda: all(c.resumes == 1 for c in on_a), 30, "A's sessions resumed on B")
        await asyncio.wait_for(drain, 30)
        await flowing(clients)
        # Settle: stop both ways, then every message must have reached its far end.
        fleet.quiet = True
        stop.set()
        sids = []
        for c in clients:
            sid = next(h["Gateway-Session-Id"] for h in fleet.handshakes if f"u{clients.index(c)}" == h.get(
                "Gateway-Claim-sub"))
            sids.append(sid)
        await holds(lambda: all(len(fleet.got[s]) >= c.sent for c, s in zip(clients, sids)), BOUND_S,
                    "the backend got every client message")
        await holds(lambda: all(len(c.got) >= fleet.sent[s] for c, s in zip(clients, sids)), BOUND_S,
                    "every client got the backend's messages")
        for c, s in zip(clients, sids):
            assert contiguous("c", fleet.got[s]) == c.sent
            assert contiguous("s", c.got) == fleet.sent[s]
            row.add("c", c.sent, fleet.got[s])
            row.add("s", fleet.sent[s], c.got)
        for c in on_a:
            assert len(c.closes) == 1 and c.closes[0][0] == 1012 and c.closes[0][1].startswith("resume=")
        assert all(c.closes == [] and c.resumes == 0 for c in on_b)
        resumed = [h for h in fleet.handshakes if h.get("Gateway-Resumed") == "1"]
        assert sorted(h["Gateway-Session-Id"] for h in resumed) == sorted(sids[:N])
        assert len({h["Gateway-Session-Id"] for h in fleet.handshakes}) == 2 * N + late
        row.done("unaffected")
    finally:
        stop.set()
        for c in clients:
            await c.close()
        await asyncio.wait(runs, timeout=10)
        await ep.stop()


@pytest.mark.parametrize("on_outage", ["serve", "reject_new"])
async def test_redis_stopped_and_restarted_under_traffic(gateway, redis_server, http, record_property, on_outage):
    await scenario(gateway, http, record_property, {"url": redis_server.url},
                   f"redis-server stopped under traffic (on_outage: {on_outage}), restarted on the same port",
                   redis_server.stop, redis_server.start, True, on_outage, emptied=redis_server.client)


async def test_sentinel_failover_under_traffic(gateway, sentinel_set, http, record_property):
    addresses = [f"{h}:{p}" for h, p in sentinel_set.addresses]
    await scenario(gateway, http, record_property, {"sentinel": {"master": "m", "addresses": addresses}},
                   "Sentinel failover: the master killed, the replica promoted",
                   sentinel_set.master.stop, sentinel_set.wait_promoted, False)
