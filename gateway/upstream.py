"""Backend endpoints: choosing one, dialling it, knowing when it is unwell.

A pool orders its endpoints for each new session (round robin, least
connections or rendezvous hashing), skips the ones that are ejected (too many
consecutive dial failures, for a cool-down) or unhealthy (active checks), and
falls back to them only when nothing else is left. Draining endpoints
(`POST /v1/backends/{name}/endpoints/drain`, kept in the store so that every
node knows) are never chosen. `dial_any` tries them in that order until one
answers the upgrade: the handshake uses it for a new session, a reattach
(gateway/reattach.py) for an existing one, without the endpoint it leaves.
"""

from __future__ import annotations

import asyncio
import hashlib
import logging
import ssl
import time
from typing import Callable
from urllib.parse import urlsplit

from . import frames, http1, metrics
from .config import Backend
from .errors import NoBackendAvailable, UpstreamRefused
from .logs import event

log = logging.getLogger("gateway.upstream")

MAX_CONCURRENT_MOVES = 64   # per pool: a drained endpoint's sessions move in waves, not in one storm


class Endpoint:
    __slots__ = ("url", "host", "port", "tls", "path", "query", "host_header", "active", "failures",
                 "ejected_until", "healthy", "health_fails", "health_oks", "hash_seed")

    def __init__(self, url: str):
        parts = urlsplit(url)
        self.url = url
        self.tls = parts.scheme in ("wss", "https")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or (443 if self.tls else 80)
        self.path = parts.path or "/"
        self.query = parts.query
        default = 443 if self.tls else 80
        host = f"[{self.host}]" if ":" in self.host else self.host
        self.host_header = host if self.port == default else f"{host}:{self.port}"
        self.active = 0
        self.failures = 0
        self.ejected_until = 0.0
        self.healthy = True
        self.health_fails = 0
        self.health_oks = 0
        self.hash_seed = url.encode()

    def available(self, now: float) -> bool:
        return self.healthy and self.ejected_until <= now


