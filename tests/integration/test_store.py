"""The store contract, against both stores: MemoryStore and RedisStore on a real
redis-server (tests/redisproc.py). "Two nodes" are two RedisStore objects on one
server, or two in-process nodes sharing one MemoryStore. Redis outages and a
Sentinel failover are Redis-only. Every wait polls, bounded."""

from __future__ import annotations

import asyncio
import functools
import logging
import time

import pytest
from redis import exceptions as rx

from gateway.errors import HistoryEpochChanged, HistoryTrimmed, StoreUnavailable
from gateway.store import Delete, Join, Leave, MemoryStore, Put, RedisStore

from ..helpers import until

PREFIX = "t:"


def rec(sid: str, node: str = "na", sub: str | None = "u1", channels=(), **kw) -> dict:
    return {"session": sid, "connection": f"conn-{sid}", "node": node, "sub": sub, "channels": list(channels), **kw}


# Store calls answer in milliseconds: 3 s is a generous bound.
eventually = functools.partial(until, timeout_s=3.0)
# A hang guard, not a measure: a call that would wait on a Redis that is away fails
# here instead of hanging. The stores in these tests give up after 2 x 0.5 s.
HANG_S = 10.0


class Cluster:
    """Stores for several nodes over one backing store, plus what a test needs
    to do to that backing store behind the stores' backs."""

    def __init__(self, kind: str, server=None):
        self.kind = kind
        self.server = server
        self.shared = MemoryStore() if kind == "memory" else None
        self.opened: list = []

    async def node(self, **kw):
        if self.kind == "memory":
            store = self.shared
            if "session_ttl_s" in kw:
                store.session_ttl_s = kw["session_ttl_s"]
        else:
            kw.setdefault("timeout_s", 0.5)
            store = RedisStore(self.server.url, key_prefix=PREFIX, **kw)
        await store.start()
        self.opened.append(store)
        return store

    def lose_history(self) -> None:
        """What a flush, an unpersisted restart or a failover to an empty replica does."""
        if self.kind == "memory":
            for key in [k for k in self.shared._data if k.startswith("hist:")]:
                self.shared._drop(key)
        else:
            with self.server.client() as c:
                c.flushall()

    def put_raw(self, name: str, raw: bytes) -> None:
        """Write a record as another (newer) gateway would, bypassing the codec."""
        if self.kind == "memory":
            self.shared._set(name, raw, 60)
        else:
            with self.server.client() as c:
                c.set(PREFIX + name, raw, ex=60)

    def has_raw(self, name: str) -> bool:
        if self.kind == "memory":
            return self.shared._live(name) is not None
        with self.server.client() as c:
            return bool(c.exists(PREFIX + name))

    async def close(self) -> None:
        for store in reversed(self.opened):
            await store.close()


@pytest.fixture(params=["memory", "redis"])
async def cluster(request):
    server = request.getfixturevalue("redis_server") if request.param == "redis" else None
    c = Cluster(request.param, server)
    yield c
    await c.close()


@pytest.fixture
async def redis_cluster(redis_server):
    c = Cluster("redis", redis_server)
    yield c
    await c.close()


# ---- sessions and their indexes

async def test_put_get_delete_keeps_indexes(cluster):
    a = await cluster.node()
    b = await cluster.node()
    await a.write([Put(rec("s1", channels=["c1", "c2"])), Put(rec("s2", sub="u2", channels=["c1"]))])

    got = await b.get_session("s1")
    assert got["session"] == "s1" and got["node"] == "na" and got["channels"] == ["c1", "c2"]
    assert got["state"] == "connected"      # a default filled in by gateway.records
    assert sorted(await b.node_sessions("na")) == ["s1", "s2"]
    assert await b.subject_sessions("u1") == {"s1": "na"}
    assert await b.channel_members("c1") == {"s1": {"node": "na", "conn": "conn-s1", "sub": "u1"},
                                              "s2": {"node": "na", "conn": "conn-s2", "sub": "u2"}}

    await a.write([Delete("s1", "na", "u1")])        # the channels are the store's to remember
    assert await b.get_session("s1") is None
    assert await b.node_sessions("na") == ["s2"]
    assert await b.subject_sessions("u1") == {}
    assert set(await b.channel_members("c1")) == {"s2"}
    assert await b.channel_members("c2") == {}
    assert await b.get_session("nope") is None
    # Another node's store knows nothing of s2's channels: the op names them.
    await b.write([Delete("s2", "na", "u2", ("c1",))])
    assert await a.channel_members("c1") == {} and await a.node_sessions("na") == []


