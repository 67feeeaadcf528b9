"""The live admin page in real headless chromium, against real `gateway run`
processes and a real backend: the token form, the node, sessions and message
rates changing as real WebSocket clients connect and talk, endpoint health,
reload (good and broken file) and drain, each behind its confirmation dialog;
every node of a cluster; a token refused later; a session's trace."""

from __future__ import annotations

import asyncio
import pathlib
import subprocess
import sys

import pytest
import yaml

from ..conftest import proxy_config
from ..helpers import until
from ..integration.test_lifecycle import Proc

TOKEN = "browser-admin-token"
CLIENTS = 5
BOUND_S = 15.0   # every wait on the page is bounded by this


def gateway_config(backend_url: str, ping_interval_s: float = 1) -> dict:
    # ping_interval_s 1: sessions tick (and flush their message counts) every second;
    # announce_s: the drained node stays up, draining, for the rest of the test.
    return proxy_config(backend_url, limits={"ping_interval_s": ping_interval_s},
                        drain={"announce_s": 60, "timeout_s": 120})


@pytest.fixture
async def node(tmp_path, backend, monkeypatch, http, request):
    """A `gateway run` process; a test's indirect parameter sets its ping_interval_s."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    b = await backend()
    p = Proc(tmp_path, gateway_config(b.url, getattr(request, "param", 1)))
    try:
        await p.ready(http)
        async with http.get(p.admin_url + "/healthz") as r:
            p.node_id = (await r.json())["node"]
        p.backend_url = b.url
        yield p
    finally:
        p.stop()


async def text(page, selector: str) -> str:
    return (await page.locator(selector).first.text_content()) or ""


async def shows(page, selector: str, predicate, what: str) -> str:
    """Poll the DOM (bounded) until the text at `selector` satisfies `predicate`."""
    async def check():
        loc = page.locator(selector)
        if await loc.count() == 0:
            return None
        t = await loc.first.text_content()
        return [t] if t is not None and predicate(t) else None

    return (await until(check, BOUND_S, what, interval_s=0.05))[0]


async def confirm(page, button: str, answer: str = "#confirm-ok") -> None:
    await page.click(button)
    dialog = page.locator("dialog#confirm")
    await dialog.wait_for(state="visible", timeout=BOUND_S * 1000)
    await page.click(answer)
    await dialog.wait_for(state="hidden", timeout=BOUND_S * 1000)


async def canvas_image(page, selector: str) -> str:
    return await page.eval_on_selector(selector, "c => c.toDataURL()")


async def sign_in(page, token: str) -> None:
    await page.fill("#token-input", token)
    await page.click("#login-button")


async def test_admin_page_live(node, page, http, tmp_path: pathlib.Path):
    origin = node.admin_url
    await page.goto(origin + "/")
    assert page.url == origin + "/ui/"

    # A wrong token: the form stays, with the gateway's 401 in its message.
    await sign_in(page, "not-the-token")
    await shows(page, "#login-error", lambda t: "401" in t, "the wrong token's message")
    assert await page.is_hidden("#dash")
    assert await page.input_value("#token-input") == ""

    await sign_in(page, TOKEN)
    await page.wait_for_selector("#dash", state="visible", timeout=BOUND_S * 1000)
    row = f'#nodes tr[data-node="{node.node_id}"]'
    await shows(page, row, lambda t: "ready" in t, "this node, ready")
    await shows(page, "#sessions-total", lambda t: t == "0", "no session open")
    await shows(page, f'#backends tr[data-endpoint="{node.backend_url}"]', lambda t: "healthy" in t,
                "the backend endpoint, healthy")
    await shows(page, "#sessions-chart[data-points]", lambda t: True, "the sessions chart drawn")
    assert await page.get_attribute("#sessions-chart", "data-max") == "0"
    sessions_before = await canvas_image(page, "#sessions-chart")
    rates_before = await canvas_image(page, "#rates-chart")
    await page.screenshot(path=str(tmp_path / "admin-signed-in.png"), full_page=True)

    # The token is in memory only: nothing stored, nothing in the URL.
    stored = await page.evaluate("[localStorage.length, sessionStorage.length, document.cookie, location.href]")
    assert stored == [0, 0, "", origin + "/ui/"]

    clients = [await http.ws_connect(node.url + "/ws") for _ in range(CLIENTS)]
    # Each client reads all along (aiohttp answers the gateway's pings while it reads),
    # so the sessions stay open through the drain's announce.
    received = [0] * CLIENTS
    readers = [asyncio.create_task(_read(ws, received, i)) for i, ws in enumerate(clients)]
    talking = True

    async def talk():
        # Traffic both ways (the backend echoes) while the page is watched; bounded.
        for i in range(int(BOUND_S / 0.02)):
            if not talking:
                return
            for ws in clients:
                await ws.send_str(f"m{i}")
            await asyncio.sleep(0.02)

    traffic = asyncio.create_task(talk())
    try:
        await shows(page, "#sessions-total", lambda t: t == str(CLIENTS), f"{CLIENTS} sessions open")
        await shows(page, '#sessions-legend li[data-key="r"] .value', lambda t: t == str(CLIENTS),
                    "the route's line at 5")
        await shows(page, f"{row} td:nth-child(3)", lambda t: t == str(CLIENTS), "the node's connections")
        await until(lambda: _rows(page, "#connections tbody tr[data-connection]", CLIENTS), BOUND_S,
                    "every session listed")
        for direction in ("in", "out"):
            await shows(page, f'#rates-legend li[data-key="r {direction}"] .value',
                        lambda t: float(t.removesuffix("/s")) > 0, f"a message rate {direction}")
        # The lines drawn reach the figures (the axis grows to hold them), and the pixels changed.
        assert (await page.get_attribute("#sessions-chart", "data-max"), await page.get_attribute(
            "#sessions-chart", "data-top")) == (str(CLIENTS), "8")
        assert float(await page.get_attribute("#rates-chart", "data-max")) > 0
        await until(lambda: _changed(page, "#sessions-chart", sessions_before), BOUND_S, "the sessions chart redrawn")
        await until(lambda: _changed(page, "#rates-chart", rates_before), BOUND_S, "the rates chart redrawn")
        await page.screenshot(path=str(tmp_path / "admin-traffic.png"), full_page=True)
    finally:
        talking = False
        await traffic
    assert min(received) > 0

    # Reload, cancelled (the button, then Escape): nothing is sent.
    await confirm(page, "#reload-button", "#confirm-cancel")
    await page.click("#reload-button")
    await page.locator("dialog#confirm").wait_for(state="visible", timeout=BOUND_S * 1000)
    await page.keyboard.press("Escape")
    await page.locator("dialog#confirm").wait_for(state="hidden", timeout=BOUND_S * 1000)
    assert await page.is_hidden("#action-result")
    assert not any(u.endswith("/v1/reload") for u in page.requested)
    # Reload with the good file, then with a broken one: its problems, each with file:line:col.
    await confirm(page, "#reload-button")
    await shows(page, "#action-summary", lambda t: t.startswith("Reloaded") and "1 routes" in t, "the reload's result")
    cfg = yaml.safe_load(node.path.read_text())
    cfg["routes"][0]["backend"] = "nope"
    node.path.write_text(yaml.safe_dump(cfg))
    await confirm(page, "#reload-button")
    await shows(page, "#action-summary", lambda t: t.startswith("400: config invalid"), "the refused reload")
    problem = await text(page, "#action-problems li")
    assert f"{node.path.name}:" in problem and "nope" in problem, problem
    assert await page.get_attribute("#action-result", "data-outcome") == "error"

    # Drain: the node's row turns draining (its sessions still open: drain.announce_s),
    # and so does readiness.
    await confirm(page, "#drain-button")
    await shows(page, "#action-summary", lambda t: t.startswith(f"Draining node {node.node_id}"), "the drain's answer")
    await shows(page, f"{row} td:nth-child(2)", lambda t: t == "draining", "the node draining")
    assert await text(page, f"{row} td:nth-child(3)") == str(CLIENTS)
    await until(lambda: page.is_disabled("#drain-button"), BOUND_S, "the drain button disabled")
    await shows(page, "#ready-badge", lambda t: t.startswith("readyz 503"), "readiness 503 on the page")
    async with http.get(origin + "/readyz") as r:
        assert r.status == 503
    await page.screenshot(path=str(tmp_path / "admin-draining.png"), full_page=True)

    # The page asked nothing of anyone but the admin listener, was refused only
    # what the test provoked, and the browser reported no error (a CSP violation
    # would be one).
    outside = [u for u in page.requested if not u.startswith(origin + "/")]
    assert outside == [], outside
    assert set(page.failed) == {(401, "/v1/nodes"), (400, "/v1/reload"), (503, "/readyz")}, page.failed
    assert page.errors == [], page.errors

    # Forgetting the token brings the form back and clears what was shown.
    await page.click("#signout-button")
    await page.wait_for_selector("#login", state="visible", timeout=BOUND_S * 1000)
    assert await page.locator("#connections tbody tr").count() == 0
    assert not any(ws.closed for ws in clients)   # the drain is still in its announce
    for ws in clients:
        await ws.close()
    await asyncio.wait_for(asyncio.gather(*readers), BOUND_S)


async def test_a_token_refused_later_brings_the_form_back(node, page, http, monkeypatch):
    """The node restarts with another token (a rotation): the page's next call is
    refused, and it asks for the token again, saying why."""
    await page.goto(node.admin_url + "/ui/")
    await sign_in(page, TOKEN)
    await shows(page, f'#nodes tr[data-node="{node.node_id}"]', lambda t: "ready" in t, "this node")
    node.stop()
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "rotated-token")
    node.p = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(node.path)],
                              stderr=open(node.stderr, "ab"), stdout=subprocess.DEVNULL)
    await node.ready(http)
    await page.wait_for_selector("#login", state="visible", timeout=BOUND_S * 1000)
    assert "refused the token (401" in await text(page, "#login-error")
    assert await page.is_hidden("#dash")
    assert await page.locator("#nodes tbody tr").count() == 0
    await sign_in(page, "rotated-token")
    await page.wait_for_selector("#dash", state="visible", timeout=BOUND_S * 1000)


async def test_the_page_shows_every_node_and_another_ones_drain(tmp_path, backend, redis_server, page, http,
                                                                monkeypatch):
    """Two nodes sharing a Redis: node a's page lists both; node b drains (its own
    API call, as its preStop would) and a's page shows b draining, a still ready.
    Then Redis stops: the node list shows the 503, the rest of a's page goes on."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    b = await backend()
    procs = []
    try:
        for name in ("a", "b"):
            cfg = gateway_config(b.url) | {"node_id": f"gw-{name}",
                                           "redis": {"url": redis_server.url, "heartbeat_s": 0.5, "node_ttl_s": 2}}
            procs.append(Proc(tmp_path, cfg, name=name))
        for p in procs:
            await p.ready(http)
        a, other = procs
        await page.goto(a.admin_url + "/ui/")
        await sign_in(page, TOKEN)
        for name in ("gw-a", "gw-b"):
            await shows(page, f'#nodes tr[data-node="{name}"] td:nth-child(2)', lambda t: t == "ready", f"{name} ready")
        async with http.post(other.admin_url + "/v1/drain", headers={"Authorization": f"Bearer {TOKEN}"}) as r:
            assert r.status == 202
        await shows(page, '#nodes tr[data-node="gw-b"] td:nth-child(2)', lambda t: t == "draining", "gw-b draining")
        assert await text(page, '#nodes tr[data-node="gw-a"] td:nth-child(2)') == "ready"
        assert await text(page, "#node-badge") == "node gw-a"
        assert [await page.locator(f'#nodes tr[data-node="{n}"] .here').count() for n in ("gw-a", "gw-b")] == [1, 0]
        assert not await page.is_disabled("#drain-button")   # this node (a) is not draining
        await page.screenshot(path=str(tmp_path / "admin-two-nodes.png"), full_page=True)

        # Redis goes away: the cluster-wide node list says so; this node's panels still update.
        ws = await http.ws_connect(a.url + "/ws")
        await shows(page, "#connections-total", lambda t: t == "1", "the new session listed")
        redis_server.stop()
        await shows(page, "#nodes td.empty.error", lambda t: t.startswith("503: session store unreachable"),
                    "the node list's 503")
        await ws.close()
        await shows(page, "#connections-total", lambda t: t == "0", "this node's sessions still updated")
        assert await page.locator(f'#backends tr[data-endpoint="{b.url}"]').count() == 1
        assert "session store unreachable" in await text(page, "#status")
        await shows(page, "#ready-badge", lambda t: t == "readyz 200 ready, store unavailable", "the store in readyz")
        await page.screenshot(path=str(tmp_path / "admin-store-down.png"), full_page=True)
        assert page.errors == [], page.errors
    finally:
        for p in procs:
            p.stop()


