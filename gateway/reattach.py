"""Reattach (DESIGN 7, backend rolling updates): a session whose upstream
endpoint goes away moves to another endpoint of its backend, and the client's
WebSocket never closes.

For backends with `on_upstream_close: reattach`, a session moves when its
endpoint

- closes it with 1001 or 1012 (the closing hook in closing.py calls
  `Redial.upstream_closed`): the close is answered, the client never sees it,
  its frames wait in a hold (over send_buffer_bytes: 1013) until a new
  upstream is dialled;
- fails its active health checks, is removed from the config on reload, or is
  drained through the API (`move_off`): make before break, the new upstream
  is dialled first, the old one is let go when both streams are past it.

The new upstream is dialled like the first one (same target and headers,
the same Gateway-Session-Id and Gateway-Connection-Id) plus
`Gateway-Resumed: 1`, never to the endpoint being left nor to a draining one.
When no endpoint takes the session it closes with 1011. A fragmented client
message is never split across two upstreams: the switch waits for a message
boundary (bounded by close_timeout_s). Each move is counted
(gateway_reattaches_total, gateway_reattach_failures_total{trigger}) and
logged (`reattached`, or `reattach_failed` with the reason).

Endpoint draining lives in the store (`P ep:{backend}`), so every node stops
choosing a drained endpoint: the node that takes the API call acts at once,
the others through the bus (delivery.py, op `ep_drain`) or at their next
heartbeat (`refresh_draining`). This module is the policy; the mechanism is
seam.py's (`move_upstream`, `upstream_leaving`, `attach_upstream`).
"""

from __future__ import annotations

import asyncio
import logging

from . import metrics
from .errors import GOING_AWAY, INTERNAL_ERROR, SERVICE_RESTART, NoBackendAvailable, UpstreamRefused
from .logs import event
from .session import Close, Link, State

log = logging.getLogger("gateway.reattach")

# RFC 6455 7.4.1: 1001 "going away" (a server going down), 1012 "service restart".
MOVE_ON_CLOSE = frozenset({GOING_AWAY, SERVICE_RESTART})
RESUMED = ("Gateway-Resumed", "1")
POLL_S = 0.005   # how often a move looks for a client message boundary


class Redial:
    """What the handshake knew that another upstream of the session needs:
    the backend, the hash key, the request target and headers, and what the
    first upstream chose (a new one must choose the same: the client agreed to it)."""

    __slots__ = ("backend", "hash_key", "target_for", "headers", "protocol", "extensions", "task")

    def __init__(self, backend: str, hash_key: str | None, target_for, headers: list[tuple[str, str]],
                 protocol: str | None, extensions: str | None):
        self.backend = backend
        self.hash_key = hash_key
        self.target_for = target_for
        self.headers = headers if RESUMED in headers else headers + [RESUMED]
        self.protocol = _norm(protocol)
        self.extensions = _norm(extensions)
        self.task: asyncio.Task | None = None

    def upstream_closed(self, s, code: int) -> bool:
        """The closing hook: the upstream sent close `code`. True: the session
        stays and moves on; the client sees nothing of the close."""
        if code not in MOVE_ON_CLOSE or not movable(s):
            return False
        leaving = s.endpoint.url if s.endpoint is not None else None
        s.upstream_leaving(code)
        if not s.c_msg:
            s.move_upstream()   # client frames wait in the hold from the next frame boundary on
        if not self.busy():     # (a move already dialling takes the hold over)
            self.task = asyncio.ensure_future(_move(s, "upstream_close", leaving))
        return True

    def move(self, s, why: str) -> bool:
        """Move `s` to another endpoint, make before break. False: it cannot move now."""
        if self.busy() or s.endpoint is None or not movable(s):
            return False
        self.task = asyncio.ensure_future(_move(s, why, s.endpoint.url))
        return True

    def busy(self) -> bool:
        return self.task is not None and not self.task.done()


def _norm(value: str | None) -> str:
    return "".join((value or "").lower().split())


def movable(s) -> bool:
    """`s` is relaying to a websocket upstream of a reattach backend, and nothing is closing."""
    spec = s.node.routing.config.backends.get(s.redial.backend)
    return (spec is not None and spec.on_upstream_close == "reattach" and s.state is State.OPEN
            and s.closer is None and s.fault_close is None and s.sink is None and s.move is None
            and s.client.close is Close.OPEN and s.upstream.close is Close.OPEN
            and s.upstream.link is Link.ATTACHED and _deflate_movable(s.redial.extensions))


def _deflate_movable(extensions: str) -> bool:
    # permessage-deflate keeps a compression context per direction unless both
    # sides agreed to reset it per message: only then can another upstream
    # carry on where the first one stopped (RFC 7692 7.1.1).
    return not extensions or ("server_no_context_takeover" in extensions
                              and "client_no_context_takeover" in extensions)


def _open(s) -> bool:
    return s.state is State.OPEN and s.closer is None and not s.client.gone and not s.upstream.gone


async def _until(s, cond, bound_s: float) -> bool:
    """Poll `cond()` while the session is open, for `bound_s` at most. False: it
    did not come to hold (see `_open` for whether the session ended meanwhile)."""
    deadline = s.node.loop.time() + bound_s
    while _open(s) and not cond():
        if s.node.loop.time() >= deadline:
            return False
        await asyncio.sleep(POLL_S)
    return _open(s)


