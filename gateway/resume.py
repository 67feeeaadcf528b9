"""Resume: a drained session's client comes back, on any node, and loses nothing.

The client connects again with `?resume=<token>` (or a `Gateway-Resume`
header) and the same credentials. In order:

1. The credentials are verified (if any), then the token is checked against
   the detached record and the session taken with a lease, in one step
   (store.detached.take): forged, unknown or another subject is
   401; expired or already used is 410; a replay that cannot be whole
   (overflowed, or lost in a Redis failover) is 410 with its reason, so the
   client knows to start over and resynchronise. A buffer still being
   written by the draining node is waited for (SEAL_WAIT_S), then 503.
2. The upstream is dialled again, with the same Gateway-Session-Id and
   `Gateway-Resumed: 1` (HTTP backends: no second connect event; every
   request of a resumed session carries `Gateway-Resumed: 1`). A backend
   that refuses gives the lease back: the client may try again.
3. After the 101 the session takes its channels and subject on this node
   again, with what reaches it held back (`Early`); then `finish` marks the
   session used, hands over its whole buffer and names this node in the
   session's record and index entries, in one atomic step; the buffer goes
   to the client, in order, before anything else, then what was held; then
   the session is registered live and relaying starts.

Nothing is sent to the client before step 3 succeeds, so a resume that
fails half-way can be retried without a message twice. And no publish
falls between the buffer and the live session: one that reads the index
before the finish appends to the buffer (or, answered "gone" because the
finish came first, follows the index to this node: delivery.py); one that
reads it after finds this node, where the session is subscribed already.
"""

from __future__ import annotations

import asyncio
import logging

from . import frames, metrics, reliable, tokens
from .closing import Closing
from .errors import StoreUnavailable, Refusal, TRY_AGAIN_LATER
from .logs import event
from .store import detached as d

log = logging.getLogger("gateway.resume")

LEASE_S = 30.0        # a resume must finish within this, or another node may take the session
SEAL_WAIT_S = 3.0     # how long a resume waits for the draining node to seal the buffer
TAKEOVER_WAIT_S = 2.0  # ... and for a half-open reliable session's node to park it (docs/reliable.md)

_REFUSALS = {
    d.UNKNOWN: (401, "resume refused: unknown session (token forged, or forgotten since)"),
    d.FORGED: (401, "resume refused: the token does not match the session"),
    d.SUBJECT: (401, "resume refused: the session belongs to another subject"),
    d.EXPIRED: (410, "resume refused: the resume window has ended; start a new session"),
    d.USED: (410, "resume refused: the session was resumed already; start a new session"),
    d.OVERFLOWED: (410, "resume refused: the replay buffer overflowed, messages would be missing; "
                        "start a new session and resynchronise"),
    d.LOST: (410, "resume refused: the replay buffer was lost (session store failover or restart), "
                  "messages would be missing; start a new session and resynchronise"),
}


def requested(head) -> str | None:
    """The resume token the request carries, if any."""
    return head.query.get("resume") or head.headers.get("gateway-resume")


def _refuse(status_name: str, retry_after_s: float | None = None) -> Refusal:
    metrics.resume_refusals.labels(status_name).inc()
    if status_name == d.LEASED:
        return Refusal(503, "resume refused: a resume of this session is under way elsewhere; retry",
                       metric="resume_leased", headers=(("Retry-After", str(max(1, round(retry_after_s or 1)))),))
    if status_name == d.PENDING:
        return Refusal(503, "resume refused: the session's previous node is still writing its replay; retry",
                       metric="resume_pending", headers=(("Retry-After", "1"),))
    status, reason = _REFUSALS[status_name]
    return Refusal(status, reason, metric=f"resume_{status_name}")


