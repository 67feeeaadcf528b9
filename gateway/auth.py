"""Authentication building blocks: pure functions and value types, no I/O.

Everything here is synchronous and takes time as an argument where time
matters, so the handshake path can call it without awaiting and the tests can
drive it deterministically. JWKS fetching (the only I/O auth needs) lives in
`gateway.jwks`; `Verifier.verify` raises `UnknownKid` so the async caller can
refresh the key set once and retry (see `gateway.jwks.verify_token`).

Refusals are `AuthError(reason, status)`. `reason` is one of a fixed set of
short phrases (see `REASONS`): PyJWT's exception text never reaches a peer,
because it can quote header values, key details or token fragments.
"""

from __future__ import annotations

import base64
import binascii
import json
import math
import re
import time
import unicodedata
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Protocol
from urllib.parse import urlsplit

import jwt
from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, ed448, ed25519, rsa
from cryptography.hazmat.primitives.serialization import load_pem_public_key

from .errors import AuthError, UnknownKid

__all__ = [
    "CLAIM_HEADER_PREFIX",
    "HMAC_ALGORITHMS",
    "REASONS",
    "SUPPORTED_ALGORITHMS",
    "AuthError",
    "KeyMaterial",
    "KeyProvider",
    "PublicKeyFile",
    "SecretKey",
    "TokenBucket",
    "UnknownKid",
    "Verifier",
    "claim_header_name",
    "claims_match",
    "extract_token",
    "forward_claim_headers",
    "is_claim_header",
    "key_fits_algorithm",
    "origin_allowed",
    "parse_cookies",
    "parse_origin_pattern",
    "parse_source",
    "parse_subprotocols",
]


# --------------------------------------------------------------------------
# Errors


# AuthError and UnknownKid live in errors.py with every other exception.


# Every phrase `Verifier.verify` can produce ("missing claim <name>" is a
# family: <name> comes from the verifier's own `require`/`audience`/`issuer`
# configuration, never from the token).
REASONS = (
    "missing token",
    "malformed token",
    "token too large",
    "algorithm not allowed",
    "bad signature",
    "token expired",
    "token not yet valid",
    "wrong issuer",
    "wrong audience",
    "unknown key",
    "missing claim <name>",
    "invalid claims",
)


# --------------------------------------------------------------------------
# Keys

HMAC_ALGORITHMS = frozenset({"HS256", "HS384", "HS512"})
_RSA_ALGORITHMS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
# JWA fixes the curve for each ES algorithm (RFC 7518 3.4, RFC 8812 3.2); a
# key on another curve is a misconfiguration or an attack, never a match.
_EC_CURVES: dict[str, type[ec.EllipticCurve]] = {
    "ES256": ec.SECP256R1,
    "ES384": ec.SECP384R1,
    "ES512": ec.SECP521R1,
    "ES256K": ec.SECP256K1,
}
_OKP_ALGORITHMS = frozenset({"EdDSA"})
SUPPORTED_ALGORITHMS = (
    HMAC_ALGORITHMS | _RSA_ALGORITHMS | frozenset(_EC_CURVES) | _OKP_ALGORITHMS
)

# RFC 7518 3.2: an HMAC key must be at least as long as the hash output.
_HMAC_MIN_BYTES = {"HS256": 32, "HS384": 48, "HS512": 64}
# NIST SP 800-131A: RSA below 2048 bits is no longer acceptable for signatures.
RSA_MIN_BITS = 2048


@dataclass(slots=True, frozen=True)
class KeyMaterial:
    """A verification key, and the algorithm its publisher pinned it to.

    `key` is `bytes` (HMAC secret) or a `cryptography` public key object.
    `alg` is the JWK `alg` member when the JWKS set one: a token must then use
    exactly that algorithm. `None` means "any algorithm that fits the key type".
    """

    key: Any
    alg: str | None = None


class KeyProvider(Protocol):
    """Anything `Verifier` can ask for a key: sync lookup, no I/O."""

    def get_key(self, kid: str | None) -> KeyMaterial | None: ...


