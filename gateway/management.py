"""The management API (DESIGN 6), one node: push to connections, users and
channels; close a connection; subscribe it; presence; node record; reload.

Registered on the admin aiohttp app by `add_routes(app, node)`; the token
check is admin.py's middleware. Answers are JSON; errors are
`{"error": "..."}` with 400 (bad input), 404 (unknown id), 410 (connection
gone: the node remembers recently closed ids for a while), 413 (message over
limits.max_message_bytes). Request bodies are read with that cap, never whole
before checking.
"""

from __future__ import annotations

import logging
import time

from aiohttp import web

from . import frames, metrics
from .channels import check_name
from .errors import ApiError, ChannelError
from .httpbackend import reply_opcode
from .logs import event
from .session import State

log = logging.getLogger("gateway.management")

# Close codes an operator may send (RFC 6455 7.4.1 / 7.4.2): normal, going
# away, policy, internal error, restart, try again later, and the
# application range. 1005, 1006 and 1015 never go on the wire.
ALLOWED_CLOSE_CODES = frozenset({1000, 1001, 1008, 1011, 1012, 1013}) | frozenset(range(3000, 5000))


# Besides text/*, JSON and no content type (the rule for backend replies):
# what `curl --data` sends, and other textual types.
_ALSO_TEXT = frozenset({"application/x-www-form-urlencoded", "application/xml", "application/javascript"})


# What POST /v1/reload calls (set by admin.build): returns the problems found,
# [] when applied, None when the supervisor was asked to reload every worker.
RELOAD: web.AppKey = web.AppKey("reload")

def error(status: int, message: str, **extra) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


async def read_message(request: web.Request, cap: int) -> tuple[int, bytes]:
    """(opcode, payload) from a request body; 413 past `cap` bytes, without reading it all."""
    n = request.content_length
    if n is not None and n > cap:
        raise ApiError(413, f"message too big (max {cap} bytes)")
    chunks = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        size += len(chunk)
        if size > cap:
            raise ApiError(413, f"message too big (max {cap} bytes)")
        chunks.append(chunk)
    body = b"".join(chunks)
    kind = request.query.get("type")
    if kind == "binary":
        return frames.OP_BINARY, body
    if kind == "text":
        if not frames.text_is_valid(body):
            raise ApiError(400, "type=text but the body is not valid UTF-8")
        return frames.OP_TEXT, body
    if kind is not None:
        raise ApiError(400, f"type must be text or binary, not {kind[:40]!r}")
    ctype = request.headers.get("Content-Type")
    if ctype and ctype.partition(";")[0].strip().lower() in _ALSO_TEXT:
        ctype = None   # textual by definition: text if it is UTF-8
    return reply_opcode(ctype, body), body


def _channel(request: web.Request) -> str:
    name = request.match_info["name"]
    try:
        return check_name(name)
    except ChannelError as exc:
        raise ApiError(400, str(exc)) from None


def _live_session(node, conn_id: str):
    """The open session with this id; 410 if it ended (or is closing), 404 if never seen."""
    s = node.sessions.get(conn_id)
    if s is not None and s.state is State.OPEN:
        return s
    gone = node.closed.get(conn_id)
    if s is not None or gone is not None:
        code = gone[0] if gone is not None else s.close_code
        raise ApiError(410, "connection closed", connection=conn_id, code=code)
    raise ApiError(404, "unknown connection", connection=conn_id)


def _sessions_of(node, sub: str):
    by_sub = getattr(node, "by_sub", None)
    if by_sub is not None:
        return list(by_sub.get(sub) or ())
    return [s for s in node.sessions.values() if s.sub == sub]


def session_record(node, s) -> dict:
    now = time.monotonic()
    sink = s.sink
    return {
        "connection": s.id,
        "session": getattr(s, "session_id", None) or s.id,
        "node": node.node_id,
        "route": getattr(s.route, "name", None),
        "sub": s.sub,
        "ip": s.ip,
        "state": "open" if s.state is State.OPEN else "closing",
        "backend": s.endpoint.url if s.endpoint is not None else getattr(sink, "name", None),
        "channels": sorted(s.channels or ()),
        "age_s": round(now - s.started, 3),
        "messages_in": s.c_msgs,
        "messages_out": s.u_msgs,
        "bytes_in": s.c_bytes,
        "bytes_out": s.u_bytes,
    }


def node_record(node) -> dict:
    return {
        "id": node.node_id,
        "state": "draining" if node.draining else "ready",
        "connections": len(node.sessions),
        "channels": len(node.channels.members),
        "heartbeat_age_s": 0.0,   # this node answers for itself; a cluster store records heartbeats
    }


