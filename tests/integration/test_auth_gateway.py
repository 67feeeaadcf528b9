"""Identity at the edge, end to end: every refusal has its status and the backend sees nothing."""

from __future__ import annotations

import asyncio
import base64
import json
import time

import aiohttp
import jwt
import pytest
from aiohttp import WSMsgType, web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from joserfc import jwt as jose_jwt
from joserfc.jwk import RSAKey

from gateway import frames

from ..helpers import RawClient, until

SECRET = "k" * 64
RSA_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
RSA_PUBLIC_PEM = RSA_KEY.public_key().public_bytes(serialization.Encoding.PEM,
                                                   serialization.PublicFormat.SubjectPublicKeyInfo)
OTHER_KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)


def hs(claims: dict | None = None, secret: str = SECRET, alg: str = "HS256", **headers) -> str:
    body = {"sub": "alice", "exp": int(time.time()) + 3600, **(claims or {})}
    return jwt.encode(body, secret, algorithm=alg, headers=headers or None)


def rs(claims: dict | None = None, key=RSA_KEY, kid: str | None = "k1") -> str:
    body = {"sub": "alice", "exp": int(time.time()) + 3600, **(claims or {})}
    return jwt.encode(body, key, algorithm="RS256", headers={"kid": kid} if kid else None)


def config(backend_url: str, jwt_cfg: dict | None = None, routes: list | None = None, **top) -> dict:
    return {
        "auth": {"jwt": jwt_cfg or {"algorithms": ["HS256"], "keys": {"secret_env": "TEST_JWT_SECRET"},
                                    "sources": ["header", "query:access_token", "cookie:token", "subprotocol"],
                                    "forward_claims": ["sub", "tenant"]},
                 **top.pop("auth_extra", {})},
        "backends": {"b": {"type": "websocket", "endpoints": [backend_url]}},
        "routes": routes or [{"name": "r", "match": {"path_prefix": "/ws"}, "auth": "required", "backend": "b",
                              "forward_path": True}],
        **top,
    }


@pytest.fixture(autouse=True)
def secret_env(monkeypatch):
    monkeypatch.setenv("TEST_JWT_SECRET", SECRET)


async def refused(http, url: str, **kw) -> tuple[int, str]:
    with pytest.raises(aiohttp.WSServerHandshakeError) as exc:
        await http.ws_connect(url, **kw)
    return exc.value.status, exc.value.message


async def status_and_body(url: str, headers: dict) -> tuple[int, dict]:
    c = await RawClient.connect(url, headers)
    body = await c.reader.read()
    c.close()
    return c.status, json.loads(body) if body else {}


async def test_valid_token_in_each_source_reaches_backend_with_claims(gateway, backend, http):
    b = await backend()
    gw = await gateway(config(b.url))
    token = hs({"tenant": "acme", "secret_claim": "not forwarded"})
    async with http.ws_connect(gw.url + "/ws", headers={"Authorization": f"Bearer {token}"}) as ws:
        await ws.send_str("hi")
        assert (await ws.receive()).data == "hi"
    async with http.ws_connect(gw.url + f"/ws/x?access_token={token}&keep=1"):
        pass
    async with http.ws_connect(gw.url + "/ws", headers={"Cookie": f"token={token}"}):
        pass
    async with http.ws_connect(gw.url + "/ws", protocols=("chat.v1", f"bearer.{token}")):
        pass
    h = b.requests[0]
    assert h["Gateway-Claim-sub"] == "alice" and h["Gateway-Claim-tenant"] == "acme"
    assert not any(k.lower() == "gateway-claim-secret_claim" for k in h)
    assert "Authorization" not in h                     # consumed at the edge
    assert b.paths[1] == "/ws/x?keep=1"                  # query token stripped
    assert b.requests[3]["Sec-WebSocket-Protocol"] == "chat.v1"   # bearer entry removed


