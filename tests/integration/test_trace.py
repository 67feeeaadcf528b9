"""The debug trace through a real gateway: a websocket backend, an HTTP
backend, a session on another node (docs/debug-trace.md)."""

from __future__ import annotations

import json
import signal

import pytest
from aiohttp import WSMsgType, web

from gateway import trace
from gateway.relay import Session
from gateway.traced import TracedSession

from ..conftest import proxy_config
from ..helpers import until
from ..httppeer import http_peer  # noqa: F401  (fixture)
from .test_lifecycle import Proc

TOKEN = "trace-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
JWT = ("eyJhbGciOiJIUzI1NiIsInR5cCI6IkpXVCJ9.eyJzdWIiOiJhbGljZSJ9."
       "kq3hS7c2Wb0yQ9xM1nF8pZ4tR6uV5eL3jH2gD1sA0oI")


@pytest.fixture(autouse=True)
def env(monkeypatch):
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)


async def api(http, gw, method: str, path: str, **kw):
    async with http.request(method, gw.admin_url + path, headers={**AUTH, **kw.pop("headers", {})}, **kw) as r:
        return r.status, await r.json()


async def connect(http, gw, path: str):
    """A client through `gw` (no compression: heads are then the payloads) and its session."""
    before = set(gw.node.sessions)
    ws = await http.ws_connect(gw.url + path, compress=0)
    await ws.send_str("first")
    assert (await ws.receive(timeout=5)).data.endswith("first")
    (cid,) = set(gw.node.sessions) - before
    return ws, gw.node.sessions[cid]


def data_frames(body: dict) -> list[tuple]:
    """(dir, opcode, fin, size) of the data and close frames (keepalive pings left out)."""
    return [(f["dir"], f["opcode"], f["fin"], f["size"]) for f in body["frames"]
            if f["opcode"] not in ("ping", "pong")]


async def trace_ended(http, gw, cid: str, why: str) -> dict:
    async def ended():
        status, body = await api(http, gw, "GET", f"/v1/connections/{cid}/trace")
        return body if status == 200 and body["ended"] == why else None
    return await until(ended, what=f"trace ended ({why})")


async def test_a_websocket_session_traced_both_ways_in_order_and_redacted(gateway, backend, http):
    b = await backend(compress=False)
    gw = await gateway(proxy_config(b.url))
    ws, s = await connect(http, gw, "/ws")
    status, body = await api(http, gw, "POST", f"/v1/connections/{s.id}/trace", json={"max_frames": 50})
    assert (status, body) == (200, {"connection": s.id, "session": s.session_id, "tracing": True,
                                    "max_frames": 50, "max_s": 60.0})
    assert type(s) is TracedSession
    await ws.send_str("hello")
    assert (await ws.receive(timeout=5)).data == "hello"
    await ws.send_bytes(b"\x00\x01\x02" * 100)
    assert (await ws.receive(timeout=5)).data == b"\x00\x01\x02" * 100
    login = json.dumps({"type": "login", "token": JWT, "password": "hunter2"})
    await ws.send_str(login)
    assert (await ws.receive(timeout=5)).data == login
    status, _ = await api(http, gw, "POST", f"/v1/connections/{s.id}/messages", data=f"pushed {JWT}",
                          headers={"Content-Type": "text/plain"})
    assert status == 200
    assert (await ws.receive(timeout=5)).data == f"pushed {JWT}"

    status, body = await api(http, gw, "GET", f"/v1/connections/{s.session_id}/trace")   # by session id too
    assert status == 200 and body["active"] is True and body["ended"] is None
    assert body["connection"] == s.id and body["max_frames"] == 50
    n = len(login)
    assert data_frames(body) == [("up", "text", True, 5), ("down", "text", True, 5),
                                 ("up", "binary", True, 300), ("down", "binary", True, 300),
                                 ("up", "text", True, n), ("down", "text", True, n),
                                 ("down", "text", True, 7 + len(JWT))]
    heads = [f["head"] for f in body["frames"] if f["opcode"] not in ("ping", "pong")]
    assert heads[:4] == ["hello", "hello", "000102" * 16, "000102" * 16]
    assert heads[4] == heads[5] == '{"type": "login", "token": [redacted]'
    assert heads[6] == "pushed [redacted]"
    assert "eyJ" not in json.dumps(body) and "hunter2" not in json.dumps(body)
    times = [f["t_ms"] for f in body["frames"]]
    assert times == sorted(times) and times[0] >= 0
    assert abs(body["started"] - s.trace.started) < 1e-6

    await ws.close()
    body = await trace_ended(http, gw, s.id, "closed")
    assert body["active"] is False
    assert data_frames(body)[-2:] == [("up", "close", True, 2), ("down", "close", True, 2)]
    assert [f["head"] for f in body["frames"]][-2:] == ["1000", "1000"]
    assert type(s) is Session


