"""Numbered streams both ways, for the no-loss tests.

`NumberedBackend` is a real aiohttp WebSocket backend that, per
Gateway-Session-Id, sends "s1", "s2", ... every `interval_s` for as long as
an upstream connection of that session is open (a resumed or reattached
session continues the count), and records the client's messages per session.

`NumberedClient` sends "c1", "c2", ... and reads, and on a close with
`resume=<token>` comes back (to the next URL it is given) with the token, the
way a client library does. A send counts only once the frame was written on
an open connection; one that fails is sent again on the next connection.
"""

from __future__ import annotations

import asyncio
import collections

import aiohttp
from aiohttp import WSMsgType, web

from ..helpers import serve


class NumberedBackend:
    def __init__(self, interval_s: float = 0.005):
        self.interval_s = interval_s
        self.sent: dict[str, int] = collections.defaultdict(int)          # session -> last number sent
        self.got: dict[str, list[str]] = collections.defaultdict(list)    # session -> client messages
        self.handshakes: list = []
        self.refuse: int | None = None     # answer upgrades with this status instead
        self.active = 0
        self.runner = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self._ws)
        self.runner, self.port = await serve(app)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _ws(self, request):
        sid = request.headers["Gateway-Session-Id"]
        if self.refuse is not None:
            return web.Response(status=self.refuse, text="not now")
        self.handshakes.append(request.headers.copy())
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)
        self.active += 1

        async def pump():
            while not ws.closed:
                n = self.sent[sid] + 1
                try:
                    await ws.send_str(f"s{n}")
                except (ConnectionError, RuntimeError):
                    return
                if ws.closed and ws.close_code is not None:
                    return
                self.sent[sid] = n
                await asyncio.sleep(self.interval_s)

        task = asyncio.ensure_future(pump())
        try:
            async for msg in ws:
                if msg.type == WSMsgType.TEXT:
                    self.got[sid].append(msg.data)
        finally:
            task.cancel()
            self.active -= 1
        return ws


class NumberedClient:
    def __init__(self, http: aiohttp.ClientSession, url: str, interval_s: float = 0.005):
        self.http = http
        self.url = url
        self.interval_s = interval_s
        self.sent = 0
        self.got: list[str] = []
        self.closes: list[tuple[int | None, str]] = []
        self.resumes = 0
        self.token: str | None = None
        self.ws = None
        self.session_id: str | None = None

    async def connect(self, url: str | None = None) -> None:
        target = url or self.url
        if self.token is not None:
            target += ("&" if "?" in target else "?") + f"resume={self.token}"
        self.ws = await self.http.ws_connect(target, autoclose=True)

    async def run(self, stop: asyncio.Event, next_url=lambda: None, max_reconnects: int = 20) -> None:
        """Send and read until `stop` is set; after a resume close, reconnect to `next_url()`."""
        reconnects = 0
        while True:
            sender = asyncio.ensure_future(self._send_loop(stop))
            code, reason = None, ""
            try:
                while True:
                    msg = await self.ws.receive()
                    if msg.type == WSMsgType.TEXT:
                        self.got.append(msg.data)
                    elif msg.type == WSMsgType.CLOSE:
                        code, reason = msg.data, msg.extra or ""
                        break
                    elif msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                        code = self.ws.close_code
                        break
            finally:
                sender.cancel()
                try:
                    await sender
                except asyncio.CancelledError:
                    pass
            self.closes.append((code, reason))
            token = reason[len("resume="):] if reason.startswith("resume=") else None
            if stop.is_set() or token is None or reconnects >= max_reconnects:
                return
            reconnects += 1
            self.token = token
            self.resumes += 1
            await self.connect(next_url())

    async def _send_loop(self, stop: asyncio.Event) -> None:
        while not stop.is_set() and not self.ws.closed:
            n = self.sent + 1
            try:
                await self.ws.send_str(f"c{n}")
            except (ConnectionError, RuntimeError):
                return
            if self.ws.closed:
                return   # the frame may not have left before the close: send it again later
            self.sent = n
            await asyncio.sleep(self.interval_s)

    async def close(self) -> None:
        if self.ws is not None and not self.ws.closed:
            await self.ws.close()


def contiguous(prefix: str, seen: list[str]) -> int:
    """Assert `seen` is prefix1, prefix2, ... with no gap, duplicate or reordering; returns its length."""
    expected = [f"{prefix}{i}" for i in range(1, len(seen) + 1)]
    if seen != expected:
        for i, (a, b) in enumerate(zip(seen, expected)):
            if a != b:
                raise AssertionError(f"stream {prefix!r} breaks at position {i}: got {a!r}, expected {b!r} "
                                     f"(around: {seen[max(0, i - 3):i + 4]})")
        raise AssertionError(f"stream {prefix!r} length mismatch")
    return len(seen)