def key_fits_algorithm(alg: str, key: Any) -> bool:
    """True if `key` may verify `alg`: the type (and curve) must match exactly.

    This is the algorithm-confusion guard: an HMAC secret only ever verifies
    HS*, a public key never does, an RSA key never verifies ES*, and so on.
    """
    if alg in HMAC_ALGORITHMS:
        return isinstance(key, bytes)
    if alg in _RSA_ALGORITHMS:
        return isinstance(key, rsa.RSAPublicKey)
    if alg in _EC_CURVES:
        return isinstance(key, ec.EllipticCurvePublicKey) and isinstance(
            key.curve, _EC_CURVES[alg]
        )
    if alg in _OKP_ALGORITHMS:
        return isinstance(key, (ed25519.Ed25519PublicKey, ed448.Ed448PublicKey))
    return False


@dataclass(slots=True, frozen=True)
class SecretKey:
    """A shared HMAC secret (HS256/384/512 only). The caller reads it from env."""

    secret: bytes = field(repr=False)  # repr=False: never print a secret

    def __post_init__(self) -> None:
        if not isinstance(self.secret, bytes):
            raise TypeError("SecretKey needs bytes (encode the env var value)")
        if not self.secret:
            raise ValueError("HMAC secret is empty")

    def get_key(self, kid: str | None) -> KeyMaterial:
        # One secret: the kid, if any, is irrelevant.
        return KeyMaterial(self.secret)


@dataclass(slots=True, frozen=True)
class PublicKeyFile:
    """A PEM public key (or X.509 certificate) read once, at construction.

    Private keys are refused on purpose: the gateway only verifies, and a
    private key on the edge is a key that can mint tokens.
    """

    path: str
    key: Any = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        try:
            data = Path(self.path).read_bytes()
        except OSError as e:
            raise ValueError(
                f"public key file {self.path!r}: cannot read ({e.strerror or e})"
            ) from None
        key: Any
        try:
            key = load_pem_public_key(data)
        except (ValueError, TypeError):
            try:
                key = x509.load_pem_x509_certificate(data).public_key()
            except (ValueError, TypeError):
                raise ValueError(
                    f"public key file {self.path!r}: not a PEM public key or "
                    "certificate (a private key is refused: give the public half)"
                ) from None
        if not isinstance(
            key,
            (
                rsa.RSAPublicKey,
                ec.EllipticCurvePublicKey,
                ed25519.Ed25519PublicKey,
                ed448.Ed448PublicKey,
            ),
        ):
            raise ValueError(  # noqa: TRY004 - a config error, reported as ValueError like the rest
                f"public key file {self.path!r}: unsupported key type "
                f"{type(key).__name__} (need RSA, EC or Ed25519/Ed448)"
            )
        if isinstance(key, rsa.RSAPublicKey) and key.key_size < RSA_MIN_BITS:
            raise ValueError(
                f"public key file {self.path!r}: RSA key is {key.key_size} bits, "
                f"need at least {RSA_MIN_BITS}"
            )
        object.__setattr__(self, "key", key)  # frozen dataclass: set once here

    def get_key(self, kid: str | None) -> KeyMaterial:
        return KeyMaterial(self.key)


# --------------------------------------------------------------------------
# Verifier

_B64URL = re.compile(r"[A-Za-z0-9_-]*")


def _b64url_strict(segment: str) -> bytes:
    """Decode unpadded base64url, accepting only the canonical encoding."""
    # Python's base64 decoder silently drops characters outside the alphabet
    # and ignores non-zero trailing bits; checking the alphabet and re-encoding
    # means a token is either exactly well-formed or refused as malformed,
    # never "repaired" (and agrees with PyJWT's own strict decoding, so a
    # DecodeError from PyJWT later can only concern the claims).
    if not _B64URL.fullmatch(segment) or len(segment) % 4 == 1:
        raise ValueError("bad base64url")
    raw = base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))
    if base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii") != segment:
        raise ValueError("non-canonical base64url")
    return raw


def _is_number(v: Any) -> bool:
    # bool is an int subclass; `"iat": true` is not a timestamp.
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