class BackendPool:
    def __init__(self, spec: Backend):
        self.spec = spec
        self.name = spec.name
        self.endpoints = [Endpoint(u) for u in spec.endpoints]
        self._rr = 0
        self._health_task: asyncio.Task | None = None
        self.draining: set[str] = set()   # endpoint URLs no session is sent to (the store's, as last read)
        # Called with (pool, endpoint) when an active check finds an endpoint unhealthy (reattach).
        self.on_unhealthy: Callable[[BackendPool, Endpoint], None] | None = None
        self.moves = asyncio.Semaphore(MAX_CONCURRENT_MOVES)   # reattach dials in flight

    # ---- choosing
    def order(self, hash_key: str | None, leaving: str | None = None) -> list[Endpoint]:
        """Endpoints to try for one new session (or one that is `leaving` an endpoint), best first."""
        now = time.monotonic()
        skip = self.draining
        eps = self.endpoints if not skip and leaving is None else \
            [e for e in self.endpoints if e.url not in skip and e.url != leaving]
        if not eps:
            return []
        n = len(eps)
        balance = self.spec.balance
        if balance == "consistent_hash" and hash_key is not None:
            # Rendezvous hashing: adding or removing an endpoint moves only the
            # sessions that hashed to it, and the fallback order is stable.
            key = hash_key.encode()
            ranked = sorted(eps, key=lambda e: hashlib.blake2b(key + b"\0" + e.hash_seed, digest_size=8).digest(),
                            reverse=True)
        else:
            start = self._rr % n
            self._rr += 1
            ranked = eps[start:] + eps[:start]
            if balance == "least_connections":
                ranked.sort(key=lambda e: e.active)  # stable: ties keep round-robin order
        good = [e for e in ranked if e.available(now)]
        return good + [e for e in ranked if not e.available(now)]

    def dial_failed(self, ep: Endpoint) -> None:
        ep.failures += 1
        if ep.failures >= self.spec.eject_after_failures:
            ep.ejected_until = time.monotonic() + self.spec.eject_cooldown_s
            metrics.upstream_ejections.labels(self.name, ep.url).inc()
            log.warning("endpoint ejected", extra={"fields": {"event": "endpoint_ejected", "backend": self.name,
                                                              "endpoint": ep.url, "failures": ep.failures}})

    def dial_succeeded(self, ep: Endpoint) -> None:
        ep.failures = 0
        ep.ejected_until = 0.0

    # ---- dialling
    async def dial_any(self, hash_key: str | None, target_for, headers: list[tuple[str, str]],
                       timeout: float, leaving: str | None = None
                       ) -> tuple[Endpoint, asyncio.Transport, http1.ResponseHead, bytes]:
        """Open a WebSocket to the first endpoint (in `order(hash_key, leaving)`) that takes it.

        `target_for(endpoint)` is the request target for that endpoint.
        Returns (endpoint, transport (paused), response head, bytes read past
        the head). An endpoint that cannot be reached or answers 5xx is
        counted (gateway_upstream_connect_failures_total, the
        `upstream_connect_failed` log line, ejection) and the next one is
        tried. A backend's own 4xx (401, 403, 404...) raises UpstreamRefused:
        that is its answer, not a failure. None answering raises
        NoBackendAvailable.
        """
        for ep in self.order(hash_key, leaving):
            try:
                transport, head, leftover = await dial(ep, target_for(ep), headers, timeout)
            except UpstreamRefused as exc:
                if exc.status < 500:
                    raise
                self._count_failure(ep)
                continue
            except (OSError, asyncio.TimeoutError, ValueError, ConnectionError):
                self._count_failure(ep)
                continue
            self.dial_succeeded(ep)
            return ep, transport, head, leftover
        raise NoBackendAvailable(self.name)

    def _count_failure(self, ep: Endpoint) -> None:
        self.dial_failed(ep)
        metrics.upstream_failures.labels(self.name, ep.url).inc()
        event(log, "upstream_connect_failed", logging.WARNING, backend=self.name, endpoint=ep.url)

    # ---- active health checks
    def start_health(self, session_factory=None) -> None:
        """Start the active checks (if configured); `session_factory` makes the
        aiohttp.ClientSession they use (one per pool)."""
        if self.spec.health is not None and self._health_task is None:
            if session_factory is None:
                import aiohttp

                session_factory = aiohttp.ClientSession
            self._health_task = asyncio.ensure_future(self._health_loop(session_factory))

    async def stop(self) -> None:
        if self._health_task is not None:
            self._health_task.cancel()
            try:
                await self._health_task
            except asyncio.CancelledError:
                pass
            self._health_task = None

    async def _health_loop(self, session_factory) -> None:
        h = self.spec.health
        import aiohttp

        timeout = aiohttp.ClientTimeout(total=h.timeout_s)
        async with session_factory() as http:
            while True:
                await asyncio.gather(*(self._check(http, ep, timeout) for ep in self.endpoints))
                await asyncio.sleep(h.interval_s)

    async def _check(self, http, ep: Endpoint, timeout) -> None:
        h = self.spec.health
        scheme = "https" if ep.tls else "http"
        url = f"{scheme}://{ep.host_header}{h.path}"
        try:
            async with http.get(url, timeout=timeout, allow_redirects=False) as resp:
                ok = 200 <= resp.status < 300
        except (OSError, asyncio.TimeoutError, Exception):  # any failure is "unhealthy"
            ok = False
        if ok:
            ep.health_fails = 0
            ep.health_oks += 1
            if not ep.healthy and ep.health_oks >= h.healthy_after:
                ep.healthy = True
                log.info("endpoint healthy", extra={"fields": {"event": "endpoint_healthy", "backend": self.name,
                                                               "endpoint": ep.url}})
        else:
            ep.health_oks = 0
            ep.health_fails += 1
            if ep.healthy and ep.health_fails >= h.unhealthy_after:
                ep.healthy = False
                log.warning("endpoint unhealthy", extra={"fields": {"event": "endpoint_unhealthy",
                                                                    "backend": self.name, "endpoint": ep.url}})
                if self.on_unhealthy is not None:
                    self.on_unhealthy(self, ep)


