"""Draining a node, or some of its sessions, so that no message is lost.

The node drain (SIGTERM, `gateway drain`, POST /v1/drain; DESIGN 7):

1. /readyz answers 503 at once; for drain.announce_s new upgrades are still
   accepted (load balancers take a while to stop sending them), then they
   are refused with 503 and Retry-After.
2. The sessions are detached in batches, drain.rate_per_s on average, with
   jitter so that clients do not all come back at once. For each batch the
   detached records (state, token hash, subject, route, endpoint, channels)
   are written to the store in one round trip, and only then does each
   client get its close: drain.close_code (1012) with `resume=<token>`.
3. From that close on, what was meant for the client goes to its replay
   buffer (replay.py); the client's own frames still reach the upstream
   until its close comes back; then the upstream is closed and the buffer
   sealed.
4. The node exits when every session has ended and every buffer is sealed,
   or at drain.timeout_s (counted from the end of the announce).

With the in-process store (no `redis:`) nothing outlives the process, so a
node drain closes sessions with drain.close_code and no token, as a plain
graceful shutdown; `detach()` (a reload) still offers resume on the node.

`detach()` is step 2-3 for any list of sessions: a reload uses it for the
sessions whose route was removed.
"""

from __future__ import annotations

import asyncio
import logging
import random

from . import metrics, tokens
from .errors import StoreUnavailable
from .logs import event
from .replay import Capture
from .session import Link, State
from .store.detached import Parked

log = logging.getLogger("gateway.drain")

BATCHES_PER_S = 10


def detachable(s) -> bool:
    """Open, not closing, not already draining, not still resuming (its replay on its
    way), and not in the middle of a move to another upstream (reattach): those are
    taken on the next pass."""
    return (s.state is State.OPEN and not s.client.sent and s.capture is None and s.early is None
            and s.move is None
            and s.upstream.link is Link.ATTACHED and not (s.redial is not None and s.redial.busy()))


