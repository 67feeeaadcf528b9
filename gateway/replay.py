"""A draining session: its client is detached, what was meant for it is kept.

When a node drains (or a reload removes a session's route), each session's
detached record is written to the store first (drain.py); then
`Session.drain` closes the client with 1012 and `resume=<token>`. From the
frame boundary where that close frame leaves, nothing more goes to the
client: the upstream's frames are parsed here instead of relayed (the
upstream socket's protocol is switched to `Capture.feed`, so the relay's
per-message code does not change) and whole messages go to the session's
replay buffer in the store, as do messages the gateway itself would have
sent (pushes, channel messages). Client frames sent before the client's
close still reach the upstream, in order (the relay keeps forwarding
them); the upstream's close is asked for once the client's close has come
(closing.py), and when the session has ended the buffer is sealed. A resume
waits for the seal, so it never replays a buffer still growing.

Bounded: at drain.replay_max_messages or replay_max_bytes (or a message over
limits.max_message_bytes, or a compressed one, which a new connection
could not inflate) the buffer is marked overflowed and the resume will be
refused as incomplete; nothing is kept in memory past that point.
"""

from __future__ import annotations

import asyncio
import logging

from . import frames, metrics, reliable
from .errors import PROTOCOL_ERROR, StoreUnavailable
from .frames import OP_CLOSE, OP_CONT, OP_PING, OP_PONG, parse_header
from .logs import event
from .closing import Closing
from .httpbackend import posting
from .seam import Side
from .session import Event, State, advance

log = logging.getLogger("gateway.drain")

WRITE_RETRY_S = (0.05, 0.1, 0.2, 0.5, 1.0)


