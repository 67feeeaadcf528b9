"""Detached sessions: what a drained session leaves in the store for its resume.

A node that drains writes, for each session, a detached record (the session
record with state "detached", the hash of its resume token, the subject,
the window's end) and then sends the client its 1012 with the token. Frames
meant for the client after that go to the session's replay buffer, capped
by drain.replay_max_messages and drain.replay_max_bytes; past either cap
the buffer is marked overflowed and stops growing, so a resume can never
be served a replay with a hole in it.

A resume takes the session with a lease, not a read-and-delete: a node
that dies, or a backend that refuses, half-way through a resume leaves the
session for the client's next attempt once the lease runs out. A take
waits for the seal: the draining node seals the buffer once the old
upstream has closed and everything it sent is written, so a client that
comes back within milliseconds is never replayed a buffer still growing
behind it. `finish`
ends it (state "used"); the record stays as a tombstone for
TOMBSTONE_S more, so a second use of the token is told 410, not 401.

Both stores implement `DetachedSessions` (store.detached); the Redis one
is in redis_detached.py, the in-process one here. Keys (P = key_prefix):

    P det:{sid}      hash    rec, th (token hash), sub, state, until, lease, lease_until,
                             n (messages buffered), bytes, over (1: overflowed), sealed (1: the
                             draining node wrote all it had), run (Redis run id)
    P replay:{sid}   stream  the replay buffer: fields o (opcode), p (payload)
    P detached       zset    sid -> until (ms), for the sweep that expires them

While detached, the session keeps its index entries (conn, sub, chan) with
node "" so the management API and channel publishes find it and buffer.
"""

from __future__ import annotations

import hmac
from dataclasses import dataclass
from typing import Protocol

import orjson

TOMBSTONE_S = 600.0   # how long a used or expired token is still known as such (410, not 401)
DETACHED_NODE = ""    # the node id index entries name while a session is detached


@dataclass(slots=True)
class Parked:
    """One session a draining node detaches."""
    record: dict        # its session record (cluster.record), state "detached"
    token_hash: str     # sha256 hex of the resume token's secret part
    window_s: float     # drain.resume_window_s
    check_subject: bool = True   # False: its route takes no token, so any (or no) subject may resume it


# take() answers
OK = "ok"
UNKNOWN = "unknown"        # no such detached session (never, or forgotten since)
FORGED = "forged"          # the token does not match the session's
SUBJECT = "subject"        # another subject than the session's
EXPIRED = "expired"        # resume_window_s passed
USED = "used"              # resumed already
LEASED = "leased"          # a resume is under way elsewhere; retry after the lease
OVERFLOWED = "overflowed"  # the replay buffer overflowed: the replay cannot be whole
PENDING = "pending"        # the draining node is still writing the buffer (its upstream is open)
LOST = "lost"              # the replay buffer is not all there (Redis failover or restart)

Entry = tuple[str, int, bytes]   # (entry id, opcode, payload)


