"""limits: each bound answered with its exact status or close code."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest
from aiohttp import WSMsgType

from gateway import frames

from ..conftest import proxy_config
from ..helpers import RawClient, until


async def test_message_over_max_is_closed_1009_and_never_reaches_backend(gateway, backend, http):
    b = await backend()
    gw = await gateway(proxy_config(b.url, limits={"max_message_bytes": 1000}))
    async with http.ws_connect(gw.url + "/ws") as ws:
        await ws.send_bytes(b"x" * 1000)
        assert (await ws.receive()).data == b"x" * 1000
        await ws.send_bytes(b"x" * 1001)
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1009)
    assert [len(d) for _, d in b.received] == [1000]


async def test_fragmented_message_over_max_is_closed_1009(gateway, backend):
    b = await backend()
    gw = await gateway(proxy_config(b.url, limits={"max_message_bytes": 1000}))
    c = await RawClient.connect(gw.url + "/ws")
    for _ in range(3):
        c.send_frame(frames.OP_BINARY if _ == 0 else frames.OP_CONT, b"y" * 400, fin=False)
    assert (await c.recv_close())[0] == 1009
    c.close()


async def test_max_connections_answers_503_with_retry_after(gateway, backend, http):
    b = await backend()
    gw = await gateway(proxy_config(b.url, limits={"max_connections": 2}))
    held = [await http.ws_connect(gw.url + "/ws") for _ in range(2)]
    c = await RawClient.connect(gw.url + "/ws")
    assert c.status == 503 and c.headers["retry-after"] == "5"
    for ws in held:
        await ws.close()


async def test_per_ip_limit_answers_429(gateway, backend, http):
    b = await backend()
    gw = await gateway(proxy_config(b.url, limits={"max_connections_per_ip": 2}))
    held = [await http.ws_connect(gw.url + "/ws") for _ in range(2)]
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await http.ws_connect(gw.url + "/ws")
    assert exc.value.status == 429
    await held[0].close()
    await until(lambda: asyncio.sleep(0, gw.node.per_ip.get("127.0.0.1", 0) < 2),
                what="the slot freed once the first socket is gone")
    async with http.ws_connect(gw.url + "/ws"):
        pass
    await held[1].close()


async def test_idle_session_is_closed_1001(gateway, backend, http):
    b = await backend()
    gw = await gateway(proxy_config(b.url, limits={"idle_timeout_s": 0.4}))
    async with http.ws_connect(gw.url + "/ws", autoping=True) as ws:
        await ws.send_str("one")
        await ws.receive()
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1001, "idle timeout")


async def test_pings_do_not_count_as_activity(gateway, backend):
    b = await backend()
    gw = await gateway(proxy_config(b.url, limits={"idle_timeout_s": 0.4}))
    c = await RawClient.connect(gw.url + "/ws")
    async def pinger():
        for _ in range(40):
            c.send_frame(frames.OP_PING, b"k")
            await asyncio.sleep(0.05)
    task = asyncio.ensure_future(pinger())
    assert (await c.recv_close(timeout=5))[0] == 1001
    task.cancel()
    c.close()


async def test_max_lifetime_closes_1001(gateway, backend, http):
    b = await backend()
    gw = await gateway(proxy_config(b.url, limits={"max_lifetime_s": 0.3}))
    async with http.ws_connect(gw.url + "/ws") as ws:
        msg = await ws.receive(timeout=5)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1001, "max lifetime reached")


async def test_client_that_stops_reading_is_closed_1013_and_memory_stays_bounded(gateway, backend):
    flood_done = asyncio.get_running_loop().create_future()

    async def flood(ws, request):
        chunk = os.urandom(64 << 10)
        sent = 0
        try:
            for _ in range(4000):  # at most 256 MiB: far beyond every buffer on the way
                await ws.send_bytes(chunk)
                sent += len(chunk)
        except (ConnectionError, RuntimeError):
            pass  # the gateway gave up on this session: expected
        finally:
            flood_done.set_result(sent)

    b = await backend(handler=flood)
    limit = 256 << 10
    gw = await gateway(proxy_config(b.url, limits={"send_buffer_bytes": limit, "stall_timeout_s": 0.5,
                                                    "close_timeout_s": 1}))
    c = await RawClient.connect(gw.url + "/ws")   # never reads
    sent = await asyncio.wait_for(flood_done, 20)

    async def closed():
        # While it is open, what the gateway holds for the client stays bounded.
        for session in gw.node.sessions.values():
            assert session.transport.get_write_buffer_size() <= limit + (256 << 10) + 64
        return not gw.node.sessions
    await until(closed, what="the slow consumer closed", interval_s=0.02)
    assert sent < 200 << 20  # the backend was held back, not buffered for
    # What the client can still read ends with the 1013 close frame (or the socket is cut).
    try:
        code, _ = await c.recv_close(timeout=10)
        assert code == 1013
    except (asyncio.IncompleteReadError, ConnectionResetError):
        pass
    c.close()


async def test_backend_that_stops_reading_closes_client_1013(gateway, backend):
    done = asyncio.Event()

    async def deaf(ws, request):
        request.transport.pause_reading()
        await done.wait()          # holds the socket unread until the test is over

    b = await backend(handler=deaf)
    gw = await gateway(proxy_config(b.url, limits={"send_buffer_bytes": 64 << 10, "stall_timeout_s": 0.5,
                                                    "max_message_bytes": 1 << 20, "close_timeout_s": 0.5}))
    c = await RawClient.connect(gw.url + "/ws")
    chunk = os.urandom(1 << 20)

    async def flood():
        for _ in range(200):
            c.send_frame(frames.OP_BINARY, chunk)
            await c.writer.drain()

    task = asyncio.ensure_future(flood())
    code, reason = await c.recv_close(timeout=15)
    assert (code, reason) == (1013, "backend not reading")
    task.cancel()
    c.close()
    done.set()


async def test_half_handshake_is_dropped(gateway, backend):
    b = await backend()
    gw = await gateway(proxy_config(b.url, limits={"handshake_timeout_s": 0.3}))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports[0])
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\n")  # and never the rest
    assert await asyncio.wait_for(reader.read(), 5) == b""
    writer.close()
    assert gw.node.sockets == 0


async def test_oversized_request_head_is_431(gateway, backend):
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports[0])
    writer.write(b"GET /ws HTTP/1.1\r\nX-Big: " + b"a" * 20000 + b"\r\n\r\n")
    head = await asyncio.wait_for(reader.read(), 5)
    assert head.startswith(b"HTTP/1.1 431")
    writer.close()


@pytest.mark.parametrize("request_bytes,status", [
    (b"GET /ws HTTP/1.1\r\nHost: x\r\n\r\n", 426),
    (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 8\r\n"
     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", 426),
    (b"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
     b"Sec-WebSocket-Key: short\r\n\r\n", 400),
    (b"POST /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
     b"Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n\r\n", 405),
    (b"garbage\r\n\r\n", 400),
    (b"GET /ws HTTP/1.1\r\nbad header line\r\n\r\n", 400),
])
async def test_bad_handshakes_get_clear_statuses(gateway, backend, request_bytes, status):
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports[0])
    writer.write(request_bytes)
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.split(b"\r\n", 1)[0].split(b" ")[1] == str(status).encode()
    assert b"Traceback" not in answer
    writer.close()
    assert b.requests == []
