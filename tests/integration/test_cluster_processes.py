"""Gateway nodes as separate processes on one real Redis: a node killed with
SIGKILL is noticed, its records are removed and the disconnect event of each
of its HTTP-backend sessions reaches the backend exactly once."""

from __future__ import annotations

import asyncio
import collections
import subprocess
import sys
import time

import aiohttp
import pytest
import yaml

from ..helpers import free_port
from ..httppeer import http_peer  # noqa: F401  (fixture)

TOKEN = "proc-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


class Node:
    def __init__(self, tmp_path, name: str, cfg: dict):
        self.name = name
        self.port, self.admin = free_port(), free_port()
        cfg = dict(cfg, node_id=name, listen={"host": "127.0.0.1", "port": self.port},
                   admin={"host": "127.0.0.1", "port": self.admin})
        self.path = tmp_path / f"{name}.yaml"
        self.path.write_text(yaml.safe_dump(cfg))
        self.stderr = tmp_path / f"{name}.log"
        env = {"GATEWAY_ADMIN_TOKEN": TOKEN, "PATH": "/usr/bin:/bin"}
        self.p = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(self.path)],
                                  stderr=open(self.stderr, "wb"), stdout=subprocess.DEVNULL, env=env)
        self.url = f"ws://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin}"

    async def ready(self, http, timeout: float = 20) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.p.poll() is None, self.stderr.read_text()
            try:
                async with http.get(self.admin_url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError(f"{self.name} did not become ready: " + self.stderr.read_text())

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


@pytest.fixture
def nodes(tmp_path):
    made: list[Node] = []

    def start(name: str, cfg: dict) -> Node:
        n = Node(tmp_path, name, cfg)
        made.append(n)
        return n

    yield start
    for n in made:
        n.kill()


async def poll(check, timeout: float, what: str, step: float = 0.1):
    deadline = time.monotonic() + timeout
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout} s: {what}")
        await asyncio.sleep(step)


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
    connects = await poll(lambda: _events_async(events, "connect", 4), 10, "four connect events")
    by_node = collections.defaultdict(list)
    for r in connects:
        # The connect event reaches the backend before the 101: find whose node it is from the record.
        async with http.get(f"{b.admin_url}/v1/connections/{r.headers['Gateway-Connection-Id']}",
                            headers=AUTH) as resp:
            if resp.status == 200:
                by_node[(await resp.json())["node"]].append(r.headers["Gateway-Connection-Id"])

    async def all_recorded():
        got = 0
        for r in connects:
            async with http.get(f"{b.admin_url}/v1/connections/{r.headers['Gateway-Connection-Id']}",
                                headers=AUTH) as resp:
                got += resp.status == 200
        return got == 4
    await poll(all_recorded, 10, "every session recorded in Redis")
    by_node.clear()
    for r in connects:
        cid = r.headers["Gateway-Connection-Id"]
        async with http.get(f"{b.admin_url}/v1/connections/{cid}", headers=AUTH) as resp:
            by_node[(await resp.json())["node"]].append(cid)
    assert sorted(len(v) for v in by_node.values()) == [1, 3] and len(by_node["pc"]) == 3

    killed_at = time.monotonic()
    c.kill()

    async def pc_gone():
        async with http.get(f"{a.admin_url}/v1/nodes", headers=AUTH) as resp:
            ids = [n["id"] for n in (await resp.json())["nodes"]]
        return "pc" not in ids and ids == ["pa", "pb"]
    await poll(pc_gone, 30, "the killed node leaves GET /v1/nodes")
    noticed_s = time.monotonic() - killed_at

    async def lost_disconnects():
        got = [r.headers["Gateway-Connection-Id"] for r in events.of("disconnect")]
        return got if set(by_node["pc"]) <= set(got) else None
    got = await poll(lost_disconnects, 10, "a disconnect event for each session of the killed node")
    counts = collections.Counter(got)
    assert all(counts[cid] == 1 for cid in by_node["pc"]), counts
    assert by_node["pa"][0] not in counts   # the live node's session did not end
    for cid in by_node["pc"]:
        async with http.get(f"{a.admin_url}/v1/connections/{cid}", headers=AUTH) as resp:
            assert resp.status == 404
    assert noticed_s < 30
    for ws in clients:
        await ws.close()


async def _events_async(peer, kind: str, n: int):
    got = peer.of(kind)
    return got if len(got) >= n else None


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
        (key,) = await poll(recorded, 10, "the session record in Redis")
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
