"""A session's life, as data.

Everything that moves a session, or one of its two sides, from one state to
another lives in this file, written as tables (state -> event -> next state,
as h11's _state.py does). `advance` is the only way to move, so an impossible
move (data after close, a second close) raises InvalidTransition instead of
half-working. The relay asks these tables; it keeps no close flags of its own.
Nothing here runs per message and nothing here does I/O.

A session is not a connection. It has an id of its own (`session_id`) and
two sides, the client and the upstream; each side has a close handshake
(`Close`) and a connection that can be swapped under it at a frame boundary
(`Link`): the upstream for reattach, the client for resume.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass

from .errors import InvalidTransition

__all__ = [
    "CLOSE_TRANSITIONS", "Close", "CloseEvent", "Event", "InvalidTransition", "LINK_TRANSITIONS", "Link",
    "LinkEvent", "LiveLimits", "SideState", "State", "TRANSITIONS", "advance", "advance_close",
    "advance_link",
]


# ------------------------------------------------------------------ the session
class State(enum.IntEnum):
    HANDSHAKE = 0   # reading the client's HTTP request
    CONNECTING = 1  # authorising, dialling the upstream
    OPEN = 2        # relaying frames both ways
    CLOSING = 3     # a close went one way (client, upstream or gateway); waiting for the rest
    CLOSED = 4      # every socket gone; counted and logged
    REFUSED = 5     # answered with an HTTP error; waiting for the socket to go
    DRAINING = 6    # the node drains: the client is closed (1012), the upstream kept until it closes,
                    # what was meant for the client buffered for the resume (replay.py); or a reliable
                    # client dropped without a close: the same, with the upstream closed at once
    DETACHED = 7    # no client connection; the session waits for one to resume it, upstream kept


class Event(enum.Enum):
    REQUEST = "request"                  # the request head is complete
    REFUSED = "refused"                  # answered with an HTTP error
    UPGRADED = "upgraded"                # 101 sent, relay running
    CLOSE_STARTED = "close_started"      # a side (client, upstream, gateway) started closing
    DRAIN = "drain"                      # the node began draining this session
    DROPPED = "dropped"                  # a reliable client's connection went without a close: kept as drained
    CLIENT_DETACHED = "client_detached"  # the client's connection ended; the session stays
    RESUMED = "resumed"                  # a new client connection took the session over
    LOST = "lost"                        # the last socket is gone (or the session was given up)


TRANSITIONS: dict[State, dict[Event, State]] = {
    State.HANDSHAKE: {Event.REQUEST: State.CONNECTING, Event.REFUSED: State.REFUSED, Event.LOST: State.CLOSED},
    State.CONNECTING: {Event.UPGRADED: State.OPEN, Event.REFUSED: State.REFUSED, Event.LOST: State.CLOSED},
    State.REFUSED: {Event.LOST: State.CLOSED},
    State.OPEN: {Event.CLOSE_STARTED: State.CLOSING, Event.DRAIN: State.DRAINING, Event.DROPPED: State.DRAINING,
                 Event.CLIENT_DETACHED: State.DETACHED, Event.LOST: State.CLOSED},
    # The drain's close to the client is a close that keeps the session: still draining.
    State.DRAINING: {Event.CLIENT_DETACHED: State.DETACHED, Event.CLOSE_STARTED: State.DRAINING,
                     Event.LOST: State.CLOSED},
    State.DETACHED: {Event.RESUMED: State.OPEN, Event.CLOSE_STARTED: State.CLOSING, Event.LOST: State.CLOSED},
    State.CLOSING: {Event.LOST: State.CLOSED},
    State.CLOSED: {},
}


def advance(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise InvalidTransition(f"{event.value} in state {state.name}") from None


# ------------------------------------------------------- a side's close handshake
class Close(enum.IntEnum):
    OPEN = 0            # frames flow both ways
    CLOSE_SENT = 1      # our close frame went to this peer; its frames may still come
    CLOSE_RECEIVED = 2  # this peer's close frame came (or we stopped reading it); we may still send
    CLOSED = 3          # nothing more either way; only the socket is left to close
    GONE = 4            # the socket is gone, or there never was one


class CloseEvent(enum.Enum):
    CLOSE_SENT = "close_sent"          # a close frame went to the peer (or was queued behind a frame)
    CLOSE_RECEIVED = "close_received"  # the peer's close frame came, or the peer was failed (RFC 6455 7.1.7)
    ABORTED = "aborted"                # cut short: no further frame either way (close timeout, mid-frame)
    LOST = "lost"                      # the socket went


CLOSE_TRANSITIONS: dict[Close, dict[CloseEvent, Close]] = {
    Close.OPEN: {CloseEvent.CLOSE_SENT: Close.CLOSE_SENT, CloseEvent.CLOSE_RECEIVED: Close.CLOSE_RECEIVED,
                 CloseEvent.ABORTED: Close.CLOSED, CloseEvent.LOST: Close.GONE},
    Close.CLOSE_SENT: {CloseEvent.CLOSE_RECEIVED: Close.CLOSED, CloseEvent.ABORTED: Close.CLOSED,
                       CloseEvent.LOST: Close.GONE},
    Close.CLOSE_RECEIVED: {CloseEvent.CLOSE_SENT: Close.CLOSED, CloseEvent.ABORTED: Close.CLOSED,
                           CloseEvent.LOST: Close.GONE},
    Close.CLOSED: {CloseEvent.ABORTED: Close.CLOSED, CloseEvent.LOST: Close.GONE},
    Close.GONE: {},
}

# A close frame went to the peer, whose socket is still there.
_SENT_CLOSE = frozenset({Close.CLOSE_SENT, Close.CLOSED})
# Nothing more may be sent to / will be read from a side in these states.
_SENT = frozenset({Close.CLOSE_SENT, Close.CLOSED, Close.GONE})
_RECEIVED = frozenset({Close.CLOSE_RECEIVED, Close.CLOSED, Close.GONE})


def advance_close(state: Close, event: CloseEvent) -> Close:
    try:
        return CLOSE_TRANSITIONS[state][event]
    except KeyError:
        raise InvalidTransition(f"{event.value} in close state {state.name}") from None


# ---------------------------------------------------- a side's connection (seam)
class Link(enum.IntEnum):
    ATTACHED = 0   # the side's frames go to and come from its connection
    DETACHING = 1  # asked to let go; waiting for both streams to reach a frame boundary
    DETACHED = 2   # no connection: frames for this side are held until one is attached


class LinkEvent(enum.Enum):
    DETACH = "detach"            # let go of the connection at the next frame boundaries
    AT_BOUNDARY = "at_boundary"  # both streams are at a frame boundary: the connection is let go
    ATTACH = "attach"            # a new connection takes over; what was held is sent first


LINK_TRANSITIONS: dict[Link, dict[LinkEvent, Link]] = {
    Link.ATTACHED: {LinkEvent.DETACH: Link.DETACHING},
    Link.DETACHING: {LinkEvent.AT_BOUNDARY: Link.DETACHED},
    Link.DETACHED: {LinkEvent.ATTACH: Link.ATTACHED},
}


def advance_link(state: Link, event: LinkEvent) -> Link:
    try:
        return LINK_TRANSITIONS[state][event]
    except KeyError:
        raise InvalidTransition(f"{event.value} in link state {state.name}") from None


class SideState:
    """One side of a session (client or upstream): its close handshake and its link.

    The flags are plain attributes kept in step with `close`, because the
    relay reads them on every read (a slot load, not a property call):

    - `sent`: nothing more may be written to this peer (its close went, or it is gone);
    - `sent_close`: a close frame went to this peer and its socket is still there;
    - `received`: nothing more will be read from it (its close came, it was failed, or it is gone);
    - `gone`: the socket is gone.

    Only `on` and `link_on` change anything.
    """

    __slots__ = ("name", "close", "link", "sent", "sent_close", "received", "gone")

    def __init__(self, name: str, close: Close = Close.OPEN):
        self.name = name
        self.link = Link.ATTACHED
        self._set(close)

    def _set(self, close: Close) -> None:
        self.close = close
        self.sent = close in _SENT
        self.sent_close = close in _SENT_CLOSE
        self.received = close in _RECEIVED
        self.gone = close is Close.GONE

    def on(self, event: CloseEvent) -> Close:
        try:
            self._set(advance_close(self.close, event))
        except InvalidTransition as exc:
            raise InvalidTransition(f"{self.name} side: {exc}") from None
        return self.close

    def link_on(self, event: LinkEvent) -> Link:
        try:
            self.link = advance_link(self.link, event)
        except InvalidTransition as exc:
            raise InvalidTransition(f"{self.name} side: {exc}") from None
        return self.link

    def __repr__(self) -> str:
        return f"<SideState {self.name} {self.close.name} {self.link.name}>"


# ------------------------------------------------ limits a live session holds
@dataclass(frozen=True, slots=True)
class LiveLimits:
    """What a live session needs from `limits`, fixed when it goes live.

    Built once per config; a session keeps the one it started with, so a
    reload never changes a live session's limits halfway.
    """

    max_message_bytes: int
    messages_per_second: float
    burst: int
    rate_limit_close_after_s: float
    send_buffer_bytes: int
    stall_timeout_s: float
    close_timeout_s: float
    max_lifetime_s: float
    # One timer per session ticks every tick_s: counters, keepalive, idle.
    # Idle closes land between idle_timeout_s and idle_timeout_s + tick_s.
    tick_s: float
    idle_ticks: int
    ping_ticks: int

    @classmethod
    def of(cls, limits) -> "LiveLimits":
        """From config.Limits."""
        candidates = [v for v in (limits.ping_interval_s, limits.idle_timeout_s / 4) if v > 0] or [30.0]
        tick_s = max(0.05, min(candidates))
        return cls(
            max_message_bytes=limits.max_message_bytes,
            messages_per_second=limits.messages_per_second,
            burst=max(1, limits.burst),
            rate_limit_close_after_s=limits.rate_limit_close_after_s,
            send_buffer_bytes=limits.send_buffer_bytes,
            stall_timeout_s=limits.stall_timeout_s,
            close_timeout_s=limits.close_timeout_s,
            max_lifetime_s=limits.max_lifetime_s,
            tick_s=tick_s,
            idle_ticks=max(1, round(limits.idle_timeout_s / tick_s)) if limits.idle_timeout_s else 1 << 62,
            ping_ticks=max(1, round(limits.ping_interval_s / tick_s)) if limits.ping_interval_s else 0,
        )