async def claim(node, raw: str, token: str | None, candidates=None):
    """Check the token and take the session. Returns (route, claims, record).

    `candidates`: the routes the request's path, host, headers and query match; the
    session's own route must be one of them (a token does not carry a session to a
    path it was never routed by)."""
    parsed = tokens.parse(raw)
    if parsed is None:
        raise _refuse(d.FORGED)
    sid, th = parsed
    store = node.cluster.store.detached
    # The credentials first, whatever the route: the store compares the subject
    # (unless the session's route takes no token) in the same step as the take.
    claims = refusal = None
    if token is not None and node.identity.verifier is not None:
        try:
            claims = await node.identity.verify(token)
        except Refusal as r:
            refusal = r
    sub = claims.get("sub") if claims and isinstance(claims.get("sub"), str) else None
    loop = asyncio.get_running_loop()
    wait_until = loop.time() + SEAL_WAIT_S
    taking_over = asked = False
    while True:
        try:
            status, rec = await store.take(sid, th, sub, node.node_id, LEASE_S)
        except StoreUnavailable:
            raise Refusal(503, "resume refused: session store unreachable; retry",
                          metric="resume_store_unavailable", headers=(("Retry-After", "2"),)) from None
        if status in (d.UNKNOWN, d.FORGED) and not asked and refusal is None:
            # Not detached: a reliable session whose old connection still looks alive is let go
            # now. Asked once; a session parked meanwhile is found by the take that follows.
            # FORGED too: a session resumed before holds its previous token's used record
            # until the park after its next drop replaces it, and the token the client has
            # is the one that resume's hello gave (the live session knows it, nobody else).
            asked = True
            taking_over = await node.cluster.delivery.parked.take_over(
                sid, th, sub, None if candidates is None else [c.name for c in candidates])
            wait_until = loop.time() + TAKEOVER_WAIT_S
            continue
        if not (status == d.PENDING or taking_over and status in (d.UNKNOWN, d.FORGED)) \
                or loop.time() >= wait_until:
            break
        await asyncio.sleep(0.05)
    if taking_over and status in (d.UNKNOWN, d.FORGED, d.PENDING):
        metrics.resume_refusals.labels("takeover").inc()
        raise Refusal(503, "resume refused: the session's old connection is still being let go; retry",
                      metric="resume_takeover", headers=(("Retry-After", "1"),))
    if status == d.SUBJECT and refusal is not None:
        raise refusal   # the credentials themselves were refused: say why
    if status != d.OK:
        raise _refuse(status, (rec or {}).get("retry_after_s"))
    route = _route(node, rec.get("route"))
    if route is None:
        await release(node, sid)
        metrics.resume_refusals.labels("route_gone").inc()
        raise Refusal(410, "resume refused: the session's route no longer exists; start a new session",
                      metric="resume_route_gone")
    if candidates is not None and all(c.name != route.name for c in candidates):
        await release(node, sid)
        metrics.resume_refusals.labels("other_route").inc()
        raise Refusal(401, "resume refused: the session belongs to another route", metric="resume_other_route")
    if route.wants_token and claims is None and (refusal is not None or route.needs_token):
        await release(node, sid)
        raise refusal or Refusal(401, "missing token", metric="missing_token")
    return route, (claims if route.wants_token else None), rec


async def reliable_counts(node, rec: dict, route, head, offered: bool):
    """A reliable session's resume, before the 101 (docs/reliable.md): the client
    speaks gateway.reliable.v1 again and says with `last=` how many of the
    gateway's messages it has; the buffer (sealed: `claim` waited) must hold
    every one after that. Returns (the route's reliable config, up, last), or
    raises a Refusal (the handshake gives the lease back)."""
    cfg = route.route.reliable
    if not offered:
        raise Refusal(400, "resume refused: a reliable session resumes with the gateway.reliable.v1 subprotocol",
                      metric="resume_not_reliable")
    if cfg is None:
        raise Refusal(410, "resume refused: the session's route is no longer reliable; start a new session",
                      metric="resume_route_gone")
    last = reliable.parse_last(head.query.get("last"))
    if last is None:
        raise Refusal(400, "resume refused: a reliable session resumes with last=<count>", metric="resume_bad_last")
    try:
        entries = await node.cluster.store.detached.read(rec["session"])
    except StoreUnavailable:
        raise Refusal(503, "resume refused: session store unreachable; retry",
                      metric="resume_store_unavailable", headers=(("Retry-After", "2"),)) from None
    counts = reliable.split_replay(entries)
    if counts is None:
        raise _refuse(d.LOST)
    first, up, data = counts
    reliable.check_last(last, first, first + len(data) - 1)
    return cfg, up, last


