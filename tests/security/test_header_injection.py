"""CR/LF and friends in what the gateway forwards: the backend never sees a split
header (SECURITY.md, "Header injection"). The rule: a client's request head with
a control character anywhere but its CRLF line ends (in a header, or percent-encoded
in the path) is refused 400 before any backend hears of it; a JWT claim whose value
is not printable ASCII is not forwarded (the session opens without that header).
Both backend kinds: a websocket upstream's handshake and an HTTP backend's connect
event, read as raw bytes by RawRecorder."""

from __future__ import annotations

import pytest

from .support import exchange, jwt_auth, record, token, upgrade

INJECTED = "x-injected"


def config(mode: str, rec) -> dict:
    if mode == "websocket":
        backend = {"type": "websocket", "endpoints": [rec.ws_url]}
        route = {"forward_path": True}
    else:
        backend = {"type": "http", "endpoints": [rec.http_url]}
        route = {"events": {"connect": "b"}}
    return {"auth": jwt_auth(), "backends": {"b": backend},
            "routes": [{"name": "r", "match": {"path_prefix": "/ws"}, "auth": "required", "backend": "b", **route}]}


def split_seen(heads: list[bytes]) -> list[str]:
    """What in these heads a backend's parser would take for more than was meant: an
    injected header line, or a request line that is not three parts."""
    out = []
    for head in heads:
        text = head.decode("latin-1")
        lines = text.replace("\r\n", "\n").replace("\r", "\n").split("\n")
        if len(lines[0].split(" ")) != 3:
            out.append(f"request line {lines[0]!r}")
        out += [f"line {ln!r}" for ln in lines[1:] if ln.lower().startswith(INJECTED)]
        if "\x00" in text:
            out.append("NUL")
    return out


# (what, target, extra headers, host, expected status)
CLIENT_CASES = [
    ("LF in a header value", "/ws", [("X-Note", "a\nX-Injected: 1")], "gw", 400),
    ("CR in a header value", "/ws", [("X-Note", "a\rX-Injected: 1")], "gw", 400),
    ("NUL in a header value", "/ws", [("X-Note", "a\x00b")], "gw", 400),
    ("LF in Cookie", "/ws", [("Cookie", "a=1\nX-Injected: 1")], "gw", 400),
    ("LF in Origin", "/ws", [("Origin", "http://a\nX-Injected: 1")], "gw", 400),
    ("LF in X-Forwarded-For", "/ws", [("X-Forwarded-For", "1.2.3.4\nX-Injected: 1")], "gw", 400),
    ("LF in the subprotocol offer", "/ws", [("Sec-WebSocket-Protocol", "chat\nX-Injected: 1")], "gw", 400),
    ("LF in Host", "/ws", [], "gw\nX-Injected: 1", 400),
    ("CR in a header name", "/ws", [("X\rInjected", "1")], "gw", 400),
    ("encoded CRLF in the path", "/ws/%0d%0aX-Injected:%201", [], "gw", 400),
    ("encoded LF in the path", "/ws/a%0aX-Injected:%201", [], "gw", 400),
    ("encoded NUL in the path", "/ws/a%00b", [], "gw", 400),
    ("encoded request line in the path", "/ws/a%20HTTP/1.1%0d%0aX-Injected:%201%0d%0a", [], "gw", 400),
    ("encoded CRLF in the query", "/ws?x=%0d%0aX-Injected:%201", [], "gw", 101),
    ("encoded space in the path", "/ws/a%20b", [], "gw", 101),
    ("encoded ? and # in the path", "/ws/a%3Fb%23c", [], "gw", 101),
    ("obs-text (latin-1) in a header value", "/ws", [("X-Note", "caf\xe9")], "gw", 101),
    ("a forged Gateway-Claim-sub", "/ws", [("Gateway-Claim-sub", "mallory")], "gw", 101),
    ("a forged Gateway-Session-Id", "/ws", [("Gateway-Session-Id", "forged")], "gw", 101),
]


# What a websocket upstream's request line is for these (forward_path): decoded for
# routing, percent-encoded again on the way on.
FORWARDED = {"/ws/a%20b": "/up/a%20b", "/ws/a%3Fb%23c": "/up/a%3Fb%23c"}


