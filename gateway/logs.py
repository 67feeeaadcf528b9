"""JSON lines on stderr: one object per event.

Call sites pass structured fields as `extra={"fields": {...}}`, or call
`event()`; the formatter puts `ts`, `level`, `event` first and never prints
a traceback to anything but the log itself.

`event()` is on every session's path (the connect and close lines), so when
the line would only reach the handler `setup()` installed, it is written
straight to that handler's stream, without the LogRecord, the handler chain
and the caller lookup the logging module spends ~10 us a line on (measured in
BENCHMARKS.md, "CPU per new session"). Anything else listening (another
handler, a filter, pytest's capture) gets the record through `logging` as
before. Both ways write the same line.
"""

from __future__ import annotations

import json
import logging
import sys
import time

import orjson

# orjson writes what json.dumps(default=str) would, except for these (sent to
# `default` instead) and non-ASCII text and out-of-range ints (the json
# fallback below): the bytes stay what they always were.
_ORJSON_OPTS = orjson.OPT_PASSTHROUGH_DATACLASS | orjson.OPT_PASSTHROUGH_DATETIME
_LEVELS = {logging.DEBUG: "debug", logging.INFO: "info", logging.WARNING: "warning", logging.ERROR: "error",
           logging.CRITICAL: "critical"}


def dumps(obj: dict) -> str:
    """One compact JSON object, ASCII only (non-ASCII escaped, as json.dumps does)."""
    try:
        line = orjson.dumps(obj, default=str, option=_ORJSON_OPTS).decode()
        if line.isascii():
            return line
    except TypeError:   # orjson.JSONEncodeError: an int beyond 64 bits, a non-str key
        pass
    return json.dumps(obj, default=str, separators=(",", ":"))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": round(record.created, 3), "level": record.levelname.lower()}
        fields = getattr(record, "fields", None) or {}
        out["event"] = fields.get("event") or record.getMessage()
        out.update(fields)
        if record.name and record.name != "root":
            out["logger"] = record.name
        if fields.get("event") and record.getMessage() != fields["event"]:
            out.setdefault("msg", record.getMessage())
        if record.exc_info:
            out["error"] = self.formatException(record.exc_info)
        return dumps(out)


_handler: logging.StreamHandler | None = None   # the one setup() installed


def setup(level: str = "info") -> None:
    global _handler
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is per request on the admin port: keep it quiet.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    _handler = handler


def _only_ours(logger: logging.Logger, level: int) -> logging.StreamHandler | None:
    """setup()'s handler, if a record from `logger` at `level` would reach it and nothing else."""
    h = _handler
    if h is None or logger.filters or logger.disabled or h.filters or level < h.level:
        return None
    c = logger
    while not c.handlers:
        if not c.propagate or c.parent is None:
            return None
        c = c.parent
    handlers = c.handlers
    if len(handlers) == 1 and handlers[0] is h and (c.parent is None or not c.propagate):
        return h
    return None


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields) -> None:
    if not logger.isEnabledFor(level):
        return
    fields["event"] = name
    h = _only_ours(logger, level)
    if h is None:
        logger.log(level, name, extra={"fields": fields})
        return
    # What JsonFormatter makes of the record logger.log would build: ts,
    # level, event first, then the fields, then the logger's name.
    out = {"ts": round(time.time(), 3), "level": _LEVELS.get(level) or logging.getLevelName(level).lower(),
           "event": name}
    out.update(fields)
    if logger.name != "root":
        out["logger"] = logger.name
    line = dumps(out) + "\n"
    with h.lock:
        try:
            h.stream.write(line)
            h.stream.flush()
        except Exception:   # as StreamHandler.emit: a broken stderr must not break a session
            h.handleError(logging.makeLogRecord({"msg": line, "levelno": level}))


def now() -> float:
    return time.time()
