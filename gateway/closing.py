"""How a live session ends: close frames both ways, timeouts, teardown.

A mixin of relay.Session (its slots live there). Each side's close handshake
is a session.SideState, moved only through its table; this code decides
which event happens when:

- a peer's close frame is forwarded to the other peer, so codes and reasons
  cross unchanged, and the answer travels back the same way;
- a close the gateway starts (`gateway_close`) goes to the client with its
  code and to the upstream as 1001, each at a frame boundary: mid-frame, a
  close frame would corrupt the stream, so the close waits for the frame to
  end (`pending_close`) or the socket is cut;
- a client that breaks the protocol is failed at once (RFC 6455 7.1.7), but
  what the backend already answered still reaches it: the client's close
  waits for the upstream's (`fault_close`);
- close_timeout_s bounds all of it; then both sockets are cut.

None of this runs per message.
"""

from __future__ import annotations

import logging

from . import frames
from .errors import GOING_AWAY, INTERNAL_ERROR
from .frames import OP_CLOSE
from .session import Close, CloseEvent, Event, State, advance

log = logging.getLogger("gateway.session")

_BEFORE_LIVE = frozenset({State.HANDSHAKE, State.CONNECTING, State.REFUSED})


class _Null:
    """Stands in for a gone upstream (or none, for backends inside the gateway)
    so the relay loop needs no checks."""

    __slots__ = ()

    def write(self, data) -> None:
        pass

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return True

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def abort(self) -> None:
        pass

    def close(self) -> None:
        pass


NULL_UPSTREAM = _Null()


