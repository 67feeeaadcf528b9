"""JwksCache against a real aiohttp JWKS server on 127.0.0.1.

The server counts requests, so refresh behaviour is asserted by count, not by
timing. Time is injected into the cache (`clock=`) wherever the rate limit
must be stepped past. Slow-endpoint tests block the handler on an event that
is never set, so "no hang" means "returns at all", guarded by wait_for.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from typing import Any

import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from joserfc import jwt as jose_jwt
from joserfc.jwk import RSAKey

from gateway.auth import AuthError, UnknownKid, Verifier
from gateway.jwks import JwksCache, parse_jwks, verify_token

HANG_GUARD_S = 30  # only ever reached if the code under test hangs


def rsa_jwk(key: rsa.RSAPrivateKey, kid: str, **extra: Any) -> dict[str, Any]:
    jwk = jwt.algorithms.RSAAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid, **extra}


def ec_jwk(key: ec.EllipticCurvePrivateKey, kid: str) -> dict[str, Any]:
    jwk = jwt.algorithms.ECAlgorithm.to_jwk(key.public_key(), as_dict=True)
    return {**jwk, "kid": kid}


def token_for(key: Any, kid: str, alg: str = "RS256", **claims: Any) -> str:
    now = int(time.time())
    return jwt.encode({"sub": "u1", "iat": now, "exp": now + 3600, **claims}, key,
                      algorithm=alg, headers={"kid": kid})


@pytest.fixture(scope="module")
def k1() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture(scope="module")
def k2() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@dataclass
class JwksServer:
    keys: list[dict[str, Any]] = field(default_factory=list)
    mode: str = "ok"  # ok | hang | garbage | status500 | raw
    raw: bytes = b""
    requests: int = 0
    gate: asyncio.Event | None = None  # when set by a test: hold responses until released
    runner: web.AppRunner | None = None
    url: str = ""
    released: asyncio.Event = field(default_factory=asyncio.Event)

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.requests += 1
        if self.gate is not None:
            await self.gate.wait()
        if self.mode == "hang":
            await self.released.wait()  # answers only when the test is over
            return web.Response(status=503)
        if self.mode == "status500":
            return web.Response(status=500, text="oops")
        if self.mode == "garbage":
            return web.Response(body=b"<html>not json</html>", content_type="text/html")
        if self.mode == "raw":
            return web.Response(body=self.raw, content_type="application/json")
        return web.json_response({"keys": self.keys})

    async def stop(self) -> None:
        # Let held handlers finish: aiohttp's graceful shutdown waits for them.
        self.released.set()
        if self.gate is not None:
            self.gate.set()
        if self.runner is not None:
            await self.runner.cleanup()
            self.runner = None


@pytest.fixture
async def server() -> AsyncIterator[JwksServer]:
    srv = JwksServer()
    app = web.Application()
    app.router.add_get("/jwks.json", srv.handle)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    host, port = runner.addresses[0][:2]
    srv.runner = runner
    srv.url = f"http://{host}:{port}/jwks.json"
    yield srv
    await srv.stop()


async def until(cond) -> None:
    """Yield to the loop until cond() holds; the guard only trips on a hang."""
    async def poll() -> None:
        while not cond():
            await asyncio.sleep(0.001)
    await asyncio.wait_for(poll(), HANG_GUARD_S)


class FakeClock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


@pytest.fixture
async def make_cache(server: JwksServer) -> AsyncIterator[Any]:
    caches: list[JwksCache] = []

    def make(**kw: Any) -> JwksCache:
        cache = JwksCache(server.url, **kw)
        caches.append(cache)
        return cache

    yield make
    for c in caches:
        await c.close()


def rs256_verifier(cache: JwksCache) -> Verifier:
    return Verifier(("RS256", "ES256"), cache)


async def test_start_fetches_keys_and_tokens_verify(server, make_cache, k1):
    server.keys = [rsa_jwk(k1, "k1")]
    cache = make_cache()
    await cache.start()
    assert server.requests == 1 and len(cache) == 1
    claims = await verify_token(rs256_verifier(cache), cache, token_for(k1, "k1"))
    assert claims["sub"] == "u1"
    assert server.requests == 1  # a known kid costs no fetch


async def test_keys_and_tokens_from_an_independent_library_verify(server, make_cache):
    key = RSAKey.generate_key(2048, parameters={"kid": "jose-1"})
    server.keys = [key.as_dict(private=False)]
    cache = make_cache()
    await cache.start()
    now = int(time.time())
    token = jose_jwt.encode({"alg": "RS256", "kid": "jose-1"}, {"sub": "j", "exp": now + 60}, key)
    assert (await verify_token(rs256_verifier(cache), cache, token))["sub"] == "j"


async def test_unknown_kid_triggers_one_refresh_and_succeeds_after_rotation(server, make_cache, k1, k2):
    server.keys = [rsa_jwk(k1, "k1")]
    clock = FakeClock()
    cache = make_cache(clock=clock)
    await cache.start()
    clock.t += 60  # the start-up fetch counts against the rate limit
    server.keys = [rsa_jwk(k1, "k1"), rsa_jwk(k2, "k2")]  # the IdP rotates
    claims = await verify_token(rs256_verifier(cache), cache, token_for(k2, "k2"))
    assert claims["sub"] == "u1"
    assert server.requests == 2


async def test_still_unknown_kid_is_refused_after_one_refresh(server, make_cache, k1, k2):
    server.keys = [rsa_jwk(k1, "k1")]
    clock = FakeClock()
    cache = make_cache(clock=clock)
    await cache.start()
    clock.t += 60  # the start-up fetch counts against the rate limit
    with pytest.raises(UnknownKid) as info:
        await verify_token(rs256_verifier(cache), cache, token_for(k2, "nope"))
    assert info.value.reason == "unknown key"
    assert server.requests == 2


async def test_refresh_is_rate_limited(server, make_cache, k1, k2):
    server.keys = [rsa_jwk(k1, "k1")]
    clock = FakeClock()
    cache = make_cache(min_refresh_interval_s=60, clock=clock)
    await cache.start()
    v = rs256_verifier(cache)
    for i in range(5):  # right after the start-up fetch: throttled
        with pytest.raises(UnknownKid):
            await verify_token(v, cache, token_for(k2, f"early-{i}"))
    assert server.requests == 1

    clock.t += 60
    for i in range(20):  # a flood of random kids: one refresh, then throttled
        with pytest.raises(UnknownKid):
            await verify_token(v, cache, token_for(k2, f"random-{i}"))
    assert server.requests == 2

    server.keys = [rsa_jwk(k1, "k1"), rsa_jwk(k2, "k2")]
    clock.t += 59
    with pytest.raises(UnknownKid):
        await verify_token(v, cache, token_for(k2, "k2"))
    assert server.requests == 2

    clock.t += 1
    assert (await verify_token(v, cache, token_for(k2, "k2")))["sub"] == "u1"
    assert server.requests == 3


async def test_concurrent_refreshes_share_one_fetch(server, make_cache, k1, k2):
    server.keys = [rsa_jwk(k1, "k1")]
    clock = FakeClock()
    cache = make_cache(clock=clock)
    await cache.start()
    clock.t += 60  # the start-up fetch counts against the rate limit
    server.keys = [rsa_jwk(k1, "k1"), rsa_jwk(k2, "k2")]
    server.gate = asyncio.Event()
    v = rs256_verifier(cache)
    tasks = [asyncio.create_task(verify_token(v, cache, token_for(k2, "k2"))) for _ in range(25)]
    await until(lambda: server.requests >= 2)  # the shared fetch reached the server
    server.gate.set()
    results = await asyncio.wait_for(asyncio.gather(*tasks), HANG_GUARD_S)
    assert all(r["sub"] == "u1" for r in results)
    assert server.requests == 2


async def test_cancelled_waiter_does_not_cancel_the_shared_fetch(server, make_cache, k1, k2):
    server.keys = [rsa_jwk(k1, "k1")]
    clock = FakeClock()
    cache = make_cache(clock=clock)
    await cache.start()
    clock.t += 60  # the start-up fetch counts against the rate limit
    server.keys = [rsa_jwk(k1, "k1"), rsa_jwk(k2, "k2")]
    server.gate = asyncio.Event()
    first = asyncio.create_task(cache.refresh_for("k2"))
    await until(lambda: server.requests >= 2)
    second = asyncio.create_task(cache.refresh_for("k2"))
    await asyncio.sleep(0)
    first.cancel()  # e.g. the client who triggered it hung up
    server.gate.set()
    assert await asyncio.wait_for(second, HANG_GUARD_S) is True
    assert server.requests == 2


async def test_endpoint_down_keeps_stale_keys(server, make_cache, k1, k2, caplog):
    server.keys = [rsa_jwk(k1, "k1")]
    clock = FakeClock()
    cache = make_cache(clock=clock)
    await cache.start()
    await server.stop()
    clock.t += 3600
    caplog.set_level(logging.WARNING, logger="gateway.jwks")
    assert await cache.refresh_for("k2") is False
    assert (await verify_token(rs256_verifier(cache), cache, token_for(k1, "k1")))["sub"] == "u1"
    assert any(r.name == "gateway.jwks" and "failed" in r.getMessage() for r in caplog.records)


async def test_slow_endpoint_times_out_and_keeps_stale_keys(server, make_cache, k1, k2, caplog):
    server.keys = [rsa_jwk(k1, "k1")]
    clock = FakeClock()
    cache = make_cache(clock=clock, timeout_s=0.2)
    await cache.start()
    server.mode = "hang"
    clock.t += 3600
    caplog.set_level(logging.WARNING, logger="gateway.jwks")
    with pytest.raises(UnknownKid):
        await asyncio.wait_for(
            verify_token(rs256_verifier(cache), cache, token_for(k2, "k2")), HANG_GUARD_S
        )
    assert cache.get_key("k1") is not None
    assert (await verify_token(rs256_verifier(cache), cache, token_for(k1, "k1")))["sub"] == "u1"
    assert any("timed out" in r.getMessage() for r in caplog.records)


GARBAGE = {
    "non-json": ("garbage", b""),
    "http-500": ("status500", b""),
    "json-array": ("raw", b"[1, 2, 3]"),
    "keys-not-list": ("raw", b'{"keys": {"kid": "x"}}'),
    "no-keys-member": ("raw", b'{"foo": []}'),
    "empty-key-list": ("raw", b'{"keys": []}'),
    "only-unusable-keys": ("raw", json.dumps({"keys": [{"kty": "XYZ", "kid": "a"}, {"kty": "oct", "k": "c2VjcmV0", "kid": "b"}, "str"]}).encode()),
    "truncated-json": ("raw", b'{"keys": [{"kty": "RSA"'),
    "deeply-nested": ("raw", b"[" * 100_000 + b"]" * 100_000),
}


@pytest.mark.parametrize("mode,raw", GARBAGE.values(), ids=GARBAGE.keys())
async def test_garbage_response_keeps_stale_keys_and_is_logged(server, make_cache, k1, caplog, mode, raw):
    server.keys = [rsa_jwk(k1, "k1")]
    clock = FakeClock()
    cache = make_cache(clock=clock, max_bytes=1_000_000)
    await cache.start()
    server.mode, server.raw = mode, raw
    clock.t += 3600
    caplog.set_level(logging.WARNING, logger="gateway.jwks")
    assert await cache.refresh_for("k2") is False
    assert server.requests == 2
    assert len(cache) == 1 and cache.get_key("k1") is not None
    assert any(r.name == "gateway.jwks" and "failed" in r.getMessage() for r in caplog.records)


async def test_oversize_body_is_refused_and_stale_keys_kept(server, make_cache, k1, k2, caplog):
    server.keys = [rsa_jwk(k1, "k1")]
    clock = FakeClock()
    cache = make_cache(clock=clock, max_bytes=4096)
    await cache.start()
    server.keys = [rsa_jwk(k1, "k1"), rsa_jwk(k2, "k2")] + [rsa_jwk(k2, f"pad{i}") for i in range(20)]
    clock.t += 3600
    caplog.set_level(logging.WARNING, logger="gateway.jwks")
    assert await cache.refresh_for("k2") is False
    assert cache.get_key("k1") is not None
    assert any("too large" in r.getMessage() for r in caplog.records)


async def test_unsupported_and_unsafe_keys_are_skipped(server, make_cache, k1):
    weak = rsa.generate_private_key(public_exponent=65537, key_size=1024)
    private = jwt.algorithms.RSAAlgorithm.to_jwk(k1, as_dict=True)
    server.keys = [
        {"kty": "XYZ", "kid": "alien"},
        {"kty": "oct", "k": "c2VjcmV0c2VjcmV0c2VjcmV0c2VjcmV0", "kid": "shared"},
        rsa_jwk(k1, "enc", use="enc"),
        rsa_jwk(k1, "ops", key_ops=["encrypt"]),
        rsa_jwk(weak, "weak"),
        {**private, "kid": "private"},
        rsa_jwk(k1, "none-alg", alg="none"),
        {"kty": "EC", "crv": "P-999", "x": "AA", "y": "AA", "kid": "badcurve"},
        "not-an-object",
        rsa_jwk(k1, "good"),
        rsa_jwk(k1, "good"),  # duplicate kid
    ]
    cache = make_cache()
    await cache.start()
    assert len(cache) == 1
    assert cache.get_key("good") is not None
    for kid in ("alien", "shared", "enc", "ops", "weak", "private", "none-alg", "badcurve"):
        assert cache.get_key(kid) is None, kid


async def test_hmac_token_against_a_jwks_key_is_refused(server, make_cache, k1):
    # Algorithm confusion through the key set: the attacker signs HS256 with
    # the public key; a Verifier over a JWKS cannot even list HS256.
    server.keys = [rsa_jwk(k1, "k1")]
    cache = make_cache()
    await cache.start()
    with pytest.raises(ValueError):
        Verifier(("RS256", "HS256"), cache)
    pem = k1.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    def b64(b: bytes) -> str:
        return base64.urlsafe_b64encode(b).rstrip(b"=").decode()

    signing_input = b64(json.dumps({"alg": "HS256", "kid": "k1"}).encode()) + "." + b64(
        json.dumps({"sub": "admin", "exp": int(time.time()) + 60}).encode())
    forged = signing_input + "." + b64(hmac.new(pem, signing_input.encode(), hashlib.sha256).digest())
    with pytest.raises(AuthError) as info:
        await verify_token(rs256_verifier(cache), cache, forged)
    assert info.value.reason == "algorithm not allowed"


async def test_jwk_alg_pins_the_token_algorithm(server, make_cache, k1):
    server.keys = [rsa_jwk(k1, "k1", alg="PS256")]
    cache = make_cache()
    await cache.start()
    v = Verifier(("RS256", "PS256"), cache)
    assert (await verify_token(v, cache, token_for(k1, "k1", alg="PS256")))["sub"] == "u1"
    with pytest.raises(AuthError) as info:
        await verify_token(v, cache, token_for(k1, "k1", alg="RS256"))
    assert info.value.reason == "algorithm not allowed"


async def test_ec_keys_from_the_set_verify(server, make_cache):
    key = ec.generate_private_key(ec.SECP256R1())
    server.keys = [ec_jwk(key, "ec1")]
    cache = make_cache()
    await cache.start()
    assert (await verify_token(rs256_verifier(cache), cache, token_for(key, "ec1", alg="ES256")))["sub"] == "u1"


async def test_token_without_kid_uses_the_only_key(server, make_cache, k1, k2):
    server.keys = [rsa_jwk(k1, "k1")]
    cache = make_cache()
    await cache.start()
    now = int(time.time())
    token = jwt.encode({"sub": "nokid", "exp": now + 60}, k1, algorithm="RS256")
    assert (await verify_token(rs256_verifier(cache), cache, token))["sub"] == "nokid"
    server.keys = [rsa_jwk(k1, "k1"), rsa_jwk(k2, "k2")]
    cache2 = make_cache()
    await cache2.start()
    with pytest.raises(UnknownKid):
        await verify_token(rs256_verifier(cache2), cache2, token)


async def test_start_failure_is_not_fatal_and_a_later_fetch_recovers(server, make_cache, k1, caplog):
    server.mode = "status500"
    clock = FakeClock()
    cache = make_cache(clock=clock)
    caplog.set_level(logging.WARNING, logger="gateway.jwks")
    await cache.start()  # must not raise
    assert len(cache) == 0
    assert any("HTTP 500" in r.getMessage() for r in caplog.records)
    with pytest.raises(UnknownKid):
        await verify_token(rs256_verifier(cache), cache, token_for(k1, "k1"))
    server.mode = "ok"
    server.keys = [rsa_jwk(k1, "k1")]
    clock.t += 60
    assert (await verify_token(rs256_verifier(cache), cache, token_for(k1, "k1")))["sub"] == "u1"


async def test_verify_token_without_a_cache_reraises_unknown_kid(k1):
    class NoKeys:
        def get_key(self, kid):
            return None

    with pytest.raises(UnknownKid):
        await verify_token(Verifier(("RS256",), NoKeys()), None, token_for(k1, "k1"))


async def test_close_is_idempotent_and_closes_the_session(server, make_cache, k1):
    server.keys = [rsa_jwk(k1, "k1")]
    cache = make_cache()
    await cache.start()
    session = cache._session
    await cache.close()
    await cache.close()
    assert session is not None and session.closed
    assert cache.get_key("k1") is not None  # keys survive: close only stops I/O


def test_parse_jwks_is_usable_without_a_loop(k1):
    keys = parse_jwks(json.dumps({"keys": [rsa_jwk(k1, "k1")]}).encode())
    assert list(keys) == ["k1"]
