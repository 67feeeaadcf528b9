"""The guarantee (issue 9, 5a): a rolling restart of every gateway node, one
after another, under continuous numbered traffic both ways, loses nothing.

Three `gateway run` processes share one throwaway redis-server; the backend
(in the test) numbers what it sends per Gateway-Session-Id, the clients
number what they send. Each node in turn gets SIGTERM while a replacement
starts; every client is drained (1012 + token) and resumes on a live node.
At the end: every stream at both ends is 1, 2, 3, ... with no gap and no
duplicate, and every client was reconnected by resume, never started over.
"""

from __future__ import annotations

import asyncio
import itertools
import signal
import time

import jwt
import pytest

from ..conftest import proxy_config
from ..helpers import until
from .numbered import NumberedBackend, NumberedClient, contiguous
from .test_lifecycle import Proc

SECRET = "r" * 64
CLIENTS = 6


def jwt_for(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


def cfg(name: str, redis_url: str, backend_url: str) -> dict:
    c = proxy_config(backend_url, route={"auth": "required"})
    c.update({
        "node_id": name,
        "redis": {"url": redis_url, "heartbeat_s": 0.5, "node_ttl_s": 3, "timeout_s": 0.5},
        "auth": {"jwt": {"algorithms": ["HS256"], "keys": {"secret_env": "ROLL_JWT_SECRET"},
                         "sources": ["query:access_token"]}},
        "drain": {"timeout_s": 10, "rate_per_s": 200},
    })
    return c


@pytest.fixture
async def numbered():
    b = NumberedBackend(interval_s=0.01)
    await b.start()
    yield b
    await b.stop()


async def test_rolling_restart_of_every_node_loses_no_message(tmp_path, redis_server, numbered, http, monkeypatch):
    monkeypatch.setenv("ROLL_JWT_SECRET", SECRET)
    made = itertools.count()
    procs: list[Proc] = []

    async def start() -> Proc:
        i = next(made)
        p = Proc(tmp_path, cfg(f"n{i}", redis_server.url, numbered.url), name=f"n{i}")
        procs.append(p)
        await p.ready(http)
        return p

    live = [await start(), await start(), await start()]
    pick = itertools.count()

    def next_url(sub: str):
        def url() -> str:
            ready = [p for p in live if p.p.poll() is None]
            return f"{ready[next(pick) % len(ready)].url}/ws?access_token={jwt_for(sub)}"
        return url

    clients = [NumberedClient(http, next_url(f"u{i}")(), interval_s=0.01) for i in range(CLIENTS)]
    for c in clients:
        await c.connect()
    stop = asyncio.Event()
    runs = [asyncio.ensure_future(c.run(stop, next_url=next_url(f"u{i}"))) for i, c in enumerate(clients)]
    try:
        await until(lambda: asyncio.sleep(0, all(len(c.got) >= 10 for c in clients)), what="traffic")
        for old in list(live):
            live.remove(old)
            live.append(await start())           # the replacement is up before the old node goes
            old.p.send_signal(signal.SIGTERM)
            assert await old.wait(30) == 0
            marks = [len(c.got) for c in clients]
            await until(lambda: asyncio.sleep(0, all(len(c.got) >= m + 10 for c, m in zip(clients, marks))),
                        timeout_s=20, what="traffic after the restart")
    finally:
        stop.set()
        for c in clients:
            await c.close()
        await asyncio.wait(runs, timeout=15)
        for p in procs:
            p.stop()
    for c in clients:
        assert all(code == 1012 for code, _ in c.closes[:-1]), c.closes
        assert c.resumes >= 1
    sessions = {h["Gateway-Session-Id"] for h in numbered.handshakes}
    assert len(sessions) == CLIENTS, "a client started a new session instead of resuming"
    for c in clients:
        contiguous("s", c.got)
    for sid in sessions:
        contiguous("c", numbered.got[sid])
    resumed = [h for h in numbered.handshakes if h.get("Gateway-Resumed") == "1"]
    assert len(resumed) == sum(c.resumes for c in clients)
    drained = [e for p in procs for e in p.logs() if e["event"] == "drain_done"]
    assert len(drained) == 3 and all(e["buffers_unsealed"] == 0 for e in drained)