_client_tls: ssl.SSLContext | None = None


def client_tls() -> ssl.SSLContext:
    global _client_tls
    if _client_tls is None:
        _client_tls = ssl.create_default_context()
    return _client_tls


class Dialer(asyncio.Protocol):
    """Reads the upstream's answer to our upgrade request, then hands over."""

    __slots__ = ("request", "expect_accept", "buf", "transport", "done", "expired")

    def __init__(self, request: bytes, key: str, loop: asyncio.AbstractEventLoop | None = None):
        self.request = request
        self.expect_accept = frames.accept_key(key)
        self.buf = b""
        self.transport: asyncio.Transport | None = None
        self.done: asyncio.Future = (loop or asyncio.get_running_loop()).create_future()
        self.expired = False

    def connection_made(self, transport):
        self.transport = transport
        transport.write(self.request)

    def data_received(self, data: bytes) -> None:
        if self.done.done():
            # More bytes before the relay took over: keep them, in order.
            self.buf += data
            return
        self.buf += data
        end = self.buf.find(b"\r\n\r\n")
        if end < 0:
            if len(self.buf) > http1.MAX_HEAD_BYTES:
                self.done.set_exception(ValueError("upstream response head too large"))
            return
        try:
            head = http1.parse_response(self.buf[:end])
        except ValueError as exc:
            self.done.set_exception(exc)
            return
        self.buf = self.buf[end + 4:]
        if head.status != 101:
            self.done.set_exception(UpstreamRefused(head.status))
        elif head.headers.get("sec-websocket-accept") != self.expect_accept:
            self.done.set_exception(ValueError("bad Sec-WebSocket-Accept from upstream"))
        else:
            transport = self.transport
            transport.pause_reading()  # the relay resumes once it is wired in
            self.done.set_result(head)

    def connection_lost(self, exc) -> None:
        if not self.done.done():
            self.done.set_exception(ConnectionError("upstream closed during handshake"))

    def expire(self, task: asyncio.Task) -> None:
        """The dial's timeout: while connecting, cancel the connect (dial turns
        that into TimeoutError); once connected, fail the wait for the answer."""
        self.expired = True
        if self.transport is None:
            task.cancel()
        elif not self.done.done():
            self.done.set_exception(TimeoutError())


async def dial(ep: Endpoint, target: str, headers: list[tuple[str, str]], timeout: float):
    """Open a WebSocket to `ep`. Returns (transport, response head, leftover bytes).

    `timeout` bounds the connect and the upgrade together (TimeoutError). One
    timer, not an asyncio.timeout() block: that costs twice as much, and this
    runs for every new session (BENCHMARKS.md, "CPU per new session").
    """
    loop = asyncio.get_running_loop()
    key = frames.new_key()
    dialer = Dialer(http1.upgrade_request(target, ep.host_header, key, headers), key, loop)
    task = asyncio.current_task(loop)
    cancelling = task.cancelling()
    timer = loop.call_later(timeout, dialer.expire, task)
    transport = None
    try:
        transport, _ = await loop.create_connection(
            lambda: dialer, ep.host, ep.port,
            ssl=client_tls() if ep.tls else None, server_hostname=ep.host if ep.tls else None)
        head = await dialer.done
    except asyncio.CancelledError:
        if transport is not None:
            transport.abort()
        # Our own cancellation (the timer's), and nobody else's: a timeout.
        if dialer.expired and task.uncancel() <= cancelling:
            raise TimeoutError() from None
        raise
    except BaseException:
        if transport is not None:
            transport.abort()
        raise
    finally:
        timer.cancel()
    return transport, head, dialer.buf
