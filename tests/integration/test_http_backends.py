"""HTTP backends: each message a POST, replies back, order, events, splits."""

from __future__ import annotations

import asyncio

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from gateway.session import State

from ..httppeer import eventually, http_peer  # noqa: F401  (fixture)


def http_config(routes: list[dict], **backends) -> dict:
    return {"backends": {name: {"type": "http", "endpoints": [url], **extra} for name, (url, extra) in
                         backends.items()},
            "routes": routes}


def echo_reply(prefix: bytes = b""):
    async def handler(request, body):
        return web.Response(body=prefix + body, content_type=request.content_type)
    return handler


async def test_actions_split_across_two_backends_with_exact_requests(gateway, http, http_peer):
    orders = await http_peer(echo_reply(b"orders:"))
    quotes = await http_peer(echo_reply(b"quotes:"))
    gw = await gateway(http_config(
        [{"name": "api", "match": {"path": "/api"}, "auth": "none", "select": "$.action",
          "actions": {"buy": "orders", "quote": "quotes", "$default": "orders"}}],
        orders=(orders.url, {}), quotes=(quotes.url, {})))
    async with http.ws_connect(gw.url + "/api") as ws:
        await ws.send_str('{"action":"buy","qty":2}')
        assert (await ws.receive(timeout=5)).data == 'orders:{"action":"buy","qty":2}'
        await ws.send_str('{"action":"quote"}')
        assert (await ws.receive(timeout=5)).data == 'quotes:{"action":"quote"}'
        await ws.send_str('{"action":"unknown"}')
        assert (await ws.receive(timeout=5)).data == 'orders:{"action":"unknown"}'
        await ws.send_bytes(b"\x00\x01")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.BINARY, b"orders:\x00\x01")
    assert [r.body for r in orders.requests] == [b'{"action":"buy","qty":2}', b'{"action":"unknown"}', b"\x00\x01"]
    assert [r.body for r in quotes.requests] == [b'{"action":"quote"}']
    first = orders.requests[0]
    assert first.method == "POST" and first.path == "/events"
    h = first.headers
    assert h["Content-Type"] == "text/plain; charset=utf-8"
    assert h["Gateway-Event"] == "message"
    assert h["Gateway-Route"] == "api"
    assert h["Gateway-Client-IP"] == "127.0.0.1"
    # A session is not a connection: each has its own id.
    assert h["Gateway-Connection-Id"] and h["Gateway-Session-Id"]
    assert h["Gateway-Session-Id"] != h["Gateway-Connection-Id"]
    assert not [k for k in h if k.lower().startswith("gateway-claim-")]     # auth: none
    assert orders.requests[2].headers["Content-Type"] == "application/octet-stream"
    # One connection: the same id at both backends.
    assert quotes.requests[0].headers["Gateway-Connection-Id"] == h["Gateway-Connection-Id"]


async def test_unknown_action_without_default_gets_error_message(gateway, http, http_peer):
    orders = await http_peer(echo_reply())
    gw = await gateway(http_config(
        [{"name": "api", "match": {"path": "/api"}, "auth": "none", "select": "$.action",
          "actions": {"buy": "orders"}, "error_message": '{"error":"unknown action"}'}],
        orders=(orders.url, {})))
    async with http.ws_connect(gw.url + "/api") as ws:
        await ws.send_str('{"action":"sell"}')
        assert (await ws.receive(timeout=5)).data == '{"error":"unknown action"}'
        await ws.send_bytes(b"bin")
        assert (await ws.receive(timeout=5)).data == '{"error":"unknown action"}'
        await ws.send_str('{"action":"buy"}')
        assert (await ws.receive(timeout=5)).data == '{"action":"buy"}'
    assert [r.body for r in orders.requests if r.event == "message"] == [b'{"action":"buy"}']
    async with http.get(gw.admin_url + "/metrics") as r:
        assert 'gateway_unrouted_messages_total{route="api"} 2.0' in await r.text()