async def test_token_from_independent_library_is_accepted(gateway, backend, http):
    b = await backend()
    key = RSAKey.import_key(RSA_KEY.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                  serialization.NoEncryption()))
    token = jose_jwt.encode({"alg": "RS256"}, {"sub": "bob", "exp": int(time.time()) + 60}, key)
    path = f"/tmp/gw-test-{id(key)}.pem"
    with open(path, "wb") as fh:
        fh.write(RSA_PUBLIC_PEM)
    gw = await gateway(config(b.url, {"algorithms": ["RS256"], "keys": {"public_key_file": path}}))
    async with http.ws_connect(gw.url + "/ws", headers={"Authorization": f"Bearer {token}"}):
        pass
    assert b.requests[0]["Gateway-Claim-sub"] == "bob"


def _b64(d: dict) -> str:
    return base64.urlsafe_b64encode(json.dumps(d).encode()).rstrip(b"=").decode()


def _tampered() -> str:
    head, _, sig = hs().split(".")
    return f"{head}.{_b64({'sub': 'admin', 'exp': int(time.time()) + 3600})}.{sig}"


ATTACKS = {
    "missing": (None, 401, "missing token"),
    "alg_none": (f"{_b64({'alg': 'none', 'typ': 'JWT'})}.{_b64({'sub': 'alice', 'exp': 9999999999})}.", 401,
                 "algorithm not allowed"),
    "alg_confusion_hs256_with_rsa_public_key": (None, 401, None),   # minted below
    "tampered_payload": (_tampered(), 401, "bad signature"),
    "wrong_secret": (hs(secret="x" * 64), 401, "bad signature"),
    "expired": (hs({"exp": int(time.time()) - 3600}), 401, "token expired"),
    "not_yet_valid": (hs({"nbf": int(time.time()) + 3600}), 401, "token not yet valid"),
    "garbage": ("not.a.token", 401, "malformed token"),
    "hs512_not_in_allowlist": (hs(alg="HS512"), 401, "algorithm not allowed"),
}


@pytest.mark.parametrize("case", sorted(ATTACKS))
async def test_attacks_are_refused_and_never_reach_backend(gateway, backend, case):
    b = await backend()
    gw = await gateway(config(b.url))
    token, status, reason = ATTACKS[case]
    if case == "alg_confusion_hs256_with_rsa_public_key":
        # Signed by hand: PyJWT itself refuses to use a PEM as an HMAC secret.
        import hashlib
        import hmac as hmac_mod

        signing = f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64({'sub': 'admin', 'exp': 9999999999})}"
        sig = hmac_mod.new(RSA_PUBLIC_PEM, signing.encode(), hashlib.sha256).digest()
        token = signing + "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()
        reason = "bad signature"
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    got_status, body = await status_and_body(gw.url + "/ws", headers)
    assert got_status == status
    assert body == {"error": reason}
    assert b.requests == []


async def test_alg_confusion_against_an_rs256_gateway(gateway, backend, tmp_path):
    import hashlib
    import hmac as hmac_mod

    b = await backend()
    pem = tmp_path / "pub.pem"
    pem.write_bytes(RSA_PUBLIC_PEM)
    gw = await gateway(config(b.url, {"algorithms": ["RS256"], "keys": {"public_key_file": str(pem)}}))
    signing = f"{_b64({'alg': 'HS256', 'typ': 'JWT'})}.{_b64({'sub': 'admin', 'exp': 9999999999})}"
    sig = hmac_mod.new(RSA_PUBLIC_PEM, signing.encode(), hashlib.sha256).digest()
    token = signing + "." + base64.urlsafe_b64encode(sig).rstrip(b"=").decode()
    status, body = await status_and_body(gw.url + "/ws", {"Authorization": f"Bearer {token}"})
    assert (status, body) == (401, {"error": "algorithm not allowed"})
    assert b.requests == []


