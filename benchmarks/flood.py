"""The `flood` scenario: healthy sessions' latency with and without a flood beside them.

The flood (run from the harness process, not the Node generator): `slow` clients that
send 64 KiB binary messages and never read what comes back, so every buffer between
them and the echo backend fills (the target's send buffers, then TCP backpressure; a
gateway closes them 1013 after stall_timeout_s and they reconnect), and `half_open`
sockets holding a request head that never ends. The healthy sessions are the `rate`
scenario's open loop, run once quiet and once under the flood; docs/resource-bounds.md
and BENCHMARKS.md ("Under a flood") give the figures.
"""

from __future__ import annotations

import asyncio
import base64
import os
import struct
from urllib.parse import urlsplit

CHUNK = 64 << 10


def _frame(payload: bytes) -> bytes:
    """A masked binary frame (the mask is all zeros: the payload goes as is)."""
    n = len(payload)
    head = bytes([0x82]) + (bytes([0x80 | 126]) + struct.pack("!H", n) if n < 65536
                            else bytes([0x80 | 127]) + struct.pack("!Q", n))
    return head + b"\0\0\0\0" + payload


async def _upgrade(url: str) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    u = urlsplit(url)
    reader, writer = await asyncio.open_connection(u.hostname, u.port)
    key = base64.b64encode(os.urandom(16)).decode()
    writer.write((f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\nUpgrade: websocket\r\n"
                  f"Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\nSec-WebSocket-Key: {key}\r\n\r\n").encode())
    head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
    if b" 101 " not in head.split(b"\r\n", 1)[0]:
        writer.close()
        raise ConnectionError(head.split(b"\r\n", 1)[0].decode("latin-1"))
    writer.transport.pause_reading()          # never read what comes back
    return reader, writer


class Flood:
    def __init__(self, url: str, slow: int, half_open: int):
        self.url, self.slow, self.half_open = url, slow, half_open
        self.stop = asyncio.Event()
        self.tasks: list[asyncio.Task] = []
        self.opened = self.sent_mib = 0
        self.writers: list[asyncio.StreamWriter] = []

    async def _slow_reader(self) -> None:
        frame = _frame(b"f" * CHUNK)
        while not self.stop.is_set():
            try:
                _, writer = await _upgrade(self.url)
            except (OSError, ConnectionError, asyncio.TimeoutError):
                await asyncio.sleep(0.2)
                continue
            self.opened += 1
            try:
                while not self.stop.is_set() and not writer.is_closing():
                    writer.write(frame)
                    self.sent_mib += CHUNK / (1 << 20)
                    try:
                        await asyncio.wait_for(writer.drain(), 0.5)
                    except asyncio.TimeoutError:
                        while not self.stop.is_set() and writer.transport.get_write_buffer_size():
                            await asyncio.sleep(0.2)
                            if writer.is_closing():
                                break
            except (OSError, ConnectionError):
                pass
            finally:
                writer.close()

    async def __aenter__(self) -> "Flood":
        u = urlsplit(self.url)
        for _ in range(self.half_open):
            _, w = await asyncio.open_connection(u.hostname, u.port)
            w.write(f"GET {u.path or '/'} HTTP/1.1\r\nHost: {u.netloc}\r\nX-Pad: ".encode() + b"a" * 8000)
            self.writers.append(w)
        self.tasks = [asyncio.create_task(self._slow_reader()) for _ in range(self.slow)]
        await asyncio.sleep(1.0)              # let the buffers fill before the healthy load starts
        return self

    async def __aexit__(self, *exc) -> None:
        self.stop.set()
        for t in self.tasks:
            t.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for w in self.writers:
            w.close()


async def run_flood(target, backend, *, slow: int, half_open: int, **rate) -> dict:
    """The rate scenario quiet, then again under the flood; both sets of figures."""
    from .run import run_echo

    quiet = await run_echo(target, backend, **rate)
    async with Flood(target.url, slow, half_open) as flood:
        loud = await run_echo(target, backend, **rate)
    out = {"slow": slow, "half_open": half_open, "flood_connections": flood.opened,
           "flood_sent_mib": round(flood.sent_mib, 1)}
    for name, res in (("quiet", quiet), ("flood", loud)):
        for k in ("p50_ms", "p99_ms", "p999_ms", "lost", "msgs_per_s", "closed_early"):
            if k in res:
                out[f"{name}_{k}"] = res[k]
    return out
