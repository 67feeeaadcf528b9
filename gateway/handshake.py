"""From an accepted socket to a live session: the HTTP head, admission, auth,
the route, connect events, the upstream dial and the 101.

`Handshake` is the client socket's protocol until the 101 (or the refusal).
It makes the session (relay.Session) when the socket is accepted, so a
refusal and a connect event can already name it, and hands the socket to it
when it goes live. Every way a handshake can fail is a Refusal: an HTTP
status, a fixed reason and a metric label.
"""

from __future__ import annotations

import asyncio
import logging
import time

from . import auth, frames, http1, httpbackend, reattach, reliable, resume
from .errors import POLICY_VIOLATION, NoBackendAvailable, Refusal, UpstreamRefused
from .relay import Session, log as session_log
from .reliable_session import make_reliable
from .routing import encode_path, strip_query, upstream_target
from .session import Event, State, advance

log = logging.getLogger("gateway.handshake")

# Not forwarded upstream: hop-by-hop headers, the handshake's own, and the
# forwarding headers the gateway writes itself.
_NOT_FORWARDED = frozenset({
    "connection", "upgrade", "keep-alive", "proxy-connection", "te", "trailer", "transfer-encoding",
    "content-length", "host", "sec-websocket-key", "sec-websocket-version", "sec-websocket-accept",
    "sec-websocket-protocol", "sec-websocket-extensions", "x-forwarded-for", "x-forwarded-proto",
    "x-forwarded-host", "forwarded",
})


def own_offer(client_offer) -> str | None:
    """What the 101 names when the client offered only `bearer.<token>` (and perhaps
    gateway.reliable.v1 on a route without it): browsers fail a handshake whose answer
    names none of the offered protocols, so echo the client's own."""
    return next((p for p in client_offer if p != reliable.SUBPROTOCOL), None)


