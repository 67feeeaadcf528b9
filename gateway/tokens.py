"""Resume tokens: `<session id>.<secret>`, short enough for a close reason.

The session id finds the detached record; the secret proves the holder got
it from the 1012 (the store keeps only its SHA-256). The whole close reason
`resume=<token>` is 7 + 16 + 1 + 22 = 46 bytes, well inside RFC 6455's 123.
"""

from __future__ import annotations

import hashlib
import re
import secrets

_TOKEN = re.compile(r"([A-Za-z0-9_-]{8,64})\.([A-Za-z0-9_-]{16,64})")
REASON_PREFIX = "resume="


def new(session_id: str) -> tuple[str, str]:
    """A fresh token for the session, and the hash the store keeps."""
    secret = secrets.token_urlsafe(16)
    return f"{session_id}.{secret}", digest(secret)


def digest(secret: str) -> str:
    return hashlib.sha256(secret.encode()).hexdigest()


def parse(token: str) -> tuple[str, str] | None:
    """(session id, secret hash), or None for anything not shaped like a token."""
    m = _TOKEN.fullmatch(token)
    if m is None:
        return None
    return m.group(1), digest(m.group(2))


def reason(token: str) -> str:
    return REASON_PREFIX + token
