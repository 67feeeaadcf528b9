"""Several nodes on one real Redis answer for the whole cluster.

The nodes here are in-process Gateways on the test's loop, each with its own
RedisStore connection, so everything between them crosses a real
redis-server; tests/integration/test_cluster_processes.py does the same with
separate processes and SIGKILL.
"""

from __future__ import annotations

import time

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType

from ..helpers import until

TOKEN = "cluster-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
SECRET = "c" * 64


def token(sub: str) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600}, SECRET, algorithm="HS256")


def node_config(node_id: str, redis_url: str | None, **top) -> dict:
    cfg = {
        "node_id": node_id,
        "auth": {"jwt": {"algorithms": ["HS256"], "keys": {"secret_env": "CLUSTER_JWT_SECRET"},
                         "sources": ["query:access_token"]}},
        "backends": {"echo": {"type": "builtin", "handler": "echo"}},
        "routes": [{"name": "echo", "match": {"path": "/echo"}, "auth": "required", "backend": "echo"}],
        "channels": [{"match": "room*", "history": {"size": 3, "ttl_s": 60}}],
    }
    if redis_url is not None:
        cfg["redis"] = {"url": redis_url, "heartbeat_s": 0.2, "node_ttl_s": 1, "request_timeout_s": 1,
                        "timeout_s": 0.5}
    cfg.update(top)
    return cfg


@pytest.fixture(autouse=True)
def env(monkeypatch):
    monkeypatch.setenv("CLUSTER_JWT_SECRET", SECRET)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)


async def open_client(http, gw, sub: str):
    """A client of `gw` as `sub`, and its connection id (known once the echo answers)."""
    before = set(gw.node.sessions)
    ws = await http.ws_connect(f"{gw.url}/echo?access_token={token(sub)}")
    await ws.send_str("hi")
    assert (await ws.receive(timeout=5)).data == "hi"
    (conn,) = set(gw.node.sessions) - before
    return ws, conn


async def api(http, gw, method: str, path: str, **kw):
    async with http.request(method, gw.admin_url + path, headers=AUTH, **kw) as resp:
        return resp.status, await resp.json()


async def known_everywhere(http, gws, conn: str) -> None:
    """Poll until every node finds `conn` (the writer batches for a few ms)."""
    async def found() -> bool:
        for gw in gws:
            status, _ = await api(http, gw, "GET", f"/v1/connections/{conn}")
            if status != 200:
                return False
        return True
    await until(found)


async def nothing_more(ws) -> None:
    """The client got nothing beyond what the test read: an echo comes back next."""
    await ws.send_str("probe")
    assert (await ws.receive(timeout=5)).data == "probe"


@pytest.fixture
async def three(gateway, redis_server):
    return [await gateway(node_config(f"n{i}", redis_server.url)) for i in (1, 2, 3)]


