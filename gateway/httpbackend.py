"""HTTP backends: every client message becomes a POST; lifecycle events too.

The contract (DESIGN 5): a message is POSTed with its raw body
(`text/plain; charset=utf-8` or `application/octet-stream`) and the gateway's
headers (`Gateway-Event: message`, `Gateway-Connection-Id`,
`Gateway-Session-Id`, `Gateway-Route`, `Gateway-Client-IP`,
`Gateway-Claim-<name>`). The reply: 200 with a body -> one message to the
client (text when the content type is text/*, JSON or absent and the body is
UTF-8, binary otherwise), 204 -> nothing, `Gateway-Subscribe` /
`Gateway-Unsubscribe` -> channel changes, anything else (5xx, 4xx, timeout,
unreachable) -> counted and logged (throttled), the connection stays.

Order: messages of one connection reach one backend in order, one request
in flight at a time, with at most `max_queue` waiting (more -> close 1013).
One task runs per busy (connection, backend) pair and works through its
queue; an idle pair costs nothing. Events: `connect` runs before the
upgrade (its 4xx refuses the client with that status); `disconnect` runs
once per ended session, after the messages still queued for that backend.

All backends of a node share one aiohttp ClientSession (`HttpClient`), so
connections to backends are pooled and kept alive.

Metrics are counted per message in local books (metrics.LocalHistogram and
LocalCounter, bound once per backend: no lock, no label lookup) and flushed
every metrics.FLUSH_S and at each scrape. Two latencies per message:
the round trip (POST call to reply body read, as aiohttp sees it, so its own
request building and reply parsing are in it) and what the gateway adds
(message read from the client, or the end of the request it queued behind, to
its reply written to the client, minus that round trip: task start, headers,
the reply's frame and write). A request that gets no answer (timeout,
unreachable) is counted by result and timed in neither.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

import aiohttp
import orjson
from prometheus_client import Counter
from yarl import URL

from . import frames, metrics
from .auth import forward_claim_headers
from .channels import ChannelError, parse_list
from .errors import TRY_AGAIN_LATER, Refusal, ReplyTooLarge
from .frames import OP_BINARY, OP_TEXT
from .session import State
from .upstream import BackendPool

log = logging.getLogger("gateway.http")

TEXT_TYPE = "text/plain; charset=utf-8"
BINARY_TYPE = "application/octet-stream"
_DISCONNECT = -1  # a queue item that is the disconnect event, not a message

requests_total = Counter("gateway_http_backend_requests_total",
                         "Requests to HTTP backends, by event and result "
                         "(ok, client_error, server_error, timeout, unreachable, error)",
                         ["backend", "event", "result"])
queue_overflows = Counter("gateway_http_backend_queue_overflows_total",
                          "Sessions closed (1013) because their queue to an HTTP backend was full", ["backend"])


class HttpClient:
    """One aiohttp ClientSession per node, and the tasks that use it."""

    def __init__(self, limit: int = 1024, keepalive_s: float = 30.0):
        self.limit = limit
        self.keepalive_s = keepalive_s
        self.session: aiohttp.ClientSession | None = None
        self.tasks: set[asyncio.Task] = set()
        self.flusher = metrics.Flusher()

    def start(self) -> None:
        self.flusher.start(asyncio.get_running_loop())
        if self.session is None:
            connector = aiohttp.TCPConnector(limit=self.limit, keepalive_timeout=self.keepalive_s,
                                             enable_cleanup_closed=False)
            self.session = aiohttp.ClientSession(connector=connector, auto_decompress=True,
                                                 skip_auto_headers=("User-Agent",),
                                                 headers={"User-Agent": "gateway"})

    def spawn(self, coro) -> asyncio.Task:
        task = asyncio.ensure_future(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def close(self, timeout: float = 5.0) -> None:
        """Let requests in flight (disconnect events above all) finish, then close."""
        if self.tasks:
            await asyncio.wait(set(self.tasks), timeout=timeout)
        for task in list(self.tasks):
            task.cancel()
        if self.session is not None:
            await self.session.close()
            self.session = None
        self.flusher.stop()


class _Conn:
    """One session's queue to one backend."""

    __slots__ = ("queue", "busy")

    def __init__(self):
        self.queue: collections.deque = collections.deque()
        self.busy = False


