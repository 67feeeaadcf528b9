"""An HTTP backend for tests: records every request, answers with a handler."""

from __future__ import annotations

import asyncio

from aiohttp import web

from .helpers import serve


class Recorded:
    __slots__ = ("method", "path", "headers", "body")

    def __init__(self, method, path, headers, body):
        self.method = method
        self.path = path
        self.headers = headers
        self.body = body

    @property
    def event(self) -> str | None:
        return self.headers.get("Gateway-Event")


class HttpPeer:
    """A real aiohttp server. `handler(request, body)` returns a web.Response
    (default: 204). `requests` holds every request in arrival order."""

    def __init__(self, handler=None):
        self.handler = handler
        self.requests: list[Recorded] = []
        self.in_flight = 0
        self.max_in_flight = 0
        self.runner = None
        self.port = 0
        self.arrived = asyncio.Condition()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self.runner, self.port = await serve(app)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _handle(self, request: web.Request):
        body = await request.read()
        rec = Recorded(request.method, request.path_qs, request.headers.copy(), body)
        self.requests.append(rec)
        async with self.arrived:
            self.arrived.notify_all()
        self.in_flight += 1
        self.max_in_flight = max(self.max_in_flight, self.in_flight)
        try:
            if self.handler is None:
                return web.Response(status=204)
            return await self.handler(request, body)
        finally:
            self.in_flight -= 1

    def of(self, event: str) -> list[Recorded]:
        return [r for r in self.requests if r.event == event]

    async def wait_for(self, predicate, timeout: float = 5.0) -> None:
        """Wait until predicate(self) holds (checked on every request)."""
        async with asyncio.timeout(timeout):
            async with self.arrived:
                await self.arrived.wait_for(lambda: predicate(self))


async def eventually(predicate, timeout: float = 5.0, step: float = 0.01) -> None:
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(step)


import pytest  # noqa: E402


@pytest.fixture
async def http_peer():
    """`await http_peer(handler)` starts an HTTP backend on a free port."""
    started: list[HttpPeer] = []

    async def start(handler=None) -> HttpPeer:
        p = HttpPeer(handler)
        await p.start()
        started.append(p)
        return p

    yield start
    for p in started:
        await p.stop()
