"""The process: health endpoints, SIGTERM, SIGHUP, workers, logs."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time

import aiohttp
import pytest
import yaml
from aiohttp import WSMsgType

from ..conftest import proxy_config
from ..helpers import free_port, until


class Proc:
    """`gateway run` as a real process on free ports."""

    def __init__(self, tmp_path, cfg: dict, name: str = "gw"):
        self.name = name
        self.port, self.admin = free_port(), free_port()
        cfg = dict(cfg, listen={"host": "127.0.0.1", "port": self.port},
                   admin={"host": "127.0.0.1", "port": self.admin})
        self.path = tmp_path / f"{name}.yaml"
        self.path.write_text(yaml.safe_dump(cfg))
        self.stderr = tmp_path / ("stderr.log" if name == "gw" else f"{name}.log")
        self.p = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(self.path)],
                                  stderr=open(self.stderr, "wb"), stdout=subprocess.DEVNULL)
        self.url = f"ws://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin}"

    async def ready(self, http, timeout=60):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            assert self.p.poll() is None, self.stderr.read_text()
            try:
                async with http.get(self.admin_url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise AssertionError("gateway did not become ready: " + self.stderr.read_text())

    async def wait(self, timeout=20) -> int:
        deadline = time.monotonic() + timeout
        while self.p.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.p.poll() is None:
            self.p.kill()
            raise AssertionError("did not exit in time")
        return self.p.returncode

    def logs(self) -> list[dict]:
        return [json.loads(line) for line in self.stderr.read_text().splitlines() if line.startswith("{")]

    def stop(self):
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


@pytest.fixture
def proc(tmp_path):
    made = []

    def start(cfg):
        p = Proc(tmp_path, cfg)
        made.append(p)
        return p

    yield start
    for p in made:
        p.stop()


async def test_healthz_and_readyz(gateway, backend, http):
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    async with http.get(gw.admin_url + "/healthz") as r:
        assert r.status == 200 and (await r.json())["status"] == "ok"
    async with http.get(gw.admin_url + "/readyz") as r:
        assert r.status == 200
    gw.node.draining = True
    async with http.get(gw.admin_url + "/readyz") as r:
        assert r.status == 503
    gw.node.draining = False


async def test_a_stopping_node_answers_an_admin_request_on_a_connection_it_had_taken(gateway, backend):
    """A caller that connected just before the node stopped, and sends its request once
    the listener has closed, is answered, not cut: cut, a publish could not tell
    whether it went out. A new connection is refused (the caller tries another node)."""
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    port = gw.ports[1]
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    await until(lambda: _async(len(gw.runner.server.connections) == 1), what="the admin API took the connection")
    gw.stopping.set()
    stopping = asyncio.ensure_future(gw.stop())

    async def refused() -> bool:
        try:
            _, w = await asyncio.open_connection("127.0.0.1", port)
        except OSError:
            return True
        w.close()
        return False
    await until(refused, what="the admin listener closed")
    writer.write(b"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
    answer = await asyncio.wait_for(reader.read(), 10)
    assert answer.startswith(b"HTTP/1.1 200"), answer[:200]
    writer.close()
    await asyncio.wait_for(stopping, 20)


async def _async(value):
    return value


def metric(text: str, sample: str) -> float:
    for line in text.splitlines():
        if line.startswith(sample + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


async def test_metrics_are_exposed_with_contract_names(gateway, backend, http):
    # The registry is per process: compare before and after, other tests count too.
    closes = 'gateway_session_closes_total{code="1000",route="r"}'
    msgs = 'gateway_messages_total{direction="in",route="r"}'
    refusals = 'gateway_handshake_refusals_total{reason="no_route"}'
    b = await backend()
    gw = await gateway(proxy_config(b.url, limits={"idle_timeout_s": 0.8}))
    async with http.get(gw.admin_url + "/metrics") as r:
        before = await r.text()
    async with http.ws_connect(gw.url + "/ws") as ws:
        for _ in range(3):
            await ws.send_str("m")
            await ws.receive()
        async def flushed():
            # Counters are kept per session and flushed by the node's tick while it is open.
            async with http.get(gw.admin_url + "/metrics") as r:
                text = await r.text()
            return text if metric(text, msgs) - metric(before, msgs) >= 3 else None
        text = await until(flushed, what="the open session's counters flushed")
    assert metric(text, 'gateway_sessions_open{route="r"}') >= 1
    assert metric(text, msgs) - metric(before, msgs) == 3
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await http.ws_connect(gw.url + "/nope")

    async def counted():
        async with http.get(gw.admin_url + "/metrics") as r:
            text = await r.text()
        return text if metric(text, closes) > metric(before, closes) else None
    text = await until(counted, what="the refused handshake's close counted")
    assert metric(text, closes) - metric(before, closes) == 1
    assert metric(text, refusals) - metric(before, refusals) == 1


async def test_sigterm_closes_sessions_with_the_drain_code_and_exits(proc, backend, http):
    """With the in-process store nothing outlives the process: no resume token, a plain close."""
    b = await backend()
    p = proc(proxy_config(b.url, drain={"timeout_s": 5, "close_code": 1001}))
    await p.ready(http)
    clients = [await http.ws_connect(p.url + "/ws") for _ in range(5)]
    await clients[0].send_str("x")
    assert (await clients[0].receive()).data == "x"
    p.p.send_signal(signal.SIGTERM)
    for ws in clients:
        msg = await ws.receive(timeout=10)
        assert (msg.type, msg.data) == (WSMsgType.CLOSE, 1001)
    assert await p.wait() == 0
    events = [e["event"] for e in p.logs()]
    assert "started" in events and "drain_started" in events and "stopped" in events
    closes = [e for e in p.logs() if e["event"] == "close"]
    assert len(closes) == 5 and all(e["code"] == 1001 and e["conn"] for e in closes)


async def test_sigterm_exits_within_drain_timeout_even_if_clients_ignore_close(proc, backend, http):
    b = await backend()
    p = proc(proxy_config(b.url, drain={"timeout_s": 1}, limits={"close_timeout_s": 30}))
    await p.ready(http)
    from ..helpers import RawClient

    c = await RawClient.connect(p.url + "/ws")   # never answers the close
    p.p.send_signal(signal.SIGTERM)
    assert await p.wait(timeout=15) == 0         # a hang guard; what ended the drain is in its log
    logs = p.logs()
    (done,) = [i for i, e in enumerate(logs) if e["event"] == "drain_done"]
    # drain.timeout_s (1 s) ended it with the ignoring client still there, not its
    # 30 s close_timeout_s and not the client.
    assert logs[done]["timed_out"] is True and logs[done]["sessions_left"] == 1, logs[done]
    assert "stopped" in [e["event"] for e in logs[done:]]
    c.close()


async def test_sighup_reloads_routes(proc, backend, http, tmp_path):
    b = await backend()
    p = proc(proxy_config(b.url))
    await p.ready(http)
    with pytest.raises(aiohttp.WSServerHandshakeError):
        await http.ws_connect(p.url + "/other")
    cfg = yaml.safe_load(p.path.read_text())
    cfg["routes"].append({"name": "other", "match": {"path": "/other"}, "auth": "none", "backend": "b"})
    p.path.write_text(yaml.safe_dump(cfg))
    p.p.send_signal(signal.SIGHUP)
    await until(lambda: asyncio.sleep(0, any(e["event"] == "reloaded" for e in p.logs())), what="reloaded")
    async with http.ws_connect(p.url + "/other") as ws:
        await ws.send_str("y")
        assert (await ws.receive()).data == "y"
    # A broken file is refused and the running config stays.
    p.path.write_text("routes: [\n")
    p.p.send_signal(signal.SIGHUP)
    await until(lambda: asyncio.sleep(0, any(e["event"] == "reload_failed" for e in p.logs())),
                what="the broken file refused")
    async with http.ws_connect(p.url + "/other"):
        pass


async def test_workers_share_the_port_and_a_crashed_worker_is_restarted(proc, backend, http):
    b = await backend()
    p = proc(proxy_config(b.url, workers=2))
    await p.ready(http)
    await until(lambda: asyncio.sleep(0, len([e for e in p.logs() if e["event"] == "started"]) == 2),
                what="both workers started")
    sup = next(e for e in p.logs() if e["event"] == "supervisor_started")
    victim = sup["pids"][0]
    os.kill(victim, signal.SIGKILL)
    await until(lambda: asyncio.sleep(0, any(e["event"] == "worker_restarted" for e in p.logs())),
                what="the killed worker restarted")
    for _ in range(10):
        async with http.ws_connect(p.url + "/ws") as ws:
            await ws.send_str("z")
            assert (await ws.receive()).data == "z"
    p.p.send_signal(signal.SIGTERM)
    assert await p.wait() == 0


async def test_workers_do_not_outlive_a_killed_supervisor(proc, backend, http):
    """SIGKILL to the supervisor (an OOM kill, a crashed parent): its workers drain and exit,
    rather than serve on, orphaned, on the port."""
    b = await backend()
    p = proc(proxy_config(b.url, workers=2, drain={"timeout_s": 2}))
    await p.ready(http)
    pids = await until(lambda: asyncio.sleep(0, next((e["pids"] for e in p.logs()
                                                      if e["event"] == "supervisor_started"), None)),
                       what="the supervisor's workers")

    def alive(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return False
        # A zombie has exited and waits for a parent to reap it: not serving.
        try:
            with open(f"/proc/{pid}/stat") as f:
                return f.read().rsplit(")", 1)[1].split()[0] != "Z"
        except FileNotFoundError:
            return False
    assert all(alive(pid) for pid in pids)
    p.p.kill()
    p.p.wait()
    await until(lambda: asyncio.sleep(0, not any(alive(pid) for pid in pids)), timeout_s=30,
                what="both workers gone after their supervisor")


async def test_default_config_echoes_with_no_other_service(http, tmp_path):
    """The README's first command, minus the install: `gateway run` on routes.yaml."""
    cfg = yaml.safe_load(open("routes.yaml"))
    p = Proc(tmp_path, cfg)
    try:
        await p.ready(http)
        async with http.ws_connect(p.url + "/echo") as ws:
            await ws.send_str("hello")
            assert (await ws.receive()).data == "hello"
            await ws.send_bytes(b"\x01\x02")
            assert (await ws.receive()).data == b"\x01\x02"
    finally:
        p.stop()


async def test_gateway_drain_command_drains_every_worker(proc, backend, http):
    b = await backend()
    p = proc(proxy_config(b.url, workers=2, drain={"timeout_s": 5}))
    await p.ready(http)
    await until(lambda: asyncio.sleep(0, len([e for e in p.logs() if e["event"] == "started"]) == 2),
                what="both workers started")
    clients = [await http.ws_connect(p.url + "/ws") for _ in range(8)]
    res = await asyncio.to_thread(subprocess.run, [sys.executable, "-m", "gateway", "drain", "--admin", p.admin_url],
                                  capture_output=True, text=True, timeout=30)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["draining"] is True
    for ws in clients:
        msg = await ws.receive(timeout=10)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1012, "going away")   # drain.close_code default
    assert await p.wait() == 0
    assert len([e for e in p.logs() if e["event"] == "stopped"]) == 2
