"""The admin listener (SECURITY.md, "Listeners"): every /v1 route of the app's router
(enumerated, not listed here) refuses a request without the exact
`Authorization: Bearer <token>` with 401 and reaches no handler, whatever the path's
spelling; /healthz, /readyz, /metrics and /ui/ answer without a token."""

from __future__ import annotations

import re

import aiohttp
import pytest

from gateway import admin, config

from .support import ADMIN_TOKEN, record

WRONG = [
    ("none", None),
    ("empty", ""),
    ("a wrong token", "Bearer nope"),
    ("the last byte changed", "Bearer " + ADMIN_TOKEN[:-1] + chr(ord(ADMIN_TOKEN[-1]) ^ 1)),
    ("the first byte changed", "Bearer " + chr(ord(ADMIN_TOKEN[0]) ^ 1) + ADMIN_TOKEN[1:]),
    ("the token without its last byte", "Bearer " + ADMIN_TOKEN[:-1]),
    ("the token and one byte more", "Bearer " + ADMIN_TOKEN + "x"),
    ("bearer in lowercase", "bearer " + ADMIN_TOKEN),
    ("BEARER in capitals", "BEARER " + ADMIN_TOKEN),
    ("two spaces after Bearer", "Bearer  " + ADMIN_TOKEN),
    ("a tab after Bearer", "Bearer\t" + ADMIN_TOKEN),
    ("no scheme", ADMIN_TOKEN),
    ("Bearer alone", "Bearer"),
    ("Basic scheme", "Basic " + ADMIN_TOKEN),
    ("Token scheme", "Token " + ADMIN_TOKEN),
    ("the token twice", f"Bearer {ADMIN_TOKEN}, Bearer {ADMIN_TOKEN}"),
]


def concrete(path: str) -> str:
    """A router path with its {variables} filled in."""
    return re.sub(r"\{[^}]+\}", "x1", path)


def v1_routes(app) -> list[tuple[str, str]]:
    out = []
    for route in app.router.routes():
        info = route.resource.get_info()
        path = info.get("path") or info.get("formatter")
        if route.method != "HEAD" and path and path.startswith("/v1/"):
            out.append((route.method, concrete(path)))
    return sorted(set(out))


def spellings(path: str) -> list[str]:
    """The same route written the ways a path check might miss."""
    rest = path[len("/v1/"):]
    return [path, "//v1/" + rest, "/v1//" + rest, "/%76%31/" + rest, "/v1/./" + rest, "/x/../v1/" + rest,
            "/V1/" + rest, "/v1%2F" + rest, path + "/", path + "?token=" + ADMIN_TOKEN, path + "#x"]


def untouched(status: int, body: bytes) -> bool:
    """The answer of the token check (401 with its message) or of the router
    (aiohttp's own 404/405 text): no handler ran."""
    if status == 401:
        return b"missing or wrong admin token" in body
    return status in (404, 405) and not body.startswith(b"{")


async def test_every_v1_route_refuses_a_missing_wrong_or_oddly_spelled_token(gateway, record_property):
    gw = await gateway({"backends": {"e": {"type": "builtin", "handler": "echo"}},
                        "routes": [{"name": "r", "match": {"path_prefix": "/ws"}, "auth": "none", "backend": "e"}]})
    routes = v1_routes(gw.runner.app)
    assert len(routes) >= 19 and ("POST", "/v1/drain") in routes, routes
    failures = []
    cases = 0
    async with aiohttp.ClientSession() as http:
        async def call(method, path, auth):
            headers = {} if auth is None else {"Authorization": auth}
            async with http.request(method, gw.admin_url + path, headers=headers, data=b"{}",
                                    allow_redirects=False) as r:
                return r.status, await r.read()

        for method, path in routes:
            for what, auth in WRONG:
                cases += 1
                status, body = await call(method, path, auth)
                if status != 401 or not untouched(status, body):
                    failures.append(f"{method} {path} with {what}: {status} {body[:80]!r}")
            for spelled in spellings(path)[1:]:
                cases += 1
                status, body = await call(method, spelled, None)
                if not untouched(status, body):
                    failures.append(f"{method} {spelled} without a token: {status} {body[:80]!r}")
        # The control: the right token passes the check on every route (drain last, it stops the node).
        for method, path in [r for r in routes if r != ("POST", "/v1/drain")] + [("POST", "/v1/drain")]:
            cases += 1
            status, body = await call(method, path, f"Bearer {ADMIN_TOKEN}")
            if status == 401:
                failures.append(f"{method} {path} with the right token: 401")
    await gw.stop()   # the drain asked for it; nothing else here would
    record(record_property, f"{len(routes)} /v1 routes x {len(WRONG)} wrong Authorization values and "
           f"{len(spellings('/v1/x')) - 1} path spellings", cases,
           "401 (or the router's 404/405), never a handler; the right token passes", failures)
    assert not failures, failures


async def test_health_and_metrics_answer_without_a_token_as_security_md_says(gateway, record_property):
    gw = await gateway({"backends": {"e": {"type": "builtin", "handler": "echo"}},
                        "routes": [{"name": "r", "match": {"path_prefix": "/ws"}, "auth": "none", "backend": "e"}]})
    want = {"/healthz": 200, "/readyz": 200, "/metrics": 200, "/ui/": 200, "/ui/index.html": 200,
            "/": 302, "/ui/../v1/nodes": 401, "/ui/%2e%2e/v1/nodes": 401}
    failures = []
    async with aiohttp.ClientSession() as http:
        for path, status in want.items():
            async with http.get(gw.admin_url + path, allow_redirects=False) as r:
                body = await r.read()
                if r.status != status:
                    failures.append(f"{path}: {r.status}, wanted {status}")
                if r.headers.get("X-Content-Type-Options") != "nosniff":
                    failures.append(f"{path}: no nosniff")
                if path == "/metrics" and b"gateway_" not in body:
                    failures.append("/metrics: no gateway_ series")
                if path in ("/healthz", "/metrics") and ADMIN_TOKEN.encode() in body:
                    failures.append(f"{path}: shows the admin token")
    record(record_property, "GET /healthz /readyz /metrics /ui/ / and /ui/ escapes without a token", len(want),
           "200 (302 for /), /v1 behind them still 401", failures)
    assert not failures, failures


@pytest.mark.parametrize("host", ["0.0.0.0", "10.0.0.5", "::"])
def test_no_token_and_a_listener_off_loopback_refuses_to_start(monkeypatch, host, record_property):
    monkeypatch.delenv("GATEWAY_ADMIN_TOKEN")
    cfg = config.parse(f"admin: {{host: '{host}', port: 0}}\nbackends: {{e: {{type: builtin, handler: echo}}}}\n"
                       "routes: [{name: r, match: {path: /ws}, backend: e}]\n", source="t.yaml")
    failures = []
    try:
        admin.admin_token(cfg)
        failures.append(f"{host}: started without a token")
    except Exception as exc:   # ConfigError
        if "not loopback" not in str(exc):
            failures.append(f"{host}: {exc}")
    monkeypatch.setenv("GATEWAY_ADMIN_TOKEN", "")
    try:
        admin.admin_token(cfg)
        failures.append(f"{host}: started with an empty token")
    except Exception:
        pass
    record(record_property, f"admin.host {host}, GATEWAY_ADMIN_TOKEN unset or empty", 2, "refuses to start",
           failures)
    assert not failures, failures
