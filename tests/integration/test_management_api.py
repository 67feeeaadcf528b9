"""The management API on one node: push, close, subscribe, presence, errors."""

from __future__ import annotations

import asyncio

import pytest
import yaml
from aiohttp import WSMsgType

from ..conftest import proxy_config
from ..httppeer import eventually

TOKEN = "s3cret-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}


def echo_config(**top) -> dict:
    cfg = {"backends": {"echo": {"type": "builtin", "handler": "echo"}},
           "routes": [{"name": "echo", "match": {"path": "/echo"}, "auth": "none", "backend": "echo"}]}
    cfg.update(top)
    return cfg


@pytest.fixture
async def gw(gateway, monkeypatch):
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    return await gateway(echo_config(limits={"max_message_bytes": 1000}))


async def conn_id(gw, ws) -> str:
    """The id of the session behind `ws` (the echo tells us it is live)."""
    await ws.send_str("who")
    await ws.receive(timeout=5)
    known = getattr(gw, "_known_ids", {})
    gw._known_ids = known
    if ws not in known:
        (new,) = [sid for sid in gw.node.sessions if sid not in known.values()]
        known[ws] = new
    return known[ws]


async def test_token_is_required(gw, http):
    for headers in ({}, {"Authorization": "Bearer wrong"}):
        async with http.get(gw.admin_url + "/v1/nodes", headers=headers) as r:
            assert r.status == 401
            assert "error" in await r.json()


async def test_push_text_and_binary_to_a_connection(gw, http):
    async with http.ws_connect(gw.url + "/echo") as ws:
        cid = await conn_id(gw, ws)
        url = f"{gw.admin_url}/v1/connections/{cid}/messages"
        async with http.post(url, data="hello", headers={**AUTH, "Content-Type": "text/plain"}) as r:
            assert (r.status, await r.json()) == (200, {"delivered": 1})
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "hello")
        async with http.post(url, data=b"\x00\xff", headers={**AUTH, "Content-Type": "application/octet-stream"}) as r:
            assert await r.json() == {"delivered": 1}
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.BINARY, b"\x00\xff")
        form = {**AUTH, "Content-Type": "application/x-www-form-urlencoded"}      # what curl --data sends
        async with http.post(url, data=b"from curl", headers=form) as r:
            assert r.status == 200
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data) == (WSMsgType.TEXT, "from curl")
        async with http.post(url + "?type=binary", data=b"abc", headers=AUTH) as r:
            assert r.status == 200
        assert (await ws.receive(timeout=5)).type == WSMsgType.BINARY


async def test_unknown_closed_and_too_big(gw, http):
    async with http.post(gw.admin_url + "/v1/connections/nope/messages", data="x", headers=AUTH) as r:
        assert r.status == 404
        assert (await r.json())["error"] == "unknown connection"
    ws = await http.ws_connect(gw.url + "/echo")
    cid = await conn_id(gw, ws)
    async with http.post(f"{gw.admin_url}/v1/connections/{cid}/messages", data="x" * 1001, headers=AUTH) as r:
        assert r.status == 413
        assert "max 1000" in (await r.json())["error"]
    await ws.close()
    await eventually(lambda: cid not in gw.node.sessions)
    for method, path in (("POST", f"/v1/connections/{cid}/messages"), ("GET", f"/v1/connections/{cid}"),
                         ("DELETE", f"/v1/connections/{cid}"), ("PUT", f"/v1/connections/{cid}/channels/a")):
        async with http.request(method, gw.admin_url + path, data="x", headers=AUTH) as r:
            assert r.status == 410, (method, path)
            body = await r.json()
            assert body["error"] == "connection closed" and body["code"] == 1000


async def test_close_with_code_and_reason_and_bad_codes(gw, http):
    async with http.ws_connect(gw.url + "/echo") as ws:
        cid = await conn_id(gw, ws)
        base = f"{gw.admin_url}/v1/connections/{cid}"
        for query in ("?code=abc", "?code=1005", "?code=1006", "?code=999", "?code=5000", "?reason=" + "x" * 124):
            async with http.delete(base + query, headers=AUTH) as r:
                assert r.status == 400, query
                assert "error" in await r.json()
        async with http.delete(base + "?code=4321&reason=maintenance", headers=AUTH) as r:
            assert (r.status, (await r.json())["code"]) == (200, 4321)
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 4321, "maintenance")


