"""Transparency: what the client sends the backend gets, byte for byte, and back."""

from __future__ import annotations

import asyncio
import os

import aiohttp
import pytest
from aiohttp import WSMsgType

from gateway import frames

from ..conftest import proxy_config
from ..helpers import RawClient, until


async def test_text_and_binary_cross_byte_for_byte(gateway, backend, http):
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    async with http.ws_connect(gw.url + "/ws") as ws:
        samples = ["", "hello", "ünïcødé ✓ 𝄞", "x" * 70_000]
        for text in samples:
            await ws.send_str(text)
            msg = await ws.receive()
            assert (msg.type, msg.data) == (WSMsgType.TEXT, text)
        for blob in (b"", b"\x00\xff" * 3, os.urandom(200_000)):
            await ws.send_bytes(blob)
            msg = await ws.receive()
            assert (msg.type, msg.data) == (WSMsgType.BINARY, blob)
    assert [d for _, d in b.received] == samples + [b"", b"\x00\xff" * 3, b.received[-1][1]]


async def test_16_mib_message_both_ways(gateway, backend, http):
    b = await backend()
    gw = await gateway(proxy_config(b.url, limits={"max_message_bytes": 32 << 20}))
    blob = os.urandom(16 << 20)
    async with http.ws_connect(gw.url + "/ws", max_msg_size=64 << 20) as ws:
        await ws.send_bytes(blob)
        msg = await ws.receive(timeout=30)
        assert msg.type == WSMsgType.BINARY and msg.data == blob


async def test_fragmented_message_arrives_whole(gateway, backend):
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    c = await RawClient.connect(gw.url + "/ws")
    assert c.status == 101
    c.send_frame(frames.OP_TEXT, "héllo ".encode()[:2], fin=False)   # split inside nothing yet
    c.send_frame(frames.OP_PING, b"in-between")                      # control frame between fragments
    c.send_frame(frames.OP_CONT, "héllo ".encode()[2:], fin=False)   # 'é' spans the boundary
    c.send_frame(frames.OP_CONT, b"world", fin=True)
    got = []
    while len(got) < 2:
        got.append(await c.recv_frame())
    assert (frames.OP_PONG, True, b"in-between") in got
    assert (frames.OP_TEXT, True, "héllo world".encode()) in got
    assert b.received == [(WSMsgType.TEXT, "héllo world")]
    c.close()


async def test_gateway_answers_client_ping(gateway, backend):
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    c = await RawClient.connect(gw.url + "/ws")
    c.send_frame(frames.OP_PING, b"are you there")
    assert await c.recv_frame() == (frames.OP_PONG, True, b"are you there")
    c.close()


@pytest.mark.parametrize("code,reason", [(4001, "bye"), (1000, ""), (3000, "ünï")])
async def test_backend_close_code_and_reason_reach_client(gateway, backend, http, code, reason):
    async def closer(ws, request):
        await ws.receive()
        await ws.close(code=code, message=reason.encode())

    b = await backend(handler=closer)
    gw = await gateway(proxy_config(b.url))
    async with http.ws_connect(gw.url + "/ws") as ws:
        await ws.send_str("go")
        msg = await ws.receive()
        assert msg.type == WSMsgType.CLOSE
        assert (msg.data, msg.extra) == (code, reason)


async def test_client_close_code_and_reason_reach_backend(gateway, backend, http):
    seen = asyncio.get_running_loop().create_future()

    async def watcher(ws, request):
        msg = await ws.receive()
        seen.set_result((msg.type, msg.data, msg.extra))

    b = await backend(handler=watcher)
    gw = await gateway(proxy_config(b.url))
    async with http.ws_connect(gw.url + "/ws") as ws:
        await ws.close(code=4002, message=b"client says bye")
    assert await asyncio.wait_for(seen, 5) == (WSMsgType.CLOSE, 4002, "client says bye")


async def test_subprotocol_offer_and_choice_cross(gateway, backend, http):
    b = await backend(protocols=("v2.chat",))
    gw = await gateway(proxy_config(b.url))
    async with http.ws_connect(gw.url + "/ws", protocols=("v1.chat", "v2.chat")) as ws:
        assert ws.protocol == "v2.chat"
    assert b.requests[0]["Sec-WebSocket-Protocol"] == "v1.chat, v2.chat"


async def test_permessage_deflate_negotiated_end_to_end(gateway, backend, http):
    b = await backend(compress=True)
    gw = await gateway(proxy_config(b.url))
    async with http.ws_connect(gw.url + "/ws", compress=15) as ws:
        assert ws.compress  # negotiated
        text = "compressible " * 5000
        await ws.send_str(text)
        msg = await ws.receive()
        assert msg.data == text
    assert b.received[0][1] == text


async def test_permessage_deflate_cleanly_declined(gateway, backend, http):
    b = await backend(compress=False)
    gw = await gateway(proxy_config(b.url))
    async with http.ws_connect(gw.url + "/ws", compress=15) as ws:
        assert not ws.compress
        await ws.send_str("plain")
        assert (await ws.receive()).data == "plain"


