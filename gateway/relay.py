"""The per-message path: a live session's two sockets, frames between them.

A `Session` goes live once the handshake (gateway/handshake.py) has answered
101. From then on each socket gets a `Side` protocol whose data_received is
the session's relay function for that direction: no task per direction, no
message objects. The relay functions parse frame headers, forward contiguous
runs of frames with one write, and step in only where the gateway must:

- control frames: pings are answered here on both sides (the gateway keeps
  its own keepalive each way), pongs are ours, close frames are validated
  and forwarded so codes and reasons cross unchanged;
- client text frames: unmasked and checked for UTF-8 (RFC 6455 8.1: "MUST
  _Fail the WebSocket Connection_"), 1007 otherwise;
- sizes: max_message_bytes (1009), send buffers (1013); messages_per_second.

Payloads of data frames are streamed: a 16 MiB binary message never sits in
the gateway whole. Whatever the gateway itself sends (pongs, keepalive,
close frames, messages from sinks and the management API) goes out only at
a frame boundary, so neither peer ever sees a torn frame; the upstream can be
let go and another attached at a boundary the same way (`detach_upstream`,
`attach_upstream`). How a session closes is in gateway/closing.py; where its
state may move is in gateway/session.py. A debug trace (gateway/trace.py,
traced.start) swaps in `traced.TracedSession` for as long as it runs, so a
session that is not traced runs exactly the code here; a reliable session (docs/reliable.md) is a
`reliable_session.ReliableSession`, chosen at the handshake.
"""

from __future__ import annotations

import os
import secrets
import time

from . import frames
from .auth import TokenBucket
from .closing import NULL_UPSTREAM as _NULL, Closing, log
from .errors import (GOING_AWAY, INVALID_PAYLOAD, MESSAGE_TOO_BIG, POLICY_VIOLATION, PROTOCOL_ERROR,
                     TRY_AGAIN_LATER, ProtocolViolation)
from .frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, mask_in_place as _mask, \
    parse_header, unmask
from .moving import Moving
from .replay import Draining
from .seam import Seam, Side, fileno
from .session import Close, CloseEvent, Event, Link, SideState, State, advance

__all__ = ["Session", "Side", "new_id", "log"]

_oswrite = os.write
_monotonic = time.monotonic




def new_id() -> str:
    return secrets.token_urlsafe(12)


