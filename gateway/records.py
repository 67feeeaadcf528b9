"""Records in the store, encoded: versioned JSON, read back tolerantly.

Compatibility rule (README "Upgrading"): nodes of release N and N+1 share a
store during a rolling upgrade. A record carries `"v": RECORD_VERSION`. A node
reads every version up to its own (fields added later are ignored, fields it
expects and an older writer did not write get defaults); a record with a
newer version raises RecordVersionError, which callers log and skip, never
crash on. A release that must change a field's meaning bumps the version.
"""

from __future__ import annotations

import orjson

from .errors import RECORD_VERSION, RecordVersionError

# Defaults for fields a version-1 reader expects; older records may lack them.
_SESSION_DEFAULTS = {"sub": None, "route": None, "endpoint": None, "backend": None, "channels": [],
                     "state": "connected", "ip": "", "claims": {}, "events": None}


def encode(kind: str, record: dict) -> bytes:
    # The writer's version and kind win over any a decoded record still carries:
    # re-writing an older record writes it in this release's format.
    return orjson.dumps({**record, "v": RECORD_VERSION, "kind": kind})


def decode(kind: str, raw: bytes | str | None) -> dict | None:
    """The record, or None for a missing or unreadable one. Raises RecordVersionError."""
    if raw is None:
        return None
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    if type(doc) is not dict:
        return None
    version = doc.get("v")
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        return None
    if version > RECORD_VERSION:
        raise RecordVersionError(kind, version)
    if kind == "session":
        for k, v in _SESSION_DEFAULTS.items():
            if k not in doc:
                # A fresh list or dict each time: a shared default would leak
                # one record's changes into every other.
                doc[k] = v.copy() if isinstance(v, (list, dict)) else v
    return doc
