"""The admin listener: health, readiness, metrics, the management API and
the live admin page (adminpage.py, at /ui/).

/healthz, /readyz, /metrics and the page's static files need no token.
Everything under /v1 needs `Authorization: Bearer <token>` (token from the
env var named by admin.token_env), compared in constant time. With no token configured the
API refuses to start unless the listener is bound to loopback.
"""

from __future__ import annotations

import asyncio
import hmac
import ipaddress
import os

from aiohttp import web

from . import adminpage, adminstatus, management, metrics
from .errors import ConfigError


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def admin_token(config) -> str | None:
    token = os.environ.get(config.admin.token_env) or None
    if token is None and not is_loopback(config.admin.host):
        raise ConfigError([f"{config.source}: admin.host is {config.admin.host!r} (not loopback) but "
                           f"${config.admin.token_env} is not set: the management API would be open "
                           "to the network. Set the token or bind admin.host to 127.0.0.1."])
    return token


def error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def build(node, cluster, on_drain, on_reload) -> web.Application:
    token = admin_token(node.config)
    expected = f"Bearer {token}".encode() if token else None

    @web.middleware
    async def require_token(request: web.Request, handler):
        if request.path.startswith("/v1/") and expected is not None:
            got = request.headers.get("Authorization", "").encode()
            if not hmac.compare_digest(got, expected):
                return error(401, "missing or wrong admin token")
        return await handler(request)

    async def healthz(request):
        return web.json_response({"status": "ok", "node": node.node_id})

    async def readyz(request):
        if node.draining:
            return web.json_response({"status": "draining"}, status=503)
        store = "unavailable" if cluster.store_down else "ok"
        if store == "unavailable" and cluster.refuses_new():
            # redis.on_outage: reject_new: new clients would get 503, so send them elsewhere.
            return web.json_response({"status": "store unavailable", "store": store}, status=503)
        return web.json_response({"status": "ready", "sessions": len(node.sessions), "store": store})

    async def metrics_page(request):
        return web.Response(body=metrics.exposition(), content_type="text/plain", charset="utf-8",
                            headers={"X-Content-Type-Options": "nosniff"})

    async def drain(request):
        asyncio.get_running_loop().call_soon(on_drain)
        return web.json_response({"draining": True, "node": node.node_id}, status=202)

    app = web.Application(middlewares=[require_token], client_max_size=1 << 20)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/metrics", metrics_page)
    app.router.add_post("/v1/drain", drain)
    management.add_routes(app, node, cluster)
    adminstatus.add_routes(app, node)
    adminpage.add_routes(app)
    app[management.RELOAD] = on_reload
    return app
