"""Reliable mode at its seams: a client that comes back the moment its connection died,
before the node that held it has parked the session."""

from __future__ import annotations

import asyncio

import pytest

from gateway import frames

from ..helpers import RawClient, until
from .test_drain_resume import numbered  # noqa: F401  (fixture)
from .test_reliable import (Peer, _async, hold_park, jwt_env, jwt_for, node_cfg, record_takeovers,  # noqa: F401
                            resume_and_count, session_of, with_traffic)


@pytest.mark.parametrize("where", ["same node", "other node"])
async def test_a_resume_the_moment_after_the_drop_waits_for_the_park(gateway, redis_server, numbered, jwt_env,
                                                                     where):
    """The client's TCP dies and it resumes at once, with no pause at all: the node holding
    the session is still writing its parked record. The resume waits for it (bounded) and is
    served whole, never refused as an unknown session."""
    a = await gateway(node_cfg("node-a", redis_server.url, numbered.url, ack_every=5, ack_ms=20))
    b = await gateway(node_cfg("node-b", redis_server.url, numbered.url, ack_every=5, ack_ms=20))
    token = jwt_for("rita")
    peer = await Peer.connect(a.url, query=f"?access_token={token}")
    sid = peer.hello["session"]
    for i in range(1, 11):
        peer.send(f"c{i}")
    await peer.read_until(lambda: len(peer.got) >= 20 and peer.acks and peer.acks[-1] == 10, "traffic and acks")
    await until(lambda: _async(len(numbered.got[sid]) == 10), what="the backend got c1..c10")
    peer.raw.writer.transport.abort()
    target = a if where == "same node" else b
    await resume_and_count(peer, target.url, f"?access_token={token}&resume={peer.hello['token']}", numbered,
                           10, 20, 40)


# ------------------------------------------------------------ a push at the instant of the resume
ADMIN = "seams-admin-token"


