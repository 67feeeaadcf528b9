"""Path matching shared by config (shadowed-route checks) and routing (matching)."""

from __future__ import annotations


def path_has_prefix(path: str, prefix: str) -> bool:
    """Segment-aware prefix: '/api' matches '/api' and '/api/x', not '/apix'.

    A prefix that ends in '/' matches anything below it.
    """
    if prefix.endswith("/"):
        return path.startswith(prefix) or path == prefix[:-1]
    return path == prefix or path.startswith(prefix + "/")
