"""Reliable sessions (docs/reliable.md): the relay of a session that speaks
gateway.reliable.v1 with its client. A subclass of relay.Session chosen once, at
the handshake (`make_reliable`), so plain sessions run exactly relay.py's code."""

from __future__ import annotations

from . import frames, reliable, tokens
from .errors import INVALID_PAYLOAD, MESSAGE_TOO_BIG, PROTOCOL_ERROR, ProtocolViolation
from .frames import OP_BINARY, OP_CLOSE, OP_CONT, OP_PING, OP_PONG, OP_TEXT, parse_header, unmask
from .session import State
from .relay import Session

__all__ = ["ReliableSession", "make_reliable"]


def make_reliable(s: Session, cfg, up: int = 0, down: int = 0) -> bytes:
    """Make `s` a reliable session (docs/reliable.md) before it goes live, with the
    counts so far (`up`, `down`: non-zero on a resume). Returns the hello frame,
    which rides with the 101; its token is the one a resume after a drop takes."""
    s.__class__ = ReliableSession
    rel = s.rel = reliable.Peer(cfg, up, down)
    token, rel.token_hash = tokens.new(s.session_id)
    return frames.frame(OP_TEXT, reliable.hello(s.session_id, token, up, down))


class ReliableSession(Session):
    """A session that speaks gateway.reliable.v1 with its client (docs/reliable.md).

    Every message between client and gateway carries a kind byte, so both
    relay directions run on whole messages here: a client `d` goes upstream
    without its kind byte, an upstream message goes to the client with one and
    is kept in the window until the client acks it. When the window is full
    the upstream is not read (TCP backpressure on the backend). Plain sessions
    never run this code; the class is chosen once, at the handshake.
    """

    __slots__ = ()

    # ------------------------------------------------- client -> upstream
    def from_client_relay(self, data: bytes) -> None:
        """Every read from a reliable client: whole messages, kind byte checked and stripped.

        The loop is from_client_messages' (a sink's), written out again on purpose: the
        sink's per-message path stays as it was, with no call per message added to it."""
        self.c_seen = True
        self.c_bytes += len(data)
        if self.c_need or self.c_buf:
            data = self._join_client(data)
            if data is None:
                return
        if self.client.received or self.upstream.sent_close:
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
            start = pos
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
                if self.closer != "gateway":
                    self._send_upstream(data[start:end])   # the client's own close, as the relay passes it
                self._client_close_frame(parsed)
                return
            if self.c_parts is None:
                self.c_parts = [payload]
            else:
                self.c_parts.append(payload)
            if b0 & 0x80:
                parts = self.c_parts
                self.c_parts = None
                kind = self.c_msg
                self.c_msg = 0
                if len(parts) == 1:
                    # One frame: it can go on as it came, masked, less its first byte.
                    if not self._from_client(kind, payload, mask, data[start + hlen + 1:end]):
                        return
                elif not self._from_client(kind, b"".join(parts)):
                    return

    def _from_client(self, opcode: int, message: bytes, mask=None, masked: bytes = b"") -> bool:
        """One whole client message. False when the session is failed for it.

        `mask`, `masked`: a one-frame message's mask and its payload as it came,
        without the kind byte; the frame upstream is then built without masking
        again (the key turned by the byte cut off, RFC 6455 5.3)."""
        if opcode == OP_TEXT and not frames.text_is_valid(message):
            self._client_violation(INVALID_PAYLOAD, "invalid UTF-8 in text message")
            return False
        rel = self.rel
        kind = message[0] if message else -1
        if kind == reliable.DATA:
            # Counted even when the rate limit drops it, so both sides' numbers stay in step.
            if rel.inbound.take() >= rel.inbound.ack_every:
                self._ack_now()
            elif rel.ack_timer is None:
                rel.ack_timer = self.node.loop.call_later(rel.ack_s, self._ack_due)
            if self.c_drop:
                return True
            self.c_msgs += 1
            if self.sink is not None:   # an HTTP backend: POSTed as a plain message
                self.sink.on_message(self, opcode, message[1:])
                return self.closer is None
            if mask is None:
                self._send_upstream(frames.frame(opcode, message[1:], mask=True))
            else:
                self._send_upstream(reliable.masked_head(opcode, len(masked)) + mask[1:] + mask[:1] + masked)
            return True
        if kind == reliable.ACK and opcode == OP_TEXT:
            count = reliable.parse_ack(message[1:])
            window = rel.window
            full = window.full
            if count is None or not window.ack(count):
                self._client_violation(PROTOCOL_ERROR, "reliable: bad ack")
                return False
            if full and not window.full:
                if not self.upstream.gone:
                    if self.u_buf:
                        self.from_upstream(b"")   # what was read past the full window
                    if not window.full and not (self.stall_timer is not None and self.stall_client):
                        self.up.resume_reading()
                elif rel.room is not None:
                    self.wake_room()
            return True
        self._client_violation(PROTOCOL_ERROR, "reliable: unknown kind byte")
        return False

    # The relay's read function for a backend inside the gateway (an HTTP backend) too:
    # every message carries the kind byte either way.
    from_client_messages = from_client_relay

    def _ack_now(self) -> None:
        rel = self.rel
        if rel.ack_timer is not None:
            rel.ack_timer.cancel()
            rel.ack_timer = None
        count = rel.inbound.acking()
        if count is not None:
            self._send_client(frames.frame(OP_TEXT, reliable.ack(count)))

    def _ack_due(self) -> None:
        self.rel.ack_timer = None
        if self.state is State.OPEN and not self.client.sent:
            self._ack_now()

    # ------------------------------------------------- upstream -> client
    def from_upstream(self, data: bytes) -> None:
        """Every read from the upstream: whole messages, each sent with its kind byte and kept."""
        self.u_seen = True
        self.u_bytes += len(data)
        if self.u_need:   # a frame still arriving: appended, O(1) amortised
            buf = self.u_buf
            buf += data
            if len(buf) < self.u_need:
                return
            data = bytes(buf)
            self.u_buf = b""
            self.u_need = 0
        elif self.u_buf:
            data = self.u_buf + data
            self.u_buf = b""
        if self.upstream.received:
            return
        rel = self.rel
        n = len(data)
        pos = 0
        while pos < n:
            h = parse_header(data, pos)
            if h is None:
                self.u_buf = data[pos:]
                return
            b0, length, hlen, mask = h
            end = pos + hlen + length
            opcode = b0 & 0x0F
            if mask is not None or b0 & 0x70 or (opcode >= 8 and (length > 125 or not b0 & 0x80)):
                # RFC 6455 5.1; and no extension was negotiated with it (the kind byte needs plain payloads).
                self._upstream_failed("upstream protocol error", PROTOCOL_ERROR)
                return
            if opcode < 8 and rel.parts_size + length > self.max_message:
                self._upstream_failed("upstream message over max_message_bytes", MESSAGE_TOO_BIG)
                return
            if end > n:
                self.u_buf = bytearray(data[pos:])   # bounded: max_message_bytes, or a control frame
                self.u_need = end - pos
                return
            payload = data[pos + hlen:end]
            if opcode >= 8:
                if opcode == OP_CLOSE:
                    parsed = frames.parse_close(payload)
                    if parsed is None:
                        self._upstream_failed("upstream sent an invalid close frame", PROTOCOL_ERROR)
                        return
                    self._upstream_close_frame(parsed, data[pos:end])
                    return
                if opcode == OP_PING:
                    self._send_upstream(frames.frame(OP_PONG, payload, mask=True))
                pos = end
                continue
            pos = end
            if (opcode == OP_CONT) != (rel.parts is not None) or opcode > OP_BINARY:
                self._upstream_failed("upstream protocol error", PROTOCOL_ERROR)
                return
            if opcode != OP_CONT:
                rel.msg_op = opcode
                rel.parts = []
            rel.parts.append(payload)
            rel.parts_size += length
            if b0 & 0x80:
                parts, rel.parts = rel.parts, None
                rel.parts_size = 0
                self._to_client(rel.msg_op, parts[0] if len(parts) == 1 else b"".join(parts))
                if rel.window.full and pos < n:
                    self.u_buf = data[pos:]   # read again once an ack makes room: the bound holds exactly
                    return

    def _to_client(self, opcode: int, payload: bytes) -> bool:
        """One whole message for the client: numbered, kept until acked, sent with its kind byte."""
        if self.client.sent or self.state is not State.OPEN:
            return False
        window = self.rel.window
        window.add(opcode, payload)
        self.u_msgs += 1
        self._send_client(frames.frame(opcode, b"d" + payload))
        if window.full and not self.upstream.gone:
            self.up.pause_reading()   # until an ack makes room (_from_client)
        return True

    # ------------------------------------------ frames the gateway sends itself
    def send_message(self, opcode: int, payload: bytes) -> bool:
        """A push or channel message: numbered like the upstream's; refused while the window is full."""
        if self.rel.window.full and self.capture is None and self.early is None:
            return False
        return self.send_reply(opcode, payload)

    def send_reply(self, opcode: int, payload: bytes) -> bool:
        """An HTTP backend's reply to a message the client sent: numbered and kept even
        when the window is full. Bounded all the same: the backend's worker POSTs the
        next message only once the window has room (window_room), so one reply per
        backend at most goes past it."""
        if self.capture is not None:
            return self.capture.add(opcode, bytes(payload))   # draining: it goes to the replay buffer
        if self.early is not None:
            return self.early.add(opcode, bytes(payload))     # resuming: it goes after the replay
        self.u_bytes += len(payload)
        return self._to_client(opcode, bytes(payload))

    def numbered(self, opcode: int, payload: bytes) -> bytes:
        """The frame of a message that rides with the 101 after the hello (an HTTP
        backend's connect reply): numbered and kept like any other."""
        self.rel.window.add(opcode, payload)
        return frames.frame(opcode, b"d" + payload)

    async def window_room(self) -> None:
        """Until the window has room for an HTTP backend's next reply, or no longer
        needs it (the session drained, parked or ended: what comes goes elsewhere)."""
        rel = self.rel
        while rel.window.full and self.capture is None and self.state is State.OPEN:
            if rel.room is None:
                rel.room = self.node.loop.create_future()
            await rel.room

    def wake_room(self) -> None:
        """An ack made room, or the session drained or ended: a waiting worker looks again."""
        room, self.rel.room = self.rel.room, None
        if room is not None and not room.done():
            room.set_result(None)

    def send_raw(self, frame_bytes: bytes) -> bool:
        m = frames.message(frame_bytes)
        return m is not None and self.send_message(*m)

    # ------------------------------------------------------------ teardown
    def client_lost(self) -> None:
        """Gone without a close: parked for a resume (drain.Drainer.dropped), when it can be.
        Still resuming (its replay not out yet): parked once the replay is in its window
        (resume.complete), so the next resume gets that too."""
        if self.early is not None:
            self.early.lost = True
            return
        drainer = self.node.drainer
        if drainer is None or not drainer.dropped(self):
            Session.client_lost(self)

    def _client_timed_out(self) -> None:
        """A client that stopped answering may come back (a dead wifi, a NAT timeout):
        its transport is let go, and its loss parks the session (client_lost)."""
        self.transport.abort()

    # ------------------------------------------------------- backpressure
    def unstalled(self, client_side: bool) -> None:
        Session.unstalled(self, client_side)
        if client_side and self.rel.window.full and not self.upstream.gone:
            self.up.pause_reading()   # the window, not the socket, holds the upstream back now
