"""/metrics scraped during real traffic: every metric the operators' issue
names moves when the thing it counts happens (upstream dial failures and
ejections by endpoint, reattaches, resumes, replayed messages, replay
overflows, drain state and sessions left, Redis call latency and errors,
reloads by result, the HTTP-backend latencies), and with `workers: 2` one
scrape answers for both workers.

In-process gateways share one prometheus registry, so every check compares a
scrape before with a scrape after."""

from __future__ import annotations

import asyncio
import pathlib

import aiohttp
import pytest
import yaml
from aiohttp import WSMsgType, web

from ..conftest import proxy_config
from ..helpers import free_port, until
from ..httppeer import http_peer  # noqa: F401  (fixture)
from .test_lifecycle import Proc
from .test_metrics_names import scrape

TOKEN = "metrics-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def admin_token(monkeypatch):
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)


def value(families: dict, sample: str, **labels) -> float:
    """The sum of the samples named `sample` whose labels include `labels`."""
    family = sample
    for suffix in ("_total", "_bucket", "_count", "_sum"):
        if sample.endswith(suffix) and sample.removesuffix(suffix) in families:
            family = sample.removesuffix(suffix)
            break
    f = families.get(family)
    if f is None:
        return 0.0
    return sum(s.value for s in f.samples
               if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items()))


class Scraper:
    """Scrapes one gateway; `moved(sample, **labels)` is the growth since `mark()`."""

    def __init__(self, http, gw):
        self.http = http
        self.gw = gw
        self.before: dict = {}

    async def mark(self) -> None:
        self.before = await scrape(self.http, self.gw)

    async def moved(self, sample: str, **labels) -> float:
        now = await scrape(self.http, self.gw)
        return value(now, sample, **labels) - value(self.before, sample, **labels)

    async def until_moved(self, sample: str, at_least: float = 1, **labels) -> float:
        async def grown():
            d = await self.moved(sample, **labels)
            return d if d >= at_least else None
        return await until(grown, what=f"{sample}{labels or ''} grew by {at_least}")


async def api(http, gw, method: str, path: str, **kw) -> tuple[int, dict]:
    async with http.request(method, gw.admin_url + path, headers=AUTH, **kw) as r:
        return r.status, await r.json()


def dead_url(scheme: str) -> str:
    """An endpoint that refuses connections: a free port nothing listens on."""
    return f"{scheme}://127.0.0.1:{free_port()}/x"


async def test_dial_failures_and_ejections_are_counted_by_endpoint(gateway, backend, http, http_peer):
    good = await backend()
    hgood = await http_peer(echo)
    dead, hdead = dead_url("ws"), dead_url("http")
    cfg = proxy_config(dead, good.url, backend={"balance": "round_robin", "eject_after_failures": 2,
                                                "eject_cooldown_s": 60})
    cfg["backends"]["h"] = {"type": "http", "endpoints": [hdead, hgood.url], "balance": "round_robin",
                            "eject_after_failures": 2, "eject_cooldown_s": 60}
    cfg["routes"].append({"name": "hr", "match": {"path": "/h"}, "auth": "none", "backend": "h"})
    gw = await gateway(cfg)
    m = Scraper(http, gw)
    await m.mark()
    for _ in range(4):
        async with http.ws_connect(gw.url + "/ws") as ws:
            await ws.send_str("x")
            assert (await ws.receive(timeout=5)).data == "x"
    async with http.ws_connect(gw.url + "/h") as ws:
        for i in range(4):
            await ws.send_str(f"m{i}")
            assert (await ws.receive(timeout=5)).data == f"m{i}"
    assert await m.moved("gateway_upstream_connect_failures_total", backend="b", endpoint=dead) == 2
    assert await m.moved("gateway_upstream_connect_failures_total", backend="b", endpoint=good.url) == 0
    assert await m.moved("gateway_upstream_ejections_total", backend="b", endpoint=dead) == 1
    # An HTTP backend's endpoint that refuses is a dial failure too; the message went to the next one.
    assert await m.moved("gateway_upstream_connect_failures_total", backend="h", endpoint=hdead) == 2
    assert await m.moved("gateway_upstream_ejections_total", backend="h", endpoint=hdead) == 1
    assert await m.moved("gateway_http_backend_requests_total", backend="h", event="message", result="ok") == 4


async def echo(request, body: bytes) -> web.Response:
    return _ok(body)


def _ok(body: bytes) -> web.Response:
    return web.Response(body=body, content_type="text/plain")