async def test_an_http_backend_session_and_the_gateways_own_close(gateway, http, http_peer):  # noqa: F811
    async def reply(request, body):
        return web.Response(body=b"re:" + body, content_type=request.content_type)

    peer = await http_peer(reply)
    gw = await gateway({"backends": {"api": {"type": "http", "endpoints": [peer.url]}},
                        "routes": [{"name": "api", "match": {"path": "/api"}, "auth": "none", "backend": "api"}]})
    ws, s = await connect(http, gw, "/api")
    assert (await api(http, gw, "POST", f"/v1/connections/{s.id}/trace"))[0] == 200
    await ws.send_str('{"api_key":"k-12345","q":1}')
    assert (await ws.receive(timeout=5)).data == 're:{"api_key":"k-12345","q":1}'
    status, _ = await api(http, gw, "DELETE", f"/v1/connections/{s.id}?code=4000&reason=bye")
    assert status == 200
    msg = await ws.receive(timeout=5)
    assert (msg.type, msg.data) == (WSMsgType.CLOSE, 4000)
    body = await trace_ended(http, gw, s.id, "closed")
    assert data_frames(body)[:3] == [("up", "text", True, 27), ("down", "text", True, 30),
                                     ("down", "close", True, 5)]
    heads = [f["head"] for f in body["frames"]]
    assert heads[:3] == ['{"api_key":[redacted],"q":1}', 're:{"api_key":[redacted],"q":1}', "4000 bye"]
    assert body["max_frames"] == trace.DEFAULT_FRAMES and body["max_s"] == trace.DEFAULT_S


async def test_the_bounds_switch_it_off_and_the_plain_relay_comes_back(gateway, backend, http):
    b = await backend(compress=False)
    gw = await gateway(proxy_config(b.url))
    ws, s = await connect(http, gw, "/ws")
    assert (await api(http, gw, "POST", f"/v1/connections/{s.id}/trace", json={"max_frames": 3}))[0] == 200
    for i in range(4):
        await ws.send_str(f"m{i}")
        assert (await ws.receive(timeout=5)).data == f"m{i}"
    body = await trace_ended(http, gw, s.id, "max_frames")
    assert [f["head"] for f in body["frames"]] == ["m0", "m0", "m1"]
    assert type(s) is Session and s.trace is None
    assert s.transport.get_protocol().data_received.__func__ is Session.from_client_relay
    assert s.up.get_protocol().data_received.__func__ is Session.from_upstream

    # a finished trace is replaced by the next one; this one ends by its time bound
    status, _ = await api(http, gw, "POST", f"/v1/connections/{s.id}/trace", json={"max_s": 0.2})
    assert status == 200
    body = await trace_ended(http, gw, s.id, "max_s")
    assert body["max_s"] == 0.2 and type(s) is Session
    await ws.send_str("after")
    assert (await ws.receive(timeout=5)).data == "after"


