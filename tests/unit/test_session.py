"""The session state tables (gateway/session.py): every legal move, and every illegal one raises."""

from __future__ import annotations

import pytest

from gateway import config
from gateway.errors import GatewayError, InvalidTransition
from gateway.session import (CLOSE_TRANSITIONS, LINK_TRANSITIONS, TRANSITIONS, Close, CloseEvent, Event, Link,
                             LinkEvent, LiveLimits, SideState, State, advance, advance_close, advance_link)

TABLES = [
    ("session", TRANSITIONS, State, Event, advance),
    ("close", CLOSE_TRANSITIONS, Close, CloseEvent, advance_close),
    ("link", LINK_TRANSITIONS, Link, LinkEvent, advance_link),
]


def _legal():
    for name, table, _, _, fn in TABLES:
        for state, moves in table.items():
            for event, target in moves.items():
                yield pytest.param(fn, state, event, target, id=f"{name}:{state.name}-{event.value}")


def _illegal():
    for name, table, states, events, fn in TABLES:
        for state in states:
            for event in events:
                if event not in table[state]:
                    yield pytest.param(fn, state, event, id=f"{name}:{state.name}-{event.value}")


@pytest.mark.parametrize("name,table,states,events,fn", TABLES, ids=[t[0] for t in TABLES])
def test_every_state_has_a_row(name, table, states, events, fn):
    assert set(table) == set(states)


@pytest.mark.parametrize("fn,state,event,target", list(_legal()))
def test_legal_transition(fn, state, event, target):
    assert fn(state, event) is target


@pytest.mark.parametrize("fn,state,event", list(_illegal()))
def test_illegal_transition_raises(fn, state, event):
    with pytest.raises(InvalidTransition) as info:
        fn(state, event)
    assert event.value in str(info.value) and state.name in str(info.value)


def test_invalid_transition_is_a_gateway_error():
    assert issubclass(InvalidTransition, GatewayError)


def test_closed_and_gone_are_final():
    assert TRANSITIONS[State.CLOSED] == {}
    assert CLOSE_TRANSITIONS[Close.GONE] == {}


def test_every_live_state_can_be_lost():
    for state, moves in TRANSITIONS.items():
        if state is not State.CLOSED:
            assert moves[Event.LOST] is State.CLOSED
    for state, moves in CLOSE_TRANSITIONS.items():
        if state is not Close.GONE:
            assert moves[CloseEvent.LOST] is Close.GONE


def test_drain_detach_resume_path():
    s = State.CONNECTING
    for event, want in [(Event.UPGRADED, State.OPEN), (Event.DRAIN, State.DRAINING),
                        (Event.CLIENT_DETACHED, State.DETACHED), (Event.RESUMED, State.OPEN),
                        (Event.CLOSE_STARTED, State.CLOSING), (Event.LOST, State.CLOSED)]:
        s = advance(s, event)
        assert s is want


# ------------------------------------------------------------------ SideState
def test_side_state_flags_follow_the_close_state():
    side = SideState("client")
    assert (side.sent, side.received, side.gone) == (False, False, False)
    side.on(CloseEvent.CLOSE_SENT)
    assert (side.close, side.sent, side.sent_close, side.received) == (Close.CLOSE_SENT, True, True, False)
    side.on(CloseEvent.CLOSE_RECEIVED)
    assert (side.close, side.sent, side.received, side.gone) == (Close.CLOSED, True, True, False)
    side.on(CloseEvent.LOST)
    assert (side.close, side.sent, side.received, side.gone) == (Close.GONE, True, True, True)
    assert not side.sent_close  # nothing to wait for from a socket that is gone


def test_side_state_received_first():
    side = SideState("upstream")
    side.on(CloseEvent.CLOSE_RECEIVED)
    assert (side.sent, side.received) == (False, True)
    side.on(CloseEvent.CLOSE_SENT)
    assert side.close is Close.CLOSED


def test_a_side_without_a_socket_starts_gone():
    side = SideState("upstream", Close.GONE)
    assert side.sent and side.received and side.gone


def test_side_state_names_the_side_in_errors():
    side = SideState("upstream")
    side.on(CloseEvent.CLOSE_SENT)
    with pytest.raises(InvalidTransition, match="upstream side: close_sent in close state CLOSE_SENT"):
        side.on(CloseEvent.CLOSE_SENT)
    assert side.close is Close.CLOSE_SENT  # unchanged by the refused move


def test_side_state_link_round_trip():
    side = SideState("upstream")
    assert side.link is Link.ATTACHED
    side.link_on(LinkEvent.DETACH)
    side.link_on(LinkEvent.AT_BOUNDARY)
    assert side.link is Link.DETACHED
    with pytest.raises(InvalidTransition, match="upstream side: detach in link state DETACHED"):
        side.link_on(LinkEvent.DETACH)
    side.link_on(LinkEvent.ATTACH)
    assert side.link is Link.ATTACHED
    assert side.close is Close.OPEN  # the close handshake belongs to the side, not to its connection


# ------------------------------------------------------------------ LiveLimits
def test_live_limits_from_config():
    lim = config.Limits(max_message_bytes=1000, ping_interval_s=20, idle_timeout_s=600, burst=0)
    live = LiveLimits.of(lim)
    assert live.max_message_bytes == 1000
    assert live.tick_s == 20 and live.ping_ticks == 1 and live.idle_ticks == 30
    assert live.burst == 1


def test_live_limits_without_idle_or_ping():
    live = LiveLimits.of(config.Limits(ping_interval_s=0, idle_timeout_s=0))
    assert live.tick_s == 30.0 and live.ping_ticks == 0 and live.idle_ticks == 1 << 62


def test_live_limits_are_frozen():
    live = LiveLimits.of(config.Limits())
    with pytest.raises(AttributeError):
        live.max_message_bytes = 1  # type: ignore[misc]
