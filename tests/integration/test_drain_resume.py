"""Drain a node and resume its sessions on another, losing nothing (DESIGN 7).

Two in-process nodes share one real redis-server; the backend numbers what it
sends per Gateway-Session-Id and the client numbers what it sends, so every
message is counted at both ends: none lost, none twice, order kept."""

from __future__ import annotations

import asyncio
import logging
import time

import jwt
import pytest
from aiohttp import WSMsgType

from gateway import frames, metrics, tokens

from ..conftest import proxy_config
from ..helpers import RawClient, until
from ..httppeer import http_peer  # noqa: F401  (fixture)
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


def buffered() -> float:
    """Messages written to replay buffers so far, every source."""
    return sum(s.value for m in metrics.replay_buffered.collect() for s in m.samples if s.name.endswith("_total"))


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

    replayed_before, buffered_before = replayed(), buffered()
    reader = asyncio.ensure_future(read_until_close())
    await until(lambda: asyncio.sleep(0, len(got) >= 5), what="first messages")
    drain = asyncio.ensure_future(a.stop())
    close = await asyncio.wait_for(reader, 5)
    code = int.from_bytes(close[:2], "big")
    token = close[2:].decode().removeprefix("resume=")
    assert code == 1012
    # The backend goes on sending: all of it is kept for the resume.
    await until(lambda: asyncio.sleep(0, buffered() - buffered_before >= 10), what="ten messages buffered")
    raw.send_frame(frames.OP_CLOSE, frames.close_payload(1000, ""))
    await asyncio.wait_for(drain, 10)
    # The token may come as a header as well as ?resume=.
    resumed = await RawClient.connect(f"{b.url}/ws?access_token={jwt_for('bob')}", {"Gateway-Resume": token})
    assert resumed.status == 101
    before = len(got)
    for _ in range(60):
        op, _, payload = await resumed.recv_frame()
        got.append(payload.decode())
    contiguous("s", got)
    # What came before the client's close answer was replayed first.
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


async def drained_token(gw, http, sub: str, seen: list | None = None) -> tuple[str, str, asyncio.Future]:
    """Connect as `sub`, drain `gw`, answer the 1012: (token, session id, the drain task).
    What the client got before the close is added to `seen`."""
    ws = await http.ws_connect(f"{gw.url}/ws?access_token={jwt_for(sub)}")
    sid = sid_of(gw)
    drain = asyncio.ensure_future(gw.stop())
    msg = await ws.receive(timeout=5)
    while msg.type == WSMsgType.TEXT:
        if seen is not None:
            seen.append(msg.data)
        msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1012)
    return msg.extra.removeprefix("resume="), sid, drain


async def api(http, gw, method, path, **kw):
    async with http.request(method, gw.admin_url + path, headers=AUTH, **kw) as r:
        return r.status, await r.json()


async def test_pushes_to_a_detached_session_are_buffered_and_replayed_in_order(gateway, redis_server, numbered,
                                                                             http):
    a, b = await two_nodes(gateway, redis_server, numbered.url)
    before = []
    token, sid, drain = await drained_token(a, http, "dave", before)
    await asyncio.wait_for(drain, 10)
    for i in (1, 2, 3):
        status, body = await api(http, b, "POST", f"/v1/connections/{sid}/messages", data=f"p{i}")
        assert (status, body) == (200, {"delivered": 1, "buffered": 1})
    status, body = await api(http, b, "POST", "/v1/users/dave/messages", data="p4")
    assert status == 200 and body["delivered"] == 1 and body["buffered"] == 1
    status, rec = await api(http, b, "GET", f"/v1/connections/{sid}")
    assert status == 200 and rec["state"] == "detached"
    ws = await http.ws_connect(f"{b.url}/ws?access_token={jwt_for('dave')}&resume={token}")
    got = list(before)
    while len(got) < 30:
        got.append((await ws.receive(timeout=5)).data)
    pushed = [m for m in got if m.startswith("p")]
    assert pushed == ["p1", "p2", "p3", "p4"]
    contiguous("s", [m for m in got if m.startswith("s")])
    # The pushes came before anything the new upstream sent.
    last_replayed = max(int(m[1:]) for m in got[:got.index("p4")] if m.startswith("s")) if any(
        m.startswith("s") for m in got[:got.index("p4")]) else 0
    assert all(int(m[1:]) > last_replayed for m in got[got.index("p4") + 1:] if m.startswith("s"))
    await ws.close()


