"""The Redis store: a fleet of nodes sharing one Redis, or a Sentinel set.

Keys are laid out as base.py's docstring says, every one under `key_prefix`.
Each method is one round trip where it can be (a pipeline with
transaction=False, or a Lua script where the steps depend on each other), so
a node's lifecycle traffic stays small and a Redis outage is seen at once:
socket timeouts are `timeout_s`, no command is retried (a retried append
would append twice), and a whole call is cut off at 2 x `timeout_s`. Every
connection or timeout error becomes `errors.StoreUnavailable`, and
`available` says what the last call found. Two methods do not raise, so that
a node can start while Redis is away: `start()` and `listen()` report it
through `available`, and the bus subscriber keeps trying in the background.

Time: heartbeat times in the `nodes` zset are the writing node's unix time
(time.time()), and ages are computed with the reading node's clock, so
nodes' clocks must agree to well within the node TTL (NTP does). Redis's own
TIME would need a second round trip per heartbeat.

With `sentinel=(master_name, [(host, port), ...])` the client asks the
sentinels for the master on every new connection, so after a failover the
same RedisStore follows the new master without a restart; calls made during
the failover raise StoreUnavailable.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import logging
import secrets
import time

import orjson
from redis import exceptions as rx
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel, SentinelConnectionPool
from redis.backoff import NoBackoff

from .. import metrics
from ..errors import HistoryEpochChanged, HistoryTrimmed, RecordVersionError, StoreUnavailable
from ..records import decode, encode
from .base import BusHandler, Delete, HistoryEntry, HistoryPage, Join, Leave, Op, Put
from .memory import RecordReader, member_of
from .redis_detached import RedisDetached

log = logging.getLogger("gateway.store")

# What "Redis cannot be reached" looks like. READONLY and MASTERDOWN: we are
# talking to a replica (a failover is under way), which is an outage to us.
_DOWN = (rx.ConnectionError, rx.TimeoutError, rx.ReadOnlyError, rx.MasterDownError, OSError, TimeoutError)

# KEYS: stream, meta. ARGV: opcode, payload, size, ttl_ms, epoch to use if the meta is gone.
# A missing meta means the history was lost (flush, failover, expiry): start a
# new epoch and drop any stream left over, whose ids would clash with offset 1.
_APPEND = """
local epoch = redis.call('HGET', KEYS[2], 'epoch')
if not epoch then
  epoch = ARGV[5]
  redis.call('DEL', KEYS[1])
  redis.call('HSET', KEYS[2], 'epoch', epoch, 'offset', 0)