async def _move(s, why: str, leaving: str | None) -> None:
    r = s.redial
    bound = s.limits.close_timeout_s
    if s.move is not None and s.held is None:
        # The upstream closed in the middle of a client message: the rest of it goes
        # to the old upstream, the hold takes over after it.
        if not await _until(s, lambda: not s.c_msg, bound):
            return _failed(s, why, leaving, "no client message boundary") if _open(s) else None
        s.move_upstream()
    try:
        ep, transport, leftover = await _dial(s, leaving)
    except (NoBackendAvailable, UpstreamRefused) as exc:
        # Make before break with endpoints that would take it but did not answer now
        # (overload, a dial timeout): the old upstream still works, so the session
        # stays on it and a later trigger tries again. With no endpoint left: 1011.
        old_works = s.held is None and s.move is None
        pool = s.node.routing.pools.get(r.backend)
        others = bool(pool is not None and pool.order(r.hash_key, leaving))
        return _failed(s, why, leaving, f"no endpoint took it ({exc})", close=not (old_works and others))
    if not _open(s):
        transport.abort()   # it ended while the next upstream was dialled
        return
    if s.held is None:
        # Make before break, at a client message boundary (or the hold, if the
        # upstream closed meanwhile).
        if not await _until(s, lambda: not s.c_msg or s.held is not None, bound):
            transport.abort()
            if not _open(s):
                return
            # Still on its endpoint, which works: the next trigger tries again.
            return _failed(s, why, leaving, "no client message boundary", close=s.move is not None)
    if s.held is None:
        moved = await s.move_upstream(transport, leftover, ep)
    else:
        # Client frames are held (the upstream closed first): attach once the old one is let go.
        if not await _until(s, lambda: s.upstream.link is Link.DETACHED, bound):
            transport.abort()
            return _failed(s, why, leaving, "the old upstream did not let go") if _open(s) else None
        s.attach_upstream(transport, leftover, ep)
        moved = True
    if not moved:
        return   # the session lost its upstream meanwhile, and closed as any session does
    metrics.reattaches.inc()
    event(log, "reattached", conn=s.id, session=s.session_id, backend=r.backend, from_=leaving, to=ep.url, why=why)
    if s.node.cluster is not None and s.state is State.OPEN:
        s.node.cluster.opened(s)   # its record names the new endpoint


async def _dial(s, leaving: str | None):
    """Another endpoint of the session's backend, dialled as the first one was (plus
    Gateway-Resumed: 1). Returns (endpoint, transport (paused), leftover)."""
    r = s.redial
    routing = s.node.routing
    pool = routing.pools.get(r.backend)
    spec = routing.config.backends.get(r.backend)
    if pool is None or spec is None:
        raise NoBackendAvailable(r.backend)
    async with pool.moves:
        ep, transport, head, leftover = await pool.dial_any(r.hash_key, r.target_for, r.headers,
                                                            spec.connect_timeout_s, leaving=leaving)
    if (_norm(head.headers.get("sec-websocket-protocol")) != r.protocol
            or _norm(head.headers.get("sec-websocket-extensions")) != r.extensions):
        transport.abort()   # the client agreed to what the first upstream chose, not to this
        raise UpstreamRefused(502)
    return ep, transport, leftover


def _failed(s, why: str, leaving: str | None, detail: str, *, close: bool = True) -> None:
    metrics.reattach_failures.labels(why).inc()
    event(log, "reattach_failed", logging.WARNING, conn=s.id, session=s.session_id, backend=s.redial.backend,
          from_=leaving, why=why, detail=detail)
    if close and _open(s):
        s.give_up_upstream(INTERNAL_ERROR, "no backend endpoint available")


# ------------------------------------------------------------------ triggers on a node
def move_off(node, backend: str, urls, why: str) -> int:
    """Move this node's sessions of `backend` off the endpoints `urls`; returns how many started to move."""
    n = 0
    for s in list(node.sessions.values()):
        r = s.redial
        if r is not None and r.backend == backend and s.endpoint is not None and s.endpoint.url in urls \
                and r.move(s, why):
            n += 1
    return n


def watch_health(node) -> None:
    """A failed active check moves the sessions off the endpoint (every pool of the node's config)."""
    for pool in node.routing.pools.values():
        pool.on_unhealthy = lambda p, ep: move_off(node, p.name, {ep.url}, "unhealthy")


def set_draining(node, backend: str, urls: set[str]) -> int:
    """The store says these endpoints of `backend` drain: choose them no more, move sessions off them."""
    pool = node.routing.pools.get(backend)
    if pool is None:
        return 0
    pool.draining = set(urls)
    return move_off(node, backend, pool.draining, "drained") if pool.draining else 0


def endpoint_draining(node, backend: str, url: str, draining: bool) -> int:
    """One endpoint starts (or stops) draining, as the API or the bus says."""
    pool = node.routing.pools.get(backend)
    if pool is None:
        return 0
    return set_draining(node, backend, pool.draining | {url} if draining else pool.draining - {url})


async def refresh_draining(node, store) -> None:
    """Each heartbeat: the draining endpoints as the store has them now (a drain
    missed on the bus, or expired), and another try for sessions still on them."""
    for name in list(node.routing.pools):
        set_draining(node, name, await store.draining_endpoints(name))