async def test_stop_conflict_and_no_trace(gateway, http):
    gw = await gateway({"backends": {"echo": {"type": "builtin", "handler": "echo"}},
                        "routes": [{"name": "echo", "match": {"path": "/echo"}, "auth": "none", "backend": "echo"}]})
    ws, s = await connect(http, gw, "/echo")
    path = f"/v1/connections/{s.id}/trace"
    status, body = await api(http, gw, "GET", path)
    assert status == 404 and "no trace" in body["error"]
    assert (await api(http, gw, "POST", path, json={"max_frames": 10}))[0] == 200
    status, body = await api(http, gw, "POST", path, json={"max_frames": 10})
    assert status == 409 and "running" in body["error"]
    await ws.send_str("x")
    await ws.receive(timeout=5)
    status, body = await api(http, gw, "DELETE", path)
    assert status == 200 and body["ended"] == "stopped" and body["active"] is False
    assert data_frames(body) == [("up", "text", True, 1), ("down", "text", True, 1)]
    assert type(s) is Session
    status, again = await api(http, gw, "DELETE", path)     # stopping a stopped one: as it was
    assert status == 200 and again["ended"] == "stopped"
    await ws.send_str("y")
    await ws.receive(timeout=5)
    assert len((await api(http, gw, "GET", path))[1]["frames"]) == 2   # nothing recorded after it stopped


async def test_bad_bodies_unknown_ids_the_cap_and_the_token(gateway, http):
    gw = await gateway({"backends": {"echo": {"type": "builtin", "handler": "echo"}},
                        "routes": [{"name": "echo", "match": {"path": "/echo"}, "auth": "none", "backend": "echo"}]})
    ws, s = await connect(http, gw, "/echo")
    path = f"/v1/connections/{s.id}/trace"
    for data, needle in (("not json", "not JSON"), ("[1]", "JSON object"), ('{"max_frames": 0}', "max_frames"),
                         ('{"max_frames": 10001}', "10000"), ('{"max_s": 601}', "600"), ('{"max_s": -1}', "max_s"),
                         ('{"max_frames": "5"}', "max_frames"), ('{"frames": 5}', "unknown field")):
        status, body = await api(http, gw, "POST", path, data=data)
        assert status == 400 and needle in body["error"], data
    assert s.trace is None
    for method in ("POST", "GET", "DELETE"):
        status, body = await api(http, gw, method, "/v1/connections/nope/trace")
        assert status == 404 and body["error"] == "unknown connection", method
    async with http.post(gw.admin_url + path) as r:
        assert r.status == 401
    async with http.get(gw.admin_url + path, headers={"Authorization": "Bearer wrong"}) as r:
        assert r.status == 401

    clients = [ws]
    try:
        assert (await api(http, gw, "POST", path))[0] == 200
        for _ in range(trace.MAX_ACTIVE):
            other, o = await connect(http, gw, "/echo")
            clients.append(other)
            status, body = await api(http, gw, "POST", f"/v1/connections/{o.id}/trace")
            if len(clients) <= trace.MAX_ACTIVE:
                assert status == 200
            else:
                assert status == 429 and f"max {trace.MAX_ACTIVE}" in body["error"]
                assert o.trace is None and type(o) is Session
        assert (await api(http, gw, "DELETE", path))[0] == 200      # one slot free again
        assert (await api(http, gw, "POST", f"/v1/connections/{o.id}/trace"))[0] == 200
    finally:
        for c in clients:
            await c.close()
    await trace_ended(http, gw, o.id, "closed")
    status, body = await api(http, gw, "POST", f"/v1/connections/{o.id}/trace")
    assert status == 410 and body["error"] == "connection closed"


def cluster_config(node_id: str, redis_url: str) -> dict:
    return {"node_id": node_id,
            "redis": {"url": redis_url, "heartbeat_s": 0.2, "node_ttl_s": 1, "request_timeout_s": 1,
                      "timeout_s": 0.5},
            "backends": {"echo": {"type": "builtin", "handler": "echo"}},
            "routes": [{"name": "echo", "match": {"path": "/echo"}, "auth": "none", "backend": "echo"}]}


