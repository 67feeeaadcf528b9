"""The management API (DESIGN 6), for the whole cluster: push to connections,
users and channels; close a connection; subscribe it (optionally catching up
on channel history); presence; history; node records; reload.

Every call is answered by any node: gateway/delivery.py reaches sessions on
other nodes through the store. A cluster-wide call while the store is
unreachable answers 503, never a silent 0; a call for a session on this node
is served locally even then.

Registered on the admin aiohttp app by `add_routes(app, node)`; the token
check is admin.py's middleware. Answers are JSON; errors are
`{"error": "..."}` with 400 (bad input), 404 (unknown id), 410 (connection
gone: the node remembers recently closed ids for a while), 413 (message over
limits.max_message_bytes); the debug trace adds 409 (one runs already) and
429 (too many traced on that node). Request bodies are read with that cap,
never whole before checking.
"""

from __future__ import annotations

import json
import logging
import time

from aiohttp import web

from . import frames, trace
from .channels import check_name
from .errors import ApiError, ChannelError, StoreUnavailable
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

# An endpoint drain ends by itself after this long unless the call says otherwise
# (an endpoint that comes back at the same URL takes sessions again).
DRAIN_TTL_S = 600.0
MAX_DRAIN_TTL_S = 7 * 86400.0


def error(status: int, message: str, **extra) -> web.Response:
    return web.json_response({"error": message, **extra}, status=status)


async def read_body(request: web.Request, cap: int, what: str = "message") -> bytes:
    """The request body; 413 past `cap` bytes, without reading it all."""
    n = request.content_length
    if n is not None and n > cap:
        raise ApiError(413, f"{what} too big (max {cap} bytes)")
    chunks = []
    size = 0
    while True:
        chunk = await request.content.readany()
        if not chunk:
            break
        size += len(chunk)
        if size > cap:
            raise ApiError(413, f"{what} too big (max {cap} bytes)")
        chunks.append(chunk)
    return b"".join(chunks)


async def read_message(request: web.Request, cap: int) -> tuple[int, bytes]:
    """(opcode, payload) from a request body; 413 past `cap` bytes, without reading it all."""
    body = await read_body(request, cap)
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


async def read_json(request: web.Request, cap: int = 4096) -> dict:
    """A small JSON object body (400 otherwise, 413 past `cap` bytes)."""
    raw = await read_body(request, cap, "body")
    try:
        body = json.loads(raw or b"{}")
    except ValueError:
        raise ApiError(400, "body is not JSON") from None
    if not isinstance(body, dict):
        raise ApiError(400, "body must be a JSON object")
    return body


def _channel(request: web.Request) -> str:
    name = request.match_info["name"]
    try:
        return check_name(name)
    except ChannelError as exc:
        raise ApiError(400, str(exc)) from None


def _local_or_gone(node, delivery, conn_id: str):
    """The open session on this node; 410 if it ended here recently (or is closing), None otherwise."""
    s = delivery.local(conn_id)
    if s is not None and (s.state is State.OPEN or s.capture is not None):
        return s   # open, or draining (what is sent to it goes to its replay buffer)
    gone = node.closed.get(conn_id)
    if s is not None or gone is not None:
        code = gone[0] if gone is not None else s.close_code
        raise ApiError(410, "connection closed", connection=conn_id, code=code)
    return None