async def test_a_connection_id_leads_to_its_session(cluster):
    a = await cluster.node()
    b = await cluster.node()
    await a.write([Put(rec("s1"))])
    assert await b.session_of_connection("conn-s1") == "s1"
    # Resumed on another node with a new connection: the old id leads nowhere.
    taken = await b.take_session("s1")
    await b.write([Put({**taken, "node": "nb", "connection": "conn-new"})])
    assert await a.session_of_connection("conn-s1") is None
    assert await a.session_of_connection("conn-new") == "s1"
    await b.write([Delete("s1", "nb", "u1")])
    assert await a.session_of_connection("conn-new") is None
    assert await a.session_of_connection("never") is None


async def test_put_replacing_a_record_drops_index_entries_it_no_longer_has(cluster):
    a = await cluster.node()
    await a.write([Put(rec("s1", channels=["c1", "c2"]))])
    await a.write([Put(rec("s1", sub="u9", channels=["c2", "c3"]))])
    assert await a.channel_members("c1") == {}
    assert set(await a.channel_members("c2")) == set(await a.channel_members("c3")) == {"s1"}
    assert await a.subject_sessions("u1") == {}
    assert await a.subject_sessions("u9") == {"s1": "na"}


async def test_join_and_leave_change_channel_members(cluster):
    a = await cluster.node()
    b = await cluster.node()
    await a.write([Put(rec("s1")), Join("s1", "room", {"node": "na", "conn": "conn-s1", "sub": "u1"})])
    await b.write([Put(rec("s2", node="nb", sub="u2")), Join("s2", "room", {"node": "nb", "conn": "conn-s2", "sub": "u2"})])
    members = await a.channel_members("room")
    assert members == {"s1": {"node": "na", "conn": "conn-s1", "sub": "u1"},
                       "s2": {"node": "nb", "conn": "conn-s2", "sub": "u2"}}
    await a.write([Leave("s1", "room")])
    assert set(await b.channel_members("room")) == {"s2"}
    await b.write([Leave("s2", "room")])
    assert await a.channel_members("room") == {}


async def test_subject_sessions_span_nodes(cluster):
    a = await cluster.node()
    b = await cluster.node()
    await a.write([Put(rec("s1", sub="alice"))])
    await b.write([Put(rec("s2", node="nb", sub="alice")), Put(rec("s3", node="nb", sub="bob"))])
    assert await a.subject_sessions("alice") == {"s1": "na", "s2": "nb"}
    assert await a.subject_sessions("bob") == {"s3": "nb"}
    assert await a.subject_sessions("carol") == {}


# ---- nodes, heartbeats, expiry

async def test_heartbeat_lists_nodes_and_a_silent_one_expires(cluster):
    a = await cluster.node()
    b = await cluster.node()
    await a.heartbeat({"id": "na", "state": "ready", "connections": 3}, 1.0)
    await b.heartbeat({"id": "nb", "state": "draining", "connections": 0}, 10.0)

    listed = {r["id"]: (r, age) for r, age in await a.nodes() if r is not None}
    assert set(listed) == {"na", "nb"}
    assert listed["na"][0]["connections"] == 3 and listed["nb"][0]["state"] == "draining"
    assert all(0 <= age < 1 for _, age in listed.values())
    assert await a.expired_nodes(5.0) == []

    async def na_record_gone():
        return [age for r, age in await b.nodes() if r is None]
    ages = await eventually(na_record_gone, what="na's node record to expire")
    assert ages[0] >= 0.9        # its heartbeat entry stays, ageing, until someone forgets it

    await b.heartbeat({"id": "nb", "state": "draining", "connections": 0}, 10.0)
    assert await b.expired_nodes(0.5) == ["na"]

    await b.forget_node("na")
    assert [r["id"] for r, _ in await b.nodes()] == ["nb"]
    assert await b.expired_nodes(0.0) in ([], ["nb"])


