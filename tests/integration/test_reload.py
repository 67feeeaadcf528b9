"""Hot reload: SIGHUP, POST /v1/reload and `watch: true` (a ConfigMap update).
A broken file changes nothing and is answered with its file:line:col; a good
one applies to new sessions at once, moves the sessions whose endpoint it
removed (reattach), drains those whose route it removed (1012 + resume), and
never drops a connection. Numbered messages both ways under traffic."""

from __future__ import annotations

import os
import pathlib
import re
import signal

import pytest
import yaml
from aiohttp import WSMsgType

from gateway import metrics

from ..conftest import proxy_config
from .fleet import (BOUND_S, Fleet, api, clients, close, holds, numbered_client, on, reattach_config, settle,
                    stop_sending, traffic)
from .test_lifecycle import Proc

FILE = pathlib.Path("test.yaml")   # what conftest's gateway names its config, in the test's tmp_path
PLACE = re.compile(r"\.yaml:\d+:\d+ ")   # every problem names file:line:col


def full(cfg: dict) -> dict:
    return dict(cfg, listen={"host": "127.0.0.1", "port": 0}, admin={"host": "127.0.0.1", "port": 0},
                drain={"timeout_s": 2})


def broken(cfg: dict) -> dict:
    """`cfg` with two mistakes: a route naming no backend, a limit that is not a number."""
    cfg = yaml.safe_load(yaml.safe_dump(cfg))
    cfg["routes"][0]["backend"] = "nope"
    cfg["limits"] = {"max_message_bytes": "big"}
    return cfg


@pytest.fixture
def from_file(gateway, tmp_path, monkeypatch):
    """`await from_file(cfg)` starts conftest's gateway on a real file: its config
    source is "test.yaml", here in tmp_path (written from `cfg` unless there already)."""
    monkeypatch.chdir(tmp_path)

    async def start(cfg: dict):
        if not FILE.exists():
            FILE.write_text(yaml.safe_dump(full(cfg)))
        return await gateway(yaml.safe_load(FILE.read_text()))

    return start


def reloads(result: str) -> float:
    return metrics.config_reloads.labels(result)._value.get()


