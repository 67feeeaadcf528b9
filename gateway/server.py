"""One gateway node (one worker process): admission, the handshake, shutdown.

The node owns what sessions share: compiled routes, backend pools, counts per
IP, metrics children. `connect` turns a parsed request head into a live
session or a Refusal; everything after the 101 happens in relay.Session.
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import builtin, frames, http1, metrics
from .config import Config
from .errors import GOING_AWAY, Refusal
from .logs import event
from .relay import Session
from .routing import Router, upstream_target
from .upstream import BackendPool, UpstreamRefused, dial

log = logging.getLogger("gateway.node")

# Not forwarded upstream: hop-by-hop headers, the handshake's own, and the
# forwarding headers the gateway writes itself.
_NOT_FORWARDED = frozenset({
    "connection", "upgrade", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "content-length", "host", "sec-websocket-key", "sec-websocket-version", "sec-websocket-accept",
    "sec-websocket-protocol", "sec-websocket-extensions", "x-forwarded-for", "x-forwarded-proto",
    "x-forwarded-host", "forwarded",
})


class Routing:
    """What a config compiles to. Swapped whole on reload; sessions keep theirs."""

    def __init__(self, config: Config, old: "Routing | None" = None):
        self.config = config
        self.router = Router(config.routes)
        old_pools = old.pools if old else {}
        self.pools: dict[str, BackendPool] = {}
        self.sinks: dict[str, object] = {}
        for name, spec in config.backends.items():
            if spec.type == "websocket":
                prior = old_pools.get(name)
                self.pools[name] = prior if prior is not None and prior.spec == spec else BackendPool(spec)
            elif spec.type == "builtin":
                self.sinks[name] = builtin.HANDLERS[spec.handler]()
        self.route_metrics = {r.name: metrics.RouteMetrics(r.name) for r in config.routes}


class Node:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.config = config
        self.node_id = config.resolved_node_id()
        self.limits = config.limits
        self.routing = Routing(config)
        self.sessions: dict[str, Session] = {}
        self.sockets = 0
        self.per_ip: dict[str, int] = {}
        self.draining = False
        self.http_session = None
        self._set_timing()

    def _set_timing(self) -> None:
        lim = self.limits
        # One timer per session ticks at tick_s: counters, keepalive, idle.
        # Idle closes land between idle_timeout_s and idle_timeout_s + tick_s.
        candidates = [v for v in (lim.ping_interval_s, lim.idle_timeout_s / 4) if v > 0] or [30.0]
        self.tick_s = max(0.05, min(candidates))
        self.idle_ticks = max(1, round(lim.idle_timeout_s / self.tick_s)) if lim.idle_timeout_s else 1 << 62
        self.ping_ticks = max(1, round(lim.ping_interval_s / self.tick_s)) if lim.ping_interval_s else 0

    # ------------------------------------------------------------ lifecycle
    def start(self) -> None:
        for pool in self.routing.pools.values():
            pool.start_health(self._http_session_factory)

    def _http_session_factory(self):
        import aiohttp

        return aiohttp.ClientSession()

    def reload(self, config: Config) -> None:
        old = self.routing
        self.routing = Routing(config, old)
        self.config = config
        self.limits = config.limits
        self._set_timing()
        for name, pool in old.pools.items():
            if self.routing.pools.get(name) is not pool:
                asyncio.ensure_future(pool.stop())
        self.start()

    async def shutdown(self, timeout: float, rate_per_s: float, code: int = GOING_AWAY) -> None:
        """Stop taking sessions, close the open ones in paced batches, wait."""
        self.draining = True
        metrics.draining.set(1)
        deadline = self.loop.time() + timeout
        batch = max(1, int(rate_per_s / 10))
        sessions = list(self.sessions.values())
        event(log, "shutdown", sessions=len(sessions), timeout_s=timeout)
        for i in range(0, len(sessions), batch):
            for s in sessions[i:i + batch]:
                s.gateway_close(code, "going away")
            if i + batch < len(sessions):
                await asyncio.sleep(0.1)
        while self.sockets and self.loop.time() < deadline:
            await asyncio.sleep(0.02)
        for s in list(self.sessions.values()):
            s._close_timeout()
        for pool in self.routing.pools.values():
            await pool.stop()

    # ------------------------------------------------------------ admission
    def admit_socket(self, s: Session) -> bool:
        self.sockets += 1
        self.per_ip[s.ip] = self.per_ip.get(s.ip, 0) + 1
        # Far past the limit, do not even read the request: keep descriptors.
        return self.sockets <= self.limits.max_connections + max(100, self.limits.max_connections // 10)

    def refused(self, s: Session, reason: str, status: int | None = None) -> None:
        metrics.refusals.labels(reason).inc()
        event(log, "refused", conn=s.id, ip=s.ip, reason=reason, status=status)

    def session_closed(self, s: Session, was_open: bool) -> None:
        self.sockets -= 1
        left = self.per_ip.get(s.ip, 1) - 1
        if left:
            self.per_ip[s.ip] = left
        else:
            self.per_ip.pop(s.ip, None)
        if not was_open:
            return
        self.sessions.pop(s.id, None)
        if s.endpoint is not None:
            s.endpoint.active -= 1
        if s.sink is not None:
            s.sink.on_close(s)
        rm = s.route_metrics
        self.flush_counters(s)
        rm.open.dec()
        rm.closed(s.close_code)
        event(log, "close", conn=s.id, route=rm.route, code=s.close_code, reason=s.close_reason,
              by=s.closer, duration_s=round(time.monotonic() - s.started, 3),
              bytes_in=s.c_bytes, bytes_out=s.u_bytes, msgs_in=s.c_msgs, msgs_out=s.u_msgs)

    def flush_counters(self, s: Session) -> None:
        rm = s.route_metrics
        if s.c_msgs != s.flushed_c:
            rm.msgs_in.inc(s.c_msgs - s.flushed_c)
            s.flushed_c = s.c_msgs
        if s.u_msgs != s.flushed_u:
            rm.msgs_out.inc(s.u_msgs - s.flushed_u)
            s.flushed_u = s.u_msgs

    def count_violation(self, s: Session, code: int) -> None:
        metrics.protocol_errors.labels(str(code)).inc()
        event(log, "protocol_violation", logging.INFO, conn=s.id, code=code)

    def count_overflow(self, s: Session, client_side: bool) -> None:
        side = "client" if client_side else "upstream"
        metrics.slow_consumers.labels(side).inc()
        event(log, "slow_consumer", logging.WARNING, conn=s.id, side=side)

    # ------------------------------------------------------------ handshake
    async def connect(self, s: Session, head: http1.RequestHead) -> None:
        lim = self.limits
        h = head.headers
        if self.draining:
            raise Refusal(503, "node draining", metric="draining", headers=(("Retry-After", "5"),))
        if self.per_ip.get(s.ip, 0) > lim.max_connections_per_ip:
            raise Refusal(429, "too many connections from this address", metric="per_ip_limit")
        if self.sockets > lim.max_connections:
            raise Refusal(503, "node at capacity", metric="capacity", headers=(("Retry-After", "5"),))
        routing = self.routing
        route = next(routing.router.candidates(head.path, h.get("host", ""), h, head.query), None)
        if route is None:
            raise Refusal(404, "no route", metric="no_route")
        key = _check_upgrade(head)
        offered = [p.strip() for p in h.get("sec-websocket-protocol", "").split(",") if p.strip()]
        backend = routing.config.backends[route.backend_name]
        s.route = route
        if backend.type == "builtin":
            s.sink = routing.sinks[backend.name]
            self._go_live(s, routing, route, frames.accept_key(key), None, None, None)
            return
        pool = routing.pools[backend.name]
        forwarded, deflate_offer = _upstream_headers(head, s, route.name)
        if offered:
            forwarded.append(("Sec-WebSocket-Protocol", ", ".join(offered)))
        if deflate_offer:
            forwarded.append(("Sec-WebSocket-Extensions", deflate_offer))
        hash_key = _hash_key(backend.hash_on, head, s, None)
        for ep in pool.order(hash_key):
            target = upstream_target(ep.path, ep.query, route, head.path, head.query_string, ())
            try:
                transport, resp, leftover = await dial(ep, target, forwarded, backend.connect_timeout_s)
            except UpstreamRefused as exc:
                if exc.status >= 500:
                    self._dial_failed(pool, ep)
                    continue
                # The backend's own answer (401, 403, 404...): pass it on.
                raise Refusal(exc.status, "refused by backend", metric="backend_refused") from None
            except (OSError, asyncio.TimeoutError, ValueError, ConnectionError):
                self._dial_failed(pool, ep)
                continue
            pool.dial_succeeded(ep)
            break
        else:
            raise Refusal(502, "no backend available", metric="upstream_unavailable")
        protocol = resp.headers.get("sec-websocket-protocol")
        extensions = resp.headers.get("sec-websocket-extensions")
        if (protocol and protocol not in offered) or (extensions and not (
                deflate_offer and extensions.lower().lstrip().startswith("permessage-deflate"))):
            transport.abort()
            raise Refusal(502, "backend chose what the client did not offer", metric="upstream_protocol")
        if s.client_gone:
            transport.abort()
            return
        s.endpoint = ep
        ep.active += 1
        s.deflate = bool(extensions)
        self._go_live(s, routing, route, frames.accept_key(key), protocol, extensions, (transport, leftover))

    def _dial_failed(self, pool: BackendPool, ep) -> None:
        pool.dial_failed(ep)
        metrics.upstream_failures.labels(pool.name, ep.url).inc()
        event(log, "upstream_connect_failed", logging.WARNING, backend=pool.name, endpoint=ep.url)

    def _go_live(self, s: Session, routing: Routing, route, accept: str, protocol, extensions, upstream) -> None:
        rm = routing.route_metrics[route.name]
        s.route_metrics = rm
        self.sessions[s.id] = s
        rm.total.inc()
        rm.open.inc()
        event(log, "connect", conn=s.id, route=route.name, ip=s.ip,
              endpoint=s.endpoint.url if s.endpoint is not None else None)
        response = http1.switching_protocols(accept, protocol, extensions)
        if upstream is None:
            s.upgraded(response, None, b"")
        else:
            s.upgraded(response, upstream[0], upstream[1])


def _check_upgrade(head: http1.RequestHead) -> str:
    h = head.headers
    if "websocket" not in http1.header_tokens(h.get("upgrade")) or \
            "upgrade" not in http1.header_tokens(h.get("connection")):
        raise Refusal(426, "websocket upgrade required", metric="not_websocket",
                      headers=(("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")))
    if head.method != "GET":
        raise Refusal(405, "method not allowed", metric="bad_request")
    if h.get("sec-websocket-version") != "13":
        raise Refusal(426, "unsupported websocket version", metric="bad_version",
                      headers=(("Sec-WebSocket-Version", "13"),))
    key = h.get("sec-websocket-key", "")
    if not frames.valid_client_key(key):
        raise Refusal(400, "bad Sec-WebSocket-Key", metric="bad_request")
    return key


def _upstream_headers(head: http1.RequestHead, s: Session, route: str) -> tuple[list[tuple[str, str]], str]:
    """Client headers to pass on, with the gateway's own. Returns (headers, deflate offer)."""
    out = [(name, value) for name, value in head.raw_headers
           if (low := name.lower()) not in _NOT_FORWARDED and not low.startswith("gateway-")]
    h = head.headers
    xff = h.get("x-forwarded-for")
    out += [
        ("Gateway-Connection-Id", s.id),
        ("Gateway-Session-Id", s.id),
        ("Gateway-Route", route),
        ("Gateway-Client-IP", s.ip),
        ("X-Forwarded-For", f"{xff}, {s.ip}" if xff else s.ip),
        ("X-Forwarded-Proto", "http"),
    ]
    if "host" in h:
        out.append(("X-Forwarded-Host", h["host"]))
    # Only permessage-deflate is passed through: it is the one extension whose
    # frames the relay can forward without understanding (RSV1 only).
    offers = [o.strip() for o in h.get("sec-websocket-extensions", "").split(",")
              if o.strip().lower().startswith("permessage-deflate")]
    return out, ", ".join(offers)


def _hash_key(hash_on: str | None, head: http1.RequestHead, s: Session, claims) -> str | None:
    if hash_on is None:
        return None
    if hash_on == "ip":
        return s.ip
    kind, _, name = hash_on.partition(":")
    if kind == "header":
        return head.headers.get(name.lower())
    if kind == "query":
        return head.query.get(name)
    if kind == "claim" and claims:
        value = claims.get(name)
        return None if value is None else str(value)
    return None