class DetachedSessions(Protocol):
    async def park(self, items: list[Parked]) -> None:
        """Replace each session's live record by its detached record, in one round trip."""

    async def append(self, sid: str, entries: list[tuple[int, bytes]], max_messages: int,
                     max_bytes: int, seal: bool = False) -> tuple[int, str]:
        """Add to the replay buffer, in order (and with `seal`, mark it
        complete as far as the draining node goes). Returns (how many were added,
        "ok" | "full" | "gone"): "full" when the caps were reached (the buffer
        is marked overflowed and takes nothing more), "gone" when there is no
        detached session to buffer for (resumed, expired or unknown)."""

    async def take(self, sid: str, token_hash: str, sub: str | None, node: str,
                   lease_s: float) -> tuple[str, dict | None]:
        """Lease the session to `node` for a resume (`sub`: the resuming client's
        subject, checked unless the session's route takes no token). Returns (OK, record) or
        (one of the other answers above, None; LEASED gives the seconds left
        in the record's place as {"retry_after_s": x})."""

    async def read(self, sid: str) -> list[Entry]:
        """The whole replay buffer, oldest first."""

    async def finish(self, sid: str, node: str, after: str | None, live: dict | None = None) -> list[Entry] | None:
        """The resume is complete: if `node` still holds the lease, mark the
        session used, drop its buffer and return what was appended after the
        entry id `after` (None: after nothing), atomically. None when the lease
        was lost (it ran out and another node took the session).

        `live`: the session's record on `node` (cluster.record), written with its
        connection, subject and channel index entries in the same step, in place of
        the detached ones: whoever publishes after the buffer is taken finds the
        session on `node`, and an append that lost the race is answered "gone"
        with the index already naming `node` (delivery follows it there)."""

    async def release(self, sid: str, node: str) -> None:
        """A resume failed half-way: give the lease back for the next attempt."""

    async def get(self, sid: str) -> dict | None:
        """The detached record (with "state"), while the session can still be resumed."""

    async def due(self, limit: int) -> list[str]:
        """Sessions whose window ended (oldest first, at most `limit`)."""

    async def expire(self, sid: str) -> dict | None:
        """Mark a due session expired and drop its buffer and index entries.
        Exactly one caller gets the record (for its disconnect event)."""


ANY_SUBJECT = "*"   # the det record's `sub` when its route takes no token


def subject_field(item: Parked) -> str:
    """What `take` compares the resuming client's subject with."""
    return (item.record.get("sub") or "") if item.check_subject else ANY_SUBJECT


def member(record: dict) -> dict:
    """The channel index entry of a detached session."""
    return {"node": DETACHED_NODE, "conn": record.get("connection"), "sub": record.get("sub")}


