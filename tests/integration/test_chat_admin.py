"""The chat demo's management API client (examples/chat/backend.py, `Admin`): each
node is tried once per call, in order from the one that answered last, even while
concurrent calls move that on."""

from __future__ import annotations

import asyncio

from aiohttp import web

from ..browser.chat_fixtures import demo_backend
from ..helpers import serve, until


async def _site(handler) -> tuple[web.AppRunner, str]:
    app = web.Application()
    app.router.add_get("/v1/x", handler)
    runner, port = await serve(app)
    return runner, f"http://127.0.0.1:{port}"


async def test_a_call_tries_every_node_once_while_another_call_moves_the_current_one():
    release = asyncio.Event()
    held: list[int] = []

    async def first(request):
        if not held:             # the first call's request waits; the second's is answered at once
            held.append(1)
            await release.wait()
        return web.json_response({"error": "stopping"}, status=503)

    async def second(request):
        return web.json_response({"node": 2})

    r1, url1 = await _site(first)
    r2, url2 = await _site(second)
    admin = demo_backend().Admin([url1, url2], None)
    await admin.start()
    try:
        a = asyncio.ensure_future(admin.call("GET", "/v1/x"))
        await until(lambda: _async(bool(held)), what="the first call's request at node 1")
        assert await admin.call("GET", "/v1/x") == (200, {"node": 2})   # 503 at node 1, then node 2
        assert admin.current == 1
        release.set()
        # Node 1's 503, then node 2: not node 1 again because the other call moved `current`.
        assert await asyncio.wait_for(a, 10) == (200, {"node": 2})
    finally:
        await admin.close()
        await r1.cleanup()
        await r2.cleanup()


async def _async(value):
    return value