async def _post(http, gw, path: str, body: str) -> dict:
    async with http.post(gw.admin_url + path, data=body, headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        assert r.status == 200, (r.status, await r.text())
        return await r.json()


async def _parked_in_room(gateway, redis_server, backend, http, sub: str):
    """Three nodes on one redis-server: `sub`'s session joins "room" on A and A drains.
    Returns (B, C, the resume token), the session parked, its client's close answered."""
    be = await backend()
    a, b, c = [await gateway(node_cfg(f"node-{n}", redis_server.url, be.url)) for n in "abc"]
    raw = await RawClient.connect(f"{a.url}/ws?access_token={jwt_for(sub)}")
    assert raw.status == 101
    (s,) = a.node.sessions.values()
    async with http.put(f"{a.admin_url}/v1/connections/{s.id}/channels/room",
                        headers={"Authorization": f"Bearer {ADMIN}"}) as r:
        assert r.status == 200
    drain = asyncio.ensure_future(a.stop())
    code, reason = await raw.recv_close()
    assert code == 1012
    raw.send_frame(frames.OP_CLOSE, frames.close_payload(1000, ""))
    await asyncio.wait_for(drain, 10)
    raw.close()
    return b, c, reason.removeprefix("resume=")


async def _texts_until(raw: RawClient, last: str, max_frames: int = 20) -> list[str]:
    got: list[str] = []
    for _ in range(max_frames):
        try:
            op, _, payload = await raw.recv_frame()
        except TimeoutError:
            raise AssertionError(f"{last!r} did not come; got {got}") from None
        assert op == frames.OP_TEXT, (op, payload)
        got.append(payload.decode())
        if got[-1] == last:
            return got
    raise AssertionError(f"{last!r} not within {max_frames} frames: {got}")


@pytest.mark.parametrize("to", ["channel", "user"])
@pytest.mark.parametrize("publisher", ["the resuming node", "another node"])
async def test_a_push_published_the_instant_the_resume_takes_the_buffer_arrives_once_in_order(
        gateway, redis_server, backend, http, jwt_env, monkeypatch, publisher, to):
    """A line published just after the resuming node's finish took the replay buffer, before
    that node has the session's channels and subject again: it reaches the client once, after
    the replay and before what comes later (before: it went to a buffer already gone)."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN)
    b, c, token = await _parked_in_room(gateway, redis_server, backend, http, "quinn")
    pub = b if publisher == "the resuming node" else c
    path = "/v1/channels/room/messages" if to == "channel" else "/v1/users/quinn/messages"
    answers = [await _post(http, pub, path, "before")]
    assert answers[0].get("buffered") == 1
    store = b.node.cluster.store.detached
    finish = store.finish

    async def finish_then_publish(*args, **kw):
        out = await finish(*args, **kw)
        if out is not None:   # the buffer is taken: publish now, before the session is live on B
            answers.append(await _post(http, pub, path, "at-finish"))
        return out
    monkeypatch.setattr(store, "finish", finish_then_publish)
    resumed = await RawClient.connect(f"{b.url}/ws?access_token={jwt_for('quinn')}&resume={token}")
    assert resumed.status == 101
    await until(lambda: _async(len(answers) == 2), what="the publish at the finish answered")
    answers.append(await _post(http, pub, path, "after"))
    got = await _texts_until(resumed, "after")
    assert got == ["before", "at-finish", "after"], answers
    assert [x["delivered"] for x in answers] == [1, 1, 1], answers
    resumed.close()


async def test_a_push_read_as_parked_but_appended_after_the_finish_follows_the_session(
        gateway, redis_server, backend, http, jwt_env, monkeypatch):
    """The publisher reads the channel's members (the session parked), then the resume's
    finish takes the buffer, then the publisher's append comes: answered "gone", it goes
    where the session is now, once, and before the publisher's next line."""
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", ADMIN)
    b, c, token = await _parked_in_room(gateway, redis_server, backend, http, "rhea")
    at_append, finished = asyncio.Event(), asyncio.Event()
    parked = c.node.cluster.delivery.parked
    append = parked.append

    async def append_after_the_finish(*args, **kw):
        at_append.set()
        await finished.wait()
        return await append(*args, **kw)
    monkeypatch.setattr(parked, "append", append_after_the_finish)
    store = b.node.cluster.store.detached
    finish = store.finish

    async def finish_once_the_publisher_waits(*args, **kw):
        await at_append.wait()
        try:
            return await finish(*args, **kw)
        finally:
            finished.set()
    monkeypatch.setattr(store, "finish", finish_once_the_publisher_waits)
    racing = asyncio.ensure_future(_post(http, c, "/v1/channels/room/messages", "racing"))
    await asyncio.wait_for(at_append.wait(), 10)
    resumed = await RawClient.connect(f"{b.url}/ws?access_token={jwt_for('rhea')}&resume={token}")
    assert resumed.status == 101
    answer = await asyncio.wait_for(racing, 10)
    after = await _post(http, c, "/v1/channels/room/messages", "after")
    got = await _texts_until(resumed, "after")
    assert got == ["racing", "after"], (answer, after)
    assert answer["delivered"] == 1 and after["delivered"] == 1, (answer, after)
    resumed.close()


# ------------------------------------------------------------ a drop right after a resume
async def _dropped_once_and_resumed(gateway, redis_server, numbered, sub: str):
    """A reliable session on A, its TCP cut, resumed on B: (A, B, the resumed client, its JWT)."""
    a = await gateway(node_cfg("node-a", redis_server.url, numbered.url, ack_every=5, ack_ms=20))
    b = await gateway(node_cfg("node-b", redis_server.url, numbered.url, ack_every=5, ack_ms=20))
    token = jwt_for(sub)
    peer, _ = await with_traffic(a, numbered, token)
    peer.raw.writer.transport.abort()
    again = await resume_and_count(peer, b.url, f"?access_token={token}&resume={peer.hello['token']}", numbered,
                                   3, 6, 10)
    return a, b, again, token


@pytest.mark.parametrize("where", ["same node", "other node"])
async def test_a_drop_right_after_a_resume_parks_again_and_the_new_token_resumes(gateway, redis_server, numbered,
                                                                                 jwt_env, where):
    """Resumed on B, cut again at once: B is still writing the parked record when the client is
    back with the token of B's hello, while the store still holds the used record of the token
    before. The resume waits for the park (never 401, "the token does not match")."""
    a, b, again, token = await _dropped_once_and_resumed(gateway, redis_server, numbered, "ivo")
    sid = again.hello["session"]
    release = hold_park(b)
    target = b if where == "same node" else a
    asked = record_takeovers(target)
    s = session_of(b)
    again.raw.writer.transport.abort()
    await until(lambda: _async(s.capture is not None), what="dropped on B, parking")
    resuming = asyncio.ensure_future(
        resume_and_count(again, target.url, f"?access_token={token}&resume={again.hello['token']}", numbered,
                         6, 9, 20))
    await until(lambda: _async(asked or resuming.done()), what="the resume asked for the session")
    assert asked == [True] and not resuming.done(), resuming.done() and resuming.exception()
    release.set()
    await asyncio.wait_for(resuming, 10)
    assert numbered.handshakes[-1]["Gateway-Session-Id"] == sid


async def test_a_resume_cut_before_its_replay_is_out_parks_the_replay_again(gateway, redis_server, numbered, jwt_env):
    """The client is back with the new token (a half-open resume: taken over) while B is still
    taking the replay buffer from the store: B parks the session again with that replay in it,
    so the next resume gets every message, none twice."""
    a = await gateway(node_cfg("node-a", redis_server.url, numbered.url, ack_every=5, ack_ms=20))
    b = await gateway(node_cfg("node-b", redis_server.url, numbered.url, ack_every=5, ack_ms=20))
    token = jwt_for("jael")
    peer, sid = await with_traffic(a, numbered, token)
    peer.raw.writer.transport.abort()
    await until(lambda: a.node.cluster.store.detached.get(sid), what="parked on A")
    asked = record_takeovers(a)
    store = b.node.cluster.store.detached
    finish = store.finish

    async def finish_after_the_takeover(*args, **kw):
        await until(lambda: _async(asked), what="the next resume took over")
        return await finish(*args, **kw)
    store.finish = finish_after_the_takeover
    last = len(peer.got)
    half = await Peer.connect(b.url, query=f"?access_token={token}&resume={peer.hello['token']}&last={last}")
    assert half.hello["down"] == last
    half.got = list(peer.got)     # nothing more came: B holds it all back until its replay is out
    await resume_and_count(half, a.url, f"?access_token={token}&resume={half.hello['token']}", numbered, 3, 6, 20)
    assert asked == [True]
