"""Traced sessions: what a session runs while a debug trace (gateway/trace.py)
is on. `start` swaps the class in and `stop` swaps it back,
so a session that is not traced never pays for it."""

from __future__ import annotations

from . import frames
from .frames import OP_CLOSE
from .relay import Session
from .reliable_session import ReliableSession

__all__ = ["TracedReliableSession", "TracedSession", "plain_class", "start", "stop"]


def plain_class(s: Session) -> type[Session]:
    """The class a traced session runs the relay of (and goes back to when the trace ends)."""
    return Session if s.rel is None else ReliableSession


def start(s: Session, trace) -> None:
    """Start copying `s`'s frames to `trace` (a trace.Trace), until its bounds or
    the session's end.

    Nothing on the per-message path asks whether a trace runs: the session's
    class becomes TracedSession, whose relay methods feed the trace and then
    run the plain ones, and each socket's Side is bound to them again (uvloop
    caches data_received at set_protocol). Every later `s.from_upstream` (an
    upstream attached or moved to) finds the traced one by itself. `stop`
    swaps the plain ones back.
    """
    s.trace = trace
    s.__class__ = TracedSession if s.rel is None else TracedReliableSession
    s._rebind_sides()
    trace.timer = s.node.loop.call_later(trace.max_s, stop, s, "max_s")


def stop(s: Session, why: str) -> None:
    trace = s.trace
    if trace is None:
        return
    s.trace = None
    trace.end(why)
    trace.flush()
    if trace.timer is not None:
        trace.timer.cancel()
        trace.timer = None
    s.__class__ = plain_class(s)
    s._rebind_sides()


class TracedSession(Session):
    """A session with a debug trace running (`start`): the same relay,
    with every read and every frame the gateway sends itself copied to the
    trace first. Only traced sessions pay for it; the trace's own parser
    (trace.Tap) reads the bytes, the relay's code is unchanged."""

    __slots__ = ()

    def _traced(self) -> None:
        trace = self.trace
        if trace is not None and trace.ended is not None:
            stop(self, trace.ended)

    def from_client_relay(self, data: bytes) -> None:
        self.trace.up.feed(data)
        self._traced()
        plain_class(self).from_client_relay(self, data)

    def from_client_messages(self, data: bytes) -> None:
        self.trace.up.feed(data)
        self._traced()
        plain_class(self).from_client_messages(self, data)

    def from_upstream(self, data: bytes) -> None:
        tap = self.trace.down
        if not self.u_remaining and not self.u_buf:
            # The relay is at a frame boundary: so is the tap (a switch to another
            # upstream drops an unfinished frame of the old one).
            tap.reset()
        tap.feed(data)
        self._traced()
        plain_class(self).from_upstream(self, data)

    def _send_client(self, data: bytes) -> None:
        if not self.client.sent:
            self.trace.own_down.feed(data)
            self._traced()
        plain_class(self)._send_client(self, data)

    def _send_upstream(self, data: bytes) -> None:
        if not self.upstream.sent:
            self.trace.own_up.feed(data)
            self._traced()
        plain_class(self)._send_upstream(self, data)

    def gateway_close(self, code: int, reason: str, *, at_once: bool = False) -> None:
        sent, mid_frame = self.client.sent, self.u_remaining
        plain_class(self).gateway_close(self, code, reason, at_once=at_once)
        if not sent and not mid_frame and self.client.sent and self.trace is not None:
            # closing.py wrote the close frame to the client's transport itself
            self.trace.own_down.feed(frames.frame(OP_CLOSE, frames.close_payload(code, reason)))
            self._traced()

    def _send_upstream_close(self, code: int, reason: str) -> None:
        sent, mid_frame = self.upstream.sent, self.c_remaining
        plain_class(self)._send_upstream_close(self, code, reason)
        if not sent and not mid_frame and self.trace is not None:
            self.trace.own_up.feed(frames.frame(OP_CLOSE, frames.close_payload(code, reason)))
            self._traced()

    def _finish(self) -> None:
        plain_class(self)._finish(self)
        stop(self, "closed")


class TracedReliableSession(TracedSession, ReliableSession):
    """A reliable session with a debug trace running: TracedSession's copies, ReliableSession's relay."""

    __slots__ = ()