class SessionLink:
    """What HTTP backends and events keep per session (`session.sink_state`).

    The header dicts are built once per session and reused for every request.
    """

    __slots__ = ("conns", "hash_key", "base", "text_headers", "binary_headers", "events", "connected",
                 "disconnected")

    def __init__(self, session, forward_claims=("sub",), hash_key: str | None = None, events=None):
        self.conns: dict[object, _Conn] = {}
        self.hash_key = hash_key
        self.events = events            # the route's Events, if it has any
        self.connected = False          # a connect event accepted (or none configured)
        self.disconnected = False       # the disconnect event has been sent (once only)
        self.base = base_headers(session, forward_claims)
        self.text_headers = None
        self.binary_headers = None

    def message_headers(self, opcode: int) -> dict:
        if opcode == OP_TEXT:
            h = self.text_headers
            if h is None:
                h = self.text_headers = {**self.base, "Gateway-Event": "message", "Content-Type": TEXT_TYPE}
        else:
            h = self.binary_headers
            if h is None:
                h = self.binary_headers = {**self.base, "Gateway-Event": "message", "Content-Type": BINARY_TYPE}
        return h


def posting(session) -> bool:
    """Whether messages of this session are still queued or in flight to an HTTP backend."""
    st = session.sink_state
    return st is not None and any(c.busy for c in st.conns.values())


def base_headers(session, forward_claims=("sub",)) -> dict[str, str]:
    route = session.route
    out = {
        "Gateway-Connection-Id": session.id,
        "Gateway-Session-Id": session.session_id,
        "Gateway-Route": getattr(route, "name", None) or str(route),
        "Gateway-Client-IP": session.ip,
    }
    claims = session.claims
    if claims:
        # The same names and value forms as a websocket upstream gets (auth.py):
        # sub always, values with control characters dropped.
        out.update(forward_claim_headers(forward_claims, claims))
    return out


def link(session, forward_claims=("sub",), hash_key: str | None = None, events=None) -> SessionLink:
    """Attach a SessionLink to `session` (idempotent)."""
    st = session.sink_state
    if st is None:
        st = session.sink_state = SessionLink(session, forward_claims, hash_key, events)
    return st


def reply_opcode(content_type: str | None, body: bytes) -> int:
    """DESIGN 5: text if the content type is text/*, JSON or absent and the body is UTF-8."""
    if content_type:
        mime = content_type.partition(";")[0].strip().lower()
        if not (mime.startswith("text/") or mime == "application/json" or mime.endswith("+json")):
            return OP_BINARY
    return OP_TEXT if frames.text_is_valid(body) else OP_BINARY


async def read_capped(resp: aiohttp.ClientResponse, cap: int) -> bytes:
    n = resp.content_length
    if n is not None:
        if n > cap:
            raise ReplyTooLarge()
        return await resp.read()
    chunks = []
    size = 0
    async for chunk in resp.content.iter_chunked(65536):
        size += len(chunk)
        if size > cap:
            raise ReplyTooLarge()
        chunks.append(chunk)
    return b"".join(chunks)


class Reply:
    __slots__ = ("status", "body", "content_type", "subscribe", "unsubscribe", "round_trip")

    def __init__(self, status: int, body: bytes, content_type: str | None, subscribe: str | None,
                 unsubscribe: str | None):
        self.round_trip = 0.0   # seconds, set by HttpBackend.request
        self.status = status
        self.body = body
        self.content_type = content_type
        self.subscribe = subscribe
        self.unsubscribe = unsubscribe


class _EventBooks:
    """One event's local books for one backend: requests by result, round trips."""

    __slots__ = ("event", "round_trip", "ok", "client_error", "server_error", "timeout", "unreachable", "error")

    def __init__(self, backend: str, event: str):
        self.event = event
        self.round_trip = metrics.local(metrics.http_round_trip, backend, event)
        for result in self.__slots__[2:]:
            setattr(self, result, metrics.local(requests_total, backend, event, result))


class _Throttle:
    """At most one log line per `every_s` per backend; the rest are counted into the next one."""

    __slots__ = ("every_s", "next_at", "suppressed")

    def __init__(self, every_s: float = 1.0):
        self.every_s = every_s
        self.next_at = 0.0
        self.suppressed = 0

    def allow(self) -> int | None:
        now = time.monotonic()
        if now < self.next_at:
            self.suppressed += 1
            return None
        self.next_at = now + self.every_s
        n = self.suppressed
        self.suppressed = 0
        return n


