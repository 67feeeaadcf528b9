"""Where a session's messages go: weighted splits (per session) and routing by
content (per message).

`WeightedSplit` picks one backend per new session; the session keeps it for
its whole life (canaries, gradual rollouts). `ActionSink` is a message sink
over other sinks: it reads one field of a JSON text message (`select: $.action`)
and hands the message, unchanged, to the sink its value names. Binary
messages, text that is not a JSON object, a missing field, a value that is
not a string or names no action all go to `$default`; with no `$default` the
client gets the route's `error_message` and the miss is counted.

Only routes with `select` parse JSON, with orjson, and only the selected
field is looked at.
"""

from __future__ import annotations

import bisect
import random

import orjson
from prometheus_client import Counter

from . import frames
from .frames import OP_TEXT

DEFAULT_ACTION = "$default"

unrouted_total = Counter("gateway_unrouted_messages_total",
                         "Messages whose action named no backend and that had no $default", ["route"])


class WeightedSplit:
    """`split: [{backend, weight}]`: one pick per new session, in proportion to weight."""

    __slots__ = ("names", "cumulative", "total", "_random")

    def __init__(self, entries, rng: random.Random | None = None):
        self.names: list[str] = []
        self.cumulative: list[int] = []
        total = 0
        for entry in entries:
            if entry.weight <= 0:
                continue  # weight 0: configured but never picked (a parked canary)
            total += entry.weight
            self.names.append(entry.backend)
            self.cumulative.append(total)
        if not total:
            raise ValueError("split weights add up to 0")
        self.total = total
        self._random = (rng or random.Random()).random

    def pick(self) -> str:
        if len(self.names) == 1:
            return self.names[0]
        return self.names[bisect.bisect_right(self.cumulative, self._random() * self.total)]


def compile_select(select: str) -> tuple[str, ...]:
    """'$.a.b' -> ('a', 'b')."""
    if not select.startswith("$.") or len(select) < 3:
        raise ValueError(f"select {select!r}: expected a dotted path like $.action")
    return tuple(select[2:].split("."))


def select_value(payload: bytes, path: tuple[str, ...]) -> str | None:
    """The string at `path` in a JSON object, or None (not JSON, not an object,
    missing, or not a string)."""
    # Cheap refusal before parsing: an object starts with '{' (after blanks).
    stripped = payload.lstrip(b" \t\r\n")
    if not stripped.startswith(b"{"):
        return None
    try:
        doc = orjson.loads(payload)
    except orjson.JSONDecodeError:
        return None
    for key in path:
        if type(doc) is not dict:
            return None
        doc = doc.get(key)
        if doc is None:
            return None
    return doc if type(doc) is str else None


class ActionSink:
    """A message sink that routes each message by a field of its content."""

    __slots__ = ("name", "route", "path", "actions", "default", "sinks", "error_frame", "error_payload",
                 "unrouted", "_unrouted_metric")

    def __init__(self, route: str, select: str, actions: dict[str, object], error_message: str):
        self.name = f"select {select}"
        self.route = route
        self.path = compile_select(select)
        self.default = actions.get(DEFAULT_ACTION)
        self.actions = {k: v for k, v in actions.items() if k != DEFAULT_ACTION}
        # Each distinct sink once, for on_close.
        self.sinks = tuple({id(s): s for s in actions.values()}.values())
        self.error_payload = error_message.encode("utf-8")
        self.error_frame = frames.frame(OP_TEXT, self.error_payload)
        self.unrouted = 0
        self._unrouted_metric = unrouted_total.labels(route)

    def target(self, opcode: int, payload: bytes):
        if opcode == OP_TEXT:
            value = select_value(payload, self.path)
            if value is not None:
                sink = self.actions.get(value)
                if sink is not None:
                    return sink
        return self.default

    def on_message(self, session, opcode: int, payload: bytes) -> None:
        sink = self.target(opcode, payload)
        if sink is None:
            self.unrouted += 1
            self._unrouted_metric.inc()
            session.send_raw(self.error_frame)
            return
        sink.on_message(session, opcode, payload)

    def on_close(self, session) -> None:
        for sink in self.sinks:
            sink.on_close(session)


class RoutePlan:
    """What a route does with a new session, compiled once per config.

    `pick()` names the backend for a new session (`backend`, or a weighted
    pick from `split`), or returns None when messages are routed by content
    (`actions`, an ActionSink). `connect`/`disconnect` are the event backends.
    """

    __slots__ = ("name", "backend", "split", "actions", "connect", "disconnect")

    def __init__(self, route, sinks: dict[str, object], rng: random.Random | None = None):
        self.name = route.name
        self.backend = route.backend
        self.split = WeightedSplit(route.split, rng) if route.split else None
        self.actions = None
        if route.select:
            self.actions = ActionSink(route.name, route.select, {k: sinks[v] for k, v in route.actions},
                                      route.error_message)
        events = dict(route.events)
        self.connect = sinks[events["connect"]] if "connect" in events else None
        self.disconnect = sinks[events["disconnect"]] if "disconnect" in events else None

    def pick(self) -> str | None:
        if self.split is not None:
            return self.split.pick()
        return self.backend