class Drainer:
    def __init__(self, node, cluster):
        self.node = node
        self.cluster = cluster
        self.captures: set[Capture] = set()
        self.started = False
        self.left = 0

    # ------------------------------------------------------------ sessions
    async def detach(self, sessions, deadline: float | None = None) -> int:
        """Write these sessions' detached records, then close their clients with
        a resume token. Returns how many were detached."""
        node, cluster = self.node, self.cluster
        cfg = node.config.drain
        loop = node.loop
        live = [s for s in sessions if detachable(s)]
        if not live:
            return 0
        if deadline is None:
            deadline = loop.time() + cfg.timeout_s
        issued = []
        items = []
        for s in live:
            token, th = tokens.new(s.session_id)
            issued.append((s, token, th))
            items.append(self._parked(s, th))
        # Ops queued for these sessions land first, so none overwrites its detached record.
        await cluster.flush_now()
        try:
            await cluster.store.detached.park(items)
        except StoreUnavailable:
            # Nowhere to keep them: close without a resume. Said, and counted.
            event(log, "drain_without_resume", logging.ERROR, sessions=len(live), why="session store unreachable")
            metrics.resume_refusals.labels("store_unreachable_at_drain").inc(len(live))
            for s in live:
                s.gateway_close(cfg.close_code, "going away")
            return 0
        detached = 0
        for s, token, th in issued:
            if s.state is not State.OPEN or s.client.sent:
                # It ended while its record was written: that record must not wait for a resume.
                asyncio.ensure_future(self._forget(s, th))
                continue
            cluster.detached(s)
            s.drain(self._capture(s, deadline), cfg.close_code, tokens.reason(token))
            detached += 1
        return detached

    def _parked(self, s, th: str) -> Parked:
        """The detached record of `s`, resumable with the token whose hash is `th`."""
        rec = self.cluster.record(s)
        rec["state"] = "detached"
        rec["backend"] = s.backend
        if s.rel is not None:
            rec["reliable"] = 1   # its replay ends with its counts (replay.Capture.end)
        return Parked(rec, th, self.node.config.drain.resume_window_s, check_subject=s.route.wants_token)

    def _capture(self, s, deadline: float) -> Capture:
        capture = Capture(s, self.cluster.store.detached, self.node.config.drain, s.limits.max_message_bytes,
                          deadline)
        self.captures.add(capture)
        capture.done.add_done_callback(lambda _f, c=capture: self.captures.discard(c))
        return capture

    def dropped(self, s) -> bool:
        """A reliable session's client went without a close (docs/reliable.md): park it
        as `detach` does, resumable with its hello's token, and keep what the client
        missed. False when it cannot be (closing already, mid-move): it ends as usual."""
        if s.client.received or not detachable(s):
            return False
        self.cluster.detached(s)
        capture = self._capture(s, self.node.loop.time() + self.node.config.drain.timeout_s)
        capture.after(self._park_dropped(s, self._parked(s, s.rel.token_hash)))
        s.dropped(capture)
        event(log, "reliable_dropped", conn=s.id, session=s.session_id, unacked=len(s.rel.window))
        return True

    async def _park_dropped(self, s, item: Parked) -> bool:
        try:
            await self.cluster.flush_now()
            await self.cluster.store.detached.park([item])
            return True
        except StoreUnavailable:
            event(log, "drop_without_resume", logging.ERROR, session=s.session_id, why="session store unreachable")
            metrics.resume_refusals.labels("store_unreachable_at_drop").inc()
            return False

    async def _forget(self, s, th: str) -> None:
        store = self.cluster.store.detached
        try:
            await store.append(s.session_id, [], 0, 0, seal=True)
            status, _ = await store.take(s.session_id, th, s.sub, self.cluster.node_id, 5.0)
            if status == "ok":
                await store.finish(s.session_id, self.cluster.node_id, None)
        except StoreUnavailable:
            pass   # it expires with its window

    # ------------------------------------------------------------ the node
    async def run(self) -> None:
        """The whole node drain; returns when the node may exit."""
        node = self.node
        cfg = node.config.drain
        loop = node.loop
        self.started = True
        node.draining = True
        metrics.draining.set(1)
        event(log, "drain_started", node=node.node_id, sessions=len(node.sessions), announce_s=cfg.announce_s,
              timeout_s=cfg.timeout_s)
        if cfg.announce_s:
            await asyncio.sleep(cfg.announce_s)
        node.refusing = True
        deadline = loop.time() + cfg.timeout_s
        # The in-process store ends with this process: a token would lead nowhere,
        # so sessions are closed (their disconnect events sent) as without resume.
        resumable = self.cluster.store.outlives_process
        batch = max(1, int(cfg.rate_per_s / BATCHES_PER_S))
        detached = 0
        while loop.time() < deadline:
            # Again until none is left: a handshake under way when refusing began goes live later.
            open_ = [s for s in list(node.sessions.values()) if s.state is State.OPEN and s.capture is None]
            if not open_:
                break
            todo = [s for s in open_ if detachable(s)]
            if not todo:
                await asyncio.sleep(0.02)   # only sessions mid-move: they are taken once it is done
                continue
            self.left = len(todo)
            metrics.drain_left.set(self.left)
            for i in range(0, len(todo), batch):
                if loop.time() >= deadline:
                    break
                if resumable:
                    detached += await self.detach(todo[i:i + batch], deadline)
                else:
                    for s in todo[i:i + batch]:
                        s.gateway_close(cfg.close_code, "going away")
                self.left = max(0, len(todo) - i - batch)
                metrics.drain_left.set(self.left)
                if i + batch < len(todo):
                    await asyncio.sleep(random.uniform(0.5, 1.5) / BATCHES_PER_S)
        # Every session ended (client closed, upstream closed) and every buffer sealed.
        while loop.time() < deadline and (node.sockets or self.captures):
            await asyncio.sleep(0.02)
        self.left = len(node.sessions)
        metrics.drain_left.set(self.left)
        unsealed = len(self.captures)
        event(log, "drain_done", node=node.node_id, detached=detached, sessions_left=len(node.sessions),
              buffers_unsealed=unsealed, timed_out=loop.time() >= deadline)
