"""GatewayClient: one logical connection to the gateway that outlives its sockets.

One task (`_run`) owns the connection: it dials, reads until the socket
ends, asks policy.py what the end means, waits as backoff.py says, and
dials again. Everything else (send, request, iteration, close) talks to it
through the outbox, the pending requests and the inbox.

What is and is not guaranteed: across a drain (close 1012 with a resume
token) nothing is lost or doubled in either direction: the client's frames
written before the close reach the backend, the backend's later messages
wait in the gateway's replay buffer, and unsent messages wait in the
outbox. Across an unplanned drop (1006) messages in flight can be lost in
either direction, unless the client runs in reliable mode (`reliable=`,
docs/reliable.md): then both sides count, every connection starts with the
gateway's hello and its token, and any drop resumes with `last=`.
"""

from __future__ import annotations

import asyncio
import inspect
import json
import logging
import ssl
import time
from collections import deque
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping, Sequence
from types import TracebackType
from typing import Any, Literal, overload

import aiohttp
from yarl import URL

from . import policy
from .backoff import Backoff
from .correlation import RequestIds, reply_id
from .errors import AuthRefused, ClientClosed, HandshakeRefused, TooManyRequests
from .inbox import Inbox
from .outbox import Message, Outbox, Overflow
from .policy import Action, Verdict
from .reliable import SUBPROTOCOL, ProtocolError, Reliable, ReliableSession, ReliableUnavailable
from .states import State, advance
from .transport import Closed, Link, LinkLost, RefusalReader, ReliableLink, dial

log = logging.getLogger("gateway_client")

TokenProvider = Callable[[], str | None | Awaitable[str | None]]
UrlSource = str | URL | Callable[[], str | URL | Awaitable[str | URL]]

StateHandler = Callable[[State, State], object]
OpenHandler = Callable[[bool], object]
MessageHandler = Callable[[Message], object]
CloseHandler = Callable[[int | None, str, bool], object]
ErrorHandler = Callable[[BaseException], object]
ReasonHandler = Callable[[str], object]
CountHandler = Callable[[int], object]

EVENTS = ("state", "open", "message", "close", "error", "resume_failed", "dropped")