async def test_connection_record(gw, http):
    async with http.ws_connect(gw.url + "/echo") as ws:
        cid = await conn_id(gw, ws)
        async with http.put(f"{gw.admin_url}/v1/connections/{cid}/channels/news", headers=AUTH) as r:
            assert await r.json() == {"connection": cid, "channel": "news", "subscribed": True, "changed": True}
        async with http.get(f"{gw.admin_url}/v1/connections/{cid}", headers=AUTH) as r:
            rec = await r.json()
        assert rec["connection"] == cid and rec["route"] == "echo" and rec["state"] == "open"
        assert rec["channels"] == ["news"] and rec["messages_in"] == 1 and rec["ip"] == "127.0.0.1"
        assert rec["node"] == gw.node.node_id


async def test_channels_subscribe_push_presence_unsubscribe(gw, http):
    clients, ids = [], []
    try:
        for _ in range(3):
            clients.append(await http.ws_connect(gw.url + "/echo"))
            ids.append(await conn_id(gw, clients[-1]))
        for cid in ids[:2]:
            async with http.put(f"{gw.admin_url}/v1/connections/{cid}/channels/room-1", headers=AUTH) as r:
                assert r.status == 200
        async with http.put(f"{gw.admin_url}/v1/connections/{ids[0]}/channels/room-1", headers=AUTH) as r:
            assert (await r.json())["changed"] is False
        async with http.post(gw.admin_url + "/v1/channels/room-1/messages", data="to the room", headers=AUTH) as r:
            assert await r.json() == {"delivered": 2}
        for ws in clients[:2]:
            assert (await ws.receive(timeout=5)).data == "to the room"
        async with http.get(gw.admin_url + "/v1/channels/room-1/presence", headers=AUTH) as r:
            p = await r.json()
        assert [s["connection"] for s in p["sessions"]] == ids[:2]
        assert p["subjects"] == [] and p["count"] == 2
        async with http.delete(f"{gw.admin_url}/v1/connections/{ids[0]}/channels/room-1", headers=AUTH) as r:
            assert (await r.json())["changed"] is True
        async with http.post(gw.admin_url + "/v1/channels/room-1/messages", data="again", headers=AUTH) as r:
            assert await r.json() == {"delivered": 1}
        async with http.post(gw.admin_url + "/v1/channels/empty/messages", data="x", headers=AUTH) as r:
            assert await r.json() == {"delivered": 0}
        await clients[1].close()
        await eventually(lambda: gw.node.channels.count("room-1") == 0)
    finally:
        for ws in clients:
            await ws.close()


async def test_bad_channel_names_are_400(gw, http):
    async with http.ws_connect(gw.url + "/echo") as ws:
        cid = await conn_id(gw, ws)
        for method, path in (("PUT", f"/v1/connections/{cid}/channels/bad%20name"),
                             ("POST", "/v1/channels/a%2Cb/messages"),
                             ("GET", "/v1/channels/" + "x" * 200 + "/presence")):
            async with http.request(method, gw.admin_url + path, data="x", headers=AUTH) as r:
                assert r.status == 400, path
                assert "bad channel name" in (await r.json())["error"]


async def test_push_to_user_with_no_sessions_delivers_zero(gw, http):
    async with http.post(gw.admin_url + "/v1/users/alice/messages", data="hi", headers=AUTH) as r:
        assert (r.status, await r.json()) == (200, {"delivered": 0})


async def test_nodes_and_unknown_endpoints(gw, http):
    async with http.get(gw.admin_url + "/v1/nodes", headers=AUTH) as r:
        (node,) = (await r.json())["nodes"]
    assert node["id"] == gw.node.node_id and node["state"] == "ready" and node["connections"] == 0
    async with http.get(gw.admin_url + "/v1/nope", headers=AUTH) as r:
        assert r.status == 404 and "error" in await r.json()
    async with http.patch(gw.admin_url + "/v1/nodes", headers=AUTH) as r:
        assert r.status == 405 and "error" in await r.json()