async def test_wrong_issuer_and_audience(gateway, backend):
    b = await backend()
    gw = await gateway(config(b.url, {"algorithms": ["HS256"], "keys": {"secret_env": "TEST_JWT_SECRET"},
                                      "issuer": "https://idp", "audience": "gw"}))
    good = hs({"iss": "https://idp", "aud": "gw"})
    assert (await status_and_body(gw.url + "/ws", {"Authorization": f"Bearer {hs({'iss': 'https://evil', 'aud': 'gw'})}"})) \
        == (401, {"error": "wrong issuer"})
    assert (await status_and_body(gw.url + "/ws", {"Authorization": f"Bearer {hs({'iss': 'https://idp', 'aud': 'other'})}"})) \
        == (401, {"error": "wrong audience"})
    c = await RawClient.connect(gw.url + "/ws", {"Authorization": f"Bearer {good}"})
    assert c.status == 101
    c.close()
    assert len(b.requests) == 1


async def test_100_kb_token_is_refused_before_parsing(gateway, backend):
    b = await backend()
    gw = await gateway(config(b.url))
    big = "a" * 100_000
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports[0])
    writer.write(f"GET /ws HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {big}\r\n\r\n".encode())
    answer = await asyncio.wait_for(reader.read(), 5)
    assert answer.startswith(b"HTTP/1.1 431")
    writer.close()
    # Just under the head limit but over the token limit: 401 "token too large".
    status, body = await status_and_body(gw.url + "/ws", {"Authorization": "Bearer " + "a" * 12_000})
    assert (status, body) == (401, {"error": "token too large"})
    assert b.requests == []


async def test_forged_claim_header_from_client_is_dropped(gateway, backend, http):
    b = await backend()
    gw = await gateway(config(b.url))
    async with http.ws_connect(gw.url + "/ws", headers={"Authorization": f"Bearer {hs()}",
                                                       "Gateway-Claim-sub": "admin",
                                                       "Gateway-Claim-tenant": "root"}):
        pass
    h = b.requests[0]
    assert h.getall("Gateway-Claim-sub") == ["alice"]
    assert "Gateway-Claim-tenant" not in h


async def test_claims_select_routes_and_mismatch_is_403(gateway, backend, http):
    pro, basic = await backend(), await backend()
    cfg = config(pro.url, routes=[
        {"name": "pro", "match": {"path": "/ws", "claims": {"plan": ["pro", "enterprise"]}}, "backend": "pro"},
        {"name": "basic", "match": {"path": "/ws", "claims": {"plan": "basic"}}, "backend": "basic"},
    ])
    cfg["backends"] = {"pro": {"type": "websocket", "endpoints": [pro.url]},
                       "basic": {"type": "websocket", "endpoints": [basic.url]}}
    gw = await gateway(cfg)
    for plan, target in (("enterprise", pro), ("basic", basic)):
        async with http.ws_connect(gw.url + "/ws", headers={"Authorization": f"Bearer {hs({'plan': plan})}"}):
            pass
        assert target.sessions == 1
    status, body = await status_and_body(gw.url + "/ws", {"Authorization": f"Bearer {hs({'plan': 'free'})}"})
    assert (status, body) == (403, {"error": "claims do not match"})


async def test_optional_route_admits_anonymous_but_refuses_bad_tokens(gateway, backend, http):
    b = await backend()
    gw = await gateway(config(b.url, routes=[{"name": "r", "match": {"path": "/ws"}, "auth": "optional",
                                              "backend": "b"}]))
    async with http.ws_connect(gw.url + "/ws"):
        pass
    assert "Gateway-Claim-sub" not in b.requests[0]
    assert (await status_and_body(gw.url + "/ws", {"Authorization": "Bearer junk"}))[0] == 401


@pytest.mark.parametrize("origin,status", [("https://app.example.com", 101), ("https://a.b.example.com", 101),
                                           ("https://evil.com", 403), ("https://example.com.evil.com", 403),
                                           (None, 403)])