async def test_reply_kinds_204_and_binary_content_type(gateway, http, http_peer):
    async def handler(request, body):
        if body == b"quiet":
            return web.Response(status=204)
        if body == b"bin":
            return web.Response(body=b"\x01\x02", content_type="application/octet-stream")
        return web.Response(text="ok")

    b = await http_peer(handler)
    gw = await gateway(http_config([{"name": "r", "match": {"path": "/h"}, "auth": "none", "backend": "b"}],
                                   b=(b.url, {})))
    async with http.ws_connect(gw.url + "/h") as ws:
        await ws.send_str("quiet")
        await ws.send_str("bin")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.BINARY, b"\x01\x02")     # nothing came for the 204
        await ws.send_str("x")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "ok")


async def test_messages_reach_backend_in_order_one_at_a_time(gateway, http, http_peer):
    async def slow(request, body):
        await asyncio.sleep(0.02 if body.endswith(b"0") else 0)
        return web.Response(status=204)

    b = await http_peer(slow)
    gw = await gateway(http_config([{"name": "r", "match": {"path": "/h"}, "auth": "none", "backend": "b"}],
                                   b=(b.url, {"max_queue": 100})))
    async with http.ws_connect(gw.url + "/h") as ws:
        for i in range(50):
            await ws.send_str(f"m{i}")
        await eventually(lambda: len(b.requests) == 50)
    assert [r.body for r in b.requests if r.event == "message"] == [f"m{i}".encode() for i in range(50)]
    assert b.max_in_flight == 1


async def test_two_connections_are_not_serialised_behind_each_other(gateway, http, http_peer):
    release = asyncio.Event()

    async def handler(request, body):
        if body == b"block":
            await release.wait()
        return web.Response(text=body.decode())

    b = await http_peer(handler)
    gw = await gateway(http_config([{"name": "r", "match": {"path": "/h"}, "auth": "none", "backend": "b"}],
                                   b=(b.url, {})))
    async with http.ws_connect(gw.url + "/h") as one, http.ws_connect(gw.url + "/h") as two:
        await one.send_str("block")
        await two.send_str("free")
        assert (await two.receive(timeout=5)).data == "free"
        release.set()
        assert (await one.receive(timeout=5)).data == "block"


async def test_queue_overflow_closes_1013(gateway, http, http_peer):
    release = asyncio.Event()

    async def handler(request, body):
        await release.wait()
        return web.Response(status=204)

    b = await http_peer(handler)
    gw = await gateway(http_config([{"name": "r", "match": {"path": "/h"}, "auth": "none", "backend": "b"}],
                                   b=(b.url, {"max_queue": 3})))
    async with http.ws_connect(gw.url + "/h") as ws:
        for i in range(6):   # 1 in flight + 3 queued + 1 over
            await ws.send_str(str(i))
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1013)
    release.set()


async def test_5xx_and_timeout_are_counted_and_the_connection_stays(gateway, http, http_peer):
    async def handler(request, body):
        if body == b"fail":
            return web.Response(status=503, text="down")
        if body == b"slow":
            await asyncio.sleep(2)
        return web.Response(text="fine")

    b = await http_peer(handler)
    gw = await gateway(http_config([{"name": "r", "match": {"path": "/h"}, "auth": "none", "backend": "b"}],
                                   b=(b.url, {"timeout_s": 0.2})))
    async with http.ws_connect(gw.url + "/h") as ws:
        await ws.send_str("fail")
        await ws.send_str("slow")
        await ws.send_str("ok")
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "fine")
    async with http.get(gw.admin_url + "/metrics") as r:
        text = await r.text()
    assert 'gateway_http_backend_requests_total{backend="b",event="message",result="server_error"} 1.0' in text
    assert 'gateway_http_backend_requests_total{backend="b",event="message",result="timeout"} 1.0' in text


async def test_unreachable_backend_keeps_the_connection(gateway, http, http_peer):
    gw = await gateway(http_config([{"name": "r", "match": {"path": "/h"}, "auth": "none", "backend": "b"}],
                                   b=("http://127.0.0.1:1/x", {"connect_timeout_s": 0.5})))
    async with http.ws_connect(gw.url + "/h") as ws:
        await ws.send_str("lost")
        await ws.send_str("lost too")
        await ws.ping()
        with pytest.raises(asyncio.TimeoutError):
            await ws.receive(timeout=0.3)
        assert not ws.closed