async def test_push_into_a_websocket_route_session(gateway, backend, http, monkeypatch):
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    async with http.ws_connect(gw.url + "/ws") as ws:
        await ws.send_str("x" * 200_000)          # a large frame crossing while we push
        (cid,) = list(gw.node.sessions)
        async with http.post(f"{gw.admin_url}/v1/connections/{cid}/messages", data="pushed", headers=AUTH) as r:
            assert await r.json() == {"delivered": 1}
        got = {(await ws.receive(timeout=5)).data for _ in range(2)}
        assert got == {"x" * 200_000, "pushed"}
        async with http.put(f"{gw.admin_url}/v1/connections/{cid}/channels/c", headers=AUTH) as r:
            assert r.status == 200
        async with http.post(gw.admin_url + "/v1/channels/c/messages", data="fan", headers=AUTH) as r:
            assert await r.json() == {"delivered": 1}
        assert (await ws.receive(timeout=5)).data == "fan"


async def test_reload_through_the_api(tmp_path, monkeypatch, http):
    from gateway import config
    from gateway.app import Gateway

    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    path = tmp_path / "routes.yaml"
    cfg = echo_config(listen={"host": "127.0.0.1", "port": 0}, admin={"host": "127.0.0.1", "port": 0})
    path.write_text(yaml.safe_dump(cfg))
    gw = Gateway(config.load(str(path)))
    await gw.start()
    try:
        admin = f"http://127.0.0.1:{gw.ports[1]}"
        cfg["routes"].append({"name": "two", "match": {"path": "/two"}, "auth": "none", "backend": "echo"})
        path.write_text(yaml.safe_dump(cfg))
        async with http.post(admin + "/v1/reload", headers=AUTH) as r:
            assert (r.status, (await r.json())["routes"]) == (200, 2)
        async with http.ws_connect(f"ws://127.0.0.1:{gw.ports[0]}/two") as ws:
            await ws.send_str("hi")
            assert (await ws.receive(timeout=5)).data == "hi"
        path.write_text("routes: [oops")
        async with http.post(admin + "/v1/reload", headers=AUTH) as r:
            body = await r.json()
            assert r.status == 400 and body["problems"]
        assert len(gw.node.config.routes) == 2         # the bad file changed nothing
    finally:
        await gw.stop()


async def test_drain_endpoint_answers_202(gw, http):
    async with http.post(gw.admin_url + "/v1/drain", headers=AUTH) as r:
        assert r.status == 202
    await asyncio.wait_for(gw.stopping.wait(), 5)
    await gw.stop()


async def test_push_to_every_session_of_a_subject(gateway, http, monkeypatch):
    import time

    import jwt

    secret = "j" * 64
    monkeypatch.setenv("ISSUE5_JWT_SECRET", secret)
    gw = await gateway({"auth": {"jwt": {"algorithms": ["HS256"], "keys": {"secret_env": "ISSUE5_JWT_SECRET"}}},
                        "backends": {"echo": {"type": "builtin", "handler": "echo"}},
                        "routes": [{"name": "echo", "match": {"path": "/echo"}, "auth": "required",
                                    "backend": "echo"}]})

    def bearer(sub):
        tok = jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, secret, algorithm="HS256")
        return {"Authorization": f"Bearer {tok}"}

    a1 = await http.ws_connect(gw.url + "/echo", headers=bearer("alice"))
    a2 = await http.ws_connect(gw.url + "/echo", headers=bearer("alice"))
    bob = await http.ws_connect(gw.url + "/echo", headers=bearer("bob"))
    try:
        async with http.post(gw.admin_url + "/v1/users/alice/messages", data="for alice") as r:
            assert await r.json() == {"delivered": 2}
        for ws in (a1, a2):
            assert (await ws.receive(timeout=5)).data == "for alice"
        await bob.send_str("ping")
        assert (await bob.receive(timeout=5)).data == "ping"        # bob got nothing before his echo
        (s,) = [s for s in gw.node.sessions.values() if s.sub == "bob"]
        async with http.put(f"{gw.admin_url}/v1/connections/{s.id}/channels/c") as r:
            assert r.status == 200
        async with http.get(gw.admin_url + "/v1/channels/c/presence") as r:
            p = await r.json()
        assert p["subjects"] == ["bob"]
        assert p["sessions"] == [{"session": s.session_id, "connection": s.id, "sub": "bob", "node": gw.node.node_id}]
        assert s.session_id != s.id
    finally:
        for ws in (a1, a2, bob):
            await ws.close()