async def test_origin_allowlist(gateway, backend, origin, status):
    b = await backend()
    gw = await gateway(config(b.url, auth_extra={"origins": ["https://app.example.com", "https://*.example.com"]}))
    headers = {"Authorization": f"Bearer {hs()}"}
    if origin:
        headers["Origin"] = origin
    c = await RawClient.connect(gw.url + "/ws", headers)
    assert c.status == status
    c.close()
    assert len(b.requests) == (1 if status == 101 else 0)


async def test_token_expiring_mid_connection_closes_1008(gateway, backend, http):
    b = await backend()
    gw = await gateway(config(b.url))
    token = hs({"exp": int(time.time()) + 2})
    async with http.ws_connect(gw.url + "/ws", headers={"Authorization": f"Bearer {token}"}) as ws:
        await ws.send_str("still valid")
        assert (await ws.receive()).data == "still valid"
        msg = await ws.receive(timeout=10)
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1008, "token expired")


async def test_flood_is_dropped_counted_then_closed_1008(gateway, backend):
    b = await backend()
    gw = await gateway(config(b.url, limits={"messages_per_second": 5, "burst": 5, "rate_limit_close_after_s": 0.5}))
    c = await RawClient.connect(gw.url + "/ws", {"Authorization": f"Bearer {hs()}"})
    assert c.status == 101

    async def flood():
        for i in range(2000):
            c.send_frame(frames.OP_TEXT, b"m%d" % i)
            await asyncio.sleep(0.002)

    task = asyncio.ensure_future(flood())
    code, reason = await c.recv_close(timeout=10)
    task.cancel()
    assert (code, reason) == (1008, "rate limit exceeded")
    # The burst went through, most of the flood did not.
    assert 5 <= len(b.received) < 50
    c.close()


async def test_jwks_endpoint_down_at_start_refuses_with_unknown_key(gateway, backend):
    b = await backend()
    gw = await gateway(config(b.url, {"algorithms": ["RS256"], "keys": {"jwks_url": "http://127.0.0.1:9/jwks"}}))
    status, body = await status_and_body(gw.url + "/ws", {"Authorization": f"Bearer {rs()}"})
    assert (status, body) == (401, {"error": "unknown key"})
    assert b.requests == []


async def test_jwks_keys_verify_and_garbage_refresh_keeps_serving(gateway, backend, http):
    b = await backend()
    state = {"body": None}
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    jwk.update(kid="k1", alg="RS256", use="sig")
    state["body"] = json.dumps({"keys": [jwk]}).encode()

    async def jwks(request):
        return web.Response(body=state["body"], content_type="application/json")

    app = web.Application()
    app.router.add_get("/jwks", jwks)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    try:
        gw = await gateway(config(b.url, {"algorithms": ["RS256"], "keys": {"jwks_url": f"http://127.0.0.1:{port}/jwks"}}))
        async with http.ws_connect(gw.url + "/ws", headers={"Authorization": f"Bearer {rs()}"}):
            pass
        state["body"] = b"<html>garbage</html>"
        # An unknown kid forces a refresh that gets garbage: the known key still works.
        status, _ = await status_and_body(gw.url + "/ws", {"Authorization": f"Bearer {rs(key=OTHER_KEY, kid='k9')}"})
        assert status == 401
        async with http.ws_connect(gw.url + "/ws", headers={"Authorization": f"Bearer {rs()}"}):
            pass
        assert b.sessions == 2
    finally:
        await runner.cleanup()


async def test_missing_secret_env_is_a_startup_error(tmp_path, monkeypatch):
    import subprocess
    import sys

    import yaml

    monkeypatch.delenv("TEST_JWT_SECRET")
    path = tmp_path / "gw.yaml"
    path.write_text(yaml.safe_dump(config("ws://127.0.0.1:1/ws")))
    res = subprocess.run([sys.executable, "-m", "gateway", "run", "--config", str(path)], capture_output=True,
                         text=True, timeout=30)
    assert res.returncode == 2
    assert "environment variable TEST_JWT_SECRET is not set" in res.stderr


