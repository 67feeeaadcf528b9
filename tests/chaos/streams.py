"""Numbered sessions through an in-process gateway (fleet.py's endpoints and
clients), and the checks every chaos test makes on them."""

from __future__ import annotations

from ..integration.fleet import BOUND_S, Fleet, holds, numbered_client, stop_sending
from ..integration.numbered import contiguous
from .counts import Row


async def open_clients(http, gw, path: str, n: int):
    out, sids = [], []
    for _ in range(n):
        before = set(gw.node.sessions)
        c = await numbered_client(http, gw.url + path)
        await holds(lambda: set(gw.node.sessions) - before, BOUND_S, "the session is live")
        (conn,) = set(gw.node.sessions) - before
        out.append(c)
        sids.append(gw.node.sessions[conn].session_id)
    return out, sids


async def flowing(cs, more: int = 5) -> None:
    marks = [len(c.got) for c in cs]
    await holds(lambda: all(len(c.got) > m + more for c, m in zip(cs, marks)), BOUND_S, "traffic flows")


async def settle_intact(row: Row | None, clients, fleet: Fleet, sids) -> None:
    """Stop both ways, wait for every message, assert both streams complete and in order."""
    for c in clients:
        await stop_sending(c)
    quiet = fleet.quiet
    fleet.quiet = True
    for c, sid in zip(clients, sids):
        await holds(lambda: len(fleet.got[sid]) >= c.sent, BOUND_S, f"backend got {sid}'s messages")
        await holds(lambda: len(c.got) >= fleet.sent[sid], BOUND_S, f"{sid} got the backend's messages")
        assert contiguous("c", fleet.got[sid]) == c.sent
        assert contiguous("s", c.got) == fleet.sent[sid]
        assert c.closes == [], c.closes
        if row is not None:
            row.add("c", c.sent, fleet.got[sid])
            row.add("s", fleet.sent[sid], c.got)
    fleet.quiet = quiet


def prefixes_only(row: Row, clients, sids, fleet: Fleet) -> None:
    """What arrived is a gapless prefix each way: only what was in flight at the fault
    (written into the dead hop) is lost, nothing before it, nothing twice."""
    for c, sid in zip(clients, sids):
        contiguous("s", c.got)
        contiguous("c", fleet.got[sid])
        row.add("c", c.sent, fleet.got[sid])
        row.add("s", fleet.sent[sid], c.got)
