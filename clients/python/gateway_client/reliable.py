"""Reliable mode (docs/reliable.md): the client's half of a numbered session, no I/O.

Each side counts the data messages it sends and receives. The numbers are
implicit (a WebSocket loses nothing while it lives) and show up only at the
seams: in acks, in the gateway's hello, and in a resume's `last=`. So a
connection that dies without a close (1006: the network lost) costs
nothing: the client comes back with the hello's token and the count it
received, the gateway replays what the client missed, and the client sends
again what the gateway did not take.

Every message carries one kind byte:

    d<message>  data, text or binary as the application chose (both ways)
    a<count>    "I have received messages 1..count" (text, both ways)
    h<json>     the gateway's hello, first message of every connection:
                {v, session, token, up, down[, ack_every, ack_ms]}

transport.py's ReliableLink puts this on a socket; client.py decides when
to resume.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from .errors import GatewayClientError
from .outbox import Message, Outbox, Overflow

SUBPROTOCOL = "gateway.reliable.v1"
ACK_EVERY = 64       # the doc's defaults, used when the hello does not say
ACK_MS = 200.0

Reliable = Literal["prefer", "require"]
Kind = Literal["d", "a", "h"]

_COUNT = re.compile(r"[0-9]{1,19}")


class ProtocolError(GatewayClientError):
    """The gateway sent something outside gateway.reliable.v1 (or counts that cannot be)."""


class ReliableUnavailable(GatewayClientError):
    """reliable="require", and the gateway's 101 did not select gateway.reliable.v1
    (the route has no `reliable:`)."""


def encode_data(message: Message) -> Message:
    """An application message with its `d` kind byte, in the frame type it goes in."""
    return "d" + message if isinstance(message, str) else b"d" + message


def decode_frame(raw: Message) -> tuple[Kind, Message]:
    """A socket message split into its kind and payload. Raises ProtocolError for an
    unknown kind byte (acks and hellos are text: a binary frame is data or nothing)."""
    if isinstance(raw, str):
        if raw.startswith("d"):
            return "d", raw[1:]
        if raw.startswith("a"):
            return "a", raw[1:]
        if raw.startswith("h"):
            return "h", raw[1:]
    elif raw[:1] == b"d":
        return "d", raw[1:]
    head = raw[:1]
    raise ProtocolError(f"reliable: a message from the gateway with an unknown kind byte {head!r}")


def parse_ack(payload: str) -> int | None:
    """An ack's count (plain ASCII digits, at most 19), or None."""
    return int(payload) if _COUNT.fullmatch(payload) else None