async def test_client_leaving_during_a_slow_jwks_fetch_leaves_nothing_behind(gateway, backend, http):
    gate = asyncio.Event()
    jwk = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(RSA_KEY.public_key()))
    jwk.update(kid="k1", alg="RS256", use="sig")
    jwk2 = json.loads(jwt.algorithms.RSAAlgorithm.to_jwk(OTHER_KEY.public_key()))
    jwk2.update(kid="k2", alg="RS256", use="sig")
    calls = []

    async def slow_jwks(request):
        calls.append(1)
        if len(calls) == 1:
            return web.json_response({"keys": [jwk]})
        await gate.wait()   # the refresh for the rotated key hangs until the client is gone
        return web.json_response({"keys": [jwk, jwk2]})

    app = web.Application()
    app.router.add_get("/jwks", slow_jwks)
    from ..helpers import serve

    runner, port = await serve(app)
    try:
        cfg = config("ws://127.0.0.1:9/ws", {"algorithms": ["RS256"], "keys": {"jwks_url": f"http://127.0.0.1:{port}/jwks"}},
                     routes=[{"name": "r", "match": {"path": "/ws"}, "backend": "e"}])
        cfg["backends"] = {"e": {"type": "builtin", "handler": "echo"}}
        gw = await gateway(cfg)
        gw.node.identity.jwks.min_refresh_interval_s = 0   # refresh now, not a minute after start
        reader, writer = await asyncio.open_connection("127.0.0.1", gw.ports[0])
        token = rs(key=OTHER_KEY, kid="k2")   # a rotated key: valid once the (hanging) refresh returns
        writer.write((f"GET /ws HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                      f"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                      f"Authorization: Bearer {token}\r\n\r\n").encode())
        await writer.drain()
        # The handshake has reached auth once the refresh for kid k2 is at the JWKS server.
        await until(lambda: asyncio.sleep(0, len(calls) == 2), what="the refresh for k2 reached the JWKS server")
        writer.transport.abort()
        # A round trip to the same event loop: by its answer the reset has been read.
        async with http.get(f"{gw.admin_url}/healthz") as r:
            assert r.status == 200
        gate.set()
        # The refresh now returns and the aborted handshake resumes: it must not open a session.
        # A second client with the same token is served only after that refresh is done, so
        # once it has come and gone the first handshake's continuation has run too.
        async with http.ws_connect(gw.url + "/ws", headers={"Authorization": f"Bearer {token}"}) as ws:
            await ws.send_str("after")
            assert (await ws.receive(timeout=5)).data == "after"
            assert len(gw.node.sessions) == 1
        await until(lambda: asyncio.sleep(0, gw.node.sockets == 0 and gw.node.sessions == {}),
                    what="nothing left behind")
    finally:
        gate.set()
        await runner.cleanup()


@pytest.mark.parametrize("backend_type", ["websocket", "builtin"])
async def test_a_token_offered_only_as_a_subprotocol_is_echoed_in_the_101(gateway, backend, backend_type):
    """Browsers fail a 101 that names none of the protocols they offered: with nothing else
    offered, the answer names the client's own bearer entry, whatever the backend."""
    b = await backend()
    cfg = config(b.url)
    if backend_type == "builtin":
        cfg["backends"] = {"b": {"type": "builtin", "handler": "echo"}}
    gw = await gateway(cfg)
    entry = f"bearer.{hs()}"
    c = await RawClient.connect(gw.url + "/ws", {"Sec-WebSocket-Protocol": entry})
    assert c.status == 101
    assert c.headers.get("sec-websocket-protocol") == entry
    c.send_frame(frames.OP_TEXT, b"hi")
    assert (await c.recv_frame())[2] == b"hi"
    c.close()
