"""The in-process store: the default when no `redis:` is configured.

It keeps the same keys, TTLs and atomicity as the Redis store (see base.py), so
that a node behaves the same on either and the contract tests can run against
both. Several in-process nodes may share one instance (the tests do): its data
then plays the part of one Redis, and `publish`/`listen` the part of its
pub/sub.

Time is `clock()` (time.monotonic unless injected), also for the heartbeat
times in the `nodes` table: they are only ever compared with each other, in
one process. TTLs are checked on every read, and expired keys are swept on
heartbeats and, at most every `sweep_s`, on writes, so memory is bounded by
what is alive: history by its `size`, the bus queue by `bus_limit`.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import secrets
import time
from collections import deque
from typing import Callable

import orjson

from ..records import decode, encode
from ..errors import HistoryEpochChanged, HistoryTrimmed, RecordVersionError
from .detached import MemoryDetached
from .base import BusHandler, Delete, HistoryEntry, HistoryPage, Join, Leave, Op, Put

log = logging.getLogger("gateway.store")


class RecordReader:
    """Decodes records and logs a record from a newer gateway once per key, not on
    every read: during a rolling upgrade an old node may read a new node's record
    many times a second. Shared by both stores."""

    __slots__ = ("_logged", "_limit")

    def __init__(self, limit: int = 4096):
        self._logged: set[str] = set()
        self._limit = limit

    def decode(self, kind: str, raw: bytes | str | None, key: str) -> dict | None:
        """The record, or None when missing, unreadable or too new (logged)."""
        try:
            return decode(kind, raw)
        except RecordVersionError as e:
            self.too_new(key, e)
            return None

    def too_new(self, key: str, e: RecordVersionError) -> None:
        if key in self._logged:
            return
        if len(self._logged) >= self._limit:
            self._logged.clear()     # bounded; at worst a key is logged again
        self._logged.add(key)
        log.warning("record from a newer gateway skipped", extra={"fields": {
            "event": "record_version_unknown", "key": key, "kind": e.kind, "version": e.version}})


def member_of(record: dict) -> dict:
    """The channel index entry a session record implies."""
    return {"node": record.get("node"), "conn": record.get("connection"), "sub": record.get("sub")}


class _History:
    __slots__ = ("epoch", "offset", "entries")

    def __init__(self, size: int):
        self.epoch = secrets.token_hex(8)
        self.offset = 0
        self.entries: deque[HistoryEntry] = deque(maxlen=size)


class _Where:
    """Which index keys a session appears in, so a refresh can re-expire them."""
    __slots__ = ("node", "connection", "sub", "channels")

    def __init__(self, node: str, connection: str | None, sub: str | None, channels: set[str]):
        self.node = node
        self.connection = connection
        self.sub = sub
        self.channels = channels


class _Listener:
    __slots__ = ("queue", "task")

    def __init__(self, queue: asyncio.Queue, task: asyncio.Task):
        self.queue = queue
        self.task = task


class MemoryStore:
    """See the module docstring. `available` is always True."""

    def __init__(self, *, session_ttl_s: float = 300.0, clock: Callable[[], float] = time.monotonic,
                 bus_limit: int = 10_000, sweep_s: float = 5.0):
        self.session_ttl_s = session_ttl_s
        self._clock = clock
        self._bus_limit = bus_limit
        self._sweep_s = sweep_s
        self._next_sweep = 0.0
        self._data: dict[str, object] = {}      # key -> bytes | set | dict | _History
        self._deadline: dict[str, float] = {}   # key -> clock() when it expires
        self._beats: dict[str, float] = {}      # the `nodes` zset: node id -> last heartbeat
        self._where: dict[str, _Where] = {}
        self._listeners: dict[str, _Listener] = {}
        self._users = 0
        self._reader = RecordReader()
        self.detached = MemoryDetached(self)   # drained sessions waiting for their resume

    # ---- lifecycle

    async def start(self) -> None:
        self._users += 1

    async def close(self) -> None:
        """Counted: with several nodes on one instance, the last close stops the bus."""
        self._users -= 1
        if self._users <= 0:
            for node_id in list(self._listeners):
                await self.unlisten(node_id)

    @property
    def outlives_process(self) -> bool:
        """Its data ends with the process: a node drain offers no resume."""
        return False

    @property
    def available(self) -> bool:
        return True

    # ---- the key space, with Redis's expiry rules

    def _live(self, key: str):
        deadline = self._deadline.get(key)
        if deadline is not None and deadline <= self._clock():
            self._drop(key)
            return None
        return self._data.get(key)

    def _drop(self, key: str) -> None:
        self._data.pop(key, None)
        self._deadline.pop(key, None)

    def _set(self, key: str, value, ttl_s: float | None) -> None:
        self._data[key] = value
        if ttl_s is None:
            self._deadline.pop(key, None)
        else:
            self._deadline[key] = self._clock() + ttl_s

    def _expire(self, key: str, ttl_s: float) -> None:
        if self._live(key) is not None:
            self._deadline[key] = self._clock() + ttl_s

    def _index(self, key: str, kind: type):
        """An index set or hash, its TTL (re)set to the session TTL, as the Redis
        store does with each write: no index outlives every session in it."""
        c = self._live(key)
        if c is None:
            c = self._data[key] = kind()
        self._deadline[key] = self._clock() + self.session_ttl_s
        return c

    def _discard(self, key: str, member: str) -> None:
        # Like HDEL/SREM: the key goes when its last member does.
        c = self._live(key)
        if c is not None:
            if isinstance(c, dict):
                c.pop(member, None)
            else:
                c.discard(member)
            if not c:
                self._drop(key)

    def _sweep(self, force: bool = False) -> None:
        now = self._clock()
        if not force and now < self._next_sweep:
            return
        self._next_sweep = now + self._sweep_s
        for key in [k for k, d in self._deadline.items() if d <= now]:
            self._drop(key)
        for sid in [s for s in self._where if f"session:{s}" not in self._data]:
            del self._where[sid]

    # ---- this node

    async def heartbeat(self, node: dict, ttl_s: float, *, refresh: tuple[list[str], float] | None = None) -> None:
        node_id = node["id"]
        self._sweep(force=True)
        self._set(f"node:{node_id}", encode("node", node), ttl_s)
        self._beats[node_id] = self._clock()
        if refresh is not None:
            session_ids, session_ttl_s = refresh
            self.session_ttl_s = session_ttl_s
            keys = {f"node:{node_id}:sessions"}
            for sid in session_ids:
                keys.add(f"session:{sid}")
                w = self._where.get(sid)
                if w is not None:
                    if w.connection is not None:
                        keys.add(f"conn:{w.connection}")
                    if w.sub is not None:
                        keys.add(f"sub:{w.sub}")
                    keys.update(f"chan:{c}" for c in w.channels)
            for key in keys:
                self._expire(key, session_ttl_s)

    async def write(self, ops: list[Op]) -> None:
        self._sweep()
        for op in ops:
            if type(op) is Put:
                self._put(op.record)
            elif type(op) is Delete:
                self._delete(op.session, op.node, op.sub, op.channels)
            elif type(op) is Join:
                self._index(f"chan:{op.channel}", dict)[op.session] = orjson.dumps(op.member)
                w = self._where.get(op.session)
                if w is None:
                    w = self._where[op.session] = _Where(op.member.get("node"), op.member.get("conn"),
                                                         op.member.get("sub"), set())
                w.channels.add(op.channel)
            elif type(op) is Leave:
                self._discard(f"chan:{op.channel}", op.session)
                w = self._where.get(op.session)
                if w is not None:
                    w.channels.discard(op.channel)
            else:
                raise TypeError(f"not a store op: {op!r}")

    def _put(self, record: dict) -> None:
        sid, node, sub, conn = record["session"], record["node"], record.get("sub"), record.get("connection")
        channels = set(record.get("channels") or ())
        old = self._where.get(sid)
        if old is not None:
            # Replacing: drop the index entries the new record no longer has.
            if old.connection is not None and old.connection != conn:
                self._drop(f"conn:{old.connection}")
            if old.node != node:
                self._discard(f"node:{old.node}:sessions", sid)
            if old.sub is not None and old.sub != sub:
                self._discard(f"sub:{old.sub}", sid)
            for c in old.channels - channels:
                self._discard(f"chan:{c}", sid)
        self._set(f"session:{sid}", encode("session", record), self.session_ttl_s)
        if conn is not None:
            self._set(f"conn:{conn}", sid, self.session_ttl_s)
        self._index(f"node:{node}:sessions", set).add(sid)
        if sub is not None:
            self._index(f"sub:{sub}", dict)[sid] = node
        member = orjson.dumps(member_of(record))
        for c in channels:
            self._index(f"chan:{c}", dict)[sid] = member
        self._where[sid] = _Where(node, conn, sub, channels)

    def _delete(self, sid: str, node: str, sub: str | None, channels, conn: str | None = None) -> None:
        w = self._where.pop(sid, None)
        keys = {f"node:{node}:sessions"}
        if sub is not None:
            keys.add(f"sub:{sub}")
        keys.update(f"chan:{c}" for c in channels)
        if w is not None:
            conn = conn or w.connection
            keys.add(f"node:{w.node}:sessions")
            if w.sub is not None:
                keys.add(f"sub:{w.sub}")
            keys.update(f"chan:{c}" for c in w.channels)
        self._drop(f"session:{sid}")
        if conn is not None:
            self._drop(f"conn:{conn}")
        for key in keys:
            self._discard(key, sid)

    async def resync(self, node_id: str, records: list[dict]) -> None:
        keep = {r["session"] for r in records}
        for sid in list(self._live(f"node:{node_id}:sessions") or ()):
            if sid not in keep:
                rec = self._reader.decode("session", self._live(f"session:{sid}"), f"session:{sid}")
                self._delete(sid, node_id, rec and rec["sub"], (rec and rec["channels"]) or (),
                             rec and rec.get("connection"))
        for r in records:
            self._put(r)

    # ---- reading

    async def get_session(self, session_id: str) -> dict | None:
        key = f"session:{session_id}"
        return self._reader.decode("session", self._live(key), key)

    async def session_of_connection(self, connection_id: str) -> str | None:
        """The session id a connection id belongs to (the API takes either)."""
        return self._live(f"conn:{connection_id}")

    async def subject_sessions(self, sub: str) -> dict[str, str]:
        return dict(self._live(f"sub:{sub}") or {})

    async def channel_members(self, channel: str) -> dict[str, dict]:
        return {sid: orjson.loads(m) for sid, m in (self._live(f"chan:{channel}") or {}).items()}

    async def nodes(self) -> list[tuple[dict | None, float]]:
        now = self._clock()
        return [(self._reader.decode("node", self._live(f"node:{nid}"), f"node:{nid}"), now - t)
                for nid, t in self._beats.items()]

    # ---- dead nodes

    async def expired_nodes(self, older_than_s: float) -> list[str]:
        cutoff = self._clock() - older_than_s
        return [nid for nid, t in self._beats.items() if t < cutoff]

    async def claim(self, name: str, ttl_s: float) -> bool:
        """`name` is the key: the reaper claims `reap:{node id}`."""
        key = name
        if self._live(key) is not None:
            return False
        self._set(key, b"1", ttl_s)
        return True

    async def node_sessions(self, node_id: str) -> list[str]:
        return list(self._live(f"node:{node_id}:sessions") or ())

    async def node_session_count(self, node_id: str) -> int:
        return len(self._live(f"node:{node_id}:sessions") or ())

    async def take_session(self, session_id: str) -> dict | None:
        key = f"session:{session_id}"
        raw = self._live(key)
        if raw is None:
            return None
        try:
            rec = decode("session", raw)
        except RecordVersionError as e:
            # Not ours to take: leave it for a node that can read it.
            self._reader.too_new(key, e)
            return None
        w = self._where.get(session_id)
        if rec is None:
            self._drop(key)
            return None
        channels = set(rec["channels"]) | (w.channels if w is not None else set())
        self._delete(session_id, rec["node"], rec["sub"], channels, rec.get("connection"))
        return rec

    async def forget_node(self, node_id: str) -> None:
        self._drop(f"node:{node_id}")
        self._drop(f"node:{node_id}:sessions")
        self._beats.pop(node_id, None)

    # ---- cross-node delivery

    async def publish(self, node_id: str, data: bytes) -> int:
        """Queued, never called re-entrantly: the handler runs on a later loop turn,
        in publish order, as it would after a round trip through Redis."""
        listener = self._listeners.get(node_id)
        if listener is None:
            return 0
        try:
            listener.queue.put_nowait(data)
        except asyncio.QueueFull:
            # Redis drops a subscriber that falls this far behind; drop the message.
            log.warning("bus queue full, message dropped", extra={"fields": {
                "event": "bus_overflow", "node": node_id, "limit": self._bus_limit}})
            return 0
        return 1

    async def listen(self, node_id: str, handler: BusHandler) -> None:
        await self.unlisten(node_id)
        queue: asyncio.Queue = asyncio.Queue(self._bus_limit)
        task = asyncio.get_running_loop().create_task(self._pump(node_id, queue, handler))
        self._listeners[node_id] = _Listener(queue, task)

    async def unlisten(self, node_id: str) -> None:
        """Stop delivering `node_id`'s bus (a node sharing this instance stops)."""
        listener = self._listeners.pop(node_id, None)
        if listener is not None:
            listener.task.cancel()
            try:
                await listener.task
            except asyncio.CancelledError:
                pass

    @staticmethod
    async def _pump(node_id: str, queue: asyncio.Queue, handler: BusHandler) -> None:
        while True:
            data = await queue.get()
            try:
                result = handler(data)
                if inspect.isawaitable(result):
                    await result
            except Exception:
                log.exception("bus handler failed", extra={"fields": {"event": "bus_handler_error", "node": node_id}})

    # ---- channel history

    async def history_append(self, channel: str, opcode: int, payload: bytes, size: int,
                             ttl_s: float) -> tuple[int, str]:
        key = f"hist:{channel}"
        h = self._live(key)
        if h is None:
            h = _History(size)
        elif h.entries.maxlen != size:
            h.entries = deque(h.entries, maxlen=size)
        h.offset += 1
        h.entries.append(HistoryEntry(h.offset, opcode, bytes(payload)))
        self._set(key, h, ttl_s)
        return h.offset, h.epoch

    async def history_since(self, channel: str, since: int, epoch: str | None, limit: int) -> HistoryPage:
        h = self._live(f"hist:{channel}")
        current, offset = (h.epoch, h.offset) if h is not None else ("", 0)
        if epoch is not None and epoch != current:
            raise HistoryEpochChanged(f"channel {channel!r} history epoch changed; read again from offset 0",
                                      epoch=current, offset=offset)
        if since >= offset:
            return HistoryPage(current, offset)
        if not h.entries or h.entries[0].offset > since + 1:
            oldest = h.entries[0].offset if h.entries else offset + 1
            raise HistoryTrimmed(f"channel {channel!r} history after offset {since} was trimmed "
                                 f"(oldest held is {oldest})", epoch=current, offset=offset)
        first = since + 1 - h.entries[0].offset
        entries = [h.entries[i] for i in range(first, min(first + max(limit, 0), len(h.entries)))]
        return HistoryPage(current, offset, entries)

    # ---- draining endpoints (reattach); `until` is this store's clock

    async def set_endpoint_draining(self, backend: str, url: str, ttl_s: float) -> None:
        key = f"ep:{backend}"
        drains = self._live(key) or {}
        drains[url] = self._clock() + ttl_s
        self._set(key, drains, max(drains.values()) - self._clock())   # the key outlives its latest drain

    async def clear_endpoint_draining(self, backend: str, url: str) -> None:
        self._discard(f"ep:{backend}", url)

    async def draining_endpoints(self, backend: str) -> set[str]:
        now = self._clock()
        return {url for url, until in (self._live(f"ep:{backend}") or {}).items() if until > now}
