"""A client connection's life, as data (the one place that says where it may go).

    connecting    the first attempts: no connection has been open yet
    open          a WebSocket is open; sends go out at once
    reconnecting  a connection that was open ended; the next attempt is planned
    closed        no connection and none planned: closed by the caller, or a
                  refusal that retrying cannot fix (see policy.py)

`connect()` on a closed client starts again from connecting.
"""

from __future__ import annotations

import enum


class State(str, enum.Enum):
    CONNECTING = "connecting"
    OPEN = "open"
    RECONNECTING = "reconnecting"
    CLOSED = "closed"

    def __str__(self) -> str:
        return self.value


TRANSITIONS: dict[State, frozenset[State]] = {
    State.CLOSED: frozenset({State.CONNECTING}),
    State.CONNECTING: frozenset({State.OPEN, State.CLOSED}),
    State.OPEN: frozenset({State.RECONNECTING, State.CLOSED}),
    State.RECONNECTING: frozenset({State.OPEN, State.CLOSED}),
}


class InvalidTransition(RuntimeError):
    """A move the table above has no way for: a bug in the client, never the peer's doing."""


def advance(old: State, new: State) -> State:
    if new not in TRANSITIONS[old]:
        raise InvalidTransition(f"no transition from {old} to {new}")
    return new
