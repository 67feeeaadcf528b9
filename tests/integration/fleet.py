"""A backend fleet for the reattach and reload tests: numbered messages both
ways, every frame accounted for.

`Fleet` is the backend's shared state, as a real backend keeps it in a
database: per Gateway-Session-Id, the client messages in the order they
arrived at any endpoint, and the number of the last message sent. Each
`FleetEndpoint` is a raw WebSocket server (asyncio streams, so that what it
writes and reads is exactly known) that sends "s1", "s2", ... for its
sessions while their connection is open, and records what the client sends.
`restart()` closes its connections the way a backend being replaced should:
a close with 1012, then it keeps reading (and recording) until the close is
answered (RFC 6455 5.5.1).

`numbered_client` runs numbered.py's client ("c1", "c2", ...) through the
gateway, without its reconnects: a close it sees is one the gateway let through.
"""

from __future__ import annotations

import asyncio
import collections

import aiohttp
from aiohttp import WSMsgType

from gateway import frames
from gateway.frames import OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT

from ..conftest import proxy_config
from ..helpers import until
from .numbered import NumberedClient, contiguous


class Fleet:
    def __init__(self, interval_s: float = 0.002):
        self.interval_s = interval_s
        self.got: dict[str, list[str]] = collections.defaultdict(list)   # session -> client messages
        self.sent: dict[str, int] = collections.defaultdict(int)         # session -> last number sent
        self.handshakes: list[dict[str, str]] = []
        self.quiet = False    # True: the endpoints stop sending (the end of a test: counts stand still)
        # session -> its open connections, oldest first. Only the oldest sends: during a
        # move the new upstream of a session is open before the old one has closed, and
        # the numbers go on where the old one stopped, as a backend with shared state does.
        self.open: dict[str, list] = collections.defaultdict(list)

    async def endpoint(self) -> "FleetEndpoint":
        ep = FleetEndpoint(self)
        await ep.start()
        return ep


class _Conn:
    __slots__ = ("sid", "reader", "writer", "closing", "pump", "ep")

    def __init__(self, ep, sid, reader, writer):
        self.ep = ep
        self.sid = sid
        self.reader = reader
        self.writer = writer
        self.closing = False   # our close went (or theirs came): no more data from us
        self.pump = None

    def close(self, code: int) -> None:
        if not self.closing:
            self.closing = True
            self.writer.write(frames.frame(OP_CLOSE, frames.close_payload(code, "restart")))


