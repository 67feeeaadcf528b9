"""The chat demo's backend: an HTTP backend of the gateway (examples/chat/README.md).

It holds no WebSocket. The gateway POSTs every client message here
(`Gateway-Event: message`, the message as the body) and the session's
`connect` and `disconnect` events; the answer is at most one message for that
client. Everything else goes through the gateway's management API: a chat
line is published to the room's channel (`POST /v1/channels/room:NAME/messages`),
who is here is the channel's presence. So this process keeps no socket per
user: it can restart, or run as several copies, while the users stay connected,
and when a gateway node drains its users resume on another node without this
backend noticing (their requests then carry `Gateway-Resumed: 1`).

A room NAME is two channels: `room:NAME` (the chat; the gateway keeps its last
messages, routes.yaml `channels:`) and `members:NAME` (who-is-here updates,
not worth keeping). Joining goes through `PUT /v1/connections/{id}/channels/room:NAME?since=K`
rather than a `Gateway-Subscribe` reply header because the gateway then sends
the history and what is new without a gap or a repeat; `members:NAME` is joined
with the header.

It also serves the page (static/), the project's JS client (clients/js/src/,
the repository's own file, not a copy) and, for the demo only, `/token?user=NAME`,
which hands out a signed JWT to anyone who asks.

    python examples/chat/backend.py --port 8000 --admin http://127.0.0.1:9090 \
        --gateway ws://127.0.0.1:8080/chat
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import json
import os
import re
import secrets
import sys
import time
from pathlib import Path

import aiohttp
import jwt
from aiohttp import web

HERE = Path(__file__).resolve().parent
STATIC = HERE / "static"
CLIENT = HERE.parent.parent / "clients" / "js" / "src"

# Demo only: the secret is in this file, so anyone can mint tokens. A real
# deployment has its identity provider sign tokens and the gateway verify them
# with its public key (routes.yaml auth.jwt.keys: public_key_file or jwks_url).
DEMO_SECRET = "chat-demo-secret-NOT-FOR-PRODUCTION-0123456789abcdef"
SECRET_ENV = "CHAT_JWT_SECRET"
TOKEN_TTL_S = 3600

ROOM = re.compile(r"[a-z0-9_-]{1,32}")
USER = re.compile(r"[A-Za-z0-9_.-]{1,32}")
MAX_TEXT = 2000            # characters in one chat line
HISTORY_SIZE = 50          # routes.yaml channels[room:*].history.size
MAX_ROOMS = 16             # rooms one session may be in
SAID_MAX = 100_000         # chat lines remembered per session (see `said`)


def secret() -> str:
    return os.environ.get(SECRET_ENV) or DEMO_SECRET


def mint(user: str, key: str | None = None, ttl_s: int = TOKEN_TTL_S) -> str:
    """A demo JWT for `user` (HS256), as an identity provider would issue it."""
    if not USER.fullmatch(user):
        raise ValueError(f"user must be 1-32 letters, digits or _ . - (got {user[:40]!r})")
    now = int(time.time())
    return jwt.encode({"sub": user, "iat": now, "exp": now + ttl_s}, key or secret(), algorithm="HS256")


class AdminUnreachable(Exception):
    """No gateway node's admin listener took the connection."""


class AdminError(Exception):
    """The management API answered with an error status."""

    def __init__(self, status: int, body: dict):
        super().__init__(f"management API answered {status}: {body.get('error', body)}")
        self.status = status
        self.body = body


class Admin:
    """The gateway's management API. Every node answers for the whole cluster, so
    any one will do; when one is gone (drained, restarted) the next is asked. A request
    that did not reach a node whole moves on; so does a 503 (the node cannot reach its
    store, or is stopping) to a call that may be repeated (GET, PUT, DELETE). A publish
    that may have been carried out is never sent again, so a chat line is not published
    twice: its 503 is the caller's."""

    def __init__(self, urls: list[str], token: str | None):
        self.urls = list(urls)
        self.headers = {"Authorization": f"Bearer {token}"} if token else {}
        self.http: aiohttp.ClientSession | None = None
        self.current = 0

    async def start(self) -> None:
        # No keep-alive: a node that has gone away then shows as a refused connection
        # (safe to send elsewhere), never as a pooled connection cut mid-request.
        self.http = aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True),
                                          timeout=aiohttp.ClientTimeout(total=10))

    async def close(self) -> None:
        if self.http is not None:
            await self.http.close()

    async def call(self, method: str, path: str, body: dict | None = None) -> tuple[int, dict]:
        headers, data = self.headers, None
        if body is not None:
            headers, data = {**headers, "Content-Type": "application/json"}, json.dumps(body)
        tried = []
        start = self.current   # once: a concurrent call may move it meanwhile, and each node is tried once
        for i in range(len(self.urls)):
            url = self.urls[(start + i) % len(self.urls)]
            try:
                async with self.http.request(method, url + path, headers=headers, data=data) as r:
                    text = await r.text()
                    if r.status == 503 and method != "POST" and i + 1 < len(self.urls):
                        tried.append(f"{url}: 503 {text[:100]}")
                        continue
                    self.current = (start + i) % len(self.urls)
                    try:
                        return r.status, json.loads(text)
                    except ValueError:
                        return r.status, {"error": text[:200]}
            except aiohttp.ClientOSError as exc:
                if not _not_sent(exc):
                    raise
                tried.append(f"{url}: {exc}")
        raise AdminUnreachable(f"no gateway node took the call: {'; '.join(tried)}")

    async def publish(self, channel: str, message: dict) -> dict:
        status, answer = await self.call("POST", f"/v1/channels/{channel}/messages", message)
        if status != 200:
            raise AdminError(status, answer)
        return answer


