"""The chat demo's page (examples/chat) in headless Chromium, its TCP connection cut
without a close, in reliable mode.

The page is the demo's, served by the demo's backend (its page, the project's JS client
from clients/js/src, /config.json and the demo /token), opened with `?reliable=require`.
It connects through a TCP proxy started here to a gateway route with `reliable:`. That
route's backend is a WebSocket backend that speaks the page's messages (join, say, chat
lines back), not the demo's HTTP backend: a route with `reliable:` needs websocket
backends (docs/reliable.md). The page says "c1", "c2", ... (each comes back as a chat
line) while the backend's bot says "s1", "s2", ... in the room. Then the proxy resets both
of its sockets of the page's connection (SO_LINGER 0: an RST, no FIN, no close frame), as
a network that drops does; Chromium sees 1006, the client resumes with its hello's token
and `last=`, and at the end every stream is checked where it arrived: in the page (its own
lines back and the bot's) and at the backend (what the page said), none lost, none twice,
in order. Twice over, so the token the first resume's hello gave is the one the second
resume takes. Screenshots are saved in the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import collections
import json
import socket
import struct
import time

import pytest
import yaml
from aiohttp import WSMsgType, web

from tests.helpers import serve, until
from tests.integration.numbered import contiguous

from .chat_fixtures import DEMO, demo_backend

SECRET = "chat-cut-browser-test-secret-0123456789abcdef"
BOUND_S = 20.0      # only trips on a hang: nothing here is timed
INTERVAL_MS = 20    # the page says a line this often; the bot says one as often

class CutProxy:
    """A TCP proxy on 127.0.0.1 in front of one port. `cut()` resets every connection
    through it, both sockets (SO_LINGER 0 then close: an RST, no FIN), and forgets them;
    it keeps listening, so the next connection goes through as the first did."""

    def __init__(self, target_port: int):
        self.target_port = target_port
        self.pairs: set[tuple[asyncio.StreamWriter, asyncio.StreamWriter]] = set()
        self.connections = 0
        self.cuts = 0
        self.server: asyncio.AbstractServer | None = None
        self.port = 0

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        self.cut()
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    def cut(self) -> None:
        self.cuts += 1
        for pair in list(self.pairs):
            self.pairs.discard(pair)
            for w in pair:
                sock = w.get_extra_info("socket")
                if sock is not None:
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                w.transport.abort()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        except OSError:
            writer.transport.abort()
            return
        pair = (writer, up_writer)
        self.pairs.add(pair)
        self.connections += 1
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))
        self.pairs.discard(pair)


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except (ConnectionError, asyncio.IncompleteReadError):
        pass
    finally:
        writer.close()




class WsChat:
    """The chat's messages on a WebSocket backend, per Gateway-Session-Id (a resumed
    session's new upstream connection carries on): `join` answers `joined`, `say` comes
    back as a chat line, and once a session has joined a room a bot says "s1", "s2", ...
    in it. What each session said is kept in order of arrival (`said`)."""

    def __init__(self, interval_s: float):
        self.interval_s = interval_s
        self.said: dict[str, list[str]] = collections.defaultdict(list)
        self.bot: dict[str, int] = collections.defaultdict(int)
        self.rooms: dict[str, set[str]] = collections.defaultdict(set)
        self.handshakes: list = []
        self.runner = None
        self.port = 0

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/ws", self._ws)
        self.runner, self.port = await serve(app)

    async def stop(self) -> None:
        await self.runner.cleanup()

    @staticmethod
    def line(room: str, ident: str, sender: str, text: str) -> str:
        return json.dumps({"type": "message", "room": room, "id": ident, "from": sender, "text": text,
                           "ts": time.time()})

    async def _ws(self, request: web.Request) -> web.WebSocketResponse:
        sid = request.headers["Gateway-Session-Id"]
        user = request.headers["Gateway-Claim-sub"]
        self.handshakes.append(request.headers.copy())
        ws = web.WebSocketResponse(compress=False)
        await ws.prepare(request)

        async def bot():
            while not ws.closed:
                for room in sorted(self.rooms[sid]):
                    n = self.bot[sid] + 1
                    try:
                        await ws.send_str(self.line(room, f"bot-{n}", "bot", f"s{n}"))
                    except (ConnectionError, RuntimeError):
                        return
                    if ws.closed:
                        return
                    self.bot[sid] = n
                await asyncio.sleep(self.interval_s)

        task = asyncio.ensure_future(bot())
        try:
            async for msg in ws:
                if msg.type != WSMsgType.TEXT:
                    continue
                m = json.loads(msg.data)
                if m.get("type") == "join":
                    self.rooms[sid].add(m["room"])
                    await ws.send_str(json.dumps({"type": "joined", "room": m["room"], "members": [user]}))
                elif m.get("type") == "say":
                    self.said[sid].append(m["text"])
                    await ws.send_str(self.line(m["room"], f"{sid}-{len(self.said[sid])}", user, m["text"]))
        finally:
            task.cancel()
        return ws


@pytest.fixture
async def demo(monkeypatch, gateway):
    """The WebSocket chat backend, a gateway route with reliable: on it, the proxy in
    front of the gateway, and the demo's backend serving the page (pointed at the proxy)."""
    monkeypatch.setenv("CHAT_JWT_SECRET", SECRET)   # the demo's /token signs with it, the gateway checks it
    chat = WsChat(INTERVAL_MS / 1000)
    await chat.start()
    demo_cfg = yaml.safe_load((DEMO / "routes.yaml").read_text())
    gw = await gateway({
        "auth": demo_cfg["auth"],
        "backends": {"chat": {"type": "websocket", "endpoints": [f"ws://127.0.0.1:{chat.port}/ws"]}},
        "routes": [{"name": "chat", "match": {"path": "/chat"}, "auth": "required", "backend": "chat",
                    "reliable": {"ack_every": 16, "ack_ms": 50}}],
    })
    proxy = CutProxy(gw.ports[0])
    await proxy.start()
    site = demo_backend().ChatBackend([], None, [f"ws://127.0.0.1:{proxy.port}/chat"])
    await site.start()
    try:
        yield chat, proxy, f"http://127.0.0.1:{site.port}"
    finally:
        await site.stop()
        await proxy.stop()
        await chat.stop()


