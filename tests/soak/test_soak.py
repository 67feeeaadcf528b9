"""Soak: many short sessions, refused handshakes and drain/resume cycles against a real
`gateway run` process with a real redis-server and a real backend; afterwards the node's
RSS, open file descriptors, asyncio tasks and Redis keys are back to their baseline.

Sizes: SOAK_CYCLES (default 5,000 connect/send/close cycles; the issue's 200,000 with
SOAK_CYCLES=200000), a refused handshake for every 5 cycles, SOAK_DRAINS drain/resume
rounds (default 3). The tolerances below are what "back to baseline" means here; the
soak fails when anything grows past them.
"""

from __future__ import annotations

import asyncio
import os
import time

import aiohttp
import pytest
from aiohttp import WSMsgType

from gateway.channels import RecentlyClosed
from gateway.store.detached import TOMBSTONE_S

from ..conftest import proxy_config
from ..helpers import until
from ..integration.test_lifecycle import Proc, metric

CYCLES = int(os.environ.get("SOAK_CYCLES", "5000"))
DRAINS = int(os.environ.get("SOAK_DRAINS", "3"))
CONCURRENCY = 20
WARMUP = 500
SECRET = "soak-test-secret-0123456789abcdef0123456789"

# What "back to baseline" allows: the allocator keeps some arenas it touched (RSS), a
# pooled upstream or Redis connection may be open or not at the instant of the reading
# (fds), and a timer task may be mid-flight (tasks). A per-session leak of even one
# small object per cycle grows RSS past the allowance at the default size (5,000 x
# a few KiB), and any leaked fd or task per cycle is thousands.
RSS_ALLOWANCE_MIB = 16.0
# Plus the one cache that grows with churn by design: the ids of recently ended sessions
# (server.RecentlyClosed, so the API answers 410 for them), at most its capacity, each
# about 320 bytes (measured: 50,000 cycles grew RSS by 15.3 MiB). docs/resource-bounds.md.
CLOSED_ENTRY_BYTES = 400


def rss_allowance_mib(sessions_ended: int) -> float:
    return RSS_ALLOWANCE_MIB + min(sessions_ended, RecentlyClosed().capacity) * CLOSED_ENTRY_BYTES / 2**20
FD_ALLOWANCE = 3
TASK_ALLOWANCE = 3


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


def fds(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


async def scrape(http, node: Proc) -> str:
    async with http.get(node.admin_url + "/metrics") as r:
        assert r.status == 200
        return await r.text()


async def reading(http, node: Proc, redis_server) -> dict:
    text = await scrape(http, node)
    with redis_server.client() as c:
        keys = c.dbsize()
        # A used resume token's record stays TOMBSTONE_S (a second use is told 410, not
        # 401): bounded, expiring, and counted apart from what a leak would leave.
        tombstones = [k for k in c.scan_iter(match="*det:*", count=1000)
                      if c.hget(k, "state") in (b"used", b"expired") and 0 < c.pttl(k) <= TOMBSTONE_S * 1000]
    return {"rss": rss_mib(node.p.pid), "fds": fds(node.p.pid),
            "tasks": int(metric(text, "gateway_asyncio_tasks")),
            "open": sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith("gateway_sessions_open{")),
            "keys": keys - len(tombstones), "tombstones": len(tombstones)}


def config(backend_url: str, redis_url: str) -> dict:
    cfg = proxy_config(backend_url, redis={"url": redis_url, "heartbeat_s": 0.2, "node_ttl_s": 1},
                       drain={"timeout_s": 5}, limits={"ping_interval_s": 1})
    cfg["auth"] = {"jwt": {"algorithms": ["HS256"], "keys": {"secret_env": "SOAK_JWT_SECRET"}}}
    cfg["routes"].append({"name": "private", "match": {"path_prefix": "/private"}, "backend": "b",
                          "auth": "required"})
    return cfg


async def one_cycle(http, url: str, i: int) -> int:
    """Connect, send one numbered message, read its echo, close. Returns messages lost."""
    async with http.ws_connect(url + "/ws", autoping=True) as ws:
        await ws.send_str(f"m{i}")
        msg = await asyncio.wait_for(ws.receive(), 10)
        return 0 if (msg.type, msg.data) == (WSMsgType.TEXT, f"m{i}") else 1


async def one_refusal(http, url: str, i: int) -> int:
    """A handshake the gateway must refuse; returns 1 if it was not refused as expected."""
    kind = i % 3
    headers = {}
    path = "/nowhere" if kind == 0 else "/private"
    if kind == 2:
        headers["Authorization"] = "Bearer not.a.jwt"
    try:
        async with http.ws_connect(url + path, headers=headers):
            return 1
    except aiohttp.WSServerHandshakeError as e:
        return 0 if e.status in (401, 404) else 1


