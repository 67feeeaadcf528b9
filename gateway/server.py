"""One gateway node (one worker process): admission, the handshake, shutdown.

The node owns what sessions share: compiled routes, backend pools, counts per
IP, metrics children. `connect` turns a parsed request head into a live
session or a Refusal; everything after the 101 happens in relay.Session.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from . import auth, builtin, frames, http1, httpbackend, metrics
from .channels import Channels, RecentlyClosed
from .dispatch import RoutePlan
from .config import Config
from .errors import GOING_AWAY, POLICY_VIOLATION, ConfigError, Refusal
from .logs import event
from .relay import Session
from .routing import Router, strip_query, upstream_target
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

    def __init__(self, config: Config, old: "Routing | None" = None, node: "Node | None" = None):
        self.config = config
        self.router = Router(config.routes)
        old_pools = old.pools if old else {}
        old_sinks = old.sinks if old else {}
        self.pools: dict[str, BackendPool] = {}
        self.sinks: dict[str, object] = {}
        for name, spec in config.backends.items():
            if spec.type == "websocket":
                prior = old_pools.get(name)
                self.pools[name] = prior if prior is not None and prior.spec == spec else BackendPool(spec)
            elif spec.type == "builtin":
                self.sinks[name] = builtin.HANDLERS[spec.handler]()
            elif spec.type == "http":
                prior = old_sinks.get(name)
                self.sinks[name] = prior if isinstance(prior, httpbackend.HttpBackend) and prior.spec == spec \
                    else httpbackend.HttpBackend(spec, node, node.http)
        # What each route does with a new session: a backend (or a weighted
        # pick), a select sink, connect/disconnect event backends.
        self.plans = {r.name: RoutePlan(r, self.sinks) for r in config.routes}
        jwt = config.auth.jwt
        self.forward_claims = jwt.forward_claims if jwt is not None else ("sub",)
        self.route_metrics = {r.name: metrics.RouteMetrics(r.name) for r in config.routes}


class Identity:
    """auth.jwt and auth.origins, compiled: who the client is, before the upgrade."""

    def __init__(self, config: Config):
        a = config.auth
        self.origins = a.origins
        self.jwt = a.jwt
        self.verifier: auth.Verifier | None = None
        self.jwks = None
        self.query_params: tuple[str, ...] = ()
        if a.jwt is None:
            return
        j = a.jwt
        where = f"{config.source}: auth.jwt.keys"
        try:
            if j.keys.secret_env:
                secret = os.environ.get(j.keys.secret_env)
                if not secret:
                    raise ConfigError([f"{where}.secret_env: environment variable {j.keys.secret_env} is not set"])
                keys = auth.SecretKey(secret.encode())
            elif j.keys.public_key_file:
                keys = auth.PublicKeyFile(j.keys.public_key_file)
            else:
                from .jwks import JwksCache

                keys = self.jwks = JwksCache(j.keys.jwks_url)
            self.verifier = auth.Verifier(j.algorithms, keys, issuer=j.issuer, audience=j.audience,
                                          leeway_s=j.leeway_s, require=j.require)
        except ValueError as exc:
            raise ConfigError([f"{where}: {exc}"]) from None
        self.query_params = tuple(name for kind, name in map(auth.parse_source, j.sources) if kind == "query")

    async def start(self) -> None:
        if self.jwks is not None:
            await self.jwks.start()

    async def close(self) -> None:
        if self.jwks is not None:
            await self.jwks.close()

    def check_origin(self, head: http1.RequestHead) -> None:
        if self.origins is not None and not auth.origin_allowed(self.origins, head.headers.get("origin")):
            raise Refusal(403, "origin not allowed", metric="origin")

    def token(self, head: http1.RequestHead, offered: list[str]) -> tuple[str | None, list[str]]:
        if self.jwt is None:
            return None, offered
        h = head.headers
        return auth.extract_token(self.jwt.sources, h, head.query, auth.parse_cookies(h.get("cookie")), offered)

    async def verify(self, token: str | None) -> dict:
        from .jwks import verify_token

        try:
            return await verify_token(self.verifier, self.jwks, token)
        except auth.AuthError as exc:
            raise Refusal(exc.status, exc.reason, metric=exc.reason.replace(" ", "_")) from None


class Node:
    def __init__(self, config: Config, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.config = config
        self.node_id = config.resolved_node_id()
        self.limits = config.limits
        self.http = httpbackend.HttpClient()   # one pooled HTTP client for all http backends
        self.channels = Channels()
        self.closed = RecentlyClosed()           # ids of ended sessions: the API answers 410
        self.routing = Routing(config, node=self)
        self.identity = Identity(config)
        self.sessions: dict[str, Session] = {}
        self.by_sub: dict[str, set[Session]] = {}
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
    async def start_identity(self) -> None:
        await self.identity.start()

    def start(self) -> None:
        self.http.start()
        for pool in self.routing.pools.values():
            pool.start_health(self._http_session_factory)

    def _http_session_factory(self):
        import aiohttp

        return aiohttp.ClientSession()

    def reload(self, config: Config) -> None:
        old = self.routing
        identity = Identity(config)  # raises ConfigError before anything changes
        self.routing = Routing(config, old, node=self)
        if identity.jwks is not None or self.identity.jwks is not None:
            asyncio.ensure_future(self.identity.close())
            asyncio.ensure_future(identity.start())
        self.identity = identity
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
        # Disconnect events of the sessions just closed may still be in flight.
        await self.http.close(timeout=max(1.0, deadline - self.loop.time()))
        await self.identity.close()

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
        link = s.sink_state
        if link is not None and link.connected and link.events is not None and link.events.disconnect is not None:
            # Once for every session that opened (or whose connect event was
            # accepted), whatever ended it.
            link.events.disconnect.disconnect(s)
        if not was_open:
            return
        self.sessions.pop(s.id, None)
        self.closed.add(s.id, s.close_code, s.close_reason)
        self.channels.drop(s)
        if s.sub is not None:
            peers = self.by_sub.get(s.sub)
            if peers is not None:
                peers.discard(s)
                if not peers:
                    del self.by_sub[s.sub]
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

    def count_rate_limited(self, s: Session) -> None:
        metrics.rate_limited.inc()

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
        candidates = list(routing.router.candidates(head.path, h.get("host", ""), h, head.query))
        if not candidates:
            raise Refusal(404, "no route", metric="no_route")
        key = _check_upgrade(head)
        identity = self.identity
        identity.check_origin(head)
        client_offer = auth.parse_subprotocols(h.get("sec-websocket-protocol"))
        token, offered = identity.token(head, client_offer)
        route, claims = await self._pick_route(candidates, token)
        s.route = route
        s.claims = claims
        if claims is not None and isinstance(claims.get("sub"), str):
            s.sub = claims["sub"]
        plan = routing.plans[route.name]
        name = plan.pick()   # sticky for the session's life; None: routed by content (select)
        backend = routing.config.backends[name] if name is not None else None
        link = None   # what http backends keep per session; made lazily unless needed now
        hash_on = backend.hash_on if backend is not None and backend.type == "http" else None
        if plan.connect is not None or plan.disconnect is not None or hash_on is not None:
            link = httpbackend.link(s, routing.forward_claims, _hash_key(hash_on, head, s, claims), plan)
        greeting = b""
        welcome = None
        if plan.connect is not None:
            welcome = await plan.connect.connect(s, link, _client_headers(head, s, identity, token),
                                                 _client_target(head, identity.query_params))
            if s.client_gone:
                if plan.disconnect is not None:
                    plan.disconnect.disconnect(s)
                return
            if welcome.status == 200 and welcome.body:
                # The first message rides with the 101: nothing can come before it.
                greeting = frames.frame(httpbackend.reply_opcode(welcome.content_type, welcome.body), welcome.body)
                s.u_msgs += 1
        elif link is not None:
            link.connected = True
        if backend is None or backend.type != "websocket":
            s.sink = plan.actions if backend is None else routing.sinks[backend.name]
            self._go_live(s, routing, route, frames.accept_key(key), None, None, None, greeting)
            if welcome is not None:
                plan.connect.apply_channels(s, welcome)
            return
        pool = routing.pools[backend.name]
        forwarded, deflate_offer = _upstream_headers(head, s, route.name, identity, token, claims)
        if offered:
            forwarded.append(("Sec-WebSocket-Protocol", ", ".join(offered)))
        if deflate_offer:
            forwarded.append(("Sec-WebSocket-Extensions", deflate_offer))
        hash_key = _hash_key(backend.hash_on, head, s, claims)
        for ep in pool.order(hash_key):
            target = upstream_target(ep.path, ep.query, route, head.path, head.query_string,
                                     identity.query_params)
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
        if not protocol and client_offer and not offered:
            # The client offered only `bearer.<token>`: browsers fail a handshake
            # whose answer names none of the offered protocols, so echo its own.
            protocol = client_offer[0]
        self._go_live(s, routing, route, frames.accept_key(key), protocol, extensions, (transport, leftover),
                      greeting)
        if welcome is not None:
            plan.connect.apply_channels(s, welcome)

    async def _pick_route(self, candidates, token: str | None):
        """The first candidate whose auth and claims hold. Returns (route, claims)."""
        claims = None
        claims_failed = False
        for route in candidates:
            if route.wants_token and claims is None and (token is not None or route.needs_token):
                claims = await self.identity.verify(token)   # 401 on any problem with the token
            if route.match.claims and not auth.claims_match(dict(route.match.claims), claims or {}):
                claims_failed = True
                continue
            return route, (claims if route.wants_token else None)
        if claims_failed:
            raise Refusal(403, "claims do not match", metric="claims")
        raise Refusal(404, "no route", metric="no_route")

    def _dial_failed(self, pool: BackendPool, ep) -> None:
        pool.dial_failed(ep)
        metrics.upstream_failures.labels(pool.name, ep.url).inc()
        event(log, "upstream_connect_failed", logging.WARNING, backend=pool.name, endpoint=ep.url)

    def _go_live(self, s: Session, routing: Routing, route, accept: str, protocol, extensions, upstream,
                 greeting: bytes = b"") -> None:
        if s.client_gone:
            # The client left while we authorised or dialled: nothing to go live for.
            if upstream is not None:
                upstream[0].abort()
            return
        rm = routing.route_metrics[route.name]
        s.route_metrics = rm
        self.sessions[s.id] = s
        rm.total.inc()
        rm.open.inc()
        event(log, "connect", conn=s.id, route=route.name, ip=s.ip,
              endpoint=s.endpoint.url if s.endpoint is not None else None)
        response = http1.switching_protocols(accept, protocol, extensions) + greeting
        if s.sub is not None:
            self.by_sub.setdefault(s.sub, set()).add(s)
        lim = self.limits
        if lim.messages_per_second > 0:
            s.bucket = auth.TokenBucket(lim.messages_per_second, max(1, lim.burst))
        exp = s.claims.get("exp") if s.claims else None
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            # Close at exp; a token accepted inside the leeway closes when the leeway ends.
            left = exp - time.time()
            if left <= 0:
                left += self.identity.jwt.leeway_s
            s.expiry_timer = self.loop.call_later(max(0.0, left), s.gateway_close, POLICY_VIOLATION, "token expired")
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


def _client_target(head: http1.RequestHead, drop_params: tuple[str, ...]) -> str:
    """The client's path and query, without credentials the gateway consumed."""
    query = strip_query(head.query_string, drop_params)
    return f"{head.path}?{query}" if query else head.path


