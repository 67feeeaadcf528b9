"""The chat demo (examples/chat) in headless Chromium, through a drain of its gateway node.

The demo's backend runs in the test's process, two `gateway run` nodes on the demo's
routes.yaml share one real redis-server, and the page (served by the backend, with the
project's JS client from clients/js/src) connects through a TCP balancer that sends new
connections to a ready node (chat_fixtures.Balancer), with a JWT from the backend's
demo /token endpoint. The page says "c1", "c2", ... and the backend publishes "s1",
"s2", ... to the room through the management API; node 1 is drained with
POST /v1/drain, the page resumes on node 2 with its token, and at the end every stream
is checked where it arrived: at the backend (what the page said) and in the page (its
own lines back from the room, and the backend's), none lost, none twice, in order.

Two things are told apart. The balancer reads what the browser put on the wire, so the
gateway is held to exactly that; a line the page handed its WebSocket in the instant
between the 1012 reaching Chromium and the page being told is dropped by the browser
(it has answered the close; the WebSocket API says nothing) and never reaches any
gateway: such lines may only lie between the last line on node 1 and the first on
node 2. Every line published to the room, the ones published while the session was
drained or resuming too, must reach the page exactly once and in order, and each publish
must say it was delivered once.
Screenshots are saved in the test's tmp_path.
"""

from __future__ import annotations

import asyncio
import json

import pytest

from tests.helpers import until
from tests.integration.test_lifecycle import Proc

from .chat_fixtures import Balancer, demo_backend, node_config

SECRET = "chat-browser-test-secret-0123456789abcdef"
ADMIN_TOKEN = "chat-browser-admin-token"
BOUND_S = 20.0        # generous bounds: they only trip on a hang, nothing here is timed
INTERVAL_MS = 50      # the page says a line this often; the backend publishes one as often


@pytest.fixture
async def demo(tmp_path, redis_server, http, monkeypatch):
    """The backend, two gateway nodes and the balancer, started in that order."""
    monkeypatch.setenv("CHAT_JWT_SECRET", SECRET)        # the gateways inherit both
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    chat = demo_backend().ChatBackend([], ADMIN_TOKEN, [])
    chat.arrivals = []     # (Gateway-Connection-Id, text) of every line said, as it reached the backend
    handle = chat.event

    async def recorded(request):
        if request.headers.get("Gateway-Event") == "message":
            m = json.loads(await request.text())
            if m.get("type") == "say":
                chat.arrivals.append((request.headers["Gateway-Connection-Id"], m.get("text")))
        return await handle(request)

    chat.event = recorded   # before start(): the app routes to it
    await chat.start()
    nodes = [Proc(tmp_path, node_config(f"node-{i}", redis_server.url, chat.port), name=f"node-{i}")
             for i in (1, 2)]
    lb = Balancer([(n.port, n.admin_url) for n in nodes])
    try:
        for n in nodes:
            await n.ready(http)
        await lb.start()
        chat.admin.urls = [n.admin_url for n in nodes]
        chat.gateways = [f"ws://127.0.0.1:{lb.port}/chat"]
        yield chat, nodes, lb
    finally:
        await lb.stop()
        for n in nodes:
            n.stop()
        await chat.stop()


def series(texts: list[str], prefix: str) -> list[str]:
    return [t for t in texts if t.startswith(prefix) and t[len(prefix):].isdigit()]


async def enter(page, base: str, user: str, room: str = "lobby") -> None:
    await page.goto(f"{base}/?user={user}&room={room}")
    await until(lambda: page.evaluate(f"chat.state === 'open' && chat.rooms.get('{room}').joined"), BOUND_S,
                f"{user} is connected and in {room}")


async def members(page) -> list[str]:
    return await page.locator("#members li").all_inner_texts()