async def test_pushes_channels_presence_and_users_across_three_nodes(three, http):
    g1, g2, g3 = three
    a1, a1_id = await open_client(http, g1, "alice")
    a2, a2_id = await open_client(http, g2, "alice")
    b3, b3_id = await open_client(http, g3, "bob")
    for conn in (a1_id, a2_id, b3_id):
        await known_everywhere(http, three, conn)

    # Subscribe each session through a node that does not hold it.
    for gw, conn in ((g3, a1_id), (g1, a2_id), (g2, b3_id)):
        status, body = await api(http, gw, "PUT", f"/v1/connections/{conn}/channels/room")
        assert status == 200 and body["subscribed"] and body["connection"] == conn

    async def presence_complete() -> bool:
        return (await api(http, g1, "GET", "/v1/channels/room/presence"))[1]["count"] == 3
    await until(presence_complete)
    status, body = await api(http, g1, "GET", "/v1/channels/room/presence")
    assert status == 200 and body["subjects"] == ["alice", "bob"]
    assert {s["connection"] for s in body["sessions"]} == {a1_id, a2_id, b3_id}
    assert {s["node"] for s in body["sessions"]} == {"n1", "n2", "n3"}

    status, body = await api(http, g2, "POST", "/v1/channels/room/messages", data="to the room")
    assert status == 200 and body["delivered"] == 3 and body["offset"] == 1
    for ws in (a1, a2, b3):
        assert (await ws.receive(timeout=5)).data == "to the room"

    status, body = await api(http, g3, "POST", "/v1/users/alice/messages", data="for alice")
    assert (status, body) == (200, {"delivered": 2})
    for ws in (a1, a2):
        assert (await ws.receive(timeout=5)).data == "for alice"

    status, body = await api(http, g3, "POST", f"/v1/connections/{a1_id}/messages", data="just a1")
    assert (status, body) == (200, {"delivered": 1})
    assert (await a1.receive(timeout=5)).data == "just a1"
    for ws in (a1, a2, b3):
        await nothing_more(ws)   # exactly once each: no second copy behind the first

    status, rec = await api(http, g1, "GET", f"/v1/connections/{b3_id}")
    assert status == 200 and rec["node"] == "n3" and rec["sub"] == "bob" and rec["route"] == "echo"
    assert rec["session"] != rec["connection"] == b3_id

    status, body = await api(http, g1, "GET", "/v1/nodes")
    assert status == 200 and [n["id"] for n in body["nodes"]] == ["n1", "n2", "n3"]
    assert all(n["state"] == "ready" and n["heartbeat_age_s"] < 5 for n in body["nodes"])
    assert body["nodes"][0]["connections"] == 1   # the answering node's own count is current

    status, body = await api(http, g1, "DELETE", f"/v1/connections/{a2_id}?code=4001&reason=bye")
    assert status == 200 and body["closed"]
    msg = await a2.receive(timeout=5)
    assert msg.type == WSMsgType.CLOSE and a2.close_code == 4001

    async def a2_gone() -> bool:
        return (await api(http, g3, "GET", f"/v1/connections/{a2_id}"))[0] == 404
    await until(a2_gone)
    status, body = await api(http, g3, "POST", "/v1/users/alice/messages", data="again")
    assert (status, body) == (200, {"delivered": 1})
    assert (await a1.receive(timeout=5)).data == "again"
    for ws in (a1, b3):
        await ws.close()


async def test_unknown_connection_is_404_cluster_wide(three, http):
    status, body = await api(http, three[0], "POST", "/v1/connections/nosuchid/messages", data="x")
    assert status == 404 and body["error"] == "unknown connection"
    status, body = await api(http, three[1], "POST", "/v1/users/nobody/messages", data="x")
    assert (status, body) == (200, {"delivered": 0})


async def test_a_stopped_node_leaves_the_node_list(three, http):
    g1, g2, g3 = three
    await g3.stop()

    async def two_left() -> bool:
        return [n["id"] for n in (await api(http, g1, "GET", "/v1/nodes"))[1]["nodes"]] == ["n1", "n2"]
    await until(two_left)


