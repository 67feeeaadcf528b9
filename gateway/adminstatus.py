"""Read-only views of this node for the admin page (and for anyone with the
token): its backends' endpoints and the sessions it holds.

GET /v1/backends               every backend of the running config; for those with
                               endpoints, each endpoint's state as this node sees it
GET /v1/connections?limit=N    the newest N sessions on this node (default 100, max 1000)

Both answer for this node (with several workers, for the worker that took the
call): endpoint health and ejections are each node's own observation, and
listing every session of a cluster would be unbounded. Registered on the admin
app by `add_routes`; the token check is admin.py's, errors are management.py's
JSON errors.
"""

from __future__ import annotations

import itertools
import time

from aiohttp import web

from .errors import ApiError
from .management import session_record

DEFAULT_LIMIT = 100
MAX_LIMIT = 1000


def endpoint_state(pool, ep, now: float) -> str:
    """One word for the page. Draining first: an operator asked for it, and it
    holds whatever the endpoint's health; then the pool's own verdicts."""
    if ep.url in pool.draining:
        return "draining"
    if ep.ejected_until > now:
        return "ejected"
    if not ep.healthy:
        return "unhealthy"
    return "healthy"


def pool_view(pool) -> list[dict]:
    now = time.monotonic()
    out = []
    for ep in pool.endpoints:
        ejected_s = ep.ejected_until - now
        out.append({
            "url": ep.url,
            "state": endpoint_state(pool, ep, now),
            "sessions": ep.active,
            "failures": ep.failures,
            "ejected_for_s": round(ejected_s, 3) if ejected_s > 0 else None,
        })
    return out


def backends_view(node) -> list[dict]:
    routing = node.routing
    out = []
    for name, spec in sorted(node.config.backends.items()):
        pool = routing.pools.get(name)
        if pool is None:
            pool = getattr(routing.sinks.get(name), "pool", None)   # http backends keep one for their URLs
        out.append({
            "name": name,
            "type": spec.type,
            "balance": spec.balance if pool is not None else None,
            "health_checks": spec.health is not None,
            "endpoints": pool_view(pool) if pool is not None else [],
        })
    return out


def parse_limit(raw: str | None) -> int:
    if raw is None:
        return DEFAULT_LIMIT
    if not raw.isdigit() or len(raw) > 6 or not 1 <= int(raw) <= MAX_LIMIT:
        raise ApiError(400, f"limit must be a whole number from 1 to {MAX_LIMIT}, not {raw[:40]!r}")
    return int(raw)


def connections_view(node, limit: int) -> dict:
    # Newest first: dicts keep insertion order, so this walks only `limit` entries.
    newest = itertools.islice(reversed(node.sessions.values()), limit)
    return {"node": node.node_id, "total": len(node.sessions), "limit": limit,
            "connections": [session_record(node, s) for s in newest]}


def add_routes(app: web.Application, node) -> None:
    async def backends(request):
        return web.json_response({"node": node.node_id, "backends": backends_view(node)})

    async def connections(request):
        return web.json_response(connections_view(node, parse_limit(request.query.get("limit"))))

    app.router.add_get("/v1/backends", backends)
    app.router.add_get("/v1/connections", connections)
