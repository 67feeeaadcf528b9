"""One WebSocket connection to the gateway: dial, send, receive, close.

The client's state machine (client.py) sees a connection only through
`Link`: application messages in and out, and one `Closed` at the end.
Reliable mode's wire format (docs/reliable.md) lives in a Link of its own,
`ReliableLink`: the kind bytes and the acks stay below the state machine.

aiohttp does not show the body of a refused upgrade; a trace hook reads it
(`RefusalReader`) so that a refusal keeps the gateway's reason.
"""

from __future__ import annotations

import asyncio
import json
import ssl
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import SimpleNamespace

import aiohttp
from aiohttp import WSMsgType
from yarl import URL

from .errors import HandshakeRefused
from .outbox import Message
from .policy import parse_retry_after
from .reliable import Hello, ProtocolError, ReliableSession, decode_frame, encode_data, parse_hello

MAX_REFUSAL_BODY = 4096


@dataclass(frozen=True, slots=True)
class Closed:
    """The connection ended: the close frame's code and reason (None: no close frame, 1006)."""
    code: int | None
    reason: str


class LinkLost(ConnectionError):
    """A write on a connection that is closing or gone: the message did not leave."""


class RefusalReader:
    """Keeps the JSON reason of the last refused upgrade of one ClientSession.

    A client makes one attempt at a time, so "the last" is unambiguous."""

    def __init__(self) -> None:
        self.reason = ""
        self.config = aiohttp.TraceConfig()
        self.config.on_request_end.append(self._on_end)

    async def _on_end(self, session: aiohttp.ClientSession, ctx: SimpleNamespace,
                      params: aiohttp.TraceRequestEndParams) -> None:
        resp = params.response
        if resp.status == 101 or resp.status < 300:
            return
        try:
            body = await resp.content.read(MAX_REFUSAL_BODY)
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return
        self.reason = refusal_reason(body)


def refusal_reason(body: bytes) -> str:
    """The gateway's refusal body is `{"error": "..."}`; reliable mode's design says `reason`."""
    try:
        doc = json.loads(body)
    except ValueError:
        return body.decode("utf-8", "replace").strip()[:200]
    if isinstance(doc, dict):
        for key in ("error", "reason"):
            if isinstance(doc.get(key), str):
                return str(doc[key])
    return ""


class Link:
    """An open WebSocket. `receive()` returns messages, then one Closed."""

    __slots__ = ("ws",)

    def __init__(self, ws: aiohttp.ClientWebSocketResponse) -> None:
        self.ws = ws

    async def send(self, message: Message) -> None:
        """Write one message. Raises LinkLost if it could not be written (then it was not sent).

        A frame written before the close handshake reaches the gateway, which
        forwards the client's frames until the close is answered (DESIGN 7)."""
        try:
            if isinstance(message, str):
                await self.ws.send_str(message)
            else:
                await self.ws.send_bytes(message)
        except (ConnectionError, RuntimeError) as exc:
            raise LinkLost(str(exc)) from exc

    async def receive(self) -> Message | Closed:
        while True:
            msg = await self.ws.receive()
            if msg.type is WSMsgType.TEXT:
                return str(msg.data)
            if msg.type is WSMsgType.BINARY:
                return bytes(msg.data)
            if msg.type is WSMsgType.CLOSE:
                return Closed(int(msg.data), str(msg.extra or ""))
            if msg.type in (WSMsgType.CLOSING, WSMsgType.CLOSED, WSMsgType.ERROR):
                code = self.ws.close_code
                return Closed(None if code in (None, 1006) else code, "")
            # PING/PONG are answered by aiohttp (autoping)

    async def close(self, code: int = 1000, reason: str = "") -> None:
        await self.ws.close(code=code, message=reason.encode())


class ReliableLink(Link):
    """A connection speaking gateway.reliable.v1 for one ReliableSession.

    The application's messages go out and come in without their kind byte;
    acks are taken and sent here, never seen above. Writes (the client's and
    the acks) share the client's write lock: one frame at a time."""

    __slots__ = ("rel", "lock", "on_error", "_timer", "_tasks")

    def __init__(self, ws: aiohttp.ClientWebSocketResponse, rel: ReliableSession, lock: asyncio.Lock,
                 on_error: Callable[[BaseException], None]) -> None:
        super().__init__(ws)
        self.rel = rel
        self.lock = lock
        self.on_error = on_error
        self._timer: asyncio.TimerHandle | None = None
        self._tasks: set[asyncio.Task[None]] = set()

    async def hello(self) -> Hello | Closed:
        """The first message of the connection, which must be the gateway's hello."""
        got = await super().receive()
        if isinstance(got, Closed):
            return got
        if not isinstance(got, str) or not got.startswith("h"):
            raise ProtocolError("reliable: the first message from the gateway is not its hello")
        return parse_hello(got[1:])

    async def send(self, message: Message) -> None:
        """Write one application message with its `d` (the caller counted it in the window)."""
        await super().send(encode_data(message))

    async def receive(self) -> Message | Closed:
        while True:
            got = await super().receive()
            if isinstance(got, Closed):
                self.stop_acking()
                return got
            try:
                kind, payload = decode_frame(got)
                if kind == "d":
                    if self.rel.on_data():
                        await self._send_ack()
                    elif self._timer is None:
                        self._timer = asyncio.get_running_loop().call_later(self.rel.ack_ms / 1000, self._ack_due)
                    return payload
                if kind == "a" and isinstance(payload, str):
                    self.rel.on_ack(payload)
                else:
                    raise ProtocolError("reliable: a second hello on one connection")
            except ProtocolError as exc:
                self.on_error(exc)   # reported; the frame is ignored, the counts stand

    def _ack_due(self) -> None:
        self._timer = None
        task = asyncio.ensure_future(self._send_ack())
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _send_ack(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        async with self.lock:
            ack = self.rel.ack()
            if ack is not None:
                try:
                    await super().send(ack)
                except LinkLost:
                    pass   # the connection is going: the resume's last= says as much

    def stop_acking(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        for task in self._tasks:
            task.cancel()

    async def close(self, code: int = 1000, reason: str = "") -> None:
        self.stop_acking()
        await super().close(code, reason)


async def dial(session: aiohttp.ClientSession, refusals: RefusalReader, url: str | URL, *,
               headers: Mapping[str, str], protocols: Sequence[str], timeout_s: float,
               heartbeat_s: float | None, max_message_bytes: int,
               ssl_context: ssl.SSLContext | bool = True) -> Link:
    """Open a WebSocket. Raises HandshakeRefused (an HTTP answer) or an
    OSError/aiohttp.ClientError/TimeoutError (no answer)."""
    refusals.reason = ""
    try:
        async with asyncio.timeout(timeout_s):
            ws = await session.ws_connect(url, headers=dict(headers), protocols=tuple(protocols),
                                          heartbeat=heartbeat_s, max_msg_size=max_message_bytes,
                                          autoclose=True, autoping=True, ssl=ssl_context)
    except aiohttp.WSServerHandshakeError as exc:
        retry = parse_retry_after(exc.headers.get("Retry-After")) if exc.headers else None
        raise HandshakeRefused(exc.status, refusals.reason, retry) from None
    return Link(ws)