async def test_a_full_buffer_tells_the_caller_and_the_resume_is_refused_whole(gateway, redis_server, numbered,
                                                                             http):
    numbered.interval_s = 3600   # only the first message: the buffer holds exactly what the test pushes
    a, b = await two_nodes(gateway, redis_server, numbered.url, replay_max_messages=2)
    token, sid, drain = await drained_token(a, http, "erin")
    await asyncio.wait_for(drain, 10)
    statuses = [(await api(http, b, "POST", f"/v1/connections/{sid}/messages", data=f"p{i}"))[0] for i in range(3)]
    assert statuses == [200, 200, 507]
    raw = await RawClient.connect(f"{b.url}/ws?access_token={jwt_for('erin')}&resume={token}")
    assert raw.status == 410
    assert b"overflowed" in await raw.reader.read()


async def test_readiness_goes_at_once_new_clients_are_taken_for_announce_s_then_refused(gateway, backend, http):
    b = await backend()
    gw = await gateway(proxy_config(b.url, drain={"timeout_s": 5, "announce_s": 0.6}))
    early = await http.ws_connect(gw.url + "/ws")
    drain = asyncio.ensure_future(gw.stop())
    await until(lambda: asyncio.sleep(0, gw.node.draining), what="drain started")
    async with http.get(gw.admin_url + "/readyz") as r:
        assert r.status == 503
    async with http.get(gw.admin_url + "/v1/nodes", headers=AUTH) as r:
        (me,) = (await r.json())["nodes"]
        assert me["state"] == "draining"
    assert metrics.draining._value.get() == 1
    late = await http.ws_connect(gw.url + "/ws")     # inside announce_s: still accepted
    await late.send_str("x")
    assert (await late.receive(timeout=5)).data == "x"

    async def refused():
        raw = await RawClient.connect(gw.url + "/ws")
        raw.close()
        return raw if raw.status == 503 else None
    raw = await until(refused, what="upgrades refused after announce_s")
    assert raw.headers.get("retry-after")
    for ws in (early, late):   # no Redis: nothing outlives the process, so no token
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1012, "going away")
    await asyncio.wait_for(drain, 10)


async def test_an_http_backend_session_resumes_without_a_second_connect_event(gateway, redis_server, http,
                                                                               http_peer):
    from aiohttp import web

    async def answer(request, body):
        if request.headers.get("Gateway-Event") == "message":
            return web.Response(body=b"re:" + body, content_type="text/plain")
        return web.Response(status=204)

    peer = await http_peer(answer)
    nodes = []
    for name in ("node-a", "node-b"):
        cfg = node_cfg(name, redis_server.url, "ws://127.0.0.1:1/unused")
        cfg["backends"] = {"h": {"type": "http", "endpoints": [peer.url]}}
        cfg["routes"] = [{"name": "r", "match": {"path": "/ws"}, "auth": "required", "backend": "h",
                          "events": {"connect": "h", "disconnect": "h"}}]
        nodes.append(await gateway(cfg))
    a, b = nodes
    ws = await http.ws_connect(f"{a.url}/ws?access_token={jwt_for('frank')}")
    await ws.send_str("m1")
    assert (await ws.receive(timeout=5)).data == "re:m1"
    drain = asyncio.ensure_future(a.stop())
    msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1012)
    await asyncio.wait_for(drain, 10)
    ws = await http.ws_connect(f"{b.url}/ws?access_token={jwt_for('frank')}&resume={msg.extra[len('resume='):]}")
    await ws.send_str("m2")
    assert (await ws.receive(timeout=5)).data == "re:m2"
    events = [r.event for r in peer.requests]
    assert events == ["connect", "message", "message"]   # no disconnect at the drain, no second connect
    first, second = (r for r in peer.requests if r.event == "message")
    assert first.headers["Gateway-Session-Id"] == second.headers["Gateway-Session-Id"]
    assert "Gateway-Resumed" not in first.headers and second.headers["Gateway-Resumed"] == "1"
    await ws.close()
    await until(lambda: asyncio.sleep(0, [r.event for r in peer.requests][-1:] == ["disconnect"]),
                what="one disconnect event when the resumed session ends")
    assert [r.event for r in peer.requests].count("disconnect") == 1


async def test_with_redis_down_the_drain_closes_without_a_token_and_says_so(gateway, redis_server, numbered, http):
    a = await gateway(node_cfg("node-a", redis_server.url, numbered.url))
    ws = await http.ws_connect(f"{a.url}/ws?access_token={jwt_for('gina')}")
    await ws.receive(timeout=5)
    redis_server.stop()
    try:
        drain = asyncio.ensure_future(a.stop())
        msg = await ws.receive(timeout=10)
        while msg.type == WSMsgType.TEXT:
            msg = await ws.receive(timeout=10)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1012, "going away")
        await asyncio.wait_for(drain, 20)
    finally:
        redis_server.start()


