"""The outbound queue: messages accepted while the connection is not open.

Bounded twice (messages and bytes), sized once from the options. What
happens at the bound is the caller's choice: "raise" refuses the new message
(QueueFull), "drop_oldest" makes room by dropping from the front and counts
what it dropped. A message leaves the queue only once it was written
(`pop` after a successful write), so a write that fails loses nothing.
"""

from __future__ import annotations

from collections import deque
from typing import Literal

from .errors import QueueFull

Message = str | bytes
Overflow = Literal["raise", "drop_oldest"]


def size_of(message: Message) -> int:
    """Bytes on the wire (text is sent as UTF-8)."""
    return len(message.encode()) if isinstance(message, str) else len(message)


class Outbox:
    __slots__ = ("max_messages", "max_bytes", "overflow", "dropped", "_items", "_bytes")

    def __init__(self, max_messages: int = 1000, max_bytes: int = 1 << 20, overflow: Overflow = "raise"):
        if max_messages < 1 or max_bytes < 1:
            raise ValueError(f"queue bounds must be >= 1 (max_queue_messages={max_messages}, "
                             f"max_queue_bytes={max_bytes})")
        if overflow not in ("raise", "drop_oldest"):
            raise ValueError(f"overflow must be 'raise' or 'drop_oldest' (got {overflow!r})")
        self.max_messages = max_messages
        self.max_bytes = max_bytes
        self.overflow: Overflow = overflow
        self.dropped = 0          # messages dropped by drop_oldest, ever
        self._items: deque[tuple[Message, int]] = deque()
        self._bytes = 0

    def __len__(self) -> int:
        return len(self._items)

    @property
    def bytes(self) -> int:
        return self._bytes

    def push(self, message: Message) -> int:
        """Queue `message` at the end. Returns how many older messages were dropped for it."""
        n = size_of(message)
        if n > self.max_bytes:
            raise QueueFull(f"message of {n} bytes is larger than the whole queue (max_queue_bytes={self.max_bytes})")
        dropped = 0
        while len(self._items) >= self.max_messages or self._bytes + n > self.max_bytes:
            if self.overflow == "raise":
                raise QueueFull(f"outbound queue full ({len(self._items)} messages, {self._bytes} bytes; "
                                f"max {self.max_messages} messages, {self.max_bytes} bytes)")
            _, old = self._items.popleft()
            self._bytes -= old
            dropped += 1
        self._items.append((message, n))
        self._bytes += n
        self.dropped += dropped
        return dropped

    def peek(self) -> Message:
        return self._items[0][0]

    def at(self, index: int) -> Message:
        return self._items[index][0]

    def drain(self) -> list[Message]:
        """Everything, oldest first, and the queue empty."""
        out = [m for m, _ in self._items]
        self.clear()
        return out

    def pop(self) -> Message:
        message, n = self._items.popleft()
        self._bytes -= n
        return message

    def clear(self) -> int:
        n = len(self._items)
        self._items.clear()
        self._bytes = 0
        return n