async def run_cycles(http, url: str, n: int, start: int = 0) -> tuple[int, int]:
    """n cycles over CONCURRENCY workers, a refusal every 5th; (lost, wrongly answered)."""
    lost = wrong = 0
    counter = iter(range(start, start + n))

    async def worker():
        nonlocal lost, wrong
        for i in counter:
            lost += await one_cycle(http, url, i)
            if i % 5 == 0:
                wrong += await one_refusal(http, url, i)

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(CONCURRENCY))), 600)
    return lost, wrong


async def drain_round(http, tmp_path, watched: Proc, cfg: dict, r: int, sessions: int = 10) -> int:
    """Sessions on a fresh node, the node drained, each session resumed on `watched` and
    closed there. Returns messages lost (each session's echo before and after)."""
    node = Proc(tmp_path, cfg, name=f"drained{r}")
    try:
        await node.ready(http)
        wss = [await http.ws_connect(node.url + "/ws") for _ in range(sessions)]
        lost = 0
        for k, ws in enumerate(wss):
            await ws.send_str(f"d{r}.{k}")
            lost += (await asyncio.wait_for(ws.receive(), 10)).data != f"d{r}.{k}"
        async with http.post(node.admin_url + "/v1/drain") as resp:
            assert resp.status in (200, 202), await resp.text()
        for k, ws in enumerate(wss):
            msg = await asyncio.wait_for(ws.receive(), 10)
            assert msg.type == WSMsgType.CLOSE and msg.data == 1012, (msg.type, msg.data, msg.extra)
            token = msg.extra.split("resume=", 1)[1]
            async with http.ws_connect(f"{watched.url}/ws?resume={token}") as again:
                await again.send_str(f"r{r}.{k}")
                lost += (await asyncio.wait_for(again.receive(), 10)).data != f"r{r}.{k}"
        assert await node.wait() == 0
        return lost
    finally:
        node.stop()


@pytest.mark.timeout(900)
async def test_soak_returns_to_baseline(backend, redis_server, http, tmp_path, monkeypatch, record_property):
    monkeypatch.setenv("SOAK_JWT_SECRET", SECRET)
    b = await backend()
    cfg = config(b.url, redis_server.url)
    node = Proc(tmp_path, cfg, name="watched")
    try:
        await node.ready(http)
        lost, wrong = await run_cycles(http, node.url, WARMUP)
        lost_drains = await drain_round(http, tmp_path, node, cfg, -1)     # warms the resume path too

        async def settled() -> dict:
            got = {}

            async def idle():
                got.update(await reading(http, node, redis_server))
                return got["open"] == 0
            await until(idle, 30, "no session open")
            return got

        base = await settled()
        began = time.monotonic()
        lost_c, wrong_c = await run_cycles(http, node.url, CYCLES, start=WARMUP)
        for r in range(DRAINS):
            lost_drains += await drain_round(http, tmp_path, node, cfg, r)
        elapsed = time.monotonic() - began

        end = {}

        async def back_to_baseline():
            end.update(await settled())
            return (end["rss"] <= base["rss"] + rss_allowance_mib(CYCLES + 10 * DRAINS) and end["fds"] <= base["fds"] + FD_ALLOWANCE
                    and end["tasks"] <= base["tasks"] + TASK_ALLOWANCE and end["keys"] <= base["keys"])
        try:
            await until(back_to_baseline, 30, "RSS, fds, tasks and Redis keys back to baseline")
        finally:
            record_property("load", f"{CYCLES} connect/send/close cycles x {CONCURRENCY} concurrent, "
                                    f"{CYCLES // 5} refused handshakes, {DRAINS} drain/resume rounds of 10")
            record_property("cycles", CYCLES)
            record_property("rss_allowance_mib", round(rss_allowance_mib(CYCLES + 10 * DRAINS), 1))
            for key, name in (("rss", "rss_mib"), ("fds", "fds"), ("tasks", "tasks"), ("keys", "redis_keys")):
                record_property(f"{name}_start", round(base[key], 1) if key == "rss" else base[key])
                if end:
                    record_property(f"{name}_end", round(end[key], 1) if key == "rss" else end[key])
            record_property("lost", lost + lost_c + lost_drains)
            record_property("seconds", round(elapsed, 1))
            if end:
                record_property("redis_tombstones_end", end["tombstones"])
        assert end["tombstones"] <= 10 * (DRAINS + 1), "one tombstone per resumed session at most"
        assert (lost, lost_c, lost_drains) == (0, 0, 0)
        assert (wrong, wrong_c) == (0, 0), "every refused handshake was 401 or 404"
        assert base["tasks"] > 0, "the task gauge is read"
    finally:
        node.stop()