async def test_reply_headers_subscribe_and_unsubscribe(gateway, http, http_peer):
    async def handler(request, body):
        if body == b"join":
            return web.Response(status=204, headers={"Gateway-Subscribe": "news, sport"})
        if body == b"leave":
            return web.Response(text="left", headers={"Gateway-Unsubscribe": "sport"})
        return web.Response(status=204)

    b = await http_peer(handler)
    gw = await gateway(http_config([{"name": "r", "match": {"path": "/h"}, "auth": "none", "backend": "b"}],
                                   b=(b.url, {})))
    async with http.ws_connect(gw.url + "/h") as ws:
        await ws.send_str("join")
        await eventually(lambda: len(b.requests) == 1 and b.in_flight == 0)
        await eventually(lambda: gw.node.channels.count("sport") == 1)
        async with http.post(gw.admin_url + "/v1/channels/sport/messages", data="goal") as r:
            assert await r.json() == {"delivered": 1}
        assert (await ws.receive(timeout=5)).data == "goal"
        await ws.send_str("leave")
        assert (await ws.receive(timeout=5)).data == "left"
        assert gw.node.channels.count("sport") == 0 and gw.node.channels.count("news") == 1


async def test_connect_event_refuses_with_its_status(gateway, http, http_peer):
    async def handler(request, body):
        if request.headers.get("Gateway-Path") == "/h?room=1":
            return web.Response(status=403, text="no")
        return web.Response(status=204)

    ev = await http_peer(handler)
    gw = await gateway({"backends": {"ev": {"type": "http", "endpoints": [ev.url]},
                                     "echo": {"type": "builtin", "handler": "echo"}},
                        "routes": [{"name": "r", "match": {"path": "/h"}, "auth": "none", "backend": "echo",
                                    "events": {"connect": "ev", "disconnect": "ev"}}]})
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await http.ws_connect(gw.url + "/h?room=1", headers={"X-App": "7", "Gateway-Claim-sub": "forged"})
    assert exc.value.status == 403
    (req,) = ev.requests
    assert req.event == "connect"
    assert req.headers["X-App"] == "7"
    assert req.headers["Gateway-Path"] == "/h?room=1"
    assert "Gateway-Claim-sub" not in req.headers
    # Never connected: no disconnect. A session that does connect and leave afterwards is
    # the barrier: its disconnect is the only one.
    async with http.ws_connect(gw.url + "/h?room=2"):
        pass
    await eventually(lambda: len(ev.of("disconnect")) >= 1)
    second = ev.of("connect")[1].headers["Gateway-Connection-Id"]
    assert [r.headers["Gateway-Connection-Id"] for r in ev.of("disconnect")] == [second]


async def test_connect_event_failure_is_502(gateway, http):
    gw = await gateway({"backends": {"ev": {"type": "http", "endpoints": ["http://127.0.0.1:1/x"]},
                                     "echo": {"type": "builtin", "handler": "echo"}},
                        "routes": [{"name": "r", "match": {"path": "/h"}, "auth": "none", "backend": "echo",
                                    "events": {"connect": "ev"}}]})
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await http.ws_connect(gw.url + "/h")
    assert exc.value.status == 502


async def test_connect_accept_sends_first_message_and_joins_channels(gateway, http, http_peer):
    async def handler(request, body):
        if request.headers["Gateway-Event"] == "connect":
            return web.Response(text='{"hello":true}', content_type="application/json",
                                headers={"Gateway-Subscribe": "lobby"})
        return web.Response(status=204)

    ev = await http_peer(handler)
    gw = await gateway({"backends": {"ev": {"type": "http", "endpoints": [ev.url]},
                                     "echo": {"type": "builtin", "handler": "echo"}},
                        "routes": [{"name": "r", "match": {"path": "/h"}, "auth": "none", "backend": "echo",
                                    "events": {"connect": "ev", "disconnect": "ev"}}]})
    async with http.ws_connect(gw.url + "/h") as ws:
        assert (await ws.receive(timeout=5)).data == '{"hello":true}'
        await ws.send_str("echoed")
        assert (await ws.receive(timeout=5)).data == "echoed"
        assert gw.node.channels.count("lobby") == 1
        await ws.close(code=4001, message=b"bye")
    await eventually(lambda: len(ev.of("disconnect")) == 1)
    (d,) = ev.of("disconnect")
    assert d.headers["Gateway-Close-Code"] == "4001"
    assert d.headers["Gateway-Connection-Id"] == ev.of("connect")[0].headers["Gateway-Connection-Id"]
    import json
    assert json.loads(d.body) == {"code": 4001, "reason": "bye", "by": "client"}