async def test_chat_rooms_presence_and_history_in_the_page(demo, browser, tmp_path):
    chat, _nodes, _lb = demo
    base = f"http://127.0.0.1:{chat.port}"
    context = await browser.new_context(viewport={"width": 1100, "height": 700})
    try:
        alice, bob = await context.new_page(), await context.new_page()
        errors = []
        for p in (alice, bob):
            p.on("pageerror", lambda e: errors.append(str(e)))
            p.on("console", lambda m: m.type == "error" and errors.append(m.text))
        # Alice enters through the form, Bob through a link.
        await alice.goto(base + "/")
        await alice.fill("#login-user", "alice")
        await alice.click("#login button[type=submit]")
        await until(lambda: alice.evaluate("chat.state === 'open' && chat.rooms.get('lobby').joined"), BOUND_S,
                    "alice is in the lobby")
        await enter(bob, base, "bob")
        await until(lambda: _equal(members(alice), ["alice", "bob"]), BOUND_S, "alice sees bob arrive")
        assert await members(bob) == ["alice", "bob"]
        await alice.fill("#text", "hello <b>bob</b>")
        await alice.press("#text", "Enter")
        await bob.fill("#text", "hi alice")
        await bob.click("#composer button")
        line = bob.locator("#messages li.line", has_text="hi alice")
        await line.wait_for(timeout=BOUND_S * 1000)
        texts = ["hello <b>bob</b>", "hi alice"]
        for p in (alice, bob):
            await until(lambda p=p: _equal(p.locator("#messages li .text").all_inner_texts(), texts), BOUND_S,
                        "both lines on both pages, as text")
        assert await alice.locator("#messages li.mine .text").all_inner_texts() == ["hello <b>bob</b>"]
        # A newcomer gets the room's history, then what is new.
        carol = await context.new_page()
        await enter(carol, base, "carol")
        await until(lambda: _equal(carol.locator("#messages li .text").all_inner_texts(), texts), BOUND_S,
                    "carol gets the history")
        await until(lambda: _equal(members(alice), ["alice", "bob", "carol"]), BOUND_S, "alice sees carol")
        await carol.screenshot(path=tmp_path / "carol.png")
        # Bob leaves: the others see him go; his page drops the room.
        await bob.click("#leave")
        await until(lambda: _equal(members(alice), ["alice", "carol"]), BOUND_S, "bob has left")
        assert await bob.evaluate("chat.rooms.size") == 0
        await alice.screenshot(path=tmp_path / "alice.png")
        # A bad message is answered by the backend, not dropped.
        await alice.evaluate("chat.client.send(JSON.stringify({type: 'say', room: 'nowhere', text: 'x'}))")
        await until(lambda: alice.evaluate("chat.errors.length === 1"), BOUND_S, "the backend's error")
        assert await alice.evaluate("chat.errors") == ["join the room first"]
        assert errors == []
    finally:
        await context.close()


async def _equal(got, want) -> bool:
    return await got == want