def series(texts: list[str], prefix: str) -> list[str]:
    return [t for t in texts if t.startswith(prefix) and t[len(prefix):].isdigit()]


async def test_the_chat_page_resumes_through_cut_connections_in_reliable_mode_losing_nothing(demo, page, tmp_path):
    chat, proxy, base = demo
    await page.goto(f"{base}/?user=alice&room=lobby&reliable=require")
    await until(lambda: page.evaluate("chat.state === 'open' && chat.rooms.get('lobby').joined"), BOUND_S,
                "alice is connected and in the lobby")
    await page.evaluate(f"() => {{ let n = 0; window.counting = setInterval(() => chat.say('c' + (++n)), "
                        f"{INTERVAL_MS}); }}")

    async def counts() -> tuple[int, int]:
        got = await page.evaluate("chat.received.map((m) => m.text)")
        return len(series(got, "c")), len(series(got, "s"))

    async def flowing(c: int, s: int) -> bool:
        got_c, got_s = await counts()
        return got_c >= c and got_s >= s

    try:
        for cut in (1, 2):
            c, s = await counts()
            await until(lambda c=c, s=s: flowing(c + 30, s + 30), BOUND_S, f"lines both ways before cut {cut}")
            await page.screenshot(path=tmp_path / f"{cut}-before-cut-{cut}.png")
            proxy.cut()
            await until(lambda cut=cut: page.evaluate(f"chat.opens.length === {cut + 1} && chat.state === 'open'"),
                        BOUND_S, f"the page resumed after cut {cut}")
        c, s = await counts()
        await until(lambda: flowing(c + 30, s + 30), BOUND_S, "lines both ways after the last cut")
    finally:
        await page.evaluate("clearInterval(window.counting)")
    sent = await page.evaluate("chat.sent")

    async def settled() -> bool:
        return await page.evaluate("chat.client.unacked") == 0 and (await counts())[0] >= sent

    await until(settled, BOUND_S, f"all {sent} lines acked and back in the page")
    await page.screenshot(path=tmp_path / "3-after-two-cuts.png")
    state = await page.evaluate("({received: chat.received.map((m) => m.text), opens: chat.opens,"
                                " closes: chat.closes.map((e) => [e.code, e.willRetry]),"
                                " failed: chat.resumeFailures, status: document.getElementById('status-line').textContent})")
    await page.evaluate("chat.client.close()")

    # In the page: one session, resumed twice after 1006s; its own lines and the bot's, each once, in order.
    assert state["opens"] == [{"resumed": False}, {"resumed": True}, {"resumed": True}]
    assert state["closes"][:2] == [[1006, True], [1006, True]], state["closes"]
    assert state["failed"] == []
    assert state["status"].startswith("resumed")
    assert contiguous("c", series(state["received"], "c")) == sent
    bot = contiguous("s", series(state["received"], "s"))
    assert bot >= 90
    assert proxy.cuts == 2 and proxy.connections >= 3   # more: a resume answered 503 while the old one was parked

    # At the backend: one session, its upstream opened again on each resume; c1..cN once each, in order.
    (sid,) = chat.said
    assert [h.get("Gateway-Resumed") for h in chat.handshakes] == [None, "1", "1"]
    assert {h["Gateway-Session-Id"] for h in chat.handshakes} == {sid}
    assert contiguous("c", chat.said[sid]) == sent
    assert chat.bot[sid] >= bot
    assert page.errors == []