ADMIN_FAILURES = (AdminUnreachable, AdminError, aiohttp.ClientError, asyncio.TimeoutError)


def _not_sent(exc: aiohttp.ClientOSError) -> bool:
    """The request never reached the node whole: refused, or cut while it was being
    written (a node closing its listener as it exits), so it cannot have been carried out."""
    return isinstance(exc, aiohttp.ClientConnectorError) or str(exc).startswith("Can not write request body")


class ChatBackend:
    """The chat: what each session says is published to its room; rooms, presence
    and history live in the gateway."""

    def __init__(self, admin_urls: list[str], admin_token: str | None, gateways: list[str]):
        self.admin = Admin(admin_urls, admin_token)
        self.gateways = list(gateways)
        self.boot = secrets.token_hex(3)    # message ids stay unique across restarts of this process
        self.count = 0
        self.rooms: dict[str, set[str]] = {}    # session id -> rooms it joined (for its disconnect)
        # What each session said, in the order it arrived, so a demo (or a test) can
        # check that nothing was lost, doubled or reordered on the way in.
        self.said: dict[str, collections.deque[str]] = {}
        self.connects = 0
        self.resumed_requests = 0
        self.runner: web.AppRunner | None = None
        self.port = 0

    # ---------------------------------------------------------------- serving
    def app(self) -> web.Application:
        app = web.Application(client_max_size=1 << 20)
        app.router.add_get("/", self.page)
        app.router.add_get("/config.json", self.config)
        app.router.add_get("/token", self.token)
        app.router.add_post("/events", self.event)
        app.router.add_static("/static/", STATIC)
        if CLIENT.is_dir():
            app.router.add_static("/client/", CLIENT)
        else:
            app.router.add_get("/client/{tail:.*}", self.no_client)
        return app

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        await self.admin.start()
        self.runner = web.AppRunner(self.app(), handle_signals=False, access_log=None, shutdown_timeout=1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, host, port)
        await site.start()
        self.port = site._server.sockets[0].getsockname()[1]

    async def stop(self) -> None:
        if self.runner is not None:
            await self.runner.cleanup()
        await self.admin.close()

    async def page(self, request: web.Request) -> web.StreamResponse:
        origins = " ".join(sorted({_origin(g) for g in self.gateways}))
        return web.FileResponse(STATIC / "index.html", headers={
            "Content-Security-Policy": f"default-src 'self'; connect-src 'self' {origins}; "
                                       "img-src 'self' data:; object-src 'none'; base-uri 'none'",
            "Cache-Control": "no-cache"})

    async def config(self, request: web.Request) -> web.Response:
        return web.json_response({"gateways": self.gateways, "history": HISTORY_SIZE})

    async def no_client(self, request: web.Request) -> web.Response:
        return web.json_response({"error": f"the JS client is not at {CLIENT}"}, status=404)

    async def token(self, request: web.Request) -> web.Response:
        """Demo only: a token for whoever asks. A real page gets its token from a login."""
        user = request.query.get("user", "")
        try:
            token = mint(user)
        except ValueError as exc:
            return web.json_response({"error": str(exc)}, status=400)
        return web.json_response({"user": user, "token": token, "expires_in": TOKEN_TTL_S, "demo_only": True},
                                 headers={"Cache-Control": "no-store"})

    # ---------------------------------------------------------------- the gateway's events
    async def event(self, request: web.Request) -> web.Response:
        h = request.headers
        kind = h.get("Gateway-Event")
        sid = h.get("Gateway-Session-Id")
        user = h.get("Gateway-Claim-sub")
        if not sid or not user:
            return web.json_response({"error": "not a gateway event (Gateway-Session-Id, Gateway-Claim-sub)"},
                                     status=400)
        if h.get("Gateway-Resumed") == "1":
            self.resumed_requests += 1
        if kind == "connect":
            self.connects += 1
            return web.json_response({"type": "welcome", "user": user})
        if kind == "disconnect":
            await self.gone(sid)
            return web.Response(status=204)
        if kind != "message":
            return web.json_response({"error": f"unknown Gateway-Event {kind!r}"}, status=400)
        try:
            msg = json.loads(await request.text())
            if not isinstance(msg, dict):
                raise ValueError
        except ValueError:
            return reply({"type": "error", "error": "send JSON objects: {\"type\": \"join\", \"room\": ...}"})
        try:
            return await self.handle(sid, user, msg)
        except ADMIN_FAILURES as exc:
            return reply({"type": "error", "error": f"the gateway's management API failed: {exc}"})

    async def handle(self, sid: str, user: str, msg: dict) -> web.Response:
        kind = msg.get("type")
        room = msg.get("room")
        if kind not in ("join", "say", "who", "leave"):
            return reply({"type": "error", "error": "unknown type (use join, say, who, leave)"})
        if not isinstance(room, str) or not ROOM.fullmatch(room):
            return reply({"type": "error", "error": "room must be 1-32 of a-z 0-9 _ -"})
        joined = self.rooms.setdefault(sid, set())
        if kind == "join":
            if room not in joined and len(joined) >= MAX_ROOMS:
                return reply({"type": "error", "error": f"at most {MAX_ROOMS} rooms"})
            await self.join(sid, room)
            joined.add(room)
            members = await self.members(room)
            await self.admin.publish(f"members:{room}", {"type": "members", "room": room, "members": members})
            return reply({"type": "joined", "room": room, "members": members},
                         {"Gateway-Subscribe": f"members:{room}"})
        if room not in joined:
            return reply({"type": "error", "room": room, "error": "join the room first"})
        if kind == "say":
            text = msg.get("text")
            if not isinstance(text, str) or not text.strip() or len(text) > MAX_TEXT:
                return reply({"type": "error", "room": room, "error": f"text must be 1-{MAX_TEXT} characters"})
            said = self.said.get(sid)
            if said is None:
                said = self.said[sid] = collections.deque(maxlen=SAID_MAX)
            said.append(text)
            await self.say(room, user, text)
            return web.Response(status=204)
        if kind == "who":
            return reply({"type": "members", "room": room, "members": await self.members(room)})
        # leave
        status, body = await self.admin.call("DELETE", f"/v1/connections/{sid}/channels/room:{room}")
        if status != 200:
            raise AdminError(status, body)
        joined.discard(room)
        await self.admin.publish(f"members:{room}", {"type": "members", "room": room,
                                                    "members": await self.members(room)})
        return reply({"type": "left", "room": room}, {"Gateway-Unsubscribe": f"members:{room}"})

    async def say(self, room: str, user: str, text: str) -> dict:
        """Publish a chat line to everyone in `room` (kept in the room's history)."""
        self.count += 1
        return await self.admin.publish(f"room:{room}", {
            "type": "message", "room": room, "id": f"{self.boot}.{self.count}", "from": user, "text": text,
            "ts": round(time.time(), 3)})

    async def join(self, sid: str, room: str) -> None:
        """Join room:NAME with its history: the gateway sends the kept messages, then the
        new ones, in order. The history may hold fewer than HISTORY_SIZE, or have moved on
        (410: offset trimmed): then ask again from just before its oldest message."""
        since = 0
        for _ in range(3):
            status, body = await self.admin.call("PUT", f"/v1/connections/{sid}/channels/room:{room}?since={since}")
            if status == 200:
                return
            if status != 410:
                raise AdminError(status, body)
            since = max(0, int(body.get("offset", 0)) - HISTORY_SIZE)
        raise AdminError(status, body)

    async def members(self, room: str) -> list[str]:
        status, body = await self.admin.call("GET", f"/v1/channels/room:{room}/presence")
        if status != 200:
            raise AdminError(status, body)
        return body["subjects"]

    async def gone(self, sid: str) -> None:
        """A session ended: tell the rooms it was in who is left (its membership is gone
        from the gateway by now, so presence no longer lists it)."""
        self.said.pop(sid, None)
        for room in sorted(self.rooms.pop(sid, ())):
            try:
                members = await self.members(room)
                await self.admin.publish(f"members:{room}", {"type": "members", "room": room, "members": members})
            except ADMIN_FAILURES as exc:
                print(f"backend: could not update room {room}: {exc}", file=sys.stderr)


