"""Backends that misbehave: an endpoint that flaps (accepts, then resets), one that
stops reading, one that answers slowly (websocket and HTTP backend modes). Each test
also runs numbered sessions on another route to another backend, which must not
notice."""

from __future__ import annotations

import asyncio

from aiohttp import WSMsgType, web

from ..helpers import WsBackend

from ..integration.fleet import BOUND_S, Fleet, close, holds
from ..integration.numbered import contiguous
from .counts import SCALE, Row
from .streams import flowing, open_clients, settle_intact

N = 4 * SCALE


def config(backend: dict, other_url: str, **top) -> dict:
    cfg = {"backends": {"x": backend, "d": {"type": "websocket", "endpoints": [other_url]}},
           "routes": [{"name": "x", "match": {"path_prefix": "/ws"}, "auth": "none", "backend": "x"},
                      {"name": "d", "match": {"path_prefix": "/other"}, "auth": "none", "backend": "d"}]}
    cfg.update(top)
    return cfg


class Flapper:
    """Accepts each TCP connection, reads the upgrade request, then resets it."""

    def __init__(self):
        self.resets = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._conn, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def _conn(self, reader, writer) -> None:
        try:
            await reader.readuntil(b"\r\n\r\n")
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        self.resets += 1
        writer.transport.abort()

    def close(self) -> None:
        self.server.close()


async def test_flapping_endpoint_sends_traffic_to_the_healthy_one(gateway, http, record_property):
    fleet = Fleet(interval_s=0.005)
    good, direct = await fleet.endpoint(), await fleet.endpoint()
    flap = Flapper()
    await flap.start()
    backend = {"type": "websocket", "endpoints": [f"ws://127.0.0.1:{flap.port}/ws", good.url],
               "eject_after_failures": 2, "eject_cooldown_s": 60}
    gw = await gateway(config(backend, direct.url))
    dc, ds = await open_clients(http, gw, "/other", N)
    row = Row(record_property, "one of two endpoints accepts TCP, then resets every connection",
              f"{N} new sessions on the flapping backend, {N} on another, numbered both ways every 5 ms")
    xc, xs = await open_clients(http, gw, "/ws", N)      # every one opens: no 502 seen
    assert flap.resets >= 1
    assert good.sessions == N, (good.sessions, flap.resets)
    await flowing(xc + dc)
    await settle_intact(row, xc, fleet, xs)
    await settle_intact(None, dc, fleet, ds)
    row.done("unaffected")
    for c in xc + dc:
        await close(c)
    flap.close()
    for ep in (good, direct):
        await ep.stop()