class Verifier:
    """Verifies a compact JWS/JWT against one key source and a fixed policy.

    - `algorithms`: explicit allowlist (JWA names, case-sensitive). "none" in
      any casing makes the constructor raise; so does an unknown name.
    - `keys`: `SecretKey` (then every algorithm must be HS*), `PublicKeyFile`
      (every algorithm must fit that key's type/curve), or any other
      `KeyProvider` such as `gateway.jwks.JwksCache` (then no HS*: symmetric
      keys are never taken from a published key set). Mixing HMAC and
      asymmetric algorithms is therefore impossible by construction.
    - `issuer`: required exact `iss`, or None to not check it.
    - `audience`: one or several accepted `aud` values. None means the token
      must NOT carry an `aud` (RFC 7519 4.1.3: a recipient that does not
      identify with a present `aud` must reject).
    - `leeway_s`: clock skew tolerated for exp/nbf/iat.
    - `require`: claims that must be present and non-null. Default ("exp",):
      a token that never expires is a credential that can never be revoked.
      Pass () to accept tokens without exp.
    - `max_token_bytes`: refuse larger tokens before any parsing.

    Header-only checks happen in this order, before any signature work:
    size, structure, `alg` in the allowlist, key lookup, key/alg fit. The
    algorithm named in the token never chooses how to verify: it is checked
    against the allowlist and the key's type, then passed to PyJWT as the
    single permitted algorithm.

    Unsupported on purpose: `crit` headers (we implement no extensions, so
    RFC 7515 4.1.11 obliges us to refuse), `b64: false`, and any key carried
    in the token itself (`jwk`, `jku`, `x5u`, `x5c` are ignored).
    """

    __slots__ = (
        "_allowed_missing",
        "algorithms",
        "audience",
        "issuer",
        "keys",
        "leeway_s",
        "max_token_bytes",
        "require",
    )

    def __init__(
        self,
        algorithms: Sequence[str],
        keys: KeyProvider,
        *,
        issuer: str | None = None,
        audience: str | Sequence[str] | None = None,
        leeway_s: float = 0.0,
        require: Sequence[str] = ("exp",),
        max_token_bytes: int = 8192,
    ):
        algs = tuple(algorithms)
        if not algs:
            raise ValueError("algorithms: at least one algorithm is required")
        for a in algs:
            if not isinstance(a, str):
                raise ValueError(f"algorithms: {a!r} is not a string")  # noqa: TRY004 - config error
            if a.lower() == "none":
                raise ValueError("algorithms: 'none' is never accepted")
            if a not in SUPPORTED_ALGORITHMS:
                raise ValueError(
                    f"algorithms: unknown algorithm {a!r} (supported: "
                    f"{', '.join(sorted(SUPPORTED_ALGORITHMS))})"
                )
        hmac = [a for a in algs if a in HMAC_ALGORITHMS]
        if isinstance(keys, SecretKey):
            if len(hmac) != len(algs):
                raise ValueError(
                    "algorithms: an HMAC secret can only verify HS256/HS384/HS512"
                )
            for a in algs:
                if len(keys.secret) < _HMAC_MIN_BYTES[a]:
                    raise ValueError(
                        f"HMAC secret is {len(keys.secret)} bytes; {a} needs at "
                        f"least {_HMAC_MIN_BYTES[a]} (RFC 7518 3.2)"
                    )
        elif isinstance(keys, PublicKeyFile):
            for a in algs:
                if not key_fits_algorithm(a, keys.key):
                    raise ValueError(
                        f"algorithms: {a} cannot be verified with the "
                        f"{type(keys.key).__name__.lstrip('_')} in {keys.path!r}"
                    )
        elif hmac:
            raise ValueError(
                "algorithms: HS* needs a SecretKey; a key set (JWKS) only "
                "provides public keys"
            )

        if audience is None:
            aud: tuple[str, ...] | None = None
        elif isinstance(audience, str):
            aud = (audience,)
        else:
            aud = tuple(audience)
        if aud is not None and (not aud or not all(isinstance(x, str) and x for x in aud)):
            raise ValueError("audience: non-empty string(s) or None")
        if issuer is not None and (not isinstance(issuer, str) or not issuer):
            raise ValueError("issuer: a non-empty string or None")
        req = tuple(require)
        if not all(isinstance(c, str) and c for c in req):
            raise ValueError("require: claim names must be non-empty strings")
        if not _is_number(leeway_s) or leeway_s < 0:
            raise ValueError("leeway_s: a finite number >= 0")
        if not isinstance(max_token_bytes, int) or max_token_bytes <= 0:
            raise ValueError("max_token_bytes: a positive integer")

        self.algorithms = algs
        self.keys = keys
        self.issuer = issuer
        self.audience = aud
        self.leeway_s = float(leeway_s)
        self.require = req
        self.max_token_bytes = max_token_bytes
        # Claim names PyJWT may report missing; all come from our own config,
        # so "missing claim <name>" never quotes the token.
        self._allowed_missing = frozenset(req) | {"aud", "iss"}

    def verify(self, token: str | None, *, now: float | None = None) -> dict[str, Any]:
        """Return the verified claims, or raise `AuthError` / `UnknownKid`.

        `now` (Unix seconds, default the wall clock) is what exp/nbf/iat are
        checked against, with `leeway_s` either way.
        The returned dict carries `exp` (if present) for scheduling a close.
        """
        if not token:
            raise AuthError("missing token", 401)
        if not isinstance(token, str):
            raise AuthError("malformed token", 401)
        # len(str) <= len(utf-8 bytes): checking chars first avoids encoding a
        # huge attacker string; a non-ASCII token is malformed anyway.
        if len(token) > self.max_token_bytes or len(token.encode("utf-8", "replace")) > self.max_token_bytes:
            raise AuthError("token too large", 401)

        header = self._parse(token)

        alg = header.get("alg")
        if not isinstance(alg, str) or alg not in self.algorithms:
            raise AuthError("algorithm not allowed", 401)

        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise AuthError("malformed token", 401)
        material = self.keys.get_key(kid)
        if material is None:
            raise UnknownKid(kid)
        if material.alg is not None and material.alg != alg:
            # The JWK publisher pinned this key to another algorithm.
            raise AuthError("algorithm not allowed", 401)
        if not key_fits_algorithm(alg, material.key):
            raise AuthError("algorithm not allowed", 401)

        try:
            claims = jwt.decode(
                token,
                material.key,
                algorithms=[alg],
                issuer=self.issuer,
                audience=list(self.audience) if self.audience else None,
                leeway=self.leeway_s,
                options={
                    "require": list(self.require),
                    # Time claims are checked below, against `now`: PyJWT
                    # coerces them with int() (so "123" and true pass as
                    # timestamps) and reports a future iat as "not yet valid".
                    "verify_exp": False,
                    "verify_nbf": False,
                    "verify_iat": False,
                    "enforce_minimum_key_length": True,
                },
            )
        except jwt.InvalidSignatureError:
            raise AuthError("bad signature", 401) from None
        except jwt.InvalidIssuerError:
            raise AuthError("wrong issuer", 401) from None
        except jwt.InvalidAudienceError:
            raise AuthError("wrong audience", 401) from None
        except jwt.MissingRequiredClaimError as e:
            if e.claim in self._allowed_missing:
                raise AuthError(f"missing claim {e.claim}", 401) from None
            raise AuthError("invalid claims", 401) from None
        except jwt.InvalidAlgorithmError:
            raise AuthError("algorithm not allowed", 401) from None
        except jwt.InvalidKeyError:
            # Key unusable for this algorithm (e.g. too short): our side, but
            # from the outside it is simply a token we cannot accept.
            raise AuthError("algorithm not allowed", 401) from None
        except jwt.InvalidTokenError:
            # Signature already verified at this point (PyJWT checks it
            # before claims); what is left is claim type/shape errors.
            raise AuthError("invalid claims", 401) from None

        # RFC 7519 NumericDate: a JSON number. null counts as absent (as in
        # PyJWT's `require`, which already refused a required null).
        exp, nbf, iat = claims.get("exp"), claims.get("nbf"), claims.get("iat")
        if any(v is not None and not _is_number(v) for v in (exp, nbf, iat)):
            raise AuthError("invalid claims", 401)
        t = time.time() if now is None else now
        if exp is not None and exp <= t - self.leeway_s:
            raise AuthError("token expired", 401)
        if nbf is not None and nbf > t + self.leeway_s:
            raise AuthError("token not yet valid", 401)
        # A token issued in the future is not "not yet valid" (nbf says
        # that): its issuer's clock or the token is wrong.
        if iat is not None and iat > t + self.leeway_s:
            raise AuthError("invalid claims", 401)
        return claims

    def _parse(self, token: str) -> dict[str, Any]:
        """Strict structural check; returns the header. PyJWT re-parses the
        payload after the signature check, this only proves it is an object."""
        parts = token.split(".")
        # An empty signature is structurally fine here (alg "none" tokens have
        # one); it is refused by the alg allowlist or the signature check.
        if len(parts) != 3 or not parts[0]:
            raise AuthError("malformed token", 401)
        try:
            header = json.loads(_b64url_strict(parts[0]))
            payload = json.loads(_b64url_strict(parts[1]))
            _b64url_strict(parts[2])
        except (ValueError, binascii.Error, RecursionError):
            # json.JSONDecodeError and UnicodeDecodeError are ValueErrors.
            raise AuthError("malformed token", 401) from None
        if not isinstance(header, dict) or not isinstance(payload, dict):
            raise AuthError("malformed token", 401)
        if "crit" in header or "b64" in header:
            raise AuthError("malformed token", 401)
        return header


