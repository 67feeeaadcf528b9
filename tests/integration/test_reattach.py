"""Reattach (DESIGN 7, backend rolling updates): a session whose endpoint goes
away (drained through the API, removed on reload, closed with 1001/1012,
failing its health checks) moves to another endpoint and the client never
notices. Numbered messages both ways, under continuous traffic, through a
real gateway to raw backends that account for every frame (fleet.py)."""

from __future__ import annotations

import asyncio

import pytest
import yaml
from aiohttp import WSMsgType

from gateway import config, frames
from gateway.session import Link
from gateway.store import MemoryStore, RedisStore

from ..conftest import proxy_config
from ..helpers import RawClient, until
from .fleet import BOUND_S, Fleet, api, clients, close, holds, on, reattach_config, settle, traffic


async def two_nodes(http, gw) -> bool:
    status, body = await api(http, gw, "GET", "/v1/nodes")
    return status == 200 and len(body["nodes"]) == 2


def awaiting(task) -> list[str]:
    """The coroutines `task` is suspended in, outermost first."""
    names, coro = [], task.get_coro()
    while coro is not None and hasattr(coro, "cr_code"):
        names.append(coro.cr_code.co_name)
        coro = coro.cr_await
    return names


# ------------------------------------------------------------ drain through the API
async def test_drained_endpoint_moves_its_session_and_the_client_sees_nothing(gateway, http):
    fleet = Fleet()
    a, b = await fleet.endpoint(), await fleet.endpoint()
    gw = await gateway(reattach_config(a.url, b.url))
    try:
        cs, sids = await clients(http, gw, 1)
        s = next(iter(gw.node.sessions.values()))
        first = s.endpoint.url
        other = b.url if first == a.url else a.url
        await traffic(cs)
        status, body = await api(http, gw, "POST", "/v1/backends/b/endpoints/drain", {"endpoint": first})
        assert status == 202 and body["moving"] == 1, body
        await holds(lambda: s.endpoint is not None and s.endpoint.url == other, BOUND_S, "the session moved")
        await traffic(cs)
        await settle(cs, fleet, sids)
        resumed = [h for h in fleet.handshakes if h["Gateway-Session-Id"] == sids[0]]
        assert [h.get("Gateway-Resumed") for h in resumed] == [None, "1"]
        assert resumed[0]["Gateway-Connection-Id"] == resumed[1]["Gateway-Connection-Id"] == s.id
    finally:
        for c in cs:
            await close(c)
        await a.stop()
        await b.stop()


# ------------------------------------------------------------ a rolling replacement, three ways
def reload(gw, cfg: dict) -> None:
    """Apply `cfg` as a reload would (the fixture's gateway has no file; test_reload.py reloads files)."""
    cfg = dict(cfg, listen={"host": "127.0.0.1", "port": 0}, admin={"host": "127.0.0.1", "port": 0},
               drain={"timeout_s": 2})
    gw.node.reload(config.parse(yaml.safe_dump(cfg), source=gw.cfg.source))


@pytest.mark.parametrize("how", ["api_drain", "backend_restart", "reload"])
async def test_rolling_replacement_of_every_endpoint_loses_nothing(gateway, http, how):
    fleet = Fleet()
    old = [await fleet.endpoint(), await fleet.endpoint()]
    new = [await fleet.endpoint(), await fleet.endpoint()]
    olds, news = [e.url for e in old], [e.url for e in new]
    gw = await gateway(reattach_config(*olds))
    cs, sids = await clients(http, gw, 6)
    try:
        assert all(on(gw, u) == 3 for u in olds)
        await traffic(cs)
        if how == "reload":
            reload(gw, reattach_config(*news))          # both old endpoints go at once
        else:
            reload(gw, reattach_config(*olds, *news))   # surge: the new ones come first
            for ep in old:                                    # then the old ones go, one after the other
                await traffic(cs)
                if how == "api_drain":
                    there = on(gw, ep.url)
                    status, body = await api(http, gw, "POST", "/v1/backends/b/endpoints/drain", {"endpoint": ep.url})
                    assert (status, body["moving"]) == (202, there), body
                else:
                    await ep.restart(1012)
                await holds(lambda: on(gw, ep.url) == 0, BOUND_S, f"no session left on {ep.url}")
            reload(gw, reattach_config(*news))
        await holds(lambda: sum(on(gw, u) for u in news) == 6, BOUND_S, "every session on a new endpoint")
        await traffic(cs)
        await settle(cs, fleet, sids)
        assert sum(e.sessions for e in new) == 6
        if how == "backend_restart":
            assert all(set(e.closes) == {1012} for e in old)   # the answers to their own closes
        else:
            assert all(set(e.closes) == {1001} for e in old)   # "session moved"
    finally:
        for c in cs:
            await close(c)
        for e in old + new:
            await e.stop()


