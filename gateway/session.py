"""A session's life, as data.

Everything that moves a session from one state to another is listed in
TRANSITIONS; `advance` is the only way to change state, so an impossible
move (data after close, a second close) fails loudly instead of half-working.
It runs on lifecycle events only, never per message.
"""

from __future__ import annotations

import enum


class State(enum.IntEnum):
    HANDSHAKE = 0   # reading the client's HTTP request
    CONNECTING = 1  # authorising, dialling the upstream
    OPEN = 2        # relaying frames both ways
    CLOSING = 3     # a close frame went one way; waiting for the rest
    CLOSED = 4      # both sockets gone; counted and logged
    REFUSED = 5     # answered with an HTTP error; waiting for the socket to go


class Event(enum.Enum):
    REQUEST = "request"            # the request head is complete
    REFUSED = "refused"            # answered with an HTTP error
    UPGRADED = "upgraded"          # 101 sent, relay running
    CLOSE_STARTED = "close_started"  # any side (client, upstream, gateway) started closing
    LOST = "lost"                  # the last socket is gone


TRANSITIONS: dict[State, dict[Event, State]] = {
    State.HANDSHAKE: {Event.REQUEST: State.CONNECTING, Event.REFUSED: State.REFUSED, Event.LOST: State.CLOSED},
    State.CONNECTING: {Event.UPGRADED: State.OPEN, Event.REFUSED: State.REFUSED, Event.LOST: State.CLOSED},
    State.REFUSED: {Event.LOST: State.CLOSED},
    State.OPEN: {Event.CLOSE_STARTED: State.CLOSING, Event.LOST: State.CLOSED},
    State.CLOSING: {Event.CLOSE_STARTED: State.CLOSING, Event.LOST: State.CLOSED},
    State.CLOSED: {Event.LOST: State.CLOSED},
}


class InvalidTransition(RuntimeError):
    pass


def advance(state: State, event: Event) -> State:
    try:
        return TRANSITIONS[state][event]
    except KeyError:
        raise InvalidTransition(f"{event.value} in state {state.name}") from None