async def test_invalid_utf8_closes_client_1007_and_backend_sees_clean_close(gateway, backend):
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    c = await RawClient.connect(gw.url + "/ws")
    c.send_frame(frames.OP_TEXT, b"ok")
    assert (await c.recv_frame())[2] == b"ok"
    c.send_frame(frames.OP_TEXT, b"\xff\xfe bad")
    code, _ = await c.recv_close()
    assert code == 1007
    assert await c.eof()
    await until(lambda: asyncio.sleep(0, b.closes), what="the backend's close")
    assert b.closes == [1001]          # a close frame, not a dropped socket (1006)
    assert b.received == [(WSMsgType.TEXT, "ok")]


async def test_invalid_utf8_split_across_fragments_is_caught(gateway, backend):
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    c = await RawClient.connect(gw.url + "/ws")
    c.send_frame(frames.OP_TEXT, b"ab\xe2\x82", fin=False)  # a valid prefix of a 3-byte sequence
    c.send_frame(frames.OP_CONT, b"\x28", fin=True)           # ...that never completes
    code, _ = await c.recv_close()
    assert code == 1007
    c.close()


async def test_headers_to_backend_and_forged_gateway_headers_dropped(gateway, backend, http):
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    async with http.ws_connect(gw.url + "/ws/room?x=1", headers={
            "Origin": "https://app.example.com", "Cookie": "a=1", "Gateway-Claim-Sub": "admin",
            "Gateway-Connection-Id": "forged", "X-Custom": "kept"}) as ws:
        await ws.send_str("hi")
        await ws.receive()
    h = b.requests[0]
    assert h["Gateway-Connection-Id"] != "forged" and len(h.getall("Gateway-Connection-Id")) == 1
    assert h["Gateway-Session-Id"] and h["Gateway-Session-Id"] != h["Gateway-Connection-Id"]
    assert h["Gateway-Route"] == "r"
    assert h["Gateway-Client-IP"] == "127.0.0.1"
    assert h["X-Forwarded-For"] == "127.0.0.1"
    assert h["X-Forwarded-Proto"] == "http"
    assert h["Origin"] == "https://app.example.com"
    assert h["Cookie"] == "a=1"
    assert h["X-Custom"] == "kept"
    assert "Gateway-Claim-Sub" not in h


async def test_forward_path_appends_remainder_and_query(gateway, backend, http):
    b = await backend()
    gw = await gateway(proxy_config(b.url, route={"forward_path": True}))
    async with http.ws_connect(gw.url + "/ws/room/7?x=1"):
        pass
    assert b.paths == ["/ws/room/7?x=1"]


async def test_endpoint_path_used_as_written_without_forward_path(gateway, backend, http):
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    async with http.ws_connect(gw.url + "/ws/elsewhere?x=1"):
        pass
    assert b.paths == ["/ws"]


async def test_backend_crash_closes_client_1011(gateway, backend, http):
    async def crash(ws, request):
        await ws.receive()
        request.transport.abort()

    b = await backend(handler=crash)
    gw = await gateway(proxy_config(b.url))
    async with http.ws_connect(gw.url + "/ws") as ws:
        await ws.send_str("boom")
        msg = await ws.receive()
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1011)


async def test_client_vanishing_closes_backend_with_1001(gateway, backend):
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    c = await RawClient.connect(gw.url + "/ws")
    c.send_frame(frames.OP_TEXT, b"x")
    await c.recv_frame()
    c.writer.transport.abort()
    await until(lambda: asyncio.sleep(0, b.closes), what="the backend's close")
    assert b.closes == [1001]


async def test_no_route_is_404_before_upgrade(gateway, backend, http):
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await http.ws_connect(gw.url + "/nowhere")
    assert exc.value.status == 404
    assert b.requests == []


async def test_backend_http_refusal_status_passes_through(gateway, backend, http):
    b = await backend(status=403)
    gw = await gateway(proxy_config(b.url))
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await http.ws_connect(gw.url + "/ws")
    assert exc.value.status == 403


async def test_gateway_pings_the_upstream_and_a_silent_upstream_fails_1011(gateway, backend, http):
    pings = []

    async def counting(ws, request):
        # autoping off: the handler sees the gateway's keepalive pings, answers the first few, then goes silent.
        async for msg in ws:
            if msg.type == WSMsgType.PING:
                pings.append(msg.data)
                if len(pings) <= 2:
                    await ws.pong(msg.data)
                else:
                    request.transport.pause_reading()
                    await asyncio.sleep(5)

    async def handler(ws, request):
        ws._autoping = False
        await counting(ws, request)

    b = await backend(handler=handler)
    gw = await gateway(proxy_config(b.url, limits={"ping_interval_s": 0.2}))
    async with http.ws_connect(gw.url + "/ws", autoping=True) as ws:
        msg = await ws.receive(timeout=10)   # client pings are answered by aiohttp while we wait
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1011)
    assert len(pings) >= 3


async def test_gateway_pings_the_client_and_drops_a_dead_one(gateway, backend):
    b = await backend()
    gw = await gateway(proxy_config(b.url, limits={"ping_interval_s": 0.2}))
    c = await RawClient.connect(gw.url + "/ws")
    op, _, _ = await c.recv_frame()
    assert op == frames.OP_PING                 # the gateway's keepalive
    # ...and a client that never answers anything is cut, the backend told 1001.
    assert await c.eof(timeout=5)
    await until(lambda: asyncio.sleep(0, b.closes), what="the backend's close")
    assert b.closes == [1001]