async def test_disconnect_follows_queued_messages_once_whatever_the_reason(gateway, http, http_peer):
    gate = asyncio.Event()

    async def handler(request, body):
        if body == b"m0":
            await gate.wait()
        return web.Response(status=204)

    b = await http_peer(handler)
    gw = await gateway(http_config([{"name": "r", "match": {"path": "/h"}, "auth": "none", "backend": "b",
                                     "events": {"disconnect": "b"}}], b=(b.url, {})))
    # 1. client vanishes with messages queued
    ws = await http.ws_connect(gw.url + "/h")
    for i in range(3):
        await ws.send_str(f"m{i}")
    await eventually(lambda: len(b.requests) == 1)
    await ws.close()
    # The gateway has seen the close while m0 is still at the backend.
    await eventually(lambda: all(x.state is not State.OPEN for x in gw.node.sessions.values()))
    gate.set()
    await eventually(lambda: len(b.of("disconnect")) == 1)
    assert [r.body for r in b.requests][:3] == [b"m0", b"m1", b"m2"]
    assert b.requests[3].event == "disconnect"
    # 2. closed through the API: code from the API
    async with http.ws_connect(gw.url + "/h") as ws2:
        await ws2.send_str("x")
        await eventually(lambda: len(b.of("message")) == 4)
        conn = b.requests[-1].headers["Gateway-Connection-Id"]
        async with http.delete(f"{gw.admin_url}/v1/connections/{conn}?code=4100&reason=kicked") as r:
            assert r.status == 200
        msg = await ws2.receive(timeout=5)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4100, "kicked")
    await eventually(lambda: len(b.of("disconnect")) == 2)
    assert b.of("disconnect")[1].headers["Gateway-Close-Code"] == "4100"
    assert b.of("disconnect")[1].headers["Gateway-Closed-By"] == "gateway"
    # Once only: a later session's disconnect is the barrier, and it is the third.
    async with http.ws_connect(gw.url + "/h"):
        pass
    await eventually(lambda: len(b.of("disconnect")) >= 3)
    assert len(b.of("disconnect")) == 3
    assert b.of("disconnect")[2].headers["Gateway-Close-Code"] == "1000"


async def test_disconnect_sent_for_sessions_closed_by_shutdown(gateway, http, http_peer):
    b = await http_peer()
    gw = await gateway(http_config([{"name": "r", "match": {"path": "/h"}, "auth": "none", "backend": "b",
                                     "events": {"disconnect": "b"}}], b=(b.url, {})))
    ws = await http.ws_connect(gw.url + "/h")
    stopping = asyncio.ensure_future(gw.stop())
    msg = await ws.receive(timeout=5)
    assert msg.type == WSMsgType.CLOSE
    await ws.close()
    await asyncio.wait_for(stopping, 10)
    gw.stopping.set()
    assert len(b.of("disconnect")) == 1


async def test_split_is_weighted_and_sticky_per_session(gateway, http, http_peer):
    a = await http_peer(echo_reply(b"a:"))
    z = await http_peer(echo_reply(b"z:"))
    gw = await gateway(http_config(
        [{"name": "r", "match": {"path": "/h"}, "auth": "none",
          "split": [{"backend": "a", "weight": 1}, {"backend": "z", "weight": 0}]}],
        a=(a.url, {}), z=(z.url, {})))
    for _ in range(5):
        async with http.ws_connect(gw.url + "/h") as ws:
            for i in range(3):
                await ws.send_str(str(i))
                assert (await ws.receive(timeout=5)).data == f"a:{i}"
    assert z.requests == [] and len(a.requests) == 15


