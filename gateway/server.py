"""One gateway node (one worker process): what its sessions share.

The node owns compiled routes, backend pools, the identity check, counts per
IP, the registry of live sessions (`sessions`, `by_sub`), metrics and the
open/close log lines, reload and shutdown. The handshake that turns a socket
into a session is in handshake.py; everything after the 101 in relay.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time

from . import auth, builtin, http1, httpbackend, metrics, reattach, resume, tokens
from .channels import Channels, RecentlyClosed
from .dispatch import RoutePlan
from .config import Config
from .errors import ChannelError, ConfigError, Refusal
from .logs import event
from .relay import Session
from .routing import Router
from .session import LiveLimits, State
from .upstream import BackendPool

log = logging.getLogger("gateway.node")

def loggable_reason(reason: str | None) -> str | None:
    """A close reason fit for the log: a drain's `resume=<session>.<secret>` keeps
    the session id and loses the secret (whoever reads the logs could resume it)."""
    if reason and reason.startswith(tokens.REASON_PREFIX):
        return reason.split(".", 1)[0] + ".<redacted>"
    return reason


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
        self.live_limits = LiveLimits.of(config.limits)  # what each session fixes when it goes live
        self.sessions: dict[str, Session] = {}           # live sessions by connection id
        self.by_sub: dict[str, set[Session]] = {}
        self.sockets = 0
        self.per_ip: dict[str, int] = {}
        self.draining = False   # readiness is 503 (the node drains)
        self.refusing = False   # new upgrades get 503 (after drain.announce_s)
        self.drainer = None     # set by app: drain.Drainer
        # Hooks for what else follows sessions (the cluster's session store):
        # after a session went live and is registered; after it ended and left.
        self.cluster = None   # set by app: the node's records in the store (cluster.Cluster)
        self.on_open = lambda session: None
        self.on_close = lambda session: None

    # ------------------------------------------------------------ lifecycle
    async def start_identity(self) -> None:
        await self.identity.start()

    def start(self) -> None:
        self.http.start()
        for pool in self.routing.pools.values():
            pool.start_health()

    def reload(self, config: Config) -> tuple[int, int]:
        """Apply a valid config: new sessions use it at once; open ones keep their
        route and limits. A session whose route (or websocket backend) is gone is
        drained (1012 and a resume token); one whose endpoint is gone moves to
        another (reattach backends; on the others it keeps its upstream).
        Returns (sessions drained, sessions moving)."""
        old = self.routing
        identity = Identity(config)  # raises ConfigError before anything changes
        self.routing = Routing(config, old, node=self)
        if identity.jwks is not None or self.identity.jwks is not None:
            asyncio.ensure_future(self.identity.close())
            asyncio.ensure_future(identity.start())
        self.identity = identity
        self.config = config
        self.limits = config.limits
        self.live_limits = LiveLimits.of(config.limits)  # new sessions only: live ones keep theirs
        for name, pool in old.pools.items():
            if self.routing.pools.get(name) is not pool:
                asyncio.ensure_future(pool.stop())
        self.start()
        moving = 0
        for name, pool in self.routing.pools.items():
            prior = old.pools.get(name)
            if prior is not None and prior is not pool:
                pool.draining = prior.draining   # as the store said; the next heartbeat reads it again
                removed = set(prior.spec.endpoints) - set(pool.spec.endpoints)
                moving += reattach.move_off(self, name, removed, "removed") if removed else 0
        reattach.watch_health(self)
        routes = {r.name for r in config.routes}
        gone = [s for s in self.sessions.values() if s.state is State.OPEN and (
            s.route.name not in routes or s.redial is not None and s.redial.backend not in config.backends)]
        if gone:
            asyncio.ensure_future(self.drain_sessions(gone))
        return len(gone), moving

    async def drain_sessions(self, sessions) -> int:
        """Detach these sessions (their route was removed, say): records first,
        then 1012 with a resume token. Returns how many were detached."""
        return await self.drainer.detach(list(sessions))

    async def shutdown(self, deadline: float) -> None:
        """After the drain (drain.py): cut what is left, stop the pools and clients."""
        self.draining = self.refusing = True
        for s in list(self.sessions.values()):
            s.abort()
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

    def open_session(self, s: Session, rm: metrics.RouteMetrics, response: bytes, upstream, leftover: bytes,
                     pending: bytes, resumed: dict | None = None) -> None:
        """The handshake succeeded: register the session, send the 101, start relaying.

        `upstream` is the dialled transport (None for a backend inside the
        gateway); `leftover` what it sent past its 101, `pending` what the
        client sent past its request head. `resumed`: the detached record of
        the session this resumes; the replay comes first (resume.complete),
        and the session is registered for pushes and channels after it.
        """
        s.route_metrics = rm
        self.sessions[s.id] = s
        if resumed is not None:
            rm.open.inc()
            event(log, "connect", conn=s.id, session=s.session_id, route=rm.route, ip=s.ip, resumed=True,
                  endpoint=s.endpoint.url if s.endpoint is not None else None)
            s.go_live(response, upstream)
            asyncio.ensure_future(resume.complete(self, s, resumed, pending, leftover))
            return
        rm.total.inc()
        rm.open.inc()
        event(log, "connect", conn=s.id, session=s.session_id, route=rm.route, ip=s.ip,
              endpoint=s.endpoint.url if s.endpoint is not None else None)
        if s.sub is not None:
            self.by_sub.setdefault(s.sub, set()).add(s)
        s.go_live(response, upstream)
        self.on_open(s)
        s.start(pending, leftover)

    def resumed(self, s: Session, channels) -> None:
        """A resuming session takes pushes and channel messages again (held until its
        replay is out: resume.complete, which registers it live after that)."""
        if s.sub is not None:
            self.by_sub.setdefault(s.sub, set()).add(s)
        for name in channels:
            try:
                self.channels.subscribe(s, name)
            except ChannelError as exc:   # a limit lowered by a reload since: said, not fatal
                event(log, "resume_channel_refused", logging.WARNING, conn=s.id, channel=name, why=str(exc))

    def session_closed(self, s: Session, was_open: bool) -> None:
        self.sockets -= 1
        left = self.per_ip.get(s.ip, 1) - 1
        if left:
            self.per_ip[s.ip] = left
        else:
            self.per_ip.pop(s.ip, None)
        link = s.sink_state
        drained = s.capture is not None
        if drained:
            s.capture.end()   # the session lives on, detached: its buffer is sealed once written
        elif link is not None and link.connected and link.events is not None and link.events.disconnect is not None:
            # Once for every session that opened (or whose connect event was
            # accepted), whatever ended it.
            link.events.disconnect.disconnect(s)
        if not was_open:
            return
        self.sessions.pop(s.id, None)
        if not drained:
            self.closed.add(s.id, s.close_code, s.close_reason)
            self.unsubscribe(s)
        else:
            # What reaches it here goes on to its buffer (send_message: the capture) until
            # the buffer is sealed: a session parked after a drop (reliable mode) ends here
            # before its parked record is written, and until then a publisher that reads the
            # index finds it on this node, not parked.
            s.capture.done.add_done_callback(lambda _f, s=s: self.unsubscribe(s))
        if s.endpoint is not None:
            s.endpoint.active -= 1
        if s.sink is not None:
            s.sink.on_close(s)
        rm = s.route_metrics
        self.flush_counters(s)
        rm.open.dec()
        rm.closed(s.close_code)
        event(log, "close", conn=s.id, session=s.session_id, route=rm.route, code=s.close_code,
              reason=loggable_reason(s.close_reason), by=s.closer, duration_s=round(time.monotonic() - s.started, 3),
              bytes_in=s.c_bytes, bytes_out=s.u_bytes, msgs_in=s.c_msgs, msgs_out=s.u_msgs)
        self.on_close(s)

    def unsubscribe(self, s: Session) -> None:
        """`s` takes no more channel messages or pushes on this node."""
        self.channels.drop(s)
        if s.sub is not None:
            peers = self.by_sub.get(s.sub)
            if peers is not None:
                peers.discard(s)
                if not peers:
                    del self.by_sub[s.sub]

    def flush_counters(self, s: Session) -> None:
        rm = s.route_metrics
        if s.c_msgs != s.flushed_c:
            rm.msgs_in.inc(s.c_msgs - s.flushed_c)
            s.flushed_c = s.c_msgs
        if s.u_msgs != s.flushed_u:
            rm.msgs_out.inc(s.u_msgs - s.flushed_u)
            s.flushed_u = s.u_msgs
        if s.c_bytes != s.flushed_cb:
            rm.bytes_in.inc(s.c_bytes - s.flushed_cb)
            s.flushed_cb = s.c_bytes
        if s.u_bytes != s.flushed_ub:
            rm.bytes_out.inc(s.u_bytes - s.flushed_ub)
            s.flushed_ub = s.u_bytes

    def count_violation(self, s: Session, code: int) -> None:
        metrics.protocol_errors.labels(str(code)).inc()
        event(log, "protocol_violation", logging.INFO, conn=s.id, code=code)

    def count_rate_limited(self, s: Session) -> None:
        metrics.rate_limited.inc()

    def count_overflow(self, s: Session, client_side: bool) -> None:
        side = "client" if client_side else "upstream"
        metrics.slow_consumers.labels(side).inc()
        event(log, "slow_consumer", logging.WARNING, conn=s.id, side=side)