class Capture:
    """One draining session's messages for the client, on their way to its replay buffer."""

    __slots__ = ("s", "store", "sid", "max_n", "max_bytes", "max_message", "deadline", "pending", "n", "size",
                 "full", "force", "buf", "skip", "parts", "parts_size", "msg_op", "writer", "ended", "done", "why",
                 "first", "waiting")

    def __init__(self, session, detached_store, drain, max_message: int, deadline: float):
        self.s = session
        self.store = detached_store
        self.sid = session.session_id
        self.max_n = drain.replay_max_messages
        self.max_bytes = drain.replay_max_bytes
        self.max_message = max_message
        self.deadline = deadline          # loop time: give up writing past this (drain.timeout_s)
        self.pending: list[tuple[int, bytes]] = []
        self.n = self.size = 0
        self.full = self.force = False
        self.buf = b""
        self.skip = 0
        self.parts: list[bytes] | None = None
        self.parts_size = 0
        self.msg_op = 0
        self.writer: asyncio.Task | None = None
        self.ended = False
        self.done = asyncio.get_running_loop().create_future()   # True: sealed; False: could not be
        self.why = None
        self.first = None   # a reliable session: the number of the buffer's first message
        self.waiting: asyncio.Task | None = None   # end() waiting for an HTTP session's POSTs

    # ------------------------------------------------------------ what comes in
    def add(self, opcode: int, payload: bytes) -> bool:
        """A whole message for the client. False when it will not be replayed (overflow, or
        the buffer is sealed already: what still reaches it was meant for where it is now)."""
        if self.full or self.done.done():
            return False
        self.n += 1
        self.size += len(payload)
        self.pending.append((opcode, bytes(payload)))
        if self.n > self.max_n or self.size > self.max_bytes:
            self.full = True           # the store sees the same caps and marks the overflow
            self.why = "replay buffer full"
        self._kick()
        return not self.full

    def add_frame(self, frame: bytes) -> bool:
        """An unmasked frame the gateway built for the client (send_raw)."""
        m = frames.message(frame)
        return m is not None and self.add(*m)

    def _overflow(self, why: str) -> None:
        if not self.full:
            self.full = self.force = True
            self.why = why
            self.pending.append((frames.OP_BINARY, b""))   # written with caps of 0: marks the overflow
            self._kick()
        self.parts = None
        self.parts_size = 0

    def feed(self, data: bytes) -> None:
        """The upstream socket's data_received from the 1012 on: frames become messages."""
        s = self.s
        if self.skip:   # the rest of a frame that is not kept (overflowed)
            take = min(self.skip, len(data))
            self.skip -= take
            data = data[take:]
        buf = self.buf + data if self.buf else data
        self.buf = b""
        n = len(buf)
        pos = 0
        while pos < n:
            h = parse_header(buf, pos)
            if h is None:
                self.buf = buf[pos:]
                return
            b0, length, hlen, mask = h
            end = pos + hlen + length
            opcode = b0 & 0x0F
            if mask is not None or (opcode >= 8 and (length > 125 or not b0 & 0x80)):
                s._upstream_failed("upstream protocol error", PROTOCOL_ERROR)
                return
            if opcode < 8 and (b0 & 0x40 or self.parts_size + length > self.max_message):
                self._overflow("compressed message (permessage-deflate) cannot be replayed" if b0 & 0x40
                               else "message over max_message_bytes")
            if end > n:
                if opcode < 8 and self.full:
                    self.skip = end - n     # not kept: skip its payload as it arrives
                else:
                    self.buf = buf[pos:]    # bounded: a control frame, or a message under max_message_bytes
                return
            payload = buf[pos + hlen:end]
            raw = buf[pos:end]
            pos = end
            if opcode >= 8:
                if opcode == OP_CLOSE:
                    parsed = frames.parse_close(payload)
                    if parsed is None:
                        s._upstream_failed("upstream sent an invalid close frame", PROTOCOL_ERROR)
                        return
                    s._upstream_close_frame(parsed, raw)
                    return
                if opcode == OP_PING:
                    s._send_upstream(frames.frame(OP_PONG, payload, mask=True))
                continue
            if self.full:
                continue
            if opcode != OP_CONT:
                self.msg_op = opcode
                self.parts = []
                self.parts_size = 0
            elif self.parts is None:
                continue
            self.parts.append(payload)
            self.parts_size += length
            if b0 & 0x80:
                parts, self.parts = self.parts, None
                self.parts_size = 0
                self.add(self.msg_op, parts[0] if len(parts) == 1 else b"".join(parts))

    def end(self) -> None:
        """The session has ended: nothing more will come. Seal once written.

        A reliable session's buffer ends with its counts (reliable.meta): the
        number of its first message, and `up`, final only now (the client's
        messages reach the upstream until its close). They do not count
        against the caps."""
        if posting(self.s) and self.waiting is None:
            # An HTTP backend session: what its client sent before its close is still being
            # POSTed from here. The seal waits for it, and a resume for the seal, so nothing
            # the resumed session sends from the next node overtakes it.
            self.waiting = asyncio.ensure_future(self._end_after_posts())
            return
        if self.first is not None and not self.full:
            counts = reliable.meta(self.first, self.s.rel.inbound.taken)
            self.pending.append((reliable.META, counts))
            self.max_n += 1
            self.max_bytes += len(counts)
        self.ended = True
        self._kick()

    # ------------------------------------------------------------ to the store
    async def _end_after_posts(self) -> None:
        loop = asyncio.get_running_loop()
        while posting(self.s) and loop.time() < self.deadline:
            await asyncio.sleep(0.01)
        if posting(self.s):
            event(log, "replay_sealed_with_posts_queued", logging.WARNING, session=self.sid)
        self.end()

    def after(self, parking) -> None:
        """Hold the writes until `parking` (awaitable: True once the detached record
        is written) is done: an unplanned drop parks the session after the fact."""
        async def wait() -> None:
            try:
                parked = await parking
            finally:
                self.writer = None
            if parked:
                self._kick()
            else:
                self._give_up("session store unreachable")
        self.writer = asyncio.ensure_future(wait())

    def _kick(self) -> None:
        if self.writer is None and not self.done.done():
            self.writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        loop = asyncio.get_running_loop()
        tries = 0
        try:
            while True:
                batch, self.pending = self.pending, []
                seal = self.ended
                if not batch and not seal:
                    return
                caps = (0, 0) if self.force else (self.max_n, self.max_bytes)
                while True:
                    try:
                        added, status = await self.store.append(self.sid, batch, *caps, seal=seal)
                        break
                    except StoreUnavailable:
                        if loop.time() >= self.deadline:
                            self._give_up("session store unreachable")
                            return
                        await asyncio.sleep(WRITE_RETRY_S[min(tries, len(WRITE_RETRY_S) - 1)])
                        tries += 1
                if added:
                    metrics.replay_buffered.labels("upstream").inc(added)
                if status == "full" and not self.force:
                    self.full = True
                    self.why = self.why or "replay buffer full"
                if status != "ok":
                    if status == "full":
                        metrics.replay_overflows.inc()
                    event(log, "replay_buffer_" + ("full" if status == "full" else "gone"), logging.WARNING,
                          session=self.sid, why=self.why)
                    if status == "gone":
                        self._give_up("detached session gone")
                        return
                if seal:
                    if self.pending:
                        # Added while the seal was on its way (a publisher that read the index
                        # before the park): written after it, as the resume's finish takes
                        # whatever the buffer holds by then.
                        continue
                    self.done.set_result(True)
                    return
        finally:
            self.writer = None
            if self.pending or (self.ended and not self.done.done()):
                self._kick()

    def _give_up(self, why: str) -> None:
        self.pending = []
        self.why = why
        event(log, "replay_not_sealed", logging.ERROR, session=self.sid, why=why)
        if not self.done.done():
            self.done.set_result(False)

    async def flushed(self) -> None:
        """Until what was added so far is in the store (an API caller's answer waits for it)."""
        while self.writer is not None and not self.done.done():
            await asyncio.shield(self.writer)