async def test_an_old_upstream_that_never_answers_is_let_go_after_close_timeout(gateway, http):
    fleet = Fleet()
    a, b = await fleet.endpoint(), await fleet.endpoint()
    a.answers = False
    gw = await gateway(reattach_config(a.url, b.url, limits={"close_timeout_s": 0.5}))
    cs, sids = await clients(http, gw, 1)
    try:
        assert on(gw, a.url) == 1
        await traffic(cs)
        status, _ = await api(http, gw, "POST", "/v1/backends/b/endpoints/drain", {"endpoint": a.url})
        assert status == 202
        await holds(lambda: on(gw, b.url) == 1, BOUND_S, "the session moved once the old upstream was cut")
        await traffic(cs)
        await settle(cs, fleet, sids)
        assert a.closes == [1001] and not a.conns
    finally:
        for c in cs:
            await close(c)
        await a.stop()
        await b.stop()


# ------------------------------------------------------------ the other triggers
async def test_failing_health_checks_move_the_session(gateway, http):
    fleet = Fleet()
    a, b = await fleet.endpoint(), await fleet.endpoint()
    health = {"path": "/healthz", "interval_s": 0.05, "unhealthy_after": 2, "timeout_s": 1}
    gw = await gateway(proxy_config(a.url, b.url, backend={"on_upstream_close": "reattach", "health": health}))
    cs, sids = await clients(http, gw, 2)
    try:
        assert on(gw, a.url) == on(gw, b.url) == 1
        await traffic(cs)
        a.healthy = False
        await holds(lambda: on(gw, b.url) == 2, BOUND_S, "both sessions on the healthy endpoint")
        await traffic(cs)
        await settle(cs, fleet, sids)
        assert a.closes == [1001]
    finally:
        for c in cs:
            await close(c)
        await a.stop()
        await b.stop()


@pytest.mark.parametrize("how", ["backend_restart", "api_drain"])
async def test_no_endpoint_left_closes_the_client_with_1011(gateway, http, how):
    fleet = Fleet()
    a = await fleet.endpoint()
    gw = await gateway(reattach_config(a.url))
    cs, _ = await clients(http, gw, 1)
    try:
        await traffic(cs)
        if how == "backend_restart":
            await a.restart(1012)
        else:
            status, _ = await api(http, gw, "POST", "/v1/backends/b/endpoints/drain", {"endpoint": a.url})
            assert status == 202
        await holds(lambda: cs[0].closes, BOUND_S, "the client closed")
        assert cs[0].closes[0][0] == 1011
        await holds(lambda: not gw.node.sessions, BOUND_S, "the session ended")
    finally:
        for c in cs:
            await close(c)
        await a.stop()


async def test_a_drain_whose_other_endpoints_do_not_answer_keeps_the_session_where_it_is(gateway, http):
    """Make before break: the old upstream still works, so a move that finds no
    endpoint answering (down, overloaded) leaves the session there, open, not 1011."""
    fleet = Fleet()
    a, b = await fleet.endpoint(), await fleet.endpoint()
    gw = await gateway(reattach_config(a.url, b.url))
    cs, _ = await clients(http, gw, 1)
    try:
        first, other = (a, b) if on(gw, a.url) else (b, a)
        await other.stop()                       # dials to it are refused
        await traffic(cs)
        status, _ = await api(http, gw, "POST", "/v1/backends/b/endpoints/drain", {"endpoint": first.url})
        assert status == 202
        s = next(iter(gw.node.sessions.values()))
        await holds(lambda: s.redial.task is not None and s.redial.task.done(), BOUND_S, "the move gave up")
        marks = len(cs[0].got)
        await holds(lambda: len(cs[0].got) > marks + 10, BOUND_S, "traffic goes on through the old endpoint")
        assert not cs[0].closes and on(gw, first.url) == 1
    finally:
        for c in cs:
            await close(c)
        await a.stop()
        await b.stop()


