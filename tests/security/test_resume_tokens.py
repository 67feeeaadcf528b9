"""A client pretending to be another session through resume tokens (SECURITY.md,
"Resume tokens"). Session A (alice) is parked; then its token with bob's JWT, its id
with another secret, its token on another route, without a JWT, a token of no
session: each is refused 401, and A still resumes whole. A's token again after A
resumed: 410. While A is live, bob holding A's new token neither resumes it nor cuts
its connection. Both ways a token is handed out: a reliable route's hello (websocket
backend, the connection dropped) and a drain's 1012 (HTTP backend)."""

from __future__ import annotations

import asyncio

from gateway import frames

from ..helpers import RawClient, until
from ..integration.test_reliable import PROTO, Peer
from .support import exchange, jwt_auth, record, token, upgrade

ALICE = token("alice")
BOB = token("bob")


def config(mode: str, url: str) -> dict:
    if mode == "websocket":
        backend = {"type": "websocket", "endpoints": [url]}
        extra = {"reliable": None}
    else:
        backend = {"type": "http", "endpoints": [url]}
        extra = {}
    routes = [{"name": name, "match": {"path_prefix": prefix}, "auth": "required", "backend": "b", **extra}
              for name, prefix in (("r", "/ws"), ("other", "/other"))]
    return {"auth": jwt_auth(), "backends": {"b": backend}, "routes": routes,
            "drain": {"timeout_s": 5, "rate_per_s": 1000}}


def other_secret(tok: str) -> str:
    sid, secret = tok.split(".", 1)
    return f"{sid}.{'A' if secret[0] != 'A' else 'B'}{secret[1:]}"


def attempts(tok: str, last: str) -> list[tuple[str, str, list, int]]:
    """(what, target, extra headers, status wanted) against a parked session's token."""
    sid = tok.split(".", 1)[0]
    return [
        ("A's token with bob's JWT", f"/ws?access_token={BOB}&resume={tok}{last}", [], 401),
        ("A's token with bob's JWT, in Gateway-Resume", f"/ws?access_token={BOB}{last}",
         [("Gateway-Resume", tok)], 401),
        ("A's session id with another secret", f"/ws?access_token={ALICE}&resume={other_secret(tok)}{last}", [], 401),
        ("A's secret with another session id",
         f"/ws?access_token={ALICE}&resume={'Z' * len(sid)}.{tok.split('.', 1)[1]}{last}", [], 401),
        ("A's token on another route", f"/other?access_token={ALICE}&resume={tok}{last}", [], 401),
        ("A's token without a JWT", f"/ws?resume={tok}{last}", [], 401),
        ("A's token with a forged JWT", f"/ws?access_token={ALICE[:-2]}xx&resume={tok}{last}", [], 401),
        ("a token not shaped like one", f"/ws?access_token={ALICE}&resume=..{last}", [], 401),
    ]


async def try_all(port: int, cases, protocol: bool) -> list[str]:
    failures = []
    for what, target, extra, want in cases:
        headers = [*extra, ("Sec-WebSocket-Protocol", PROTO)] if protocol else extra
        a = await exchange(port, upgrade(target, extra=headers))
        a.close()
        if a.status != want:
            failures.append(f"{what}: {a.status} {a.body[:120]!r}, wanted {want}")
    return failures


async def _gone(gw, sid) -> bool:
    return not any(s.session_id == sid for s in gw.node.sessions.values())