class GatewayClient:
    """An asyncio WebSocket client that reconnects, resumes and queues.

    ::

        async with GatewayClient("ws://127.0.0.1:8080/echo") as client:
            await client.send("hello")
            async for message in client:
                ...
    """

    def __init__(
        self,
        url: UrlSource,
        *,
        token: str | None = None,
        token_provider: TokenProvider | None = None,
        token_source: str = "header",
        headers: Mapping[str, str] | None = None,
        protocols: Sequence[str] = (),
        backoff: Backoff | None = None,
        stable_after_s: float = 5.0,
        connect_timeout_s: float = 10.0,
        heartbeat_s: float | None = 30.0,
        max_message_bytes: int = 4 << 20,
        max_queue_messages: int = 1000,
        max_queue_bytes: int = 1 << 20,
        overflow: Overflow = "raise",
        reliable: Reliable | None = None,
        max_inbox_messages: int = 1000,
        iterate: bool = True,
        id_field: str = "id",
        max_pending_requests: int = 1000,
        close_actions: Mapping[int, Action | str] | None = None,
        clock: Callable[[], float] = time.monotonic,
        ssl_context: ssl.SSLContext | bool = True,
    ) -> None:
        kind, _, name = token_source.partition(":")
        if kind not in ("header", "query", "cookie", "subprotocol") or (kind in ("query", "cookie")) != bool(name):
            raise ValueError(f"token_source {token_source!r}: expected 'header', 'subprotocol', 'query:NAME' "
                             f"or 'cookie:NAME' (as the gateway's auth.jwt.sources)")
        if max_pending_requests < 1 or max_inbox_messages < 1:
            raise ValueError("max_pending_requests and max_inbox_messages must be >= 1")
        if reliable not in (None, "prefer", "require"):
            raise ValueError(f"reliable must be None, 'prefer' or 'require' (got {reliable!r})")
        self._url = url
        self.token = token
        self._token_provider = token_provider
        self._token_kind, self._token_name = kind, name
        self._headers = dict(headers or {})
        self._protocols = tuple(protocols)
        self.backoff = backoff or Backoff()
        self._stable_after_s = stable_after_s
        self._connect_timeout_s = connect_timeout_s
        self._heartbeat_s = heartbeat_s
        self._max_message_bytes = max_message_bytes
        self._outbox = Outbox(max_queue_messages, max_queue_bytes, overflow)
        # Reliable mode keeps what was sent until acked, in a window with the queue's bounds.
        self._reliable = reliable
        self._rel = None if reliable is None else ReliableSession(max_queue_messages, max_queue_bytes, overflow)
        self._plain = False   # reliable="prefer" on a route without it: plain until close() and connect()
        self._stop_cause: BaseException | None = None
        self._inbox: Inbox[Message] = Inbox(max_inbox_messages)
        self._id_field = id_field
        self._ids = RequestIds()
        self._pending: dict[str, asyncio.Future[Any]] = {}
        self._max_pending = max_pending_requests
        self._close_actions = {int(k): Action(v) for k, v in (close_actions or {}).items()}
        self._clock = clock
        self._ssl = ssl_context
        self._handlers: dict[str, list[Callable[..., object]]] = {e: [] for e in EVENTS}
        self._handler_tasks: set[asyncio.Future[Any]] = set()
        self._iterate = iterate

        self.state = State.CLOSED
        self.resume_token: str | None = None   # held between a drain's 1012 and the resume
        self.attempt = 0                       # consecutive failures: the backoff exponent
        self.delays: deque[tuple[str, float]] = deque(maxlen=100)   # (action, seconds) of recent waits
        self.error: BaseException | None = None   # why the client closed, when it was not close()
        self.close_code: int | None = None
        self.close_reason = ""
        self._session: aiohttp.ClientSession | None = None
        self._refusals = RefusalReader()
        self._link: Link | None = None
        self._run_task: asyncio.Task[None] | None = None
        self._opened: asyncio.Future[None] | None = None
        self._write_lock = asyncio.Lock()
        self._closing = False
        self._ended = False      # closed after having been started (sends before connect() are queued)
        self._reauths = 0
        self._last_refusal: HandshakeRefused | None = None

    # ------------------------------------------------------------ events
    @overload
    def on(self, event: Literal["state"], handler: StateHandler) -> Callable[[], None]: ...
    @overload
    def on(self, event: Literal["open"], handler: OpenHandler) -> Callable[[], None]: ...
    @overload
    def on(self, event: Literal["message"], handler: MessageHandler) -> Callable[[], None]: ...
    @overload
    def on(self, event: Literal["close"], handler: CloseHandler) -> Callable[[], None]: ...
    @overload
    def on(self, event: Literal["error"], handler: ErrorHandler) -> Callable[[], None]: ...
    @overload
    def on(self, event: Literal["resume_failed"], handler: ReasonHandler) -> Callable[[], None]: ...
    @overload
    def on(self, event: Literal["dropped"], handler: CountHandler) -> Callable[[], None]: ...

    def on(self, event: str, handler: Callable[..., object]) -> Callable[[], None]:
        """Call `handler` on `event`; returns a function that removes it.

        Handlers run in the client's task: keep them short (a coroutine a
        handler returns is scheduled as a task)."""
        if event not in self._handlers:
            raise ValueError(f"unknown event {event!r} (known: {', '.join(EVENTS)})")
        self._handlers[event].append(handler)
        return lambda: self._handlers[event].remove(handler) if handler in self._handlers[event] else None

    def _emit(self, event: str, *args: object) -> None:
        for handler in list(self._handlers[event]):
            try:
                result = handler(*args)
                if inspect.isawaitable(result):
                    task = asyncio.ensure_future(result)
                    self._handler_tasks.add(task)
                    task.add_done_callback(self._handler_done)
            except Exception:
                log.exception("the %s handler %r raised", event, handler)

    def _handler_done(self, task: asyncio.Future[Any]) -> None:
        self._handler_tasks.discard(task)
        if not task.cancelled() and task.exception() is not None:
            log.error("an event handler raised", exc_info=task.exception())

    def _set_state(self, new: State) -> None:
        old = self.state
        if old is new:
            return
        self.state = advance(old, new)
        self._emit("state", old, new)

    # ------------------------------------------------------------ lifecycle
    async def connect(self) -> None:
        """Start, and wait until the first connection is open.

        Raises what made the client give up before that (HandshakeRefused,
        AuthRefused), or ClientClosed if close() came first. Cancelled (for
        example by a timeout around it), it closes the client."""
        if self.state is not State.CLOSED:
            raise RuntimeError(f"connect() on a client that is {self.state}")
        self._closing = False
        self._ended = False
        self._plain = False
        self._stop_cause = None
        self.error = None
        self.close_code, self.close_reason = None, ""
        self._inbox.reopen()
        self._set_state(State.CONNECTING)
        if self._session is None:
            self._session = aiohttp.ClientSession(trace_configs=[self._refusals.config])
        loop = asyncio.get_running_loop()
        self._opened = opened = loop.create_future()
        self._run_task = loop.create_task(self._run())
        try:
            await asyncio.shield(opened)
        except asyncio.CancelledError:
            await self.close()   # whoever waited gave up: no connection left trying behind their back
            raise

    async def close(self, code: int = 1000, reason: str = "") -> None:
        """Close for good: the socket (with `code`), the pending requests (ClientClosed), the
        iteration. Messages still queued are discarded."""
        self._closing = True
        link, task = self._link, self._run_task
        was_open = link is not None and self.state is State.OPEN
        if link is not None:
            try:
                await link.close(code, reason)
            except (ConnectionError, RuntimeError):
                pass   # already gone: nothing left to tell the server
        if task is not None and not task.done() and task is not asyncio.current_task():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if was_open:
            self.close_code, self.close_reason = code, reason
            self._emit("close", code, reason, False)
        self._finish(None)
        if self._session is not None:
            await self._session.close()
            self._session = None

    def _finish(self, error: BaseException | None) -> None:
        """Everything that ends with the client: state, waiters, queue, iteration."""
        self._link = None
        self._ended = True
        self._outbox.clear()
        if self._rel is not None:
            self._rel.clear()
        if error is not None and self.error is None:
            self.error = error
        if self.state is not State.CLOSED:
            self._set_state(State.CLOSED)
        closed = ClientClosed("client closed" if error is None else f"client closed: {error}")
        for fut in self._pending.values():
            if not fut.done():
                fut.set_exception(closed)
        self._pending.clear()
        if self._opened is not None and not self._opened.done():
            self._opened.set_exception(error or closed)
        self._inbox.end()

    async def __aenter__(self) -> GatewayClient:
        await self.connect()
        return self

    async def __aexit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                        tb: TracebackType | None) -> None:
        await self.close()

    # ------------------------------------------------------------ messages
    def __aiter__(self) -> AsyncIterator[Message]:
        return self

    async def __anext__(self) -> Message:
        """The next message (str for text, bytes for binary); ends when the client is closed."""
        if not self._iterate:
            raise RuntimeError("this client was made with iterate=False: messages come as 'message' events")
        return await self._inbox.get()

    @property
    def queued(self) -> int:
        """Messages accepted by send() and not yet written (on this connection)."""
        rel = self._live_rel()
        return len(self._outbox) + (rel.unsent if rel is not None else 0)

    @property
    def unacked(self) -> int:
        """Reliable mode: messages sent or queued that the gateway has not acked yet (else 0)."""
        rel = self._live_rel()
        return len(rel) if rel is not None else 0

    @property
    def reliable(self) -> bool:
        """Whether this client runs in reliable mode now (False once "prefer" went plain)."""
        return self._live_rel() is not None

    @property
    def reliable_token(self) -> str | None:
        """Reliable mode: the resume token of the last hello (single use), else None. An app
        that keeps it across its own restart can set it as `resume_token` before connect()."""
        rel = self._live_rel()
        return rel.token if rel is not None else None

    def _live_rel(self) -> ReliableSession | None:
        return None if self._plain else self._rel

    @property
    def pending_requests(self) -> int:
        """Requests awaiting their reply."""
        return len(self._pending)

    @property
    def dropped(self) -> int:
        """Messages dropped from the queue (or reliable mode's window) by overflow="drop_oldest", ever."""
        return self._outbox.dropped + (self._rel.window.dropped if self._rel is not None else 0)

    async def send(self, message: Message) -> None:
        """Send now if open, else queue for the next connection (in order, before later sends).
        Before connect(), messages are queued for the first connection.

        Raises QueueFull (overflow="raise") at the queue's bound, ClientClosed when closed."""
        if not isinstance(message, (str, bytes)):
            raise TypeError(f"send() takes str or bytes, not {type(message).__name__}")
        if self._ended:
            raise ClientClosed("send() on a closed client")
        rel = self._live_rel()
        if rel is not None:
            dropped = rel.push(message)   # kept until acked; goes out now if a connection is live
            if dropped:
                self._emit("dropped", dropped)
            if rel.live:
                await self._flush()
            return
        if self.state is State.OPEN and not self._outbox:
            async with self._write_lock:
                link = self._link
                if link is not None and self.state is State.OPEN and not self._outbox:
                    try:
                        await link.send(message)
                        return
                    except LinkLost:
                        pass   # not written: it waits for the next connection
        self._queue(message)
        if self.state is State.OPEN:
            await self._flush()

    def _queue(self, message: Message) -> None:
        dropped = self._outbox.push(message)
        if dropped:
            self._emit("dropped", dropped)

    async def _flush(self) -> None:
        """Write the queue, oldest first; a message leaves it only once written.
        Reliable mode: the window's messages not written on this connection."""
        async with self._write_lock:
            rel, link = self._live_rel(), self._link
            if rel is not None:
                while rel.live and rel.unsent and link is not None and self._link is link:
                    try:
                        await link.send(rel.next_unsent())
                    except LinkLost:
                        return   # the connection ends: the window is sent again after the next hello
                return
            while self._outbox and self._link is not None and self.state is State.OPEN:
                try:
                    await self._link.send(self._outbox.peek())
                except LinkLost:
                    return
                self._outbox.pop()

    async def request(self, obj: Mapping[str, Any], timeout: float = 10.0) -> Any:
        """Send `obj` as JSON with a fresh correlation id and return the decoded reply
        (the first JSON object whose id field matches). TimeoutError after `timeout`."""
        if self._id_field in obj:
            raise ValueError(f"request() sets the {self._id_field!r} field itself")
        if len(self._pending) >= self._max_pending:
            raise TooManyRequests(f"{len(self._pending)} requests await replies (max_pending_requests="
                                  f"{self._max_pending})")
        rid = self._ids.next()
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self._pending[rid] = fut
        try:
            await self.send(json.dumps({**obj, self._id_field: rid}))
            async with asyncio.timeout(timeout):
                return await fut
        finally:
            self._pending.pop(rid, None)

    async def _deliver(self, message: Message) -> None:
        rid = reply_id(message, self._id_field, self._pending)
        if rid is not None:
            fut = self._pending.pop(rid)
            if not fut.done():
                fut.set_result(json.loads(message))
            return
        self._emit("message", message)
        if self._iterate:
            await self._inbox.put(message)

    # ------------------------------------------------------------ the connection task
    async def _run(self) -> None:
        try:
            await self._loop()
        except asyncio.CancelledError:
            raise
        except Exception as exc:   # a bug here must not leave callers waiting forever
            log.exception("gateway client failed")
            self._emit("error", exc)
            self._finish(exc)
        if not self._closing and self._session is not None:
            # It ended by itself (a refusal, a normal close): nothing more to dial with.
            await self._session.close()
            self._session = None

    async def _loop(self) -> None:
        if self.token is None and self._token_provider is not None:
            self.token = await self._fetch_token()
        while not self._closing:
            verdict = await self._attempt()
            if self._closing:
                return
            delay = await self._plan(verdict)
            if delay is None:
                return
            self.delays.append((str(verdict.action), delay))
            if delay > 0:
                await asyncio.sleep(delay)

    async def _attempt(self) -> Verdict:
        """One connection, from dial to its end."""
        resuming = self.resume_token
        try:
            link = await dial(self._session_or_fail(), self._refusals, await self._target(),
                              headers=self._handshake_headers(), protocols=self._offer(),
                              timeout_s=self._connect_timeout_s, heartbeat_s=self._heartbeat_s,
                              max_message_bytes=self._max_message_bytes, ssl_context=self._ssl)
        except HandshakeRefused as refused:
            self._emit("error", refused)
            verdict = policy.after_refusal(refused.status, refused.reason, refused.retry_after_s,
                                           resume_token_held=resuming, reliable=self._live_rel() is not None)
            self._last_refusal = refused
            return verdict
        except (OSError, aiohttp.ClientError, asyncio.TimeoutError) as exc:
            self._emit("error", exc)
            return Verdict(Action.RECONNECT, resuming)
        self._last_refusal = None
        self._reauths = 0
        if self._live_rel() is not None:
            started = await self._reliable_start(link, resuming)
            if isinstance(started, Verdict):
                return started
            link = started
        self._link = link
        self.resume_token = None
        opened_at = self._clock()
        if resuming is not None:
            self.attempt = 0
        self._set_state(State.OPEN)
        self._emit("open", resuming is not None)
        if self._opened is not None and not self._opened.done():
            self._opened.set_result(None)
        await self._flush()
        while True:
            got = await link.receive()
            if isinstance(got, Closed):
                break
            await self._deliver(got)
        self._link = None
        if self._clock() - opened_at >= self._stable_after_s:
            self.attempt = 0
        self.close_code, self.close_reason = got.code, got.reason
        rel = self._live_rel()
        if rel is not None and isinstance(link, ReliableLink) and rel.token is not None:
            rel.closed()
            return policy.after_reliable_close(got.code, got.reason, token=rel.token, overrides=self._close_actions)
        return policy.after_close(got.code, got.reason, resume_token_held=resuming, overrides=self._close_actions)

    async def _reliable_start(self, link: Link, resuming: str | None) -> Link | Verdict:
        """Reliable mode's 101: take the hello and go on with the session, or go plain
        ("prefer" on a route without it), or give up ("require")."""
        rel = self._rel
        assert rel is not None
        if link.ws.protocol != SUBPROTOCOL:
            if self._reliable == "prefer":
                self._plain = True
                for message in rel.window.drain():   # the same bounds: it fits
                    self._outbox.push(message)
                rel.fresh()
                return link
            self._stop_cause = ReliableUnavailable(
                f"the gateway did not select {SUBPROTOCOL} (the route has no reliable:), "
                f"and this client requires it (reliable='require')")
            self._emit("error", self._stop_cause)
            await self._abandon(link)
            return Verdict(Action.STOP)
        rlink = ReliableLink(link.ws, rel, self._write_lock, lambda exc: self._emit("error", exc))
        why: str | None
        try:
            async with asyncio.timeout(self._connect_timeout_s):
                hello = await rlink.hello()
        except ProtocolError as exc:
            self._emit("error", exc)
            why = str(exc)
        except TimeoutError as exc:
            self._emit("error", exc)
            await self._abandon(link)
            return Verdict(Action.RECONNECT, resuming)
        else:
            if isinstance(hello, Closed):
                # Closed before its hello: a resume still holds its token (a 1013 "retry", or
                # a refusal the next attempt hears as 410 and reports).
                self.close_code, self.close_reason = hello.code, hello.reason
                if resuming is not None:
                    return policy.after_reliable_close(hello.code, hello.reason, token=resuming,
                                                       overrides=self._close_actions)
                return policy.after_close(hello.code, hello.reason, overrides=self._close_actions)
            why = rel.check(hello, resuming is not None)
            if why is None:
                rel.start(hello)
                return rlink
        # No hello, or counts that do not match: this session cannot go on without loss.
        assert why is not None
        await self._abandon(link)
        rel.fresh()
        self._emit("resume_failed", why)
        return Verdict(Action.RESUME)   # a fresh session, at once

    @staticmethod
    async def _abandon(link: Link) -> None:
        try:
            await link.close(1000)
        except (ConnectionError, RuntimeError):
            pass

    async def _plan(self, verdict: Verdict) -> float | None:
        """The wait before the next attempt, or None: the client closes."""
        action = verdict.action
        self.resume_token = verdict.resume_token
        was_open = self.state is State.OPEN
        delay: float | None
        if action is Action.STOP:
            delay = None
        elif action is Action.RESUME:
            delay = self.backoff.resume_delay()
        elif action is Action.RESUME_FAILED:
            if self._rel is not None:
                self._rel.fresh()   # what was not acked goes again on the new session
            refusal = self._last_refusal
            self._emit("resume_failed", refusal.reason if refusal is not None else "")
            delay = self.backoff.resume_delay()
        elif action is Action.RETRY_AFTER:
            delay = self.backoff.retry_after_delay(verdict.retry_after_s or 0.0)
        elif action is Action.TRY_LATER:
            delay = self.backoff.try_again_delay(self.attempt)
            self.attempt += 1
        elif action is Action.REAUTH:
            delay = await self._reauth()
        else:
            delay = self.backoff.delay(self.attempt)
            self.attempt += 1
        if was_open:
            self._emit("close", self.close_code, self.close_reason, delay is not None)
        if delay is None:
            self._finish(self._stop_error(action))
        else:
            self._set_state(State.RECONNECTING if self.state is State.OPEN else self.state)
        return delay

    def _stop_error(self, action: Action) -> BaseException | None:
        if self._stop_cause is not None:
            return self._stop_cause
        if action is Action.REAUTH:
            refusal = self._last_refusal
            if refusal is not None:
                return AuthRefused(refusal.status, refusal.reason)
            return AuthRefused(self.close_code or 1008, self.close_reason)
        if self._last_refusal is not None:
            return self._last_refusal
        return None   # the server closed normally (1000)

    async def _reauth(self) -> float | None:
        """A retry only with a new token: the first at once, then as backoff says."""
        if self._token_provider is None:
            return None
        new = await self._fetch_token()
        if not new or new == self.token:
            return None
        self.token = new
        self._reauths += 1
        if self._reauths == 1:
            return 0.0
        delay = self.backoff.delay(self.attempt)
        self.attempt += 1
        return delay

    async def _fetch_token(self) -> str | None:
        assert self._token_provider is not None
        got = self._token_provider()
        if inspect.isawaitable(got):
            got = await got
        return got or None

    # ------------------------------------------------------------ the handshake
    def _session_or_fail(self) -> aiohttp.ClientSession:
        if self._session is None:
            raise ClientClosed("client closed")
        return self._session

    async def _target(self) -> URL:
        source = self._url
        if callable(source):
            got = source()
            source = await got if inspect.isawaitable(got) else got
        url = URL(source)
        if self.token is not None and self._token_kind == "query":
            url = url.update_query({self._token_name: self.token})
        rel = self._live_rel()
        if rel is not None and self.resume_token is not None:
            # docs/reliable.md: the token and the count of data messages received.
            url = url.update_query({"resume": self.resume_token, "last": str(rel.received)})
        return url

    def _handshake_headers(self) -> dict[str, str]:
        h = dict(self._headers)
        if self.token is not None:
            if self._token_kind == "header":
                h["Authorization"] = f"Bearer {self.token}"
            elif self._token_kind == "cookie":
                cookie = f"{self._token_name}={self.token}"
                h["Cookie"] = f"{h['Cookie']}; {cookie}" if h.get("Cookie") else cookie
        if self.resume_token is not None and self._live_rel() is None:
            # DESIGN 7: `?resume=<token>` or this header; a header keeps it out of URLs and logs.
            h["Gateway-Resume"] = self.resume_token
        return h

    def _offer(self) -> tuple[str, ...]:
        own = (SUBPROTOCOL,) if self._live_rel() is not None else ()
        if self.token is not None and self._token_kind == "subprotocol":
            return (*own, *self._protocols, f"bearer.{self.token}")
        return (*own, *self._protocols)