# --------------------------------------------------------------------------
# Token extraction

# RFC 7230 token characters: valid for cookie names and header names.
_TOKEN_CHARS = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
_BEARER_PREFIX = "bearer."


def parse_source(s: str) -> tuple[str, str | None]:
    """Parse one token source: 'header', 'subprotocol', 'query:NAME', 'cookie:NAME'.

    Returns (kind, name); name is None for header/subprotocol. ValueError with
    a message fit for a config error otherwise.
    """
    expected = "expected 'header', 'subprotocol', 'query:NAME' or 'cookie:NAME'"
    if not isinstance(s, str):
        raise ValueError(f"invalid token source {s!r}: {expected}")  # noqa: TRY004 - config error
    kind, sep, name = s.partition(":")
    if kind in ("header", "subprotocol"):
        if sep:
            raise ValueError(
                f"invalid token source {s!r}: {kind!r} takes no name ({expected})"
            )
        return kind, None
    if kind in ("query", "cookie"):
        if not name:
            raise ValueError(f"invalid token source {s!r}: {kind} needs a name ({expected})")
        if not _TOKEN_CHARS.fullmatch(name):
            raise ValueError(
                f"invalid token source {s!r}: name {name!r} must be letters, "
                "digits or !#$%&'*+-.^_`|~"
            )
        return kind, name
    raise ValueError(f"invalid token source {s!r}: {expected}")