async def test_history_offsets_gaps_and_catch_up(gateway, http):
    gw = await gateway(node_config("solo", None))     # the in-memory store: the same API
    ws, conn = await open_client(http, gw, "carol")
    offsets = []
    for i in range(1, 6):
        status, body = await api(http, gw, "POST", "/v1/channels/room1/messages", data=f"m{i}")
        assert status == 200 and body["delivered"] == 0
        offsets.append(body["offset"])
        epoch = body["epoch"]
    assert offsets == [1, 2, 3, 4, 5]

    status, body = await api(http, gw, "GET", f"/v1/channels/room1/history?since=3&epoch={epoch}")
    assert status == 200 and [m["data"] for m in body["messages"]] == ["m4", "m5"]
    assert [m["offset"] for m in body["messages"]] == [4, 5] and body["offset"] == 5
    # size 3 keeps m3..m5: asking from 1 would skip m2 silently, so it is refused.
    status, body = await api(http, gw, "GET", f"/v1/channels/room1/history?since=1&epoch={epoch}")
    assert status == 410 and body["offset"] == 5
    status, body = await api(http, gw, "GET", "/v1/channels/room1/history?since=4&epoch=other")
    assert status == 409 and body["epoch"] == epoch
    status, body = await api(http, gw, "GET", "/v1/channels/lobby/history?since=0")
    assert status == 400

    # A session rejoining from offset 3 gets m4, m5, then what is new: in order, once.
    status, body = await api(http, gw, "PUT", f"/v1/connections/{conn}/channels/room1?since=3&epoch={epoch}")
    assert status == 200 and body["replayed"] == 2 and body["offset"] == 5
    assert [(await ws.receive(timeout=5)).data for _ in range(2)] == ["m4", "m5"]
    status, body = await api(http, gw, "POST", "/v1/channels/room1/messages", data="m6")
    assert body == {"delivered": 1, "offset": 6, "epoch": epoch}
    assert (await ws.receive(timeout=5)).data == "m6"
    await nothing_more(ws)
    await ws.close()


async def test_redis_outage_keeps_sessions_and_answers_503(gateway, redis_server, http):
    g1 = await gateway(node_config("o1", redis_server.url))
    g2 = await gateway(node_config("o2", redis_server.url))
    ws, conn = await open_client(http, g1, "dave")
    await known_everywhere(http, [g1, g2], conn)

    redis_server.stop()
    # Relaying does not touch the store.
    for i in range(20):
        await ws.send_str(f"m{i}")
        assert (await ws.receive(timeout=5)).data == f"m{i}"
    status, body = await api(http, g1, "POST", "/v1/users/dave/messages", data="x")
    assert status == 503 and "store" in body["error"]
    status, body = await api(http, g1, "GET", "/v1/channels/room/presence")
    assert status == 503

    async def gauge_down() -> bool:   # the next heartbeat (0.2 s) finds Redis gone
        async with http.get(g1.admin_url + "/metrics") as resp:
            return "gateway_store_available 0.0" in await resp.text()
    await until(gauge_down)
    # A session on the node that takes the call is still reached.
    status, body = await api(http, g1, "POST", f"/v1/connections/{conn}/messages", data="local")
    assert (status, body) == (200, {"delivered": 1})
    assert (await ws.receive(timeout=5)).data == "local"
    # on_outage: serve -> a new session is accepted while Redis is down...
    ws2, conn2 = await open_client(http, g1, "erin")

    redis_server.start()
    # ...and its record reaches the store when Redis is back (the node resyncs).
    await known_everywhere(http, [g2], conn2)
    await known_everywhere(http, [g2], conn)
    # o1's bus subscription comes back on its own back-off; until then o1 is
    # named in unconfirmed_nodes (a message to a node not listening is lost,
    # so an attempt that was not confirmed was not delivered either).
    attempt = {"n": 0}

    async def delivered_once() -> bool:
        attempt["n"] += 1
        status, body = await api(http, g2, "POST", "/v1/users/erin/messages", data=f"back{attempt['n']}")
        assert status == 200
        if body == {"delivered": 0, "unconfirmed_nodes": ["o1"]}:
            return False
        assert body == {"delivered": 1}
        return True
    await until(delivered_once, interval_s=0.2)
    assert (await ws2.receive(timeout=5)).data == f"back{attempt['n']}"
    await nothing_more(ws2)
    async with http.get(g1.admin_url + "/metrics") as resp:
        text = await resp.text()
    assert "gateway_store_available 1.0" in text and "gateway_store_resyncs_total" in text
    for w in (ws, ws2):
        await w.close()


