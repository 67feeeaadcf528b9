"""The per-message path: one client socket, one upstream socket, frames between.

`Session` is the asyncio protocol of the client socket through the handshake;
once relaying, each socket gets a `Side` whose data_received is the session's
relay function for that direction. No task per direction, no message
objects: the relay functions parse frame headers,
forwards contiguous runs of frames with one write, and steps in only where
the gateway must:

- control frames: pings are answered here on both sides (the gateway keeps
  its own keepalive each way), pongs are ours, close frames are validated
  and forwarded so codes and reasons cross unchanged;
- client text frames: unmasked and checked for UTF-8 (RFC 6455 8.1: "MUST
  _Fail the WebSocket Connection_"), 1007 otherwise;
- sizes: max_message_bytes (1009), send buffers (1013).

Payloads of data frames are streamed: a 16 MiB binary message never sits in
the gateway whole. A close the gateway originates is injected only at a frame
boundary, so neither peer ever sees a torn frame.
"""

from __future__ import annotations

import asyncio
import logging
import os
import secrets
import time

from . import frames, http1
from .errors import (GOING_AWAY, INTERNAL_ERROR, INVALID_PAYLOAD, MESSAGE_TOO_BIG, POLICY_VIOLATION,
                     PROTOCOL_ERROR, TRY_AGAIN_LATER, ProtocolViolation, Refusal)
from .frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, mask_in_place as _mask, \
    parse_header, unmask
from .session import Event, State, advance

log = logging.getLogger("gateway.session")



class _Null:
    """Stands in for a gone upstream so the relay loop needs no checks."""

    __slots__ = ()

    def write(self, data) -> None:
        pass


_NULL = _Null()


_oswrite = os.write


def _fileno(transport) -> int:
    """The socket's fd for direct writes, or -1 (TLS, or no socket to be had).

    uvloop queues every transport.write and flushes at the end of the loop
    iteration. When nothing is queued, writing the frame to the socket
    ourselves is the same syscall with less around it; whatever the kernel
    does not take then goes through the transport, which from there on owns
    the ordering. Only while the transport is not closing: until then its fd
    cannot have been closed or reused.
    """
    if type(transport).__name__ != "TCPTransport":  # uvloop's plain TCP transport only, never TLS
        return -1
    sock = transport.get_extra_info("socket")
    try:
        return sock.fileno() if sock is not None else -1
    except (OSError, AttributeError):
        return -1


def new_id() -> str:
    return secrets.token_urlsafe(12)


class Side(asyncio.Protocol):
    """The protocol of one of a session's sockets while relaying.

    `data_received` is an instance slot bound to the session's relay function
    for that direction: the event loop looks it up once (uvloop caches it at
    set_protocol), so each read costs one Python call, not two.
    """

    __slots__ = ("s", "data_received", "lost", "client_side")

    def __init__(self, session: "Session", data_received, lost, client_side: bool):
        self.s = session
        self.data_received = data_received
        self.lost = lost
        self.client_side = client_side

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.lost()

    def pause_writing(self) -> None:
        self.s.stalled(self.client_side)

    def resume_writing(self) -> None:
        self.s.unstalled(self.client_side)


