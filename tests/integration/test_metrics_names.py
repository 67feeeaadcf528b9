"""/metrics scraped from a real gateway after traffic: Prometheus naming
conventions hold for every gateway_ family, the DESIGN 8b names are there, and
the counters added for operating it (bytes, ejections, store calls) count."""

from __future__ import annotations

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from ..conftest import proxy_config
from ..helpers import until

DESIGN_8B = {
    "gateway_sessions_open", "gateway_sessions_total", "gateway_session_closes_total",
    "gateway_messages_total", "gateway_message_bytes_total", "gateway_handshake_refusals_total",
    "gateway_upstream_connect_failures_total", "gateway_resumes_total", "gateway_reattaches_total",
    "gateway_replayed_messages_total", "gateway_config_reloads_total", "gateway_draining",
}
# A name with one of these words measures time, so its unit must be _seconds.
TIME_WORDS = ("latency", "duration", "seconds", "time")


async def scrape(http, gw) -> dict:
    """Family name -> family, as prometheus_client's parser reads the exposition."""
    async with http.get(gw.admin_url + "/metrics") as r:
        assert r.status == 200
        text = await r.text()
    return {f.name: f for f in text_string_to_metric_families(text)}


def sample(families: dict, family: str, name: str, **labels) -> float:
    for s in families[family].samples:
        if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
            return s.value
    return 0.0


def store_errors(families: dict) -> float:
    return sum(s.value for s in families["gateway_store_errors"].samples if s.name == "gateway_store_errors_total")


def exported_names(families: dict) -> set[str]:
    """What a PromQL expression may name: counters with _total, histograms as their family."""
    out = set()
    for f in families.values():
        out.add(f.name + "_total" if f.type == "counter" else f.name)
    return out


async def traffic(http, gw) -> None:
    async with http.ws_connect(gw.url + "/ws") as ws:
        for _ in range(3):
            await ws.send_str("hello")
            assert (await ws.receive(timeout=5)).data == "hello"
    with pytest.raises(aiohttp.WSServerHandshakeError):   # a refusal too, so its metrics have samples
        await http.ws_connect(gw.url + "/nope")


async def test_every_gateway_metric_follows_prometheus_naming(gateway, backend, http):
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    await traffic(http, gw)
    families = await scrape(http, gw)
    # In the text format prometheus_client writes each counter's and histogram's
    # creation time as a gauge family of its own, <name>_created: not ours to name.
    ours = {n: f for n, f in families.items()
            if n.startswith("gateway_") and not (n.endswith("_created") and n.removesuffix("_created") in families)}
    assert ours
    for name, f in ours.items():
        names = {s.name for s in f.samples}
        if f.type == "counter":
            # The parser drops _total from a counter's family name; the samples keep it.
            assert not name.endswith("_total"), name
            assert names <= {name + "_total", name + "_created"}, (name, names)
        elif f.type == "gauge":
            assert not name.endswith("_total"), f"gauge {name} ends in _total"
            assert names <= {name}, (name, names)
        elif f.type == "histogram":
            assert name.endswith(("_seconds", "_bytes")), f"histogram {name} has no unit suffix"
            assert names <= {name + s for s in ("_bucket", "_count", "_sum", "_created")}, (name, names)
        else:
            raise AssertionError(f"{name}: unexpected type {f.type}")
        base = name.removesuffix("_total")
        if any(w in base for w in TIME_WORDS):
            assert base.endswith("_seconds"), f"{name} measures time but is not in _seconds"
        if "byte" in base or "size" in base:
            assert base.endswith("_bytes"), f"{name} measures size but is not in _bytes"
    missing = DESIGN_8B - exported_names(families)
    assert not missing, f"DESIGN 8b names missing from /metrics: {sorted(missing)}"


async def test_message_bytes_are_counted_both_ways(gateway, backend, http):
    b = await backend()
    gw = await gateway(proxy_config(b.url))
    fam = "gateway_message_bytes_total"
    before = await scrape(http, gw)
    await traffic(http, gw)

    async def flushed():
        now = await scrape(http, gw)
        closes = sample(now, "gateway_session_closes", "gateway_session_closes_total", route="r")
        if closes > sample(before, "gateway_session_closes", "gateway_session_closes_total", route="r"):
            return now
    now = await until(flushed, what="the session's close was counted")
    for direction in ("in", "out"):
        grew = (sample(now, "gateway_message_bytes", fam, route="r", direction=direction)
                - sample(before, "gateway_message_bytes", fam, route="r", direction=direction))
        # Three 5-byte payloads each way, plus frame headers (and the close frames).
        assert grew >= 15, (direction, grew)


async def test_ejected_endpoint_is_counted(gateway, backend, http):
    bad = await backend(status=503)
    good = await backend()
    gw = await gateway(proxy_config(bad.url, good.url, backend={
        "balance": "round_robin", "eject_after_failures": 2, "eject_cooldown_s": 60}))
    before = sample(await scrape(http, gw), "gateway_upstream_ejections", "gateway_upstream_ejections_total",
                    backend="b", endpoint=bad.url)
    for _ in range(4):
        async with http.ws_connect(gw.url + "/ws"):
            pass
    after = sample(await scrape(http, gw), "gateway_upstream_ejections", "gateway_upstream_ejections_total",
                   backend="b", endpoint=bad.url)
    assert after - before == 1
    assert len(bad.requests) == 2


async def test_store_calls_are_timed_and_outages_counted(gateway, redis_server, http):
    gw = await gateway({
        "node_id": "metrics1",
        "backends": {"echo": {"type": "builtin", "handler": "echo"}},
        "routes": [{"name": "echo", "match": {"path": "/echo"}, "auth": "none", "backend": "echo"}],
        "redis": {"url": redis_server.url, "heartbeat_s": 0.2, "node_ttl_s": 1, "request_timeout_s": 1,
                  "timeout_s": 0.5},
    })

    async def heartbeats_timed():
        f = await scrape(http, gw)
        return sample(f, "gateway_store_command_seconds", "gateway_store_command_seconds_count",
                      op="heartbeat") > 0 and f
    families = await heartbeats_timed() or await until(heartbeats_timed, what="a timed heartbeat")
    errors_before = store_errors(families)
    redis_server.stop()

    async def outage_counted():
        f = await scrape(http, gw)
        return (store_errors(f) > errors_before
                and sample(f, "gateway_store_available", "gateway_store_available") == 0)
    await until(outage_counted, what="a failed store call counted in gateway_store_errors_total")
    redis_server.start()