def session_record(node, s) -> dict:
    now = time.monotonic()
    sink = s.sink
    return {
        "connection": s.id,
        "session": s.session_id,
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


def add_routes(app: web.Application, node, cluster) -> None:
    """Register the /v1 management endpoints on the admin app. Every answer is
    the cluster's: `cluster.delivery` reaches sessions on other nodes through the store."""
    delivery = cluster.delivery

    def cap() -> int:
        return node.limits.max_message_bytes

    def session_id(request) -> str:
        conn_id = request.match_info["id"]
        if len(conn_id) > 128:
            raise ApiError(400, "connection id too long (max 128 characters)")
        return conn_id

    async def push_connection(request):
        conn_id = session_id(request)
        _local_or_gone(node, delivery, conn_id)
        opcode, body = await read_message(request, cap())
        # Read the body first, then look again: the session may have ended meanwhile.
        _local_or_gone(node, delivery, conn_id)
        return web.json_response(await delivery.send_to_connection(conn_id, opcode, body))

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
        conn_id = session_id(request)
        _local_or_gone(node, delivery, conn_id)
        answer = await delivery.close_connection(conn_id, code, reason)
        event(log, "closed_by_api", conn=answer["connection"], code=code)
        return web.json_response(answer)

    async def get_connection(request):
        conn_id = session_id(request)
        s = delivery.local(conn_id)
        if s is not None:
            return web.json_response(session_record(node, s))
        gone = node.closed.get(conn_id)
        if gone is not None:
            raise ApiError(410, "connection closed", connection=conn_id, code=gone[0], reason=gone[1])
        rec = await delivery.record_of(conn_id)
        if rec is not None:
            return web.json_response(rec)
        raise ApiError(404, "unknown connection", connection=conn_id)

    async def push_user(request):
        sub = request.match_info["sub"]
        opcode, body = await read_message(request, cap())
        return web.json_response(await delivery.send_to_user(sub, opcode, body))

    async def push_channel(request):
        name = _channel(request)
        opcode, body = await read_message(request, cap())
        return web.json_response(await delivery.send_to_channel(name, opcode, body))

    def since_epoch(request) -> tuple[int | None, str | None]:
        q = request.query
        raw = q.get("since")
        epoch = q.get("epoch") or None
        if raw is None:
            if epoch is not None:
                raise ApiError(400, "epoch needs since")
            return None, None
        if not raw.isdigit() or len(raw) > 18:
            raise ApiError(400, f"since must be a whole number >= 0, not {raw[:40]!r}")
        if epoch is not None and len(epoch) > 64:
            raise ApiError(400, "epoch too long")
        return int(raw), epoch

    async def subscribe(request):
        name = _channel(request)
        conn_id = session_id(request)
        _local_or_gone(node, delivery, conn_id)
        since, epoch = since_epoch(request)
        return web.json_response(await delivery.join(conn_id, name, since, epoch))

    async def unsubscribe(request):
        name = _channel(request)
        conn_id = session_id(request)
        _local_or_gone(node, delivery, conn_id)
        return web.json_response(await delivery.leave(conn_id, name))

    async def presence(request):
        return web.json_response(await delivery.presence(_channel(request)))

    async def history(request):
        name = _channel(request)
        since, epoch = since_epoch(request)
        return web.json_response(await delivery.history(name, since or 0, epoch))

    async def nodes(request):
        return web.json_response({"nodes": await cluster.nodes()})

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
        """POST drains an endpoint cluster-wide (DELETE ends the drain): body {"endpoint": URL, "ttl_s": N}."""
        name = request.match_info["name"]
        spec = node.config.backends.get(name)
        if spec is None:
            raise ApiError(404, "unknown backend", backend=name[:128])
        if spec.type != "websocket":
            raise ApiError(400, f"backend {name!r} is {spec.type}: only websocket backends have endpoints to drain")
        body = await read_json(request)
        url = body.get("endpoint")
        if not isinstance(url, str) or not url:
            raise ApiError(400, 'body must be {"endpoint": "<one of the backend\'s endpoint URLs>"}',
                           endpoints=list(spec.endpoints))
        draining = request.method == "POST"
        if draining and url not in spec.endpoints:
            raise ApiError(404, "not an endpoint of this backend", endpoint=url[:256], endpoints=list(spec.endpoints))
        ttl_s = body.get("ttl_s", DRAIN_TTL_S)
        if isinstance(ttl_s, bool) or not isinstance(ttl_s, (int, float)) or not 0 < ttl_s <= MAX_DRAIN_TTL_S:
            raise ApiError(400, f"ttl_s must be a number of seconds in (0, {MAX_DRAIN_TTL_S}]")
        answer = await delivery.drain_endpoint(name, url, draining, float(ttl_s))
        event(log, "endpoint_drain" if draining else "endpoint_undrain", backend=name, endpoint=url,
              ttl_s=ttl_s if draining else None, moving=answer["moving"])
        return web.json_response(answer, status=202 if draining else 200)

    async def trace_start(request):
        """POST: trace the session's frames, body {"max_frames": N, "max_s": S} (docs/debug-trace.md)."""
        conn_id = session_id(request)
        max_frames, max_s = trace.limits(await read_json(request))
        if delivery.local(conn_id) is None:
            gone = node.closed.get(conn_id)
            if gone is not None:
                raise ApiError(410, "connection closed", connection=conn_id, code=gone[0])
        answer = await delivery.trace("start", conn_id, max_frames, max_s)
        event(log, "trace_started", conn=answer["connection"], max_frames=max_frames, max_s=max_s)
        return web.json_response(answer)

    async def trace_read(request):
        """GET reads the session's trace, DELETE stops it (and reads it)."""
        what = "read" if request.method == "GET" else "stop"
        return web.json_response(await delivery.trace(what, session_id(request)))

    @web.middleware
    async def json_errors(request: web.Request, handler):
        if not request.path.startswith("/v1/"):
            return await handler(request)
        try:
            return await handler(request)
        except ApiError as exc:
            return error(exc.status, exc.message, **exc.extra)
        except StoreUnavailable:
            return error(503, "session store unreachable: cluster-wide answers need it; retry later")
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
    r.add_post("/v1/connections/{id}/trace", trace_start)
    r.add_get("/v1/connections/{id}/trace", trace_read)
    r.add_delete("/v1/connections/{id}/trace", trace_read)
    r.add_post("/v1/users/{sub}/messages", push_user)
    r.add_post("/v1/channels/{name}/messages", push_channel)
    r.add_put("/v1/connections/{id}/channels/{name}", subscribe)
    r.add_delete("/v1/connections/{id}/channels/{name}", unsubscribe)
    r.add_get("/v1/channels/{name}/presence", presence)
    r.add_get("/v1/channels/{name}/history", history)
    r.add_get("/v1/nodes", nodes)
    r.add_post("/v1/reload", reload)
    r.add_post("/v1/backends/{name}/endpoints/drain", endpoint_drain)
    r.add_delete("/v1/backends/{name}/endpoints/drain", endpoint_drain)