class Handshake(asyncio.Protocol):
    """The protocol of a client socket from accept to the 101."""

    __slots__ = ("node", "s", "transport", "head_buf", "pending", "timer", "resume")

    def __init__(self, node):
        self.node = node
        self.s: Session | None = None
        self.transport = None
        self.head_buf = b""
        self.pending = b""   # frames pipelined behind the request head: relayed after the 101
        self.timer = None
        self.resume = None   # the detached record of the session this request resumes (leased)

    # ------------------------------------------------------------ the socket
    def connection_made(self, transport) -> None:
        self.transport = transport
        s = self.s = Session(self.node, transport)
        if not self.node.admit_socket(s):
            transport.abort()
            return
        self.timer = self.node.loop.call_later(self.node.limits.handshake_timeout_s, self._timeout)

    def _timeout(self) -> None:
        # Slowloris: half a request head held open. Drop it, no answer owed.
        self.timer = None
        if self.s.state is State.HANDSHAKE:
            self.node.refused(self.s, "handshake_timeout")
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        s = self.s
        if s.state is not State.HANDSHAKE:
            self.pending += data
            if len(self.pending) > self.node.limits.max_message_bytes + 14:
                self.transport.pause_reading()
            return
        buf = self.head_buf + data
        end = buf.find(b"\r\n\r\n")
        if end < 0:
            if len(buf) > http1.MAX_HEAD_BYTES:
                self.refuse(Refusal(431, "request head too large", metric="headers_too_large"))
            else:
                self.head_buf = buf
            return
        if end > http1.MAX_HEAD_BYTES:
            self.refuse(Refusal(431, "request head too large", metric="headers_too_large"))
            return
        self.head_buf = b""
        self.pending = buf[end + 4:]
        s.state = advance(s.state, Event.REQUEST)
        self.transport.pause_reading()
        try:
            head = http1.parse_request(buf[:end])
        except Refusal as r:
            self.refuse(r)
            return
        self.node.loop.create_task(self._connect(head))

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        # Gone before the upgrade (or refused). The connect task notices.
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        self.s.lost_before_live()

    def refuse(self, r: Refusal) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        s = self.s
        if s.state is State.REFUSED or s.client.gone:
            return
        s.state = advance(s.state, Event.REFUSED)
        self.node.refused(s, r.metric, r.status)
        self.transport.write(http1.response(r.status, r.reason, r.headers))
        self.transport.close()

    async def _connect(self, head: http1.RequestHead) -> None:
        try:
            await self.connect(head)
        except Refusal as r:
            self.refuse(r)
        except Exception:
            session_log.exception("handshake failed",
                                  extra={"fields": {"event": "handshake_error", "conn": self.s.id}})
            self.refuse(Refusal(500, "internal error", metric="internal_error"))
        if self.resume is not None and self.s.state is not State.OPEN:
            await resume.release(self.node, self.resume["session"])   # not live: the next attempt may take it

    # ------------------------------------------------------------ the request
    async def connect(self, head: http1.RequestHead) -> None:
        """Admission, route, auth, connect event, dial: a live session or a Refusal."""
        node = self.node
        s = self.s
        lim = node.limits
        h = head.headers
        if node.refusing:
            raise Refusal(503, "node draining", metric="draining", headers=(("Retry-After", "5"),))
        if node.cluster is not None and node.cluster.refuses_new():
            raise Refusal(503, "session store unavailable", metric="store_unavailable",
                          headers=(("Retry-After", "5"),))
        if node.per_ip.get(s.ip, 0) > lim.max_connections_per_ip:
            raise Refusal(429, "too many connections from this address", metric="per_ip_limit")
        if node.sockets > lim.max_connections:
            raise Refusal(503, "node at capacity", metric="capacity", headers=(("Retry-After", "5"),))
        routing = node.routing
        candidates = list(routing.router.candidates(head.path, h.get("host", ""), h, head.query))
        if not candidates:
            raise Refusal(404, "no route", metric="no_route")
        key = check_upgrade(head)
        identity = node.identity
        identity.check_origin(head)
        client_offer = auth.parse_subprotocols(h.get("sec-websocket-protocol"))
        token, offered = identity.token(head, client_offer)
        # gateway.reliable.v1 is between the client and the gateway: never offered upstream.
        wants_reliable = reliable.SUBPROTOCOL in offered
        if wants_reliable:
            offered = [p for p in offered if p != reliable.SUBPROTOCOL]
        resume_token = resume.requested(head)
        resumed_reliable = None   # (config, up, last) of a reliable session's resume
        drop_params = identity.query_params
        if resume_token is not None:
            route, claims, rec = await resume.claim(node, resume_token, token, candidates)
            self.resume = rec
            s.session_id = rec["session"]
            drop_params += ("resume", "last")
            if rec.get("reliable"):
                resumed_reliable = await resume.reliable_counts(node, rec, route, head, wants_reliable)
        else:
            route, claims = await self._pick_route(candidates, token)
        s.route = route
        s.claims = claims
        if claims is not None and isinstance(claims.get("sub"), str):
            s.sub = claims["sub"]
        plan = routing.plans[route.name]
        # Sticky for the session's life (a resume keeps it); None: routed by content (select).
        name = plan.pick() if self.resume is None else resume.backend_of(self.resume, plan, routing)
        s.backend = name
        backend = routing.config.backends[name] if name is not None else None
        link = None   # what http backends keep per session; made lazily unless needed now
        hash_on = backend.hash_on if backend is not None and backend.type == "http" else None
        if plan.connect is not None or plan.disconnect is not None or hash_on is not None:
            link = httpbackend.link(s, routing.forward_claims, hash_key(hash_on, head, s, claims), plan)
        greeting = b""
        welcome = None
        rel = route.route.reliable if wants_reliable and self.resume is None else None
        if resumed_reliable is not None:
            rel = resumed_reliable[0]
        if self.resume is not None:
            if link is not None:
                link.connected = True              # no second connect event; its requests say so instead
                link.base["Gateway-Resumed"] = "1"
        elif plan.connect is not None:
            welcome = await plan.connect.connect(s, link, client_headers(head, s, identity, token),
                                                 client_target(head, identity.query_params))
            if s.client.gone:
                if plan.disconnect is not None:
                    plan.disconnect.disconnect(s)
                return
        elif link is not None:
            link.connected = True
        if backend is None or backend.type != "websocket":
            s.sink = plan.actions if backend is None else routing.sinks[backend.name]
            protocol = None if offered else own_offer(client_offer)
            if rel is not None:   # an HTTP backend (config allows no other sink): numbered as a websocket's
                protocol = reliable.SUBPROTOCOL
                greeting = make_reliable(s, rel, *(resumed_reliable or (None, 0, 0))[1:])
            greeting += welcome_frame(s, welcome)
            self._go_live(routing, route, frames.accept_key(key), protocol, None, None, b"", greeting)
            if welcome is not None:
                plan.connect.apply_channels(s, welcome)
            return
        pool = routing.pools[backend.name]
        forwarded, deflate_offer = upstream_headers(head, s, route.name, identity, token, claims)
        if rel is not None:
            deflate_offer = ""   # the kind byte is stripped and added on plain payloads
        if self.resume is not None:
            forwarded.append(("Gateway-Resumed", "1"))
        if offered:
            forwarded.append(("Sec-WebSocket-Protocol", ", ".join(offered)))
        if deflate_offer:
            forwarded.append(("Sec-WebSocket-Extensions", deflate_offer))

        def target_for(ep) -> str:
            return upstream_target(ep.path, ep.query, route, head.path, head.query_string, drop_params)

        try:
            ep, transport, resp, leftover = await pool.dial_any(hash_key(backend.hash_on, head, s, claims),
                                                                target_for, forwarded, backend.connect_timeout_s)
        except UpstreamRefused as exc:
            # The backend's own answer (401, 403, 404...): pass it on.
            raise Refusal(exc.status, "refused by backend", metric="backend_refused") from None
        except NoBackendAvailable:
            raise Refusal(502, "no backend available", metric="upstream_unavailable") from None
        protocol = resp.headers.get("sec-websocket-protocol")
        extensions = resp.headers.get("sec-websocket-extensions")
        if (protocol and protocol not in offered) or (extensions and not (
                deflate_offer and extensions.lower().lstrip().startswith("permessage-deflate"))):
            transport.abort()
            raise Refusal(502, "backend chose what the client did not offer", metric="upstream_protocol")
        if s.client.gone:
            transport.abort()
            return
        s.endpoint = ep
        ep.active += 1
        s.deflate = bool(extensions)
        if backend.on_upstream_close == "reattach":   # what a move to another endpoint needs (reattach.py)
            s.redial = reattach.Redial(backend.name, hash_key(backend.hash_on, head, s, claims), target_for,
                                       forwarded, resp.headers.get("sec-websocket-protocol"), extensions)
        if rel is not None:
            protocol = reliable.SUBPROTOCOL
            greeting = make_reliable(s, rel, *(resumed_reliable or (None, 0, 0))[1:])
        elif not protocol and not offered:
            protocol = own_offer(client_offer)
        greeting += welcome_frame(s, welcome)
        self._go_live(routing, route, frames.accept_key(key), protocol, extensions, transport, leftover, greeting)
        if welcome is not None:
            plan.connect.apply_channels(s, welcome)

    async def _pick_route(self, candidates, token: str | None):
        """The first candidate whose auth and claims hold. Returns (route, claims)."""
        claims = None
        claims_failed = False
        for route in candidates:
            if route.wants_token and claims is None and (token is not None or route.needs_token):
                claims = await self.node.identity.verify(token)   # 401 on any problem with the token
            if route.match.claims and not auth.claims_match(dict(route.match.claims), claims or {}):
                claims_failed = True
                continue
            return route, (claims if route.wants_token else None)
        if claims_failed:
            raise Refusal(403, "claims do not match", metric="claims")
        raise Refusal(404, "no route", metric="no_route")

    def _go_live(self, routing, route, accept: str, protocol, extensions, upstream, leftover: bytes,
                 greeting: bytes) -> None:
        s = self.s
        if s.client.gone:
            # The client left while we authorised or dialled: nothing to go live for.
            if upstream is not None:
                upstream.abort()
            return
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        exp = s.claims.get("exp") if s.claims else None
        if isinstance(exp, (int, float)) and not isinstance(exp, bool):
            # Close at exp; a token accepted inside the leeway closes when the leeway ends.
            left = exp - time.time()
            if left <= 0:
                left += self.node.identity.jwt.leeway_s
            s.expiry_timer = self.node.loop.call_later(max(0.0, left), s.gateway_close, POLICY_VIOLATION,
                                                       "token expired")
        response = http1.switching_protocols(accept, protocol, extensions) + greeting
        pending = self.pending
        self.pending = b""
        self.node.open_session(s, routing.route_metrics[route.name], response, upstream, leftover, pending,
                               self.resume)