# No keepalive pings within the test (a fresh session's first comes after 30 s): the
# trace's four frames are the two messages and their echoes.
@pytest.mark.parametrize("node", [30], indirect=True)
async def test_trace_view_shows_a_sessions_frames_as_text(node, page, http, tmp_path: pathlib.Path):
    """Trace on a session's row, Start: its frames both ways, up to the bound, the
    first bytes as text (markup in a message stays text); Stop ends a running one."""
    ws = await http.ws_connect(node.url + "/ws")
    received = [0]
    reader = asyncio.create_task(_read(ws, received, 0))
    try:
        await page.goto(node.admin_url + "/ui/")
        await sign_in(page, TOKEN)
        button = "#connections tr[data-connection] button"
        await page.wait_for_selector(button, timeout=BOUND_S * 1000)
        conn = await page.get_attribute("#connections tr[data-connection]", "data-connection")
        await page.click(button)
        assert await page.input_value("#trace-conn") == conn
        await page.fill("#trace-frames", "4")
        await page.click("#trace-start")
        await shows(page, "#trace-status", lambda t: "tracing" in t or "ended" in t, "the trace started")
        for i in range(2):   # two messages, each echoed: four frames, the bound
            await ws.send_str(f"<b>bold {i}</b>")
        await shows(page, "#trace-status", lambda t: "ended (max_frames)" in t, "the trace ended at its bound")
        rows = page.locator("#trace-frames-table tbody tr")
        assert await rows.count() == 4
        dirs = [await rows.nth(i).get_attribute("data-dir") for i in range(4)]
        assert sorted(dirs) == ["down", "down", "up", "up"], dirs
        ops = [await rows.nth(i).locator("td:nth-child(3)").text_content() for i in range(4)]
        assert ops == ["text"] * 4, ops
        heads = [await rows.nth(i).locator("td.head").text_content() for i in range(4)]
        assert "<b>bold 0</b>" in heads, heads
        assert await page.locator("#trace-frames-table b").count() == 0   # text, never markup
        await page.screenshot(path=str(tmp_path / "admin-trace.png"), full_page=True)

        # A longer one, stopped by hand.
        await page.fill("#trace-frames", "1000")
        await page.click("#trace-start")
        await shows(page, "#trace-status", lambda t: "tracing" in t, "the second trace running")
        await page.click("#trace-stop")
        await shows(page, "#trace-status", lambda t: "ended (stopped)" in t, "the trace stopped")
        assert page.errors == [], page.errors
    finally:
        await ws.close()
        await asyncio.wait_for(reader, BOUND_S)


async def _read(ws, received: list[int], i: int) -> None:
    async for _msg in ws:
        received[i] += 1


async def _rows(page, selector: str, n: int) -> bool:
    return await page.locator(selector).count() == n


async def _changed(page, selector: str, before: str) -> bool:
    return await canvas_image(page, selector) != before
