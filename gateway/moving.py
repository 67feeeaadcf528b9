"""Moving a session to another upstream without losing a frame (reattach).

A mixin of relay.Session, beside seam.py's detach/attach: `move_upstream`
is make before break (the new upstream takes the client stream at a frame
boundary; the old one's frames still reach the client until it answers the
1001, bounded by close_timeout_s; what the new one sent meanwhile waits in a
`_Pending` and follows); `upstream_leaving` is the entry for an upstream
that closed first (its close is answered at the switch point, client frames
wait in a strict hold: past send_buffer_bytes, 1013); `give_up_upstream`
closes the client when nothing can take the session. The policy (when to
move, where to) is reattach.py's. Nothing here runs per message.
"""

from __future__ import annotations

import asyncio

from . import frames
from .errors import GOING_AWAY, TRY_AGAIN_LATER, InvalidTransition
from .frames import OP_CLOSE
from .seam import _RETIRED, Side, _close_answer, _Hold, fileno
from .session import LinkEvent

__all__ = ["Moving"]


class _Move:
    """One upstream being swapped for another (`Seam.move_upstream`), and what it waits for.

    The old upstream is `leaving`: client frames go to it until the client
    stream's switch point, its frames reach the client until its close comes.
    The new one (`to`, or the hold when it is still to be dialled) takes the
    client stream at the switch; what it sends waits in `pending` until the
    old one's stream has ended, so the client sees the old stream whole, then
    the new one.
    """

    __slots__ = ("old", "old_code", "requested", "switched", "to", "pending", "endpoint", "waiter", "timer")

    def __init__(self, old, waiter: asyncio.Future):
        self.old = old
        self.old_code: int | None = None   # its close came (1006: it went without one)
        self.requested = False             # move_upstream said where client frames go
        self.switched = False              # ... and they go there now
        self.to = None
        self.pending: _Pending | None = None
        self.endpoint = None
        self.waiter = waiter
        self.timer = None


class _Pending(asyncio.Protocol):
    """The next upstream while the old one still sends: its bytes wait here, in
    order, until the old stream has ended. Bounded like the hold: past
    send_buffer_bytes it is not read any more."""

    __slots__ = ("s", "transport", "buf", "limit", "gone")

    def __init__(self, session: "Moving", transport, leftover: bytes, limit: int):
        self.s = session
        self.transport = transport
        self.buf = bytearray(leftover)
        self.limit = limit
        self.gone = False

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if len(self.buf) > self.limit:
            self.transport.pause_reading()

    def eof_received(self):
        return False

    def connection_lost(self, exc) -> None:
        self.gone = True
        if self.s.up is self.transport:
            self.s.upstream_lost()

    def pause_writing(self) -> None:
        self.s.stalled(False)

    def resume_writing(self) -> None:
        self.s.unstalled(False)


