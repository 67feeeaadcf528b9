"""The JavaScript client (clients/js) under Node's own test runner, from here.

The npm devDependencies are installed once (`npm ci` from the committed
package-lock.json, into clients/js/node_modules); an install that fails fails
the tests. The unit and React tests need no gateway; test/gateway.test.js
runs against two real gateway nodes sharing a real redis-server, and what
its client sent is checked here at the backend: nothing lost or twice, through
a drain and, in reliable mode, through TCP connections cut without a close by
a proxy the JS test puts between the client and the gateway."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from ..helpers import until
from ..integration.numbered import NumberedBackend, contiguous

JS = Path(__file__).resolve().parents[2] / "clients" / "js"
STAMP = JS / "node_modules" / ".installed-from"   # the package-lock.json digest of the last npm ci
SECRET = "j" * 64
ADMIN_TOKEN = "js-client-admin-token"
NODE_TIMEOUT_S = 90


def _tool(name: str) -> str:
    path = shutil.which(name)
    if path is None:
        pytest.fail(f"{name} not found: the JS client tests need Node 20+ and npm (apt-get install nodejs npm)",
                    pytrace=False)
    return path


def node_major() -> int:
    version = subprocess.run([_tool("node"), "--version"], capture_output=True, text=True, check=True).stdout
    return int(version.strip().lstrip("v").split(".")[0])


@pytest.fixture(scope="module")
def node_modules() -> Path:
    if node_major() < 20:
        pytest.fail("Node is too old: the JS client needs Node 20+", pytrace=False)
    digest = hashlib.sha256((JS / "package-lock.json").read_bytes()).hexdigest()
    if not (STAMP.exists() and STAMP.read_text() == digest):
        done = subprocess.run([_tool("npm"), "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=JS,
                              capture_output=True, text=True, timeout=300)
        if done.returncode != 0:
            pytest.fail(f"npm ci in {JS} failed ({done.returncode}):\n{done.stdout}\n{done.stderr}", pytrace=False)
        STAMP.write_text(digest)
    return JS / "node_modules"


async def run_node(*args: str, env: dict | None = None) -> tuple[int, str]:
    """Run `node args` in clients/js without blocking the loop (the gateways run on it)."""
    proc = await asyncio.create_subprocess_exec(
        _tool("node"), *args, cwd=JS, env={**os.environ, **(env or {})},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    try:
        out, _ = await asyncio.wait_for(proc.communicate(), NODE_TIMEOUT_S)
    except TimeoutError:
        proc.kill()
        out, _ = await proc.communicate()
        raise AssertionError(f"node {' '.join(args)} ran over {NODE_TIMEOUT_S} s:\n{out.decode()}") from None
    return proc.returncode, out.decode()


def tap_counts(output: str) -> dict[str, int]:
    """The summary lines of node --test's output: {'pass': n, 'fail': n, 'skipped': n, ...}."""
    return {k: int(v) for k, v in re.findall(r"^# (tests|pass|fail|cancelled|skipped|todo) (\d+)$", output, re.M)}


def assert_ran(rc: int, output: str, at_least: int) -> None:
    counts = tap_counts(output)
    assert rc == 0, f"node --test failed ({rc}):\n{output}"
    assert counts.get("fail") == 0 and counts.get("cancelled") == 0, output
    assert counts.get("skipped") == 0, f"tests were skipped:\n{output}"
    assert counts.get("pass", 0) >= at_least, f"expected at least {at_least} passing tests:\n{output}"


async def test_unit_and_react_tests_pass(node_modules):
    own = {"gateway.test.js", "global-websocket.test.js"}   # the gateway's test below; the runtime's WebSocket next
    files = sorted(str(p.relative_to(JS)) for p in (JS / "test").glob("*.test.js") if p.name not in own)
    assert "test/react.test.js" in files and "test/client.test.js" in files
    rc, output = await run_node("--test", *files)
    assert_ran(rc, output, at_least=40)


async def test_on_the_runtimes_own_websocket(node_modules):
    """Node 22 has a global WebSocket; Node 20 has it behind a flag (it behaves as a browser's)."""
    flags = ["--experimental-websocket"] if node_major() < 22 else []
    rc, output = await run_node(*flags, "--test", "test/global-websocket.test.js")
    assert_ran(rc, output, at_least=3)


async def got_all(numbered: NumberedBackend, sid: str, count: int) -> None:
    await until(lambda: asyncio.sleep(0, len(numbered.got[sid]) >= count),
                what=f"the backend got all {count} client messages of {sid}")


