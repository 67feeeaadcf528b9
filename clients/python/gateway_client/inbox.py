"""Received messages waiting for `async for`: bounded, and it can end.

When it is full, `put` waits: the client stops reading its socket, and TCP
pushes back on the gateway (which bounds what it holds per session) instead
of the client's memory growing.
"""

from __future__ import annotations

import asyncio
from collections import deque
from typing import Generic, TypeVar

T = TypeVar("T")


class Inbox(Generic[T]):
    __slots__ = ("max_items", "_items", "_ended", "_readable", "_room")

    def __init__(self, max_items: int):
        self.max_items = max_items
        self._items: deque[T] = deque()
        self._ended = False
        self._readable = asyncio.Event()
        self._room = asyncio.Event()
        self._room.set()

    def __len__(self) -> int:
        return len(self._items)

    async def put(self, item: T) -> None:
        while len(self._items) >= self.max_items and not self._ended:
            self._room.clear()
            await self._room.wait()
        self._items.append(item)
        self._readable.set()

    async def get(self) -> T:
        """The oldest item; StopAsyncIteration once ended and empty."""
        while not self._items:
            if self._ended:
                raise StopAsyncIteration
            self._readable.clear()
            await self._readable.wait()
        item = self._items.popleft()
        self._room.set()
        return item

    def end(self) -> None:
        """No more items will come; what is here can still be read."""
        self._ended = True
        self._readable.set()
        self._room.set()

    def reopen(self) -> None:
        self._ended = False