class Moving:
    __slots__ = ()

    def move_upstream(self, transport=None, leftover: bytes = b"", endpoint=None) -> asyncio.Future:
        """Make before break: `transport` (dialled, paused) takes over from the upstream.

        At the client stream's next frame boundary client frames go to
        `transport` (None: to a strict hold, for `attach_upstream` later) and
        the old upstream gets a 1001 (or, if it closed first, the answer to its
        close). Its frames keep reaching the client until its close comes,
        for close_timeout_s at most; then what `transport` sent follows. The
        future is True once the old upstream is let go (False: the session
        lost its upstream meanwhile and is closing).

        Call it at a client message boundary (`c_msg == 0`): a fragmented
        message is never split between two upstreams.
        """
        if self.c_msg:
            raise InvalidTransition("move in the middle of a client message")
        m = self.move
        if m is None:
            m = self._begin_move()
        elif m.requested:
            raise InvalidTransition("move already under way")
        m.requested = True
        if transport is None:
            self.held = _Hold(self, self.limits.send_buffer_bytes, strict=True)
        else:
            m.to = transport
            m.endpoint = endpoint
            m.pending = _Pending(self, transport, leftover, self.limits.send_buffer_bytes)
            transport.set_protocol(m.pending)
            transport.set_write_buffer_limits(high=self.limits.send_buffer_bytes)
        self.c_switch = True
        if not self.c_remaining:
            self._switch_client_stream()
        return m.waiter

    def upstream_leaving(self, code: int) -> None:
        """The upstream's close frame came, and the session outlives it: the close
        does not reach the client, it is answered at the client's switch point.

        Either the answer to a move's 1001, or the upstream closing first
        (1001/1012, reattach): then a move begins here, and `move_upstream`
        (at a client message boundary) says where client frames go next.
        """
        m = self.move
        if m is None:
            m = self._begin_move()
        m.old_code = code
        m.old.set_protocol(_RETIRED)  # its stream has ended
        if m.timer is not None:
            m.timer.cancel()
            m.timer = None
        self._maybe_moved()

    def give_up_upstream(self, code: int, reason: str) -> None:
        """No upstream takes the session (a failed reattach): `code` to the client,
        what is left of the upstream side goes."""
        if self.move is None and self.held is None:
            self.gateway_close(code, reason)   # still on its upstream: it gets the usual 1001
            return
        self.gateway_close(code, reason)
        if not self.upstream.gone:
            self.upstream_lost()

    def _begin_move(self) -> _Move:
        self._check_movable("move")
        self.upstream.link_on(LinkEvent.DETACH)
        old = self.leaving = self.up
        old.set_protocol(Side(self, self.from_upstream, self._leaving_lost, False))
        m = self.move = _Move(old, self.node.loop.create_future())
        return m

    def _move_client_stream(self) -> None:
        """At the client stream's switch point: the old upstream gets its close, client frames go on."""
        m = self.move
        m.switched = True
        if m.old_code is None:
            m.old.write(frames.frame(OP_CLOSE, frames.close_payload(GOING_AWAY, "session moved"), mask=True))
            m.timer = self.node.loop.call_later(self.limits.close_timeout_s, self._leaving_timeout)
        elif m.old_code != 1006:
            m.old.write(_close_answer(m.old_code))
        if m.to is None:
            self.up = self.held
            self.u_fd = -1
        else:
            self.up = m.to
            self.u_fd = fileno(m.to)
            if m.pending.gone:   # the new one went before it took over
                self.upstream_lost()
                return
        self._client_unblocked()
        self._maybe_moved()

    def _maybe_moved(self) -> None:
        """Both streams are past the old upstream: let it go, let the new one's frames through."""
        m = self.move
        if m is None or not m.switched or m.old_code is None:
            return
        self.move = None
        if m.timer is not None:
            m.timer.cancel()
        old = self.leaving
        self.leaving = None
        old.set_protocol(_RETIRED)
        old.close()   # both closes went (or it is gone)
        self.u_buf = b""  # a control frame it left unfinished, of which the client saw nothing
        self.u_need = 0
        self.upstream.link_on(LinkEvent.AT_BOUNDARY)
        self._let_go_endpoint()
        if m.to is not None:
            self._attach(m.to, m.endpoint, b"", bytes(m.pending.buf))
        if not m.waiter.done():
            m.waiter.set_result(True)

    def _leaving_lost(self) -> None:
        """The old upstream's socket went during a move (or its close answer is late)."""
        m = self.move
        if m is None:
            return
        if not m.switched or self.u_remaining:
            # Client frames still go to it, or the client has part of a frame
            # nothing can finish: the session has lost its upstream.
            self.upstream_lost()
            return
        m.old_code = 1006
        self._maybe_moved()

    def _leaving_timeout(self) -> None:
        m = self.move
        if m is None:
            return
        m.timer = None
        m.old.set_protocol(_RETIRED)
        m.old.abort()
        self._leaving_lost()

    def _hold_overflowed(self, held: _Hold) -> None:
        if self.held is held and self.up is held and not held.cut:
            self.give_up_upstream(TRY_AGAIN_LATER, "reattach buffer full")
