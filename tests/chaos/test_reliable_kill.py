"""SIGKILL of a `gateway run` node whose clients run the Python client's reliable
mode (`reliable="require"`). Reliable mode resumes a dropped connection from the
session's retained window only if the session was parked (docs/reliable.md: a
drain, or a drop the node itself noticed). A SIGKILLed node parks nothing: no
detached record, no replay buffer. So what happens is what this test records."""

from __future__ import annotations

import asyncio
import signal

import pytest

from ..clients.test_python_client import BOUND_S, SECRET, Numbered, node_cfg
from ..integration.fleet import Fleet, holds
from ..integration.numbered import contiguous
from ..integration.test_lifecycle import Proc
from .counts import SCALE, Row

N = 3 * SCALE


@pytest.fixture(autouse=True)
def env(monkeypatch):
    monkeypatch.setenv("PYCLIENT_JWT_SECRET", SECRET)   # node_cfg's JWT secret, read by the nodes


def sessions_of(c: Numbered, fleet: Fleet) -> list[str]:
    """The client's sessions at the backend, oldest first."""
    out = []
    for h in fleet.handshakes:
        sid = h["Gateway-Session-Id"]
        if h.get("Gateway-Claim-sub") == c.sub and sid not in out:
            out.append(sid)
    return out


async def test_sigkill_of_a_node_with_reliable_clients(tmp_path, redis_server, http, record_property):
    fleet = Fleet(interval_s=0.005)
    ep = await fleet.endpoint()
    a = Proc(tmp_path, node_cfg("rk-a", redis_server.url, ep.url, reliable=True), "a")
    b = Proc(tmp_path, node_cfg("rk-b", redis_server.url, ep.url, reliable=True), "b")
    try:
        await asyncio.gather(a.ready(http), b.ready(http))
        live = {"a": a}
        hit = [Numbered(f"k{i}", lambda: live["a"].url + "/ws", reliable="require") for i in range(N)]
        spared = [Numbered(f"o{i}", lambda: b.url + "/ws", reliable="require") for i in range(N)]
        for c in hit + spared:
            await c.start()
        await holds(lambda: all(len(c.got) > 20 for c in hit + spared), BOUND_S, "traffic")
        live["a"] = b
        a.p.send_signal(signal.SIGKILL)
        await holds(lambda: all(len(c.rec.opens) >= 2 for c in hit), 40, "the killed node's clients reconnected")
        row = Row(record_property, "SIGKILL of one of two `gateway run` nodes, clients in reliable mode",
                  f"{2 * N} reliable sessions on 2 nodes (Redis), numbered both ways every 3 ms")
        marks = [len(c.got) for c in hit]
        await holds(lambda: all(len(c.got) > m + 10 for c, m in zip(hit, marks)), BOUND_S, "traffic again")
        for c in hit + spared:
            await c.stop_sending()
        fleet.quiet = True
        for c in hit:
            # Nothing was parked: the resume on B is refused (the documented 401 "resume refused"),
            # the client says resume_failed and opens a fresh session at once.
            assert len(c.rec.resume_failures) == 1 and c.rec.resume_failures[0].startswith("resume refused: unknown")
            assert c.rec.opens == [False, False]
            assert c.rec.closes[0][0] is None      # the node vanished: no close frame (1006)
            old, new = sessions_of(c, fleet)
            await holds(lambda: c.client.queued == 0 and len(fleet.got[new]) > 0
                        and int(fleet.got[new][-1][1:]) == c.sent, BOUND_S, f"{c.sub}'s messages arrived")
            # Client -> backend: the old session got a gapless prefix, the new one the
            # unacked tail resent and everything after: none lost, the overlap twice.
            first = contiguous("c", fleet.got[old])
            again = [int(m[1:]) for m in fleet.got[new]]
            assert again == list(range(again[0], c.sent + 1)) and again[0] <= first + 1
            row.add("c", c.sent, fleet.got[old] + fleet.got[new])
            # Backend -> client: the old session's stream up to what was in flight, then
            # the new session's whole (the backend numbers per session).
            cut = next(k for k in range(1, len(c.got)) if c.got[k] == "s1")
            await holds(lambda: len(c.got) - cut >= fleet.sent[new], BOUND_S, f"{c.sub} got the new session's")
            assert contiguous("s", c.got[:cut]) <= fleet.sent[old]
            assert contiguous("s", c.got[cut:]) == fleet.sent[new]
            row.add("s", fleet.sent[old], c.got[:cut])
            row.add("s", fleet.sent[new], c.got[cut:])
        for c in spared:
            (sid,) = sessions_of(c, fleet)
            await holds(lambda: len(fleet.got[sid]) >= c.sent and len(c.got) >= fleet.sent[sid], BOUND_S, "settled")
            assert contiguous("c", fleet.got[sid]) == c.sent
            assert contiguous("s", c.got) == fleet.sent[sid]
            assert c.rec.resume_failures == [] and c.rec.opens == [False]
        row.done("unaffected")
    finally:
        for c in hit + spared:
            await c.client.close()
        a.stop()
        b.stop()
        await ep.stop()
