"""gateway/logs.py: the JSON lines, written straight or through logging, are the same."""

from __future__ import annotations

import io
import json
import logging

import pytest

from gateway import logs


@pytest.fixture
def stream(monkeypatch):
    """setup()'s handler on a StringIO, the root logger as it was afterwards."""
    root = logging.getLogger()
    saved = root.handlers[:], root.level
    out = io.StringIO()
    monkeypatch.setattr(logs.sys, "stderr", out)
    logs.setup("info")
    yield out
    root.handlers[:], level = saved
    root.setLevel(level)
    monkeypatch.setattr(logs, "_handler", None)


def only_ours() -> None:
    """pytest adds its capture handlers to the root logger for each test phase: take them out
    for this test, so that setup()'s handler is the only one, as in a running gateway."""
    logging.getLogger().handlers[:] = [logs._handler]


def lines(out: io.StringIO) -> list[dict]:
    return [json.loads(line) for line in out.getvalue().splitlines()]


def test_event_line_has_ts_level_event_first_then_fields_and_logger(stream):
    only_ours()
    logs.event(logging.getLogger("gateway.node"), "connect", conn="c1", ip="127.0.0.1", endpoint=None)
    [line] = lines(stream)
    assert list(line) == ["ts", "level", "event", "conn", "ip", "endpoint", "logger"]
    assert line["level"] == "info" and line["event"] == "connect" and line["logger"] == "gateway.node"
    assert isinstance(line["ts"], float)


@pytest.mark.parametrize("fields", [
    {"conn": "c1", "code": 1000, "reason": "", "duration_s": 0.25, "by": None},
    {"reason": "café ☕"},                       # non-ASCII: escaped, as json.dumps does
    {"big": 2 ** 70, "problems": ["a", "b"]},    # beyond orjson's ints: the json fallback
    {"obj": object.__new__(logging.Filter)},     # unknown types: str()
])
def test_straight_line_is_the_line_logging_writes(stream, fields):
    only_ours()
    log = logging.getLogger("gateway.test")
    logs.event(log, "close", logging.WARNING, **fields)
    assert logs._only_ours(log, logging.WARNING) is not None   # the straight path was taken
    straight = stream.getvalue()
    stream.truncate(0)
    stream.seek(0)
    log.warning("close", extra={"fields": dict(fields, event="close")})
    through = stream.getvalue()
    assert straight.isascii()
    drop_ts = [{k: v for k, v in json.loads(x).items() if k != "ts"} for x in (straight, through)]
    assert drop_ts[0] == drop_ts[1]
    assert straight.split(',"level"', 1)[1] == through.split(',"level"', 1)[1]


def test_another_handler_still_gets_the_record(stream):
    got: list[logging.LogRecord] = []

    class Capture(logging.Handler):
        def emit(self, record):
            got.append(record)

    only_ours()
    log = logging.getLogger("gateway.node")
    extra = Capture()
    log.addHandler(extra)
    try:
        logs.event(log, "connect", conn="c2")
    finally:
        log.removeHandler(extra)
    assert [r.fields["conn"] for r in got] == ["c2"]
    assert [line["conn"] for line in lines(stream)] == ["c2"]   # and the line is still written


def test_below_the_level_nothing_is_written(stream):
    only_ours()
    logs.event(logging.getLogger("gateway.node"), "chatty", logging.DEBUG, conn="c3")
    assert stream.getvalue() == ""
