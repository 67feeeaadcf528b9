"""This node's place in the cluster: its records in the store, its heartbeat,
the reaper of dead nodes, and what it does while the store is down. What
crosses to other nodes (pushes, joins, closes) is gateway/delivery.py.

Nothing here runs per relayed message. Session opens, closes, joins and
leaves are queued as store ops and written in one batch every few
milliseconds; the node record is written every heartbeat, and the session
records' TTLs are refreshed in one pipeline every session_ttl_s / 3.

A message for sessions on other nodes crosses the store's bus once per node
that has a recipient (never once per recipient); each node delivers to its
own sessions from its own indexes and answers with its count, so the
`delivered` figure is the cluster's. A node that does not answer within
redis.request_timeout_s is named in `unconfirmed_nodes`, never counted as 0
silently.

While the store is unreachable sessions keep relaying; nothing is queued
for it (the op queue is dropped and the node marked dirty), and when the
store returns the node rewrites its node record and every session record it
holds (`Store.resync`), so what an outage costs is bounded by the node's own
state, not by the outage's length.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from . import metrics, reattach
from .config import Redis
from .delivery import Delivery
from .errors import StoreUnavailable
from .logs import event
from .store import Delete, Leave, Put

log = logging.getLogger("gateway.cluster")

FLUSH_DELAY_S = 0.005        # coalesce store writes for this long
MAX_PENDING_OPS = 100_000    # past this the queue is dropped and the node resyncs
MAX_BACKOFF_S = 5.0


class LostSession:
    """A session of a dead node, rebuilt from its record, for its disconnect event."""

    __slots__ = ("id", "session_id", "route", "ip", "claims", "sub", "sink_state", "close_code",
                 "close_reason", "closer")

    class _Route:
        __slots__ = ("name",)

        def __init__(self, name: str):
            self.name = name

    def __init__(self, rec: dict, why: str = "gateway node lost", code: int = 1006):
        self.id = rec.get("connection") or rec["session"]
        self.session_id = rec["session"]
        self.route = self._Route(rec.get("route") or "")
        self.ip = rec.get("ip") or ""
        self.claims = rec.get("claims") or {}
        self.sub = rec.get("sub")
        self.sink_state = None
        self.close_code = code
        self.close_reason = why
        self.closer = "gateway"


class Cluster:
    def __init__(self, node, store, settings: Redis | None):
        self.node = node
        self.store = store
        self.settings = settings or Redis()
        self.node_id = node.node_id
        self.by_session: dict[str, object] = {}     # session id -> local session
        self.started_at = time.time()
        self._ops: list = []
        self._wake = asyncio.Event()
        self._write_lock = asyncio.Lock()
        self._tasks: list[asyncio.Task] = []
        self.dirty = False          # the store may not hold what this node holds: resync
        self.store_down = False
        self.last_heartbeat = 0.0
        self._mismatches = 0
        self.delivery = Delivery(self)   # what crosses to other nodes: pushes, joins, closes

    # ------------------------------------------------------------ lifecycle
    async def start(self) -> None:
        metrics.store_available.set(1)
        await self.store.start()
        await self.store.listen(self.node_id, self.delivery.on_bus)
        self._tasks = [asyncio.ensure_future(self._writer()), asyncio.ensure_future(self._heartbeats()),
                       asyncio.ensure_future(self.delivery.outbox_loop())]

    async def stop(self) -> None:
        """Write what is queued, take this node out of the store, stop."""
        for t in self._tasks:
            t.cancel()
        if self._tasks:
            # Bounded: a task inside a Redis call that is failing over may take
            # a while to notice its cancellation; exiting does not wait on it.
            _, pending = await asyncio.wait(self._tasks, timeout=2)
            if pending:
                event(log, "cluster_stop_timeout", logging.WARNING, tasks=len(pending))
        try:
            await asyncio.wait_for(self._flush_and_leave(), 5)
        except (StoreUnavailable, asyncio.TimeoutError):
            pass
        await self.store.close()

    async def _flush_and_leave(self) -> None:
        await self._flush()
        await self.store.forget_node(self.node_id)

    # ------------------------------------------------------------ records
    def record(self, s) -> dict:
        route = s.route
        plan = self.node.routing.plans.get(route.name) if route is not None else None
        disconnect = getattr(plan.disconnect, "name", None) if plan is not None and plan.disconnect else None
        claims = s.claims or {}
        forward = self.node.routing.forward_claims
        return {
            "session": s.session_id,
            "connection": s.id,
            "node": self.node_id,
            "route": route.name if route is not None else None,
            "sub": s.sub,
            "ip": s.ip,
            "endpoint": s.endpoint.url if s.endpoint is not None else None,
            "backend": getattr(s.sink, "name", None) if s.endpoint is None else None,
            "channels": sorted(s.channels or ()),
            "state": "connected",
            "opened_at": round(time.time() - (time.monotonic() - s.started), 3),
            "claims": {k: claims[k] for k in forward if k in claims},
            "events": {"disconnect": disconnect} if disconnect else None,
        }

    def opened(self, s) -> None:
        self.by_session[s.session_id] = s
        self._queue(Put(self.record(s)))

    def closed(self, s) -> None:
        if s.capture is not None:
            return   # drained: its detached record replaced the live one (detached())
        if self.by_session.get(s.session_id) is not s:
            return   # never live here (a resume that failed): what the store has is not this node's
        del self.by_session[s.session_id]
        self.forget(s)

    def forget(self, s) -> None:
        """`s` ended: its record and index entries go."""
        self._queue(Delete(session=s.session_id, node=self.node_id, sub=s.sub))

    def detached(self, s) -> None:
        """The session's detached record is in the store: it is no longer this
        node's to refresh, re-write or delete."""
        self.by_session.pop(s.session_id, None)

    # Channels observer: called by node.channels on every change.
    # Only for the session object that is live here: a drained one leaving its channels
    # late (server.unsubscribe) must not touch the record of its resumed self.
    def joined(self, s, name: str) -> None:
        if self.by_session.get(s.session_id) is s:
            self._queue(Put(self.record(s)))

    def left(self, s, name: str) -> None:
        if self.by_session.get(s.session_id) is s:
            self._queue(Leave(session=s.session_id, channel=name))
            if s.channels:
                self._queue(Put(self.record(s)))

    def _queue(self, op) -> None:
        if self.dirty:
            return  # the resync will write the node's whole state
        if len(self._ops) >= MAX_PENDING_OPS:
            self._ops.clear()
            self.dirty = True
            event(log, "store_queue_dropped", logging.WARNING, max_ops=MAX_PENDING_OPS)
            return
        self._ops.append(op)
        self._wake.set()

    @staticmethod
    def compact(ops: list) -> list:
        """Per session: a Delete supersedes everything before it; otherwise its
        Leaves in order, then its last Put."""
        by_sid: dict[str, list] = {}
        for op in ops:
            sid = op.record["session"] if isinstance(op, Put) else op.session
            by_sid.setdefault(sid, []).append(op)
        out = []
        for seq in by_sid.values():
            last = seq[-1]
            if isinstance(last, Delete):
                out.append(last)
                continue
            puts = [op for op in seq if isinstance(op, Put)]
            out += [op for op in seq if not isinstance(op, Put)]
            if puts:
                out.append(puts[-1])
        return out

    async def _writer(self) -> None:
        while True:
            await self._wake.wait()
            await asyncio.sleep(FLUSH_DELAY_S)
            self._wake.clear()
            try:
                await self._flush()
            except StoreUnavailable:
                self._store_failed()

    async def _flush(self) -> None:
        async with self._write_lock:
            if not self._ops:
                return
            ops = self.compact(self._ops)
            self._ops = []
            await self.store.write(ops)

    async def flush_now(self) -> None:
        """Write what is queued before answering: an API change is in the store
        when its answer leaves, so the next call on any node sees it."""
        try:
            await self._flush()
        except StoreUnavailable:
            self._store_failed()

    def _store_failed(self) -> None:
        self._ops.clear()
        self.dirty = True
        if not self.store_down:
            self.store_down = True
            metrics.store_available.set(0)
            event(log, "store_unavailable", logging.ERROR, node=self.node_id)

    def node_record(self) -> dict:
        node = self.node
        return {
            "id": self.node_id,
            "state": "draining" if node.draining else "ready",
            "sessions_left": node.drainer.left if node.draining and node.drainer is not None else None,
            "connections": len(node.sessions),
            "channels": len(node.channels.members),
            "pid": os.getpid(),
            "started_at": round(self.started_at, 3),
            "heartbeat_at": round(time.time(), 3),
        }

    async def _heartbeats(self) -> None:
        st = self.settings
        refresh_every = st.session_ttl_s / 3
        next_refresh = time.monotonic() + refresh_every
        backoff = 0.1
        while True:
            try:
                if self.dirty:
                    await self._resync()
                refresh = None
                now = time.monotonic()
                if now >= next_refresh:
                    refresh = (list(self.by_session), st.session_ttl_s)
                    next_refresh = now + refresh_every
                await self.store.heartbeat(self.node_record(), st.node_ttl_s, refresh=refresh)
                self.last_heartbeat = time.monotonic()
                if self.store_down:
                    self.store_down = False
                    metrics.store_available.set(1)
                    event(log, "store_available", node=self.node_id)
                backoff = 0.1
                await self._self_check()
                await self._reap()
                await reattach.refresh_draining(self.node, self.store)   # endpoint drains missed on the bus
                await self._expire_detached()
                await asyncio.sleep(st.heartbeat_s)
            except StoreUnavailable:
                self._store_failed()
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, MAX_BACKOFF_S, st.heartbeat_s)
            except asyncio.CancelledError:
                raise
            except Exception:
                log.exception("heartbeat failed", extra={"fields": {"event": "heartbeat_error"}})
                await asyncio.sleep(st.heartbeat_s)

    async def _self_check(self) -> None:
        """Does the store hold as many sessions for this node as it has? Records
        can be lost behind the node's back: a Sentinel failover (replication is
        asynchronous), a FLUSHALL, or other nodes reaping this one during a
        network partition. Two mismatches in a row (one may be a batch in
        flight) and the node rewrites its records."""
        if self._ops or self.dirty:
            self._mismatches = 0
            return
        held = await self.store.node_session_count(self.node_id)
        if held == len(self.by_session):
            self._mismatches = 0
            return
        self._mismatches += 1
        if self._mismatches >= 2:
            event(log, "store_out_of_step", logging.WARNING, node=self.node_id, store_holds=held,
                  node_holds=len(self.by_session))
            self._mismatches = 0
            self.dirty = True

    async def _resync(self) -> None:
        async with self._write_lock:
            self._ops.clear()
            self.dirty = False
            records = [self.record(s) for s in self.by_session.values()]
            try:
                await self.store.resync(self.node_id, records)
            except StoreUnavailable:
                self.dirty = True
                raise
        metrics.store_resyncs.inc()
        event(log, "store_resynced", node=self.node_id, sessions=len(records))

    # ------------------------------------------------------------ dead nodes
    async def _reap(self) -> None:
        st = self.settings
        for dead in await self.store.expired_nodes(st.node_ttl_s):
            if dead == self.node_id:
                continue
            # One node cleans up; the claim outlives the work by a margin.
            if not await self.store.claim(f"reap:{dead}", max(30.0, st.node_ttl_s * 2)):
                continue
            sids = await self.store.node_sessions(dead)
            events = 0
            for sid in sids:
                rec = await self.store.take_session(sid)
                if rec is not None and self._send_lost_disconnect(rec):
                    events += 1
            await self.store.forget_node(dead)
            metrics.nodes_reaped.labels("nodes").inc()
            metrics.nodes_reaped.labels("sessions").inc(len(sids))
            event(log, "node_reaped", logging.WARNING, dead_node=dead, sessions=len(sids), disconnects=events)

    async def _expire_detached(self) -> None:
        """Detached sessions whose resume window ended: one node (expire() gives
        each record to one caller) sends their disconnect event."""
        for sid in await self.store.detached.due(500):
            rec = await self.store.detached.expire(sid)
            if rec is None:
                continue
            metrics.detached_expired.inc()
            sent = self._send_lost_disconnect(rec, "resume window ended", 1012)
            event(log, "detached_expired", session=sid, disconnect_event=sent)

    def _send_lost_disconnect(self, rec: dict, why: str = "gateway node lost", code: int = 1006) -> bool:
        """The disconnect event of a session whose node died. take_session gave
        this record to exactly one node, so the event goes out once."""
        backend = (rec.get("events") or {}).get("disconnect")
        sink = self.node.routing.sinks.get(backend) if backend else None
        if sink is None or not hasattr(sink, "disconnect"):
            return False
        sink.disconnect(LostSession(rec, why, code))
        return True

    async def nodes(self) -> list[dict]:
        out = []
        for rec, age in await self.store.nodes():
            if rec is None:
                continue   # expired: the reaper takes it out of the set
            if rec.get("id") == self.node_id:
                rec = self.node_record()   # this node's own figures are current, not a heartbeat old
            rec = {k: v for k, v in rec.items() if k not in ("v", "kind")}
            rec["heartbeat_age_s"] = round(max(0.0, age), 3)
            out.append(rec)
        if not any(r["id"] == self.node_id for r in out):
            # This node answers for itself even when the store has not seen it yet.
            mine = self.node_record()
            mine["heartbeat_age_s"] = None
            mine["store"] = "unreachable" if self.store_down else "pending"
            out.append(mine)
        out.sort(key=lambda r: r["id"])
        return out

    def refuses_new(self) -> bool:
        """redis.on_outage: reject_new, and the store is down: new sessions get 503."""
        return self.store_down and self.settings.on_outage == "reject_new"