@pytest.mark.parametrize("mode", ["websocket", "http"])
async def test_control_characters_from_the_client_are_refused_and_never_reach_the_backend(
        gateway, recorder, mode, record_property):
    gw = await gateway(config(mode, recorder))
    port = gw.ports[0]
    auth = ("Authorization", f"Bearer {token('alice')}")
    failures = []
    for what, target, extra, host, want in CLIENT_CASES:
        before = len(recorder.heads)
        a = await exchange(port, upgrade(target, host=host, extra=[auth, *extra]))
        a.close()
        new = recorder.heads[before:]
        if a.status != want:
            failures.append(f"{what}: {a.status}, wanted {want}")
        if want == 400 and new:
            failures.append(f"{what}: refused, yet the backend was sent {new!r}")
        if want == 101 and len(new) != 1:
            failures.append(f"{what}: the backend got {len(new)} requests, wanted 1")
        for seen in split_seen(new):
            failures.append(f"{what}: the backend saw {seen}")
        text = b"".join(new).decode("latin-1")
        if "mallory" in text or "forged" in text:
            failures.append(f"{what}: a client's Gateway-* header reached the backend")
        line = text.split("\r\n", 1)[0]
        if mode == "websocket" and target in FORWARDED and line != f"GET {FORWARDED[target]} HTTP/1.1":
            failures.append(f"{what}: request line {line!r}, wanted the path encoded again")
    record(record_property, f"{mode} backend: CR/LF/NUL in client headers, Host, path (encoded), query",
           len(CLIENT_CASES), "400 and nothing sent, or 101 with one unsplit head", failures)
    assert not failures, failures
    # The gateway still serves after all of it.
    ok = await exchange(port, upgrade("/ws", extra=[auth]))
    ok.close()
    assert ok.status == 101


# (what, claims, the Gateway-Claim-* header expected: (name, value or None for absent))
CLAIM_CASES = [
    ("plain tenant", {"tenant": "acme"}, ("tenant", "acme")),
    ("CRLF in tenant", {"tenant": "t\r\nX-Injected: 1"}, ("tenant", None)),
    ("LF in tenant", {"tenant": "t\nX-Injected: 1"}, ("tenant", None)),
    ("CR in tenant", {"tenant": "t\rX-Injected: 1"}, ("tenant", None)),
    ("NUL in tenant", {"tenant": "t\x00"}, ("tenant", None)),
    ("C1 NEL in tenant", {"tenant": "t\x85X-Injected: 1"}, ("tenant", None)),
    ("U+2028 in tenant", {"tenant": "t\u2028X-Injected: 1"}, ("tenant", None)),
    ("CRLF in sub", {"sub": "alice\r\nX-Injected: 1"}, ("sub", None)),
    ("CRLF in a list element", {"roles": ["a", "b\r\nX-Injected: 1"]}, ("roles", None)),
    ("CRLF inside an object (JSON-escaped)", {"obj": {"k": "v\r\nX-Injected: 1"}},
     ("obj", '{"k":"v\\r\\nX-Injected: 1"}')),
    ("non-ASCII sub", {"sub": "\u65e5\u672c"}, ("sub", None)),
    ("latin-1 sub", {"sub": "jos\xe9"}, ("sub", None)),
    ("leading space", {"role": " admin"}, ("role", None)),
    ("trailing space", {"role": "admin "}, ("role", None)),
    ("a JSON string as tenant", {"tenant": '"x"'}, ("tenant", '"x"')),
]


def claim_header(head: bytes, name: str) -> str | None:
    for line in head.decode("latin-1").split("\r\n")[1:]:
        k, _, v = line.partition(":")
        if k.lower() == f"gateway-claim-{name}".lower():
            return v.strip()
    return None


@pytest.mark.parametrize("mode", ["websocket", "http"])
async def test_claims_that_a_header_cannot_carry_are_not_forwarded(gateway, recorder, mode, record_property):
    gw = await gateway(config(mode, recorder))
    failures = []
    for what, claims, (name, want) in CLAIM_CASES:
        before = len(recorder.heads)
        a = await exchange(gw.ports[0], upgrade("/ws", extra=[("Authorization", f"Bearer {token(**claims)}")]))
        a.close()
        new = recorder.heads[before:]
        if a.status != 101 or len(new) != 1:
            failures.append(f"{what}: status {a.status}, {len(new)} requests at the backend")
            continue
        got = claim_header(new[0], name)
        if got != want:
            failures.append(f"{what}: Gateway-Claim-{name} {got!r}, wanted {want!r}")
        failures += [f"{what}: the backend saw {seen}" for seen in split_seen(new)]
    record(record_property, f"{mode} backend: JWT claims with CR/LF/NUL/C1/U+2028/non-ASCII/spaces",
           len(CLAIM_CASES), "101; such a claim's header absent, no split; others exact", failures)
    assert not failures, failures


async def test_two_non_ascii_subjects_never_reach_the_backend_as_one(gateway, recorder, record_property):
    """Before the rule, a websocket upstream's latin-1 head turned both into "??"."""
    gw = await gateway(config("websocket", recorder))
    seen = []
    for sub in ("\u65e5\u672c", "\u4e2d\u56fd"):
        before = len(recorder.heads)
        a = await exchange(gw.ports[0], upgrade("/ws", extra=[("Authorization", f"Bearer {token(sub)}")]))
        a.close()
        seen.append(claim_header(recorder.heads[before], "sub") if a.status == 101 else f"status {a.status}")
    failures = [] if seen == [None, None] else [f"Gateway-Claim-sub values {seen!r}"]
    record(record_property, "two JWTs whose sub are different non-ASCII strings", 2,
           "no Gateway-Claim-sub for either (never one value for two subjects)", failures)
    assert not failures
