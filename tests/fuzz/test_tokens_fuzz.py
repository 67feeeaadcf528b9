"""Resume tokens against the detached-session store (the in-process one, which keeps
the Redis store's rules; clock injected), under random sequences of takes, releases,
finishes and time passing.

Every take goes through tokens.parse as resume.claim does. A reference model says what
each must answer; the properties that matter: a take is OK only with the session's own
unchanged token, its own subject, inside the resume window, not leased to another
node, not used; a used token stays refused (410, replay), an expired one too; a
forged one (random, one character changed, another session's secret under this id)
is refused (401) and takes nothing; nothing raises.
"""

from __future__ import annotations

import asyncio

from hypothesis import strategies as st

from gateway import tokens
from gateway.store import detached as d
from gateway.store.detached import Parked
from gateway.store.memory import MemoryStore

from . import test_parsers_fuzz
from .test_parsers_fuzz import fuzz

tally = test_parsers_fuzz.tally   # the fixture: counts cases and failures into record_property

WINDOW_S = 10.0
LEASE_S = 3.0
SUBS = {"sessA000": "alice", "sessB000": "bob"}


def changed(token: str, at: int, to: str) -> str:
    sid, _, secret = token.partition(".")
    i = at % len(secret)
    to = to if secret[i] != to else ("A" if to != "A" else "B")
    return f"{sid}.{secret[:i]}{to}{secret[i + 1:]}"


right_take = st.tuples(st.sampled_from([("A", "alice"), ("B", "bob")]), st.sampled_from(["n1", "n2"])).map(
    lambda t: ("take", t[0][0], t[0][1], t[1], 0, "a"))
op = st.one_of(
    right_take, right_take,
    st.tuples(st.just("take"), st.sampled_from(["A", "B", "A changed", "B secret under A", "random", "unknown id",
                                                "A truncated", "A + junk"]),
              st.sampled_from(["alice", "bob", None]), st.sampled_from(["n1", "n2"]),
              st.integers(0, 40), st.sampled_from("aZ9_-")),
    st.tuples(st.just("advance"), st.sampled_from([0.5, 2.0, 4.0, 11.0])),
    st.tuples(st.just("release"), st.sampled_from(["A", "B"]), st.sampled_from(["n1", "n2"])),
    st.tuples(st.just("finish"), st.sampled_from(["A", "B"]), st.sampled_from(["n1", "n2"])),
)


class Model:
    """What one parked session should answer."""

    def __init__(self, until: float):
        self.state = "detached"
        self.until = until
        self.lease = ""
        self.lease_until = 0.0

    def take(self, right: bool, sub: str | None, want_sub: str, node: str, now: float) -> str:
        if not right:
            return d.FORGED
        if self.state == "used":
            return d.USED
        if self.until <= now:
            return d.EXPIRED
        if sub != want_sub:
            return d.SUBJECT
        if self.state == "resuming" and self.lease != node and self.lease_until > now:
            return d.LEASED
        self.state, self.lease, self.lease_until = "resuming", node, now + LEASE_S
        return d.OK


async def scenario(ops, seen: dict) -> None:
    now = [100.0]
    store = MemoryStore(clock=lambda: now[0])
    det = store.detached
    toks, models = {}, {}
    for key, sid in zip("AB", SUBS):
        token, th = tokens.new(sid)
        toks[key] = token
        await det.park([Parked(record={"session": sid, "node": "old", "sub": SUBS[sid], "route": "r"},
                               token_hash=th, window_s=WINDOW_S)])
        await det.append(sid, [(1, b"m1")], 100, 1 << 20, seal=True)
        models[key] = Model(now[0] + WINDOW_S)
    for o in ops:
        if o[0] == "advance":
            now[0] += o[1]
            continue
        if o[0] in ("release", "finish"):
            key, node = o[1], o[2]
            sid = list(SUBS)[ord(key) - ord("A")]
            m = models[key]
            if o[0] == "release":
                await det.release(sid, node)
                if m.state == "resuming" and m.lease == node:
                    m.state, m.lease, m.lease_until = "detached", "", 0.0
            else:
                got = await det.finish(sid, node, None)
                mine = m.state == "resuming" and m.lease == node
                assert (got is not None) == mine, (o, m.state, m.lease)
                if mine:
                    assert got == [("1", 1, b"m1")]   # the whole replay, once
                    m.state = "used"
            continue
        _, which, sub, node, at, to = o
        a = toks["A"]
        token = {"A": a, "B": toks["B"], "A changed": changed(a, at, to),
                 "B secret under A": f"{a.partition('.')[0]}.{toks['B'].partition('.')[2]}",
                 "random": f"sessA000.{'x' * (16 + at)}", "unknown id": f"sessC000.{a.partition('.')[2]}",
                 "A truncated": a[:-1 - at % 5], "A + junk": a + to}[which]
        parsed = tokens.parse(token)
        if parsed is None:
            assert token not in toks.values(), token   # a right token always parses
            continue                              # resume.claim: 401 before the store is asked
        sid, th = parsed
        status, rec = await det.take(sid, th, sub, node, LEASE_S)
        if sid not in SUBS:
            assert status == d.UNKNOWN, (token, status)
            continue
        key = "A" if sid == "sessA000" else "B"
        right = token == toks[key]
        want = models[key].take(right, sub, SUBS[sid], node, now[0])
        assert status == want, (o, token, status, want)
        seen[status] = seen.get(status, 0) + 1
        if status == d.OK:
            assert rec["session"] == sid and right and sub == SUBS[sid]   # never a changed token or subject
        elif status == d.LEASED:
            assert 0 < rec["retry_after_s"] <= LEASE_S
        else:
            assert rec is None


def test_resume_tokens_forged_replayed_expired_against_the_store(tally):
    seen: dict = {}

    def check(ops):
        asyncio.run(scenario(ops, seen))
    fuzz(tally, (st.lists(op, min_size=1, max_size=20),),
         "random take/release/finish/advance sequences on 2 parked sessions with right, changed, other-secret, "
         "random, truncated tokens and subjects", "OK only for the unchanged token and subject in its window; "
         "forged 401, used/expired 410, leased 503", check)
    assert {d.OK, d.FORGED, d.USED, d.EXPIRED, d.SUBJECT, d.LEASED} <= set(seen), seen   # every answer reached