async def test_heartbeat_refresh_keeps_sessions_and_indexes_alive(cluster):
    a = await cluster.node(session_ttl_s=1.0)
    await a.write([Put(rec("s1", channels=["c1"])), Join("s1", "c2", {"node": "na", "conn": "conn-s1", "sub": "u1"})])
    deadline = time.monotonic() + 1.4            # longer than the 1 s TTL
    while time.monotonic() < deadline:
        await a.heartbeat({"id": "na"}, 5.0, refresh=(["s1"], 1.0))
        await asyncio.sleep(0.25)
    assert await a.get_session("s1") is not None
    assert await a.node_sessions("na") == ["s1"]
    assert await a.subject_sessions("u1") == {"s1": "na"}
    assert set(await a.channel_members("c1")) == set(await a.channel_members("c2")) == {"s1"}

    async def all_gone():
        return (await a.get_session("s1") is None and await a.node_sessions("na") == []
                and await a.subject_sessions("u1") == {} and await a.channel_members("c2") == {})
    await eventually(all_gone, what="unrefreshed session and index keys to expire")


async def test_a_delete_just_after_a_refresh_still_removes_the_channel_entries(cluster):
    # The session closed after the refresh list was taken, its Delete not yet written.
    a = await cluster.node()
    await a.write([Put(rec("s1", channels=["c1"])), Put(rec("s2", channels=["c1"]))])
    await a.heartbeat({"id": "na"}, 5.0, refresh=(["s2"], 60.0))
    await a.write([Delete("s1", "na", "u1")])
    assert set(await a.channel_members("c1")) == {"s2"}


# ---- dead nodes

async def test_claim_is_granted_once_until_it_expires(cluster):
    a = await cluster.node()
    b = await cluster.node()
    results = await asyncio.gather(*(s.claim("reap:na", 1.0) for s in [a, b] * 25))
    assert results.count(True) == 1
    assert await a.claim("reap:nb", 1.0) is True          # another name, another claim

    async def claimable_again():
        return await b.claim("reap:na", 1.0)
    await eventually(claimable_again, what="the claim to expire")


async def test_take_session_gives_the_record_to_exactly_one_caller(cluster):
    a = await cluster.node()
    b = await cluster.node()
    await a.write([Put(rec("s1", channels=["c1", "c2"], state="detached"))])
    results = await asyncio.gather(*(s.take_session("s1") for s in [a, b] * 10))
    taken = [r for r in results if r is not None]
    assert len(taken) == 1
    assert taken[0]["session"] == "s1" and taken[0]["state"] == "detached"
    assert await b.get_session("s1") is None
    assert await b.node_sessions("na") == []
    assert await b.subject_sessions("u1") == {}
    assert await b.channel_members("c1") == await b.channel_members("c2") == {}
    assert await a.take_session("s1") is None


async def test_forget_node_removes_its_record_set_and_heartbeat(cluster):
    a = await cluster.node()
    await a.heartbeat({"id": "na"}, 10.0)
    await a.write([Put(rec("s1"))])
    await a.forget_node("na")
    assert await a.nodes() == []
    assert await a.node_sessions("na") == []
    assert await a.expired_nodes(0.0) == []


async def test_resync_holds_exactly_the_given_records(cluster):
    before = await cluster.node()
    await before.write([Put(rec("s1", channels=["c1"])), Put(rec("s2", sub="u2", channels=["c1"])),
                        Put(rec("other", node="nb", sub="u2"))])
    # A fresh store object (a restarted node's, remembering nothing) resyncs.
    after = await cluster.node()
    await after.resync("na", [rec("s1", channels=["c2"]), rec("s3", sub="u3")])

    assert sorted(await after.node_sessions("na")) == ["s1", "s3"]
    assert await after.node_session_count("na") == 2 and await after.node_session_count("nb") == 1
    assert await after.get_session("s2") is None
    assert (await after.get_session("s1"))["channels"] == ["c2"]
    assert await after.get_session("s3") is not None
    assert await after.subject_sessions("u2") == {"other": "nb"}    # another node's session stays
    assert await after.subject_sessions("u3") == {"s3": "na"}
    assert await after.channel_members("c1") == {}
    assert set(await after.channel_members("c2")) == {"s1"}
    assert await after.node_sessions("nb") == ["other"]


# ---- cross-node delivery