class FleetEndpoint:
    def __init__(self, fleet: Fleet):
        self.fleet = fleet
        self.server = None
        self.port = 0
        self.conns: set[_Conn] = set()
        self.sessions = 0
        self.closes: list[int] = []    # close codes it received
        self.healthy = True            # what GET /healthz answers (200 or 503)
        self.answers = True            # False: a close from the gateway is never answered
        self.upgrades: asyncio.Event | None = None   # set: upgrades are answered only once it is set

    @property
    def url(self) -> str:
        return f"ws://127.0.0.1:{self.port}/ws"

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def restart(self, code: int = 1012) -> None:
        """Stop listening, close every connection with `code`, wait for the answers."""
        self.server.close()
        conns = list(self.conns)
        for c in conns:
            c.close(code)
        await holds(lambda: not self.conns, 10, f"{self.url}'s closes answered")

    async def stop(self) -> None:
        self.server.close()
        for c in list(self.conns):
            c.writer.transport.abort()

    async def _serve(self, reader, writer) -> None:
        try:
            head = (await reader.readuntil(b"\r\n\r\n")).decode("latin-1")
        except (asyncio.IncompleteReadError, ConnectionError):
            writer.close()
            return
        headers = {}
        for line in head.split("\r\n")[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip()] = value.strip()
        key = next((v for k, v in headers.items() if k.lower() == "sec-websocket-key"), None)
        if key is None:   # the gateway's active health check
            status = "200 OK" if self.healthy else "503 Service Unavailable"
            writer.write(f"HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode())
            writer.close()
            return
        if self.upgrades is not None:
            await self.upgrades.wait()
        self.fleet.handshakes.append(headers)
        writer.write(f"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                     f"Sec-WebSocket-Accept: {frames.accept_key(key)}\r\n\r\n".encode())
        c = _Conn(self, headers["Gateway-Session-Id"], reader, writer)
        self.conns.add(c)
        self.fleet.open[c.sid].append(c)
        self.sessions += 1
        c.pump = asyncio.ensure_future(self._pump(c))
        try:
            await self._read(c)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            c.closing = True
            c.pump.cancel()
            self.conns.discard(c)
            self.fleet.open[c.sid].remove(c)
            writer.close()

    async def _pump(self, c: _Conn) -> None:
        fleet = self.fleet
        while not c.closing and not c.writer.is_closing():
            if fleet.open[c.sid][0] is c and not fleet.quiet:
                n = fleet.sent[c.sid] + 1
                c.writer.write(frames.frame(OP_TEXT, f"s{n}".encode()))
                fleet.sent[c.sid] = n
            await asyncio.sleep(fleet.interval_s)

    async def _read(self, c: _Conn) -> None:
        buf = b""
        got = self.fleet.got[c.sid]
        parts = None   # a fragmented text message being received
        while True:
            data = await c.reader.read(65536)
            if not data:
                return
            buf += data
            pos = 0
            while (h := frames.parse_header(buf, pos)) is not None:
                b0, length, hlen, mask = h
                end = pos + hlen + length
                if end > len(buf):
                    break
                payload = frames.unmask(buf[pos + hlen:end], mask) if mask else buf[pos + hlen:end]
                pos = end
                op = b0 & 0x0F
                if op == OP_TEXT or op == OP_CONT:
                    parts = (parts or b"") + payload
                    if b0 & 0x80:
                        got.append(parts.decode())
                        parts = None
                elif op == OP_PING and not c.closing:
                    c.writer.write(frames.frame(OP_PONG, payload))
                elif op == OP_CLOSE:
                    parsed = frames.parse_close(payload)
                    self.closes.append(parsed[0] if parsed else 1005)
                    if not c.closing:   # theirs first: answer, echoing the code
                        c.closing = True
                        if not self.answers:
                            continue        # ... or not: read on until the gateway gives up
                        c.writer.write(frames.frame(OP_CLOSE, payload[:2]))
                    return
            buf = buf[pos:]


async def holds(cond, timeout_s: float, what: str):
    """`until` for a plain condition."""
    async def check():
        return cond()
    return await until(check, timeout_s, what)


async def numbered_client(http: aiohttp.ClientSession, url: str) -> NumberedClient:
    """numbered.py's client, sending "c1", "c2", ... and reading until stopped (`stop_sending`);
    it never reconnects, so a close in its `closes` is a close the gateway let through."""
    c = NumberedClient(http, url, interval_s=0.002)
    await c.connect()
    c.stop = asyncio.Event()
    c.sender = asyncio.ensure_future(c._send_loop(c.stop))
    c.reader = asyncio.ensure_future(_read(c))
    return c


async def _read(c: NumberedClient) -> None:
    async for msg in c.ws:
        if msg.type == WSMsgType.TEXT:
            c.got.append(msg.data)
    c.closes.append((c.ws.close_code, ""))


async def stop_sending(c: NumberedClient) -> None:
    c.stop.set()
    await c.sender


async def close(c: NumberedClient) -> None:
    c.stop.set()
    await c.close()
    c.sender.cancel()
    c.reader.cancel()


async def settle(clients: list[NumberedClient], fleet: Fleet, sids: list[str], timeout_s: float = 10) -> None:
    """Stop the traffic both ways, then wait until every message reached its far end
    and check both streams of every session: nothing lost, doubled or reordered."""
    fleet.quiet = True
    for c in clients:
        await stop_sending(c)
    for c, sid in zip(clients, sids):
        await holds(lambda: len(fleet.got[sid]) >= c.sent, timeout_s, f"the backend got {sid}'s {c.sent} messages")
        await holds(lambda: len(c.got) >= fleet.sent[sid], timeout_s, f"{sid} got the backend's messages")
        assert contiguous("c", fleet.got[sid]) == c.sent
        assert contiguous("s", c.got) == fleet.sent[sid]
        assert c.closes == [], f"the client of {sid} was closed: {c.closes}"


# ------------------------------------------------------------ a gateway in front of the fleet
BOUND_S = 10.0   # only trips on a hang; nothing here is timed


def reattach_config(*urls: str, **top) -> dict:
    return proxy_config(*urls, backend={"on_upstream_close": "reattach"}, **top)


async def clients(http, gw, n: int) -> tuple[list[NumberedClient], list[str]]:
    """`n` numbered clients through `gw`, and their session ids (in the same order)."""
    out, sids = [], []
    for _ in range(n):
        before = set(gw.node.sessions)
        c = await numbered_client(http, gw.url + "/ws")
        await holds(lambda: set(gw.node.sessions) - before, BOUND_S, "the session is live")
        (conn,) = set(gw.node.sessions) - before
        out.append(c)
        sids.append(gw.node.sessions[conn].session_id)
    return out, sids


def on(gw, url: str) -> int:
    return sum(1 for s in gw.node.sessions.values() if s.endpoint is not None and s.endpoint.url == url)


async def traffic(cs: list[NumberedClient]) -> None:
    """Each client has received more messages since this was called: traffic flows."""
    marks = [len(c.got) for c in cs]
    await holds(lambda: all(len(c.got) > m + 5 for c, m in zip(cs, marks)), BOUND_S, "traffic flows")


async def api(http, gw, method: str, path: str, body=None):
    async with http.request(method, gw.admin_url + path, json=body) as r:
        return r.status, await r.json()