end
local offset = redis.call('HINCRBY', KEYS[2], 'offset', 1)
redis.call('XADD', KEYS[1], 'MAXLEN', ARGV[3], offset .. '-0', 'opcode', ARGV[1], 'payload', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[4])
redis.call('PEXPIRE', KEYS[2], ARGV[4])
return {offset, epoch}
"""

# KEYS: the nodes zset. ARGV: the node record key prefix. The record keys are
# named by the zset's content, so a pipeline cannot read both in one trip.
_NODES = """
local ids = redis.call('ZRANGE', KEYS[1], 0, -1, 'WITHSCORES')
local out = {}
for i = 1, #ids, 2 do
  out[#out + 1] = ids[i]
  out[#out + 1] = ids[i + 1]
  out[#out + 1] = redis.call('GET', ARGV[1] .. ids[i])
end
return out
"""


POOL_SIZE = 100   # Redis connections per node (per worker) for commands; the bus has its own


class _SentinelBlockingPool(SentinelConnectionPool, BlockingConnectionPool):
    """The Sentinel pool (it asks the sentinels for the master), waiting for a free
    connection instead of raising when all are in use."""


def _ms(seconds: float) -> int:
    return max(1, int(seconds * 1000))


def _s(raw) -> str:
    return raw.decode() if isinstance(raw, bytes) else str(raw)


class _Where:
    """Which connection, subject and channel keys a session of this node
    appears in: the heartbeat's refresh re-expires them, and a Delete removes
    them, without reading the record back."""
    __slots__ = ("connection", "sub", "channels")

    def __init__(self, connection: str | None, sub: str | None, channels: set[str]):
        self.connection = connection
        self.sub = sub
        self.channels = channels


class RedisStore:
    """See the module docstring. Exactly one of `url` and `sentinel`."""

    def __init__(self, url: str | None = None, *, sentinel: tuple[str, list[tuple[str, int]]] | None = None,
                 key_prefix: str = "gw:", timeout_s: float = 1.0, session_ttl_s: float = 300.0,
                 bus_idle_s: float = 5.0):
        if (url is None) == (sentinel is None):
            raise ValueError("RedisStore needs exactly one of url, sentinel")
        self.url = url
        self.sentinel = sentinel
        self.key_prefix = key_prefix
        self.timeout_s = timeout_s
        self.session_ttl_s = session_ttl_s
        self._bus_idle_s = bus_idle_s         # PING the bus connection after this much silence
        self._call_limit_s = 2 * timeout_s
        self._available = True
        self._redis: Redis | None = None
        self._sentinel: Sentinel | None = None
        self._append = None
        self._nodes = None
        self._where: dict[str, _Where] = {}
        # Dropped from _where by the last refresh, kept one more cycle: a
        # Delete already queued for a just-closed session still finds its channels.
        self._retired: dict[str, _Where] = {}
        self._reader = RecordReader()
        self._bus: dict[bytes, BusHandler] = {}     # prefixed bus channel -> handler
        self._bus_task: asyncio.Task | None = None
        self.detached = RedisDetached(self)    # drained sessions waiting for their resume

    # ---- lifecycle

    async def start(self) -> None:
        """Connects lazily: a Redis that is down at start is reported by
        `available` and by the first call, and does not stop the node starting."""
        if self.sentinel is not None:
            kw = self._client_kwargs()
            self._sentinel = Sentinel([tuple(a) for a in self.sentinel[1]], sentinel_kwargs=dict(kw), **kw)
        self._redis = self._client()
        self._append = self._redis.register_script(_APPEND)
        self._nodes = self._redis.register_script(_NODES)
        try:
            async with self._guard("start"):
                await self._redis.ping()
        except StoreUnavailable:
            pass

    def _client_kwargs(self) -> dict:
        # RESP2: with RESP3, redis-py 8 turns on "maintenance notifications"
        # and then skips its check for dead pooled connections, so the first
        # call on each idle connection after a Redis restart fails (seen in tests).
        return {"socket_timeout": self.timeout_s, "socket_connect_timeout": self.timeout_s,
                "retry": Retry(NoBackoff(), 0), "protocol": 2}

    def _client(self) -> Redis:
        # A blocking pool: past POOL_SIZE connections in use a call waits (up to
        # timeout_s) for one to come free. The default pool raises at once, which
        # turned a burst (a drain of thousands of sessions, a resume storm) into
        # "store unavailable" although Redis was fine.
        if self._sentinel is not None:
            return self._sentinel.master_for(self.sentinel[0], connection_pool_class=_SentinelBlockingPool,
                                             max_connections=POOL_SIZE, timeout=self.timeout_s)
        pool = BlockingConnectionPool.from_url(self.url, max_connections=POOL_SIZE, timeout=self.timeout_s,
                                               **self._client_kwargs())
        return Redis.from_pool(pool)

    async def close(self) -> None:
        await self._stop_bus()
        if self._redis is not None:
            await self._redis.aclose()
        if self._sentinel is not None:
            await self._sentinel.aclose()

    @property
    def outlives_process(self) -> bool:
        """Detached sessions outlive the node that drained them."""
        return True

    @property
    def available(self) -> bool:
        return self._available

    # ---- failures

    @contextlib.asynccontextmanager
    async def _guard(self, what: str):
        seconds, errors = metrics.store_op(what)
        t0 = time.monotonic()
        try:
            async with asyncio.timeout(self._call_limit_s):
                yield
        except _DOWN as e:
            errors.inc()
            self._down(what, e)
            raise StoreUnavailable(f"redis unreachable ({what}): {type(e).__name__}: {e}") from e
        finally:
            seconds.observe(time.monotonic() - t0)
        self._up()

    def _down(self, what: str, e: BaseException) -> None:
        if self._available:
            self._available = False
            log.warning("redis unreachable", extra={"fields": {
                "event": "redis_unreachable", "op": what, "error": f"{type(e).__name__}: {e}"}})

    def _up(self) -> None:
        if not self._available:
            self._available = True
            log.info("redis reachable again", extra={"fields": {"event": "redis_reachable"}})

    def _k(self, name: str) -> str:
        return self.key_prefix + name

    # ---- this node

    async def heartbeat(self, node: dict, ttl_s: float, *, refresh: tuple[list[str], float] | None = None) -> None:
        """One pipeline of 2 commands (SET, ZADD), plus with `refresh` 1 + 2N + K
        PEXPIREs: the node's session set, the N session records and their N
        connection keys, and the K distinct subject and channel keys they
        appear in. The refresh list is taken to be all of the node's
        sessions: what this store remembers about any other is forgotten
        after the next refresh."""
        node_id = node["id"]
        p = self._redis.pipeline(transaction=False)
        p.set(self._k(f"node:{node_id}"), encode("node", node), px=_ms(ttl_s))
        p.zadd(self._k("nodes"), {node_id: time.time()})
        if refresh is not None:
            session_ids, session_ttl_s = refresh
            self.session_ttl_s = session_ttl_s
            px = _ms(session_ttl_s)
            p.pexpire(self._k(f"node:{node_id}:sessions"), px)
            index_keys = set()
            where = {}
            for sid in session_ids:
                p.pexpire(self._k(f"session:{sid}"), px)
                w = self._where.get(sid)
                if w is not None:
                    where[sid] = w
                    if w.connection is not None:
                        p.pexpire(self._k(f"conn:{w.connection}"), px)
                    if w.sub is not None:
                        index_keys.add(f"sub:{w.sub}")
                    index_keys.update(f"chan:{c}" for c in w.channels)
            for key in index_keys:
                p.pexpire(self._k(key), px)
            self._retired = {sid: w for sid, w in self._where.items() if sid not in where}
            self._where = where
        async with self._guard("heartbeat"):
            await p.execute()

    async def write(self, ops: list[Op]) -> None:
        if not ops:
            return
        p = self._redis.pipeline(transaction=False)
        for op in ops:
            self._queue(p, op)
        async with self._guard("write"):
            await p.execute()

    def _queue(self, p, op: Op) -> None:
        px = _ms(self.session_ttl_s)
        if type(op) is Put:
            rec = op.record
            sid, node, sub, conn = rec["session"], rec["node"], rec.get("sub"), rec.get("connection")
            channels = set(rec.get("channels") or ())
            old = self._where.get(sid) or self._retired.pop(sid, None)
            if old is not None:
                # Replacing: drop the index entries the new record no longer has.
                if old.connection is not None and old.connection != conn:
                    p.delete(self._k(f"conn:{old.connection}"))
                if old.sub is not None and old.sub != sub:
                    p.hdel(self._k(f"sub:{old.sub}"), sid)
                for c in old.channels - channels:
                    p.hdel(self._k(f"chan:{c}"), sid)
            p.set(self._k(f"session:{sid}"), encode("session", rec), px=px)
            if conn is not None:
                p.set(self._k(f"conn:{conn}"), sid, px=px)
            # Index keys get the session TTL too, so none outlives every
            # session in it if its nodes die unreaped.
            key = self._k(f"node:{node}:sessions")
            p.sadd(key, sid)
            p.pexpire(key, px)
            if sub is not None:
                key = self._k(f"sub:{sub}")
                p.hset(key, sid, node)
                p.pexpire(key, px)
            if channels:
                member = orjson.dumps(member_of(rec))
                for c in channels:
                    key = self._k(f"chan:{c}")
                    p.hset(key, sid, member)
                    p.pexpire(key, px)
            self.remember(rec)
        elif type(op) is Delete:
            self._queue_delete(p, op.session, op.node, op.sub, op.channels)
        elif type(op) is Join:
            key = self._k(f"chan:{op.channel}")
            p.hset(key, op.session, orjson.dumps(op.member))
            p.pexpire(key, px)
            w = self._where.get(op.session)
            if w is None:
                w = self._where[op.session] = _Where(op.member.get("conn"), op.member.get("sub"), set())
            w.channels.add(op.channel)
        elif type(op) is Leave:
            p.hdel(self._k(f"chan:{op.channel}"), op.session)
            w = self._where.get(op.session)
            if w is not None:
                w.channels.discard(op.channel)
        else:
            raise TypeError(f"not a store op: {op!r}")

    def remember(self, rec: dict) -> None:
        """`rec`'s session is this node's, as written: the heartbeat refreshes its keys, a Delete removes them."""
        self._where[rec["session"]] = _Where(rec.get("connection"), rec.get("sub"), set(rec.get("channels") or ()))

    def _queue_delete(self, p, sid: str, node: str, sub: str | None, channels, conn: str | None = None) -> None:
        w = self._where.pop(sid, None) or self._retired.pop(sid, None)
        subs = {sub} if sub is not None else set()
        chans = set(channels)
        if w is not None:
            if w.sub is not None:
                subs.add(w.sub)
            chans |= w.channels
            conn = conn or w.connection
        p.delete(self._k(f"session:{sid}"))
        if conn is not None:
            p.delete(self._k(f"conn:{conn}"))
        p.srem(self._k(f"node:{node}:sessions"), sid)
        for s in subs:
            p.hdel(self._k(f"sub:{s}"), sid)
        for c in chans:
            p.hdel(self._k(f"chan:{c}"), sid)

    async def resync(self, node_id: str, records: list[dict]) -> None:
        """Three round trips: the node's session set, the records it names and
        the new ones (to remove index entries they no longer have), the writes."""
        async with self._guard("resync"):
            existing = {_s(m) for m in await self._redis.smembers(self._k(f"node:{node_id}:sessions"))}
            ids = sorted(existing | {r["session"] for r in records})
            raws = await self._redis.mget([self._k(f"session:{sid}") for sid in ids]) if ids else []
            # What the store holds, not what we remember writing: that may not have arrived.
            self._where, self._retired = {}, {}
            for sid, raw in zip(ids, raws):
                old = self._reader.decode("session", raw, self._k(f"session:{sid}"))
                if old is not None:
                    self._where[sid] = _Where(old.get("connection"), old["sub"], set(old["channels"] or ()))
            keep = {r["session"] for r in records}
            p = self._redis.pipeline(transaction=False)
            for sid in existing - keep:
                self._queue_delete(p, sid, node_id, None, ())
            for r in records:
                self._queue(p, Put(r))
            await p.execute()

    # ---- reading

    async def get_session(self, session_id: str) -> dict | None:
        key = self._k(f"session:{session_id}")
        async with self._guard("get_session"):
            raw = await self._redis.get(key)
        return self._reader.decode("session", raw, key)

    async def session_of_connection(self, connection_id: str) -> str | None:
        """The session id a connection id belongs to (the API takes either)."""
        async with self._guard("session_of_connection"):
            sid = await self._redis.get(self._k(f"conn:{connection_id}"))
        return _s(sid) if sid is not None else None

    async def subject_sessions(self, sub: str) -> dict[str, str]:
        async with self._guard("subject_sessions"):
            h = await self._redis.hgetall(self._k(f"sub:{sub}"))
        return {_s(k): _s(v) for k, v in h.items()}

    async def channel_members(self, channel: str) -> dict[str, dict]:
        async with self._guard("channel_members"):
            h = await self._redis.hgetall(self._k(f"chan:{channel}"))
        out = {}
        for k, v in h.items():
            try:
                out[_s(k)] = orjson.loads(v)
            except orjson.JSONDecodeError:
                continue
        return out

    async def nodes(self) -> list[tuple[dict | None, float]]:
        """One round trip (a read-only Lua script): the zset and every node record."""
        async with self._guard("nodes"):
            flat = await self._nodes(keys=[self._k("nodes")], args=[self._k("node:")])
        now = time.time()
        out = []
        for i in range(0, len(flat), 3):
            node_id, score, raw = _s(flat[i]), float(flat[i + 1]), flat[i + 2] or None
            out.append((self._reader.decode("node", raw, self._k(f"node:{node_id}")), max(0.0, now - score)))
        return out

    # ---- dead nodes

    async def expired_nodes(self, older_than_s: float) -> list[str]:
        cutoff = time.time() - older_than_s
        async with self._guard("expired_nodes"):
            ids = await self._redis.zrangebyscore(self._k("nodes"), "-inf", f"({cutoff!r}")
        return [_s(i) for i in ids]

    async def claim(self, name: str, ttl_s: float) -> bool:
        """`name` is the key below the prefix: the reaper claims `reap:{node id}`."""
        async with self._guard("claim"):
            return bool(await self._redis.set(self._k(name), b"1", nx=True, px=_ms(ttl_s)))

    async def node_sessions(self, node_id: str) -> list[str]:
        async with self._guard("node_sessions"):
            return [_s(m) for m in await self._redis.smembers(self._k(f"node:{node_id}:sessions"))]

    async def node_session_count(self, node_id: str) -> int:
        async with self._guard("node_session_count"):
            return int(await self._redis.scard(self._k(f"node:{node_id}:sessions")))

    async def take_session(self, session_id: str) -> dict | None:
        """GETDEL, then the index entries (a second round trip; only the taker gets there)."""
        key = self._k(f"session:{session_id}")
        async with self._guard("take_session"):
            raw = await self._redis.getdel(key)
            if raw is None:
                return None
            try:
                rec = decode("session", raw)
            except RecordVersionError as e:
                # Not ours to take: put it back for a node that can read it.
                self._reader.too_new(key, e)
                await self._redis.set(key, raw, nx=True, px=_ms(self.session_ttl_s))
                return None
            if rec is None:
                return None
            p = self._redis.pipeline(transaction=False)
            self._queue_delete(p, session_id, rec["node"], rec["sub"], rec["channels"] or (), rec.get("connection"))
            await p.execute()
        return rec

    async def forget_node(self, node_id: str) -> None:
        p = self._redis.pipeline(transaction=False)
        p.delete(self._k(f"node:{node_id}"), self._k(f"node:{node_id}:sessions"))
        p.zrem(self._k("nodes"), node_id)
        async with self._guard("forget_node"):
            await p.execute()

    # ---- cross-node delivery

    async def publish(self, node_id: str, data: bytes) -> int:
        async with self._guard("publish"):
            return int(await self._redis.publish(self._k(f"bus:{node_id}"), data))

    async def listen(self, node_id: str, handler: BusHandler) -> None:
        """Returns once subscribed, or after 2 x timeout_s with `available`
        False if Redis is down: the subscriber keeps trying in the background
        (0.1 s doubling to 5 s), as it does whenever the connection is lost
        later, so a node can start while Redis is away. close() stops it."""
        self._bus[self._k(f"bus:{node_id}").encode()] = handler
        await self._restart_bus()

    async def unlisten(self, node_id: str) -> None:
        """Stop delivering `node_id`'s bus."""
        if self._bus.pop(self._k(f"bus:{node_id}").encode(), None) is not None:
            await self._restart_bus()

    async def _restart_bus(self) -> None:
        # Subscriptions change once or twice in a node's life: a fresh
        # subscriber is simpler than changing one while it reads.
        await self._stop_bus()
        if not self._bus:
            return
        ready = asyncio.Event()
        self._bus_task = asyncio.get_running_loop().create_task(self._bus_loop(ready))
        try:
            async with asyncio.timeout(self._call_limit_s):
                await ready.wait()
        except TimeoutError:
            self._down("listen", TimeoutError("not subscribed yet; retrying in the background"))

    async def _stop_bus(self) -> None:
        task, self._bus_task = self._bus_task, None
        if task is not None:
            task.cancel()
            # Bounded: a close must not hang on a subscriber stuck in a client library.
            await asyncio.wait({task}, timeout=self._call_limit_s + 1.0)
            if not task.done():
                log.error("bus subscriber did not stop", extra={"fields": {"event": "bus_stop_timeout"}})

    async def _bus_loop(self, ready: asyncio.Event) -> None:
        loop = asyncio.get_running_loop()
        delay = 0.1
        while True:
            # A client of its own for each attempt, so that tearing a broken
            # subscriber down never touches the connections commands use.
            client = self._client()
            pubsub = client.pubsub()
            try:
                async with asyncio.timeout(self._call_limit_s):
                    await pubsub.subscribe(*self._bus)
                    pending = set(self._bus)
                    while pending:
                        msg = await pubsub.get_message(timeout=self.timeout_s)
                        if msg is None:
                            continue
                        if msg["type"] == "subscribe":
                            pending.discard(msg["channel"])
                        elif msg["type"] == "message":
                            await self._deliver(msg["channel"], msg["data"])
                self._up()
                ready.set()
                delay = 0.1
                heard = loop.time()
                pinged = False
                while True:
                    msg = await pubsub.get_message(timeout=self._bus_idle_s)
                    now = loop.time()
                    if msg is None:
                        # A silent connection may be a dead one (no FIN on a
                        # partition): ask, and give up if the answer does not come.
                        if pinged and now - heard > self._bus_idle_s + self.timeout_s:
                            raise rx.ConnectionError("no answer to PING on the bus connection")
                        if not pinged and now - heard >= self._bus_idle_s:
                            await pubsub.ping()
                            pinged = True
                        continue
                    heard, pinged = now, False
                    if msg["type"] == "message":
                        await self._deliver(msg["channel"], msg["data"])
            except _DOWN as e:
                # redis-py and asyncio.timeout can turn our own cancellation
                # into a timeout error: close() must still stop this loop.
                if asyncio.current_task().cancelling():
                    raise asyncio.CancelledError from e
                self._down("listen", e)
            except Exception:
                if asyncio.current_task().cancelling():
                    raise asyncio.CancelledError from None
                # Not an outage (a client bug, a protocol surprise): say so, and
                # keep the bus alive all the same.
                log.exception("bus subscriber failed", extra={"fields": {"event": "bus_error"}})
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            # Closed before waiting: a half-dead subscriber left open would take
            # (and lose) messages published meanwhile.
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _deliver(self, channel: bytes, data: bytes) -> None:
        # In order, one at a time: messages to a session keep their order.
        handler = self._bus.get(channel)
        if handler is None:
            return
        try:
            result = handler(data)
            if inspect.isawaitable(result):
                await result
        except Exception:
            log.exception("bus handler failed", extra={"fields": {"event": "bus_handler_error",
                                                                  "channel": _s(channel)}})

    # ---- channel history

    async def history_append(self, channel: str, opcode: int, payload: bytes, size: int,
                             ttl_s: float) -> tuple[int, str]:
        """One atomic script; see _APPEND."""
        async with self._guard("history_append"):
            offset, epoch = await self._append(
                keys=[self._k(f"hist:{channel}"), self._k(f"hist:{channel}:meta")],
                args=[opcode, payload, max(1, size), _ms(ttl_s), secrets.token_hex(8)])
        return int(offset), _s(epoch)

    async def history_since(self, channel: str, since: int, epoch: str | None, limit: int) -> HistoryPage:
        """One MULTI/EXEC, so the meta, the oldest entry and the page agree."""
        since = max(0, since)
        stream = self._k(f"hist:{channel}")
        p = self._redis.pipeline(transaction=True)
        p.hmget(self._k(f"hist:{channel}:meta"), "epoch", "offset")
        p.xrange(stream, "-", "+", count=1)
        if limit > 0:
            p.xrange(stream, f"{since + 1}-0", "+", count=limit)
        async with self._guard("history_since"):
            results = await p.execute()
        (raw_epoch, raw_offset), oldest = results[0], results[1]
        page = results[2] if limit > 0 else []
        current = _s(raw_epoch) if raw_epoch is not None else ""
        offset = int(raw_offset) if raw_offset is not None else 0
        if epoch is not None and epoch != current:
            raise HistoryEpochChanged(f"channel {channel!r} history epoch changed; read again from offset 0",
                                      epoch=current, offset=offset)
        if since >= offset:
            return HistoryPage(current, offset)
        first = _entry_offset(oldest[0][0]) if oldest else offset + 1
        if first > since + 1:
            raise HistoryTrimmed(f"channel {channel!r} history after offset {since} was trimmed "
                                 f"(oldest held is {first})", epoch=current, offset=offset)
        entries = [HistoryEntry(_entry_offset(eid), int(f[b"opcode"]), f[b"payload"]) for eid, f in page]
        return HistoryPage(current, offset, entries)

    # ---- draining endpoints (reattach): a hash URL -> unix time the drain ends

    async def set_endpoint_draining(self, backend: str, url: str, ttl_s: float) -> None:
        """One script: the field, and the key's TTL kept past its latest drain. (Drains
        are rare: the script object is made per call, bound to the current client.)"""
        script = self._redis.register_script(_DRAIN)
        async with self._guard("set_endpoint_draining"):
            await script(keys=[self._k(f"ep:{backend}")], args=[url, repr(time.time() + ttl_s), _ms(ttl_s)])

    async def clear_endpoint_draining(self, backend: str, url: str) -> None:
        async with self._guard("clear_endpoint_draining"):
            await self._redis.hdel(self._k(f"ep:{backend}"), url)

    async def draining_endpoints(self, backend: str) -> set[str]:
        async with self._guard("draining_endpoints"):
            h = await self._redis.hgetall(self._k(f"ep:{backend}"))
        now = time.time()
        out = set()
        for url, until in h.items():
            try:
                if float(until) > now:
                    out.add(_s(url))
            except ValueError:
                continue
        return out


# KEYS: the endpoint hash. ARGV: url, unix time its drain ends, ttl_ms.
_DRAIN = """
redis.call('HSET', KEYS[1], ARGV[1], ARGV[2])
if redis.call('PTTL', KEYS[1]) < tonumber(ARGV[3]) then
  redis.call('PEXPIRE', KEYS[1], ARGV[3])
end
return 1
"""


def _entry_offset(entry_id) -> int:
    return int(_s(entry_id).partition("-")[0])