async def test_publish_reaches_the_listening_node_in_order(cluster):
    a = await cluster.node()
    b = await cluster.node()
    got: list[bytes] = []

    async def handler(data: bytes) -> None:
        await asyncio.sleep(0)
        got.append(data)

    await a.listen("na", handler)
    assert await b.publish("nobody", b"x") == 0
    counts = [await b.publish("na", b"m%d" % i) for i in range(5)]
    assert counts == [1] * 5

    async def all_there():
        return len(got) >= 5
    await eventually(all_there, what="5 bus messages")
    assert got == [b"m0", b"m1", b"m2", b"m3", b"m4"]


async def test_a_failing_handler_does_not_stop_the_bus(cluster):
    a = await cluster.node()
    got: list[bytes] = []

    def handler(data: bytes) -> None:
        if data == b"bad":
            raise RuntimeError("handler bug")
        got.append(data)

    await a.listen("na", handler)
    await a.publish("na", b"bad")
    await a.publish("na", b"good")

    async def good_arrived():
        return got == [b"good"]
    await eventually(good_arrived, what="the message after a failing one")


# ---- channel history

async def test_history_offsets_count_from_one(cluster):
    a = await cluster.node()
    appended = [await a.history_append("room", 1, b"m%d" % i, 10, 60) for i in range(1, 6)]
    epoch = appended[0][1]
    assert appended == [(i, epoch) for i in range(1, 6)]

    page = await a.history_since("room", 0, None, 100)
    assert (page.epoch, page.offset) == (epoch, 5)
    assert [(e.offset, e.opcode, e.payload) for e in page.entries] == [(i, 1, b"m%d" % i) for i in range(1, 6)]
    assert [e.offset for e in (await a.history_since("room", 3, epoch, 100)).entries] == [4, 5]
    assert [e.offset for e in (await a.history_since("room", 0, epoch, 2)).entries] == [1, 2]
    assert (await a.history_since("room", 5, epoch, 100)).entries == []
    await a.history_append("room", 2, b"\x00\xffbinary", 10, 60)
    last = (await a.history_since("room", 5, epoch, 100)).entries
    assert [(e.offset, e.opcode, e.payload) for e in last] == [(6, 2, b"\x00\xffbinary")]
    empty = await a.history_since("nothing-here", 0, None, 10)
    assert (empty.offset, empty.entries) == (0, [])


async def test_history_trimmed_past_the_offset_is_410(cluster):
    a = await cluster.node()
    for i in range(1, 6):
        _, epoch = await a.history_append("room", 1, b"m%d" % i, 3, 60)
    for since in (0, 1):
        with pytest.raises(HistoryTrimmed) as info:
            await a.history_since("room", since, epoch, 100)
        assert info.value.status == 410 and info.value.offset == 5 and info.value.epoch == epoch
    page = await a.history_since("room", 2, epoch, 100)
    assert [e.offset for e in page.entries] == [3, 4, 5]


async def test_history_lost_is_409_and_starts_a_new_epoch(cluster):
    a = await cluster.node()
    await a.history_append("room", 1, b"a", 10, 60)
    _, epoch = await a.history_append("room", 1, b"b", 10, 60)
    cluster.lose_history()
    with pytest.raises(HistoryEpochChanged) as info:
        await a.history_since("room", 2, epoch, 100)
    assert info.value.status == 409
    offset, new_epoch = await a.history_append("room", 1, b"c", 10, 60)
    assert offset == 1 and new_epoch != epoch
    with pytest.raises(HistoryEpochChanged):
        await a.history_since("room", 0, epoch, 100)
    page = await a.history_since("room", 0, new_epoch, 100)
    assert [e.payload for e in page.entries] == [b"c"]


async def test_history_expires_with_its_ttl(cluster):
    a = await cluster.node()
    _, epoch = await a.history_append("room", 1, b"a", 10, 0.3)

    async def gone():
        try:
            await a.history_since("room", 0, epoch, 10)
        except HistoryEpochChanged:
            return True
        return False
    await eventually(gone, what="the history to expire")


# ---- records from a newer gateway

class _Capture(logging.Handler):
    def __init__(self):
        super().__init__()
        self.fields: list[dict] = []

    def emit(self, record):
        self.fields.append(getattr(record, "fields", {}))