# ------------------------------------------------------------------ helpers
def welcome_frame(s, welcome) -> bytes:
    """The connect event's 200 reply with a body: the first message, riding with the
    101 (after a reliable session's hello, numbered), so nothing can come before it."""
    if welcome is None or welcome.status != 200 or not welcome.body:
        return b""
    s.u_msgs += 1
    opcode = httpbackend.reply_opcode(welcome.content_type, welcome.body)
    return s.numbered(opcode, welcome.body) if s.rel is not None else frames.frame(opcode, welcome.body)


def check_upgrade(head: http1.RequestHead) -> str:
    """The request is a WebSocket upgrade we speak; returns its Sec-WebSocket-Key."""
    h = head.headers
    upgrade = h.get("upgrade", "")
    connection = h.get("connection", "")
    # The usual one-token values first; header_tokens for lists ("keep-alive, Upgrade").
    if (upgrade.lower() != "websocket" and "websocket" not in http1.header_tokens(upgrade)) or \
            (connection.lower() != "upgrade" and "upgrade" not in http1.header_tokens(connection)):
        raise Refusal(426, "websocket upgrade required", metric="not_websocket",
                      headers=(("Upgrade", "websocket"), ("Sec-WebSocket-Version", "13")))
    if head.method != "GET":
        raise Refusal(405, "method not allowed", metric="bad_request")
    # One reading of the bytes after the head: they are WebSocket frames. A body would
    # make them ambiguous (a smuggled request to whoever reads it the other way).
    if "transfer-encoding" in h or h.get("content-length", "0") != "0":
        raise Refusal(400, "an upgrade request has no body", metric="bad_request")
    if "," in h.get("host", ""):   # two Host headers, joined (RFC 9112 3.2: 400)
        raise Refusal(400, "more than one Host", metric="bad_request")
    if h.get("sec-websocket-version") != "13":
        raise Refusal(426, "unsupported websocket version", metric="bad_version",
                      headers=(("Sec-WebSocket-Version", "13"),))
    key = h.get("sec-websocket-key", "")
    if not frames.valid_client_key(key):
        raise Refusal(400, "bad Sec-WebSocket-Key", metric="bad_request")
    return key


def client_target(head: http1.RequestHead, drop_params: tuple[str, ...]) -> str:
    """The client's path and query, without credentials the gateway consumed."""
    query = strip_query(head.query_string, drop_params)
    path = encode_path(head.path)
    return f"{path}?{query}" if query else path


def client_headers(head: http1.RequestHead, s: Session, identity, token: str | None) -> list[tuple[str, str]]:
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


def upstream_headers(head: http1.RequestHead, s: Session, route: str, identity, token: str | None,
                     claims: dict | None) -> tuple[list[tuple[str, str]], str]:
    """Client headers to pass on, with the gateway's own. Returns (headers, deflate offer)."""
    out = client_headers(head, s, identity, token)
    h = head.headers
    out += [
        ("Gateway-Connection-Id", s.id),
        ("Gateway-Session-Id", s.session_id),
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


def hash_key(hash_on: str | None, head: http1.RequestHead, s: Session, claims) -> str | None:
    """The value a consistent-hash backend hashes this session on (`hash_on`)."""
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