def _is_count(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= 0


@dataclass(frozen=True, slots=True)
class Hello:
    token: str
    up: int            # client messages the gateway has taken this session
    down: int          # gateway messages counted before this connection
    session: str | None = None
    ack_every: int = ACK_EVERY
    ack_ms: float = ACK_MS


def parse_hello(payload: str) -> Hello:
    """The hello's fields, checked; raises ProtocolError naming what is wrong."""
    try:
        h = json.loads(payload)
    except ValueError:
        raise ProtocolError(f"reliable: the gateway's hello is not JSON: {payload[:80]!r}") from None
    if (not isinstance(h, dict) or h.get("v") != 1 or not isinstance(h.get("token"), str) or not h["token"]
            or not _is_count(h.get("up")) or not _is_count(h.get("down"))):
        raise ProtocolError(f"reliable: a hello without v 1, token, up and down: {payload[:200]!r}")
    ack_every = h.get("ack_every", ACK_EVERY)
    ack_ms = h.get("ack_ms", ACK_MS)
    if (not _is_count(ack_every) or ack_every < 1 or isinstance(ack_ms, bool)
            or not isinstance(ack_ms, (int, float)) or not ack_ms > 0):
        raise ProtocolError(f"reliable: the hello's ack_every/ack_ms are not a count >= 1 and ms > 0: "
                            f"{payload[:200]!r}")
    session = h.get("session")
    return Hello(h["token"], h["up"], h["down"], session if isinstance(session, str) else None,
                 ack_every, float(ack_ms))


class ReliableSession:
    """One session's counts and window, across its connections.

        received  data messages received this session (a resume's `last=`)
        base      client messages before the window's first (acked, or dropped by the
                  overflow policy after they were numbered)
        window    what the application sent that the gateway has not acked, oldest
                  first, bounded as the outbound queue is (the same options and policy);
                  the first `written` of them went out on the current connection
        token     the resume token of the last hello (single use)
        live      a connection took its hello: the window goes out, acks come and go
    """

    def __init__(self, max_messages: int = 1000, max_bytes: int = 1 << 20, overflow: Overflow = "raise"):
        self.window = Outbox(max_messages, max_bytes, overflow)
        self.fresh()

    def fresh(self) -> None:
        """A new session: nothing received, every message of the window still to send."""
        self.received = 0
        self.base = 0
        self.written = 0
        self.token: str | None = None
        self.session: str | None = None
        self.live = False
        self.ack_every = ACK_EVERY
        self.ack_ms = ACK_MS
        self.acked = 0          # the count this client last acked

    def __len__(self) -> int:
        return len(self.window)

    @property
    def unsent(self) -> int:
        """Messages of the window not yet written on the current connection."""
        return len(self.window) - self.written

    def push(self, message: Message) -> int:
        """Keep `message` until acked. Returns how many older ones the overflow policy
        dropped for it (raises QueueFull with "raise")."""
        live, written = self.live, self.written
        dropped = self.window.push(message)
        for _ in range(dropped):
            if live and written == 0:
                continue   # never written on this session's live connection: it had no number yet
            self.base += 1
            written = max(0, written - 1)
        self.written = written
        return dropped

    def next_unsent(self) -> Message:
        """The oldest message not written yet; counted as written at once (a failed
        write ends the connection, and with it the count)."""
        message = self.window.at(self.written)
        self.written += 1
        return message

    def check(self, h: Hello, resuming: bool) -> str | None:
        """Whether the hello of a new connection goes with this session's counts.
        `resuming`: the attempt presented a token. None when it does, else why not
        (the caller starts a fresh session)."""
        if resuming and h.down != self.received:
            return f"the gateway resumed after message {h.down}, this client has received {self.received}"
        if not resuming and (h.up != 0 or h.down != 0):
            return f"a new session's hello counts up {h.up}, down {h.down} (expected 0, 0)"
        if h.up > self.base + len(self.window):
            return f"the gateway took {h.up} messages, this client sent {self.base + len(self.window)}"
        return None

    def start(self, h: Hello) -> None:
        """The session goes on with the (checked) hello `h`: drop what the gateway took,
        send the rest again, in order, before new ones."""
        self.written = 0
        if h.up >= self.base:
            self.trim(h.up)
        else:
            self.base = h.up   # messages the overflow policy dropped before the gateway took them
        self.token = h.token
        self.session = h.session
        self.ack_every = h.ack_every
        self.ack_ms = h.ack_ms
        self.acked = self.received   # last= told the gateway as much
        self.live = True

    def on_data(self) -> bool:
        """A `d` arrived. True: an ack is due now (ack_every reached); else one is due
        ack_ms after the first unacked message (ack_pending says whether one waits)."""
        self.received += 1
        return self.received - self.acked >= self.ack_every

    @property
    def ack_pending(self) -> bool:
        return self.received > self.acked

    def ack(self) -> str | None:
        """The ack to send now (the count is then taken as acked), or None."""
        if not self.live or self.received <= self.acked:
            return None
        self.acked = self.received
        return f"a{self.received}"

    def on_ack(self, payload: str) -> None:
        """An `a` from the gateway: trims the window. ProtocolError for a bad one."""
        count = parse_ack(payload)
        if count is None or count > self.base + self.written:
            raise ProtocolError(f"reliable: a bad ack {payload[:40]!r} (this client sent {self.base + self.written})")
        self.trim(count)

    def trim(self, count: int) -> None:
        while self.base < count and self.window:
            self.window.pop()
            self.base += 1
            self.written = max(0, self.written - 1)
        self.base = max(self.base, count)

    def closed(self) -> None:
        """The connection ended: nothing is written until the next hello."""
        self.live = False
        self.written = 0

    def clear(self) -> None:
        """Everything: the client closed."""
        self.window.clear()
        self.fresh()