def add_routes(app: web.Application, node) -> None:
    """Register the /v1 management endpoints on the admin app."""

    def cap() -> int:
        return node.limits.max_message_bytes

    async def push_connection(request):
        s = _live_session(node, request.match_info["id"])
        opcode, body = await read_message(request, cap())
        # Read the body first, then look again: the session may have ended meanwhile.
        s = _live_session(node, s.id)
        return web.json_response({"delivered": 1 if s.send_message(opcode, body) else 0})

    async def close_connection(request):
        q = request.query
        raw = q.get("code", "1000")
        try:
            code = int(raw)
        except ValueError:
            raise ApiError(400, f"code must be an integer, not {raw[:40]!r}") from None
        if code not in ALLOWED_CLOSE_CODES:
            raise ApiError(400, f"close code {code} not allowed (use 1000, 1001, 1008, 1011-1013 or 3000-4999)")
        reason = q.get("reason", "")
        if len(reason.encode("utf-8")) > 123:
            raise ApiError(400, "reason too long (max 123 bytes of UTF-8)")
        s = _live_session(node, request.match_info["id"])
        s.gateway_close(code, reason)
        event(log, "closed_by_api", conn=s.id, code=code)
        return web.json_response({"closed": True, "connection": s.id, "code": code})

    async def get_connection(request):
        conn_id = request.match_info["id"]
        s = node.sessions.get(conn_id)
        if s is not None:
            return web.json_response(session_record(node, s))
        gone = node.closed.get(conn_id)
        if gone is not None:
            raise ApiError(410, "connection closed", connection=conn_id, code=gone[0], reason=gone[1])
        raise ApiError(404, "unknown connection", connection=conn_id)

    async def push_user(request):
        sub = request.match_info["sub"]
        opcode, body = await read_message(request, cap())
        frame = frames.frame(opcode, body)
        n = sum(1 for s in _sessions_of(node, sub) if s.send_raw(frame))
        return web.json_response({"delivered": n})

    async def push_channel(request):
        name = _channel(request)
        opcode, body = await read_message(request, cap())
        return web.json_response({"delivered": node.channels.publish(name, opcode, body)})

    async def subscribe(request):
        name = _channel(request)
        s = _live_session(node, request.match_info["id"])
        try:
            changed = node.channels.subscribe(s, name)
        except ChannelError as exc:
            raise ApiError(400, str(exc)) from None
        return web.json_response({"connection": s.id, "channel": name, "subscribed": True, "changed": changed})

    async def unsubscribe(request):
        name = _channel(request)
        s = _live_session(node, request.match_info["id"])
        changed = node.channels.unsubscribe(s, name)
        return web.json_response({"connection": s.id, "channel": name, "subscribed": False, "changed": changed})

    async def presence(request):
        return web.json_response(node.channels.presence(_channel(request)))

    async def nodes(request):
        return web.json_response({"nodes": [node_record(node)]})

    async def reload(request):
        problems = request.app[RELOAD]()
        if problems is None:  # several workers: the supervisor forwards SIGHUP to each
            return web.json_response({"reloading": True, "workers": "all"}, status=202)
        if problems:
            raise ApiError(400, "config invalid; nothing changed", problems=problems)
        cfg = node.config
        return web.json_response({"reloaded": True, "config": cfg.source,
                                  "routes": len(cfg.routes), "backends": len(cfg.backends)})

    async def endpoint_drain(request):
        raise ApiError(501, "draining backend endpoints needs session reattach, which this release "
                            "does not have yet")

    @web.middleware
    async def json_errors(request: web.Request, handler):
        if not request.path.startswith("/v1/"):
            return await handler(request)
        try:
            return await handler(request)
        except ApiError as exc:
            return error(exc.status, exc.message, **exc.extra)
        except web.HTTPMethodNotAllowed as exc:
            return error(405, f"method {request.method} not allowed here (allowed: "
                              f"{', '.join(sorted(exc.allowed_methods))})")
        except web.HTTPNotFound:
            return error(404, f"no such endpoint: {request.method} {request.path}")

    app.middlewares.append(json_errors)
    r = app.router
    r.add_post("/v1/connections/{id}/messages", push_connection)
    r.add_delete("/v1/connections/{id}", close_connection)
    r.add_get("/v1/connections/{id}", get_connection)
    r.add_post("/v1/users/{sub}/messages", push_user)
    r.add_post("/v1/channels/{name}/messages", push_channel)
    r.add_put("/v1/connections/{id}/channels/{name}", subscribe)
    r.add_delete("/v1/connections/{id}/channels/{name}", unsubscribe)
    r.add_get("/v1/channels/{name}/presence", presence)
    r.add_get("/v1/nodes", nodes)
    r.add_post("/v1/reload", reload)
    r.add_post("/v1/backends/{name}/endpoints/drain", endpoint_drain)
