"""Test peers: an aiohttp WebSocket backend and a raw-frame WebSocket client."""

from __future__ import annotations

import asyncio
import base64
import os
import socket
import struct
import time

from aiohttp import WSMsgType, web

from gateway import frames


async def until(check, timeout_s: float = 10.0, what: str = "condition", interval_s: float = 0.05):
    """Await `check()` until it returns something truthy, and return that; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = await check()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout_s} s (last: {value!r})")
        await asyncio.sleep(interval_s)


def free_port() -> int:
    """A port nothing listens on now (bound, then released)."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


async def serve(app: web.Application, port: int = 0) -> tuple[web.AppRunner, int]:
    """Start `app` on 127.0.0.1 (a free port unless given); returns (runner, port)."""
    runner = web.AppRunner(app, handle_signals=False, shutdown_timeout=1, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", port)
    await site.start()
    return runner, site._server.sockets[0].getsockname()[1]


class WsBackend:
    """A real aiohttp WebSocket server. Records each handshake's headers and
    every message it receives; echoes by default, or runs `handler(ws, request)`."""

    def __init__(self, handler=None, protocols=(), compress=True, status: int | None = None, health_status=200):
        self.handler = handler
        self.protocols = protocols
        self.compress = compress
        self.status = status
        self.health_status = health_status
        self.requests: list = []       # request headers per handshake
        self.paths: list[str] = []
        self.received: list = []       # (type, data) per message
        self.closes: list = []         # close code seen per session
        self.sessions = 0
        self.health_checks = 0
        self.runner = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self, port: int = 0) -> None:
        app = web.Application()
        app.router.add_get("/healthz", self._health)
        app.router.add_route("GET", "/{tail:.*}", self._ws)
        self.runner, self.port = await serve(app, port)

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None

    async def _health(self, request):
        self.health_checks += 1
        return web.Response(status=self.health_status, text="ok")

    async def _ws(self, request):
        self.requests.append(request.headers.copy())
        self.paths.append(request.path_qs)
        if self.status is not None:
            return web.Response(status=self.status, text="refused by backend")
        ws = web.WebSocketResponse(protocols=self.protocols, compress=self.compress, max_msg_size=64 << 20,
                                   autoping=True)
        await ws.prepare(request)
        self.sessions += 1
        try:
            if self.handler is not None:
                await self.handler(ws, request)
            else:
                async for msg in ws:
                    self.received.append((msg.type, msg.data))
                    if msg.type == WSMsgType.TEXT:
                        await ws.send_str(msg.data)
                    elif msg.type == WSMsgType.BINARY:
                        await ws.send_bytes(msg.data)
        finally:
            self.closes.append(ws.close_code)
        return ws


class RawClient:
    """A WebSocket client at the frame level, for what libraries will not send."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, status: int, headers: dict):
        self.reader = reader
        self.writer = writer
        self.status = status
        self.headers = headers

    @classmethod
    async def connect(cls, url: str, headers: dict | None = None, *, send_key: bool = True) -> "RawClient":
        rest = url.split("://", 1)[1]
        hostport, _, path = rest.partition("/")
        host, _, port = hostport.partition(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        key = base64.b64encode(os.urandom(16)).decode()
        lines = [f"GET /{path} HTTP/1.1", f"Host: {hostport}", "Upgrade: websocket", "Connection: Upgrade",
                 "Sec-WebSocket-Version: 13"]
        if send_key:
            lines.append(f"Sec-WebSocket-Key: {key}")
        lines += [f"{k}: {v}" for k, v in (headers or {}).items()]
        writer.write(("\r\n".join(lines) + "\r\n\r\n").encode())
        head = await reader.readuntil(b"\r\n\r\n")
        status_line, *hl = head.decode("latin-1").split("\r\n")
        status = int(status_line.split(" ")[1])
        hdrs = {}
        for line in hl:
            if ":" in line:
                k, v = line.split(":", 1)
                hdrs[k.strip().lower()] = v.strip()
        return cls(reader, writer, status, hdrs)

    def send_frame(self, opcode: int, payload: bytes = b"", *, fin: bool = True, mask: bool = True,
                   rsv: int = 0) -> None:
        data = frames.frame(opcode, payload, fin=fin, mask=mask)
        if rsv:
            data = bytes([data[0] | rsv]) + data[1:]
        self.writer.write(data)

    async def recv_frame(self, timeout: float = 5.0) -> tuple[int, bool, bytes]:
        """(opcode, fin, payload); raises asyncio.IncompleteReadError at EOF."""
        async with asyncio.timeout(timeout):
            head = await self.reader.readexactly(2)
            b0, b1 = head
            n = b1 & 0x7F
            if n == 126:
                n = struct.unpack("!H", await self.reader.readexactly(2))[0]
            elif n == 127:
                n = struct.unpack("!Q", await self.reader.readexactly(8))[0]
            mask = await self.reader.readexactly(4) if b1 & 0x80 else None
            payload = await self.reader.readexactly(n)
            if mask:
                payload = frames.unmask(payload, mask)
            return b0 & 0x0F, bool(b0 & 0x80), payload

    async def recv_close(self, timeout: float = 5.0) -> tuple[int, str]:
        """Skip data frames until a close frame; returns (code, reason)."""
        while True:
            op, _, payload = await self.recv_frame(timeout)
            if op == frames.OP_CLOSE:
                parsed = frames.parse_close(payload)
                assert parsed is not None, payload
                return parsed

    async def eof(self, timeout: float = 5.0) -> bool:
        async with asyncio.timeout(timeout):
            return await self.reader.read() == b""

    def close(self) -> None:
        self.writer.close()
