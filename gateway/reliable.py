"""Reliable mode's pure core (docs/reliable.md): the kind byte, acks, the hello,
the window of what the gateway sent and the client has not acked, and the
checks a resume with `last=` must pass.

Numbers are implicit: each side counts the `d` messages it sends and takes.
What runs per message here is a slot or two and an integer; nothing here does
I/O, so the relay (reliable_session.ReliableSession) stays the only socket code.
"""

from __future__ import annotations

import json
import struct
from collections import deque

from .errors import Refusal

__all__ = ["ACK", "DATA", "HELLO", "SUBPROTOCOL", "Inbound", "Peer", "Window", "ack", "check_last",
           "hello", "masked_head", "META", "WINDOWED", "meta", "parse_ack", "parse_last", "split_replay"]

SUBPROTOCOL = "gateway.reliable.v1"

DATA = 0x64    # b"d": an application message follows
ACK = 0x61     # b"a": "I have received messages 1..count", count in decimal
HELLO = 0x68   # b"h": the gateway's hello, first message of every connection

# 2**63 - 1 has 19 digits: a longer count is not a count.
_MAX_DIGITS = 19


def parse_ack(payload: bytes) -> int | None:
    """The count of an ack's payload (after the kind byte): plain ASCII digits, or None."""
    if not payload or len(payload) > _MAX_DIGITS or not payload.isdigit():
        return None
    return int(payload)


def ack(count: int) -> bytes:
    """An ack message's payload, kind byte included."""
    return b"a%d" % count


_SHORT = struct.Struct("!BBH").pack
_LONG = struct.Struct("!BBQ").pack


def masked_head(opcode: int, n: int) -> bytes:
    """The first bytes of a whole masked frame of `n` payload bytes, up to its key."""
    if n < 126:
        return bytes((0x80 | opcode, 0x80 | n))
    if n < 65536:
        return _SHORT(0x80 | opcode, 0xFE, n)
    return _LONG(0x80 | opcode, 0xFF, n)


def hello(session: str, token: str, up: int, down: int) -> bytes:
    """The hello's payload, kind byte included (docs/reliable.md "The hello")."""
    return b"h" + json.dumps({"v": 1, "session": session, "token": token, "up": up, "down": down},
                             separators=(",", ":")).encode()


def parse_last(value: str | None) -> int | None:
    """The `last=` query parameter: None when absent; a 400 Refusal when it is not a count."""
    if value is None:
        return None
    raw = value.encode("ascii", "replace")
    n = parse_ack(raw)
    if n is None:
        raise Refusal(400, "resume refused: last must be a count (decimal digits)", metric="resume_bad_last")
    return n


def check_last(last: int, first: int, sent: int) -> None:
    """A resume's `last` against what the gateway kept: messages first..sent.

    Raises a Refusal: 410 `window` when the client asks for messages the
    gateway no longer has (it acked them, so it lost state), 400 `last out of
    range` when it claims more than was ever sent.
    """
    if last > sent:
        raise Refusal(400, f"resume refused: last out of range (sent {sent})", metric="resume_last_out_of_range")
    if last < first - 1:
        raise Refusal(410, f"resume refused: window (kept from {first}); start a new session",
                      metric="resume_window")


# A replay buffer entry with this opcode is not a message: it is the drained session's
# counts (`meta`), written last, when the buffer is sealed. 0 (a continuation) is never
# a whole message, so no message is ever taken for it.
META = 0


def meta(first: int, up: int) -> bytes:
    """The counts a resume needs: the number of the buffer's first message, and `up`."""
    return json.dumps({"first": first, "up": up}, separators=(",", ":")).encode()


# A replay buffer entry's opcode has this bit when the message is one of the window's
# (sent to the client, not acked): the client may have it, and knows it by its number.
# The window goes to the buffer first, but a publisher that finds the session parked
# appends to the buffer straight away, and can come before the capture's write; the
# resume numbers the window's messages first all the same.
WINDOWED = 0x100


