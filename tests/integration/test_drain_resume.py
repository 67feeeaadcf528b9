"""Drain a node and resume its sessions on another, losing nothing (DESIGN 7).

Two in-process nodes share one real redis-server; the backend numbers what it
sends per Gateway-Session-Id and the client numbers what it sends, so every
message is counted at both ends: none lost, none twice, order kept."""

from __future__ import annotations

import asyncio
import time

import jwt
import pytest
from aiohttp import WSMsgType

from gateway import frames, metrics

from ..conftest import proxy_config
from ..helpers import RawClient, until
from .numbered import NumberedBackend, NumberedClient, contiguous

SECRET = "d" * 64
TOKEN = "drain-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


@pytest.fixture(autouse=True)
def env(monkeypatch):
    monkeypatch.setenv("DRAIN_JWT_SECRET", SECRET)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)


def jwt_for(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


def node_cfg(node_id: str, redis_url: str, backend_url: str, **drain) -> dict:
    cfg = proxy_config(backend_url, route={"auth": "required"})
    cfg.update({
        "node_id": node_id,
        "redis": {"url": redis_url, "heartbeat_s": 0.2, "node_ttl_s": 1, "timeout_s": 0.5},
        "auth": {"jwt": {"algorithms": ["HS256"], "keys": {"secret_env": "DRAIN_JWT_SECRET"},
                         "sources": ["query:access_token"]}},
        "drain": {"timeout_s": 5, "rate_per_s": 1000, **drain},
    })
    return cfg


@pytest.fixture
async def numbered():
    b = NumberedBackend()
    await b.start()
    yield b
    await b.stop()


async def two_nodes(gateway, redis_server, backend_url, **drain):
    a = await gateway(node_cfg("node-a", redis_server.url, backend_url, **drain))
    b = await gateway(node_cfg("node-b", redis_server.url, backend_url, **drain))
    return a, b


def replayed() -> float:
    return metrics.replayed._value.get()


def sid_of(gw) -> str:
    (s,) = gw.node.sessions.values()
    return s.session_id


async def test_drain_closes_with_1012_and_a_token_that_resumes_on_another_node(gateway, redis_server, numbered,
                                                                                 http):
    a, b = await two_nodes(gateway, redis_server, numbered.url)
    url = f"{a.url}/ws?access_token={jwt_for('alice')}"
    client = NumberedClient(http, url)
    await client.connect()
    stop = asyncio.Event()
    replayed_before = metrics.replayed._value.get()
    run = asyncio.ensure_future(client.run(stop, next_url=lambda: f"{b.url}/ws?access_token={jwt_for('alice')}"))
    await until(lambda: asyncio.sleep(0, len(client.got) >= 20), what="traffic through node A")
    sid = sid_of(a)
    drain = asyncio.ensure_future(a.stop())
    await until(lambda: asyncio.sleep(0, client.resumes == 1 and len(b.node.sessions) == 1), what="resumed on B")
    assert client.closes[0][0] == 1012 and client.closes[0][1].startswith("resume=")
    assert len(client.closes[0][1].encode()) <= 123
    got_then = len(client.got)
    await until(lambda: asyncio.sleep(0, len(client.got) >= got_then + 20), what="traffic through node B")
    stop.set()
    await client.close()
    await asyncio.wait_for(run, 10)
    await asyncio.wait_for(drain, 10)
    # The same session on B, its upstream reopened as a resume.
    assert numbered.handshakes[-1]["Gateway-Session-Id"] == sid
    assert numbered.handshakes[-1].get("Gateway-Resumed") == "1"
    assert "Gateway-Resumed" not in numbered.handshakes[0]
    assert "resume=" not in str(numbered.handshakes[-1])
    n_down = contiguous("s", client.got)
    n_up = contiguous("c", numbered.got[sid])
    assert n_down >= 40 and n_up >= 10
    assert client.sent - n_up <= 1   # at most the one in flight when the client closed
    assert metrics.replayed._value.get() >= replayed_before


async def test_frames_the_backend_sends_after_the_1012_are_replayed_in_order(gateway, redis_server, numbered):
    """The client answers the 1012 late: everything the backend sent meanwhile is buffered, then replayed."""
    a, b = await two_nodes(gateway, redis_server, numbered.url)
    raw = await RawClient.connect(f"{a.url}/ws?access_token={jwt_for('bob')}")
    assert raw.status == 101
    got = []

    async def read_until_close():
        while True:
            op, _, payload = await raw.recv_frame()
            if op == frames.OP_CLOSE:
                return payload
            got.append(payload.decode())

    replayed_before = replayed()
    reader = asyncio.ensure_future(read_until_close())
    await until(lambda: asyncio.sleep(0, len(got) >= 5), what="first messages")
    drain = asyncio.ensure_future(a.stop())
    close = await asyncio.wait_for(reader, 5)
    code = int.from_bytes(close[:2], "big")
    token = close[2:].decode().removeprefix("resume=")
    assert code == 1012
    await asyncio.sleep(0.2)       # the backend goes on sending: all of it is kept for the resume
    raw.send_frame(frames.OP_CLOSE, frames.close_payload(1000, ""))
    await asyncio.wait_for(drain, 10)
    resumed = await RawClient.connect(f"{b.url}/ws?access_token={jwt_for('bob')}&resume={token}")
    assert resumed.status == 101
    before = len(got)
    for _ in range(60):
        op, _, payload = await resumed.recv_frame()
        got.append(payload.decode())
    contiguous("s", got)
    # What came in the 0.2 s before the client's close answer was replayed first.
    assert replayed() - replayed_before >= 10, (before, got[before:before + 5])
    resumed.close()


@pytest.mark.parametrize("what,status", [("forged", 401), ("other_subject", 401), ("reused", 410)])
async def test_bad_resume_tokens_are_refused_with_a_reason(gateway, redis_server, numbered, http, what, status):
    a, b = await two_nodes(gateway, redis_server, numbered.url)
    ws = await http.ws_connect(f"{a.url}/ws?access_token={jwt_for('carol')}")
    drain = asyncio.ensure_future(a.stop())
    msg = await ws.receive(timeout=5)
    while msg.type == WSMsgType.TEXT:
        msg = await ws.receive(timeout=5)
    assert msg.type == WSMsgType.CLOSE and msg.data == 1012
    token = msg.extra.removeprefix("resume=")
    await asyncio.wait_for(drain, 10)
    sub = "carol"
    if what == "forged":
        token = token.split(".")[0] + ".AAAAAAAAAAAAAAAAAAAAAA"
    elif what == "other_subject":
        sub = "mallory"
    else:
        first = await http.ws_connect(f"{b.url}/ws?access_token={jwt_for('carol')}&resume={token}")
        await first.receive(timeout=5)
        await first.close()
    raw = await RawClient.connect(f"{b.url}/ws?access_token={jwt_for(sub)}&resume={token}")
    assert raw.status == status
    body = await raw.reader.read()
    assert b"resume refused" in body
    if what == "other_subject":
        # A refused attempt does not burn the session: its owner still resumes it.
        ok = await RawClient.connect(f"{b.url}/ws?access_token={jwt_for('carol')}&resume={token}")
        assert ok.status == 101
        ok.writer.close()