async def test_client_frames_over_the_hold_close_the_session_with_1013(gateway, http):
    fleet = Fleet()
    a, slow = await fleet.endpoint(), await fleet.endpoint()
    slow.upgrades = asyncio.Event()   # the next endpoint takes its time to answer the upgrade
    gw = await gateway(reattach_config(a.url, slow.url, limits={"send_buffer_bytes": 65536}))
    try:
        async with http.ws_connect(gw.url + "/ws") as ws:
            await holds(lambda: on(gw, a.url) == 1, BOUND_S, "the session is on the first endpoint")
            await a.restart(1012)
            s = next(iter(gw.node.sessions.values()))
            assert s.upstream.link is Link.DETACHED and s.held is not None   # held, not closed
            for i in range(10):
                await ws.send_bytes(bytes([i]) * 10_000)   # 100 KB against a 64 KiB hold
            msg = await ws.receive(timeout=BOUND_S)
            while msg.type is WSMsgType.TEXT:   # what the first endpoint sent before its restart
                msg = await ws.receive(timeout=BOUND_S)
            assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1013)
        slow.upgrades.set()
        await holds(lambda: not gw.node.sessions, BOUND_S, "the session ended")
    finally:
        slow.upgrades.set()
        await a.stop()
        await slow.stop()


async def test_a_fragmented_client_message_is_not_split_across_upstreams(gateway, backend):
    a, b = await backend(), await backend()
    gw = await gateway(reattach_config(a.url, b.url))
    c = await RawClient.connect(gw.url + "/ws")
    try:
        c.send_frame(frames.OP_TEXT, b"hel", fin=False)
        await holds(lambda: gw.node.sessions and next(iter(gw.node.sessions.values())).c_msg, BOUND_S,
                    "the first fragment reached the gateway")
        s = next(iter(gw.node.sessions.values()))
        first, other = (a, b) if s.endpoint.url == a.url else (b, a)
        assert s.redial.move(s, "test")
        # The move has dialled the other endpoint and now waits for the message to end.
        await holds(lambda: "_until" in awaiting(s.redial.task) and other.sessions, BOUND_S,
                    "the move waiting for a message boundary")
        assert s.upstream.link is Link.ATTACHED and s.endpoint.url == first.url
        c.send_frame(frames.OP_CONT, b"lo", fin=False)
        c.send_frame(frames.OP_CONT, b"!", fin=True)
        await holds(lambda: s.endpoint is not None and s.endpoint.url == other.url, BOUND_S, "the session moved")
        c.send_frame(frames.OP_TEXT, b"next")
        await holds(lambda: other.received, BOUND_S, "the next message reached the other endpoint")
        assert first.received == [(WSMsgType.TEXT, "hello!")]
        assert other.received == [(WSMsgType.TEXT, "next")]
    finally:
        c.close()


async def test_an_upstream_closing_in_the_middle_of_a_client_message_gets_all_of_it(gateway):
    fleet = Fleet()
    a, b = await fleet.endpoint(), await fleet.endpoint()
    gw = await gateway(reattach_config(a.url, b.url))
    c = await RawClient.connect(gw.url + "/ws")
    try:
        await holds(lambda: on(gw, a.url) == 1, BOUND_S, "the session is on the first endpoint")
        s = next(iter(gw.node.sessions.values()))
        c.send_frame(frames.OP_TEXT, b"hel", fin=False)
        await holds(lambda: s.c_msg, BOUND_S, "the first fragment reached the gateway")
        restart = asyncio.ensure_future(a.restart(1012))
        await holds(lambda: s.move is not None, BOUND_S, "the upstream's close reached the gateway")
        assert s.held is None and not restart.done()   # the rest of the message still goes to it
        c.send_frame(frames.OP_CONT, b"lo", fin=True)
        await asyncio.wait_for(restart, BOUND_S)      # answered at the message's end
        await holds(lambda: on(gw, b.url) == 1, BOUND_S, "the session moved")
        c.send_frame(frames.OP_TEXT, b"next")
        await holds(lambda: fleet.got[s.session_id] == ["hello", "next"], BOUND_S, "both messages arrived")
        assert a.closes == [1012]
    finally:
        c.close()
        await a.stop()
        await b.stop()


async def test_a_close_backend_keeps_todays_behaviour(gateway, http):
    fleet = Fleet()
    a, b = await fleet.endpoint(), await fleet.endpoint()
    gw = await gateway(proxy_config(a.url, b.url))   # on_upstream_close: close (the default)
    cs, _ = await clients(http, gw, 2)
    try:
        first, second = (a, b) if on(gw, a.url) else (b, a)
        # A drained endpoint takes no new sessions; its sessions stay where they are.
        status, body = await api(http, gw, "POST", "/v1/backends/b/endpoints/drain", {"endpoint": first.url})
        assert (status, body["moving"]) == (202, 0)
        more, _ = await clients(http, gw, 2)
        cs += more
        assert (on(gw, first.url), on(gw, second.url)) == (1, 3)
        # A 1012 from the backend reaches the client, as it is.
        await first.restart(1012)
        await holds(lambda: cs[0].closes, BOUND_S, "the client of the restarted endpoint closed")
        assert cs[0].closes[0][0] == 1012 and not any(c.closes for c in cs[1:])
    finally:
        for c in cs:
            await close(c)
        await a.stop()
        await b.stop()