def parse_cookies(header_value: str | None) -> dict[str, str]:
    """Parse a Cookie request header into {name: value}.

    Lenient on purpose (unlike http.cookies.SimpleCookie, which drops the whole
    header on one odd pair): bad pairs are skipped, the first occurrence of a
    name wins, surrounding double quotes are removed. Several Cookie headers
    should be joined with "; " by the caller.
    """
    out: dict[str, str] = {}
    if not header_value:
        return out
    for pair in header_value.split(";"):
        name, sep, value = pair.partition("=")
        name = name.strip()
        if not sep or not name or not _TOKEN_CHARS.fullmatch(name):
            continue
        value = value.strip()
        if len(value) >= 2 and value[0] == value[-1] == '"':
            value = value[1:-1]
        out.setdefault(name, value)
    return out


def parse_subprotocols(header_value: str | None) -> list[str]:
    """Split a Sec-WebSocket-Protocol header into its entries (may be joined
    from several headers with ", ")."""
    if not header_value:
        return []
    return [p.strip() for p in header_value.split(",") if p.strip()]


def _is_bearer_subprotocol(p: str) -> bool:
    return p[: len(_BEARER_PREFIX)].lower() == _BEARER_PREFIX


def extract_token(
    sources: Sequence[str],
    headers: Mapping[str, str],
    query: Mapping[str, str],
    cookies: Mapping[str, str],
    subprotocols: Sequence[str],
) -> tuple[str | None, list[str]]:
    """Find the credential; return (token or None, subprotocols to forward).

    `headers`: any mapping where `.get("authorization")` finds the header,
    i.e. a plain dict with lowercase keys, or aiohttp's CIMultiDict(Proxy).
    `query`/`cookies`: name -> value (see `parse_cookies`).
    `subprotocols`: the offered entries (see `parse_subprotocols`).

    Sources are tried in order; the first non-empty hit wins. When
    "subprotocol" is one of the sources, every `bearer.<token>` entry is
    removed from the returned list whichever source supplied the token, so
    the credential never travels upstream in the forwarded offer. When it is
    not a source, the offer is returned unchanged (it is then not ours).

    Raises ValueError for an invalid source string (validate at startup with
    `parse_source`).
    """
    parsed = [parse_source(s) for s in sources]
    token: str | None = None
    for kind, name in parsed:
        if kind == "header":
            value = headers.get("authorization")
            if value:
                scheme, _, rest = value.strip().partition(" ")
                if scheme.lower() == "bearer" and rest.strip():
                    token = rest.strip()
        elif kind == "query":
            token = query.get(name) or None  # type: ignore[arg-type]
        elif kind == "cookie":
            token = cookies.get(name) or None  # type: ignore[arg-type]
        else:  # subprotocol
            for p in subprotocols:
                if _is_bearer_subprotocol(p) and len(p) > len(_BEARER_PREFIX):
                    token = p[len(_BEARER_PREFIX):]
                    break
        if token:
            break
    if any(kind == "subprotocol" for kind, _ in parsed):
        remaining = [p for p in subprotocols if not _is_bearer_subprotocol(p)]
    else:
        remaining = list(subprotocols)
    return token, remaining