async def test_reject_new_while_redis_is_down(gateway, redis_server, http):
    cfg = node_config("r1", redis_server.url)
    cfg["redis"]["on_outage"] = "reject_new"
    gw = await gateway(cfg)
    ws, _ = await open_client(http, gw, "frank")
    redis_server.stop()

    async def not_ready() -> bool:
        async with http.get(gw.admin_url + "/readyz") as resp:
            return resp.status == 503 and (await resp.json())["store"] == "unavailable"
    await until(not_ready)
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await http.ws_connect(f"{gw.url}/echo?access_token={token('frank')}")
    assert exc.value.status == 503 and exc.value.headers.get("Retry-After")
    await ws.send_str("still here")
    assert (await ws.receive(timeout=5)).data == "still here"

    redis_server.start()

    async def ready() -> bool:
        async with http.get(gw.admin_url + "/readyz") as resp:
            return resp.status == 200
    await until(ready)
    ws2, _ = await open_client(http, gw, "frank")
    for w in (ws, ws2):
        await w.close()


async def test_sentinel_failover_moves_the_cluster_to_the_new_master(gateway, sentinel_set, http):
    import asyncio

    addresses = [f"{h}:{p}" for h, p in sentinel_set.addresses]
    nodes = []
    for name in ("s1", "s2"):
        cfg = node_config(name, None)
        cfg["redis"] = {"sentinel": {"master": "m", "addresses": addresses}, "heartbeat_s": 0.2,
                        "node_ttl_s": 3, "request_timeout_s": 1, "timeout_s": 0.5}
        nodes.append(await gateway(cfg))
    g1, g2 = nodes
    ws, conn = await open_client(http, g1, "gina")
    await known_everywhere(http, [g2], conn)
    status, body = await api(http, g2, "POST", "/v1/users/gina/messages", data="before")
    assert (status, body) == (200, {"delivered": 1})
    assert (await ws.receive(timeout=5)).data == "before"

    sentinel_set.master.stop()
    killed = time.monotonic()
    await asyncio.to_thread(sentinel_set.wait_promoted)

    async def delivers_again() -> bool:
        status, body = await api(http, g2, "POST", "/v1/users/gina/messages", data="after")
        return status == 200 and body == {"delivered": 1}
    await until(delivers_again, timeout_s=30, interval_s=0.2)
    gap = time.monotonic() - killed
    # Each attempt that answered 200 delivered exactly one message; the 503s delivered none.
    assert (await ws.receive(timeout=5)).data == "after"
    await nothing_more(ws)
    ws2, conn2 = await open_client(http, g1, "hank")   # a session opened after the failover is found too
    await known_everywhere(http, [g2], conn2)
    print(f"failover: API answered again {gap:.1f} s after the master was killed")
    for w in (ws, ws2):
        await w.close()


async def test_a_chat_room_spans_nodes_in_order(gateway, redis_server, http):
    import orjson

    cfg = {"backends": {"chat": {"type": "builtin", "handler": "chat"}},
           "routes": [{"name": "chat", "match": {"path": "/chat"}, "auth": "none", "select": "$.action",
                       "actions": {"join": "chat", "say": "chat"}}]}
    nodes = [await gateway(node_config(f"c{i}", redis_server.url, **cfg)) for i in (1, 2)]
    clients = []
    for gw in nodes:
        ws = await http.ws_connect(f"{gw.url}/chat")
        await ws.send_str('{"action":"join","room":"lobby"}')
        assert orjson.loads((await ws.receive(timeout=5)).data)["event"] == "joined"
        clients.append(ws)

    async def both_present() -> bool:
        return (await api(http, nodes[0], "GET", "/v1/channels/lobby/presence"))[1]["count"] == 2
    await until(both_present)
    for i in range(20):
        await clients[0].send_str(orjson.dumps({"action": "say", "room": "lobby", "text": f"t{i}"}).decode())
    for ws in clients:   # the speaker's own node and the other one: all 20, in order, once
        got = [orjson.loads((await ws.receive(timeout=5)).data)["text"] for _ in range(20)]
        assert got == [f"t{i}" for i in range(20)]
    for ws in clients:
        await ws.close()


