"""Routing by content (select/actions) and weighted splits."""

from __future__ import annotations

import random
from collections import Counter

import pytest

from gateway import frames
from gateway.config import SplitEntry
from gateway.dispatch import ActionSink, WeightedSplit, compile_select, select_value


class Sink:
    def __init__(self, name):
        self.name = name
        self.got = []
        self.closed = 0

    def on_message(self, session, opcode, payload):
        self.got.append((opcode, payload))

    def on_close(self, session):
        self.closed += 1


class Client:
    def __init__(self):
        self.raw = []

    def send_raw(self, frame):
        self.raw.append(frame)
        return True


@pytest.mark.parametrize("payload,expected", [
    (b'{"action":"buy"}', "buy"),
    (b'  \n{"action": "buy", "x": [1,2,3]}', "buy"),
    (b'{"action":1}', None),
    (b'{"action":null}', None),
    (b'{"other":"buy"}', None),
    (b'["action"]', None),
    (b'"action"', None),
    (b'{"action":', None),
    (b'not json', None),
    (b'', None),
])
def test_select_value(payload, expected):
    assert select_value(payload, ("action",)) == expected


def test_select_nested_path():
    path = compile_select("$.meta.kind")
    assert path == ("meta", "kind")
    assert select_value(b'{"meta":{"kind":"k"}}', path) == "k"
    assert select_value(b'{"meta":"k"}', path) is None


def test_actions_route_by_field_and_fall_back_to_default():
    a, b, d = Sink("a"), Sink("b"), Sink("d")
    sink = ActionSink("r", "$.action", {"buy": a, "sell": b, "$default": d}, '{"error":"x"}')
    c = Client()
    sink.on_message(c, frames.OP_TEXT, b'{"action":"buy","n":1}')
    sink.on_message(c, frames.OP_TEXT, b'{"action":"sell"}')
    sink.on_message(c, frames.OP_TEXT, b'{"action":"hold"}')
    sink.on_message(c, frames.OP_TEXT, b'plain text')
    sink.on_message(c, frames.OP_BINARY, b'{"action":"buy"}')   # binary -> $default, not parsed
    assert a.got == [(frames.OP_TEXT, b'{"action":"buy","n":1}')]
    assert b.got == [(frames.OP_TEXT, b'{"action":"sell"}')]
    assert [p for _, p in d.got] == [b'{"action":"hold"}', b"plain text", b'{"action":"buy"}']
    assert c.raw == [] and sink.unrouted == 0


def test_no_default_answers_error_message_and_counts():
    a = Sink("a")
    sink = ActionSink("r", "$.action", {"buy": a}, '{"error":"no such action"}')
    c = Client()
    sink.on_message(c, frames.OP_TEXT, b'{"action":"nope"}')
    sink.on_message(c, frames.OP_BINARY, b'\x00')
    assert c.raw == [frames.frame(frames.OP_TEXT, b'{"error":"no such action"}')] * 2
    assert sink.unrouted == 2 and a.got == []


def test_on_close_reaches_each_distinct_sink_once():
    a, d = Sink("a"), Sink("d")
    sink = ActionSink("r", "$.action", {"x": a, "y": a, "$default": d}, "e")
    sink.on_close(object())
    assert (a.closed, d.closed) == (1, 1)


def test_weighted_split_follows_weights_and_skips_zero():
    split = WeightedSplit([SplitEntry(backend="main", weight=90), SplitEntry(backend="canary", weight=10),
                           SplitEntry(backend="parked", weight=0)], random.Random(7))
    counts = Counter(split.pick() for _ in range(10_000))
    assert set(counts) == {"main", "canary"}
    assert 800 < counts["canary"] < 1200


def test_weighted_split_single_and_all_zero():
    assert WeightedSplit([SplitEntry(backend="only", weight=3)]).pick() == "only"
    with pytest.raises(ValueError):
        WeightedSplit([SplitEntry(backend="a", weight=0)])
