"""What the security tests share: raw HTTP exchanges (bytes a client library would
never send), a backend that records the exact bytes it is sent, configs, and the
one-line result each test records for the results table (junit XML properties)."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import time

import jwt

from gateway import frames

SECRET = "s" * 64          # the HS256 secret of every JWT here
JWT_ENV = "SECURITY_JWT_SECRET"
ADMIN_TOKEN = "adm1n-T0ken-for-the-security-tests-0123456789"


def record(record_property, input: str, cases: int, expected: str, failures: list) -> None:
    """The row of the results table: one line of input, how many cases, what each
    should get, how many did not. `failures` is the list of what went wrong."""
    record_property("input", input)
    record_property("cases", cases)
    record_property("expected", expected)
    record_property("failures", len(failures))


def token(sub="alice", **claims) -> str:
    return jwt.encode({"sub": sub, "exp": int(time.time()) + 3600, **claims}, SECRET, algorithm="HS256")


def ws_key() -> str:
    return base64.b64encode(os.urandom(16)).decode()


def upgrade(target: str = "/ws", *, host: str = "gw", extra: list[tuple[str, str]] | tuple = (),
            version: str = "HTTP/1.1", key: str | None = None, body: bytes = b"") -> bytes:
    """A WebSocket upgrade request written by hand, header order and spelling kept."""
    lines = [f"GET {target} {version}", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key or ws_key()}", "Sec-WebSocket-Version: 13"]
    lines += [f"{k}: {v}" for k, v in extra]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


class Answer:
    """What came back on a raw connection: the status line's code, headers, and the
    socket (still open after a 101)."""

    def __init__(self, status, headers, body, reader, writer):
        self.status = status
        self.headers = headers
        self.body = body
        self.reader = reader
        self.writer = writer

    def json(self) -> dict:
        try:
            return json.loads(self.body)
        except ValueError:
            return {}

    async def recv_frame(self, timeout: float = 5.0):
        """(opcode, payload) of the next frame from the gateway (unmasked)."""
        async with asyncio.timeout(timeout):
            b0, b1 = await self.reader.readexactly(2)
            n = b1 & 0x7F
            if n == 126:
                n = int.from_bytes(await self.reader.readexactly(2), "big")
            elif n == 127:
                n = int.from_bytes(await self.reader.readexactly(8), "big")
            return b0 & 0x0F, await self.reader.readexactly(n)

    async def closed(self, timeout: float = 5.0) -> tuple[int, str] | None:
        """Read frames until the close; its (code, reason), or None at EOF without one."""
        for _ in range(1000):
            try:
                op, payload = await self.recv_frame(timeout)
            except asyncio.IncompleteReadError:
                return None
            if op == frames.OP_CLOSE:
                return frames.parse_close(payload)
        raise AssertionError("no close within 1000 frames")

    def close(self) -> None:
        self.writer.close()


async def exchange(port: int, data: bytes, timeout: float = 5.0, chunks: int = 1) -> Answer:
    """Send `data` (in `chunks` writes), read the answer's head (and its body unless 101).
    status None: the gateway closed without answering."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    step = max(1, len(data) // chunks)
    for i in range(0, len(data), step):
        writer.write(data[i:i + step])
        await writer.drain()
    try:
        async with asyncio.timeout(timeout):
            head = await reader.readuntil(b"\r\n\r\n")
    except (asyncio.IncompleteReadError, ConnectionResetError):
        writer.close()
        return Answer(None, {}, b"", reader, writer)
    status_line, *lines = head.decode("latin-1").split("\r\n")
    headers = {}
    for line in lines:
        if ":" in line:
            k, v = line.split(":", 1)
            headers[k.strip().lower()] = v.strip()
    status = int(status_line.split(" ")[1])
    body = b""
    if status != 101:
        n = int(headers.get("content-length", "0"))
        async with asyncio.timeout(timeout):
            body = await reader.readexactly(n)
        writer.close()
    return Answer(status, headers, body, reader, writer)


class RawRecorder:
    """A backend that keeps the exact bytes of every request head it is sent, the way
    a backend's parser would meet them. A WebSocket upgrade gets its 101 (then the
    socket stays open, reading); any other request (an HTTP backend's POST) a 204."""

    def __init__(self):
        self.heads: list[bytes] = []
        self.server = None
        self.port = 0
        self._conns: set = set()

    @property
    def ws_url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/up"

    @property
    def http_url(self) -> str:
        return f"http://127.0.0.1:{self.port}/events"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        for w in list(self._conns):
            w.close()
        self.server.close()
        await self.server.wait_closed()

    async def _conn(self, reader, writer) -> None:
        self._conns.add(writer)
        try:
            for _ in range(10_000):
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                lines = head.decode("latin-1").split("\r\n")
                hdrs = {ln.split(":", 1)[0].strip().lower(): ln.split(":", 1)[1].strip()
                        for ln in lines[1:] if ":" in ln}
                if hdrs.get("upgrade", "").lower() == "websocket":
                    accept = frames.accept_key(hdrs.get("sec-websocket-key", ""))
                    writer.write(("HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\n"
                                  f"Connection: Upgrade\r\nSec-WebSocket-Accept: {accept}\r\n\r\n").encode())
                    await reader.read()   # frames until the gateway goes
                    return
                n = int(hdrs.get("content-length", "0") or 0)
                await reader.readexactly(n)
                writer.write(b"HTTP/1.1 204 No Content\r\nContent-Length: 0\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError, asyncio.LimitOverrunError):
            pass
        finally:
            self._conns.discard(writer)
            writer.close()

    def header_lines(self) -> list[str]:
        """Every header line every head held, split the way a backend splits (CR, LF or CRLF)."""
        out = []
        for head in self.heads:
            text = head.decode("latin-1")
            out += [ln for ln in text.replace("\r\n", "\n").replace("\r", "\n").split("\n")[1:] if ln]
        return out


def jwt_auth(forward_claims=("sub", "tenant", "role", "roles", "obj")) -> dict:
    return {"jwt": {"algorithms": ["HS256"], "keys": {"secret_env": JWT_ENV},
                    "sources": ["header", "query:access_token"], "forward_claims": list(forward_claims)}}
