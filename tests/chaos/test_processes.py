"""Gateway processes killed under traffic: a whole node (`gateway run`) by SIGKILL,
and one worker of a `workers: 2` node. A SIGKILLed process parks nothing and sends no
close frame: its clients see 1006 and reconnect elsewhere, its upstreams see the
socket end; what is lost is exactly what was in flight (each stream that arrived is a
gapless prefix of what was sent). The other node's (worker's) sessions carry on."""

from __future__ import annotations

import asyncio
import os
import signal

from ..conftest import proxy_config
from ..integration.fleet import BOUND_S, Fleet, close, holds, numbered_client
from ..integration.numbered import contiguous
from ..integration.test_lifecycle import Proc
from .counts import SCALE, Row
from .streams import flowing, settle_intact

N = 4 * SCALE


async def open_numbered(http, url: str, fleet: Fleet, n: int):
    """`n` numbered clients of `url` and their session ids, as the backend saw them."""
    out, sids = [], []
    for _ in range(n):
        seen = len(fleet.handshakes)
        c = await numbered_client(http, url)
        await holds(lambda: len(fleet.handshakes) > seen, BOUND_S, "the upstream is open")
        sid = fleet.handshakes[seen]["Gateway-Session-Id"]
        await holds(lambda: fleet.open[sid], BOUND_S, "the upstream is open")
        out.append(c)
        sids.append(sid)
    return out, sids


def killed_streams(row: Row, clients, sids, fleet: Fleet) -> None:
    """Each stream of a killed session arrived as a gapless prefix: only the tail that
    was in flight when the process died is missing, nothing twice."""
    for c, sid in zip(clients, sids):
        assert [code for code, _ in c.closes] == [1006], c.closes
        contiguous("s", c.got)
        contiguous("c", fleet.got[sid])
        assert not fleet.open[sid], "the backend still holds the dead node's upstream"
        row.add("c", c.sent, fleet.got[sid])
        row.add("s", fleet.sent[sid], c.got)


async def test_sigkill_of_a_node_under_traffic(tmp_path, http, record_property):
    fleet = Fleet(interval_s=0.005)
    ep = await fleet.endpoint()
    a, b = Proc(tmp_path, proxy_config(ep.url), "a"), Proc(tmp_path, proxy_config(ep.url), "b")
    try:
        await asyncio.gather(a.ready(http), b.ready(http))
        ac, asids = await open_numbered(http, a.url + "/ws", fleet, N)
        bc, bsids = await open_numbered(http, b.url + "/ws", fleet, N)
        await flowing(ac + bc, more=20)
        row = Row(record_property, "SIGKILL of one of two `gateway run` nodes (plain mode, no close frame)",
                  f"{2 * N} sessions on 2 nodes, numbered both ways every 5 ms")
        a.p.send_signal(signal.SIGKILL)
        await holds(lambda: all(c.closes for c in ac), BOUND_S, "the killed node's clients see the drop")
        await holds(lambda: not any(fleet.open[s] for s in asids), BOUND_S, "the backend sees the upstreams end")
        for c in ac:
            c.stop.set()
            await c.sender
        killed_streams(row, ac, asids, fleet)
        # They reconnect to the other node: new sessions (nothing was parked), whole streams.
        rc, rsids = await open_numbered(http, b.url + "/ws", fleet, N)
        await flowing(rc + bc)
        await settle_intact(row, rc, fleet, rsids)
        await settle_intact(None, bc, fleet, bsids)
        row.done("unaffected")
        for c in rc + bc:
            await close(c)
    finally:
        a.stop()
        b.stop()
        await ep.stop()


def worker_of(pids: list[int], gateway_port: int, client_port: int) -> int:
    """The worker holding the gateway's end of the client's TCP connection (by its socket inode)."""
    want = f":{gateway_port:04X}", f":{client_port:04X}"
    inode = None
    with open("/proc/net/tcp") as f:
        for line in f.readlines()[1:]:
            cols = line.split()
            if cols[1].endswith(want[0]) and cols[2].endswith(want[1]):
                inode = cols[9]
    assert inode is not None, "connection not in /proc/net/tcp"
    for pid in pids:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            try:
                if os.readlink(f"/proc/{pid}/fd/{fd}") == f"socket:[{inode}]":
                    return pid
            except OSError:
                continue
    raise AssertionError("no worker holds the connection")


async def test_sigkill_of_one_worker_under_traffic(tmp_path, http, record_property):
    fleet = Fleet(interval_s=0.005)
    ep = await fleet.endpoint()
    p = Proc(tmp_path, proxy_config(ep.url, workers=2), "w")
    try:
        await p.ready(http)

        def event(name):
            return [e for e in p.logs() if e["event"] == name]
        await holds(lambda: len(event("started")) == 2, BOUND_S * 3, "both workers started")
        pids = event("supervisor_started")[0]["pids"]
        # Enough sessions that both workers hold some (the kernel spreads them; bounded tries).
        cs, sids, owner = [], [], []
        for _ in range(40 * SCALE):
            (c,), (sid,) = await open_numbered(http, p.url + "/ws", fleet, 1)
            cs.append(c)
            sids.append(sid)
            owner.append(worker_of(pids, p.port, c.ws.get_extra_info("sockname")[1]))
            if len(cs) >= 2 * N and len(set(owner)) == 2 and min(owner.count(x) for x in pids) >= N // 2:
                break
        assert set(owner) == set(pids), "the kernel put every session on one worker"
        await flowing(cs, more=20)
        victim = pids[0]
        row = Row(record_property, "SIGKILL of one worker of a `workers: 2` node",
                  f"{len(cs)} sessions over 2 workers, numbered both ways every 5 ms")
        os.kill(victim, signal.SIGKILL)
        hit = [i for i, o in enumerate(owner) if o == victim]
        spared = [i for i, o in enumerate(owner) if o != victim]
        await holds(lambda: all(cs[i].closes for i in hit), BOUND_S, "the killed worker's clients see the drop")
        await holds(lambda: not any(fleet.open[sids[i]] for i in hit), BOUND_S, "the backend sees them end")
        for i in hit:
            cs[i].stop.set()
            await cs[i].sender
        killed_streams(row, [cs[i] for i in hit], [sids[i] for i in hit], fleet)
        # The supervisor restarts it; a new connection is served (by either worker).
        await holds(lambda: event("worker_restarted"), BOUND_S, "the supervisor restarted the worker")
        rc, rsids = await open_numbered(http, p.url + "/ws", fleet, len(hit))
        await flowing(rc + [cs[i] for i in spared])
        await settle_intact(row, rc, fleet, rsids)
        await settle_intact(None, [cs[i] for i in spared], fleet, [sids[i] for i in spared])
        record_property("sessions_on_killed_worker", len(hit))
        row.done("unaffected")
        for c in rc + [cs[i] for i in spared]:
            await close(c)
    finally:
        p.stop()
        await ep.stop()
