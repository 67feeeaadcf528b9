"""Unit tests for gateway.auth (pure: no network, no event loop).

Tokens are minted with PyJWT and, independently, with joserfc, so a bug
shared by our verifier and PyJWT's encoder cannot hide itself.
Time-based claims use margins of an hour: no test depends on how fast it runs.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import json
import time
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from joserfc import jwt as jose_jwt
from joserfc.errors import SecurityWarning
from joserfc.jwk import ECKey, OctKey, OKPKey, RSAKey
from multidict import CIMultiDict

from gateway.auth import (
    REASONS,
    AuthError,
    KeyMaterial,
    PublicKeyFile,
    SecretKey,
    TokenBucket,
    UnknownKid,
    Verifier,
    claim_header_name,
    claims_match,
    extract_token,
    forward_claim_headers,
    is_claim_header,
    origin_allowed,
    parse_cookies,
    parse_origin_pattern,
    parse_source,
    parse_subprotocols,
)

HOUR = 3600
SECRET = b"s" * 64  # long enough for HS512 (RFC 7518 3.2)


# --------------------------------------------------------------------------
# Key material and minting helpers


def _pem_private(key: Any) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_public(key: Any) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


@dataclass
class KeyPair:
    private_pem: bytes
    public_pem: bytes
    public_path: str


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> dict[str, KeyPair]:
    d = tmp_path_factory.mktemp("keys")
    generated = {
        "rsa": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "rsa2": rsa.generate_private_key(public_exponent=65537, key_size=2048),
        "p256": ec.generate_private_key(ec.SECP256R1()),
        "p384": ec.generate_private_key(ec.SECP384R1()),
        "p521": ec.generate_private_key(ec.SECP521R1()),
        "ed25519": ed25519.Ed25519PrivateKey.generate(),
    }
    out = {}
    for name, k in generated.items():
        path = d / f"{name}.pub.pem"
        path.write_bytes(_pem_public(k))
        out[name] = KeyPair(_pem_private(k), _pem_public(k), str(path))
    return out


# algorithm -> key name in `keys` ("hmac" = SECRET)
ALG_KEY = {
    "HS256": "hmac", "HS384": "hmac", "HS512": "hmac",
    "RS256": "rsa", "RS384": "rsa", "RS512": "rsa",
    "PS256": "rsa", "PS384": "rsa", "PS512": "rsa",
    "ES256": "p256", "ES384": "p384", "ES512": "p521",
    "EdDSA": "ed25519",
}
ALL_ALGS = tuple(ALG_KEY)
MINTERS = ("pyjwt", "joserfc")


def _joserfc_key(alg: str, material: bytes) -> Any:
    if alg.startswith("HS"):
        return OctKey.import_key(material)
    if alg[:2] in ("RS", "PS"):
        return RSAKey.import_key(material)
    if alg.startswith("ES"):
        return ECKey.import_key(material)
    return OKPKey.import_key(material)


def mint(
    minter: str,
    alg: str,
    signing_key: bytes,
    claims: dict[str, Any],
    headers: dict[str, Any] | None = None,
) -> str:
    if minter == "pyjwt":
        return jwt.encode(claims, signing_key, algorithm=alg, headers=headers)
    header = {"alg": alg, **(headers or {})}
    with warnings.catch_warnings():
        # joserfc flags EdDSA as superseded by RFC 9864 ("Ed25519"); the
        # token it produces is still the standard EdDSA one we must accept.
        warnings.simplefilter("ignore", SecurityWarning)
        return jose_jwt.encode(header, claims, _joserfc_key(alg, signing_key), algorithms=[alg])


def signing_key_for(alg: str, keys: dict[str, KeyPair]) -> bytes:
    name = ALG_KEY[alg]
    return SECRET if name == "hmac" else keys[name].private_pem


def verifier_for(alg: str, keys: dict[str, KeyPair], **kw: Any) -> Verifier:
    name = ALG_KEY[alg]
    provider = SecretKey(SECRET) if name == "hmac" else PublicKeyFile(keys[name].public_path)
    return Verifier((alg,), provider, **kw)


def good_claims(**extra: Any) -> dict[str, Any]:
    now = int(time.time())
    return {"sub": "user-1", "iat": now, "exp": now + HOUR, **extra}


def b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode()


def hand_made(header: dict[str, Any], claims: dict[str, Any], signature: bytes = b"") -> str:
    return f"{b64(json.dumps(header).encode())}.{b64(json.dumps(claims).encode())}.{b64(signature)}"


def refused(verifier: Verifier, token: Any) -> AuthError:
    with pytest.raises(AuthError) as info:
        verifier.verify(token)
    err = info.value
    assert err.status == 401
    # The reason is always one of the fixed phrases, never library text.
    assert err.reason in REASONS or err.reason.startswith("missing claim ")
    return err


@dataclass
class DictKeys:
    """A stand-in KeyProvider (what JwksCache looks like to the Verifier)."""

    keys: dict[str | None, KeyMaterial]

    def get_key(self, kid: str | None) -> KeyMaterial | None:
        return self.keys.get(kid)


# --------------------------------------------------------------------------
# Verifier: acceptance across algorithm families and minters


@pytest.mark.parametrize("minter", MINTERS)
@pytest.mark.parametrize("alg", ALL_ALGS)
def test_every_algorithm_family_is_accepted_when_allowed(minter, alg, keys):
    claims = good_claims()
    token = mint(minter, alg, signing_key_for(alg, keys), claims)
    assert verifier_for(alg, keys).verify(token) == claims


# For each token algorithm, a verifier whose allowlist does not contain it
# (and whose key could not verify it anyway where no sibling exists).
OTHER_ALG = {
    "HS256": "HS384", "HS384": "HS256", "HS512": "HS256",
    "RS256": "RS384", "RS384": "RS256", "RS512": "PS256",
    "PS256": "RS256", "PS384": "PS256", "PS512": "RS512",
    "ES256": "ES384", "ES384": "ES256", "ES512": "ES256",
    "EdDSA": "RS256",
}


@pytest.mark.parametrize("minter", MINTERS)
@pytest.mark.parametrize("alg", ALL_ALGS)
def test_algorithm_not_in_allowlist_is_refused(minter, alg, keys):
    token = mint(minter, alg, signing_key_for(alg, keys), good_claims())
    err = refused(verifier_for(OTHER_ALG[alg], keys), token)
    assert err.reason == "algorithm not allowed"


def test_same_key_type_but_unlisted_algorithm_is_refused(keys):
    # RSA key fits RS256 and PS256; only RS256 is listed.
    v = Verifier(("RS256",), PublicKeyFile(keys["rsa"].public_path))
    token = mint("pyjwt", "PS256", keys["rsa"].private_pem, good_claims())
    assert refused(v, token).reason == "algorithm not allowed"


def test_exp_is_returned_for_scheduling_a_close(keys):
    claims = good_claims()
    token = mint("joserfc", "ES256", keys["p256"].private_pem, claims)
    assert verifier_for("ES256", keys).verify(token)["exp"] == claims["exp"]


def test_several_allowed_algorithms_share_one_key(keys):
    v = Verifier(("RS256", "PS256", "RS512"), PublicKeyFile(keys["rsa"].public_path))
    for alg in ("RS256", "PS256", "RS512"):
        assert v.verify(mint("joserfc", alg, keys["rsa"].private_pem, good_claims()))["sub"] == "user-1"


# --------------------------------------------------------------------------
# Attacks


@pytest.mark.parametrize("none_alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", [b"", b"x"])
def test_alg_none_is_refused(none_alg, signature, keys):
    token = hand_made({"alg": none_alg, "typ": "JWT"}, good_claims(), signature)
    for v in (verifier_for("HS256", keys), verifier_for("RS256", keys)):
        assert refused(v, token).reason == "algorithm not allowed"


def test_alg_none_minted_by_pyjwt_is_refused(keys):
    token = jwt.encode(good_claims(), None, algorithm="none")
    assert refused(verifier_for("RS256", keys), token).reason == "algorithm not allowed"


@pytest.mark.parametrize("none_alg", ["none", "None", "NONE"])
def test_none_in_the_allowlist_is_a_configuration_error(none_alg):
    with pytest.raises(ValueError, match="none"):
        Verifier(("HS256", none_alg), SecretKey(SECRET))


def _hs256_with_secret(secret: bytes, claims: dict[str, Any]) -> str:
    # Forged by hand: PyJWT refuses to use a PEM as an HMAC secret, an
    # attacker's tooling does not.
    signing_input = f"{b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}.{b64(json.dumps(claims).encode())}"
    sig = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(sig)}"


def test_hs256_signed_with_the_rsa_public_key_pem_is_refused(keys):
    token = _hs256_with_secret(keys["rsa"].public_pem, good_claims())
    assert refused(verifier_for("RS256", keys), token).reason == "algorithm not allowed"


def test_hs256_signed_with_a_jwks_public_key_is_refused(keys):
    pub = serialization.load_pem_public_key(keys["rsa"].public_pem)
    v = Verifier(("RS256",), DictKeys({"k1": KeyMaterial(pub)}))
    token = _hs256_with_secret(keys["rsa"].public_pem, good_claims())
    assert refused(v, token).reason == "algorithm not allowed"


def test_hmac_and_public_key_algorithms_cannot_be_mixed_by_construction(keys):
    with pytest.raises(ValueError, match="HS256"):
        Verifier(("RS256", "HS256"), PublicKeyFile(keys["rsa"].public_path))
    with pytest.raises(ValueError, match="HMAC"):
        Verifier(("HS256", "RS256"), SecretKey(SECRET))
    with pytest.raises(ValueError, match="JWKS"):
        Verifier(("HS256",), DictKeys({}))


def test_key_of_the_wrong_type_from_a_provider_is_refused(keys):
    # Defence in depth: a provider handing back a secret for an RS256 token.
    v = Verifier(("RS256",), DictKeys({None: KeyMaterial(keys["rsa"].public_pem)}))
    token = mint("pyjwt", "RS256", keys["rsa"].private_pem, good_claims())
    assert refused(v, token).reason == "algorithm not allowed"


def test_ec_key_on_the_wrong_curve_is_refused(keys):
    p384 = serialization.load_pem_public_key(keys["p384"].public_pem)
    v = Verifier(("ES256",), DictKeys({None: KeyMaterial(p384)}))
    token = mint("pyjwt", "ES256", keys["p256"].private_pem, good_claims())
    assert refused(v, token).reason == "algorithm not allowed"
    with pytest.raises(ValueError, match="ES384"):
        Verifier(("ES256", "ES384"), PublicKeyFile(keys["p256"].public_path))


def test_jwk_pinned_algorithm_must_match_the_token(keys):
    pub = serialization.load_pem_public_key(keys["rsa"].public_pem)
    v = Verifier(("RS256", "PS256"), DictKeys({"k": KeyMaterial(pub, alg="RS256")}))
    ok = mint("joserfc", "RS256", keys["rsa"].private_pem, good_claims(), {"kid": "k"})
    assert v.verify(ok)["sub"] == "user-1"
    ps = mint("joserfc", "PS256", keys["rsa"].private_pem, good_claims(), {"kid": "k"})
    assert refused(v, ps).reason == "algorithm not allowed"


@pytest.mark.parametrize("minter", MINTERS)
def test_tampered_payload_is_refused(minter, keys):
    token = mint(minter, "RS256", keys["rsa"].private_pem, good_claims())
    h, _, s = token.split(".")
    forged = f"{h}.{b64(json.dumps(good_claims(sub='admin')).encode())}.{s}"
    assert refused(verifier_for("RS256", keys), forged).reason == "bad signature"


@pytest.mark.parametrize("minter", MINTERS)
@pytest.mark.parametrize("alg", ["HS256", "RS256", "ES256", "EdDSA"])
def test_token_signed_with_another_key_is_refused(minter, alg, keys):
    other = {
        "HS256": b"o" * 32,
        "RS256": keys["rsa2"].private_pem,
        "ES256": _pem_private(ec.generate_private_key(ec.SECP256R1())),
        "EdDSA": _pem_private(ed25519.Ed25519PrivateKey.generate()),
    }[alg]
    token = mint(minter, alg, other, good_claims())
    assert refused(verifier_for(alg, keys), token).reason == "bad signature"


def test_truncated_or_empty_signature_is_refused(keys):
    token = mint("pyjwt", "RS256", keys["rsa"].private_pem, good_claims())
    h, p, s = token.split(".")
    short = b64(base64.urlsafe_b64decode(s + "==")[:-6])  # still valid base64url
    assert refused(verifier_for("RS256", keys), f"{h}.{p}.{short}").reason == "bad signature"
    assert refused(verifier_for("RS256", keys), f"{h}.{p}.").reason == "bad signature"


def test_non_canonical_base64_is_refused_as_malformed(keys):
    token = mint("pyjwt", "RS256", keys["rsa"].private_pem, good_claims())
    h, p, s = token.split(".")
    # 342 chars -> 334: a decodable length whose last char carries 4 stray bits.
    # Set them (keeping the char's 2 meaningful bits): by chance they are all
    # zero in 1 signature of 16, and the test then flaked.
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    cut = s[:-8]
    last = alphabet[(alphabet.index(cut[-1]) & 0b110000) | 0b0001]
    assert refused(verifier_for("RS256", keys), f"{h}.{p}.{cut[:-1]}{last}").reason == "malformed token"


# --------------------------------------------------------------------------
# Claims


@pytest.mark.parametrize("minter", MINTERS)
def test_expired_token_is_refused(minter, keys):
    now = int(time.time())
    token = mint(minter, "ES384", keys["p384"].private_pem,
                 {"sub": "u", "iat": now - 2 * HOUR, "exp": now - HOUR})
    assert refused(verifier_for("ES384", keys), token).reason == "token expired"


def test_leeway_accepts_a_token_expired_within_it(keys):
    now = int(time.time())
    token = mint("pyjwt", "HS256", SECRET, {"sub": "u", "exp": now - 60})
    assert verifier_for("HS256", keys, leeway_s=HOUR).verify(token)["sub"] == "u"


@pytest.mark.parametrize("minter", MINTERS)
def test_nbf_in_the_future_is_refused(minter, keys):
    token = mint(minter, "HS256", SECRET, good_claims(nbf=int(time.time()) + HOUR))
    assert refused(verifier_for("HS256", keys), token).reason == "token not yet valid"


def test_nbf_in_the_past_is_accepted(keys):
    token = mint("joserfc", "HS256", SECRET, good_claims(nbf=int(time.time()) - HOUR))
    assert verifier_for("HS256", keys).verify(token)["sub"] == "user-1"


@pytest.mark.parametrize("minter", MINTERS)
def test_iat_in_the_future_beyond_leeway_is_refused(minter, keys):
    token = mint(minter, "HS256", SECRET, good_claims(iat=int(time.time()) + HOUR))
    assert refused(verifier_for("HS256", keys, leeway_s=60), token).reason == "invalid claims"


def test_iat_in_the_future_within_leeway_is_accepted(keys):
    token = mint("pyjwt", "HS256", SECRET, good_claims(iat=int(time.time()) + 30))
    assert verifier_for("HS256", keys, leeway_s=HOUR).verify(token)["sub"] == "user-1"


def test_iat_uses_the_clock_passed_in(keys):
    iat = int(time.time())
    token = mint("pyjwt", "HS256", SECRET, good_claims(iat=iat))
    v = verifier_for("HS256", keys, leeway_s=10)
    assert refused_with_now(v, token, iat - 11) == "invalid claims"
    assert v.verify(token, now=iat - 9)["iat"] == iat


def test_time_claims_use_the_clock_passed_in(keys):
    token = mint("joserfc", "HS256", SECRET, {"sub": "u", "nbf": 1000, "exp": 2000})
    v = verifier_for("HS256", keys, leeway_s=5)
    assert refused_with_now(v, token, 994) == "token not yet valid"
    assert v.verify(token, now=995)["sub"] == "u"
    assert v.verify(token, now=2004.9)["sub"] == "u"
    assert refused_with_now(v, token, 2005) == "token expired"


def refused_with_now(v: Verifier, token: str, now: float) -> str:
    with pytest.raises(AuthError) as info:
        v.verify(token, now=now)
    return info.value.reason


@pytest.mark.parametrize("minter", MINTERS)
def test_wrong_issuer_is_refused(minter, keys):
    token = mint(minter, "RS256", keys["rsa"].private_pem, good_claims(iss="https://evil"))
    v = verifier_for("RS256", keys, issuer="https://idp.example.com")
    assert refused(v, token).reason == "wrong issuer"


def test_right_issuer_is_accepted(keys):
    token = mint("joserfc", "RS256", keys["rsa"].private_pem, good_claims(iss="https://idp"))
    assert verifier_for("RS256", keys, issuer="https://idp").verify(token)["iss"] == "https://idp"


def test_missing_issuer_is_refused_when_one_is_configured(keys):
    token = mint("pyjwt", "RS256", keys["rsa"].private_pem, good_claims())
    assert refused(verifier_for("RS256", keys, issuer="https://idp"), token).reason == "missing claim iss"


@pytest.mark.parametrize("minter", MINTERS)
def test_wrong_audience_is_refused(minter, keys):
    token = mint(minter, "HS512", SECRET, good_claims(aud="other-api"))
    assert refused(verifier_for("HS512", keys, audience="ws-api"), token).reason == "wrong audience"


def test_audience_list_matches_any_configured_audience(keys):
    token = mint("joserfc", "HS512", SECRET, good_claims(aud=["x", "ws-api"]))
    assert verifier_for("HS512", keys, audience=("ws-api", "other")).verify(token)["aud"] == ["x", "ws-api"]


def test_token_with_audience_is_refused_when_none_is_configured(keys):
    token = mint("pyjwt", "HS512", SECRET, good_claims(aud="someone-else"))
    assert refused(verifier_for("HS512", keys), token).reason == "wrong audience"


def test_missing_audience_is_refused_when_one_is_configured(keys):
    token = mint("pyjwt", "HS512", SECRET, good_claims())
    assert refused(verifier_for("HS512", keys, audience="ws-api"), token).reason == "missing claim aud"


@pytest.mark.parametrize("minter", MINTERS)
def test_token_without_exp_is_refused_by_default(minter, keys):
    token = mint(minter, "HS256", SECRET, {"sub": "u"})
    assert refused(verifier_for("HS256", keys), token).reason == "missing claim exp"


def test_exp_requirement_can_be_dropped(keys):
    token = mint("pyjwt", "HS256", SECRET, {"sub": "u"})
    assert verifier_for("HS256", keys, require=()).verify(token) == {"sub": "u"}


def test_configured_required_claim_is_named_in_the_refusal(keys):
    token = mint("joserfc", "HS256", SECRET, good_claims(sub=None))
    assert refused(verifier_for("HS256", keys, require=("exp", "sub")), token).reason == "missing claim sub"


@pytest.mark.parametrize(
    "bad",
    [
        {"exp": "soon"},
        {"exp": str(int(time.time()) + HOUR)},  # numeric string: not a NumericDate
        {"exp": True},
        {"nbf": "yesterday"},
        {"iat": "now"},
        {"sub": 12345},
    ],
    ids=["exp-text", "exp-numeric-string", "exp-bool", "nbf-text", "iat-text", "sub-not-string"],
)
def test_claims_of_the_wrong_type_are_refused(bad, keys):
    token = mint("pyjwt", "HS256", SECRET, good_claims(**bad))
    assert refused(verifier_for("HS256", keys), token).reason == "invalid claims"


@pytest.mark.parametrize("minter", MINTERS)
def test_unknown_kid_raises_unknown_kid_for_the_async_caller(minter, keys):
    pub = serialization.load_pem_public_key(keys["rsa"].public_pem)
    v = Verifier(("RS256",), DictKeys({"known": KeyMaterial(pub)}))
    token = mint(minter, "RS256", keys["rsa"].private_pem, good_claims(), {"kid": "rotated"})
    with pytest.raises(UnknownKid) as info:
        v.verify(token)
    assert info.value.kid == "rotated"
    assert info.value.reason == "unknown key" and info.value.status == 401
    assert isinstance(info.value, AuthError)


# --------------------------------------------------------------------------
# Malformed input


@pytest.mark.parametrize("token", [None, ""])
def test_missing_token_is_refused(token, keys):
    assert refused(verifier_for("HS256", keys), token).reason == "missing token"


def test_100kb_token_is_refused_as_too_large(keys):
    claims = good_claims(pad="x" * 100_000)
    for minter in MINTERS:
        token = mint(minter, "HS256", SECRET, claims)
        assert refused(verifier_for("HS256", keys), token).reason == "token too large"
    # Size is checked before parsing: garbage of that size is "too large" too.
    assert refused(verifier_for("HS256", keys), "a" * 100_000).reason == "token too large"


def test_token_size_limit_is_configurable(keys):
    token = mint("pyjwt", "HS256", SECRET, good_claims())
    assert refused(verifier_for("HS256", keys, max_token_bytes=len(token) - 1), token).reason == "token too large"
    assert verifier_for("HS256", keys, max_token_bytes=len(token)).verify(token)


def _seg(obj: Any) -> str:
    return b64(json.dumps(obj).encode())


MALFORMED = {
    "one-segment": "abc",
    "two-segments": "abc.def",
    "four-segments": "a.b.c.d",
    "empty-header": f".{_seg({'sub': 'u'})}.c2ln",
    "header-not-base64": f"!!!.{_seg({'sub': 'u'})}.c2ln",
    "header-not-json": f"{b64(b'not json')}.{_seg({'sub': 'u'})}.c2ln",
    "header-is-array": f"{_seg(['HS256'])}.{_seg({'sub': 'u'})}.c2ln",
    "payload-not-json": f"{_seg({'alg': 'HS256'})}.{b64(b'{oops')}.c2ln",
    "payload-is-string": f"{_seg({'alg': 'HS256'})}.{_seg('hello')}.c2ln",
    "payload-empty": f"{_seg({'alg': 'HS256'})}..c2ln",
    "signature-bad-chars": f"{_seg({'alg': 'HS256'})}.{_seg({'sub': 'u'})}.c2l*",
    "padding-chars": f"{_seg({'alg': 'HS256'})}=.{_seg({'sub': 'u'})}.c2ln",
    "non-ascii": f"{_seg({'alg': 'HS256'})}.{_seg({'sub': 'u'})}.c2lné",
    "whitespace": f"{_seg({'alg': 'HS256'})}. {_seg({'sub': 'u'})}.c2ln",
    "kid-not-string": f"{_seg({'alg': 'HS256', 'kid': 7})}.{_seg({'sub': 'u'})}.c2ln",
    "crit-header": f"{_seg({'alg': 'HS256', 'crit': ['exp'], 'exp': 1})}.{_seg({'sub': 'u'})}.c2ln",
    "b64-false": f"{_seg({'alg': 'HS256', 'b64': False, 'crit': ['b64']})}..c2ln",
}


@pytest.mark.parametrize("token", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_token_is_refused(token, keys):
    assert refused(verifier_for("HS256", keys), token).reason == "malformed token"


def test_missing_alg_is_refused(keys):
    token = f"{_seg({'typ': 'JWT'})}.{_seg(good_claims())}.c2ln"
    assert refused(verifier_for("HS256", keys), token).reason == "algorithm not allowed"


def test_crit_header_minted_by_pyjwt_is_refused(keys):
    token = mint("pyjwt", "HS256", SECRET, good_claims(), {"crit": ["exp"], "exp": 1})
    assert refused(verifier_for("HS256", keys), token).reason == "malformed token"


def test_refusal_never_echoes_the_token_or_library_text(keys):
    secretish = "SECRET-MARKER"
    token = mint("pyjwt", "HS256", b"o" * 32, good_claims(sub=secretish), {"kid": secretish})
    err = refused(verifier_for("HS256", keys), token)
    assert secretish not in str(err) and secretish not in err.reason


# --------------------------------------------------------------------------
# Construction


def test_unknown_algorithm_name_is_a_configuration_error():
    with pytest.raises(ValueError, match="HS257"):
        Verifier(("HS257",), SecretKey(SECRET))
    with pytest.raises(ValueError, match="at least one"):
        Verifier((), SecretKey(SECRET))


def test_algorithm_names_are_case_sensitive():
    with pytest.raises(ValueError, match="hs256"):
        Verifier(("hs256",), SecretKey(SECRET))


def test_short_hmac_secret_is_a_configuration_error():
    with pytest.raises(ValueError, match="HS256 needs at least 32"):
        Verifier(("HS256",), SecretKey(b"short"))
    with pytest.raises(ValueError, match="HS512 needs at least 64"):
        Verifier(("HS256", "HS512"), SecretKey(b"x" * 32))
    with pytest.raises(ValueError, match="empty"):
        SecretKey(b"")


def test_secret_key_does_not_show_in_repr():
    assert "topsecret" not in repr(SecretKey(b"topsecret" * 8))


def test_public_key_file_errors_name_the_file(tmp_path: Path, keys):
    missing = tmp_path / "nope.pem"
    with pytest.raises(ValueError, match="nope.pem"):
        PublicKeyFile(str(missing))
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("hello")
    with pytest.raises(ValueError, match="garbage.pem.*not a PEM"):
        PublicKeyFile(str(garbage))
    private = tmp_path / "private.pem"
    private.write_bytes(keys["rsa"].private_pem)
    with pytest.raises(ValueError, match="private.pem"):
        PublicKeyFile(str(private))
    weak = tmp_path / "weak.pem"
    weak.write_bytes(_pem_public(rsa.generate_private_key(public_exponent=65537, key_size=1024)))
    with pytest.raises(ValueError, match="weak.pem.*1024 bits"):
        PublicKeyFile(str(weak))


def test_public_key_file_is_read_once_at_construction(tmp_path: Path, keys):
    path = tmp_path / "k.pem"
    path.write_bytes(keys["p256"].public_pem)
    v = Verifier(("ES256",), PublicKeyFile(str(path)))
    path.unlink()
    assert v.verify(mint("pyjwt", "ES256", keys["p256"].private_pem, good_claims()))


@pytest.mark.parametrize(
    "kw",
    [{"audience": ()}, {"audience": ""}, {"issuer": ""}, {"leeway_s": -1},
     {"max_token_bytes": 0}, {"require": ("",)}],
)
def test_invalid_policy_values_are_configuration_errors(kw):
    with pytest.raises(ValueError):
        Verifier(("HS256",), SecretKey(SECRET), **kw)


# --------------------------------------------------------------------------
# extract_token


def test_bearer_header_is_extracted():
    token, protos = extract_token(("header",), {"authorization": "Bearer abc.def.ghi"}, {}, {}, [])
    assert token == "abc.def.ghi" and protos == []


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
def test_bearer_scheme_is_case_insensitive(scheme):
    assert extract_token(("header",), {"authorization": f"{scheme}  t1 "}, {}, {}, [])[0] == "t1"


def test_header_lookup_works_with_a_case_insensitive_multidict():
    headers = CIMultiDict({"Authorization": "Bearer t1"})
    assert extract_token(("header",), headers, {}, {}, [])[0] == "t1"


@pytest.mark.parametrize("value", ["Basic dXNlcjpwdw==", "Bearer", "Bearer   ", "", "Token t1"])
def test_non_bearer_or_empty_authorization_is_no_token(value):
    assert extract_token(("header",), {"authorization": value}, {}, {}, [])[0] is None


def test_query_source_is_extracted():
    assert extract_token(("query:access_token",), {}, {"access_token": "q1"}, {}, [])[0] == "q1"
    assert extract_token(("query:access_token",), {}, {"access_token": ""}, {}, [])[0] is None


def test_cookie_source_is_extracted():
    cookies = parse_cookies("theme=dark; session=c1")
    assert extract_token(("cookie:session",), {}, {}, cookies, [])[0] == "c1"


def test_subprotocol_source_is_extracted_and_removed():
    token, protos = extract_token(("subprotocol",), {}, {}, {}, ["chat.v2", "bearer.s1", "json"])
    assert token == "s1"
    assert protos == ["chat.v2", "json"]


def test_bearer_subprotocol_is_removed_even_when_an_earlier_source_wins():
    token, protos = extract_token(
        ("header", "subprotocol"), {"authorization": "Bearer h1"}, {}, {}, ["bearer.s1", "chat"]
    )
    assert token == "h1" and protos == ["chat"]


def test_every_bearer_subprotocol_entry_is_removed():
    token, protos = extract_token(("subprotocol",), {}, {}, {}, ["Bearer.a", "x", "bearer.b"])
    assert token == "a" and protos == ["x"]


def test_subprotocols_are_untouched_when_subprotocol_is_not_a_source():
    token, protos = extract_token(("header",), {}, {}, {}, ["bearer.s1", "chat"])
    assert token is None and protos == ["bearer.s1", "chat"]


def test_returned_subprotocol_list_is_a_copy():
    offered = ["chat"]
    _, protos = extract_token(("header",), {}, {}, {}, offered)
    protos.append("x")
    assert offered == ["chat"]


def test_empty_bearer_subprotocol_is_no_token():
    token, protos = extract_token(("subprotocol",), {}, {}, {}, ["bearer.", "chat"])
    assert token is None and protos == ["chat"]


ALL_PRESENT: dict[str, Any] = {
    "headers": {"authorization": "Bearer H"},
    "query": {"t": "Q"},
    "cookies": {"c": "C"},
    "subprotocols": ["bearer.S"],
}


@pytest.mark.parametrize(
    "sources,expected",
    [
        (("header", "query:t", "cookie:c", "subprotocol"), "H"),
        (("query:t", "header", "cookie:c", "subprotocol"), "Q"),
        (("cookie:c", "query:t", "header"), "C"),
        (("subprotocol", "header"), "S"),
        (("query:other", "cookie:other", "cookie:c"), "C"),
        (("query:other",), None),
        ((), None),
    ],
)
def test_sources_are_tried_in_configured_order(sources, expected):
    token, protos = extract_token(sources, **ALL_PRESENT)
    assert token == expected
    assert protos == ([] if "subprotocol" in sources else ["bearer.S"])


def test_falls_through_to_the_next_source_when_one_is_absent():
    token, _ = extract_token(("header", "query:t"), {}, {"t": "Q"}, {}, [])
    assert token == "Q"


def test_extract_token_rejects_an_invalid_source():
    with pytest.raises(ValueError, match="invalid token source"):
        extract_token(("headers",), {}, {}, {}, [])


@pytest.mark.parametrize(
    "s,expected",
    [
        ("header", ("header", None)),
        ("subprotocol", ("subprotocol", None)),
        ("query:access_token", ("query", "access_token")),
        ("cookie:__Host-session", ("cookie", "__Host-session")),
    ],
)
def test_parse_source_accepts_valid_sources(s, expected):
    assert parse_source(s) == expected


@pytest.mark.parametrize(
    "s",
    ["", "Header", "headers", "header:X-Token", "subprotocol:x", "query", "query:",
     "cookie:", "cookie:a b", "cookie:a=b", "query:a;b", "bearer", ":x"],
)
def test_parse_source_rejects_invalid_sources_with_a_clear_message(s):
    with pytest.raises(ValueError, match=r"invalid token source .*"):
        parse_source(s)


def test_parse_cookies():
    assert parse_cookies(None) == {}
    assert parse_cookies("") == {}
    assert parse_cookies("a=1; b=2;c=3") == {"a": "1", "b": "2", "c": "3"}
    assert parse_cookies('a="quoted"') == {"a": "quoted"}
    assert parse_cookies("a=first; a=second") == {"a": "first"}
    assert parse_cookies("junk; =novalue; ok=1; bad name=2") == {"ok": "1"}
    assert parse_cookies("t=abc.def.ghi==") == {"t": "abc.def.ghi=="}
    assert parse_cookies("empty=") == {"empty": ""}


def test_parse_subprotocols():
    assert parse_subprotocols(None) == []
    assert parse_subprotocols("chat, bearer.x ,,json") == ["chat", "bearer.x", "json"]


# --------------------------------------------------------------------------
# Origin


ORIGIN_CASES = [
    # (patterns, origin, allowed)
    (None, None, True),
    (None, "https://anything.test", True),
    (("https://app.example.com",), None, False),
    (("https://app.example.com",), "", False),
    (("https://app.example.com",), "https://app.example.com", True),
    (("https://app.example.com",), "https://APP.Example.COM", True),
    (("https://app.example.com",), "HTTPS://app.example.com", True),
    (("https://app.example.com",), "http://app.example.com", False),
    (("https://app.example.com",), "https://app.example.com:443", True),
    (("https://app.example.com:443",), "https://app.example.com", True),
    (("https://app.example.com",), "https://app.example.com:8443", False),
    (("https://app.example.com:8443",), "https://app.example.com:8443", True),
    (("https://app.example.com",), "https://app.example.com.evil.test", False),
    (("https://app.example.com",), "https://evilapp.example.com", False),
    (("https://app.example.com",), "https://app.example.com/", False),
    (("https://app.example.com",), "https://app.example.com/path", False),
    (("https://app.example.com",), "https://user@app.example.com", False),
    (("https://app.example.com",), "https://evil.test@app.example.com", False),
    (("https://app.example.com",), "https://app.example.com\r\n", False),
    (("https://app.example.com",), "null", False),
    (("https://*.example.com",), "https://a.example.com", True),
    (("https://*.example.com",), "https://a.b.c.example.com", True),
    (("https://*.example.com",), "https://A.EXAMPLE.com", True),
    (("https://*.example.com",), "https://example.com", False),
    (("https://*.example.com",), "https://evil-example.com", False),
    (("https://*.example.com",), "https://evilexample.com", False),
    (("https://*.example.com",), "https://a.example.com.evil.test", False),
    (("https://*.example.com",), "https://.example.com", False),
    (("https://*.example.com",), "http://a.example.com", False),
    (("https://*.example.com",), "https://a.example.com:8443", False),
    (("https://*.example.com:8443",), "https://a.example.com:8443", True),
    (("https://*.example.com",), "https://a.example.com.", False),
    (("https://*.example.com", "http://localhost:3000"), "http://localhost:3000", True),
    (("http://localhost:3000",), "http://localhost:3001", False),
    (("http://[::1]:8080",), "http://[::1]:8080", True),
    ((), "https://app.example.com", False),
]


@pytest.mark.parametrize("patterns,origin,allowed", ORIGIN_CASES)
def test_origin_allowed(patterns, origin, allowed):
    assert origin_allowed(patterns, origin) is allowed


@pytest.mark.parametrize(
    "pattern",
    ["*", "https://*", "https://*.com", "https://a.*.example.com", "https://*example.com",
     "*.example.com", "https://example.com/", "example.com", "https://*.example.com/path",
     "https://ex*ample.com", "null"],  # opaque origins ("null") can never be allowed
)
def test_invalid_origin_patterns_are_configuration_errors(pattern):
    with pytest.raises(ValueError, match="invalid origin pattern"):
        parse_origin_pattern(pattern)


# --------------------------------------------------------------------------
# claims_match


CLAIMS = {
    "sub": "u1",
    "role": "admin",
    "groups": ["dev", "ops"],
    "level": 3,
    "verified": True,
    "flag": 1,
    "scope": "read write",
    "nothing": None,
    "empty": [],
}


@pytest.mark.parametrize(
    "spec,expected",
    [
        ({}, True),
        ({"role": "admin"}, True),
        ({"role": "user"}, False),
        ({"role": ["user", "admin"]}, True),
        ({"role": ("user", "admin")}, True),
        ({"role": ["user", "guest"]}, False),
        ({"role": []}, False),
        ({"groups": "ops"}, True),
        ({"groups": "qa"}, False),
        ({"groups": ["qa", "dev"]}, True),
        ({"groups": ["qa", "sales"]}, False),
        ({"role": "admin", "groups": "dev"}, True),
        ({"role": "admin", "groups": "qa"}, False),
        ({"missing": "x"}, False),
        ({"missing": ["x", None]}, False),
        ({"nothing": None}, True),
        ({"empty": "x"}, False),
        ({"level": 3}, True),
        ({"level": "3"}, False),
        ({"level": 3.0}, True),
        ({"verified": True}, True),
        ({"verified": 1}, False),
        ({"flag": True}, False),
        ({"flag": 1}, True),
        ({"scope": "read"}, False),
        ({"scope": "read write"}, True),
        ({"sub": "U1"}, False),
    ],
)
def test_claims_match(spec, expected):
    assert claims_match(spec, CLAIMS) is expected


# --------------------------------------------------------------------------
# Forwarded claim headers


def test_sub_is_always_forwarded_first():
    claims = {"sub": "u1", "email": "a@b.c", "tenant": "t1"}
    assert forward_claim_headers(("tenant",), claims) == [
        ("Gateway-Claim-sub", "u1"),
        ("Gateway-Claim-tenant", "t1"),
    ]
    assert forward_claim_headers((), claims) == [("Gateway-Claim-sub", "u1")]


def test_configured_sub_is_not_duplicated():
    assert forward_claim_headers(("sub", "sub"), {"sub": "u"}) == [("Gateway-Claim-sub", "u")]


def test_claim_values_are_stringified():
    claims = {"sub": "u", "roles": ["a", "b"], "admin": True, "n": 3, "ratio": 0.5,
              "obj": {"b": 1, "a": "é"}, "nul": None, "mixed": [1, False]}
    headers = dict(forward_claim_headers(("roles", "admin", "n", "ratio", "obj", "nul", "absent", "mixed"), claims))
    assert headers == {
        "Gateway-Claim-sub": "u",
        "Gateway-Claim-roles": "a,b",
        "Gateway-Claim-admin": "true",
        "Gateway-Claim-n": "3",
        "Gateway-Claim-ratio": "0.5",
        "Gateway-Claim-obj": '{"a":"\\u00e9","b":1}',
        "Gateway-Claim-mixed": "1,false",
    }


@pytest.mark.parametrize(
    "value",
    ["x\r\nX-Admin: 1", "x\nX-Admin: 1", "x\rY", "nul\x00", "del\x7f", "c1\x85",
     "tab\there", "ls\u2028", ["ok", "bad\r\nX: 1"]],
)
def test_claim_values_with_control_characters_are_dropped(value):
    assert forward_claim_headers(("tenant",), {"sub": "u", "tenant": value}) == [
        ("Gateway-Claim-sub", "u")
    ]
    assert forward_claim_headers((), {"sub": value}) == []


def test_claim_names_that_are_not_header_tokens_are_configuration_errors():
    with pytest.raises(ValueError, match="cannot be forwarded"):
        forward_claim_headers(("https://example.com/roles",), {"sub": "u"})
    with pytest.raises(ValueError):
        claim_header_name("bad name")
    with pytest.raises(ValueError):
        claim_header_name("x\r\nY")
    assert claim_header_name("tenant_id") == "Gateway-Claim-tenant_id"


def test_is_claim_header_detects_client_supplied_spoofs():
    assert is_claim_header("Gateway-Claim-sub")
    assert is_claim_header("gateway-claim-SUB")
    assert not is_claim_header("Gateway-Claimant")
    assert not is_claim_header("X-Gateway-Claim-sub")


# --------------------------------------------------------------------------
# TokenBucket


def test_bucket_allows_a_burst_then_refuses():
    b = TokenBucket(rate=1.0, burst=3)
    assert [b.take(100.0) for _ in range(4)] == [True, True, True, False]


def test_bucket_refills_lazily_at_the_rate():
    b = TokenBucket(rate=2.0, burst=2)
    assert b.take(0.0) and b.take(0.0) and not b.take(0.0)
    assert not b.take(0.25)  # half a token
    assert b.take(0.5)       # one token accrued since t=0
    assert not b.take(0.5)


def test_bucket_never_holds_more_than_burst():
    b = TokenBucket(rate=100.0, burst=2)
    b.take(0.0)
    assert [b.take(1000.0) for _ in range(3)] == [True, True, False]


def test_clock_going_backwards_mints_no_tokens():
    b = TokenBucket(rate=1.0, burst=1)
    assert b.take(10.0)
    assert not b.take(5.0)
    assert not b.take(10.5)
    assert b.take(11.0)


def test_over_limit_episode_is_measured():
    b = TokenBucket(rate=1.0, burst=1, grace_s=1.0)
    assert b.over_for(0.0) == 0.0
    assert b.take(0.0)
    assert not b.take(0.1)
    assert b.over_since == 0.1
    assert b.over_for(0.6) == pytest.approx(0.5)


def test_flooding_client_stays_over_limit_despite_occasional_accepts():
    # 10 messages/s against 1/s: one in ten gets through, the episode goes on.
    b = TokenBucket(rate=1.0, burst=1, grace_s=1.0)
    t = 0.0
    for _ in range(100):
        b.take(t)
        t += 0.1
    assert b.over_for(t - 0.1) >= 9.0


def test_over_limit_episode_ends_after_grace_without_refusals():
    b = TokenBucket(rate=1.0, burst=1, grace_s=1.0)
    b.take(0.0)
    assert not b.take(0.1)
    assert b.over_for(1.2) == 0.0
    assert b.take(1.2)
    assert not b.take(1.3)
    assert b.over_since == 1.3  # a new episode


def test_bucket_rejects_nonsense_parameters():
    for kw in ({"rate": 0, "burst": 1}, {"rate": -1, "burst": 1}, {"rate": 1, "burst": 0},
               {"rate": 1, "burst": 1.5}, {"rate": float("inf"), "burst": 1}):
        with pytest.raises(ValueError):
            TokenBucket(**kw)


def test_bucket_uses_slots():
    assert not hasattr(TokenBucket(1, 1), "__dict__")