class Session(asyncio.Protocol):
    __slots__ = (
        "node", "id", "state", "transport", "ip", "head_buf", "timer", "life_timer", "close_timer",
        "expiry_timer", "started", "route", "route_metrics", "claims", "sub",
        # upstream
        "up", "endpoint", "pool", "sink", "deflate",
        # client -> upstream parser
        "c_buf", "c_need", "c_remaining", "c_msg", "c_msg_bytes", "c_utf8", "c_msg_text", "c_parts",
        "c_seen", "c_msgs", "c_bytes",
        # upstream -> client parser
        "u_buf", "u_need", "u_remaining", "u_seen", "u_msgs", "u_bytes",
        # closing
        "closer", "c_close_sent", "c_close_recv", "u_close_sent", "u_close_recv", "close_code",
        "close_reason", "pending_close", "client_gone", "up_gone",
        # housekeeping
        "ticks", "quiet_ticks", "last_msgs", "ping_due", "flushed_c", "flushed_u", "bucket",
        # frames the gateway itself sends, held until the stream is at a frame boundary
        "c_later", "u_later", "stall_timer",
        # what sinks and the management API keep per session
        "channels", "sink_state",
        # rate limit: the current client message is dropped / its streamed rest is skipped
        "c_drop", "c_skip",
        # True from the 101 until the session is finished: the fast test in data_received
        "live",
        # a client fault waiting for the upstream's close before the client's close goes out
        "fault_close",
        # socket fds for direct writes, -1 when not in use
        "c_fd", "u_fd",
    )

    def __init__(self, node):
        self.node = node
        self.id = new_id()
        self.state = State.HANDSHAKE
        self.transport = None
        self.ip = ""
        self.head_buf = b""
        self.timer = self.life_timer = self.close_timer = self.expiry_timer = None
        self.started = 0.0
        self.route = self.route_metrics = self.claims = self.sub = None
        self.up = self.endpoint = self.pool = self.sink = None
        self.deflate = False
        self.c_buf = b""
        self.c_need = 0
        self.c_remaining = 0
        self.c_msg = 0
        self.c_msg_bytes = 0
        self.c_utf8 = None
        self.c_msg_text = False
        self.c_parts = None
        self.c_seen = self.u_seen = True
        self.c_msgs = self.c_bytes = self.u_msgs = self.u_bytes = 0
        self.u_buf = b""
        self.u_need = 0
        self.u_remaining = 0
        self.closer = None
        self.c_close_sent = self.c_close_recv = self.u_close_sent = self.u_close_recv = False
        self.close_code = 1006
        self.close_reason = ""
        self.pending_close = None
        self.client_gone = False
        self.up_gone = True
        self.ticks = self.quiet_ticks = self.last_msgs = 0
        self.ping_due = False
        self.flushed_c = self.flushed_u = 0
        self.bucket = None
        self.c_later = self.u_later = b""
        self.stall_timer = None
        self.channels = None
        self.sink_state = None
        self.c_drop = self.c_skip = False
        self.live = False
        self.c_fd = self.u_fd = -1
        self.fault_close = None

    # ------------------------------------------------------------ handshake
    def connection_made(self, transport) -> None:
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.ip = peer[0] if peer else ""
        self.started = time.monotonic()
        if not self.node.admit_socket(self):
            transport.abort()
            self.client_gone = True
            return
        self.timer = self.node.loop.call_later(self.node.limits.handshake_timeout_s, self._handshake_timeout)

    def _handshake_timeout(self) -> None:
        # Slowloris: half a request head held open. Drop it, no answer owed.
        self.timer = None
        if self.state is State.HANDSHAKE:
            self.node.refused(self, "handshake_timeout")
            self.transport.abort()

    def data_received(self, data: bytes) -> None:
        if self.live:
            self.from_client(data)
            return
        if self.state is not State.HANDSHAKE:
            self.c_buf += data  # pipelined frames: kept, relayed after the 101
            if len(self.c_buf) > self.node.limits.max_message_bytes + 14:
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
        self.c_buf = buf[end + 4:]
        self.state = advance(self.state, Event.REQUEST)
        self.transport.pause_reading()
        try:
            head = http1.parse_request(buf[:end])
        except Refusal as r:
            self.refuse(r)
            return
        asyncio.ensure_future(self._connect(head))

    def from_client(self, data: bytes) -> None:
        """Every read from the client socket after the 101."""
        if self.up is not None:
            self.from_client_relay(data)
        else:
            self.from_client_messages(data)

    def _join_client(self, data: bytes) -> bytes | None:
        """Join `data` to the partial frame kept from before; None while incomplete."""
        if self.c_need:  # a frame checked whole is still arriving: append, O(1) amortised
            buf = self.c_buf
            buf += data
            if len(buf) < self.c_need:
                return None
            data = bytes(buf)
            self.c_need = 0
        else:
            data = self.c_buf + data
        self.c_buf = b""
        return data

    async def _connect(self, head) -> None:
        try:
            await self.node.connect(self, head)
        except Refusal as r:
            self.refuse(r)
        except Exception:
            log.exception("handshake failed", extra={"fields": {"event": "handshake_error", "conn": self.id}})
            self.refuse(Refusal(500, "internal error", metric="internal_error"))

    def refuse(self, r: Refusal) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.state is State.REFUSED or self.client_gone:
            return
        self.state = advance(self.state, Event.REFUSED)
        self.node.refused(self, r.metric, r.status)
        self.transport.write(http1.response(r.status, r.reason, r.headers))
        self.transport.close()

    def upgraded(self, response: bytes, up_transport, up_leftover: bytes) -> None:
        """Called by the node once the upstream (or sink) is ready: go live."""
        if self.timer is not None:
            self.timer.cancel()
        self.state = advance(self.state, Event.UPGRADED)
        self.live = True
        limits = self.node.limits
        self.transport.set_write_buffer_limits(high=limits.send_buffer_bytes)
        self.transport.write(response)
        loop = self.node.loop
        self.timer = loop.call_later(self.node.tick_s, self._tick)
        if limits.max_lifetime_s:
            self.life_timer = loop.call_later(limits.max_lifetime_s, self.gateway_close, GOING_AWAY, "max lifetime reached")
        if up_transport is not None:
            self.up = up_transport
            self.up_gone = False
            self.transport.set_protocol(Side(self, self.from_client_relay, self.client_lost, True))
            up_transport.set_protocol(Side(self, self.from_upstream, self.upstream_lost, False))
            self.c_fd = _fileno(self.transport)
            self.u_fd = _fileno(up_transport)
            up_transport.set_write_buffer_limits(high=limits.send_buffer_bytes)
            if up_leftover:
                self.from_upstream(up_leftover)
            up_transport.resume_reading()
        pending = self.c_buf
        self.c_buf = b""
        if pending and self.state is State.OPEN:
            self.data_received(pending)
        if not self.client_gone:
            self.transport.resume_reading()

    # ------------------------------------------------- client -> upstream
    def _client_violation(self, code: int, reason: str) -> None:
        """The client broke the protocol: tell it why, close the upstream cleanly."""
        self.node.count_violation(self, code)
        self.c_buf = b""
        self.c_need = 0
        # RFC 6455 7.1.7: having failed the connection, we need not wait for
        # the client's close frame; its further bytes are not to be trusted.
        self.c_close_recv = True
        if self.up is None or self.up_gone or self.u_close_recv or self.u_close_sent:
            self.gateway_close(code, reason, at_once=True)
            self._maybe_finish()
            return
        # What the backend already answered to the client's valid messages
        # still reaches it: close the upstream now, the client when the
        # upstream's close comes back (as a server answering in order would).
        self._closing_by_gateway(code, reason)
        self.fault_close = (code, reason)
        self._send_upstream_close(GOING_AWAY, "client error")

    def _check_client_frame(self, b0: int, length: int, mask) -> int:
        """Validate one client frame header; returns the opcode. Raises ProtocolViolation."""
        opcode = b0 & 0x0F
        if mask is None:
            # RFC 6455 5.1: "a server MUST close the connection upon receiving
            # a frame that is not masked".
            raise ProtocolViolation(PROTOCOL_ERROR, "unmasked frame")
        rsv = b0 & 0x70
        if opcode >= 8:
            if rsv or not b0 & 0x80 or length > 125 or opcode > OP_PONG:
                raise ProtocolViolation(PROTOCOL_ERROR, "bad control frame")
            return opcode
        if opcode == OP_CONT:
            if not self.c_msg:
                raise ProtocolViolation(PROTOCOL_ERROR, "continuation without a message")
            if rsv:
                raise ProtocolViolation(PROTOCOL_ERROR, "reserved bits set")
        elif opcode == OP_TEXT or opcode == OP_BINARY:
            if self.c_msg:
                raise ProtocolViolation(PROTOCOL_ERROR, "new message inside a fragmented one")
            if rsv and not (rsv == 0x40 and self.deflate):
                raise ProtocolViolation(PROTOCOL_ERROR, "reserved bits set")
            self.c_msg = opcode
            self.c_msg_bytes = 0
            # A compressed text message is validated by whoever inflates it.
            self.c_msg_text = opcode == OP_TEXT and not rsv
            bucket = self.bucket
            if bucket is not None:
                now = time.monotonic()
                if bucket.take(now):
                    self.c_drop = False
                else:
                    # Over messages_per_second + burst: this message is dropped
                    # (and counted); staying over closes the session.
                    self.c_drop = True
                    self.c_msg_text = False
                    self.node.count_rate_limited(self)
                    after = self.node.limits.rate_limit_close_after_s
                    if after and bucket.over_for(now) >= after:
                        raise ProtocolViolation(POLICY_VIOLATION, "rate limit exceeded")
        else:
            raise ProtocolViolation(PROTOCOL_ERROR, "reserved opcode")
        self.c_msg_bytes += length
        if self.c_msg_bytes > self.node.limits.max_message_bytes:
            raise ProtocolViolation(MESSAGE_TOO_BIG, f"message too big (max {self.node.limits.max_message_bytes} bytes)")
        return opcode

    def from_client_relay(self, data: bytes) -> None:
        """Every read from the client socket while relaying to a websocket upstream."""
        self.c_seen = True
        self.c_bytes += len(data)
        if self.c_need or self.c_buf:
            data = self._join_client(data)
            if data is None:
                return
        if self.c_close_recv or self.u_close_sent:
            return  # nothing may follow a close frame
        n = len(data)
        pos = 0
        start = 0
        up = self.up if not self.up_gone else _NULL
        if self.c_remaining:
            take = self.c_remaining if self.c_remaining < n else n
            self.c_remaining -= take
            pos = take
            if self.c_skip:  # the rest of a rate-limited frame
                start = take
                self.c_skip = self.c_remaining > 0
            if not self.c_remaining and self.u_later:
                up.write(data[:pos])
                start = pos
                self._flush_u_later()
        limit = self.node.limits.max_message_bytes
        while pos < n:
            b0 = data[pos]
            if (b0 == 0x81 or b0 == 0x82) and pos + 6 <= n and 0x80 <= data[pos + 1] <= 0xFD \
                    and not self.c_msg and self.bucket is None:
                # Fast path: a whole, unfragmented, masked message under 126
                # bytes, the common case. Same checks as below, fewer steps.
                end = pos + 6 + (data[pos + 1] & 0x7F)
                if end <= n and (end - pos - 6) <= limit:
                    if b0 == 0x81:
                        text = bytearray(data[pos + 6:end])
                        _mask(data[pos + 2:pos + 6], text)
                        if not text.isascii() and not frames.utf8_ok(text):
                            if pos > start:
                                up.write(data[start:pos])
                            self._client_violation(INVALID_PAYLOAD, "invalid UTF-8 in text message")
                            return
                    self.c_msgs += 1
                    pos = end
                    continue
            h = parse_header(data, pos)
            if h is None:
                self.c_buf = data[pos:]
                break
            b0, length, hlen, mask = h
            end = pos + hlen + length
            op = b0 & 0x0F
            if end > n and length <= limit and (
                    op >= 8 or op == OP_TEXT and not b0 & 0x40 or op == OP_CONT and self.c_msg_text):
                # Checked whole (control, UTF-8): wait for the rest of the frame.
                # Validated only then, so the header is judged once.
                self.c_buf = bytearray(data[pos:])
                self.c_need = end - pos
                break
            try:
                opcode = self._check_client_frame(b0, length, mask)
            except ProtocolViolation as v:
                if pos > start:
                    up.write(data[start:pos])
                self._client_violation(v.code, v.reason)
                return
            if opcode >= 8 or self.c_msg_text:
                payload = unmask(data[pos + hlen:end], mask) if length else b""
                if opcode == OP_TEXT or opcode == OP_CONT:
                    fin = b0 & 0x80
                    if fin and self.c_utf8 is None:
                        ok = frames.text_is_valid(payload)
                    else:
                        if self.c_utf8 is None:
                            self.c_utf8 = frames.Utf8Check()
                        ok = self.c_utf8.feed(payload, bool(fin))
                    if not ok:
                        if pos > start:
                            up.write(data[start:pos])
                        self._client_violation(INVALID_PAYLOAD, "invalid UTF-8 in text message")
                        return
                    if b0 & 0x80:
                        self.c_msg = 0
                        self.c_msgs += 1
                        self.c_utf8 = None
                elif opcode == OP_CLOSE:
                    parsed = frames.parse_close(payload)
                    if parsed is None:
                        if pos > start:
                            up.write(data[start:pos])
                        self._client_violation(PROTOCOL_ERROR, "invalid close frame")
                        return
                    up.write(data[start:end] if self.closer != "gateway" else data[start:pos])
                    self._client_close_frame(parsed)
                    return
                else:  # ping or pong
                    if pos > start:
                        up.write(data[start:pos])
                    start = end
                    if opcode == OP_PING:
                        self._send_client(frames.frame(OP_PONG, payload))
                pos = end
                continue
            # A streamed data frame: the message ends with its header's FIN bit,
            # whether or not its payload is all here yet.
            if b0 & 0x80:
                self.c_msg = 0
                if not self.c_drop:
                    self.c_msgs += 1
            if self.c_drop:
                if pos > start:
                    up.write(data[start:pos])
                if end > n:
                    self.c_remaining = end - n
                    self.c_skip = True
                    start = pos = n
                    break
                start = pos = end
                continue
            if end > n:
                self.c_remaining = end - n
                pos = n
                break
            pos = end
        if pos > start:
            chunk = data[start:pos] if start or pos < n else data
            # Straight to the socket when nothing is queued (see _fileno); written out in
            # both relay loops on purpose: a function call per message is measurable.
            if self.u_fd >= 0 and not up.get_write_buffer_size() and not up.is_closing():
                try:
                    k = _oswrite(self.u_fd, chunk)
                except OSError:
                    k = 0
                if k < len(chunk):
                    up.write(chunk[k:])
            else:
                up.write(chunk)

    def from_client_messages(self, data: bytes) -> None:
        """Client frames for a backend inside the gateway: whole messages, unmasked."""
        self.c_seen = True
        self.c_bytes += len(data)
        if self.c_need or self.c_buf:
            data = self._join_client(data)
            if data is None:
                return
        if self.c_close_recv:
            return
        n = len(data)
        pos = 0
        while pos < n:
            h = parse_header(data, pos)
            if h is None:
                self.c_buf = data[pos:]
                break
            b0, length, hlen, mask = h
            end = pos + hlen + length
            if end > n and length <= self.node.limits.max_message_bytes:
                self.c_buf = bytearray(data[pos:])
                self.c_need = end - pos
                break
            try:
                opcode = self._check_client_frame(b0, length, mask)
            except ProtocolViolation as v:
                self._client_violation(v.code, v.reason)
                return
            payload = unmask(data[pos + hlen:end], mask) if length else b""
            pos = end
            if opcode == OP_PING:
                self._send_client(frames.frame(OP_PONG, payload))
                continue
            if opcode == OP_PONG:
                continue
            if opcode == OP_CLOSE:
                parsed = frames.parse_close(payload)
                if parsed is None:
                    self._client_violation(PROTOCOL_ERROR, "invalid close frame")
                    return
                self._client_close_frame(parsed)
                return
            if self.c_drop:
                if b0 & 0x80:
                    self.c_msg = 0
                continue
            if self.c_parts is None:
                self.c_parts = [payload]
            else:
                self.c_parts.append(payload)
            if b0 & 0x80:
                parts = self.c_parts
                self.c_parts = None
                message = parts[0] if len(parts) == 1 else b"".join(parts)
                kind = self.c_msg
                self.c_msg = 0
                if kind == OP_TEXT and not frames.text_is_valid(message):
                    self._client_violation(INVALID_PAYLOAD, "invalid UTF-8 in text message")
                    return
                self.c_msgs += 1
                self.sink.on_message(self, kind, message)
                if self.closer is not None:
                    return

    def send_message(self, opcode: int, payload: bytes) -> bool:
        """Send one whole message to the client (sinks, management API)."""
        return self.send_raw(frames.frame(opcode, payload))

    def send_raw(self, frame_bytes: bytes) -> bool:
        """Send an already built (unmasked) frame: fan-out builds it once for everyone."""
        if self.c_close_sent or self.client_gone or self.state is not State.OPEN:
            return False
        self.u_msgs += 1
        self.u_bytes += len(frame_bytes)
        self._send_client(frame_bytes)
        return True

    def _send_client(self, data: bytes) -> None:
        """Frames the gateway writes to the client itself: only at a frame boundary."""
        if self.client_gone or self.c_close_sent:
            return
        if self.u_remaining:
            self.c_later += data
        else:
            self.transport.write(data)

    def _send_upstream(self, data: bytes) -> None:
        if self.up_gone or self.u_close_sent:
            return
        if self.c_remaining:
            self.u_later += data
        else:
            self.up.write(data)

    def _flush_u_later(self) -> None:
        data = self.u_later
        self.u_later = b""
        self._send_upstream(data)

    def _at_client_boundary(self) -> None:
        """A half-forwarded upstream frame just ended: send what waited for it."""
        if self.c_later:
            data = self.c_later
            self.c_later = b""
            if not self.client_gone and not self.c_close_sent:
                self.transport.write(data)
        if self.pending_close is not None:
            code, reason = self.pending_close
            self.pending_close = None
            self.gateway_close(code, reason)

    # ------------------------------------------------- upstream -> client
    def from_upstream(self, data: bytes) -> None:
        self.u_seen = True
        self.u_bytes += len(data)
        if self.u_need:
            data = self.u_buf + data
            if len(data) < self.u_need:
                self.u_buf = data
                return
            self.u_buf = b""
            self.u_need = 0
        elif self.u_buf:
            data = self.u_buf + data
            self.u_buf = b""
        if self.u_close_recv:
            return
        n = len(data)
        pos = 0
        start = 0
        drop = self.c_close_sent or self.client_gone  # nothing more reaches a closing client
        out = self.transport
        if self.u_remaining:
            take = self.u_remaining if self.u_remaining < n else n
            self.u_remaining -= take
            pos = take
            if not self.u_remaining and (self.c_later or self.pending_close is not None):
                if not drop:
                    out.write(data[:pos])
                start = pos
                self._at_client_boundary()
                drop = self.c_close_sent or self.client_gone
        while pos < n:
            b0 = data[pos]
            if b0 & 0x0F < 8 and pos + 2 <= n and data[pos + 1] < 126:
                # Fast path: a small unmasked data frame, streamed as it is.
                end = pos + 2 + data[pos + 1]
                if b0 & 0x80:
                    self.u_msgs += 1
                if end > n:
                    self.u_remaining = end - n
                    pos = n
                    break
                pos = end
                continue
            h = parse_header(data, pos)
            if h is None:
                self.u_buf = data[pos:]
                break
            b0, length, hlen, mask = h
            opcode = b0 & 0x0F
            end = pos + hlen + length
            if mask is not None or (opcode >= 8 and (length > 125 or not b0 & 0x80)):
                # RFC 6455 5.1: a client MUST close on a masked server frame.
                if pos > start and not drop:
                    out.write(data[start:pos])
                self._upstream_failed("upstream protocol error", PROTOCOL_ERROR)
                return
            if opcode >= 8:
                if end > n:
                    self.u_buf = data[pos:]
                    self.u_need = end - pos
                    break
                if pos > start and not drop:
                    out.write(data[start:pos])
                start = end
                if opcode == OP_CLOSE:
                    parsed = frames.parse_close(data[pos + hlen:end])
                    if parsed is None:
                        self._upstream_failed("upstream sent an invalid close frame", PROTOCOL_ERROR)
                        return
                    self._upstream_close_frame(parsed, data[pos:end])
                    return
                if opcode == OP_PING:
                    # The upstream's keepalive is for us, its client: answer it here.
                    self._send_upstream(frames.frame(OP_PONG, data[pos + hlen:end], mask=True))
                pos = end
                continue
            if b0 & 0x80:
                self.u_msgs += 1
            if end > n:
                self.u_remaining = end - n
                pos = n
                break
            pos = end
        if pos > start and not drop:
            chunk = data[start:pos] if start or pos < n else data
            # Straight to the socket when nothing is queued (see _fileno); written out in
            # both relay loops on purpose: a function call per message is measurable.
            if self.c_fd >= 0 and not out.get_write_buffer_size() and not out.is_closing():
                try:
                    k = _oswrite(self.c_fd, chunk)
                except OSError:
                    k = 0
                if k < len(chunk):
                    out.write(chunk[k:])
            else:
                out.write(chunk)

    # ------------------------------------------------------------ closing
    def _start_closing(self, code: int, reason: str, closer: str) -> None:
        if self.closer is None:
            self.closer = closer
            self.close_code = code
            self.close_reason = reason
            self.state = advance(self.state, Event.CLOSE_STARTED)
            self.close_timer = self.node.loop.call_later(self.node.limits.close_timeout_s, self._close_timeout)

    def _client_close_frame(self, parsed: tuple[int, str]) -> None:
        """A valid close frame arrived from the client (already forwarded if it should be)."""
        self.c_close_recv = True
        code, reason = parsed
        if self.closer is None:
            self._start_closing(code, reason, "client")
        if self.up is None:
            # A backend inside the gateway: echo (unless we started it) and finish.
            if not self.c_close_sent:
                self._send_client(frames.frame(OP_CLOSE, frames.close_payload(code) if code != 1005 else b""))
                self.c_close_sent = True
        elif self.closer == "gateway":
            # The client answered our close; now close the upstream cleanly.
            self._send_upstream_close(GOING_AWAY, "client closed")
        else:
            self.u_close_sent = True  # the client's own frame went upstream as it was
        self._maybe_finish()

    def _upstream_close_frame(self, parsed: tuple[int, str], raw: bytes) -> None:
        self.u_close_recv = True
        if self.fault_close is not None:
            self.gateway_close(*self.fault_close)
            self.fault_close = None
            return
        code, reason = parsed
        if self.closer is None:
            self._start_closing(code, reason, "upstream")
        if not self.c_close_sent and not self.client_gone:
            self.transport.write(raw)  # unmasked server frame: forwarded as it is
        self.c_close_sent = True
        if not self.u_close_sent:
            # The upstream started it and the client is already closing (gateway
            # close): answer the upstream ourselves.
            if self.closer != "upstream":
                self._send_upstream_close(code if code != 1005 else 1000, "")
        self._maybe_finish()

    def _send_upstream_close(self, code: int, reason: str) -> None:
        if self.u_close_sent or self.up_gone:
            return
        self.u_close_sent = True
        if self.c_remaining:
            self.up.abort()  # mid-frame: a close frame now would corrupt the stream
            return
        self.up.write(frames.frame(OP_CLOSE, frames.close_payload(code, reason), mask=True))

    def gateway_close(self, code: int, reason: str, *, at_once: bool = False) -> None:
        """Close the session from the gateway: `code` to the client, 1001 upstream."""
        if self.state is State.CLOSED or self.client_gone and self.up_gone:
            return
        if self.c_close_sent:
            return
        if self.u_remaining and not self.up_gone and not self.u_close_recv:
            # A frame to the client is half forwarded and the upstream is still
            # sending it: finish it, then close (RFC 6455 7.1.7 wants a close
            # frame, and it can only go at a frame boundary).
            self.pending_close = (code, reason)
            if at_once:
                self._closing_by_gateway(code, reason)
                self._send_upstream_close(GOING_AWAY, "client error")
            return
        self._closing_by_gateway(code, reason)
        if self.u_remaining:
            self._abort_client()  # mid-frame: a close frame now would corrupt the stream
        else:
            if not self.client_gone:
                self.transport.write(frames.frame(OP_CLOSE, frames.close_payload(code, reason)))
            self.c_close_sent = True
        if at_once:
            # A fault: nothing further is relayed, the upstream is closed now.
            self._send_upstream_close(GOING_AWAY, "client error")
        self._maybe_finish()

    def _closing_by_gateway(self, code: int, reason: str) -> None:
        self._start_closing(code, reason, "gateway")
        if self.closer == "gateway":
            self.close_code = code
            self.close_reason = reason

    def _upstream_failed(self, why: str, upstream_code: int = GOING_AWAY) -> None:
        log.warning("upstream failed", extra={"fields": {"event": "upstream_failed", "conn": self.id, "why": why}})
        self._send_upstream_close(upstream_code, why)
        self.u_close_recv = True
        self.gateway_close(INTERNAL_ERROR, "upstream failed", at_once=True)

    def _maybe_finish(self) -> None:
        if not self.client_gone and self.c_close_sent and self.c_close_recv:
            self.transport.close()  # RFC 6455 7.1.1: the server closes the TCP connection
        if not self.up_gone and self.u_close_sent and self.u_close_recv:
            self.up.close()

    def _close_timeout(self) -> None:
        self.close_timer = None
        self._abort_client()
        if not self.up_gone:
            self.u_close_sent = self.u_close_recv = True
            self.up.abort()

    def _abort_client(self) -> None:
        """Cut the client socket; nothing more is written to it."""
        self.c_close_sent = self.c_close_recv = True
        if not self.client_gone:
            self.transport.abort()

    def stalled(self, client_side: bool) -> None:
        """A peer's send buffer passed send_buffer_bytes: stop reading what feeds it.

        TCP backpressure handles a peer that is merely slower; one whose buffer
        stays full for stall_timeout_s has stopped reading and is closed (1013).
        """
        if client_side:
            if self.up is not None and not self.up_gone:
                self.up.pause_reading()
            else:
                self.transport.pause_reading()  # a sink answers what the client sends
        elif not self.client_gone:
            self.transport.pause_reading()
        if self.stall_timer is None and not self.closer:
            self.stall_timer = self.node.loop.call_later(self.node.limits.stall_timeout_s, self.overflow, client_side)

    def unstalled(self, client_side: bool) -> None:
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None
        if client_side:
            if self.up is not None and not self.up_gone:
                self.up.resume_reading()
            elif not self.client_gone:
                self.transport.resume_reading()
        elif not self.client_gone:
            self.transport.resume_reading()

    def overflow(self, client_side: bool) -> None:
        """A peer stopped reading: its send buffer stayed full for stall_timeout_s."""
        self.stall_timer = None
        self.node.count_overflow(self, client_side)
        if client_side:
            if not self.up_gone:
                self.up.pause_reading()
            self.gateway_close(TRY_AGAIN_LATER, "slow consumer", at_once=True)
        else:
            self.transport.pause_reading()
            self.gateway_close(TRY_AGAIN_LATER, "backend not reading", at_once=True)
            if not self.up_gone:
                self.up.abort()

    def pause_writing(self) -> None:
        self.stalled(client_side=True)

    def resume_writing(self) -> None:
        self.unstalled(client_side=True)

    def eof_received(self):
        return False

    def client_lost(self) -> None:
        self.connection_lost(None)

    def connection_lost(self, exc) -> None:
        self.client_gone = True
        self.c_fd = -1
        if self.state is State.HANDSHAKE or self.state is State.CONNECTING or self.state is State.REFUSED:
            # Gone before the upgrade (or refused). The connect task notices.
            if self.timer is not None:
                self.timer.cancel()
                self.timer = None
            self._finish()
            return
        if not self.c_close_recv:
            # Gone without a close frame: 1006 to our books, 1001 to the upstream.
            if self.closer is None:
                self._start_closing(1006, "", "client")
            self._send_upstream_close(GOING_AWAY, "client went away")
            self.c_close_recv = True
        self._maybe_finish()
        if self.up_gone:
            self._finish()

    def upstream_lost(self) -> None:
        self.up_gone = True
        self.u_fd = -1
        if not self.u_close_recv:
            self.u_close_recv = True
            self.u_close_sent = True
            if not self.c_close_sent:
                code, reason = self.fault_close or (INTERNAL_ERROR, "upstream failed")
                self.gateway_close(code, reason, at_once=True)
        if self.client_gone:
            self._finish()

    def _finish(self) -> None:
        if self.state is State.CLOSED:
            return
        prior = self.state
        self.state = advance(self.state, Event.LOST)
        self.live = False
        for t in (self.timer, self.life_timer, self.close_timer, self.expiry_timer, self.stall_timer):
            if t is not None:
                t.cancel()
        self.timer = self.life_timer = self.close_timer = self.expiry_timer = self.stall_timer = None
        self.node.session_closed(self, was_open=prior is State.OPEN or prior is State.CLOSING)

    # -------------------------------------------------------- housekeeping
    def _tick(self) -> None:
        """Every tick_s: flush counters, keepalive both ways, idle check."""
        node = self.node
        self.timer = None
        if self.state is not State.OPEN:
            return
        node.flush_counters(self)
        self.ticks += 1
        msgs = self.c_msgs + self.u_msgs
        if msgs != self.last_msgs:
            self.last_msgs = msgs
            self.quiet_ticks = 0
        else:
            self.quiet_ticks += 1
            if self.quiet_ticks >= node.idle_ticks:
                self.gateway_close(GOING_AWAY, "idle timeout")
                return
        if node.ping_ticks and self.ticks % node.ping_ticks == 0:
            if self.ping_due:
                # No byte from a peer for a whole ping interval after a ping.
                if not self.c_seen:
                    self._start_closing(1006, "keepalive timeout", "gateway")
                    self._send_upstream_close(GOING_AWAY, "client keepalive timed out")
                    self._abort_client()
                    return
                if self.up is not None and not self.u_seen:
                    self._upstream_failed("upstream keepalive timed out")
                    return
            self.c_seen = self.u_seen = False
            self.ping_due = True
            self._send_client(b"\x89\x00")
            if self.up is not None:
                self._send_upstream(b"\x89\x80\x00\x00\x00\x00")
        self.timer = node.loop.call_later(node.tick_s, self._tick)