class Session(Closing, Seam, Moving, Draining):
    """One client's session: identity, its two sides, and the relay between them.

    `id` names the client connection (Gateway-Connection-Id; the management
    API addresses it); `session_id` names the session (Gateway-Session-Id),
    which is meant to outlive a connection (resume) and an upstream (reattach).
    """

    __slots__ = (
        "node", "id", "session_id", "state", "transport", "ip", "started", "route", "route_metrics",
        "claims", "sub", "timer", "life_timer", "close_timer", "expiry_timer", "stall_timer", "stall_client",
        # the two sides (gateway/session.py SideState) and the upstream's socket
        "client", "upstream", "up", "endpoint", "backend", "sink", "deflate", "c_fd", "u_fd",
        # limits fixed when the session went live (session.LiveLimits), and the hot one
        "limits", "max_message", "bucket",
        # client -> upstream parser
        "c_buf", "c_need", "c_remaining", "c_msg", "c_msg_bytes", "c_utf8", "c_msg_text", "c_parts",
        "c_seen", "c_msgs", "c_bytes",
        # rate limit: the current client message is dropped / its streamed rest is skipped
        "c_drop", "c_skip",
        # upstream -> client parser
        "u_buf", "u_need", "u_remaining", "u_seen", "u_msgs", "u_bytes",
        # frames the gateway itself sends, held until the stream is at a frame boundary
        "c_later", "u_later",
        # closing: who started it, with what; a close waiting for the upstream's frame to end
        # (pending_close), a client fault's close waiting for the upstream's close (fault_close)
        "closer", "close_code", "close_reason", "pending_close", "fault_close",
        # detach/attach: the hold, the upstream being let go, what waits for which boundary
        "held", "leaving", "c_switch", "u_stop", "detach_waiter",
        # reattach: how to dial another upstream (reattach.Redial, None: never moved), a move under way
        "redial", "move",
        # housekeeping
        "ticks", "quiet_ticks", "last_msgs", "ping_due", "flushed_c", "flushed_u", "flushed_cb", "flushed_ub",
        # what sinks and the management API keep per session
        "channels", "sink_state",
        # while draining: what was meant for the client, on its way to the replay buffer (replay.py)
        "capture",
        # while resuming: what was meant for the client before its replay is out (resume.Early)
        "early",
        # a debug trace running (trace.Trace; the class is TracedSession meanwhile)
        "trace",
        # reliable mode (reliable.Peer; the class is ReliableSession), None otherwise
        "rel",
    )

    def __init__(self, node, transport):
        self.node = node
        # Both ids from one read of the CSPRNG: 16 characters each, as new_id() makes.
        ids = secrets.token_urlsafe(24)
        self.id = ids[:16]
        self.session_id = ids[16:]
        self.state = State.HANDSHAKE
        self.transport = transport
        peer = transport.get_extra_info("peername")
        self.ip = peer[0] if peer else ""
        self.started = time.monotonic()
        self.route = self.route_metrics = self.claims = self.sub = None
        self.timer = self.life_timer = self.close_timer = self.expiry_timer = self.stall_timer = None
        self.stall_client = False
        self.client = SideState("client")
        self.upstream = SideState("upstream", Close.GONE)  # until an upstream is attached
        self.up = _NULL
        self.endpoint = self.sink = self.backend = None
        self.deflate = False
        self.c_fd = self.u_fd = -1
        self.limits = None
        self.max_message = 0
        self.bucket = None
        self.c_buf = b""
        self.c_need = self.c_remaining = self.c_msg = self.c_msg_bytes = 0
        self.c_utf8 = None
        self.c_msg_text = False
        self.c_parts = None
        self.c_seen = self.u_seen = True
        self.c_msgs = self.c_bytes = self.u_msgs = self.u_bytes = 0
        self.c_drop = self.c_skip = False
        self.u_buf = b""
        self.u_need = self.u_remaining = 0
        self.c_later = self.u_later = b""
        self.closer = None
        self.close_code = 1006
        self.close_reason = ""
        self.pending_close = self.fault_close = None
        self.held = self.leaving = self.detach_waiter = None
        self.c_switch = self.u_stop = False
        self.redial = self.move = None
        self.ticks = self.quiet_ticks = self.last_msgs = 0
        self.ping_due = False
        self.flushed_c = self.flushed_u = self.flushed_cb = self.flushed_ub = 0
        self.channels = None
        self.sink_state = None
        self.capture = self.early = None
        self.trace = None
        self.rel = None

    # ------------------------------------------------------------ going live
    def go_live(self, response: bytes, upstream) -> None:
        """The handshake is done: fix the limits, write the 101, wire the sockets in.

        `upstream` is the dialled transport (paused), or None for a backend
        inside the gateway (`sink`). Nothing is read until `start`.
        """
        lim = self.limits = self.node.live_limits
        self.max_message = lim.max_message_bytes
        if lim.messages_per_second > 0:
            self.bucket = TokenBucket(lim.messages_per_second, lim.burst)
        self.state = advance(self.state, Event.UPGRADED)
        client = self.transport
        client.set_write_buffer_limits(high=lim.send_buffer_bytes)
        client.write(response)
        loop = self.node.loop
        self.timer = loop.call_later(lim.tick_s, self._tick)
        if lim.max_lifetime_s:
            self.life_timer = loop.call_later(lim.max_lifetime_s, self.gateway_close, GOING_AWAY,
                                              "max lifetime reached")
        if upstream is None:
            client.set_protocol(Side(self, self.from_client_messages, self.client_lost, True))
            return
        client.set_protocol(Side(self, self.from_client_relay, self.client_lost, True))
        self.c_fd = fileno(client)
        self._wire_upstream(upstream)

    def _wire_upstream(self, transport) -> None:
        self.up = transport
        self.upstream = SideState("upstream")
        transport.set_protocol(Side(self, self.from_upstream, self.upstream_lost, False))
        transport.set_write_buffer_limits(high=self.limits.send_buffer_bytes)
        self.u_fd = fileno(transport)

    def start(self, pending: bytes, leftover: bytes) -> None:
        """Relay what came before the relay was wired in, then read both sockets."""
        if self.sink is None:
            if leftover:
                self.from_upstream(leftover)
            self.up.resume_reading()
        if pending and self.state is State.OPEN:
            if self.sink is None:
                self.from_client_relay(pending)
            else:
                self.from_client_messages(pending)
        if not self.client.gone:
            self.transport.resume_reading()

    # ------------------------------------------------- client -> upstream
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

    def _client_violation(self, code: int, reason: str) -> None:
        """The client broke the protocol: tell it why, close the upstream cleanly."""
        self.node.count_violation(self, code)
        self.c_buf = b""
        self.c_need = 0
        # RFC 6455 7.1.7: having failed the connection, we need not wait for
        # the client's close frame; its further bytes are not to be trusted.
        if not self.client.received:
            self.client.on(CloseEvent.CLOSE_RECEIVED)
        up = self.upstream
        if up.received or up.sent:  # no upstream, or it is closing already
            self.gateway_close(code, reason, at_once=True)
            self._maybe_finish()
            return
        # What the backend already answered to the client's valid messages
        # still reaches it: close the upstream now, the client when the
        # upstream's close comes back (as a server answering in order would).
        self._closing_by_gateway(code, reason)
        self.fault_close = (code, reason)
        self._send_upstream_close(GOING_AWAY, "client error")

    def _check_client_frame(self, b0: int, length: int, mask, refused: bool = False) -> int:
        """Validate one client frame header; returns the opcode. Raises ProtocolViolation.

        `refused`: the fast path already asked the token bucket for this message and got no.
        """
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
                now = _monotonic()
                if not refused and bucket.take(now):
                    self.c_drop = False
                else:
                    # Over messages_per_second + burst: this message is dropped
                    # (and counted); staying over closes the session.
                    self.c_drop = True
                    self.c_msg_text = False
                    self.node.count_rate_limited(self)
                    after = self.limits.rate_limit_close_after_s
                    if after and bucket.over_for(now) >= after:
                        raise ProtocolViolation(POLICY_VIOLATION, "rate limit exceeded")
        else:
            raise ProtocolViolation(PROTOCOL_ERROR, "reserved opcode")
        self.c_msg_bytes += length
        if self.c_msg_bytes > self.max_message:
            if length >> 63:
                # RFC 6455 5.2: the 64-bit length's most significant bit MUST be 0.
                raise ProtocolViolation(PROTOCOL_ERROR, "64-bit length with the top bit set")
            raise ProtocolViolation(MESSAGE_TOO_BIG, f"message too big (max {self.max_message} bytes)")
        return opcode

    def from_client_relay(self, data: bytes) -> None:
        """Every read from the client socket while relaying to a websocket upstream."""
        self.c_seen = True
        self.c_bytes += len(data)
        if self.c_need or self.c_buf:
            data = self._join_client(data)
            if data is None:
                return
        if self.client.received or self.upstream.sent_close:
            # Nothing may follow a close frame. (A gone upstream still lets the
            # client's close through: its answer closes the client cleanly.)
            return
        n = len(data)
        pos = 0
        start = 0
        up = self.up
        if self.c_remaining:
            take = self.c_remaining if self.c_remaining < n else n
            self.c_remaining -= take
            pos = take
            if self.c_skip:  # the rest of a rate-limited frame
                start = take
                self.c_skip = self.c_remaining > 0
            if not self.c_remaining and (self.u_later or self.c_switch):
                if pos > start:
                    up.write(data[start:pos])
                start = pos
                self._at_upstream_boundary()
                up = self.up
        limit = self.max_message
        bucket = self.bucket
        refused = False
        while pos < n:
            b0 = data[pos]
            if (b0 == 0x81 or b0 == 0x82) and pos + 6 <= n and 0x80 <= data[pos + 1] <= 0xFD and not self.c_msg:
                # Fast path: a whole, unfragmented, masked message under 126
                # bytes, the common case. Same checks as below, fewer steps;
                # one token from the bucket, or the slow path drops it.
                end = pos + 6 + (data[pos + 1] & 0x7F)
                if end <= n and (end - pos - 6) <= limit:
                    if bucket is None or bucket.take(_monotonic()):
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
                    refused = True
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
                opcode = self._check_client_frame(b0, length, mask, refused)
            except ProtocolViolation as v:
                if pos > start:
                    up.write(data[start:pos])
                self._client_violation(v.code, v.reason)
                return
            refused = False
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
        if self.client.received:
            return
        n = len(data)
        pos = 0
        limit = self.max_message
        while pos < n:
            h = parse_header(data, pos)
            if h is None:
                self.c_buf = data[pos:]
                break
            b0, length, hlen, mask = h
            end = pos + hlen + length
            if end > n and length <= limit:
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
        if self.upstream.received:
            return
        n = len(data)
        pos = 0
        start = 0
        drop = self.client.sent  # nothing more reaches a closing client
        out = self.transport
        if self.u_remaining:
            take = self.u_remaining if self.u_remaining < n else n
            self.u_remaining -= take
            pos = take
            if not self.u_remaining and (self.c_later or self.pending_close is not None or self.u_stop):
                if not drop:
                    out.write(data[:pos])
                start = pos
                if self._at_client_boundary():
                    # This upstream was let go, or the drain's close just went to
                    # the client: the rest of what it sent is not relayed.
                    if self.capture is not None:
                        self.capture.feed(data[pos:])
                    return
                drop = self.client.sent
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

    # ------------------------------------------ frames the gateway sends itself
    def send_message(self, opcode: int, payload: bytes) -> bool:
        """Send one whole message to the client (sinks, management API)."""
        return self.send_raw(frames.frame(opcode, payload))

    def send_reply(self, opcode: int, payload: bytes) -> bool:
        """An HTTP backend's reply to a message of the client's (reliable_session.py keeps it past a full window)."""
        return self.send_message(opcode, payload)

    def send_raw(self, frame_bytes: bytes) -> bool:
        """Send an already built (unmasked) frame: fan-out builds it once for everyone."""
        if self.capture is not None:
            return self.capture.add_frame(frame_bytes)   # draining: it goes to the replay buffer
        if self.early is not None:
            return self.early.add_frame(frame_bytes)     # resuming: it goes after the replay
        if self.client.sent or self.state is not State.OPEN:
            return False
        self.u_msgs += 1
        self.u_bytes += len(frame_bytes)
        self._send_client(frame_bytes)
        return True

    def _send_client(self, data: bytes) -> None:
        """Frames the gateway writes to the client itself: only at a frame boundary."""
        if self.client.sent:
            return
        if self.u_remaining:
            self.c_later += data
        else:
            self.transport.write(data)

    def _send_upstream(self, data: bytes) -> None:
        if self.upstream.sent:
            return
        if self.c_remaining:
            self.u_later += data
        else:
            self.up.write(data)

    def _at_upstream_boundary(self) -> None:
        """A half-forwarded client frame just ended: send what waited for it."""
        if self.u_later:
            data = self.u_later
            self.u_later = b""
            self._send_upstream(data)
        if self.c_switch:
            self._switch_client_stream()

    def _at_client_boundary(self) -> bool:
        """A half-forwarded upstream frame just ended: send what waited for it.

        True when the upstream was let go here (its further bytes are not relayed).
        """
        if self.c_later:
            data = self.c_later
            self.c_later = b""
            if not self.client.sent:
                self.transport.write(data)
        if self.pending_close is not None:
            code, reason = self.pending_close
            self.pending_close = None
            self.gateway_close(code, reason)
            if self.capture is not None and self.client.sent:
                return True   # drained: the upstream's frames go to the capture from here
        if self.u_stop:
            self._stop_upstream_stream()
            return True
        return False

    # ------------------------------------------------------- backpressure
    def stalled(self, client_side: bool) -> None:
        """A peer's send buffer passed send_buffer_bytes: stop reading what feeds it.

        TCP backpressure handles a peer that is merely slower; one whose buffer
        stays full for stall_timeout_s has stopped reading and is closed (1013).
        """
        if client_side:
            if not self.upstream.gone:
                self.up.pause_reading()
                if self.leaving is not None:
                    self.leaving.pause_reading()
            else:
                self.transport.pause_reading()  # a sink answers what the client sends
        elif not self.client.gone:
            self.transport.pause_reading()
        if self.stall_timer is None and not self.closer:
            self.stall_timer = self.node.loop.call_later(self.limits.stall_timeout_s, self.overflow, client_side)
            self.stall_client = client_side

    def unstalled(self, client_side: bool) -> None:
        if self.stall_timer is not None:
            self.stall_timer.cancel()
            self.stall_timer = None
        if client_side:
            if not self.upstream.gone:
                self.up.resume_reading()
                if self.leaving is not None:
                    self.leaving.resume_reading()
            elif not self.client.gone:
                self.transport.resume_reading()
        elif not self.client.gone:
            self.transport.resume_reading()

    def overflow(self, client_side: bool) -> None:
        """A peer stopped reading: its send buffer stayed full for stall_timeout_s."""
        self.stall_timer = None
        self.node.count_overflow(self, client_side)
        if client_side:
            if not self.upstream.gone:
                self.up.pause_reading()
            self.gateway_close(TRY_AGAIN_LATER, "slow consumer", at_once=True)
        else:
            self.transport.pause_reading()
            self.gateway_close(TRY_AGAIN_LATER, "backend not reading", at_once=True)
            if not self.upstream.gone:
                self.up.abort()

    # -------------------------------------------------------- housekeeping
    def _tick(self) -> None:
        """Every tick_s: flush counters, keepalive both ways, idle check."""
        node = self.node
        lim = self.limits
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
            if self.quiet_ticks >= lim.idle_ticks:
                self.gateway_close(GOING_AWAY, "idle timeout")
                return
        if lim.ping_ticks and self.ticks % lim.ping_ticks == 0:
            # Keepalive runs only with an upstream attached: none is owed to a held stream.
            upstream = self.sink is None and self.upstream.link is Link.ATTACHED
            if self.ping_due:
                # No byte from a peer for a whole ping interval after a ping.
                if not self.c_seen:
                    self._client_timed_out()
                    return
                if upstream and not self.u_seen:
                    self._upstream_failed("upstream keepalive timed out")
                    return
            self.c_seen = self.u_seen = False
            self.ping_due = True
            self._send_client(b"\x89\x00")
            if upstream:
                self._send_upstream(b"\x89\x80\x00\x00\x00\x00")
        self.timer = node.loop.call_later(lim.tick_s, self._tick)

    def _client_timed_out(self) -> None:
        """No byte from the client for a whole ping interval after a ping."""
        self._start_closing(1006, "keepalive timeout", "gateway")
        self._send_upstream_close(GOING_AWAY, "client keepalive timed out")
        self._abort_client()

    # ------------------------------------------------------------ debug trace
    def _rebind_sides(self) -> None:
        """Each socket whose Side reads into this session's relay: bound to the
        current class's method (after traced.start or traced.stop changed it)."""
        for transport in (self.transport, self.up, self.leaving):
            get = getattr(transport, "get_protocol", None)   # not on the hold, nor on a gone upstream
            side = get() if get is not None else None
            if type(side) is Side and getattr(side.data_received, "__self__", None) is self:
                name = getattr(side.data_received, "__name__", "")
                if name in _RELAY_METHODS:
                    side.data_received = getattr(self, name)
                    transport.set_protocol(side)


_RELAY_METHODS = frozenset({"from_client_relay", "from_client_messages", "from_upstream"})