async def test_a_session_on_another_node(gateway, redis_server, http):
    g1 = await gateway(cluster_config("t1", redis_server.url))
    g2 = await gateway(cluster_config("t2", redis_server.url))
    ws, s = await connect(http, g2, "/echo")
    path = f"/v1/connections/{s.id}/trace"

    async def known():   # its record reaches the store in the next batch
        return (await api(http, g1, "GET", f"/v1/connections/{s.id}"))[0] == 200
    await until(known)
    status, body = await api(http, g1, "POST", path, json={"max_frames": 20})
    assert (status, body) == (200, {"connection": s.id, "session": s.session_id, "tracing": True,
                                    "max_frames": 20, "max_s": 60.0})
    assert type(s) is TracedSession and g1.cluster.delivery.traces.active() == 0
    assert (await api(http, g1, "POST", path))[0] == 409
    await ws.send_str(f"bearer {JWT}")
    await ws.receive(timeout=5)
    status, body = await api(http, g1, "GET", f"/v1/connections/{s.session_id}/trace")
    assert status == 200 and set(body) == {"connection", "session", "active", "ended", "started", "max_frames",
                                           "max_s", "frames"}
    assert data_frames(body) == [("up", "text", True, 7 + len(JWT)), ("down", "text", True, 7 + len(JWT))]
    assert body["frames"][0]["head"] == "bearer [redacted]"
    await ws.close()
    # The session is gone from the store; its trace, kept on t2, is still found from t1.
    body = await trace_ended(http, g1, s.id, "closed")
    assert len(body["frames"]) >= 2


async def test_a_trace_follows_the_session_to_another_upstream(gateway, backend, http):
    a, b = await backend(compress=False), await backend(compress=False)
    gw = await gateway(proxy_config(a.url, b.url, backend={"on_upstream_close": "reattach"}))
    ws, s = await connect(http, gw, "/ws")
    first = s.endpoint.url
    assert (await api(http, gw, "POST", f"/v1/connections/{s.id}/trace"))[0] == 200
    await ws.send_str("before")
    assert (await ws.receive(timeout=5)).data == "before"
    status, _ = await api(http, gw, "POST", "/v1/backends/b/endpoints/drain", json={"endpoint": first})
    assert status == 202
    await until(lambda: _moved(s, first), what="the session moved")
    await ws.send_str("after")
    assert (await ws.receive(timeout=5)).data == "after"
    status, body = await api(http, gw, "GET", f"/v1/connections/{s.id}/trace")
    texts = [(f["dir"], f["head"]) for f in body["frames"] if f["opcode"] == "text"]
    assert texts == [("up", "before"), ("down", "before"), ("up", "after"), ("down", "after")]
    assert s.up.get_protocol().data_received.__func__ is TracedSession.from_upstream


async def _moved(s, first: str) -> bool:
    return s.endpoint is not None and s.endpoint.url != first and s.move is None


async def test_a_node_that_does_not_answer_is_named_with_504(gateway, redis_server, http, http_peer,  # noqa: F811
                                                              tmp_path):
    events = await http_peer()
    cfg = {"redis": {"url": redis_server.url, "heartbeat_s": 0.2, "node_ttl_s": 30, "request_timeout_s": 0.5,
                     "timeout_s": 0.5},
           "backends": {"app": {"type": "http", "endpoints": [events.url]}},
           "routes": [{"name": "app", "match": {"path": "/app"}, "auth": "none", "backend": "app",
                       "events": {"connect": "app"}}]}
    g1 = await gateway(dict(cfg, node_id="t1"))
    other = Proc(tmp_path, dict(cfg, node_id="t-stopped"), name="t-stopped")
    try:
        await other.ready(http)
        ws = await http.ws_connect(other.url + "/app")

        async def connected():
            got = events.of("connect")
            return got[0].headers["Gateway-Connection-Id"] if got else None
        cid = await until(connected, what="the connect event")

        async def traced():
            status, body = await api(http, g1, "POST", f"/v1/connections/{cid}/trace")
            return body if status == 200 else None
        assert (await until(traced, what="a trace started through t1"))["connection"] == cid
        other.p.send_signal(signal.SIGSTOP)
        try:
            status, body = await api(http, g1, "GET", f"/v1/connections/{cid}/trace")
            assert status == 504 and body["node"] == "t-stopped", body
        finally:
            other.p.send_signal(signal.SIGCONT)
        status, body = await api(http, g1, "GET", f"/v1/connections/{cid}/trace")
        assert status == 200 and body["active"] is True
        await ws.close()
    finally:
        other.stop()
