"""The WebSocket proxy a Python developer writes first (benchmark baseline).

Per client: one upstream ``ws_connect`` and two pump tasks (client->upstream,
upstream->client). aiohttp on uvloop, no tuning beyond disabling compression.

    python benchmarks/naive_proxy.py --port 18004 --upstream ws://127.0.0.1:18001
"""

from __future__ import annotations

import argparse
import asyncio

import aiohttp
import uvloop
from aiohttp import WSMsgType, web


async def pump(src, dst) -> None:
    async for msg in src:
        if msg.type == WSMsgType.TEXT:
            await dst.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await dst.send_bytes(msg.data)
        else:
            break


async def proxy(request: web.Request) -> web.StreamResponse:
    client = web.WebSocketResponse(compress=False, max_msg_size=16 * 1024 * 1024)
    await client.prepare(request)
    session: aiohttp.ClientSession = request.app["session"]
    url = request.app["upstream"] + request.path_qs
    async with session.ws_connect(url, max_msg_size=16 * 1024 * 1024) as upstream:
        tasks = [
            asyncio.create_task(pump(client, upstream)),
            asyncio.create_task(pump(upstream, client)),
        ]
        _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
    await client.close()
    return client


async def make_app(upstream: str) -> web.Application:
    app = web.Application()
    app["upstream"] = upstream.rstrip("/")
    app["session"] = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    app.on_cleanup.append(lambda app: app["session"].close())
    app.router.add_get("/{tail:.*}", proxy)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18004)
    parser.add_argument("--upstream", default="ws://127.0.0.1:18001")
    args = parser.parse_args()
    web.run_app(make_app(args.upstream), host=args.host, port=args.port,
                access_log=None, print=None, backlog=4096, loop=uvloop.new_event_loop())


if __name__ == "__main__":
    main()