async def test_a_resume_that_fails_half_way_does_not_burn_the_session(gateway, redis_server, numbered, http):
    """The backend refuses the reopened upstream: 502, and the token still works once it is back.
    A resume leased by a node that then vanished: 503 with Retry-After until the lease runs out."""
    a, b = await two_nodes(gateway, redis_server, numbered.url)
    seen = []
    token, sid, drain = await drained_token(a, http, "hank", seen)
    await asyncio.wait_for(drain, 10)
    numbered.refuse = 503
    raw = await RawClient.connect(f"{b.url}/ws?access_token={jwt_for('hank')}&resume={token}")
    assert raw.status == 502
    numbered.refuse = None
    # Another node takes the lease and dies before finishing.
    from gateway.store.detached import OK
    from gateway import tokens as tk

    _, th = tk.parse(token)

    async def taken():
        # The 502 leaves before node B has released its lease: until then a take is LEASED.
        status, _ = await b.cluster.store.detached.take(sid, th, "hank", "vanished-node", 0.5)
        return status == OK
    await until(taken, what="the lease of the failed attempt released, then taken by another node")
    raw = await RawClient.connect(f"{b.url}/ws?access_token={jwt_for('hank')}&resume={token}")
    assert raw.status == 503 and raw.headers.get("retry-after")

    async def resumed():
        ws = await http.ws_connect(f"{b.url}/ws?access_token={jwt_for('hank')}&resume={token}")
        return ws
    with_retry = None
    for _ in range(50):
        try:
            with_retry = await resumed()
            break
        except Exception:
            await asyncio.sleep(0.05)
    assert with_retry is not None, "the session could not be resumed after the lease ran out"
    while len(seen) < 30:
        seen.append((await with_retry.receive(timeout=5)).data)
    contiguous("s", seen)
    await with_retry.close()


async def test_an_expired_token_is_410(gateway, redis_server, numbered, http):
    a, b = await two_nodes(gateway, redis_server, numbered.url, resume_window_s=0.2)
    token, sid, drain = await drained_token(a, http, "ivy")
    await asyncio.wait_for(drain, 10)

    async def due():   # past the window: listed as due, or already expired by a node's sweep
        store = b.cluster.store.detached
        return sid in await store.due(10) or await store.get(sid) is None
    await until(due, timeout_s=5, what="the window to end")
    raw = await RawClient.connect(f"{b.url}/ws?access_token={jwt_for('ivy')}&resume={token}")
    assert raw.status == 410
    assert b"window has ended" in await raw.reader.read()


async def test_the_close_log_line_keeps_the_session_id_not_the_resume_secret(gateway, redis_server, numbered, http,
                                                                           caplog):
    a, b = await two_nodes(gateway, redis_server, numbered.url)
    with caplog.at_level(logging.INFO, logger="gateway"):
        token, sid, drain = await drained_token(a, http, "olga")
        await asyncio.wait_for(drain, 10)
    closes = [r.fields for r in caplog.records if getattr(r, "fields", {}).get("event") == "close"]
    assert closes and all(tokens.REASON_PREFIX + token not in str(f) for f in closes)
    assert token.split(".", 1)[1] not in caplog.text + str(closes)
    assert any(f["reason"] == f"resume={sid}.<redacted>" for f in closes)


async def test_a_push_to_a_session_being_drained_is_replayed_once(gateway, redis_server, numbered, http):
    """After its 1012 a session is parked in the store and still captured on its node: a channel
    or user push reaches it once, through whichever path, from its own node or another."""
    a, b = await two_nodes(gateway, redis_server, numbered.url)
    raw = await RawClient.connect(f"{a.url}/ws?access_token={jwt_for('pia')}")
    assert raw.status == 101
    sid = sid_of(a)
    status, _ = await api(http, a, "PUT", f"/v1/connections/{sid}/channels/room")
    assert status == 200
    drain = asyncio.ensure_future(a.stop())
    while True:   # the client has the 1012 and does not answer yet: the session is captured
        op, _, payload = await raw.recv_frame()
        if op == frames.OP_CLOSE:
            token = payload[2:].decode().removeprefix("resume=")
            break
    answers = []
    for gw, path, body in ((a, "/v1/channels/room/messages", "pushed-on-a"),
                           (b, "/v1/channels/room/messages", "pushed-on-b"),
                           (a, "/v1/users/pia/messages", "to-pia-on-a")):
        status, answer = await api(http, gw, "POST", path, data=body)
        assert status == 200
        answers.append(answer)
    raw.send_frame(frames.OP_CLOSE, frames.close_payload(1000, ""))
    await asyncio.wait_for(drain, 10)
    resumed = await RawClient.connect(f"{b.url}/ws?access_token={jwt_for('pia')}&resume={token}")
    assert resumed.status == 101
    got = []
    pushes = ("pushed-on-a", "pushed-on-b", "to-pia-on-a")
    while sum(got.count(p) for p in pushes) < 3 or len(got) < 100:
        op, _, payload = await resumed.recv_frame()
        got.append(payload.decode())
    assert [got.count(p) for p in pushes] == [1, 1, 1], answers
    assert [x["delivered"] for x in answers] == [1, 1, 1]
    resumed.close()
