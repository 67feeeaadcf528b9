"""Channels, presence, fan-out (frame built once) and the closed-id memory."""

from __future__ import annotations

from unittest import mock

import pytest

from gateway import frames
from gateway.channels import Channels, ChannelError, RecentlyClosed, check_name, parse_list


class FakeSession:
    def __init__(self, sid: str, sub: str | None = None, open_: bool = True):
        self.id = sid
        self.session_id = "s-" + sid
        self.sub = sub
        self.channels = None
        self.open = open_
        self.got: list[bytes] = []

    def send_raw(self, frame: bytes) -> bool:
        if not self.open:
            return False
        self.got.append(frame)
        return True


def test_subscribe_is_idempotent_and_tracked_both_ways():
    ch = Channels()
    s = FakeSession("a")
    assert ch.subscribe(s, "room") is True
    assert ch.subscribe(s, "room") is False
    assert s.channels == {"room"}
    assert ch.count("room") == 1
    assert ch.unsubscribe(s, "room") is True
    assert ch.unsubscribe(s, "room") is False
    assert "room" not in ch.members          # empty channels do not linger


def test_drop_leaves_every_channel():
    ch = Channels()
    s, t = FakeSession("a"), FakeSession("b")
    for name in ("x", "y", "z"):
        ch.subscribe(s, name)
    ch.subscribe(t, "x")
    ch.drop(s)
    assert s.channels is None
    assert list(ch.members) == ["x"] and ch.count("x") == 1


@pytest.mark.parametrize("name", ["", "a b", "a/b", "a,b", "x" * 129, "é"])
def test_bad_channel_names_are_refused(name):
    with pytest.raises(ChannelError):
        check_name(name)
    with pytest.raises(ChannelError):
        Channels().subscribe(FakeSession("a"), name)


def test_per_session_channel_cap():
    ch = Channels(max_per_session=2)
    s = FakeSession("a")
    ch.subscribe(s, "a")
    ch.subscribe(s, "b")
    with pytest.raises(ChannelError, match="max 2"):
        ch.subscribe(s, "c")


def test_publish_builds_the_frame_once_for_all_subscribers():
    ch = Channels()
    sessions = [FakeSession(str(i)) for i in range(10_000)]
    for s in sessions:
        ch.subscribe(s, "big")
    sessions[5].open = False                   # closing: not counted as delivered
    with mock.patch("gateway.channels.frames.frame", wraps=frames.frame) as build:
        n = ch.publish("big", frames.OP_TEXT, b"hello")
    assert build.call_count == 1
    assert n == 9_999
    expected = frames.frame(frames.OP_TEXT, b"hello")
    assert sessions[0].got == [expected] and sessions[0].got[0] is sessions[-1].got[0]


def test_publish_to_empty_channel_delivers_zero():
    assert Channels().publish("nobody", frames.OP_TEXT, b"x") == 0


def test_presence_lists_sessions_and_subjects():
    ch = Channels()
    ch.subscribe(FakeSession("c1", "alice"), "r")
    ch.subscribe(FakeSession("c2", "alice"), "r")
    ch.subscribe(FakeSession("c3", None), "r")
    p = ch.presence("r")
    assert p["count"] == 3
    assert p["subjects"] == ["alice"]
    assert p["sessions"][0] == {"session": "s-c1", "connection": "c1", "sub": "alice"}


def test_parse_list():
    assert parse_list(" a, b ,,c ") == ["a", "b", "c"]
    assert parse_list("") == []


def test_recently_closed_is_bounded_by_count_and_time():
    now = [0.0]
    rc = RecentlyClosed(capacity=3, ttl_s=10, clock=lambda: now[0])
    for i in range(5):
        rc.add(f"c{i}", 1000 + i)
    assert len(rc) == 3
    assert rc.get("c0") is None and rc.get("c4") == (1004, "")
    now[0] = 10.5
    assert rc.get("c4") is None
    rc.add("new", 4000, "bye")
    assert len(rc) == 1 and rc.get("new") == (4000, "bye")


def test_observer_hears_every_join_and_leave():
    heard = []

    class Observer:
        def joined(self, s, name):
            heard.append(("join", s.id, name))

        def left(self, s, name):
            heard.append(("leave", s.id, name))

    ch = Channels(observer=Observer())
    a = FakeSession("a")
    ch.subscribe(a, "x")
    ch.subscribe(a, "x")          # already a member: nothing to tell
    ch.subscribe(a, "y")
    ch.unsubscribe(a, "x")
    ch.unsubscribe(a, "x")        # not a member any more
    ch.drop(a)
    assert heard == [("join", "a", "x"), ("join", "a", "y"), ("leave", "a", "x"), ("leave", "a", "y")]


def test_publish_holds_frames_for_members_catching_up():
    ch = Channels()
    a, b = FakeSession("a"), FakeSession("b")
    ch.subscribe(a, "x")
    ch.subscribe(b, "x")
    held = {b: []}
    assert ch.publish("x", 1, b"m", held=held, offset=7) == 2
    assert len(a.got) == 1 and b.got == [] and held[b] == [(7, a.got[0])]