async def test_backend_that_stops_reading_is_closed_1013_and_memory_stays_bounded(gateway, http, record_property):
    fleet = Fleet(interval_s=0.005)
    direct = await fleet.endpoint()
    stuck = asyncio.Event()

    async def never_reads(ws, request):
        await stuck.wait()       # upgraded, then reads nothing: TCP fills up

    deaf = WsBackend(handler=never_reads, compress=False)
    await deaf.start()
    buffer = 64 * 1024
    gw = await gateway(config({"type": "websocket", "endpoints": [deaf.url]}, direct.url,
                              limits={"send_buffer_bytes": buffer, "stall_timeout_s": 1}))
    dc, ds = await open_clients(http, gw, "/other", N)
    row = Row(record_property, "backend upgrades, then never reads; client sends 16 KiB messages as fast as it can",
              f"{N} sessions to the deaf backend, {N} numbered sessions on another backend")
    before = set(gw.node.sessions)
    clients = [await http.ws_connect(gw.url + "/ws", autoclose=True) for _ in range(N)]
    await holds(lambda: len(set(gw.node.sessions) - before) == N, BOUND_S, "deaf sessions live")
    deaf_sessions = [gw.node.sessions[k] for k in set(gw.node.sessions) - before]
    chunk = b"x" * 16384
    sent = [0] * N
    peak = [0]

    async def flood(i, ws):
        # A bounded number of sends; each waits for the socket, so once the gateway stops
        # reading (backpressure) this client's sends block too.
        for _ in range(4000):
            if ws.closed:
                return
            try:
                await asyncio.wait_for(ws.send_bytes(chunk), 0.5)
            except (asyncio.TimeoutError, ConnectionError, RuntimeError):
                return
            sent[i] += 1

    async def watch():
        while any(s.up is not None for s in deaf_sessions) and not all(ws.closed for ws in clients):
            for s in deaf_sessions:
                t = getattr(s.up, "get_write_buffer_size", None)
                if t is not None:
                    peak[0] = max(peak[0], t())
            await asyncio.sleep(0.01)

    watcher = asyncio.ensure_future(watch())
    floods = [asyncio.ensure_future(flood(i, ws)) for i, ws in enumerate(clients)]
    codes = []
    for ws in clients:
        msg = await ws.receive(timeout=BOUND_S)
        while msg.type not in (WSMsgType.CLOSE, WSMsgType.CLOSED, WSMsgType.CLOSING):
            msg = await ws.receive(timeout=BOUND_S)
        codes.append((ws.close_code, msg.extra))
    await asyncio.gather(*floods)
    watcher.cancel()
    assert codes == [(1013, "backend not reading")] * N, codes
    # The gateway's buffer toward the backend never grew past its bound by more than a read.
    assert 0 < peak[0] <= buffer + 256 * 1024, peak[0]
    # Far fewer than the 4,000 offered were taken: the client was pushed back.
    assert all(0 < n < 4000 for n in sent), sent
    # Counted at the backend: it read none of them (it reads nothing), and the client was
    # told so with 1013; every message the client got out is lost by design.
    row.sent, row.received, row.duplicated = sum(sent), 0, 0
    row.lost = row.sent - row.received
    await flowing(dc)
    await settle_intact(None, dc, fleet, ds)
    record_property("peak_gateway_buffer_bytes", peak[0])
    row.done("unaffected")
    stuck.set()
    for c in dc:
        await close(c)
    await deaf.stop()
    await direct.stop()


K = 30 * SCALE      # requests per slow session
SLOW_S = 0.02


async def ask_all(http, url: str, n: int) -> list[list[str]]:
    """`n` clients each send c1..cK one at a time and wait for each answer."""
    async def one():
        got = []
        async with http.ws_connect(url) as ws:
            for i in range(1, K + 1):
                await ws.send_str(f"c{i}")
                msg = await ws.receive(timeout=BOUND_S)
                assert msg.type == WSMsgType.TEXT, msg
                got.append(msg.data)
        return got
    return await asyncio.gather(*(one() for _ in range(n)))


async def slow_test(gateway, http, record_property, backend: dict, kind: str, seen_at_backend):
    fleet = Fleet(interval_s=0.005)
    direct = await fleet.endpoint()
    gw = await gateway(config(backend, direct.url))
    dc, ds = await open_clients(http, gw, "/other", N)
    row = Row(record_property, f"{kind} backend answers every message after {int(SLOW_S * 1000)} ms",
              f"{N} sessions x {K} request/answer, {N} numbered sessions on another backend")
    answers = await ask_all(http, gw.url + "/ws", N)
    for got in answers:
        assert contiguous("c", got) == K     # every answer, once, in order
        row.add("c", K, got)
    assert sorted(seen_at_backend()) == sorted(f"c{i}" for i in range(1, K + 1) for _ in range(N))
    await flowing(dc)
    await settle_intact(None, dc, fleet, ds)
    row.done("unaffected")
    for c in dc:
        await close(c)
    await direct.stop()


async def test_slow_websocket_backend_answers_everything_in_order(gateway, http, record_property):
    seen = []

    async def slow_echo(ws, request):
        async for msg in ws:
            seen.append(msg.data)
            await asyncio.sleep(SLOW_S)
            await ws.send_str(msg.data)

    b = WsBackend(handler=slow_echo, compress=False)
    await b.start()
    await slow_test(gateway, http, record_property, {"type": "websocket", "endpoints": [b.url]},
                    "websocket", lambda: seen)
    await b.stop()


async def test_slow_http_backend_answers_everything_in_order(gateway, http, http_peer, record_property):
    async def slow_echo(request, body):
        await asyncio.sleep(SLOW_S)
        return web.Response(body=body, content_type="text/plain")

    peer = await http_peer(slow_echo)
    await slow_test(gateway, http, record_property, {"type": "http", "endpoints": [peer.url]}, "HTTP",
                    lambda: [r.body.decode() for r in peer.of("message")])