# --------------------------------------------------------------------------
# Origin

_DEFAULT_PORTS = {"http": 80, "https": 443}


@dataclass(slots=True, frozen=True)
class _OriginPattern:
    scheme: str
    host: str  # for a wildcard: the suffix without "*." (e.g. "example.com")
    port: int | None
    wildcard: bool


def _split_origin(origin: str) -> tuple[str, str, int | None] | None:
    """(scheme, lowercase host, port-or-None) of a serialized origin, or None
    when it is not a plain scheme://host[:port]."""
    if not origin or any(c.isspace() or unicodedata.category(c) == "Cc" for c in origin):
        return None
    try:
        u = urlsplit(origin)
        port = u.port
    except ValueError:
        return None
    # A browser Origin never has userinfo, path, query or fragment; anything
    # that does is not an origin and must not be "normalized" into one.
    if (
        not u.scheme
        or not u.hostname
        or "@" in u.netloc
        or u.path not in ("",)
        or u.query
        or u.fragment
        or origin.endswith(("?", "#"))
    ):
        return None
    scheme = u.scheme.lower()
    if port is None or port == _DEFAULT_PORTS.get(scheme):
        port = None
    return scheme, u.hostname.lower(), port


@lru_cache(maxsize=256)
def parse_origin_pattern(pattern: str) -> _OriginPattern:
    """Validate one allowed-origin pattern; ValueError with a clear message.

    Forms: "https://app.example.com[:port]" (exact) or
    "https://*.example.com[:port]" (any subdomain depth, not the apex).
    """
    wildcard = False
    probe = pattern
    if isinstance(pattern, str) and "://*." in pattern:
        wildcard = True
        probe = pattern.replace("://*.", "://", 1)
    if not isinstance(pattern, str) or "*" in probe:
        raise ValueError(
            f"invalid origin pattern {pattern!r}: '*' is only allowed as the "
            "first label, as in 'https://*.example.com'"
        )
    parts = _split_origin(probe)
    if parts is None:
        raise ValueError(
            f"invalid origin pattern {pattern!r}: expected scheme://host[:port] "
            "with no path, e.g. 'https://app.example.com'"
        )
    scheme, host, port = parts
    if wildcard and "." not in host:
        # "*.com" would allow every .com site.
        raise ValueError(
            f"invalid origin pattern {pattern!r}: a wildcard needs at least two "
            "labels after '*.'"
        )
    return _OriginPattern(scheme, host, port, wildcard)