class MemoryDetached:
    """DetachedSessions on a MemoryStore's key space (same rules as Redis)."""

    def __init__(self, store):
        self.s = store

    def _now(self) -> float:
        return self.s._clock()

    async def park(self, items: list[Parked]) -> None:
        s = self.s
        for item in items:
            rec = item.record
            sid = rec["session"]
            s._delete(sid, rec["node"], None, ())
            ttl = item.window_s + TOMBSTONE_S
            until = self._now() + item.window_s
            s._set(f"det:{sid}", {"rec": rec, "th": item.token_hash, "sub": subject_field(item),
                                  "state": "detached", "until": until, "lease": "", "lease_until": 0.0,
                                  "n": 0, "bytes": 0, "over": False, "sealed": False}, ttl)
            s._set(f"replay:{sid}", [], ttl)
            zset = s._live("detached")
            if zset is None:
                zset = {}
                s._set("detached", zset, None)
            zset[sid] = until
            self._index(rec, ttl)

    def _index(self, rec: dict, ttl: float) -> None:
        s = self.s
        sid = rec["session"]
        if rec.get("connection"):
            s._set(f"conn:{rec['connection']}", sid, ttl)
        if rec.get("sub") is not None:
            self._keyed(f"sub:{rec['sub']}", ttl)[sid] = DETACHED_NODE
        m = orjson.dumps(member(rec))
        for c in rec.get("channels") or ():
            self._keyed(f"chan:{c}", ttl)[sid] = m

    def _keyed(self, key: str, ttl: float) -> dict:
        """A hash index whose TTL is at least `ttl` (PEXPIRE ... GT)."""
        s = self.s
        h = s._live(key)
        if h is None:
            h = s._data[key] = {}
        s._deadline[key] = max(s._deadline.get(key, 0.0), self._now() + ttl)
        return h

    def _det(self, sid: str) -> dict | None:
        return self.s._live(f"det:{sid}")

    async def append(self, sid, entries, max_messages, max_bytes, seal=False):
        d = self._det(sid)
        if d is None or d["state"] not in ("detached", "resuming"):
            return 0, "gone"
        if seal:
            d["sealed"] = True
        if d["over"]:
            return 0, "full"
        buf = self.s._live(f"replay:{sid}")
        if buf is None:
            return 0, "gone"
        added = 0
        for opcode, payload in entries:
            if d["n"] + 1 > max_messages or d["bytes"] + len(payload) > max_bytes:
                d["over"] = True
                return added, "full"
            d["n"] += 1
            d["bytes"] += len(payload)
            buf.append((str(d["n"]), opcode, bytes(payload)))
            added += 1
        return added, "ok"

    async def take(self, sid, token_hash, sub, node, lease_s):
        d = self._det(sid)
        now = self._now()
        if d is None:
            return UNKNOWN, None
        if not hmac.compare_digest(d["th"], token_hash):
            return FORGED, None
        if d["state"] == "used":
            return USED, None
        if d["state"] == "expired" or d["until"] <= now:
            return EXPIRED, None
        if d["sub"] != ANY_SUBJECT and d["sub"] != (sub or ""):
            return SUBJECT, None
        if d["state"] == "resuming" and d["lease"] != node and d["lease_until"] > now:
            return LEASED, {"retry_after_s": d["lease_until"] - now}
        if d["over"]:
            return OVERFLOWED, None
        if not d["sealed"]:
            return PENDING, None
        buf = self.s._live(f"replay:{sid}")
        if buf is None or len(buf) != d["n"]:
            return LOST, None
        d.update(state="resuming", lease=node, lease_until=now + lease_s)
        return OK, dict(d["rec"])

    async def read(self, sid):
        return list(self.s._live(f"replay:{sid}") or ())

    async def finish(self, sid, node, after, live=None):
        d = self._det(sid)
        if d is None or d["state"] != "resuming" or d["lease"] != node:
            return None
        buf = self.s._live(f"replay:{sid}") or []
        rest = buf if after is None else [e for e in buf if int(e[0]) > int(after)]
        if d["rec"].get("connection"):     # the resumed session has its own connection id
            self.s._drop(f"conn:{d['rec']['connection']}")
        if live is not None:   # its indexes name the new node in the same step
            for c in d["rec"].get("channels") or ():
                self.s._discard(f"chan:{c}", sid)
            self.s._put(live)
        self._end(sid, d, "used")
        return list(rest)

    def _end(self, sid: str, d: dict, state: str) -> None:
        d["state"] = state
        d["rec"] = {"session": sid}
        self.s._drop(f"replay:{sid}")
        zset = self.s._live("detached")
        if zset is not None:
            zset.pop(sid, None)

    async def release(self, sid, node):
        d = self._det(sid)
        if d is not None and d["state"] == "resuming" and d["lease"] == node:
            d.update(state="detached", lease="", lease_until=0.0)

    async def get(self, sid):
        d = self._det(sid)
        if d is None or d["state"] not in ("detached", "resuming"):
            return None
        return {**d["rec"], "state": d["state"], "buffered": d["n"], "overflowed": d["over"]}

    async def due(self, limit):
        now = self._now()
        zset = self.s._live("detached") or {}
        return [sid for sid, until in sorted(zset.items(), key=lambda kv: kv[1]) if until <= now][:limit]

    async def expire(self, sid):
        d = self._det(sid)
        if d is None or d["state"] in ("used", "expired"):
            zset = self.s._live("detached")
            if zset is not None:
                zset.pop(sid, None)
            return None
        if d["until"] > self._now() or d["state"] == "resuming" and d["lease_until"] > self._now():
            return None   # not due, or a resume is under way: its finish decides
        rec = d["rec"]
        s = self.s
        if rec.get("connection"):
            s._drop(f"conn:{rec['connection']}")
        if rec.get("sub") is not None:
            s._discard(f"sub:{rec['sub']}", sid)
        for c in rec.get("channels") or ():
            s._discard(f"chan:{c}", sid)
        self._end(sid, d, "expired")
        return rec