def node_cfg(node_id: str, redis_url: str, numbered_url: str, echo_url: str) -> dict:
    return {
        "node_id": node_id,
        "redis": {"url": redis_url, "heartbeat_s": 0.2, "node_ttl_s": 1, "timeout_s": 0.5},
        "auth": {"jwt": {"algorithms": ["HS256"], "keys": {"secret_env": "JS_CLIENT_JWT_SECRET"}, "leeway_s": 0,
                         "sources": ["query:access_token", "subprotocol"]}},
        "drain": {"timeout_s": 5, "rate_per_s": 1000},
        "backends": {"num": {"type": "websocket", "endpoints": [numbered_url]},
                     "echo": {"type": "builtin", "handler": "echo"},
                     "ws-echo": {"type": "websocket", "endpoints": [echo_url]}},
        "routes": [{"name": "num", "match": {"path": "/num"}, "auth": "required", "backend": "num"},
                   {"name": "rel", "match": {"path": "/rel"}, "auth": "required", "backend": "num",
                    "reliable": {"ack_every": 16, "ack_ms": 50}},
                   {"name": "echo", "match": {"path": "/echo"}, "auth": "required", "backend": "echo"},
                   {"name": "ws-echo", "match": {"path": "/ws-echo"}, "auth": "required", "backend": "ws-echo"}],
    }


async def test_js_client_against_two_gateway_nodes(node_modules, gateway, backend, redis_server, monkeypatch,
                                                   tmp_path):
    monkeypatch.setenv("JS_CLIENT_JWT_SECRET", SECRET)
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN_TOKEN)
    numbered = NumberedBackend()
    await numbered.start()
    echo = await backend()
    drainer = None
    try:
        a = await gateway(node_cfg("node-a", redis_server.url, numbered.url, echo.url))
        b = await gateway(node_cfg("node-b", redis_server.url, numbered.url, echo.url))

        async def stop_when_drained():
            # What `gateway run` does on POST /v1/drain: drain, then stop.
            await a.stopping.wait()
            await a.stop()

        drainer = asyncio.ensure_future(stop_when_drained())
        result, cut_result = tmp_path / "drain.json", tmp_path / "cut.json"
        rc, output = await run_node("--test", "test/gateway.test.js", env={
            "JS_GW_A": a.url, "JS_GW_B": b.url, "JS_GW_ADMIN_A": a.admin_url, "JS_GW_ADMIN_TOKEN": ADMIN_TOKEN,
            "JS_GW_JWT_SECRET": SECRET, "JS_GW_RESULT": str(result), "JS_GW_RESULT_CUT": str(cut_result)})
        assert_ran(rc, output, at_least=9)
        await asyncio.wait_for(drainer, 10)
        # The bearer subprotocol carried the token and went no further.
        (offer,) = [h.get("Sec-WebSocket-Protocol") for h in echo.requests]
        assert offer is None, offer

        # The sessions by what their client said: c1... (drain), p1... (reliable), r1... (cut).
        by_prefix = {msgs[0][0]: sid for sid, msgs in numbered.got.items()}
        assert sorted(by_prefix) == ["c", "p", "r"], {sid: m[:3] for sid, m in numbered.got.items()}
        opened = collections.defaultdict(list)   # session -> Gateway-Resumed of each upstream connection
        for h in numbered.handshakes:
            opened[h["Gateway-Session-Id"]].append(h.get("Gateway-Resumed"))

        # The reliable session: plain messages at the backend, no kind byte.
        await got_all(numbered, by_prefix["p"], 30)
        assert numbered.got[by_prefix["p"]] == [f"p{i}" for i in range(1, 31)]

        # The cut test: one session, resumed twice on the same node; every message once, in order.
        cut = json.loads(cut_result.read_text())
        sid = by_prefix["r"]
        assert opened[sid] == [None, "1", "1"]
        await got_all(numbered, sid, cut["sent"])
        assert contiguous("r", numbered.got[sid]) == cut["sent"]
        assert cut["received"] >= 90 and numbered.sent[sid] >= cut["received"]

        # The backend's side of the drain test: one session, opened on A, resumed on B.
        drain = json.loads(result.read_text())
        sid = by_prefix["c"]
        assert opened[sid] == [None, "1"]
        await got_all(numbered, sid, drain["sent"])
        assert contiguous("c", numbered.got[sid]) == drain["sent"]
        assert drain["received"] >= 40 and numbered.sent[sid] >= drain["received"]
    finally:
        if drainer is not None and not drainer.done():
            drainer.cancel()
        await numbered.stop()


async def test_types_check_against_the_usage_file(node_modules):
    done = await asyncio.create_subprocess_exec(
        _tool("npx"), "--no-install", "tsc", "--noEmit", "-p", "types-check", cwd=JS,
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(done.communicate(), NODE_TIMEOUT_S)
    assert done.returncode == 0, f"tsc --noEmit -p clients/js/types-check failed:\n{out.decode()}"
