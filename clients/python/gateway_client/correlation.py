"""Request/reply over one WebSocket: ids, and which message is whose reply.

A request is a JSON object with a correlation field (default "id") the
client fills in; its reply is the first JSON object message whose field has
the same value. Ids are unique per client: a random prefix (another client
of the same user cannot collide) and a counter.
"""

from __future__ import annotations

import itertools
import json
import secrets
from collections.abc import Collection


class RequestIds:
    __slots__ = ("_prefix", "_count")

    def __init__(self, prefix: str | None = None):
        self._prefix = prefix if prefix is not None else secrets.token_hex(4)
        self._count = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}-{next(self._count)}"


def reply_id(message: str | bytes, field: str, pending: Collection[str]) -> str | None:
    """The id of the pending request `message` answers, or None (an ordinary message)."""
    if not pending or not isinstance(message, str) or not message.lstrip().startswith("{"):
        return None
    try:
        doc = json.loads(message)
    except ValueError:
        return None
    if not isinstance(doc, dict):
        return None
    value = doc.get(field)
    return value if isinstance(value, str) and value in pending else None