def reply(message: dict, headers: dict | None = None) -> web.Response:
    return web.json_response(message, headers=headers)


def _origin(url: str) -> str:
    scheme, _, rest = url.partition("://")
    return f"{scheme}://{rest.split('/', 1)[0]}"


async def serve(args: argparse.Namespace) -> None:
    chat = ChatBackend(args.admin, os.environ.get("GATEWAY_ADMIN_TOKEN"), args.gateway)
    await chat.start(args.host, args.port)
    print(f"backend: http://{args.host}:{chat.port}/ (management API at {', '.join(args.admin)})", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await chat.stop()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="The chat demo's HTTP backend (see examples/chat/README.md).")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--admin", action="append", default=None,
                   help="a gateway node's admin URL (repeat for several nodes); default http://127.0.0.1:9090")
    p.add_argument("--gateway", action="append", default=None,
                   help="the WebSocket URL the page connects to (repeat for several nodes); "
                        "default ws://127.0.0.1:8080/chat")
    args = p.parse_args(argv)
    args.admin = args.admin or ["http://127.0.0.1:9090"]
    args.gateway = args.gateway or ["ws://127.0.0.1:8080/chat"]
    try:
        asyncio.run(serve(args))
    except KeyboardInterrupt:
        pass


if __name__ == "__main__":
    main()
