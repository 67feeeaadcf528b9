"""Channels on one node: the chat demo, and fan-out to thousands of subscribers."""

from __future__ import annotations

import asyncio
import json
import time
from unittest import mock

from gateway import frames

from ..helpers import RawClient
from ..httppeer import eventually

CHAT = {
    "backends": {"chat": {"type": "builtin", "handler": "chat"}},
    "routes": [{"name": "chat", "match": {"path": "/chat"}, "auth": "none", "select": "$.action",
                "actions": {"join": "chat", "say": "chat", "leave": "chat", "who": "chat"},
                "error_message": '{"event":"error","error":"unknown action"}'}],
}


async def recv_json(ws) -> dict:
    return json.loads((await ws.receive(timeout=5)).data)


async def test_chat_rooms(gateway, http):
    gw = await gateway(CHAT)
    async with http.ws_connect(gw.url + "/chat") as ann, http.ws_connect(gw.url + "/chat") as bob:
        await ann.send_str('{"action":"join","room":"lobby"}')
        assert await recv_json(ann) == {"event": "joined", "room": "lobby", "members": 1}
        await bob.send_str('{"action":"join","room":"lobby"}')
        assert (await recv_json(bob))["members"] == 2
        await bob.send_str('{"action":"say","room":"lobby","text":"hi all"}')
        for ws in (ann, bob):
            m = await recv_json(ws)
            assert (m["event"], m["text"], m["room"]) == ("message", "hi all", "lobby")
        await ann.send_str('{"action":"who","room":"lobby"}')
        assert len((await recv_json(ann))["members"]) == 2
        await ann.send_str('{"action":"dance"}')
        assert await recv_json(ann) == {"event": "error", "error": "unknown action"}
        await ann.send_str('{"action":"say","room":"elsewhere","text":"x"}')
        assert "join 'elsewhere' first" in (await recv_json(ann))["error"]
        async with http.post(gw.admin_url + "/v1/channels/lobby/messages", data='{"event":"notice"}') as r:
            assert await r.json() == {"delivered": 2}
        assert await recv_json(ann) == {"event": "notice"}
        assert await recv_json(bob) == {"event": "notice"}
        await bob.send_str('{"action":"leave","room":"lobby"}')
        assert await recv_json(bob) == {"event": "left", "room": "lobby"}
        async with http.post(gw.admin_url + "/v1/channels/lobby/messages", data="only ann") as r:
            assert await r.json() == {"delivered": 1}
    await eventually(lambda: not gw.node.channels.members)


async def test_fan_out_to_thousands_builds_the_frame_once(gateway, http):
    n = 3000
    cfg = dict(CHAT, limits={"max_connections_per_ip": 10_000})
    gw = await gateway(cfg)
    clients: list[RawClient] = []
    join = b'{"action":"join","room":"big"}'

    async def one() -> RawClient:
        c = await RawClient.connect(gw.url + "/chat")
        c.send_frame(frames.OP_TEXT, join)
        return c

    try:
        for i in range(0, n, 250):
            clients += await asyncio.gather(*(one() for _ in range(min(250, n - i))))
        await eventually(lambda: gw.node.channels.count("big") == n, timeout=30)
        # Each client: skip its "joined" replies and notices until the broadcast.
        payload = json.dumps({"event": "broadcast", "n": 1}).encode()
        with mock.patch("gateway.channels.frames.frame", wraps=frames.frame) as build:
            t0 = time.perf_counter()
            delivered = gw.node.channels.publish("big", frames.OP_TEXT, payload)
            took = time.perf_counter() - t0
        assert build.call_count == 1 and delivered == n
        print(f"\nfan-out of one message to {n} subscribers: {took * 1000:.1f} ms, frames built: 1")

        async def got_broadcast(c: RawClient) -> bool:
            while True:
                op, _, data = await c.recv_frame(timeout=30)
                if data == payload:
                    return True

        results = await asyncio.gather(*(got_broadcast(c) for c in clients))
        assert all(results)
        # The same through the API.
        async with http.post(gw.admin_url + "/v1/channels/big/messages", data="api") as r:
            assert await r.json() == {"delivered": n}
    finally:
        for c in clients:
            c.close()