async def test_http_backend_round_trip_and_added_latency_are_observed(gateway, http, http_peer):
    delay_s = 0.1   # long beside what the gateway adds, even on a busy machine

    async def slow_echo(request, body):
        await asyncio.sleep(delay_s)
        return _ok(body) if request.headers.get("Gateway-Event") == "message" else web.Response(status=204)

    h = await http_peer(slow_echo)
    gw = await gateway({
        "backends": {"h": {"type": "http", "endpoints": [h.url]}},
        "routes": [{"name": "r", "match": {"path": "/h"}, "auth": "none", "backend": "h",
                    "events": {"connect": "h", "disconnect": "h"}}],
    })
    m = Scraper(http, gw)
    await m.mark()
    n = 6
    async with http.ws_connect(gw.url + "/h") as ws:
        for i in range(n):
            await ws.send_str(f"m{i}")
        for i in range(n):   # one in flight at a time, in order: the others waited in the queue
            assert (await ws.receive(timeout=5)).data == f"m{i}"
    rt = "gateway_http_backend_round_trip_seconds"
    added = "gateway_http_backend_added_seconds"
    assert await m.moved(rt + "_count", backend="h", event="message") == n
    assert await m.moved(rt + "_count", backend="h", event="connect") == 1
    await m.until_moved(rt + "_count", backend="h", event="disconnect")
    # Each answer took at least delay_s: none in the buckets below it, the sum at least n of them.
    assert await m.moved(rt + "_bucket", backend="h", event="message", le="0.05") == 0
    assert await m.moved(rt + "_bucket", backend="h", event="message", le="+Inf") == n
    assert await m.moved(rt + "_sum", backend="h", event="message") >= n * delay_s
    # What the gateway added is observed once per answered message, without the queue wait:
    # all six were sent at once, so counted from the client's send they would add up
    # (0+1+...+5) = 15 backend delays, 2.5 times the six round trips; without it, the
    # gateway's own work per message is far below one delay.
    assert await m.moved(added + "_count", backend="h") == n
    total_added = await m.moved(added + "_sum", backend="h")
    total_rt = await m.moved(rt + "_sum", backend="h", event="message")
    assert 0 <= total_added < total_rt


async def test_reattach_is_counted(gateway, backend, http):
    a, b = await backend(), await backend()
    gw = await gateway(proxy_config(a.url, b.url, backend={"on_upstream_close": "reattach"}))
    m = Scraper(http, gw)
    await m.mark()
    async with http.ws_connect(gw.url + "/ws") as ws:
        await ws.send_str("before")
        assert (await ws.receive(timeout=5)).data == "before"
        (s,) = gw.node.sessions.values()
        first = s.endpoint.url
        status, body = await api(http, gw, "POST", "/v1/backends/b/endpoints/drain", json={"endpoint": first})
        assert status == 202 and body["moving"] == 1, body
        await m.until_moved("gateway_reattaches_total")
        await ws.send_str("after")
        assert (await ws.receive(timeout=5)).data == "after"
        assert s.endpoint.url != first


def redis_node(node_id: str, redis_url: str, backend_url: str, **drain) -> dict:
    cfg = proxy_config(backend_url)
    cfg.update({
        "node_id": node_id,
        # Generous TTL and call timeout: a busy machine must not make a live node look dead.
        "redis": {"url": redis_url, "heartbeat_s": 0.2, "node_ttl_s": 5, "timeout_s": 2},
        "drain": {"timeout_s": 10, "rate_per_s": 1, "replay_max_messages": 2, **drain},
    })
    return cfg


async def test_drain_resume_replay_overflow_and_redis_are_counted(gateway, backend, redis_server, http):
    """A slow drain (one session per batch) shows its state and what is left; a
    resume replays what was pushed meanwhile; a push past a full buffer is an
    overflow; Redis calls are timed, and counted as errors once it is gone."""
    echo = await backend()
    a = await gateway(redis_node("metrics-a", redis_server.url, echo.url))
    b = await gateway(redis_node("metrics-b", redis_server.url, echo.url))
    m = Scraper(http, b)          # one registry: a's metrics are in b's scrape too
    await m.mark()
    n = 10
    clients, sids = [], []
    for _ in range(n):
        clients.append(await http.ws_connect(a.url + "/ws"))
        sids.append(next(s.session_id for s in a.node.sessions.values() if s.session_id not in sids))
    drain = asyncio.ensure_future(a.stop())

    async def draining_with_sessions_left():
        f = await scrape(http, b)
        return value(f, "gateway_draining") == 1 and value(f, "gateway_drain_sessions_left") >= 1
    await until(draining_with_sessions_left, what="gateway_draining 1 and gateway_drain_sessions_left >= 1")
    closes = []
    for ws in clients:
        msg = await ws.receive(timeout=15)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1012), msg
        closes.append(msg.extra.removeprefix("resume="))
    await asyncio.wait_for(drain, 15)
    assert value(await scrape(http, b), "gateway_drain_sessions_left") == 0

    # One push to the first session's buffer (replayed on resume), three to the second's (max 2).
    status, body = await api(http, b, "POST", f"/v1/connections/{sids[0]}/messages", data="pushed")
    assert (status, body.get("buffered")) == (200, 1), body
    statuses = [(await api(http, b, "POST", f"/v1/connections/{sids[1]}/messages", data=f"p{i}"))[0]
                for i in range(3)]
    assert statuses == [200, 200, 507]
    assert await m.moved("gateway_replay_overflows_total") >= 1
    assert await m.moved("gateway_replay_buffered_messages_total", source="api") == 3

    ws = await http.ws_connect(f"{b.url}/ws?resume={closes[0]}")
    assert (await ws.receive(timeout=5)).data == "pushed"
    assert await m.moved("gateway_resumes_total") == 1
    assert await m.moved("gateway_replayed_messages_total") >= 1
    await ws.close()
    try:
        await http.ws_connect(f"{b.url}/ws?resume={closes[1]}")
        raise AssertionError("a resume whose buffer overflowed was accepted")
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status == 410
    assert await m.moved("gateway_resume_refusals_total") >= 1

    assert await m.moved("gateway_store_command_seconds_count") > 0
    await m.mark()
    redis_server.stop()
    await m.until_moved("gateway_store_errors_total")
    await until(lambda: _available(http, b, 0), what="gateway_store_available 0 while Redis is down")
    redis_server.start()
    await until(lambda: _available(http, b, 1), what="gateway_store_available 1 once Redis is back")