async def test_a_node_that_cannot_bind_leaves_no_record(gateway, redis_server, http):
    import socket

    from gateway import config as config_mod
    from gateway.app import Gateway
    import yaml

    g1 = await gateway(node_config("b1", redis_server.url))
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        cfg = node_config("b2", redis_server.url)
        cfg.update(listen={"host": "127.0.0.1", "port": taken.getsockname()[1]}, admin={"host": "127.0.0.1", "port": 0})
        gw = Gateway(config_mod.parse(yaml.safe_dump(cfg), source="b2.yaml"))
        with pytest.raises(OSError):
            await gw.start()
    finally:
        taken.close()
    status, body = await api(http, g1, "GET", "/v1/nodes")
    assert [n["id"] for n in body["nodes"]] == ["b1"]


async def test_garbage_on_a_nodes_bus_hurts_nobody(three, redis_server, http):
    import redis.asyncio as aioredis

    g1, g2, _ = three
    ws, conn = await open_client(http, g2, "ivy")
    await known_everywhere(http, [g1], conn)
    r = aioredis.from_url(redis_server.url)
    try:
        for junk in (b"not json", b"\xff\xfe\n", b'{"op":"chan"}\n', b'{"op":"chan","chan":1}\nx',
                     b'{"op":"conn","rid":1,"from":"n1"}\n', b'{"op":"nosuch","rid":2,"from":"n1","id":"x"}\n',
                     b'[1,2]\n', b'{"op":"reply","rid":"x"}\n'):
            assert await r.publish("gw:bus:n2", junk) == 1
    finally:
        await r.aclose()
    status, body = await api(http, g1, "POST", f"/v1/connections/{conn}/messages", data="still fine")
    assert (status, body) == (200, {"delivered": 1})
    assert (await ws.receive(timeout=5)).data == "still fine"
    await nothing_more(ws)
    await ws.close()


async def test_a_channel_message_crosses_redis_once_per_node_not_per_recipient(three, http):
    from gateway import metrics

    g1, g2, g3 = three
    clients = [await open_client(http, g2, f"u{i}") for i in range(5)] + [await open_client(http, g3, "w")]
    for _, conn in clients:
        await known_everywhere(http, [g1], conn)   # its record is written in the next 5 ms batch
        status, _ = await api(http, g1, "PUT", f"/v1/connections/{conn}/channels/news")
        assert status == 200
    answered = metrics.bus_requests.labels("chan", "answered")
    before = answered._value.get()
    status, body = await api(http, g1, "POST", "/v1/channels/news/messages", data="once")
    assert (status, body) == (200, {"delivered": 6})
    # Six recipients on two other nodes: two requests crossed the bus (the metric
    # is process-wide, and these three nodes share the process).
    assert answered._value.get() - before == 2
    for ws, _ in clients:
        assert (await ws.receive(timeout=5)).data == "once"
        await nothing_more(ws)
        await ws.close()


@pytest.mark.parametrize("path,method,needle", [
    ("/v1/channels/room1/history?since=abc", "GET", "since must be a whole number"),
    ("/v1/channels/room1/history?since=-1", "GET", "since must be a whole number"),
    ("/v1/channels/room1/history?epoch=e", "GET", "epoch needs since"),
    ("/v1/channels/room1/history?since=1&epoch=" + "e" * 65, "GET", "epoch too long"),
    ("/v1/channels/bad%20name/history?since=0", "GET", "bad channel name"),
    ("/v1/connections/" + "x" * 129 + "/messages", "POST", "connection id too long"),
    ("/v1/connections/abc/channels/room1?since=x", "PUT", "since must be a whole number"),
])
async def test_bad_history_and_id_input_is_a_clear_400(gateway, http, path, method, needle):
    gw = await gateway(node_config("bad", None))
    status, body = await api(http, gw, method, path, data="x")
    assert status == 400 and needle in body["error"], body
