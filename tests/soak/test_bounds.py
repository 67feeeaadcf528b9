"""Resource bounds (docs/resource-bounds.md): a real `gateway run` process under a flood
of slow readers, messages at and over max_message_bytes and handshake spam stays under
the process-memory formula computed from this test's config; drained sessions whose
backend pushes on fill their replay buffers, and Redis stays under its formula too.

What each term of the formula is, and which config key it comes from, is in the doc;
the constants here are the same ones.
"""

from __future__ import annotations

import asyncio
import os
import time

import pytest
from aiohttp import WSMsgType

from ..conftest import proxy_config
from ..helpers import RawClient, until
from ..integration.test_lifecycle import Proc, metric

MIB = 1 << 20
MAX_MESSAGE = 256 << 10            # limits.max_message_bytes
SEND_BUFFER = 512 << 10            # limits.send_buffer_bytes
REPLAY_BYTES = 512 << 10           # drain.replay_max_bytes
READ_CHUNK = 256 << 10             # asyncio's largest single socket read (selector transports)
SESSION_OVERHEAD = 64 << 10        # a session's objects, transports, timers, records (measured well under)
HANDSHAKE_OVERHEAD = 16 << 10      # a half-open socket's objects, besides its head buffer
MAX_HEAD = 16384                   # gateway/http1.py MAX_HEAD_BYTES
REDIS_DETACHED_OVERHEAD = 8 << 10  # a detached session's det:, index and stream bookkeeping
RSS_ALLOWANCE_MIB = 24.0           # allocator arenas and Python's free lists kept after a peak
REDIS_ALLOWANCE_MIB = 4.0

SLOW_READERS = 40
BIG_SENDERS = 10
HALF_OPEN = 100
DRAINED = 20
PUSH = 32 << 10                    # each pushed message


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise AssertionError("no VmRSS")


async def counts(http, node: Proc, redis_server) -> dict:
    """fds, asyncio tasks, sessions open and Redis keys, read from outside the process."""
    async with http.get(node.admin_url + "/metrics") as r:
        text = await r.text()
    with redis_server.client() as c:
        keys = c.dbsize()
    return {"fds": len(os.listdir(f"/proc/{node.p.pid}/fd")), "tasks": int(metric(text, "gateway_asyncio_tasks")),
            "open": sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                        if line.startswith("gateway_sessions_open{")), "keys": keys}


def per_session_bytes() -> int:
    """A live session's ceiling: each socket's write buffer up to send_buffer_bytes plus
    the read that crossed it, one partial frame head or control frame, and its objects."""
    return 2 * (SEND_BUFFER + READ_CHUNK) + MAX_MESSAGE + SESSION_OVERHEAD


def process_bound_mib(base_mib: float, sessions: int, handshakes: int) -> float:
    return base_mib + (sessions * per_session_bytes() + handshakes * (MAX_HEAD + HANDSHAKE_OVERHEAD)) / MIB \
        + RSS_ALLOWANCE_MIB


def redis_bound_bytes(base: int, detached: int) -> int:
    return base + detached * (REPLAY_BYTES + MAX_MESSAGE + REDIS_DETACHED_OVERHEAD) + int(REDIS_ALLOWANCE_MIB * MIB)


class Pusher:
    """The backend's handler: sends PUSH-byte binary messages until the socket closes;
    counts what each session got past the backend's own write buffer."""

    def __init__(self):
        self.sent: dict[int, int] = {}

    async def __call__(self, ws, request):
        me = id(ws)
        self.sent[me] = 0
        chunk = b"p" * PUSH
        try:
            while not ws.closed:
                await ws.send_bytes(chunk)
                self.sent[me] += PUSH
        except (ConnectionError, RuntimeError):
            pass
        finally:
            self.sent.pop(me, None)


def config(push_url: str, echo_url: str, redis_url: str) -> dict:
    cfg = proxy_config(echo_url, redis={"url": redis_url, "heartbeat_s": 0.5, "node_ttl_s": 2},
                       limits={"max_message_bytes": MAX_MESSAGE, "send_buffer_bytes": SEND_BUFFER,
                               "stall_timeout_s": 120, "handshake_timeout_s": 120, "ping_interval_s": 60,
                               "max_connections": 1000, "max_connections_per_ip": 1000},
                       drain={"timeout_s": 30, "replay_max_bytes": REPLAY_BYTES, "resume_window_s": 60})
    cfg["backends"]["push"] = {"type": "websocket", "endpoints": [push_url]}
    cfg["routes"].insert(0, {"name": "push", "match": {"path_prefix": "/push"}, "auth": "none", "backend": "push"})
    return cfg


