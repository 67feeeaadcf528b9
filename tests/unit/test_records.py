"""gateway/records.py: versioned JSON records, read back tolerantly."""

from __future__ import annotations

import orjson
import pytest

from gateway import records
from gateway.errors import RECORD_VERSION, RecordVersionError


def test_a_session_record_round_trips():
    rec = {"session": "s1", "connection": "c1", "node": "n1", "sub": "alice", "channels": ["a", "b"],
           "state": "detached", "claims": {"role": "admin"}, "ip": "10.0.0.1"}
    back = records.decode("session", records.encode("session", rec))
    assert back == {**rec, "v": RECORD_VERSION, "kind": "session", "route": None, "endpoint": None,
                    "backend": None, "events": None}


def test_encode_stamps_this_releases_version_over_a_decoded_records():
    old = records.decode("session", b'{"v": 1, "kind": "node", "session": "s1"}')
    doc = orjson.loads(records.encode("session", {**old, "v": 0}))
    assert (doc["v"], doc["kind"]) == (RECORD_VERSION, "session")


def test_missing_session_fields_get_defaults():
    rec = records.decode("session", b'{"v": 1, "session": "s1", "node": "n1"}')
    assert rec["sub"] is None and rec["channels"] == [] and rec["state"] == "connected"
    assert rec["claims"] == {} and rec["ip"] == "" and rec["events"] is None


def test_defaults_are_not_shared_between_records():
    a = records.decode("session", b'{"v": 1, "session": "a"}')
    a["channels"].append("leaked")
    a["claims"]["x"] = 1
    b = records.decode("session", b'{"v": 1, "session": "b"}')
    assert b["channels"] == [] and b["claims"] == {}


def test_fields_a_newer_writer_added_are_kept_and_other_kinds_get_no_defaults():
    rec = records.decode("session", b'{"v": 1, "session": "s1", "future_field": 7}')
    assert rec["future_field"] == 7
    node = records.decode("node", b'{"v": 1, "id": "n1"}')
    assert node == {"v": 1, "id": "n1"}


def test_a_newer_version_raises_record_version_error():
    with pytest.raises(RecordVersionError) as info:
        records.decode("session", orjson.dumps({"v": RECORD_VERSION + 1, "session": "s1"}))
    assert info.value.kind == "session" and info.value.version == RECORD_VERSION + 1
    assert str(RECORD_VERSION) in str(info.value)


@pytest.mark.parametrize("raw", [None, b"", b"not json", b"[1, 2]", b'"text"', b"42", b'{"session": "s1"}',
                                 b'{"v": 0}', b'{"v": -3}', b'{"v": "1"}', b'{"v": true}', b'{"v": 1.5}',
                                 "\ufffd"])
def test_garbage_reads_as_none(raw):
    assert records.decode("session", raw) is None


def test_str_input_is_accepted():
    assert records.decode("node", '{"v": 1, "id": "n1"}')["id"] == "n1"
