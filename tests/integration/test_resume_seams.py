"""Reliable mode at its seams: a client that comes back the moment its connection died,
before the node that held it has parked the session."""

from __future__ import annotations

import pytest

from ..helpers import until
from .test_drain_resume import numbered  # noqa: F401  (fixture)
from .test_reliable import Peer, _async, jwt_env, jwt_for, node_cfg, resume_and_count  # noqa: F401  (fixture)


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
