"""Gateway nodes as separate processes on one real Redis: a node killed with
SIGKILL is noticed, its records are removed and the disconnect event of each
of its HTTP-backend sessions reaches the backend exactly once."""

from __future__ import annotations

import collections

import pytest

from ..helpers import until
from ..httppeer import http_peer  # noqa: F401  (fixture)
from .test_lifecycle import Proc

TOKEN = "proc-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture
def nodes(tmp_path, monkeypatch):
    """`nodes(name, cfg)` starts `gateway run` as its own process with node_id `name`."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    made: list[Proc] = []

    def start(name: str, cfg: dict) -> Proc:
        n = Proc(tmp_path, dict(cfg, node_id=name), name=name)
        made.append(n)
        return n

    yield start
    for n in made:
        n.stop()


async def test_sigkill_node_is_reaped_and_its_disconnects_sent_once(nodes, redis_server, http, http_peer):
    events = await http_peer()
    cfg = {
        "redis": {"url": redis_server.url, "heartbeat_s": 0.5, "node_ttl_s": 2},
        "backends": {"app": {"type": "http", "endpoints": [events.url]}},
        "routes": [{"name": "app", "match": {"path": "/app"}, "auth": "none", "backend": "app",
                    "events": {"connect": "app", "disconnect": "app"}}],
    }
    a, b, c = nodes("pa", cfg), nodes("pb", cfg), nodes("pc", cfg)
    for n in (a, b, c):
        await n.ready(http)

    clients = []
    for n, count in ((c, 3), (a, 1)):
        for _ in range(count):
            clients.append(await http.ws_connect(f"{n.url}/app"))
    async def four_connects():
        got = events.of("connect")
        return got if len(got) >= 4 else None
    connects = await until(four_connects, 10, "four connect events")
    async def all_recorded():
        got = 0
        for r in connects:
            async with http.get(f"{b.admin_url}/v1/connections/{r.headers['Gateway-Connection-Id']}",
                                headers=AUTH) as resp:
                got += resp.status == 200
        return got == 4
    await until(all_recorded, 10, "every session recorded in Redis")
    by_node = collections.defaultdict(list)
    for r in connects:
        cid = r.headers["Gateway-Connection-Id"]
        async with http.get(f"{b.admin_url}/v1/connections/{cid}", headers=AUTH) as resp:
            by_node[(await resp.json())["node"]].append(cid)
    assert sorted(len(v) for v in by_node.values()) == [1, 3] and len(by_node["pc"]) == 3

    c.stop()

    async def pc_gone():
        async with http.get(f"{a.admin_url}/v1/nodes", headers=AUTH) as resp:
            ids = [n["id"] for n in (await resp.json())["nodes"]]
        return "pc" not in ids and ids == ["pa", "pb"]
    await until(pc_gone, 30, "the killed node leaves GET /v1/nodes")   # a hang guard
    # Noticed by its heartbeat going past node_ttl_s (2 s): one live node reaped it,
    # with its three sessions.
    async def reaped_logged():
        return [e for n in (a, b) for e in n.logs() if e["event"] == "node_reaped"]
    reaped = await until(reaped_logged, 10, "the reaper's node_reaped log line")
    assert [(e["dead_node"], e["sessions"], e["disconnects"]) for e in reaped] == [("pc", 3, 3)], reaped

    async def lost_disconnects():
        got = [r.headers["Gateway-Connection-Id"] for r in events.of("disconnect")]
        return got if set(by_node["pc"]) <= set(got) else None
    got = await until(lost_disconnects, 10, "a disconnect event for each session of the killed node")
    counts = collections.Counter(got)
    assert all(counts[cid] == 1 for cid in by_node["pc"]), counts
    assert by_node["pa"][0] not in counts   # the live node's session did not end
    for cid in by_node["pc"]:
        async with http.get(f"{a.admin_url}/v1/connections/{cid}", headers=AUTH) as resp:
            assert resp.status == 404
    for ws in clients:
        await ws.close()


async def test_cross_node_push_between_processes(nodes, redis_server, http):
    import orjson
    import redis.asyncio as aioredis

    cfg = {
        "redis": {"url": redis_server.url, "heartbeat_s": 0.5, "node_ttl_s": 2},
        "backends": {"echo": {"type": "builtin", "handler": "echo"}},
        "routes": [{"name": "echo", "match": {"path": "/echo"}, "auth": "none", "backend": "echo"}],
    }
    a, b = nodes("xa", cfg), nodes("xb", cfg)
    for n in (a, b):
        await n.ready(http)
    ws = await http.ws_connect(f"{b.url}/echo")
    r = aioredis.from_url(redis_server.url)
    try:
        async def recorded():
            keys = await r.keys("gw:session:*")
            return keys if keys else None
        (key,) = await until(recorded, 10, "the session record in Redis")
        rec = orjson.loads(await r.get(key))
    finally:
        await r.aclose()
    assert rec["node"] == "xb" and rec["v"] == 1
    conn = rec["connection"]
    # Subscribed through node a, published through node a: both cross Redis to b.
    async with http.put(f"{a.admin_url}/v1/connections/{conn}/channels/c1", headers=AUTH) as resp:
        assert resp.status == 200, await resp.text()
    async with http.post(f"{a.admin_url}/v1/channels/c1/messages", headers=AUTH, data="over redis") as resp:
        assert (resp.status, await resp.json()) == (200, {"delivered": 1})
    assert (await ws.receive(timeout=5)).data == "over redis"
    async with http.post(f"{a.admin_url}/v1/connections/{conn}/messages", headers=AUTH, data="direct") as resp:
        assert (await resp.json()) == {"delivered": 1}
    assert (await ws.receive(timeout=5)).data == "direct"
    await ws.close()
