"""A session's sockets: the `Side` protocol each socket gets while relaying,
and the seam where the upstream connection is let go and another attached.

Two ways across the seam:

- `detach_upstream` / `attach_upstream`: break, then make. Both streams stop
  at their next frame boundary, the old upstream gets a 1001, client frames
  wait in a hold (it pauses the client when full) until the next one is
  attached.
- `move_upstream` (reattach; the mechanism is in moving.py, the policy in
  reattach.py): make before break. The
  new upstream, already dialled, takes the client stream at its next frame
  boundary, when the old one gets a 1001 ("session moved"); the old one's
  frames still reach the client until its close answer comes (bounded by
  close_timeout_s), and only then the new one's. Nothing either upstream
  sent is dropped. When the old upstream closed first (1001/1012,
  `upstream_leaving`) its close is answered at the switch instead, and
  client frames wait in a hold (over send_buffer_bytes: 1013) until the
  next upstream is dialled and attached.

A mixin of relay.Session (its slots live there), like closing.py. Nothing
here runs per message: the relay functions call into it only at the frame
boundary where a detach or a move was asked for.
"""

from __future__ import annotations

import asyncio

from . import frames
from .errors import GOING_AWAY, InvalidTransition
from .frames import OP_CLOSE
from .session import Close, Link, LinkEvent, State

__all__ = ["Seam", "Side", "fileno"]


class Side(asyncio.Protocol):
    """The protocol of one of a session's sockets while relaying.

    `data_received` is an instance slot bound to the session's relay function
    for that direction: the event loop looks it up once (uvloop caches it at
    set_protocol), so each read costs one Python call, not two.
    """

    __slots__ = ("s", "data_received", "lost", "client_side")

    def __init__(self, session: "Seam", data_received, lost, client_side: bool):
        self.s = session
        self.data_received = data_received
        self.lost = lost
        self.client_side = client_side

    def eof_received(self):
        """The peer shut its write side (FIN). Keep ours open only while a close frame is
        still owed to a client that has said its last: it sent its close frame, or it broke
        the protocol (relay._client_violation) and its close waits for the upstream's
        (`fault_close`) or for a frame boundary (`pending_close`). RFC 6455 7.1.7: that
        frame, and what the backend answered before it, should reach the client before the
        TCP connection ends. The session is closing, so close_timeout_s bounds the wait;
        once the close frame is written, _maybe_finish closes the transport. Any other EOF
        ends the connection at once, as before (returning False closes the transport)."""
        if self.client_side:
            client = self.s.client
            return client.received and not client.sent
        return False

    def connection_lost(self, exc) -> None:
        self.lost()

    def pause_writing(self) -> None:
        self.s.stalled(self.client_side)

    def resume_writing(self) -> None:
        self.s.unstalled(self.client_side)



class _Hold:
    """The upstream while it is detached: client frames wait here, in order.

    Bounded by send_buffer_bytes: past it the client is not read any more
    (TCP backpressure) until an upstream is attached; a `strict` hold (a
    reattach's, which no operator waits on) closes the session with 1013
    instead. Looks like a transport to the relay, so the per-message path
    does not change while detached.
    """

    __slots__ = ("s", "buf", "limit", "paused", "cut", "strict")

    def __init__(self, session: "Seam", limit: int, strict: bool = False):
        self.s = session
        self.buf = bytearray()
        self.limit = limit
        self.paused = False
        self.cut = False
        self.strict = strict

    def write(self, data) -> None:
        if self.cut:
            return
        self.buf += data
        if len(self.buf) > self.limit and not self.paused:
            self.paused = True
            self.s.transport.pause_reading()
            if self.strict:
                asyncio.get_running_loop().call_soon(self.s._hold_overflowed, self)

    def get_write_buffer_size(self) -> int:
        return len(self.buf)

    def is_closing(self) -> bool:
        return self.cut

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def abort(self) -> None:
        """The session gives up on the upstream while detached: lost, like a transport's abort."""
        if not self.cut:
            self.cut = True
            self.buf = bytearray()
            asyncio.get_running_loop().call_soon(self._lost)

    close = abort

    def _lost(self) -> None:
        if self.s.up is self:
            self.s.upstream_lost()


class _Retired(asyncio.Protocol):
    """The protocol of an upstream connection the session has let go."""

    __slots__ = ()

    def data_received(self, data: bytes) -> None:
        pass

    def eof_received(self):
        return False


_RETIRED = _Retired()


def _ignore(data: bytes) -> None:
    pass


def fileno(transport) -> int:
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