async def _available(http, gw, want: int) -> bool:
    return value(await scrape(http, gw), "gateway_store_available") == want


async def test_reloads_are_counted_by_result(gateway, http, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    cfg = {"listen": {"host": "127.0.0.1", "port": 0}, "admin": {"host": "127.0.0.1", "port": 0},
           "drain": {"timeout_s": 2},
           "backends": {"echo": {"type": "builtin", "handler": "echo"}},
           "routes": [{"name": "echo", "match": {"path": "/echo"}, "auth": "none", "backend": "echo"}]}
    path = pathlib.Path("test.yaml")   # conftest's gateway names its config so
    path.write_text(yaml.safe_dump(cfg))
    gw = await gateway(cfg)
    m = Scraper(http, gw)
    await m.mark()
    status, _ = await api(http, gw, "POST", "/v1/reload")
    assert status == 200
    path.write_text(yaml.safe_dump(dict(cfg, routes=[{"name": "echo", "match": {"path": "/echo"},
                                                      "auth": "none", "backend": "nope"}])))
    status, body = await api(http, gw, "POST", "/v1/reload")
    assert status == 400, body
    assert await m.moved("gateway_config_reloads_total", result="ok") == 1
    assert await m.moved("gateway_config_reloads_total", result="error") == 1
    try:
        await http.ws_connect(gw.url + "/nope")
    except aiohttp.WSServerHandshakeError as exc:
        assert exc.status == 404
    assert await m.moved("gateway_handshake_refusals_total", reason="no_route") == 1


async def test_two_workers_are_scraped_together(http, http_peer, redis_server, tmp_path):
    """Sessions spread over both workers (each is a node in /v1/nodes); one
    scrape, answered by one of them, counts every session and every HTTP
    backend round trip of both."""
    h = await http_peer(echo)
    p = Proc(tmp_path, {
        "workers": 2, "node_id": "mw",
        "redis": {"url": redis_server.url, "heartbeat_s": 0.2, "node_ttl_s": 1, "timeout_s": 0.5},
        "backends": {"echo": {"type": "builtin", "handler": "echo"},
                     "h": {"type": "http", "endpoints": [h.url]}},
        "routes": [{"name": "echo", "match": {"path": "/echo"}, "auth": "none", "backend": "echo"},
                   {"name": "hr", "match": {"path": "/h"}, "auth": "none", "backend": "h"}],
    })
    clients = []
    start_s = 60   # two interpreters starting on a busy machine
    try:
        await p.ready(http, timeout=start_s)

        async def nodes() -> dict[str, int]:
            async with http.get(p.admin_url + "/v1/nodes", headers=AUTH) as r:
                return {n["id"]: n["connections"] for n in (await r.json())["nodes"]} if r.status == 200 else {}

        await until(lambda: _both(nodes), start_s, what="both workers in /v1/nodes")
        spread = {}
        for _ in range(40):   # SO_REUSEPORT spreads by the client's port: more until both have some
            ws = await http.ws_connect(p.url + "/h")
            clients.append(ws)
            await ws.send_str("x")
            assert (await ws.receive(timeout=5)).data == "x"
            if len(clients) >= 4:
                spread = await until(lambda: _counted(nodes, len(clients)), what="node records count every session")
                if all(spread.values()):
                    break
        assert len(spread) == 2 and all(spread.values()), f"40 sessions all on one worker: {spread}"
        total = len(clients)
        assert max(spread.values()) < total

        async def together():
            f = await scrape(http, p)
            return (value(f, "gateway_sessions_open", route="hr") == total
                    and value(f, "gateway_http_backend_round_trip_seconds_count", backend="h", event="message")
                    == total
                    and value(f, "gateway_http_backend_added_seconds_count", backend="h") == total)
        await until(together, what=f"one scrape counting all {total} sessions and round trips of both workers")
    finally:
        for ws in clients:
            await ws.close()
        p.stop()


async def _both(nodes) -> bool:
    return len(await nodes()) == 2


async def _counted(nodes, n: int):
    got = await nodes()
    return got if sum(got.values()) == n and len(got) == 2 else None
