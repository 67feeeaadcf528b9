"""The chat demo's parts for the browser tests: its backend, its gateway config, and a
TCP balancer in front of the gateway nodes.

The page is given one gateway URL, the balancer's, as a browser behind a load
balancer is. `Balancer` plays a Kubernetes Service: each new TCP connection goes
to the first node whose `/readyz` answers 200, and its bytes are piped both ways
untouched. A draining node turns unready at once, so the client's resume lands on
another node; connections already piped stay where they are until they close.
The test kills no connection through it: every close is the gateway's own.

It also reads what the browser put on the wire (`wire`: each connection's text
messages, in order), so a test can tell what the gateway was given from what the
page asked its WebSocket to send.
"""

from __future__ import annotations

import asyncio
import importlib.util
import sys
from pathlib import Path

import aiohttp
import yaml

from gateway import frames

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "examples" / "chat"


def demo_backend():
    """examples/chat/backend.py as a module (the examples are scripts, not a package)."""
    name = "chat_demo_backend"
    if name not in sys.modules:
        spec = importlib.util.spec_from_file_location(name, DEMO / "backend.py")
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
    return sys.modules[name]


def node_config(node_id: str, redis_url: str, backend_port: int) -> dict:
    """The demo's routes.yaml, as one node of a cluster on `redis_url`."""
    cfg = yaml.safe_load((DEMO / "routes.yaml").read_text())
    cfg["node_id"] = node_id
    cfg["backends"]["chat"]["endpoints"] = [f"http://127.0.0.1:{backend_port}/events"]
    cfg["redis"] = {"url": redis_url, "heartbeat_s": 0.5, "node_ttl_s": 3, "timeout_s": 1}
    return cfg


class Balancer:
    """A TCP balancer that sends each new connection to the first ready node."""

    def __init__(self, nodes: list[tuple[int, str]]):
        self.nodes = nodes                # (listen port, admin URL) per node, in order of preference
        self.picks: list[int] = []        # the node index each connection went to (-1: none ready)
        self.wire: list[ClientMessages] = []   # per connection: the client's messages as they crossed
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self.http: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task] = set()

    async def start(self) -> None:
        self.http = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2))
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.server is not None:
            self.server.close()
        for t in list(self.tasks):
            t.cancel()
        if self.tasks:
            await asyncio.wait(list(self.tasks), timeout=5)
        if self.http is not None:
            await self.http.close()

    async def _ready(self, admin_url: str) -> bool:
        try:
            async with self.http.get(admin_url + "/readyz") as r:
                return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError):
            return False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        self.tasks.add(task)
        try:
            for i, (port, admin_url) in enumerate(self.nodes):
                if await self._ready(admin_url):
                    break
            else:
                self.picks.append(-1)
                writer.close()
                return
            self.picks.append(i)
            try:
                up_reader, up_writer = await asyncio.open_connection("127.0.0.1", port)
            except OSError:
                writer.close()
                return
            seen = ClientMessages()
            self.wire.append(seen)
            await asyncio.gather(_pipe(reader, up_writer, seen.feed), _pipe(up_reader, writer))
        finally:
            self.tasks.discard(task)


class ClientMessages:
    """The text messages a WebSocket client sends, read off its byte stream
    (after the HTTP request head; frames masked, as a client's must be)."""

    def __init__(self):
        self.texts: list[str] = []
        self.closed = False        # the client's close frame went by
        self._buf = b""
        self._head = True
        self._parts: bytes | None = None

    def feed(self, data: bytes) -> None:
        buf = self._buf + data
        pos = 0
        if self._head:
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                self._buf = buf
                return
            self._head = False
            pos = end + 4
        while (h := frames.parse_header(buf, pos)) is not None:
            b0, length, hlen, mask = h
            end = pos + hlen + length
            if end > len(buf):
                break
            payload = frames.unmask(buf[pos + hlen:end], mask) if mask else buf[pos + hlen:end]
            pos = end
            op = b0 & 0x0F
            if op in (frames.OP_TEXT, frames.OP_CONT):
                self._parts = (self._parts or b"") + payload
                if b0 & 0x80:
                    self.texts.append(self._parts.decode())
                    self._parts = None
            elif op == frames.OP_CLOSE:
                self.closed = True
        self._buf = buf[pos:]


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, tap=None) -> None:
    """Copy until EOF (or an error) on `reader`, then close `writer`; `tap` sees every chunk."""
    try:
        while data := await reader.read(65536):
            if tap is not None:
                tap(data)
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()
