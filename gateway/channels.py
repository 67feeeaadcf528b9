"""Channels on one node: who is subscribed to what, fan-out, presence.

A channel is a name; its members are sessions. Each session keeps the names
it joined in `session.channels` (a set, created on first join), so closing a
session removes it from exactly the channels it is in. A message to a channel
is framed once (frames.frame) and the same bytes are written to every member
with `send_raw`: a fan-out to 10,000 sessions builds one frame, not 10,000.

Also here: `RecentlyClosed`, the bounded, time-limited memory of sessions
that ended, so the management API can answer 410 (gone) instead of 404.
"""

from __future__ import annotations

import re
import time
from collections import OrderedDict

from . import frames
from .errors import ChannelError

# Letters, digits and _ - . : @ ; at most 128 characters. No '/' (channel names
# are path segments in the management API), no spaces, no commas (the
# Gateway-Subscribe header is a comma-separated list).
CHANNEL_NAME = re.compile(r"[A-Za-z0-9_.:@\-]{1,128}")
MAX_CHANNELS_PER_SESSION = 256


def check_name(name: str) -> str:
    if not isinstance(name, str) or not CHANNEL_NAME.fullmatch(name):
        raise ChannelError(f"bad channel name {name[:140]!r}: use 1-128 letters, digits, _ - . : @"
                           if isinstance(name, str) else "channel name must be a string")
    return name


def parse_list(value: str) -> list[str]:
    """'a, b,c' -> ['a', 'b', 'c'] (the Gateway-Subscribe header form); empty items dropped."""
    return [part.strip() for part in value.split(",") if part.strip()]


class Channels:
    """Channel name -> member sessions (insertion ordered: presence lists join order)."""

    __slots__ = ("members", "max_per_session", "published", "delivered", "observer")

    def __init__(self, max_per_session: int = MAX_CHANNELS_PER_SESSION, observer=None):
        self.members: dict[str, dict[object, None]] = {}
        self.max_per_session = max_per_session
        self.published = 0   # messages published to channels
        self.delivered = 0   # frames written to subscribers
        # Told of every join and leave (`joined(session, name)`, `left(session, name)`):
        # the cluster mirrors membership into the store.
        self.observer = observer

    def subscribe(self, session, name: str) -> bool:
        """Join `name`. True if it was not a member already. Raises ChannelError."""
        check_name(name)
        mine = session.channels
        if mine is None:
            mine = session.channels = set()
        elif name in mine:
            return False
        if len(mine) >= self.max_per_session:
            raise ChannelError(f"too many channels for one session (max {self.max_per_session})")
        mine.add(name)
        members = self.members.get(name)
        if members is None:
            members = self.members[name] = {}
        members[session] = None
        if self.observer is not None:
            self.observer.joined(session, name)
        return True

    def unsubscribe(self, session, name: str) -> bool:
        """Leave `name`. True if it was a member."""
        mine = session.channels
        if not mine or name not in mine:
            return False
        mine.discard(name)
        self._remove(session, name)
        if self.observer is not None:
            self.observer.left(session, name)
        return True

    def drop(self, session) -> None:
        """A session ended: leave every channel it was in."""
        mine = session.channels
        if not mine:
            return
        session.channels = None
        for name in mine:
            self._remove(session, name)
            if self.observer is not None:
                self.observer.left(session, name)

    def _remove(self, session, name: str) -> None:
        members = self.members.get(name)
        if members is not None:
            members.pop(session, None)
            if not members:
                del self.members[name]

    def publish(self, name: str, opcode: int, payload: bytes, exclude=None, *, held=None,
                offset: int | None = None, skip=None) -> int:
        """Send one message to every member; returns how many sessions took it.

        `held` maps members that are catching up on history to a list: their
        copy is appended there as (offset, frame) instead of sent, and counted.
        `skip`: session ids the publisher reaches another way (parked sessions,
        whose replay buffer it appends to): not sent here, not counted.
        """
        members = self.members.get(name)
        self.published += 1
        if not members:
            return 0
        frame = frames.frame(opcode, payload)
        n = 0
        # A copy: a write may end a session (and so change the members) under us.
        for s in list(members):
            if s is exclude or (skip and s.session_id in skip):
                continue
            if held is not None and s in held:
                held[s].append((offset, frame))
                n += 1
            elif s.send_raw(frame):
                n += 1
        self.delivered += n
        return n

    def count(self, name: str) -> int:
        members = self.members.get(name)
        return len(members) if members else 0

    def presence(self, name: str) -> dict:
        members = self.members.get(name) or {}
        sessions = [{"session": s.session_id, "connection": s.id, "sub": s.sub} for s in members]
        subjects = sorted({s.sub for s in members if s.sub is not None})
        return {"channel": name, "count": len(sessions), "sessions": sessions, "subjects": subjects}


class RecentlyClosed:
    """Ids of sessions that ended recently, with their close code.

    Bounded twice: at most `capacity` ids, none older than `ttl_s`. The oldest
    go first (an OrderedDict in closing order), so adding is O(1) amortised.
    """

    __slots__ = ("capacity", "ttl_s", "_ids", "_clock")

    def __init__(self, capacity: int = 100_000, ttl_s: float = 600.0, clock=time.monotonic):
        self.capacity = capacity
        self.ttl_s = ttl_s
        self._ids: OrderedDict[str, tuple[float, int, str]] = OrderedDict()
        self._clock = clock

    def add(self, conn_id: str, code: int, reason: str = "") -> None:
        now = self._clock()
        ids = self._ids
        ids[conn_id] = (now + self.ttl_s, code, reason)
        ids.move_to_end(conn_id)
        while ids:
            first = next(iter(ids.values()))
            if len(ids) > self.capacity or first[0] <= now:
                ids.popitem(last=False)
            else:
                break

    def get(self, conn_id: str) -> tuple[int, str] | None:
        """(close code, reason) if `conn_id` ended within ttl_s, else None."""
        entry = self._ids.get(conn_id)
        if entry is None:
            return None
        if entry[0] <= self._clock():
            del self._ids[conn_id]
            return None
        return entry[1], entry[2]

    def __len__(self) -> int:
        return len(self._ids)
