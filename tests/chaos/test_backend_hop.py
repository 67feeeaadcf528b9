"""Chaos on the hop between the gateway and a websocket backend, made by a TCP
proxy (proxy.py): delay, stall, a reset in the middle of a frame. One route goes
through the proxy, another route to another backend goes direct; the direct one's
sessions must not notice."""

from __future__ import annotations


from ..integration.fleet import BOUND_S, Fleet, close, holds
from .counts import SCALE, Row
from .streams import flowing, open_clients, prefixes_only, settle_intact
from .proxy import ChaosProxy

N = 4 * SCALE          # sessions per route


def two_routes(proxied: str, direct: str, **top) -> dict:
    cfg = {
        "backends": {"p": {"type": "websocket", "endpoints": [proxied]},
                     "d": {"type": "websocket", "endpoints": [direct]}},
        "routes": [{"name": "p", "match": {"path_prefix": "/ws"}, "auth": "none", "backend": "p"},
                   {"name": "d", "match": {"path_prefix": "/other"}, "auth": "none", "backend": "d"}],
    }
    cfg.update(top)
    return cfg


async def setup(gateway, http, **top):
    fleet = Fleet(interval_s=0.005)
    ep_p, ep_d = await fleet.endpoint(), await fleet.endpoint()
    proxy = ChaosProxy(ep_p.port)
    await proxy.start()
    gw = await gateway(two_routes(proxy.url(), ep_d.url, **top))
    pc, ps = await open_clients(http, gw, "/ws", N)
    dc, ds = await open_clients(http, gw, "/other", N)
    await flowing(pc + dc)
    return fleet, proxy, gw, (pc, ps), (dc, ds), (ep_p, ep_d)


async def teardown(proxy, eps, clients) -> None:
    for c in clients:
        await close(c)
    await proxy.stop()
    for ep in eps:
        await ep.stop()


async def test_delay_on_the_backend_hop_loses_nothing(gateway, http, record_property):
    fleet, proxy, gw, (pc, ps), (dc, ds), eps = await setup(gateway, http)
    row = Row(record_property, "TCP proxy delays every chunk gateway<->backend by 50 ms, both ways",
              f"{2 * N} sessions on 2 routes, numbered both ways every 5 ms")
    proxy.mode = "delay"
    await flowing(pc + dc, more=40)
    proxy.mode = "pass"
    await settle_intact(row, pc, fleet, ps)
    await settle_intact(None, dc, fleet, ds)
    row.done("unaffected")
    await teardown(proxy, eps, pc + dc)


async def test_stall_on_the_backend_hop(gateway, http, record_property):
    fleet, proxy, gw, (pc, ps), (dc, ds), eps = await setup(gateway, http, limits={"ping_interval_s": 0.5})
    row = Row(record_property, "TCP proxy drops everything gateway<->backend (no FIN, no RST); keepalive 0.5 s",
              f"{2 * N} sessions on 2 routes, numbered both ways every 5 ms")
    proxy.mode = "stall"
    await holds(lambda: all(c.closes for c in pc), BOUND_S, "the stalled sessions are closed")
    # The keepalive finds the upstream dead: 1011 "upstream failed" at a frame boundary.
    assert [c.closes[0][0] for c in pc] == [1011] * N
    prefixes_only(row, pc, ps, fleet)
    await settle_intact(None, dc, fleet, ds)
    row.done("unaffected")
    await teardown(proxy, eps, pc + dc)


async def test_reset_mid_frame_on_the_backend_hop(gateway, http, record_property):
    fleet, proxy, gw, (pc, ps), (dc, ds), eps = await setup(gateway, http)
    row = Row(record_property, "TCP proxy forwards 3 bytes of a backend frame, then resets both sockets",
              f"{2 * N} sessions on 2 routes, numbered both ways every 5 ms")
    proxy.mode = "reset"
    await holds(lambda: all(c.closes for c in pc), BOUND_S, "the reset sessions are closed")
    # Half a frame was already relayed, so no close frame can follow it (closing.py):
    # the client's socket is cut, 1006, as the backend's was.
    assert [c.closes[0][0] for c in pc] == [1006] * N
    assert proxy.resets >= N
    prefixes_only(row, pc, ps, fleet)
    await settle_intact(None, dc, fleet, ds)
    row.done("unaffected")
    await teardown(proxy, eps, pc + dc)