class HttpBackend:
    """A `type: http` backend: a message sink and the target of lifecycle events."""

    def __init__(self, spec, node, client: HttpClient):
        self.spec = spec
        self.name = spec.name
        self.node = node
        self.client = client
        self.pool = BackendPool(spec)
        self.urls = {id(ep): URL(ep.url) for ep in self.pool.endpoints}
        self.max_queue = spec.max_queue
        self.timeout = aiohttp.ClientTimeout(total=spec.timeout_s, connect=spec.connect_timeout_s)
        self._connect = _EventBooks(spec.name, "connect")
        self._message = _EventBooks(spec.name, "message")
        self._disconnect = _EventBooks(spec.name, "disconnect")
        self._added = metrics.local(metrics.http_added, spec.name)
        self._dial_failures = {id(ep): metrics.local(metrics.upstream_failures, spec.name, ep.url)
                               for ep in self.pool.endpoints}
        self._overflow_metric = queue_overflows.labels(spec.name)
        self._throttle = _Throttle()
        # Plain counts, also shown by the management API.
        self.sent = 0
        self.failed = 0
        self.overflows = 0

    # ------------------------------------------------------------ messages
    def on_message(self, session, opcode: int, payload: bytes) -> None:
        st = session.sink_state
        if st is None:
            st = link(session, self._forward_claims())
        conn = st.conns.get(self)
        if conn is None:
            conn = st.conns[self] = _Conn()
        if conn.busy:
            if len(conn.queue) >= self.max_queue:
                self.overflows += 1
                self._overflow_metric.inc()
                self._log("http_queue_full", session, max_queue=self.max_queue)
                session.gateway_close(TRY_AGAIN_LATER, f"backend queue full (max {self.max_queue})")
                return
            conn.queue.append((opcode, payload))
            return
        conn.busy = True
        self.client.spawn(self._work(session, st, conn, opcode, payload, time.monotonic()))

    def on_close(self, session) -> None:
        # Messages already taken from the client are still delivered, then
        # the disconnect event (queued behind them); a worker waiting for a
        # reliable window's room goes on (the replies go nowhere or to the capture).
        if session.rel is not None:
            session.wake_room()

    async def _work(self, session, st: SessionLink, conn: _Conn, opcode: int, payload: bytes,
                    ready: float) -> None:
        """Work through the queue. `ready`: when the current item could start
        (taken from the client, or the previous item's end)."""
        try:
            while True:
                try:
                    if opcode == _DISCONNECT:
                        await self._send_disconnect(session, st)
                        ready = time.monotonic()
                    else:
                        rel = session.rel
                        if rel is not None and rel.window.full:
                            await session.window_room()   # reliable mode: the reply must fit (docs/reliable.md)
                        ready = await self._send_message(session, st, opcode, payload, ready)
                except Exception:  # a bug here must not stall the queue or vanish
                    log.exception("http backend error", extra={"fields": {
                        "event": "http_backend_error", "conn": session.id, "backend": self.name}})
                    ready = time.monotonic()
                if not conn.queue:
                    break
                opcode, payload = conn.queue.popleft()
        finally:
            conn.busy = False

    async def _send_message(self, session, st: SessionLink, opcode: int, payload: bytes, ready: float) -> float:
        """POST one message and apply the reply; returns when it was done (monotonic)."""
        reply = await self.request(st, st.message_headers(opcode), payload, self._message, session)
        if reply is None:
            return time.monotonic()
        if 200 <= reply.status < 300:
            self.apply(session, reply)
        else:
            self._failed("message", session, status=reply.status)
        done = time.monotonic()
        self._added.observe(done - ready - reply.round_trip)
        return done

    def apply(self, session, reply: Reply) -> None:
        """A 2xx reply: channel changes first, then the body (so a reply that
        joins a channel and says so arrives after the join took effect)."""
        self.apply_channels(session, reply)
        if reply.status == 200 and reply.body:
            session.send_reply(reply_opcode(reply.content_type, reply.body), reply.body)

    def apply_channels(self, session, reply: Reply) -> None:
        channels = self.node.channels
        if reply.unsubscribe:
            for name in parse_list(reply.unsubscribe):
                channels.unsubscribe(session, name)
        if reply.subscribe and session.state is State.OPEN:
            for name in parse_list(reply.subscribe):
                try:
                    channels.subscribe(session, name)
                except ChannelError as exc:
                    self._log("http_bad_subscribe", session, error=str(exc))

    # ------------------------------------------------------------ events
    async def connect(self, session, st: SessionLink, client_headers=(), path: str = "/") -> Reply:
        """The connect event, before the upgrade. Returns the 2xx reply or raises Refusal."""
        headers = [*client_headers, *st.base.items(), ("Gateway-Event", "connect"), ("Gateway-Path", path)]
        reply = await self.request(st, headers, b"", self._connect, session)
        if reply is None:
            raise Refusal(502, "connect backend unavailable", metric="connect_backend_failed")
        if 200 <= reply.status < 300:
            st.connected = True
            return reply
        if 400 <= reply.status < 500:
            raise Refusal(reply.status, "refused by backend", metric="connect_refused")
        self._failed("connect", session, status=reply.status)
        raise Refusal(502, "connect backend failed", metric="connect_backend_failed")

    def disconnect(self, session) -> None:
        """Send the disconnect event once, behind the messages still queued for this backend."""
        st = session.sink_state
        if st is None:
            st = link(session, self._forward_claims())
        if st.disconnected:
            return
        st.disconnected = True
        conn = st.conns.get(self)
        if conn is None:
            conn = st.conns[self] = _Conn()
        if conn.busy:
            conn.queue.append((_DISCONNECT, b""))  # not bounded by max_queue: one per session
        else:
            conn.busy = True
            self.client.spawn(self._work(session, st, conn, _DISCONNECT, b"", 0.0))

    async def _send_disconnect(self, session, st: SessionLink) -> None:
        code = session.close_code
        headers = {**st.base, "Gateway-Event": "disconnect", "Gateway-Close-Code": str(code),
                   "Gateway-Closed-By": session.closer or "client", "Content-Type": "application/json"}
        body = orjson.dumps({"code": code, "reason": session.close_reason, "by": session.closer or "client"})
        reply = await self.request(st, headers, body, self._disconnect, session)
        if reply is not None and not 200 <= reply.status < 300:
            self._failed("disconnect", session, status=reply.status)

    # ------------------------------------------------------------ the request
    async def request(self, st: SessionLink, headers, body: bytes, books: _EventBooks, session) -> Reply | None:
        """POST to the first endpoint that takes the connection. None on failure (counted, logged)."""
        event = books.event
        http = self.client.session
        if http is None:
            books.unreachable.n += 1
            self._failed(event, session, why="http client not started")
            return None
        # The session's own limit, fixed when it went live; the node's for a connect event
        # (before that) and for a session rebuilt from another node's record (cluster.LostSession).
        lim = getattr(session, "limits", None) or self.node.live_limits
        cap = lim.max_message_bytes
        sent = time.monotonic()
        for ep in self.pool.order(st.hash_key):
            try:
                async with http.post(self.urls[id(ep)], data=body, headers=headers, timeout=self.timeout,
                                     allow_redirects=False) as resp:
                    status = resp.status
                    data = await read_capped(resp, cap) if status == 200 else b""
                    h = resp.headers
                    reply = Reply(status, data, h.get("Content-Type"), h.get("Gateway-Subscribe"),
                                  h.get("Gateway-Unsubscribe"))
            except (aiohttp.ClientConnectorError, aiohttp.ConnectionTimeoutError):
                # Nothing was sent: safe to try the next endpoint.
                self._dial_failures[id(ep)].n += 1
                self.pool.dial_failed(ep)
                continue
            except (asyncio.TimeoutError, aiohttp.ServerTimeoutError):
                books.timeout.n += 1
                self._failed(event, session, why=f"timeout after {self.spec.timeout_s}s", endpoint=ep.url)
                return None
            except ReplyTooLarge:
                books.error.n += 1
                self._failed(event, session, why=f"reply too large (max {cap} bytes)", endpoint=ep.url)
                return None
            except aiohttp.ClientError as exc:
                books.error.n += 1
                self._failed(event, session, why=type(exc).__name__, endpoint=ep.url)
                return None
            reply.round_trip = rtt = time.monotonic() - sent
            books.round_trip.observe(rtt)
            self.pool.dial_succeeded(ep)
            self.sent += 1
            (books.ok if status < 300 else books.client_error if status < 500 else books.server_error).n += 1
            return reply
        books.unreachable.n += 1
        self._failed(event, session, why="no endpoint reachable")
        return None

    # ------------------------------------------------------------ books
    def _forward_claims(self):
        jwt = getattr(getattr(self.node.config, "auth", None), "jwt", None)
        return jwt.forward_claims if jwt is not None else ("sub",)

    def _failed(self, event: str, session, **fields) -> None:
        self.failed += 1
        self._log("http_backend_failed", session, event_type=event, **fields)

    def _log(self, name: str, session, **fields) -> None:
        suppressed = self._throttle.allow()
        if suppressed is None:
            return
        if suppressed:
            fields["suppressed"] = suppressed
        log.warning(name, extra={"fields": {"event": name, "conn": session.id, "backend": self.name, **fields}})
