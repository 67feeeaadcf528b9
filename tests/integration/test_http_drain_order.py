"""An HTTP backend session drained with POSTs still queued: the backend gets every
message once and in order across the seam. The old node POSTs what its client sent
up to its close (some of it after the 1012) and seals the replay buffer only then;
the resume on the next node waits for the seal, so its POSTs come after.

Two in-process nodes share one real redis-server; a real aiohttp backend answers
each message slowly, so the old node's queue is not empty when the drain begins."""

from __future__ import annotations

import asyncio

from aiohttp import WSMsgType, web

from ..helpers import until
from ..httppeer import http_peer
from .test_drain_resume import env, jwt_for, node_cfg

__all__ = ["env", "http_peer"]   # fixtures used by name

QUEUED = 20       # sent on the old node before the drain, each answered slowly
AFTER = 10        # sent on the new node after the resume


async def test_queued_posts_reach_the_backend_before_the_resumed_sessions_none_lost(gateway, redis_server, http,
                                                                              http_peer):
    slow = asyncio.Event()   # set: the backend answers at once (after the seam)

    async def answer(request, body):
        if request.headers.get("Gateway-Event") == "message" and not slow.is_set():
            await asyncio.sleep(0.05)   # a slow backend: the queue fills behind it
        return web.Response(status=204)

    peer = await http_peer(answer)
    nodes = []
    for name in ("node-a", "node-b"):
        cfg = node_cfg(name, redis_server.url, "ws://127.0.0.1:1/unused")
        cfg["backends"] = {"h": {"type": "http", "endpoints": [peer.url], "max_queue": 1000}}
        cfg["routes"] = [{"name": "r", "match": {"path": "/ws"}, "auth": "required", "backend": "h"}]
        nodes.append(await gateway(cfg))
    a, b = nodes
    ws = await http.ws_connect(f"{a.url}/ws?access_token={jwt_for('olga')}")
    for i in range(1, QUEUED + 1):
        await ws.send_str(str(i))
    await until(lambda: asyncio.sleep(0, len(peer.of("message")) >= 1), what="the first POST")
    drain = asyncio.ensure_future(a.stop())
    # The client goes on until it sees the 1012: the old node takes these too.
    late = QUEUED
    msg = None
    for _ in range(200):
        try:
            msg = await ws.receive(timeout=0.02)
            break
        except asyncio.TimeoutError:
            late += 1
            await ws.send_str(str(late))
    assert msg is not None and (msg.type, msg.data) == (WSMsgType.CLOSE, 1012), msg
    token = msg.extra[len("resume="):]
    at_close = len(peer.of("message"))
    ws = await http.ws_connect(f"{b.url}/ws?access_token={jwt_for('olga')}&resume={token}")
    for i in range(late + 1, late + AFTER + 1):
        await ws.send_str(str(i))
    slow.set()
    await asyncio.wait_for(drain, 10)   # the old node is gone: nothing more comes from it
    await until(lambda: asyncio.sleep(0, late + AFTER in {int(r.body) for r in peer.of("message")}), 10,
                "the last message at the backend")
    await ws.close()
    seen = [int(r.body) for r in peer.of("message")]
    assert seen == sorted(set(seen)), f"each once, in order: {seen}"
    assert seen == list(range(1, late + AFTER + 1)), f"none lost: {seen}"
    assert at_close < QUEUED, "the old node's queue was not empty at the 1012"