class Seam:
    """The upstream swapped at frame boundaries: detach/attach, and move (see the module docstring)."""

    __slots__ = ()

    def detach_upstream(self) -> asyncio.Future:
        """Let go of the upstream connection at the next frame boundary of each stream.

        The client stream switches to a hold (bounded by send_buffer_bytes) as
        soon as no client frame is half forwarded; the upstream's stream stops
        as soon as no upstream frame is half forwarded to the client. Then the
        old connection gets a close (1001) and is closed, and the returned
        future is done. Frames the gateway must send upstream wait with the
        held ones. The session stays open; `attach_upstream` sends everything
        held, in order, to the next upstream.

        Frame boundaries, not message boundaries: a reattach policy that must
        not split a fragmented message waits for one (`c_msg == 0`) itself.
        """
        self._check_movable("detach")
        self.upstream.link_on(LinkEvent.DETACH)
        waiter = self.detach_waiter = self.node.loop.create_future()
        self.leaving = self.up
        self.held = _Hold(self, self.limits.send_buffer_bytes)
        self.c_switch = self.u_stop = True
        if not self.c_remaining:
            self._switch_client_stream()
        if not self.u_remaining and self.leaving is not None:
            self._stop_upstream_stream()
        return waiter

    def _check_movable(self, what: str) -> None:
        if self.state is not State.OPEN or self.sink is not None or self.upstream.close is not Close.OPEN \
                or self.client.close is not Close.OPEN or self.upstream.link is not Link.ATTACHED:
            raise InvalidTransition(f"{what} in state {self.state.name} (upstream {self.upstream.close.name} "
                                    f"{self.upstream.link.name}, client {self.client.close.name})")

    def _switch_client_stream(self) -> None:
        """At a client frame boundary: client frames go to the hold (or the next upstream) from here on."""
        self.c_switch = False
        if self.u_later:  # answers owed to the old upstream (pongs) go to it first
            data = self.u_later
            self.u_later = b""
            self.up.write(data)
        if self.move is not None:
            self._move_client_stream()
            return
        self.up = self.held
        self.u_fd = -1
        self._maybe_detached()

    def _stop_upstream_stream(self) -> None:
        """At an upstream frame boundary: nothing more of the old upstream reaches the client."""
        self.u_stop = False
        self.u_buf = b""  # an unfinished frame of which the client saw nothing
        self.u_need = 0
        # Its loss still fails the session until the client stream has switched too.
        self.leaving.set_protocol(Side(self, _ignore, self.upstream_lost, False))
        self._maybe_detached()

    def _maybe_detached(self) -> None:
        if self.c_switch or self.u_stop:
            return
        self.upstream.link_on(LinkEvent.AT_BOUNDARY)
        old = self.leaving
        self.leaving = None
        old.set_protocol(_RETIRED)
        old.write(frames.frame(OP_CLOSE, frames.close_payload(GOING_AWAY, "session moved"), mask=True))
        old.close()
        self._let_go_endpoint()
        self._client_unblocked()
        waiter = self.detach_waiter
        self.detach_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    def _let_go_endpoint(self) -> None:
        if self.endpoint is not None:
            self.endpoint.active -= 1
            self.endpoint = None

    def _client_unblocked(self) -> None:
        """The old upstream takes no more client frames: its full buffer no longer holds the client back."""
        if self.stall_timer is not None and not self.stall_client:
            self.stall_timer.cancel()
            self.stall_timer = None
        held = self.held
        if (held is None or not held.paused) and not self.client.gone:
            self.transport.resume_reading()

    def _drop_leaving(self) -> None:
        """The upstream was lost (or cut) while detaching, detached or moving: give the seam up."""
        old = self.leaving
        m = self.move
        self.move = None
        if old is not None:
            self.leaving = None
            old.set_protocol(_RETIRED)
            if m is not None and m.old_code is not None and m.old_code != 1006:
                if not m.switched:
                    old.write(_close_answer(m.old_code))
                old.close()   # it closed first: its close is answered, not cut
            else:
                old.abort()
        if m is not None:
            if m.timer is not None:
                m.timer.cancel()
            if m.to is not None:
                m.to.set_protocol(_RETIRED)
                m.to.abort()
            if not m.waiter.done():
                m.waiter.set_result(False)
        self.c_switch = self.u_stop = False
        held = self.held
        if held is not None:
            self.held = None
            held.cut = True
            if held.paused and not self.client.gone:
                self.transport.resume_reading()
        waiter = self.detach_waiter
        self.detach_waiter = None
        if waiter is not None and not waiter.done():
            waiter.set_exception(ConnectionError("upstream lost while detaching"))

    def attach_upstream(self, transport, leftover: bytes = b"", endpoint=None) -> None:
        """Make `transport` (a dialled, paused upstream, e.g. from BackendPool.dial_any)
        the session's upstream: what was held goes to it first, in order."""
        held = self.held
        if held is None or held.cut or self.upstream.gone or self.upstream.link is not Link.DETACHED:
            raise InvalidTransition(f"attach in link state {self.upstream.link.name} "
                                    f"(upstream {self.upstream.close.name})")
        self.held = None
        self._attach(transport, endpoint, bytes(held.buf), leftover)

    def _attach(self, transport, endpoint, first: bytes, leftover: bytes) -> None:
        """`transport` becomes the upstream: `first` is written to it, `leftover` is what it already sent."""
        self.upstream.link_on(LinkEvent.ATTACH)
        self.up = transport
        transport.set_protocol(Side(self, self.from_upstream, self.upstream_lost, False))
        transport.set_write_buffer_limits(high=self.limits.send_buffer_bytes)
        if endpoint is not None:
            self.endpoint = endpoint
            endpoint.active += 1
        self.u_seen = True
        if not self.client.gone and transport.get_write_buffer_size() <= self.limits.send_buffer_bytes:
            self.transport.resume_reading()  # before the flush, which may pause it again (stalled)
        if first:
            transport.write(first)
        self.u_fd = fileno(transport)
        if leftover:
            self.from_upstream(leftover)
        transport.resume_reading()


def _close_answer(code: int) -> bytes:
    # RFC 6455 5.5.1: the answer "typically echos the status code it received".
    return frames.frame(OP_CLOSE, frames.close_payload(code) if code != 1005 else b"", mask=True)