async def half_open(port: int) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """A request head that never ends, just under the head limit (slowloris)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"GET /ws HTTP/1.1\r\nHost: x\r\nX-Pad: " + b"a" * (MAX_HEAD - 64))
    await writer.drain()
    return reader, writer


async def big_messages(http, url: str, rounds: int) -> tuple[int, int]:
    """At the limit: echoed whole. One byte over: closed 1009. Returns (lost, wrong closes)."""
    lost = wrong = 0
    for i in range(rounds):
        async with http.ws_connect(url + "/ws", max_msg_size=4 * MAX_MESSAGE) as ws:
            data = bytes([i % 256]) * MAX_MESSAGE
            await ws.send_bytes(data)
            msg = await asyncio.wait_for(ws.receive(), 20)
            lost += (msg.type, msg.data) != (WSMsgType.BINARY, data)
            await ws.send_bytes(b"x" * (MAX_MESSAGE + 1))
            msg = await asyncio.wait_for(ws.receive(), 20)
            wrong += not (msg.type == WSMsgType.CLOSE and msg.data == 1009)
    return lost, wrong


async def refusals(http, url: str, n: int) -> int:
    wrong = 0
    for i in range(n):
        async with http.get(url.replace("ws://", "http://") + f"/nowhere{i}",
                            headers={"Upgrade": "websocket", "Connection": "Upgrade",
                                     "Sec-WebSocket-Version": "13",
                                     "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}) as r:
            wrong += r.status != 404
    return wrong


@pytest.mark.timeout(300)
async def test_memory_stays_under_the_formula(backend, redis_server, http, tmp_path, record_property):
    pusher = Pusher()
    push_b = await backend(handler=pusher, compress=False)
    echo_b = await backend(compress=False)
    cfg = config(push_b.url, echo_b.url, redis_server.url)
    node = Proc(tmp_path, cfg, name="bounded")
    raws, opens, tasks = [], [], []
    peak = {"rss": 0.0, "redis": 0}
    try:
        await node.ready(http)
        lost, wrong = await big_messages(http, node.url, 3)          # warm the paths up
        await refusals(http, node.url, 20)
        base_rss = rss_mib(node.p.pid)
        with redis_server.client() as c:
            base_redis = c.info("memory")["used_memory"]
        start = await counts(http, node, redis_server)

        live = SLOW_READERS + BIG_SENDERS
        bound = process_bound_mib(base_rss, live, HALF_OPEN)

        def within() -> bool:
            """Sampled through the flood; past the bound the test stops at once."""
            peak["rss"] = max(peak["rss"], rss_mib(node.p.pid))
            assert peak["rss"] <= bound, f"RSS {peak['rss']:.1f} MiB past the bound {bound:.1f}"
            return True

        async def sample():
            while within():
                await asyncio.sleep(0.1)
        sampler = asyncio.create_task(sample())
        tasks.append(sampler)
        # The flood: slow readers that never read while the backend pushes, half-open heads.
        for _ in range(SLOW_READERS):
            raw = await RawClient.connect(node.url + "/push")
            assert within() and raw.status == 101
            raws.append(raw)
            raw.writer.transport.pause_reading()                        # never read: the kernel fills up
        for _ in range(HALF_OPEN):
            opens.append(await half_open(node.port))
        # Every pusher is held back by the gateway, not by a slow start: each has got past
        # the gateway's send buffer (what the gateway holds for that client is full).
        async def buffers_full():
            return within() and len(pusher.sent) == SLOW_READERS and min(pusher.sent.values()) >= SEND_BUFFER
        await until(buffers_full, 60, "each slow reader's buffer full")
        began = time.monotonic()
        try:
            # During the flood: huge messages at and over the limit, refused handshakes.
            results = await asyncio.gather(*(big_messages(http, node.url, 4) for _ in range(BIG_SENDERS)),
                                           refusals(http, node.url, 300))
            for got in results[:-1]:
                lost += got[0]
                wrong += got[1]
            wrong += results[-1]
            held = sum(pusher.sent.values())
        finally:
            sampler.cancel()
        within()
        flood_s = time.monotonic() - began
        for raw in raws:
            raw.close()
        for _, w in opens:
            w.close()
        end = {}

        async def flood_gone():
            end.update(await counts(http, node, redis_server))
            return end["open"] == 0 and end["fds"] <= start["fds"] + 3
        await until(flood_gone, 60, "the flood's sessions and sockets gone")

        # Detached sessions with full replay buffers: sessions on a second node whose
        # backend pushes on, that node drained; their buffers fill in Redis and overflow.
        drained = Proc(tmp_path, cfg, name="drained")
        try:
            await drained.ready(http)
            wss = [await http.ws_connect(drained.url + "/push", max_msg_size=0) for _ in range(DRAINED)]
            for ws in wss:
                assert (await asyncio.wait_for(ws.receive(), 10)).type == WSMsgType.BINARY
            async with http.post(drained.admin_url + "/v1/drain") as resp:
                assert resp.status in (200, 202), await resp.text()

            async def to_the_close(ws):
                # All at once: the 1012 waits behind what the backend pushed, and the drain
                # cuts what is still open after drain.timeout_s.
                while (msg := await asyncio.wait_for(ws.receive(), 30)).type == WSMsgType.BINARY:
                    pass
                return msg.data if msg.type == WSMsgType.CLOSE else ws.close_code
            codes = await asyncio.gather(*(to_the_close(ws) for ws in wss))
            assert codes == [1012] * DRAINED, codes

            def replay_state():
                with redis_server.client() as c:
                    peak["redis"] = max(peak["redis"], c.info("memory")["used_memory"])
                    recs = [c.hgetall(k) for k in c.scan_iter("gw:det:*")]
                return recs

            async def all_full():
                recs = replay_state()
                return len(recs) == DRAINED and all(r.get(b"over") == b"1" or r.get(b"sealed") == b"1"
                                                    for r in recs)
            await until(all_full, 60, "every drained session's replay buffer full or sealed")
            overflowed = sum(r.get(b"over") == b"1" for r in replay_state())
            assert await drained.wait(30) == 0
            replay_state()
        finally:
            drained.stop()
        redis_bound = redis_bound_bytes(base_redis, DRAINED)

        record_property("load", f"{SLOW_READERS} slow readers (backend pushing {PUSH >> 10} KiB messages), "
                                f"{BIG_SENDERS} x 4 messages at and over {MAX_MESSAGE >> 10} KiB, {HALF_OPEN} "
                                f"half-open heads, 320 refused handshakes, {DRAINED} drained sessions "
                                f"with full replay buffers")
        record_property("cycles", BIG_SENDERS * 4)
        record_property("rss_mib_start", round(base_rss, 1))
        record_property("rss_mib_end", round(peak["rss"], 1))
        record_property("rss_mib_bound", round(bound, 1))
        record_property("redis_mib_start", round(base_redis / MIB, 1))
        record_property("redis_mib_end", round(peak["redis"] / MIB, 1))
        record_property("redis_mib_bound", round(redis_bound / MIB, 1))
        record_property("replay_overflowed", overflowed)
        for key in ("fds", "tasks"):
            record_property(f"{key}_start", start[key])
            record_property(f"{key}_end", end[key])
        # Keys: before the drain, and with the 20 detached sessions still waiting for a resume.
        record_property("redis_keys_start", start["keys"])
        with redis_server.client() as c:
            record_property("redis_keys_end", c.dbsize())
        record_property("lost", lost)
        record_property("seconds", round(flood_s, 1))
        print(f"rss base {base_rss:.1f} peak {peak['rss']:.1f} bound {bound:.1f} MiB; held by pushers "
              f"{held / MIB:.1f} MiB; redis base {base_redis / MIB:.1f} peak {peak['redis'] / MIB:.1f} "
              f"bound {redis_bound / MIB:.1f} MiB; overflowed {overflowed}/{DRAINED}")
        assert (lost, wrong) == (0, 0), "at the limit echoed whole, over it 1009, refusals 404"
        assert peak["rss"] <= bound, (peak["rss"], bound)
        assert peak["redis"] <= redis_bound, (peak["redis"], redis_bound)
        assert overflowed == DRAINED, "the pushing backend filled every replay buffer"
    finally:
        for t in tasks:
            t.cancel()
        for raw in raws:
            raw.close()
        for _, w in opens:
            w.close()
        node.stop()
