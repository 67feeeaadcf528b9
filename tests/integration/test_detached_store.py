"""The detached-session contract (store.detached), against both stores: park,
the replay buffer and its caps, take with a lease, finish, release, expiry.
Redis runs as a real redis-server (the `cluster` fixture of test_store)."""

from __future__ import annotations

import pytest

from gateway.store import detached as d
from gateway.store.detached import Parked

from ..helpers import until
from .test_store import PREFIX, cluster, rec, redis_cluster  # noqa: F401  (fixtures)

TH = "a" * 64


def parked(sid: str, window_s: float = 60, **kw) -> Parked:
    return Parked(rec(sid, state="detached", **kw), TH, window_s)


async def test_park_replaces_the_live_record_and_keeps_the_indexes_pointing_at_no_node(cluster):
    s = await cluster.node()
    from gateway.store import Put

    await s.write([Put(rec("s1", channels=["room"]))])
    await s.detached.park([parked("s1", channels=["room"])])
    assert await s.get_session("s1") is None
    assert "s1" not in await s.node_sessions("na")
    assert await s.session_of_connection("conn-s1") == "s1"
    assert (await s.subject_sessions("u1"))["s1"] == d.DETACHED_NODE
    assert (await s.channel_members("room"))["s1"]["node"] == d.DETACHED_NODE
    got = await s.detached.get("s1")
    assert got["state"] == "detached" and got["buffered"] == 0 and got["sub"] == "u1"


async def test_take_checks_token_subject_and_leases_once(cluster):
    a, b = await cluster.node(), await cluster.node()
    await a.detached.park([parked("s1")])
    assert await a.detached.take("s1", TH, "u1", "nb", 5) == (d.PENDING, None)   # not sealed yet
    await a.detached.append("s1", [], 100, 1000, seal=True)
    assert await a.detached.take("nope", TH, "u1", "nb", 5) == (d.UNKNOWN, None)
    assert await a.detached.take("s1", "b" * 64, "u1", "nb", 5) == (d.FORGED, None)
    assert await a.detached.take("s1", TH, "someone-else", "nb", 5) == (d.SUBJECT, None)
    status, record = await b.detached.take("s1", TH, "u1", "nb", 5)
    assert status == d.OK and record["session"] == "s1"
    status, info = await a.detached.take("s1", TH, "u1", "nc", 5)
    assert status == d.LEASED and 0 < info["retry_after_s"] <= 5
    # The same node may retry its own take; a released lease is free for anyone.
    assert (await b.detached.take("s1", TH, "u1", "nb", 5))[0] == d.OK
    await b.detached.release("s1", "nb")
    assert (await a.detached.take("s1", TH, "u1", "nc", 5))[0] == d.OK


async def test_a_lease_that_runs_out_lets_another_node_take_the_session(cluster):
    s = await cluster.node()
    await s.detached.park([parked("s1")])
    await s.detached.append("s1", [], 100, 1000, seal=True)
    assert (await s.detached.take("s1", TH, "u1", "dies", 0.05))[0] == d.OK

    async def taken():
        return (await s.detached.take("s1", TH, "u1", "next", 5))[0] == d.OK
    await until(taken, 5.0, "the lease to run out", interval_s=0.02)
    assert await s.detached.finish("s1", "dies", None) is None   # the first node lost its lease


async def test_replay_is_kept_in_order_and_finish_returns_what_came_after_the_read(cluster):
    s = await cluster.node()
    await s.detached.park([parked("s1")])
    assert await s.detached.append("s1", [(1, b"one"), (2, b"\x00two")], 100, 1000, seal=True) == (2, "ok")
    assert (await s.detached.take("s1", TH, "u1", "nb", 5))[0] == d.OK
    read = await s.detached.read("s1")
    assert [(o, p) for _, o, p in read] == [(1, b"one"), (2, b"\x00two")]
    assert await s.detached.append("s1", [(1, b"three")], 100, 1000) == (1, "ok")  # a push during the resume
    rest = await s.detached.finish("s1", "nb", read[-1][0])
    assert [(o, p) for _, o, p in rest] == [(1, b"three")]
    # Used: a second use is told so, and nothing is buffered for it any more.
    assert await s.detached.take("s1", TH, "u1", "nc", 5) == (d.USED, None)
    assert await s.detached.append("s1", [(1, b"late")], 100, 1000) == (0, "gone")
    assert await s.detached.get("s1") is None


@pytest.mark.parametrize("cap", ["messages", "bytes"])
async def test_a_full_buffer_is_reported_and_refuses_the_resume(cluster, cap):
    s = await cluster.node()
    await s.detached.park([parked("s1")])
    max_n, max_bytes = (2, 1000) if cap == "messages" else (100, 7)
    assert await s.detached.append("s1", [(1, b"abc"), (1, b"def"), (1, b"ghi")], max_n, max_bytes) == (2, "full")
    assert await s.detached.append("s1", [(1, b"x")], 100, 1000) == (0, "full")   # stays overflowed
    assert (await s.detached.get("s1"))["overflowed"] is True
    assert await s.detached.take("s1", TH, "u1", "nb", 5) == (d.OVERFLOWED, None)


async def test_expiry_is_told_and_gives_the_record_to_one_caller(cluster):
    a, b = await cluster.node(), await cluster.node()
    await a.detached.park([parked("s1", window_s=0.05, channels=["room"])])

    async def due():
        return "s1" in await a.detached.due(10)
    await until(due, 5.0, "s1 due", interval_s=0.02)
    assert await a.detached.take("s1", TH, "u1", "nb", 5) == (d.EXPIRED, None)
    got = [await a.detached.expire("s1"), await b.detached.expire("s1")]
    assert [g["session"] for g in got if g] == ["s1"]
    assert "s1" not in await a.detached.due(10)
    assert "s1" not in await a.subject_sessions("u1")
    assert "s1" not in await a.channel_members("room")
    assert await a.detached.take("s1", TH, "u1", "nb", 5) == (d.EXPIRED, None)   # still known: 410, not 401


async def test_a_buffer_from_another_redis_is_lost_not_whole(redis_cluster, redis_server):
    """A restart (or a failover to a replica) may have kept the record and lost
    the last appends with it: the resume must be refused, not served short."""
    s = await redis_cluster.node()
    await s.detached.park([parked("s1")])
    await s.detached.append("s1", [(1, b"one")], 100, 1000, seal=True)
    with redis_server.client() as c:
        c.hset(PREFIX + "det:s1", "run", "another-redis")
    assert await s.detached.take("s1", TH, "u1", "nb", 5) == (d.LOST, None)
    with redis_server.client() as c:
        c.hset(PREFIX + "det:s1", "run", c.info("server")["run_id"])
        c.delete(PREFIX + "replay:s1")   # the buffer itself gone
    assert await s.detached.take("s1", TH, "u1", "nb", 5) == (d.LOST, None)


async def test_a_session_whose_route_takes_no_token_resumes_whatever_the_subject(cluster):
    s = await cluster.node()
    await s.detached.park([Parked(rec("s1", sub=None, state="detached"), TH, 60, check_subject=False)])
    await s.detached.append("s1", [], 100, 1000, seal=True)
    assert await s.detached.take("s1", "b" * 64, "u9", "nb", 5) == (d.FORGED, None)   # the token still counts
    assert (await s.detached.take("s1", TH, "u9", "nb", 5))[0] == d.OK