# ------------------------------------------------------------ the drain state, cluster-wide
def node_config(node_id: str, redis_url: str, *urls: str) -> dict:
    return reattach_config(*urls, node_id=node_id,
                           redis={"url": redis_url, "heartbeat_s": 0.2, "node_ttl_s": 1, "request_timeout_s": 1,
                                  "timeout_s": 0.5})


async def test_an_endpoint_drain_reaches_every_node(gateway, redis_server, http):
    fleet = Fleet()
    a, b = await fleet.endpoint(), await fleet.endpoint()
    g1 = await gateway(node_config("d1", redis_server.url, a.url, b.url))
    g2 = await gateway(node_config("d2", redis_server.url, a.url, b.url))
    c1, s1 = await clients(http, g1, 2)
    c2, s2 = await clients(http, g2, 2)
    try:
        assert on(g1, a.url) == on(g2, a.url) == 1
        await until(lambda: two_nodes(http, g1), BOUND_S, "node 1 sees node 2 in the store")
        # Drained through node 1: node 2 hears it on the bus and moves its session too.
        status, body = await api(http, g1, "POST", "/v1/backends/b/endpoints/drain", {"endpoint": a.url})
        assert (status, body["moving"], body.get("unconfirmed_nodes")) == (202, 2, None), body
        await holds(lambda: on(g1, a.url) == on(g2, a.url) == 0, BOUND_S, "no session left on the drained endpoint")
        assert g2.node.routing.pools["b"].draining == {a.url}
        await settle(c1 + c2, fleet, s1 + s2)
        # A node that starts later reads it from the store at its first heartbeat.
        g3 = await gateway(node_config("d3", redis_server.url, a.url, b.url))
        await holds(lambda: g3.node.routing.pools["b"].draining == {a.url}, BOUND_S, "the third node knows")
        # Undrained: every node may choose it again.
        status, body = await api(http, g2, "DELETE", "/v1/backends/b/endpoints/drain", {"endpoint": a.url})
        assert (status, body["draining"]) == (200, False)
        for g in (g1, g2, g3):
            await holds(lambda: not g.node.routing.pools["b"].draining, BOUND_S, f"{g.node.node_id} undrained")
    finally:
        for c in c1 + c2:
            await c.close()
        await a.stop()
        await b.stop()


@pytest.mark.parametrize("body, status, needle", [
    ({"endpoint": "ws://127.0.0.1:1/nowhere"}, 404, "not an endpoint of this backend"),
    ({}, 400, "body must be"),
    ({"endpoint": None}, 400, "body must be"),
    ({"endpoint": "URL", "ttl_s": 0}, 400, "ttl_s"),
    ({"endpoint": "URL", "ttl_s": "10"}, 400, "ttl_s"),
    ([1, 2], 400, "JSON object"),
])
async def test_endpoint_drain_input_is_checked(gateway, backend, http, body, status, needle):
    b = await backend()
    gw = await gateway(reattach_config(b.url))
    if isinstance(body, dict) and body.get("endpoint") == "URL":
        body["endpoint"] = b.url
    got, answer = await api(http, gw, "POST", "/v1/backends/b/endpoints/drain", body)
    assert got == status and needle in answer["error"], answer
    got, answer = await api(http, gw, "POST", "/v1/backends/nope/endpoints/drain", {"endpoint": b.url})
    assert (got, answer["error"]) == (404, "unknown backend")


@pytest.mark.parametrize("kind", ["memory", "redis"])
async def test_the_store_keeps_endpoint_drains_until_they_end(kind, request):
    now = [0.0]
    if kind == "memory":
        store = MemoryStore(clock=lambda: now[0])
    else:
        store = RedisStore(request.getfixturevalue("redis_server").url, key_prefix="t:")
    await store.start()
    try:
        assert await store.draining_endpoints("b") == set()
        await store.set_endpoint_draining("b", "ws://x/1", 60)
        await store.set_endpoint_draining("b", "ws://x/2", 60)
        await store.set_endpoint_draining("other", "ws://x/1", 60)
        assert await store.draining_endpoints("b") == {"ws://x/1", "ws://x/2"}
        await store.clear_endpoint_draining("b", "ws://x/2")
        assert await store.draining_endpoints("b") == {"ws://x/1"}
        await store.set_endpoint_draining("b", "ws://x/1", 0.2)   # again: from now on, for 0.2 s
        if kind == "memory":
            now[0] += 0.3

        async def ended():
            return not await store.draining_endpoints("b")
        await until(ended, BOUND_S, "the drain ended")
        assert await store.draining_endpoints("other") == {"ws://x/1"}
    finally:
        await store.close()