def origin_allowed(patterns: Sequence[str] | None, origin: str | None) -> bool:
    """Is this Origin allowed? None patterns = any origin (no check).

    With a pattern list, a request WITHOUT an Origin header is refused: non-
    browser clients send none, but "configured a list" means "only these",
    and letting a missing header through would let any non-browser client
    bypass it. Leave `patterns` unset for deployments that serve such clients.
    Comparison: scheme and host case-insensitive, default port elided
    (https://a.com:443 == https://a.com). Invalid patterns raise ValueError.
    """
    if patterns is None:
        return True
    if not origin:
        return False
    parts = _split_origin(origin)
    if parts is None:
        return False
    scheme, host, port = parts
    for p in patterns:
        pat = parse_origin_pattern(p)
        if pat.scheme != scheme or pat.port != port:
            continue
        if pat.wildcard:
            # Dot-anchored suffix: "evil-example.com" and "example.com" itself
            # do not match; a leading dot (empty label) does not either.
            if host.endswith("." + pat.host) and not host.startswith("."):
                return True
        elif host == pat.host:
            return True
    return False


# --------------------------------------------------------------------------
# Claims


def _same(a: Any, b: Any) -> bool:
    # bool is an int subclass in Python: without this, {"admin": True} would
    # match a claim of 1, and {"level": 1} a claim of true.
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    return a == b


def claims_match(spec: Mapping[str, object], claims: Mapping[str, Any]) -> bool:
    """True if every key of `spec` is satisfied by `claims`.

    - spec value scalar: the claim must equal it; list/tuple/set: any of them.
    - claim value list: matches if any element matches.
    - a missing claim never matches; an empty spec matches everything.
    - strict types: "1" != 1, True != 1. A space-separated string claim (such
      as OAuth `scope`) is compared whole, not split.
    """
    for name, expected in spec.items():
        if name not in claims:
            return False
        wanted = list(expected) if isinstance(expected, (list, tuple, set, frozenset)) else [expected]
        actual = claims[name]
        have = actual if isinstance(actual, list) else [actual]
        if not any(_same(h, w) for h in have for w in wanted):
            return False
    return True


CLAIM_HEADER_PREFIX = "Gateway-Claim-"


def claim_header_name(name: str) -> str:
    """'Gateway-Claim-<name>'; ValueError if `name` is not a valid header token
    (call at config load so forwarding never fails at request time)."""
    if not isinstance(name, str) or not _TOKEN_CHARS.fullmatch(name):
        raise ValueError(
            f"claim {name!r} cannot be forwarded as a header: the name must be "
            "letters, digits or !#$%&'*+-.^_`|~"
        )
    return CLAIM_HEADER_PREFIX + name


def is_claim_header(name: str) -> bool:
    """True for headers in our Gateway-Claim-* namespace. The proxy must drop
    these from the client's request, or a client could forge them."""
    return name[: len(CLAIM_HEADER_PREFIX)].lower() == CLAIM_HEADER_PREFIX.lower()


# What a forwarded claim value may be (forward_claim_headers): printable ASCII, no
# surrounding space. Empty is allowed.
_FORWARDABLE = re.compile(r"(?:[\x21-\x7e](?:[\x20-\x7e]*[\x21-\x7e])?)?")


def _header_value(v: Any) -> str | None:
    if v is None:
        return None
    if isinstance(v, bool):
        s = "true" if v else "false"
    elif isinstance(v, str):
        s = v
    elif isinstance(v, (int, float)):
        s = str(v)
    elif isinstance(v, list):
        items = [_header_value(x) for x in v]
        if any(i is None for i in items):
            return None
        s = ",".join(items)  # type: ignore[arg-type]
    else:
        # Objects: compact JSON, ASCII-only so no byte is open to
        # interpretation by an upstream header parser.
        s = json.dumps(v, separators=(",", ":"), ensure_ascii=True, sort_keys=True)
    return s


