"""JWKS key cache: the I/O half of token verification.

`JwksCache` holds the last good key set and answers `get_key(kid)`
synchronously from memory, so `Verifier.verify` stays pure. When a token
names an unknown kid the caller awaits `refresh_for(kid)` and retries once;
`verify_token` does exactly that.

Failure policy: the cache never gets worse. A fetch that fails in any way
(connection refused, timeout, non-200, oversize, non-JSON, wrong shape, no
usable key) is logged and the previous keys stay in service. Fetches are rate
limited (`min_refresh_interval_s`, counted from the start of the previous
attempt, successful or not) so a flood of tokens with random kids cannot turn
the gateway into a load generator against the identity provider.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives.asymmetric import rsa

from .auth import RSA_MIN_BITS, KeyMaterial, UnknownKid, Verifier
from .errors import JwksFetchError

__all__ = ["JwksCache", "parse_jwks", "verify_token"]

log = logging.getLogger("gateway.jwks")


def parse_jwks(body: bytes) -> dict[str | None, KeyMaterial]:
    """Parse a JWKS document into {kid: KeyMaterial}. Raises JwksFetchError.

    Skipped (logged at WARNING, the rest of the set is still used):
    unsupported kty/crv/alg, symmetric ("oct") keys — a published set must
    never carry a shared secret, accepting one would let anyone who can read
    the set forge tokens —, keys whose `use` is not "sig" or whose `key_ops`
    lack "verify", private keys, RSA keys under 2048 bits, duplicate kids
    (first wins). Zero usable keys is a failed fetch (the old set is kept).
    A key without `kid` is stored under None (used only when it is the sole key).
    """
    try:
        doc = json.loads(body)
    except (ValueError, RecursionError) as e:
        raise JwksFetchError(f"body is not JSON ({type(e).__name__})") from None
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise JwksFetchError('body is not a JWK set (no "keys" list)')
    keys: dict[str | None, KeyMaterial] = {}
    for i, jwk_data in enumerate(doc["keys"]):
        if not isinstance(jwk_data, dict):
            log.warning("jwks: key #%d skipped: not an object", i)
            continue
        kid = jwk_data.get("kid")
        if kid is not None and not isinstance(kid, str):
            log.warning("jwks: key #%d skipped: kid is not a string", i)
            continue
        kty = jwk_data.get("kty")
        alg = jwk_data.get("alg")
        if kty == "oct":
            log.warning("jwks: key %r skipped: symmetric keys are never taken from a JWKS", kid)
            continue
        if alg is not None and (not isinstance(alg, str) or alg.lower() == "none"):
            log.warning("jwks: key %r skipped: unusable alg", kid)
            continue
        use = jwk_data.get("use")
        if use is not None and use != "sig":
            log.warning("jwks: key %r skipped: use is %r, not 'sig'", kid, use)
            continue
        ops = jwk_data.get("key_ops")
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            log.warning("jwks: key %r skipped: key_ops lacks 'verify'", kid)
            continue
        try:
            key = jwt.PyJWK(jwk_data).key
        except Exception as e:  # noqa: BLE001 - PyJWK raises many types (incl. cryptography's); skip the key
            log.warning("jwks: key %r skipped: unsupported or invalid (%s, kty=%r)",
                        kid, type(e).__name__, kty)
            continue
        if hasattr(key, "private_bytes"):
            # A published private key is an IdP misconfiguration (and a
            # compromised key): refuse it loudly rather than use its public half.
            log.warning("jwks: key %r skipped: the set publishes a PRIVATE key", kid)
            continue
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < RSA_MIN_BITS:
            log.warning("jwks: key %r skipped: RSA key is %d bits", kid, key.key_size)
            continue
        if kid in keys:
            log.warning("jwks: key %r skipped: duplicate kid", kid)
            continue
        keys[kid] = KeyMaterial(key, alg)
    if not keys:
        raise JwksFetchError("no usable key in the set")
    return keys


class JwksCache:
    """Keys from a JWKS URL, served from memory; refreshed on demand.

    `session_factory` is called once in `start()` (inside the running loop)
    and the session it returns is owned, and closed, by this cache.
    `clock` is monotonic seconds; injectable for tests of the rate limit.
    Satisfies `gateway.auth.KeyProvider`.
    """

    __slots__ = (
        "_clock",
        "_inflight",
        "_keys",
        "_last_attempt",
        "_session",
        "_session_factory",
        "fetch_count",
        "last_success",
        "max_bytes",
        "min_refresh_interval_s",
        "timeout_s",
        "url",
    )

    def __init__(
        self,
        url: str,
        session_factory: Callable[[], aiohttp.ClientSession] = aiohttp.ClientSession,
        *,
        min_refresh_interval_s: float = 60.0,
        timeout_s: float = 5.0,
        max_bytes: int = 1_000_000,
        clock: Callable[[], float] = time.monotonic,
    ):
        if not url.startswith(("https://", "http://")):
            raise ValueError(f"jwks url {url!r}: must be http(s)://")
        if min_refresh_interval_s < 0 or timeout_s <= 0 or max_bytes <= 0:
            raise ValueError("jwks: intervals, timeout and max_bytes must be positive")
        self.url = url
        self.min_refresh_interval_s = float(min_refresh_interval_s)
        self.timeout_s = float(timeout_s)
        self.max_bytes = max_bytes
        self._session_factory = session_factory
        self._session: aiohttp.ClientSession | None = None
        self._clock = clock
        self._keys: dict[str | None, KeyMaterial] = {}
        self._last_attempt: float | None = None
        self._inflight: asyncio.Task[None] | None = None
        # Observability: attempts made, clock() of the last good fetch.
        self.fetch_count = 0
        self.last_success: float | None = None

    def __len__(self) -> int:
        return len(self._keys)

    async def start(self) -> None:
        """Create the session and fetch once. A failure is logged, not raised:
        keys stay empty (every token "unknown key") until a fetch works."""
        if self._session is None:
            self._session = self._session_factory()
        await self._refresh(force=True)

    async def close(self) -> None:
        task, self._inflight = self._inflight, None
        if task is not None and not task.done():
            task.cancel()
            try:
                await task
            except asyncio.CancelledError:
                pass
        if self._session is not None:
            await self._session.close()
            self._session = None

    def get_key(self, kid: str | None) -> KeyMaterial | None:
        """Sync lookup. kid None: the sole key of a one-key set, else None."""
        if kid is None:
            if len(self._keys) == 1:
                return next(iter(self._keys.values()))
            return None
        return self._keys.get(kid)

    async def refresh_for(self, kid: str | None) -> bool:
        """Refetch (rate limited, shared with concurrent callers) unless `kid`
        is already known; return whether it is known afterwards."""
        if self.get_key(kid) is not None:
            return True
        await self._refresh(force=False)
        return self.get_key(kid) is not None

    async def _refresh(self, *, force: bool) -> None:
        task = self._inflight
        if task is None:
            now = self._clock()
            if (
                not force
                and self._last_attempt is not None
                and now - self._last_attempt < self.min_refresh_interval_s
            ):
                return
            self._last_attempt = now
            task = asyncio.get_running_loop().create_task(self._fetch())
            self._inflight = task
            # Cleared by the task itself, not the caller that started it: a
            # cancelled caller must not let a second fetch start alongside.
            task.add_done_callback(self._fetch_done)
        # shield: a caller cancelled mid-wait (client hung up) must not cancel
        # the fetch other callers are waiting on.
        await asyncio.shield(task)

    def _fetch_done(self, task: asyncio.Task[None]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _fetch(self) -> None:
        self.fetch_count += 1
        try:
            body = await self._get_body()
            # JSON + key construction for up to max_bytes is CPU work; keep it
            # off the event loop.
            keys = await asyncio.to_thread(parse_jwks, body)
        except JwksFetchError as e:
            log.warning("jwks fetch from %s failed: %s; keeping %d cached key(s)",
                        self.url, e, len(self._keys))
            return
        except Exception as e:  # noqa: BLE001 - never let a fetch failure escape: keep stale keys
            log.warning("jwks fetch from %s failed: %s; keeping %d cached key(s)",
                        self.url, type(e).__name__ or "error", len(self._keys))
            return
        added = keys.keys() - self._keys.keys()
        removed = self._keys.keys() - keys.keys()
        self._keys = keys  # one atomic swap: readers see old or new, never a mix
        self.last_success = self._clock()
        log.info("jwks fetched from %s: %d key(s), added %s, removed %s",
                 self.url, len(keys), sorted(map(str, added)), sorted(map(str, removed)))

    async def _get_body(self) -> bytes:
        session = self._session
        if session is None or session.closed:
            raise JwksFetchError("cache not started")
        timeout = aiohttp.ClientTimeout(total=self.timeout_s)
        try:
            # asyncio.timeout as well as the client timeout: ClientTimeout does
            # not bound every await (e.g. a server trickling the body).
            async with asyncio.timeout(self.timeout_s):
                async with session.get(
                    self.url, timeout=timeout, headers={"Accept": "application/json"}
                ) as resp:
                    if resp.status != 200:
                        raise JwksFetchError(f"HTTP {resp.status}")
                    if resp.content_length is not None and resp.content_length > self.max_bytes:
                        raise JwksFetchError(f"body too large ({resp.content_length} bytes)")
                    chunks: list[bytes] = []
                    size = 0
                    async for chunk in resp.content.iter_chunked(65536):
                        size += len(chunk)
                        if size > self.max_bytes:
                            raise JwksFetchError(f"body too large (> {self.max_bytes} bytes)")
                        chunks.append(chunk)
                    return b"".join(chunks)
        except TimeoutError:
            raise JwksFetchError(f"timed out after {self.timeout_s}s") from None
        except aiohttp.ClientError as e:
            raise JwksFetchError(f"{type(e).__name__}") from None


async def verify_token(verifier: Verifier, cache: JwksCache | None, token: str | None) -> dict[str, Any]:
    """Verify; on an unknown kid, refresh the cache once (rate limited) and retry.

    Raises `AuthError` (including `UnknownKid` if the key is still unknown).
    """
    try:
        return verifier.verify(token)
    except UnknownKid as e:
        if cache is None:
            raise
        if not await cache.refresh_for(e.kid):
            raise
    return verifier.verify(token)