def _route(node, name):
    return next((r for r in node.routing.router.routes if r.name == name), None)


async def release(node, sid: str) -> None:
    """Give the lease back (the resume failed before anything reached the client)."""
    try:
        await node.cluster.store.detached.release(sid, node.node_id)
    except StoreUnavailable:
        pass   # the lease runs out by itself


def backend_of(rec: dict, plan, routing) -> str | None:
    """The backend the session had, if the config still has it; else the route's pick."""
    name = rec.get("backend")
    if name is not None and (name in routing.pools or name in routing.sinks):
        return name
    return plan.pick()


class Early:
    """What reaches a resuming session before its replay is out: kept in order, sent
    after the replay (bounded by send_buffer_bytes: past it a message is refused, and
    its publisher told so). `lost`: the client went without a close meanwhile (reliable
    mode: parked once the replay is in the window)."""

    __slots__ = ("items", "size", "limit", "lost")

    def __init__(self, limit: int):
        self.items: list[tuple[int, bytes]] = []
        self.size = 0
        self.limit = limit
        self.lost = False

    def add(self, opcode: int, payload: bytes) -> bool:
        if self.size + len(payload) > self.limit:
            return False
        self.items.append((opcode, payload))
        self.size += len(payload)
        return True

    def add_frame(self, frame: bytes) -> bool:
        m = frames.message(frame)
        return m is not None and self.add(*m)


async def complete(node, s, rec: dict, pending: bytes, leftover: bytes) -> None:
    """After the 101: the replay, then the session goes live (see the module docstring)."""
    sid = s.session_id
    cluster = node.cluster
    resuming = cluster.delivery.resuming
    early = s.early = Early(s.limits.send_buffer_bytes)
    resuming[sid] = s                              # the bus finds it by its session id
    node.resumed(s, rec.get("channels") or ())    # pushes and channel messages reach it again, held
    try:
        entries = await cluster.store.detached.finish(sid, node.node_id, None, cluster.record(s))
    except StoreUnavailable:
        entries = None
    s.early = None
    if resuming.get(sid) is s:
        del resuming[sid]
    gone = s.client.gone or s.client.sent
    if entries is None:
        # Store gone, or the lease ran out and another node has the session: nothing was sent.
        await release(node, sid)
        if early.lost:
            Closing.client_lost(s)
        elif not gone:
            metrics.resume_refusals.labels("finish_failed").inc()
            s.gateway_close(TRY_AGAIN_LATER, "resume failed; retry")
        return
    if gone and not early.lost:
        cluster.forget(s)   # it ended meanwhile: the record the finish wrote is this node's to remove
        return
    if s.rel is not None:
        # Numbered from the buffer's first; what the client has (up to `last`, its
        # window's start) is not sent again, the rest is kept until acked, as live ones.
        first, _, entries = reliable.split_replay(entries) or (0, 0, [])
        skip = s.rel.window.sent - first + 1
        entries = entries[skip:]
        out = [(opcode, payload) for _, opcode, payload in entries] + early.items
        if early.lost:   # into the window only: parked with it below
            for opcode, payload in out:
                s.rel.window.add(opcode, payload)
                s.u_msgs += 1
        else:
            for opcode, payload in out:
                s._to_client(opcode, payload)
    else:
        write = s.transport.write
        for _, opcode, payload in entries:
            write(frames.frame(opcode, payload))
        s.u_msgs += len(entries)
        for opcode, payload in early.items:
            s.send_message(opcode, payload)
    metrics.replayed.inc(len(entries))
    metrics.resumes.inc()
    node.on_open(s)
    event(log, "resumed", conn=s.id, session=sid, replayed=len(entries), from_node=rec.get("node"))
    if early.lost:
        # Cut while its replay was on its way: parked now, the replay in its window.
        if node.drainer is not None and node.drainer.dropped(s):
            if leftover:
                s.capture.feed(leftover)   # what the upstream sent past its 101 is kept too
        else:
            Closing.client_lost(s)
        return
    s.start(pending, leftover)