async def test_reliable_tokens_cannot_be_used_by_another_subject_route_or_twice(gateway, backend, record_property):
    b = await backend()
    gw = await gateway(config("websocket", b.url))
    port = gw.ports[0]
    a = await Peer.connect(gw.url, query=f"?access_token={ALICE}")
    sid, tok = a.hello["session"], a.hello["token"]
    a.send("one")
    await a.read_until(lambda: a.got, "the echo")
    a.ack()
    a.raw.writer.transport.abort()                       # A's connection dies without a close
    await until(lambda: _gone(gw, sid), what="A parked")
    cases = attempts(tok, "&last=1")
    failures = await try_all(port, cases, True)
    # A is unaffected: it resumes, and the session carries on.
    again = await Peer.connect(gw.url, query=f"?access_token={ALICE}&resume={tok}&last=1")
    if again.hello["session"] != sid:
        failures.append(f"A's resume: session {again.hello['session']}, wanted {sid}")
    again.send("two")
    await again.read_until(lambda: again.got, "the echo after the resume")
    # Replayed after A resumed: 410.
    failures += await try_all(port, [("A's old token again", f"/ws?access_token={ALICE}&resume={tok}&last=1",
                                      [], 410)], True)
    # A's new token, in bob's hands while A is live: refused, and A's connection stays.
    new = again.hello["token"]
    failures += await try_all(port, [("A's live token with bob's JWT", f"/ws?access_token={BOB}&resume={new}&last=1",
                                      [], 401),
                                     ("A's live token on another route",
                                      f"/other?access_token={ALICE}&resume={new}&last=1", [], 401)], True)
    # A session never parked (no detached record: the resume would take its live
    # connection over, as after a half-open drop), its token in bob's hands.
    carol = await Peer.connect(gw.url, query=f"?access_token={token('carol')}")
    ctok = carol.hello["token"]
    failures += await try_all(port, [("a live token with another subject's JWT",
                                      f"/ws?access_token={BOB}&resume={ctok}&last=0", [], 401),
                                     ("a live token on another route",
                                      f"/other?access_token={token('carol')}&resume={ctok}&last=0", [], 401)], True)
    for who, peer in (("A", again), ("carol", carol)):
        sess = peer.hello["session"]
        if not [x for x in gw.node.sessions.values() if x.session_id == sess and x.capture is None]:
            failures.append(f"{who}'s live connection was cut by a refused resume")
        else:
            n = len(peer.got)
            peer.send("three")
            await peer.read_until(lambda: len(peer.got) > n, f"{who}'s traffic after the refusals")
    for peer in (again, carol):
        peer.raw.close()
    record(record_property, "reliable (websocket backend): A's resume token with bob's JWT, another secret, "
           "another route, no JWT, replayed, while live", len(cases) + 7,
           "401 (subject/forged/route/token), 410 replayed; A resumes and stays live", failures)
    assert not failures, failures


async def test_drain_tokens_cannot_be_used_by_another_subject_route_or_twice(gateway, http_peer, record_property):
    p = await http_peer()
    gw = await gateway(config("http", p.url))
    port = gw.ports[0]
    c = await RawClient.connect(f"{gw.url}/ws?access_token={ALICE}")
    assert c.status == 101
    (s,) = gw.node.sessions.values()
    sid = s.session_id
    drained = asyncio.ensure_future(gw.node.drain_sessions([s]))
    code, reason = await c.recv_close()
    assert code == 1012 and reason.startswith("resume="), (code, reason)
    c.send_frame(frames.OP_CLOSE, frames.close_payload(1000))
    await drained
    await until(lambda: _gone(gw, sid), what="A detached")
    tok = reason[len("resume="):]
    cases = attempts(tok, "")
    failures = await try_all(port, cases, False)
    again = await RawClient.connect(f"{gw.url}/ws?access_token={ALICE}&resume={tok}")
    if again.status != 101:
        failures.append(f"A's resume: {again.status}")
    else:
        await until(lambda: asyncio.sleep(0, any(x.session_id == sid for x in gw.node.sessions.values())),
                    what="A live again")
    failures += await try_all(port, [("A's token again", f"/ws?access_token={ALICE}&resume={tok}", [], 410)], False)
    again.close()
    record(record_property, "drain (HTTP backend): A's resume token with bob's JWT, another secret, another "
           "route, no JWT, replayed", len(cases) + 2, "401 (subject/forged/route/token), 410 replayed; A resumes",
           failures)
    assert not failures, failures
