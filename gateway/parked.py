"""Delivery's side of parked sessions (drained, or dropped in reliable mode): what is
sent to one goes to its replay buffer in the store (see store/detached.py), counted as
delivered, or follows it to the node that has just resumed it; what went to one still
being parked here is in the store before its sender is answered; and a reliable
session's half-open connection is cut for its client's resume (take_over)."""

from __future__ import annotations

import hmac
import logging

from . import metrics
from .errors import StoreUnavailable
from .logs import event
from .session import State
from .store.detached import DETACHED_NODE

log = logging.getLogger("gateway.cluster")


class Parked:
    """Delivery's side of detached sessions: find one, buffer for it, follow it."""

    def __init__(self, delivery):
        self.delivery = delivery
        self.store = delivery.store
        self.node = delivery.node

    async def find(self, any_id: str) -> dict | None:
        """The detached record of a drained session, by session or connection id."""
        det = await self.store.detached.get(any_id)
        if det is None:
            sid = await self.store.session_of_connection(any_id)
            if sid is not None and sid != any_id:
                det = await self.store.detached.get(sid)
        return det

    async def append(self, sids, opcode: int, payload: bytes) -> tuple[int, int, list[str]]:
        """Append to detached sessions' replay buffers: (kept, full: not kept, the sessions
        that are not detached any more: resumed, or ended)."""
        cfg = self.node.config.drain
        kept = full = 0
        gone = []
        for sid in sids:
            added, status = await self.store.detached.append(sid, [(opcode, payload)], cfg.replay_max_messages,
                                                             cfg.replay_max_bytes)
            if added:
                kept += 1
                metrics.replay_buffered.labels("api").inc()
            elif status == "full":
                full += 1
                metrics.replay_overflows.inc()
            else:
                gone.append(sid)
        return kept, full, gone

    async def captured(self, sessions, skip=None) -> None:
        """Until what went to the captures of any of `sessions` (this node's, draining or
        dropped; not those in `skip`, sent to another way) is in the store. A publisher
        is answered after that: its next message, which finds the session parked and goes
        to the replay buffer straight away, cannot overtake this one, still on its way
        there from the capture."""
        drainer = self.node.drainer
        if drainer is None or not drainer.captures or not sessions:
            return
        for capture in [c for c in drainer.captures if c.s in sessions and not (skip and c.sid in skip)]:
            await capture.flushed()

    async def to_parked(self, index: dict, out: dict, opcode: int, payload: bytes, where) -> None:
        """What goes to the sessions `index` names as detached (node ""): their replay
        buffers, counted in the answer. One answered "gone" was resumed since the index
        was read: the resume's finish named the new node in the index in the same step
        as it took the buffer (store.detached.finish), so `where()` (the index read
        again) says where it is now, and it is sent there before this publish is
        answered: the sender's next message cannot overtake it. Parked again meanwhile
        (a drop at once after the resume): its new buffer. Ended: no one to send to."""
        sids = [sid for sid, node in index.items() if node == DETACHED_NODE]
        if not sids:
            return
        out["buffered"] = 0
        for _ in range(3):   # each round, a resume of the session came between; bounded all the same
            kept, full, gone = await self.append(sids, opcode, payload)
            out["delivered"] += kept
            out["buffered"] += kept
            if full:
                out["buffer_full"] = out.get("buffer_full", 0) + full
            if not gone:
                return
            now = await where()
            sids = []
            for sid in gone:
                node = now.get(sid)
                if node == DETACHED_NODE:
                    sids.append(sid)
                elif node is not None:
                    out["delivered"] += await self._to_session(node, sid, opcode, payload, out)
            if not sids:
                return

    async def _to_session(self, node: str, sid: str, opcode: int, payload: bytes, out: dict) -> int:
        """One message to session `sid` on `node`: 1 when it took it."""
        d = self.delivery
        if node == d.node_id:
            s = d.local(sid)
            return 1 if s is not None and s.send_message(opcode, payload) else 0
        answers, missing = await d._ask([node], {"op": "conn", "id": sid, "opcode": opcode}, payload)
        if missing:
            out["unconfirmed_nodes"] = sorted(set(out.get("unconfirmed_nodes", ())) | set(missing))
        return answers.get(node, {}).get("n", 0)

    async def take_over(self, sid: str, token_hash: str, sub: str | None = None, routes=None) -> bool:
        """A reliable session's client resumes while its old connection still looks
        alive (half-open, docs/reliable.md): the node holding it drops that connection
        now, which parks the session as a real drop does. True when a node did; the
        resume then waits for the seal. `token_hash`: of the hello's token, which only
        that node knows, so nobody else can have a live session cut; and the resume's
        subject `sub` and the `routes` its request matched, which must be the session's
        (SECURITY.md: a token in another subject's hands cuts nothing)."""
        d = self.delivery
        routes = None if routes is None else list(routes)
        s = self.holding(sid)
        if s is not None:
            return self.drop_here(s, token_hash, sub, routes)
        try:
            rec = await d._where(sid)
            if rec is not None and rec.get("node") not in (None, DETACHED_NODE, d.node_id):
                nodes = {rec["node"]}
            else:
                nodes = await d._other_nodes()   # its live record may not be written yet: ask every node
            answers, _ = await d._ask(nodes, {"op": "takeover", "id": sid, "th": token_hash, "sub": sub,
                                              "routes": routes})
        except StoreUnavailable:
            return False
        return any(a.get("n") for a in answers.values())

    def holding(self, sid: str):
        """This node's session `sid`, live or being parked (its record not written yet)."""
        s = self.delivery.local(sid)
        if s is None:
            drainer = self.node.drainer
            s = next((c.s for c in (drainer.captures if drainer is not None else ()) if c.sid == sid), None)
        return s

    @staticmethod
    def drop_here(s, token_hash: str, sub: str | None = None, routes=None) -> bool:
        """True when the resume should wait for `s` to be parked (it is, or will be now)."""
        rel = s.rel if s is not None else None
        if rel is None or not hmac.compare_digest(rel.token_hash, token_hash):
            return False
        if s.route is not None and (s.route.wants_token and (s.sub or "") != (sub or "")
                                    or routes is not None and s.route.name not in routes):
            return False   # the take that follows refuses it (401): nothing to cut
        if s.capture is not None:
            return True    # dropped already, its record on the way: the resume waits for it
        if s.state is not State.OPEN:
            return False
        event(log, "reliable_takeover", conn=s.id, session=s.session_id)
        s.transport.abort()   # its connection_lost parks it (drain.Drainer.dropped)
        return True