def _client_headers(head: http1.RequestHead, s: Session, identity: Identity,
                    token: str | None) -> list[tuple[str, str]]:
    """The client's handshake headers as they travel on: no hop-by-hop or
    handshake headers, never the client's own Gateway-*, no credential the
    gateway consumed; X-Forwarded-For appended."""
    drop_auth = token is not None and identity.jwt is not None and "header" in identity.jwt.sources
    out = [(name, value) for name, value in head.raw_headers
           if (low := name.lower()) not in _NOT_FORWARDED and not low.startswith("gateway-")
           and not (drop_auth and low == "authorization")]
    xff = head.headers.get("x-forwarded-for")
    out.append(("X-Forwarded-For", f"{xff}, {s.ip}" if xff else s.ip))
    return out


def _upstream_headers(head: http1.RequestHead, s: Session, route: str, identity: Identity, token: str | None,
                      claims: dict | None) -> tuple[list[tuple[str, str]], str]:
    """Client headers to pass on, with the gateway's own. Returns (headers, deflate offer)."""
    out = _client_headers(head, s, identity, token)
    h = head.headers
    out += [
        ("Gateway-Connection-Id", s.id),
        ("Gateway-Session-Id", s.id),
        ("Gateway-Route", route),
        ("Gateway-Client-IP", s.ip),
        ("X-Forwarded-Proto", "http"),
    ]
    if "host" in h:
        out.append(("X-Forwarded-Host", h["host"]))
    if claims is not None:
        out += auth.forward_claim_headers(identity.jwt.forward_claims, claims)
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