async def test_split_picks_both_sides_and_keeps_each_session_on_one(gateway, http, http_peer):
    a = await http_peer(echo_reply(b"a:"))
    z = await http_peer(echo_reply(b"z:"))
    gw = await gateway(http_config(
        [{"name": "r", "match": {"path": "/h"}, "auth": "none",
          "split": [{"backend": "a", "weight": 1}, {"backend": "z", "weight": 1}]}],
        a=(a.url, {}), z=(z.url, {})))
    seen = set()
    for _ in range(40):
        async with http.ws_connect(gw.url + "/h") as ws:
            got = set()
            for i in range(3):
                await ws.send_str(str(i))
                got.add((await ws.receive(timeout=5)).data[0])
            assert len(got) == 1          # sticky for the session's life
            seen |= got
        if seen == {"a", "z"}:
            break
    assert seen == {"a", "z"}


JWT_SECRET = "j" * 64


def _token(sub: str, **claims) -> str:
    import time

    import jwt

    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600, **claims}, JWT_SECRET, algorithm="HS256")


def jwt_http_config(url: str) -> dict:
    return {"auth": {"jwt": {"algorithms": ["HS256"], "keys": {"secret_env": "ISSUE5_JWT_SECRET"},
                             "sources": ["header", "query:access_token"], "forward_claims": ["sub", "tenant"]}},
            "backends": {"b": {"type": "http", "endpoints": [url]}},
            "routes": [{"name": "r", "match": {"path": "/h"}, "auth": "required", "backend": "b",
                        "events": {"connect": "b", "disconnect": "b"}}]}


async def test_claims_reach_http_backend_and_credentials_do_not(gateway, http, http_peer, monkeypatch):
    monkeypatch.setenv("ISSUE5_JWT_SECRET", JWT_SECRET)
    b = await http_peer()
    gw = await gateway(jwt_http_config(b.url))
    token = _token("alice", tenant="acme", private="no")
    async with http.ws_connect(gw.url + f"/h?access_token={token}&room=7") as ws:
        await ws.send_str("hi")
        await eventually(lambda: len(b.of("message")) == 1)
    await eventually(lambda: len(b.of("disconnect")) == 1)
    for req in b.requests:
        assert req.headers["Gateway-Claim-sub"] == "alice"
        assert req.headers["Gateway-Claim-tenant"] == "acme"
        assert "Gateway-Claim-private" not in req.headers
    connect = b.of("connect")[0]
    assert connect.headers["Gateway-Path"] == "/h?room=7"          # the token is not passed on
    assert token not in str(dict(connect.headers))


async def test_events_around_a_websocket_route(gateway, backend, http, http_peer):
    async def handler(request, body):
        if request.headers["Gateway-Event"] == "connect":
            return web.Response(text="welcome", headers={"Gateway-Subscribe": "ops"})
        return web.Response(status=204)

    ev = await http_peer(handler)
    b = await backend()
    gw = await gateway({"backends": {"ev": {"type": "http", "endpoints": [ev.url]},
                                     "ws": {"type": "websocket", "endpoints": [b.url]}},
                        "routes": [{"name": "r", "match": {"path": "/w"}, "auth": "none", "backend": "ws",
                                    "events": {"connect": "ev", "disconnect": "ev"}}]})
    async with http.ws_connect(gw.url + "/w") as ws:
        assert (await ws.receive(timeout=5)).data == "welcome"    # before anything from the backend
        await ws.send_str("relayed")
        assert (await ws.receive(timeout=5)).data == "relayed"
        async with http.post(gw.admin_url + "/v1/channels/ops/messages", data="to ops") as r:
            assert await r.json() == {"delivered": 1}
        assert (await ws.receive(timeout=5)).data == "to ops"
    await eventually(lambda: len(ev.of("disconnect")) == 1)
    assert ev.of("disconnect")[0].headers["Gateway-Close-Code"] == "1000"


async def test_connect_accepted_but_upstream_down_still_sends_disconnect(gateway, http, http_peer):
    ev = await http_peer()
    gw = await gateway({"backends": {"ev": {"type": "http", "endpoints": [ev.url]},
                                     "ws": {"type": "websocket", "endpoints": ["ws://127.0.0.1:1/ws"]}},
                        "routes": [{"name": "r", "match": {"path": "/w"}, "auth": "none", "backend": "ws",
                                    "events": {"connect": "ev", "disconnect": "ev"}}]})
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await http.ws_connect(gw.url + "/w")
    assert exc.value.status == 502
    await eventually(lambda: len(ev.of("disconnect")) == 1)
    assert ev.of("disconnect")[0].headers["Gateway-Close-Code"] == "1006"