class Draining:
    """A mixin of relay.Session (its `capture` slot lives there)."""

    __slots__ = ()

    def drain(self, capture: Capture, code: int, reason: str) -> None:
        """Detach the client: close it with `code` and `reason` (resume=<token>),
        keep the upstream until it closes, and buffer what was meant for the client."""
        self.state = advance(self.state, Event.DRAIN)
        self.capture = capture
        self.gateway_close(code, reason)

    def dropped(self, capture: Capture) -> None:
        """A reliable session's client went without a close (docs/reliable.md): keep
        the session as a drain does, with no close to send: what the upstream sends
        goes to the buffer, and the upstream is closed now (its close seals it)."""
        self.state = advance(self.state, Event.DROPPED)
        self.capture = capture
        self._capture_upstream()
        Closing.client_lost(self)

    def _capture_upstream(self) -> None:
        """The drain's close frame just went to the client, at a frame boundary:
        from here on the upstream's frames go to the capture."""
        if self.state is not State.DRAINING:
            return
        capture = self.capture
        rel = self.rel
        if rel is not None:
            # What the client has not acked goes first, numbered on from the window's start
            # (marked: a publisher's append may reach the store before this write).
            window = rel.window
            capture.first = window.first
            for opcode, payload in window.items:
                capture.add(opcode | reliable.WINDOWED, payload)
        if self.sink is not None:
            # An HTTP backend: its replies come through send_reply to the capture. A worker
            # held back by the full window goes on.
            if rel is not None:
                self.wake_room()
            return
        if self.upstream.received:
            return
        capture.buf = self.u_buf   # an unfinished frame header of which the client saw nothing
        self.u_buf = b""
        self.u_need = 0
        if rel is not None:
            # Then a message half joined, then what a full window held back.
            capture.parts, capture.msg_op, capture.parts_size = rel.parts, rel.msg_op, rel.parts_size
            rel.parts = None
            rel.parts_size = 0
        self.up.set_protocol(Side(self, capture.feed, self.upstream_lost, False))
        if rel is not None and not self.upstream.gone:
            self.up.resume_reading()   # a full window may have paused it
            if capture.buf:
                capture.feed(b"")
