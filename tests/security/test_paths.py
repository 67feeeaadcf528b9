"""Path tricks in routing (SECURITY.md, "Paths"): a request is routed by its path
percent-decoded once, matched as it is (case-sensitive, no slash merging, no dot
resolution); a path with a dot segment (sent as it is or encoded) is 400, and what
goes on to a backend (forward_path) is encoded again. So no trick reaches a route it
should not, nor a backend endpoint it should not once that backend resolves dot
segments and decodes the path itself (the most lenient backend there is).

Two backends share one aiohttp server, told apart by the endpoint's path (/pub,
/priv): a path that crossed from one to the other would show at the server."""

from __future__ import annotations

import posixpath
from urllib.parse import unquote

from .support import exchange, jwt_auth, record, token, upgrade

# (target, the statuses it may get, the route's backend endpoint when it opens)
CASES = [
    ("/private", {403}, None),                          # the control: the claim is enforced
    ("/public/x", {101}, "/pub"),                       # the control: the public route works
    ("/public/../private", {400}, None),
    ("/public/%2e%2e/private", {400}, None),
    ("/public/%2E%2E/%2e%2e/priv", {400}, None),
    ("/public%2F..%2F..%2Fpriv", {400}, None),
    ("/public/.%2e/.%2e/priv", {400}, None),
    ("/public/..%2fprivate", {400}, None),
    ("/public/./../private", {400}, None),
    ("/public/x/../../private", {400}, None),
    ("/public/%c0%ae%c0%ae/private", {400}, None),      # overlong UTF-8 dots
    ("/public%3F/../private", {400}, None),
    ("//private", {404}, None),
    ("///private", {404}, None),
    ("//public/../private", {400}, None),
    ("/public//private", {101}, "/pub"),
    ("/public/...", {101}, "/pub"),
    ("/public/..;/private", {101}, "/pub"),
    ("/public/..\\private", {101}, "/pub"),
    ("/public/%252e%252e/private", {101}, "/pub"),      # decoded once: stays %2e%2e
    ("/public/%u002e%u002e/private", {101}, "/pub"),
    ("/private.", {404}, None),
    ("/private./x", {404}, None),
    ("/private%2e", {404}, None),
    ("/PRIVATE", {404}, None),
    ("/Private/x", {404}, None),
    ("/%70rivate", {403}, None),                        # decoded: /private, its claim checked
    ("/private%2Fx", {403}, None),                      # decoded: /private/x, its claim checked
    ("/public?/../private", {101}, "/pub"),
    ("/public?x=1#/../private", {400}, None),
    ("/private#", {400}, None),
    ("/public#/../../priv", {400}, None),
    ("/exact", {101}, "/pub"),
    ("/exact/", {404}, None),
    ("/exact/../private", {400}, None),
    ("/exact?next=/private", {101}, "/pub"),
    ("/exact%3F", {404}, None),
]


def config(backend_url: str) -> dict:
    pub, priv = backend_url.replace("/ws", "/pub"), backend_url.replace("/ws", "/priv")
    return {
        "auth": jwt_auth(),
        "backends": {"pub": {"type": "websocket", "endpoints": [pub]},
                     "priv": {"type": "websocket", "endpoints": [priv]}},
        "routes": [
            {"name": "private", "match": {"path_prefix": "/private", "claims": {"role": "admin"}},
             "auth": "required", "backend": "priv", "forward_path": True},
            {"name": "public", "match": {"path_prefix": "/public"}, "auth": "none", "backend": "pub",
             "forward_path": True},
            {"name": "exact", "match": {"path": "/exact"}, "auth": "none", "backend": "pub"},
        ],
    }


def resolved(path_qs: str) -> str:
    """The path as the most lenient backend resolves it: decoded, dot segments gone."""
    return posixpath.normpath(unquote(path_qs.partition("?")[0]))


def under(path: str, prefix: str) -> bool:
    return path == prefix or path.startswith(prefix + "/")


async def test_no_path_trick_reaches_another_route_or_backend(gateway, backend, record_property):
    b = await backend()
    gw = await gateway(config(b.url))
    user = ("Authorization", f"Bearer {token('mallory', role='user')}")   # valid, but not admin
    failures = []
    for target, statuses, endpoint in CASES:
        before = len(b.paths)
        a = await exchange(gw.ports[0], upgrade(target, extra=[user]))
        a.close()
        new = b.paths[before:]
        if a.status not in statuses:
            failures.append(f"{target}: {a.status}, wanted {sorted(statuses)}")
        for p in new:
            if under(resolved(p), "/priv"):
                failures.append(f"{target}: reached the private endpoint as {p!r}")
        if endpoint is None and new:
            failures.append(f"{target}: refused, yet the backend saw {new!r}")
        if endpoint is not None and a.status == 101 and not (
                len(new) == 1 and under(resolved(new[0]), endpoint)):
            failures.append(f"{target}: backend paths {new!r}, wanted one under {endpoint}")
    record(record_property, "../, %2e%2e, %2F, //, trailing dots, case, ?/# tricks toward a claim-guarded route",
           len(CASES), "400/403/404, or 101 on the public route with nothing under /priv", failures)
    assert not failures, failures
    # The control the other way: an admin reaches the private route, its endpoint.
    admin = ("Authorization", f"Bearer {token('root', role='admin')}")
    a = await exchange(gw.ports[0], upgrade("/private/x", extra=[admin]))
    a.close()
    assert a.status == 101 and b.paths[-1] == "/priv/x"
