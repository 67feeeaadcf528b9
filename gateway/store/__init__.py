"""The session store: `Store` is the interface, `MemoryStore` the in-process
default, `RedisStore` the shared one (imported on first use, so a node without
`redis:` never loads redis-py)."""

from __future__ import annotations

from typing import TYPE_CHECKING

from .base import BusHandler, Delete, HistoryEntry, HistoryPage, Join, Leave, Op, Put, Store
from .memory import MemoryStore

if TYPE_CHECKING:
    from .redis import RedisStore

__all__ = ["BusHandler", "Delete", "HistoryEntry", "HistoryPage", "Join", "Leave", "MemoryStore", "Op", "Put",
           "RedisStore", "Store"]


def __getattr__(name: str):
    if name == "RedisStore":
        from .redis import RedisStore
        return RedisStore
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