async def test_the_chat_page_resumes_on_another_node_through_a_drain_losing_nothing(demo, page, http, tmp_path):
    chat, (node1, node2), lb = demo
    answers: dict[str, tuple[str, str, dict]] = {}     # message id -> (from, text, the publish's answer)
    publish = chat.admin.publish
    AdminError = demo_backend().AdminError

    async def recorded(channel: str, message: dict) -> dict:
        try:
            answer = await publish(channel, message)
        except AdminError as exc:
            if exc.status != 503 or channel != "room:lobby":
                raise
            # A node stopping answers 503 once its store is closed; whether the line went
            # out before that, the answer does not say.
            answers[message["id"]] = (message["from"], message["text"], {"status": 503, **exc.body})
            raise
        if channel == "room:lobby":
            answers[message["id"]] = (message["from"], message["text"], answer)
        return answer

    chat.admin.publish = recorded
    await enter(page, f"http://127.0.0.1:{chat.port}", "alice")
    assert lb.picks == [0], "the page's first connection goes to node 1"
    assert await members(page) == ["alice"]

    # Both ways at once: the page says c1, c2, ... (each goes to the backend as an HTTP
    # request and comes back from the room's channel); the backend publishes s1, s2, ...
    pushed = 0
    stop = asyncio.Event()

    async def push():
        nonlocal pushed
        while not stop.is_set():
            try:
                await chat.say("lobby", "bot", f"s{pushed + 1}")
            except AdminError as exc:
                if exc.status != 503:
                    raise
            pushed += 1
            await asyncio.sleep(INTERVAL_MS / 1000)

    await page.evaluate(f"() => {{ let n = 0; window.counting = setInterval(() => chat.say('c' + (++n)), "
                        f"{INTERVAL_MS}); }}")
    pusher = asyncio.ensure_future(push())

    async def counts() -> tuple[int, int]:
        got = await page.evaluate("chat.received.map((m) => m.text)")
        return len(series(got, "c")), len(series(got, "s"))

    async def flowing(c: int, s: int) -> bool:
        got_c, got_s = await counts()
        return got_c >= c and got_s >= s

    try:
        await until(lambda: flowing(20, 20), BOUND_S, "lines both ways through node 1")
        await page.screenshot(path=tmp_path / "1-through-node-1.png")
        async with http.post(node1.admin_url + "/v1/drain", headers={"Authorization": f"Bearer {ADMIN_TOKEN}"}) as r:
            assert r.status == 202, await r.text()
        await until(lambda: page.evaluate("chat.opens.length === 2 && chat.state === 'open'"), BOUND_S,
                    "the page reconnected")
        assert await node1.wait(BOUND_S) == 0, "node 1 drained and exited"
        c, s = await counts()
        await until(lambda: flowing(c + 20, s + 20), BOUND_S, "lines both ways through node 2")
        await page.screenshot(path=tmp_path / "2-resumed-on-node-2.png")
    finally:
        await page.evaluate("clearInterval(window.counting)")
        stop.set()
        await asyncio.wait_for(pusher, BOUND_S)    # its last publish answered (or what made it fail raised)

    # It was a resume on node 2, not a new session: one connect event at the backend,
    # the backend's later requests marked resumed, nothing joined again.
    state = await page.evaluate("({closes: chat.closes, opens: chat.opens, failed: chat.resumeFailures, "
                                "errors: chat.errors, sent: chat.sent})")
    assert state["closes"] == [{"code": 1012, "reason": "resume=...", "willRetry": True}]
    assert state["opens"] == [{"resumed": False}, {"resumed": True}]
    assert state["failed"] == []
    refused = [i for i, (_f, _t, a) in answers.items() if a.get("status") == 503]
    assert len(state["errors"]) == len([i for i in refused if answers[i][0] == "alice"]), state["errors"]
    assert chat.connects == 1 and chat.resumed_requests > 0
    assert lb.picks == [0, 1], "one connection to node 1, then the resume to node 2"

    # Page -> backend. What the browser put on the wire reached the backend, each line
    # once, in order; what the page said and the browser did not send is only at the 1012.
    sent = state["sent"]
    on_wire = [[m["text"] for m in map(json.loads, conn.texts) if m["type"] == "say"] for conn in lb.wire]
    wire = [t for conn in on_wire for t in conn]
    (sid,) = chat.said
    await until(lambda: asyncio.sleep(0, len(chat.said[sid]) >= len(wire)), BOUND_S,
                f"the backend got the {len(wire)} lines on the wire")
    assert not refused, f"a stopping node answered 503 to {', '.join(answers[i][1] for i in refused)}"
    assert list(chat.said[sid]) == wire, "the backend got the wire's lines once each, in order"
    dropped = sorted(set(range(1, sent + 1)) - {int(t[1:]) for t in wire})
    assert wire == [f"c{i}" for i in range(1, sent + 1) if i not in dropped], "the wire is in order"
    last_on_1, first_on_2 = int(on_wire[0][-1][1:]), int(on_wire[1][0][1:])
    assert all(last_on_1 < i < first_on_2 for i in dropped), (dropped, last_on_1, first_on_2)

    # Backend -> page. Every line published to the room arrives once, in order per sender.
    await until(lambda: asyncio.sleep(0, len(answers) >= len(wire) + pushed), BOUND_S, "every line published")

    async def arrived() -> list[str]:
        return await page.evaluate("chat.received.map((m) => m.id)")

    await until(lambda: _contains(arrived(), list(answers)), BOUND_S, "every published line in the page")
    await page.screenshot(path=tmp_path / "3-all-counted.png")
    got = await page.evaluate("chat.received")
    for sender in ("alice", "bot"):
        want = [i for i in answers if answers[i][0] == sender]
        seen = [m["id"] for m in got if m["from"] == sender]
        assert seen == want, (sender, _difference(seen, want, answers))
    miscounted = {i: a for i, (_f, _t, a) in answers.items() if a.get("delivered") != 1}
    assert not miscounted, f"each publish reached the one member once: {miscounted}"
    assert page.errors == [], page.errors


def _difference(seen: list[str], want: list[str], answers: dict) -> dict:
    """What differs between two id lists, with the publish answers, for a failure's message."""
    twice = sorted({i for i in seen if seen.count(i) > 1})
    missing = [i for i in want if i not in seen]
    out_of_order = [a for a, b in zip(seen, seen[1:]) if want.index(b) < want.index(a)] if not missing else []
    return {"twice": [(i, answers[i][1:]) for i in twice], "missing": [(i, answers[i][1:]) for i in missing],
            "out of order after": out_of_order[:5]}


async def _contains(got, want: list[str]) -> bool:
    return set(want) <= set(await got)