class Closing:
    __slots__ = ()

    def _start_closing(self, code: int, reason: str, closer: str) -> None:
        if self.closer is None:
            self.closer = closer
            self.close_code = code
            self.close_reason = reason
            self.state = advance(self.state, Event.CLOSE_STARTED)
            self.close_timer = self.node.loop.call_later(self.limits.close_timeout_s, self._close_timeout)

    def _client_close_frame(self, parsed: tuple[int, str]) -> None:
        """A valid close frame arrived from the client (already forwarded if it should be)."""
        client = self.client
        if not client.received:
            client.on(CloseEvent.CLOSE_RECEIVED)
        code, reason = parsed
        if self.closer is None:
            self._start_closing(code, reason, "client")
        if self.sink is not None:
            # A backend inside the gateway: echo (unless we started it) and finish.
            if not client.sent:
                self._send_client(frames.frame(OP_CLOSE, frames.close_payload(code) if code != 1005 else b""))
                client.on(CloseEvent.CLOSE_SENT)
        elif self.closer == "gateway":
            # The client answered our close; now close the upstream cleanly.
            self._send_upstream_close(GOING_AWAY, "client closed")
        elif not self.upstream.sent:
            self.upstream.on(CloseEvent.CLOSE_SENT)  # the client's own frame went upstream as it was
        self._maybe_finish()

    def _upstream_close_frame(self, parsed: tuple[int, str], raw: bytes) -> None:
        if self.move is not None:
            # The upstream being let go (seam.py) answered, or closed first: not the client's business.
            self.upstream_leaving(parsed[0])
            return
        if self.redial is not None and self.redial.upstream_closed(self, parsed[0]):
            return  # 1001/1012 on a reattach backend: the session moves on, the client sees nothing
        upstream = self.upstream
        upstream.on(CloseEvent.CLOSE_RECEIVED)
        if self.fault_close is not None:
            self.gateway_close(*self.fault_close)
            self.fault_close = None
            return
        code, reason = parsed
        if self.closer is None:
            self._start_closing(code, reason, "upstream")
        if not self.client.sent:
            self.transport.write(raw)  # unmasked server frame: forwarded as it is
            self.client.on(CloseEvent.CLOSE_SENT)
        if not upstream.sent:
            # The upstream started it and the client is already closing (gateway
            # close): answer the upstream ourselves.
            if self.closer != "upstream":
                self._send_upstream_close(code if code != 1005 else 1000, "")
        self._maybe_finish()

    def _send_upstream_close(self, code: int, reason: str) -> None:
        if self.upstream.sent:
            return
        self.upstream.on(CloseEvent.CLOSE_SENT)
        if self.c_remaining:
            self.up.abort()  # mid-frame: a close frame now would corrupt the stream
            return
        self.up.write(frames.frame(OP_CLOSE, frames.close_payload(code, reason), mask=True))

    def gateway_close(self, code: int, reason: str, *, at_once: bool = False) -> None:
        """Close the session from the gateway: `code` to the client, 1001 upstream."""
        client = self.client
        if client.sent or self.state is State.CLOSED:
            return
        if self.u_remaining and not self.upstream.received:
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
            self.transport.write(frames.frame(OP_CLOSE, frames.close_payload(code, reason)))
            client.on(CloseEvent.CLOSE_SENT)
            if self.capture is not None:
                self._capture_upstream()   # draining: the upstream's frames are kept for the resume
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
        if not self.upstream.received:
            self.upstream.on(CloseEvent.CLOSE_RECEIVED)  # nothing more it sends is read
        self.gateway_close(INTERNAL_ERROR, "upstream failed", at_once=True)

    def _maybe_finish(self) -> None:
        if self.client.close is Close.CLOSED:
            self.transport.close()  # RFC 6455 7.1.1: the server closes the TCP connection
        if self.upstream.close is Close.CLOSED:
            self.up.close()

    def _close_timeout(self) -> None:
        self.close_timer = None
        self.abort()

    def abort(self) -> None:
        """Cut both sockets now (close timeout, end of shutdown)."""
        self._abort_client()
        if not self.upstream.gone:
            self.upstream.on(CloseEvent.ABORTED)
            self.up.abort()
        if self.leaving is not None:
            self._drop_leaving()

    def _abort_client(self) -> None:
        """Cut the client socket; nothing more is written to it."""
        if not self.client.gone:
            self.client.on(CloseEvent.ABORTED)
            self.transport.abort()

    # ------------------------------------------------------------ teardown
    def client_lost(self) -> None:
        """The client's socket is gone (after the 101)."""
        self.c_fd = -1
        had_close = self.client.received
        self.client.on(CloseEvent.LOST)
        if not had_close:
            # Gone without a close frame: 1006 to our books, 1001 to the upstream.
            if self.closer is None:
                self._start_closing(1006, "", "client")
            self._send_upstream_close(GOING_AWAY, "client went away")
        if self.held is not None and self.up is self.held:
            self.up.abort()  # detached: no upstream is owed a goodbye
        self._maybe_finish()
        if self.upstream.gone:
            self._finish()

    def upstream_lost(self) -> None:
        """The upstream's socket is gone (or, while detached, the session gave up on one)."""
        self.u_fd = -1
        self.up = NULL_UPSTREAM
        if self.held is not None or self.leaving is not None:
            self._drop_leaving()
        upstream = self.upstream
        had_close = upstream.received
        upstream.on(CloseEvent.LOST)
        if not had_close and not self.client.sent:
            code, reason = self.fault_close or (INTERNAL_ERROR, "upstream failed")
            self.gateway_close(code, reason, at_once=True)
        if self.client.gone:
            self._finish()

    def lost_before_live(self) -> None:
        """The client's socket went during the handshake (or after a refusal)."""
        self.client.on(CloseEvent.LOST)
        self._finish()

    def _finish(self) -> None:
        if self.state is State.CLOSED:
            return
        prior = self.state
        self.state = advance(self.state, Event.LOST)
        for t in (self.timer, self.life_timer, self.close_timer, self.expiry_timer, self.stall_timer):
            if t is not None:
                t.cancel()
        self.timer = self.life_timer = self.close_timer = self.expiry_timer = self.stall_timer = None
        self.node.session_closed(self, was_open=prior not in _BEFORE_LIVE)