async def test_ten_reloads_good_and_broken_under_traffic_drop_nothing(from_file, http):
    fleet = Fleet()
    eps = [await fleet.endpoint() for _ in range(3)]
    urls = [e.url for e in eps]
    pairs = [urls[0:2], urls[1:3], [urls[2], urls[0]]]   # each good reload removes one endpoint, adds one
    path = FILE
    gw = await from_file(reattach_config(*pairs[0]))
    cs, sids = await clients(http, gw, 4)
    ok, error = reloads("ok"), reloads("error")
    try:
        for i in range(10):
            await traffic(cs)
            good = reattach_config(*pairs[(i // 2 + 1) % 3])
            if i % 2 == 0:
                path.write_text(yaml.safe_dump(full(good)))
                status, body = await api(http, gw, "POST", "/v1/reload")
                assert (status, body["reloaded"]) == (200, True), body
                await holds(lambda: sum(on(gw, u) for u in good["backends"]["b"]["endpoints"]) == 4, BOUND_S,
                            "every session on an endpoint of the new config")
            else:
                running = gw.node.config
                path.write_text(yaml.safe_dump(full(broken(good))))
                status, body = await api(http, gw, "POST", "/v1/reload")
                assert status == 400 and body["error"] == "config invalid; nothing changed", body
                assert len(body["problems"]) == 2 and all(PLACE.search(p) for p in body["problems"]), body
                assert gw.node.config is running
        await traffic(cs)
        await settle(cs, fleet, sids)
        assert (reloads("ok") - ok, reloads("error") - error) == (5, 5)
    finally:
        for c in cs:
            await close(c)
        for e in eps:
            await e.stop()


async def test_a_removed_route_drains_its_sessions_with_1012_and_a_resume_token(from_file, backend, http):
    b = await backend()
    cfg = proxy_config(b.url)
    cfg["routes"].append({"name": "old", "match": {"path": "/old"}, "auth": "none", "backend": "b"})
    gw = await from_file(cfg)
    async with http.ws_connect(gw.url + "/ws") as kept, http.ws_connect(gw.url + "/old") as gone:
        for ws in (kept, gone):
            await ws.send_str("hi")
            assert (await ws.receive(timeout=BOUND_S)).data == "hi"
        cfg["routes"].pop()
        FILE.write_text(yaml.safe_dump(full(cfg)))
        assert gw.reload() == []
        msg = await gone.receive(timeout=BOUND_S)
        assert msg.type is WSMsgType.CLOSE and msg.data == 1012 and msg.extra.startswith("resume="), msg
        await kept.send_str("still here")
        assert (await kept.receive(timeout=BOUND_S)).data == "still here"


def configmap(root, cfg: dict, version: int):
    """Write `cfg` the way the kubelet updates a mounted ConfigMap: a new
    timestamped directory, a `..data` symlink swapped to it by rename, and
    test.yaml -> ..data/test.yaml."""
    d = root / f"..{version}"
    d.mkdir()
    (d / FILE.name).write_text(yaml.safe_dump(full(cfg)))
    tmp = root / "..data_tmp"
    tmp.symlink_to(d.name)
    os.replace(tmp, root / "..data")
    if not (root / FILE.name).is_symlink():
        (root / FILE.name).symlink_to(f"..data/{FILE.name}")


async def test_watch_picks_up_a_configmap_update_and_refuses_a_broken_one(from_file, tmp_path, http):
    fleet = Fleet()
    a, b = await fleet.endpoint(), await fleet.endpoint()
    configmap(tmp_path, reattach_config(a.url, watch=True), 1)
    gw = await from_file({})
    cs, sids = await clients(http, gw, 2)
    ok, error = reloads("ok"), reloads("error")
    try:
        await traffic(cs)
        configmap(tmp_path, reattach_config(b.url, watch=True), 2)
        await holds(lambda: reloads("ok") == ok + 1, BOUND_S, "the watcher reloaded")
        assert gw.node.config.backends["b"].endpoints == (b.url,)
        await holds(lambda: on(gw, b.url) == 2, BOUND_S, "the sessions moved to the new endpoint")
        running = gw.node.config
        configmap(tmp_path, broken(reattach_config(a.url, watch=True)), 3)
        await holds(lambda: reloads("error") == error + 1, BOUND_S, "the watcher refused the broken file")
        assert gw.node.config is running
        await traffic(cs)
        await settle(cs, fleet, sids)
        assert reloads("ok") == ok + 1   # a refused file is not tried again and again
    finally:
        for c in cs:
            await close(c)
        await a.stop()
        await b.stop()


@pytest.fixture
def proc(tmp_path):
    made = []

    def start(cfg, name="gw"):
        p = Proc(tmp_path, cfg, name)
        made.append(p)
        return p

    yield start
    for p in made:
        p.stop()


async def test_sighup_and_the_api_reload_every_worker_and_keep_their_sessions(proc, http):
    fleet = Fleet()
    a, b = await fleet.endpoint(), await fleet.endpoint()
    p = proc(reattach_config(a.url, workers=2))
    await p.ready(http)
    await holds(lambda: len(events(p, "started")) == 2, BOUND_S, "both workers started")
    cs = [await numbered_client(http, p.url + "/ws") for _ in range(4)]
    try:
        await traffic(cs)
        cfg = yaml.safe_load(p.path.read_text())
        cfg["backends"]["b"]["endpoints"] = [b.url]
        p.path.write_text(yaml.safe_dump(cfg))
        p.p.send_signal(signal.SIGHUP)
        await holds(lambda: len(events(p, "reloaded")) == 2, BOUND_S, "both workers reloaded")
        await holds(lambda: not a.conns and len(b.conns) == 4, BOUND_S, "every session moved to the new endpoint")
        await traffic(cs)
        # Through the API, a broken file is answered by the worker that takes the call ...
        p.path.write_text(yaml.safe_dump(broken(cfg)))
        async with http.post(p.admin_url + "/v1/reload") as r:
            body = await r.json()
            assert r.status == 400 and all(PLACE.search(x) for x in body["problems"]), body
        # ... and a good one is forwarded to every worker.
        p.path.write_text(yaml.safe_dump(cfg))
        async with http.post(p.admin_url + "/v1/reload") as r:
            assert (r.status, await r.json()) == (202, {"reloading": True, "workers": "all"})
        await holds(lambda: len(events(p, "reloaded")) == 4, BOUND_S, "both workers reloaded again")
        await traffic(cs)
        fleet.quiet = True
        for c in cs:
            await stop_sending(c)
        assert not any(c.closes for c in cs)
        # Without the gateway's session ids at hand, check each stream by what the backend got.
        await holds(lambda: sum(len(v) for v in fleet.got.values()) == sum(c.sent for c in cs), BOUND_S,
                    "the backend got every client message")
        assert sorted(len(v) for v in fleet.got.values()) == sorted(c.sent for c in cs)
        for got in fleet.got.values():
            assert got == [f"c{i}" for i in range(1, len(got) + 1)]
        await holds(lambda: sorted(len(c.got) for c in cs) == sorted(fleet.sent.values()), BOUND_S,
                    "every client got every backend message")
        for c in cs:
            assert c.got == [f"s{i}" for i in range(1, len(c.got) + 1)]
    finally:
        for c in cs:
            await close(c)
        await a.stop()
        await b.stop()


def events(p, name: str) -> list[dict]:
    return [e for e in p.logs() if e["event"] == name]
