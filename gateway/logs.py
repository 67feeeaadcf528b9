"""JSON lines on stderr: one object per event.

Call sites pass structured fields as `extra={"fields": {...}}`; the
formatter puts `ts`, `level`, `event` first and never prints a traceback
to anything but the log itself.
"""

from __future__ import annotations

import json
import logging
import sys
import time


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
        return json.dumps(out, default=str, separators=(",", ":"))


def setup(level: str = "info") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    # aiohttp's access log is per request on the admin port: keep it quiet.
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def event(logger: logging.Logger, name: str, level: int = logging.INFO, **fields) -> None:
    if logger.isEnabledFor(level):
        fields["event"] = name
        logger.log(level, name, extra={"fields": fields})


def now() -> float:
    return time.time()
