"""WebSocket echo backend for the benchmarks (aiohttp + uvloop).

Every text/binary frame is sent back unchanged on the same connection.

    python benchmarks/echo_backend.py --port 18001
    python benchmarks/echo_backend.py --ports 18001,18002   # one process per port

With several ports the first process forks one child per extra port (each
process has its own 20,000 open-file limit), so the benchmark sums CPU/RSS
over the process tree.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal

import uvloop
from aiohttp import WSMsgType, web


async def echo(request: web.Request) -> web.StreamResponse:
    ws = web.WebSocketResponse(compress=False, max_msg_size=16 * 1024 * 1024)
    await ws.prepare(request)
    async for msg in ws:
        if msg.type == WSMsgType.TEXT:
            await ws.send_str(msg.data)
        elif msg.type == WSMsgType.BINARY:
            await ws.send_bytes(msg.data)
    return ws


async def serve(host: str, port: int) -> None:
    app = web.Application()
    app.router.add_get("/{tail:.*}", echo)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, host, port, backlog=4096, reuse_address=True).start()
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=18001)
    parser.add_argument("--ports", help="comma-separated ports, one process each")
    args = parser.parse_args()
    ports = [int(p) for p in args.ports.split(",")] if args.ports else [args.port]
    children = []
    for port in ports[1:]:
        pid = os.fork()
        if pid == 0:
            uvloop.run(serve(args.host, port))
            os._exit(0)
        children.append(pid)
    try:
        uvloop.run(serve(args.host, ports[0]))
    finally:
        for pid in children:
            try:
                os.kill(pid, signal.SIGTERM)
                os.waitpid(pid, 0)
            except (ProcessLookupError, ChildProcessError):
                pass


if __name__ == "__main__":
    main()