def split_replay(entries) -> tuple[int, int, list] | None:
    """A reliable session's replay buffer ((id, opcode, payload) entries) as
    (number of its first message, up, the message entries in order); None when
    its counts are missing (the buffer is not whole). The counts are written at
    the seal; what the management API appends to a parked session comes after
    them, and is numbered on after the rest. The window's messages (WINDOWED) come
    first, in their order, their opcodes without the bit; then the others in theirs."""
    at = next((i for i in range(len(entries) - 1, -1, -1) if entries[i][1] == META), None)
    if at is None:
        return None
    try:
        m = json.loads(entries[at][2])
        first, up = int(m["first"]), int(m["up"])
    except (ValueError, KeyError, TypeError, OverflowError):  # OverflowError: int(1e999)
        return None
    window, rest = [], []
    for i, (eid, opcode, payload) in enumerate(entries):
        if opcode & WINDOWED:
            window.append((eid, opcode & ~WINDOWED, payload))
        elif i != at:
            rest.append((eid, opcode, payload))
    return first, up, window + rest


class Window:
    """The `d` messages the gateway sent in this session that the client has not
    acked yet, oldest first: numbers `first`..`sent`.

    Bounded by `max_bytes` and `max_messages` (route `reliable:`); `full` says
    the relay stops reading the upstream until an ack makes room.
    """

    __slots__ = ("items", "first", "sent", "size", "max_bytes", "max_messages", "full")

    def __init__(self, max_bytes: int, max_messages: int, sent: int = 0):
        self.items: deque[tuple[int, bytes]] = deque()
        self.sent = sent
        self.first = sent + 1
        self.size = 0
        self.max_bytes = max_bytes
        self.max_messages = max_messages
        self.full = False

    def add(self, opcode: int, payload: bytes) -> int:
        """Keep one sent message; returns its number."""
        self.items.append((opcode, payload))
        self.size += len(payload)
        self.sent += 1
        if len(self.items) >= self.max_messages or self.size >= self.max_bytes:
            self.full = True
        return self.sent

    def ack(self, count: int) -> bool:
        """The client has messages 1..count: drop them. False when `count` is above
        what was sent (a protocol error). An older ack than one seen is harmless."""
        if count > self.sent:
            return False
        items = self.items
        while self.first <= count:
            self.size -= len(items.popleft()[1])
            self.first += 1
        self.full = len(items) >= self.max_messages or self.size >= self.max_bytes
        return True

    def after(self, last: int) -> list[tuple[int, bytes]]:
        """The kept messages numbered above `last` (check_last first)."""
        skip = max(0, last - self.first + 1)
        return list(self.items)[skip:]

    def __len__(self) -> int:
        return len(self.items)


class Inbound:
    """The client's `d` messages this session: how many were taken, and when the
    next ack is due (every `ack_every` messages, or `ack_ms` after the first
    unacked one; the relay keeps the timer)."""

    __slots__ = ("taken", "acked", "ack_every")

    def __init__(self, ack_every: int, taken: int = 0):
        self.taken = taken
        self.acked = taken
        self.ack_every = ack_every

    def take(self) -> int:
        """One more message from the client. Returns how many are now unacked."""
        self.taken += 1
        return self.taken - self.acked

    def acking(self) -> int | None:
        """The count to ack now, or None when everything taken was acked."""
        if self.taken == self.acked:
            return None
        self.acked = self.taken
        return self.taken


class Peer:
    """A reliable session's own state beside the relay's: both directions' counts,
    the ack timer, and the upstream message being joined from its frames. `room`:
    an HTTP backend's worker waiting for the window to have room (an opaque waiter
    the session resolves)."""

    __slots__ = ("window", "inbound", "ack_s", "ack_timer", "token_hash", "parts", "parts_size", "msg_op",
                 "room")

    def __init__(self, cfg, up: int = 0, down: int = 0):
        """`cfg`: config.Reliable. `up`, `down`: the counts so far (non-zero on a resume)."""
        self.window = Window(cfg.max_unacked_bytes, cfg.max_unacked_messages, down)
        self.inbound = Inbound(cfg.ack_every, up)
        self.ack_s = cfg.ack_ms / 1000
        self.ack_timer = None
        self.token_hash = ""
        self.parts: list[bytes] | None = None
        self.parts_size = 0
        self.msg_op = 0
        self.room = None
