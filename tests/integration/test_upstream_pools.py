"""Endpoint pools: balancing, failover before the upgrade, ejection, health checks."""

from __future__ import annotations

import asyncio
import socket

import aiohttp
import pytest

from ..conftest import proxy_config
from ..helpers import free_port, until


async def test_round_robin_spreads_sessions(gateway, backend, http):
    b1, b2 = await backend(), await backend()
    gw = await gateway(proxy_config(b1.url, b2.url, backend={"balance": "round_robin"}))
    for _ in range(6):
        async with http.ws_connect(gw.url + "/ws"):
            pass
    assert (b1.sessions, b2.sessions) == (3, 3)


async def test_least_connections_prefers_the_idle_endpoint(gateway, backend, http):
    b1, b2 = await backend(), await backend()
    gw = await gateway(proxy_config(b1.url, b2.url, backend={"balance": "least_connections"}))
    held = [await http.ws_connect(gw.url + "/ws") for _ in range(2)]   # one on each
    await held[0].close()
    endpoints = gw.node.routing.pools["b"].endpoints
    await until(lambda: asyncio.sleep(0, sorted(e.active for e in endpoints) == [0, 1]), what="one endpoint freed")
    # Whichever endpoint lost its session is now the least loaded: the next two go there and then alternate.
    freed = b1 if gw.node.routing.pools["b"].endpoints[0].active == 0 else b2
    before = freed.sessions
    extra = await http.ws_connect(gw.url + "/ws")
    assert freed.sessions == before + 1
    await extra.close()
    await held[1].close()


async def test_consistent_hash_on_header_is_sticky(gateway, backend, http):
    bs = [await backend() for _ in range(3)]
    gw = await gateway(proxy_config(*[b.url for b in bs], backend={"balance": "consistent_hash",
                                                                   "hash_on": "header:x-user"}))
    for user in ("alice", "bob", "carol", "dave"):
        counts = [b.sessions for b in bs]
        for _ in range(3):
            async with http.ws_connect(gw.url + "/ws", headers={"X-User": user}):
                pass
        delta = [b.sessions - c for b, c in zip(bs, counts)]
        assert sorted(delta) == [0, 0, 3], (user, delta)


async def test_consistent_hash_on_query_and_ip(gateway, backend, http):
    bs = [await backend() for _ in range(3)]
    gw = await gateway(proxy_config(*[b.url for b in bs], backend={"balance": "consistent_hash", "hash_on": "query:room"}))
    for _ in range(3):
        async with http.ws_connect(gw.url + "/ws?room=42"):
            pass
    assert sorted(b.sessions for b in bs) == [0, 0, 3]


async def test_refused_endpoint_is_skipped_before_the_upgrade(gateway, backend, http):
    good = await backend()
    dead = f"ws://127.0.0.1:{free_port()}/ws"
    gw = await gateway(proxy_config(dead, good.url, backend={"balance": "round_robin"}))
    for _ in range(4):
        async with http.ws_connect(gw.url + "/ws") as ws:
            await ws.send_str("x")
            assert (await ws.receive()).data == "x"
    assert good.sessions == 4


async def test_no_endpoint_answering_is_502(gateway, http):
    gw = await gateway(proxy_config(f"ws://127.0.0.1:{free_port()}/ws", f"ws://127.0.0.1:{free_port()}/ws"))
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await http.ws_connect(gw.url + "/ws")
    assert exc.value.status == 502


async def test_endpoint_that_never_answers_times_out_to_the_next(gateway, backend, http):
    # A listener that accepts TCP but never answers the upgrade.
    silent = socket.socket()
    silent.bind(("127.0.0.1", 0))
    silent.listen(8)
    good = await backend()
    try:
        gw = await gateway(proxy_config(f"ws://127.0.0.1:{silent.getsockname()[1]}/ws", good.url,
                                        backend={"connect_timeout_s": 0.3, "balance": "round_robin"}))
        async with http.ws_connect(gw.url + "/ws") as ws:
            await ws.send_str("x")
            assert (await ws.receive()).data == "x"
    finally:
        silent.close()


async def test_backend_5xx_tries_next_endpoint(gateway, backend, http):
    bad = await backend(status=503)
    good = await backend()
    gw = await gateway(proxy_config(bad.url, good.url, backend={"balance": "round_robin"}))
    for _ in range(2):
        async with http.ws_connect(gw.url + "/ws"):
            pass
    assert good.sessions == 2


async def test_passive_ejection_then_cooldown(gateway, backend, http):
    bad = await backend(status=503)
    good = await backend()
    gw = await gateway(proxy_config(bad.url, good.url, backend={
        "balance": "round_robin", "eject_after_failures": 2, "eject_cooldown_s": 0.5}))
    for _ in range(6):
        async with http.ws_connect(gw.url + "/ws"):
            pass
    # Two failures eject it: after that it is not even tried.
    assert len(bad.requests) == 2

    async def tried_again():
        async with http.ws_connect(gw.url + "/ws"):
            pass
        return len(bad.requests) == 3
    await until(tried_again, what="the ejected endpoint tried again after its cool-down")


async def test_active_health_check_takes_endpoint_out_and_back(gateway, backend, http):
    flaky = await backend(health_status=500)
    good = await backend()
    gw = await gateway(proxy_config(flaky.url, good.url, backend={
        "balance": "round_robin", "health": {"path": "/healthz", "interval_s": 0.1, "unhealthy_after": 2}}))
    await until(lambda: asyncio.sleep(0, not gw.node.routing.pools["b"].endpoints[0].healthy),
                what="the failing endpoint out")
    before = flaky.sessions
    for _ in range(4):
        async with http.ws_connect(gw.url + "/ws"):
            pass
    assert flaky.sessions == before
    flaky.health_status = 200
    await until(lambda: asyncio.sleep(0, gw.node.routing.pools["b"].endpoints[0].healthy),
                what="the endpoint back in")
