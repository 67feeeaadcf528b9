"""The chat demo (examples/chat) in headless Chromium, its TCP connection cut without
a close, in reliable mode.

The page, the demo backend (an HTTP backend: rooms, presence and history through the
gateway's channels) and the demo's routes.yaml, whose route has `reliable:`; the page is
opened with `?reliable=require` and connects through a TCP proxy started here. The page
says "c1", "c2", ... (each goes to the backend as a POST and comes back from the room's
channel) while a bot publishes "s1", "s2", ... to the room through the management API.
Then the proxy resets both of its sockets of the page's connection (SO_LINGER 0: an RST,
no FIN, no close frame), as a network that drops does; Chromium sees 1006, the client
resumes with its hello's token and `last=`, and at the end every stream is checked where
it arrived: in the page (its own lines back and the bot's) and at the backend (what the
page said), none lost, none twice, in order. Twice over, so the token the first resume's
hello gave is the one the second resume takes. Screenshots are saved in the test's
tmp_path.
"""

from __future__ import annotations

import asyncio
import socket
import struct

import pytest
import yaml

from tests.helpers import until
from tests.integration.numbered import contiguous

from .chat_fixtures import DEMO, demo_backend

SECRET = "chat-cut-browser-test-secret-0123456789abcdef"
ADMIN_TOKEN = "chat-cut-admin-token"
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




@pytest.fixture
async def demo(monkeypatch, gateway):
    """The demo backend, a gateway on the demo's routes.yaml (its route has reliable:),
    and the proxy in front of the gateway, the page pointed at the proxy."""
    monkeypatch.setenv("CHAT_JWT_SECRET", SECRET)   # the demo's /token signs with it, the gateway checks it
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    site = demo_backend().ChatBackend([], ADMIN_TOKEN, [])
    await site.start()
    cfg = yaml.safe_load((DEMO / "routes.yaml").read_text())
    assert cfg["routes"][0].get("reliable") is not None, "the demo's route is reliable"
    cfg["backends"]["chat"]["endpoints"] = [f"http://127.0.0.1:{site.port}/events"]
    assert cfg["backends"]["chat"]["max_queue"] >= 1000, "room for what a resumed page sends at once"
    cfg["listen"]["port"] = cfg["admin"]["port"] = 0   # free ports
    gw = await gateway(cfg)
    proxy = CutProxy(gw.ports[0])
    await proxy.start()
    site.admin.urls = [gw.admin_url]
    site.gateways = [f"ws://127.0.0.1:{proxy.port}/chat"]
    try:
        yield site, proxy, f"http://127.0.0.1:{site.port}"
    finally:
        await proxy.stop()
        await site.stop()


def series(texts: list[str], prefix: str) -> list[str]:
    return [t for t in texts if t.startswith(prefix) and t[len(prefix):].isdigit()]


async def test_the_chat_page_resumes_through_cut_connections_in_reliable_mode_losing_nothing(demo, page, tmp_path):
    chat, proxy, base = demo
    await page.goto(f"{base}/?user=alice&room=lobby&reliable=require")
    await until(lambda: page.evaluate("chat.state === 'open' && chat.rooms.get('lobby').joined"), BOUND_S,
                "alice is connected and in the lobby")
    await page.evaluate(f"() => {{ let n = 0; window.counting = setInterval(() => chat.say('c' + (++n)), "
                        f"{INTERVAL_MS}); }}")
    published: list[dict] = []       # the management API's answer to each of the bot's lines
    stop = asyncio.Event()

    async def bot():
        while not stop.is_set():
            published.append(await chat.say("lobby", "bot", f"s{len(published) + 1}"))
            await asyncio.sleep(INTERVAL_MS / 1000)

    pusher = asyncio.ensure_future(bot())

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
        stop.set()
        await asyncio.wait_for(pusher, BOUND_S)   # its last publish answered
    sent = await page.evaluate("chat.sent")
    pushed = len(published)

    async def settled() -> bool:
        c, s = await counts()
        return await page.evaluate("chat.client.unacked") == 0 and c >= sent and s >= pushed

    await until(settled, BOUND_S, f"all {sent} lines acked and back in the page, and the bot's {pushed}")
    await page.screenshot(path=tmp_path / "3-after-two-cuts.png")
    state = await page.evaluate("({received: chat.received.map((m) => m.text), opens: chat.opens,"
                                " closes: chat.closes.map((e) => [e.code, e.willRetry]),"
                                " failed: chat.resumeFailures, status: document.getElementById('status-line').textContent})")
    said = {sid: list(lines) for sid, lines in chat.said.items()}   # the session's end clears it
    await page.evaluate("chat.client.close()")

    # In the page: one session, resumed twice after 1006s; its own lines and the bot's, each once, in order.
    assert state["opens"] == [{"resumed": False}, {"resumed": True}, {"resumed": True}]
    assert state["closes"][:2] == [[1006, True], [1006, True]], state["closes"]
    assert state["failed"] == []
    assert state["status"].startswith("resumed")
    assert contiguous("c", series(state["received"], "c")) == sent
    assert contiguous("s", series(state["received"], "s")) == pushed
    assert all(a["delivered"] == 1 for a in published), [a for a in published if a["delivered"] != 1]
    assert proxy.cuts == 2 and proxy.connections >= 3   # more: a resume answered 503 while the old one was parked

    # At the backend: one session (one connect event), its later requests marked resumed;
    # c1..cN once each, in order.
    (sid,) = said
    assert chat.connects == 1 and chat.resumed_requests > 0
    assert contiguous("c", said[sid]) == sent
    # The browser logs each refused handshake. A resume that came before the old session's
    # replay buffer was sealed (its queued POSTs answered) is told 503 with Retry-After and
    # retried (docs/reliable.md); nothing else may show up.
    others = [e for e in page.errors if "Unexpected response code: 503" not in e]
    assert others == [], page.errors