def forward_claim_headers(names: Sequence[str], claims: Mapping[str, Any]) -> list[tuple[str, str]]:
    """Headers telling upstream who the client is: [("Gateway-Claim-sub", ...), ...].

    `sub` comes first and always (when present), then each configured name in
    order, once. Absent or null claims are skipped. Values: strings as-is,
    booleans "true"/"false", numbers str(), lists joined with "," (so an
    element containing "," is ambiguous: upstream must not split blindly),
    objects as compact ASCII JSON. A value that is not printable ASCII (a
    control character: CR, LF, NUL, DEL, C1...; any non-ASCII character) or
    that starts or ends with a space is DROPPED, not cleaned: it is either an
    injection attempt or data a header cannot carry faithfully (a websocket
    upstream's head is latin-1, an HTTP backend's UTF-8, and header parsers
    strip surrounding spaces: two subjects would reach the backend as one).
    Raises ValueError for a name that is not a valid header token.
    """
    out: list[tuple[str, str]] = []
    seen: set[str] = set()
    for name in ("sub", *names):
        if name in seen:
            continue
        seen.add(name)
        header = claim_header_name(name)
        if name not in claims:
            continue
        value = _header_value(claims[name])
        if value is None:
            continue
        if _FORWARDABLE.fullmatch(value) is None:
            continue
        out.append((header, value))
    return out


# --------------------------------------------------------------------------
# Rate limiting


class TokenBucket:
    """Token bucket, refilled lazily from the `now` each call passes in.

    Starts full (`burst` tokens), gains `rate` tokens per second, holds at
    most `burst`. No timers: pass a monotonic clock reading to `take`.

    "Over the limit" is an episode of refusals: it starts at the first refused
    `take` and continues while refusals keep coming less than `grace_s` apart.
    `over_for(now)` is how long the current episode has lasted (0.0 when not
    over), so the caller can close a client that stayed over for T seconds:

        if not bucket.take(now) and bucket.over_for(now) >= T: close(1008)

    The episode is not ended by a single accepted message, because a client
    flooding at several times the rate still gets one through whenever a
    token accrues.
    """

    __slots__ = ("burst", "grace_s", "last", "last_refused", "over_since", "rate", "tokens")

    def __init__(self, rate: float, burst: int, *, grace_s: float = 1.0):
        if not _is_number(rate) or rate <= 0:
            raise ValueError("rate must be > 0")
        if not isinstance(burst, int) or isinstance(burst, bool) or burst < 1:
            raise ValueError("burst must be an integer >= 1")
        if not _is_number(grace_s) or grace_s < 0:
            raise ValueError("grace_s must be >= 0")
        self.rate = float(rate)
        self.burst = burst
        self.grace_s = float(grace_s)
        self.tokens = float(burst)
        self.last: float | None = None
        self.over_since: float | None = None
        self.last_refused: float | None = None

    def take(self, now: float, cost: float = 1.0) -> bool:
        """Consume `cost` tokens if available. Returns False (and records the
        refusal) otherwise."""
        if self.last is not None and now > self.last:
            self.tokens = min(float(self.burst), self.tokens + (now - self.last) * self.rate)
        # A clock that steps back must not mint tokens; just move the mark.
        if self.last is None or now > self.last:
            self.last = now
        if self.tokens >= cost:
            self.tokens -= cost
            return True
        if self.over_since is None or self.last_refused is None or now - self.last_refused >= self.grace_s:
            self.over_since = now
        self.last_refused = now
        return False

    def over_for(self, now: float) -> float:
        """Seconds the current over-the-limit episode has lasted; 0.0 if none."""
        if self.over_since is None or self.last_refused is None:
            return 0.0
        if now - self.last_refused >= self.grace_s:
            return 0.0
        return max(0.0, now - self.over_since)
