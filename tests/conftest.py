"""Fixtures: real sockets everywhere. Backends are aiohttp apps started per test,
the gateway runs in-process on the test's event loop (uvloop, as in production)."""

from __future__ import annotations

import asyncio

import pytest
import uvloop
import yaml

from gateway import config
from gateway.app import Gateway

from .helpers import WsBackend


def pytest_asyncio_loop_factories(config, item):
    # Run every async test on uvloop, the loop the gateway uses in production.
    return {"uvloop": uvloop.new_event_loop}


@pytest.fixture
async def gateway():
    """`await gateway(cfg_dict)` starts a gateway on free ports; stopped after the test."""
    started: list[Gateway] = []

    async def start(cfg: dict) -> Gateway:
        cfg = dict(cfg)
        cfg.setdefault("listen", {"host": "127.0.0.1", "port": 0})
        cfg.setdefault("admin", {"host": "127.0.0.1", "port": 0})
        cfg.setdefault("drain", {"timeout_s": 2})
        parsed = config.parse(yaml.safe_dump(cfg), source="test.yaml")
        gw = Gateway(parsed)
        await gw.start()
        gw.url = f"ws://127.0.0.1:{gw.ports[0]}"
        gw.admin_url = f"http://127.0.0.1:{gw.ports[1]}"
        started.append(gw)
        return gw

    yield start
    for gw in started:
        if not gw.stopping.is_set():
            await gw.stop()


@pytest.fixture
async def backend():
    """`await backend(**kw)` starts a WebSocket backend on a free port."""
    started: list[WsBackend] = []

    async def start(**kw) -> WsBackend:
        b = WsBackend(**kw)
        await b.start()
        started.append(b)
        return b

    yield start
    for b in started:
        await b.stop()


@pytest.fixture
async def http():
    import aiohttp

    async with aiohttp.ClientSession() as session:
        yield session


def proxy_config(*endpoints: str, route: dict | None = None, backend: dict | None = None, **top) -> dict:
    """A config with one websocket backend `b` behind route `r` on /ws."""
    cfg = {
        "backends": {"b": {"type": "websocket", "endpoints": list(endpoints), **(backend or {})}},
        "routes": [{"name": "r", "match": {"path_prefix": "/ws"}, "auth": "none", "backend": "b", **(route or {})}],
    }
    cfg.update(top)
    return cfg


# ---- Redis: real redis-server processes (tests/redisproc.py), never a fake.

@pytest.fixture(scope="module")
def _redis_process():
    from .redisproc import RedisProcess

    try:
        proc = RedisProcess()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    proc.start()
    yield proc
    proc.close()


@pytest.fixture
def redis_server(_redis_process):
    """A redis-server on 127.0.0.1 (`.port`, `.url`, `.stop()`, `.start()` on the same
    port), shared by a test module, running and empty at the start of each test."""
    _redis_process.start()
    with _redis_process.client() as c:
        c.flushall()
    return _redis_process


@pytest.fixture
def sentinel_set():
    """A master, a replica and three sentinels monitoring them as `m` (quorum 2)."""
    from .redisproc import SentinelSet

    try:
        s = SentinelSet()
    except RuntimeError as e:
        pytest.fail(str(e), pytrace=False)
    try:
        s.start()
        yield s
    finally:
        s.close()
