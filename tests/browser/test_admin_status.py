"""What the admin page stands on, without a browser: the files served under
/ui/ and their headers, the read-only /v1/backends and /v1/connections, and
the page's files shipping in the package."""

from __future__ import annotations

import pathlib
import re
import shutil
import subprocess
import sys

import pytest

from gateway import adminpage

from ..conftest import proxy_config
from ..helpers import until

TOKEN = "page-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
UI = pathlib.Path(adminpage.__file__).resolve().parent / "adminui"
ROOT = UI.parents[1]


@pytest.fixture
async def gw(gateway, backend, monkeypatch):
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", TOKEN)
    b = await backend()
    cfg = proxy_config(b.url, "ws://127.0.0.1:9/ws")   # the second endpoint: nothing listens there
    cfg["backends"]["echo"] = {"type": "builtin", "handler": "echo"}
    cfg["backends"]["hook"] = {"type": "http", "endpoints": ["http://127.0.0.1:9/hook"]}
    gw = await gateway(cfg)
    gw.backend_url = b.url
    return gw


async def test_the_page_is_served_without_the_token_with_strict_headers(gw, http):
    async with http.get(gw.admin_url + "/", allow_redirects=False) as r:
        assert (r.status, r.headers["Location"]) == (302, "/ui/")
    for name, ctype in (("", "text/html"), ("app.mjs", "text/javascript"), ("prom.mjs", "text/javascript"),
                        ("style.css", "text/css")):
        async with http.get(f"{gw.admin_url}/ui/{name}") as r:
            assert r.status == 200, name
            assert r.content_type == ctype, name
            h = r.headers
            assert "default-src 'self'" in h["Content-Security-Policy"]
            assert "frame-ancestors 'none'" in h["Content-Security-Policy"]
            assert "'unsafe-inline'" not in h["Content-Security-Policy"]
            assert (h["X-Frame-Options"], h["X-Content-Type-Options"], h["Cache-Control"]) == \
                ("DENY", "nosniff", "no-store")
    for bad in ("/ui/nope.mjs", "/ui/..%2Fadmin.py", "/ui/%2e%2e/admin.py"):
        async with http.get(gw.admin_url + bad) as r:
            assert r.status == 404, bad
            assert "admin_token" not in await r.text()


async def test_api_answers_are_not_cached_and_need_the_token(gw, http):
    for path in ("/v1/backends", "/v1/connections"):
        async with http.get(gw.admin_url + path) as r:
            assert r.status == 401
            assert "error" in await r.json()
        async with http.get(gw.admin_url + path, headers=AUTH) as r:
            assert r.status == 200
            assert (r.headers["Cache-Control"], r.headers["X-Content-Type-Options"]) == ("no-store", "nosniff")


async def test_backends_show_each_endpoint_state(gw, http):
    async def states():
        async with http.get(gw.admin_url + "/v1/backends", headers=AUTH) as r:
            assert r.status == 200
            body = await r.json()
        return {b["name"]: {e["url"]: e["state"] for e in b["endpoints"]} for b in body["backends"]}

    assert await states() == {"b": {gw.backend_url: "healthy", "ws://127.0.0.1:9/ws": "healthy"},
                              "echo": {}, "hook": {"http://127.0.0.1:9/hook": "healthy"}}
    # Dials to the dead endpoint fail; after eject_after_failures (3) it is ejected.
    for _ in range(6):
        async with http.ws_connect(gw.url + "/ws") as ws:
            await ws.send_str("x")
            assert (await ws.receive(timeout=5)).data == "x"
    await until(lambda: _ejected(states), 5, "the dead endpoint ejected")
    pool = gw.node.routing.pools["b"]
    pool.draining = {gw.backend_url}     # what the store's endpoint drain sets on every node
    assert (await states())["b"][gw.backend_url] == "draining"


async def _ejected(states):
    return (await states())["b"]["ws://127.0.0.1:9/ws"] == "ejected"


async def test_connections_lists_the_newest_sessions_bounded(gw, http):
    wss = [await http.ws_connect(gw.url + "/ws") for _ in range(5)]
    try:
        for ws in wss:
            await ws.send_str("hi")
            await ws.receive(timeout=5)

        async def listed(limit: str = ""):
            async with http.get(gw.admin_url + "/v1/connections" + limit, headers=AUTH) as r:
                return r.status, await r.json()

        status, body = await listed()
        assert status == 200 and (body["total"], len(body["connections"])) == (5, 5)
        assert [c["connection"] for c in body["connections"]] == list(reversed(gw.node.sessions))
        first = body["connections"][0]
        assert (first["route"], first["backend"], first["messages_in"] >= 0) == ("r", gw.backend_url, True)
        status, body = await listed("?limit=2")
        assert (status, body["total"], len(body["connections"])) == (200, 5, 2)
        for bad in ("0", "1001", "-1", "x", "1e3", ""):
            status, body = await listed(f"?limit={bad}")
            assert status == 400 and "limit must be a whole number from 1 to 1000" in body["error"], bad
    finally:
        for ws in wss:
            await ws.close()


def test_page_files_use_no_html_injection_storage_or_outside_urls():
    """Everything from the API is untrusted and the token stays in memory: the page's
    code never builds HTML from strings, never stores anything, and names nothing
    outside the listener."""
    comments = re.compile(r"^\s*//.*$|/\*.*?\*/|<!--.*?-->", re.M | re.S)   # whole-line ones: a URL's // stays
    files = {p.name: comments.sub("", p.read_text()) for p in UI.iterdir() if p.suffix in (".mjs", ".html", ".css")}
    assert {"index.html", "app.mjs", "prom.mjs", "chart.mjs", "style.css"} <= set(files)
    forbidden = re.compile(r"innerHTML|outerHTML|insertAdjacentHTML|document\.write|\beval\(|new Function|"
                           r"localStorage|sessionStorage|document\.cookie|indexedDB|https?://|@import")
    for name, text in files.items():
        assert not forbidden.search(text), f"{name}: {forbidden.search(text).group(0)}"
    html = files["index.html"]
    assert "<style" not in html and " style=" not in html
    assert not re.search(r"<script(?![^>]*\bsrc=)", html), "inline script"
    assert not re.search(r"\son[a-z]+=", html), "inline event handler"


def test_page_files_ship_in_the_package(tmp_path):
    """What a wheel holds: setuptools' build_py on a copy of the project, read from pyproject.toml."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, src / name)
    shutil.copytree(ROOT / "gateway", src / "gateway", ignore=shutil.ignore_patterns("__pycache__"))
    r = subprocess.run([sys.executable, "-c", "import setuptools; setuptools.setup()", "-q", "build_py",
                        "--build-lib", str(tmp_path / "lib")], cwd=src, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    built = {p.name for p in (tmp_path / "lib" / "gateway" / "adminui").iterdir()}
    shipped = {p.name for p in UI.iterdir() if p.suffix in adminpage.TYPES}
    assert shipped and built == shipped