async def test_a_record_with_an_unknown_version_is_skipped_and_logged_once(cluster):
    capture = _Capture()
    logger = logging.getLogger("gateway.store")
    logger.addHandler(capture)
    try:
        a = await cluster.node()
        cluster.put_raw("session:sx", b'{"v": 99, "kind": "session", "session": "sx", "node": "nz"}')
        cluster.put_raw("session:junk", b"not json at all")
        for _ in range(3):
            assert await a.get_session("sx") is None
        assert await a.take_session("sx") is None
        assert cluster.has_raw("session:sx")           # left for a gateway that can read it
        assert await a.get_session("junk") is None
    finally:
        logger.removeHandler(capture)
    unknown = [f for f in capture.fields if f.get("event") == "record_version_unknown"]
    assert len(unknown) == 1
    assert unknown[0]["version"] == 99 and unknown[0]["key"].endswith("session:sx")


# ---- Redis only

async def test_redis_keys_all_carry_the_prefix(redis_cluster, redis_server):
    a = await redis_cluster.node()
    await a.heartbeat({"id": "na"}, 10.0, refresh=(["s1"], 10.0))
    await a.write([Put(rec("s1", channels=["c1"]))])
    await a.claim("reap:na", 10.0)
    await a.history_append("c1", 1, b"x", 10, 60)
    with redis_server.client() as c:
        keys = sorted(k.decode() for k in c.keys("*"))
    assert keys == ["t:chan:c1", "t:conn:conn-s1", "t:hist:c1", "t:hist:c1:meta", "t:node:na", "t:node:na:sessions", "t:nodes",
                    "t:reap:na", "t:session:s1", "t:sub:u1"]


async def test_redis_down_fails_fast_and_comes_back(redis_cluster, redis_server):
    a = await redis_cluster.node()
    b = await redis_cluster.node()
    got: list[bytes] = []
    await a.listen("na", got.append)
    assert a.available

    redis_server.stop()
    calls = [lambda: a.get_session("s1"), lambda: a.write([Put(rec("s1"))]),
             lambda: a.heartbeat({"id": "na"}, 5.0, refresh=(["s1"], 10.0)), lambda: a.publish("nb", b"x"),
             lambda: a.nodes(), lambda: a.claim("x", 1.0), lambda: a.take_session("s1"),
             lambda: a.history_append("c", 1, b"x", 10, 60), lambda: a.history_since("c", 0, None, 10),
             lambda: a.subject_sessions("u1"), lambda: a.expired_nodes(1.0),
             lambda: a.session_of_connection("c"), lambda: a.resync("na", [rec("s1")])]
    for call in calls:
        with pytest.raises(StoreUnavailable) as failed:
            await asyncio.wait_for(call(), HANG_S)
        # Fast: the call ended on Redis's refusal (no retry, no backoff), not on the
        # store's own cut-off at 2 x timeout_s, which would show as a timeout here.
        assert isinstance(failed.value.__cause__, rx.ConnectionError), repr(failed.value.__cause__)
    assert a.available is False

    redis_server.start()
    await a.write([Put(rec("s1"))])
    assert a.available is True
    assert (await b.get_session("s1"))["session"] == "s1"

    async def bus_back():
        # Publish on every poll until one arrives: one sent before the listener resubscribed is lost.
        if b"after" in got:
            return True
        await b.publish("na", b"after")
        return False
    await eventually(bus_back, timeout_s=8.0, interval_s=0.1, what="the bus listener to resubscribe")


async def test_redis_down_at_start_does_not_stop_the_node(redis_cluster, redis_server):
    redis_server.stop()
    a = await redis_cluster.node()
    assert a.available is False
    # Returns while Redis is still down (it waits for the subscription only up to
    # 2 x timeout_s), and keeps trying in the background.
    await asyncio.wait_for(a.listen("na", lambda data: None), HANG_S)
    assert a.available is False and redis_server.running is False
    redis_server.start()
    b = await redis_cluster.node()

    async def delivered():
        return await b.publish("na", b"x") == 1
    await eventually(delivered, timeout_s=8.0, interval_s=0.1, what="the listener to subscribe once Redis is up")


async def test_sentinel_failover_is_followed_by_the_same_store(sentinel_set):
    store = RedisStore(sentinel=("m", sentinel_set.addresses), key_prefix=PREFIX, timeout_s=0.5)
    other = RedisStore(sentinel=("m", sentinel_set.addresses), key_prefix=PREFIX, timeout_s=0.5)
    await store.start()
    await other.start()
    try:
        got: list[bytes] = []
        await store.listen("na", got.append)
        await store.write([Put(rec("s1"))])
        with sentinel_set.replica.client() as c:
            await until(lambda: asyncio.sleep(0, c.exists(PREFIX + "session:s1")), 5.0,
                        what="s1 replicated before the failover")

        sentinel_set.master.stop()
        await asyncio.to_thread(sentinel_set.wait_promoted)

        async def writes_again():
            try:
                await store.write([Put(rec("s2"))])
                return await store.get_session("s2") is not None
            except StoreUnavailable:
                return False
        await eventually(writes_again, timeout_s=10.0, interval_s=0.1, what="writes on the new master")
        assert store.available
        assert (await store.get_session("s1"))["session"] == "s1"      # replicated before the failover

        async def bus_follows():
            if b"after" in got:
                return True
            try:
                await other.publish("na", b"after")
            except StoreUnavailable:
                pass
            return False
        await eventually(bus_follows, timeout_s=10.0, interval_s=0.1, what="the bus on the new master")
    finally:
        await store.close()
        await other.close()


# ---- MemoryStore only

class FakeClock:
    def __init__(self):
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


async def test_memory_ttls_follow_the_injected_clock_and_expired_keys_are_swept():
    clock = FakeClock()
    store = MemoryStore(clock=clock, session_ttl_s=10.0)
    await store.start()
    await store.write([Put(rec(f"s{i}", channels=["c1"])) for i in range(100)])
    await store.heartbeat({"id": "na"}, 5.0, refresh=([f"s{i}" for i in range(100)], 10.0))
    await store.claim("x", 1.0)
    clock.now += 6
    assert [r for r, _ in await store.nodes()] == [None]
    assert await store.get_session("s1") is not None
    clock.now += 5
    assert await store.get_session("s1") is None
    await store.heartbeat({"id": "nb"}, 5.0)
    # Only nb's record is left: sessions, their sets and hashes, the claim and na's record were swept.
    assert list(store._data) == ["node:nb"]
    assert store._where == {}
    await store.close()


async def test_memory_history_is_capped_by_size():
    store = MemoryStore()
    for i in range(1000):
        await store.history_append("room", 1, b"x", 50, 60)
    assert len(store._data["hist:room"].entries) == 50
    page = await store.history_since("room", 950, None, 1000)
    assert [e.offset for e in page.entries] == list(range(951, 1001))


async def test_memory_publish_is_not_reentrant_and_its_queue_is_bounded():
    store = MemoryStore(bus_limit=3)
    await store.start()
    got: list[bytes] = []
    await store.listen("na", got.append)
    assert [await store.publish("na", b"%d" % i) for i in range(5)] == [1, 1, 1, 0, 0]
    assert got == []                                 # nothing ran inside publish

    async def delivered():
        return got == [b"0", b"1", b"2"]
    await eventually(delivered, what="queued messages")
    await store.unlisten("na")
    assert await store.publish("na", b"late") == 0
    await store.close()


async def test_memory_close_is_counted_across_sharing_nodes():
    store = MemoryStore()
    await store.start()
    await store.start()
    got: list[bytes] = []
    await store.listen("na", got.append)
    await store.close()                              # one node stops, the other keeps its bus
    assert await store.publish("na", b"x") == 1
    await store.close()
    assert await store.publish("na", b"y") == 0


async def test_a_burst_past_the_pool_size_waits_for_connections_instead_of_failing(redis_cluster):
    """A drain of thousands of sessions, or a resume storm, makes more calls at once
    than the pool has connections: they wait their turn; Redis is not 'unavailable'."""
    from gateway.store.redis import POOL_SIZE

    store = await redis_cluster.node(timeout_s=2)
    results = await asyncio.gather(*(store.get_session(f"s{i}") for i in range(3 * POOL_SIZE)),
                                   return_exceptions=True)
    assert [r for r in results if isinstance(r, BaseException)] == []
    assert store.available
