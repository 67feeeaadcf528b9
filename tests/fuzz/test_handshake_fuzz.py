"""The handshake's pure parts and the message selector under fuzzing, each checked
against a small reference written here (not the gateway's own helpers):

- Sec-WebSocket-Protocol lists, bearer-token extraction (header, query, cookie,
  `bearer.` subprotocol, in source order), Cookie headers, the resume token and
  `last=` read from a parsed request;
- path tricks (`..`, `.`, percent-encoded dots and slashes, double slashes, NUL,
  case) in a request target: parse_request refuses every dot segment, and a target
  it lets through matches exactly the routes a segment-wise reference says;
- `select: $.a.b` on random JSON documents and random bytes: the value the reference
  walk finds, and the action it names, or `$default`.
"""

from __future__ import annotations

import json
from urllib.parse import quote, unquote

from hypothesis import strategies as st

from gateway import config, handshake, http1, reliable, resume
from gateway.auth import extract_token, parse_cookies, parse_subprotocols
from gateway.dispatch import ActionSink, compile_select, select_value
from gateway.errors import Refusal
from gateway.routing import Router

from . import test_parsers_fuzz
from .test_parsers_fuzz import fuzz

tally = test_parsers_fuzz.tally   # the fixture: counts cases and failures into record_property

# ------------------------------------------------------------------ subprotocols, tokens, cookies

proto = st.lists(st.sampled_from(list("abc.v1-_ ,\t") + ["bearer.", "BEARER.", "gateway.reliable.v1"]),
                 max_size=12).map("".join)


def test_subprotocol_list_splits_on_commas_and_round_trips(tally):
    def check(header):
        got = parse_subprotocols(header)
        assert got == [p.strip() for p in header.split(",") if p.strip()]
        assert all(p and "," not in p and p == p.strip() for p in got)
        assert parse_subprotocols(", ".join(got)) == got
        offer = handshake.own_offer(got)
        assert offer is None or (offer in got and offer != reliable.SUBPROTOCOL)
    fuzz(tally, (proto | st.text(max_size=30),), "random Sec-WebSocket-Protocol values",
         "the comma-separated, stripped, non-empty entries; join and split round-trips", check)


SOURCES = ["header", "subprotocol", "query:access_token", "cookie:tok"]


def reference_token(sources, authorization, query, cookies, offer):
    """First non-empty hit in source order; a `bearer.` entry (any case) is never forwarded
    when the subprotocol is a source."""
    token = None
    for s in sources:
        if s == "header" and authorization:
            parts = authorization.strip().split(" ", 1)
            if len(parts) == 2 and parts[0].lower() == "bearer" and parts[1].strip():
                token = parts[1].strip()
        elif s.startswith("query:"):
            token = query.get(s[6:]) or None
        elif s.startswith("cookie:"):
            token = cookies.get(s[7:]) or None
        elif s == "subprotocol":
            token = next((p[7:] for p in offer if p.lower().startswith("bearer.") and len(p) > 7), None)
        if token:
            break
    forward = [p for p in offer if not p.lower().startswith("bearer.")] if "subprotocol" in sources else list(offer)
    return token, forward


def test_bearer_token_extraction_agrees_with_the_reference(tally):
    auth_value = st.one_of(st.none(), st.text(max_size=12), st.sampled_from(["Bearer abc", "bearer  x ", "Basic x",
                                                                            "Bearer", "Bearer ", " Bearer t"]))

    def check(sources, authorization, query, cookie_header, offer_header):
        headers = {} if authorization is None else {"authorization": authorization}
        cookies = parse_cookies(cookie_header)
        offer = parse_subprotocols(offer_header)
        got = extract_token(sources, headers, query, cookies, offer)
        want = reference_token(sources, authorization, query, cookies, offer)
        assert got == want
        token, forward = got
        if "subprotocol" in sources:
            assert not any(p.lower().startswith("bearer.") for p in forward)   # the credential stays here
    fuzz(tally, (st.lists(st.sampled_from(SOURCES), min_size=1, max_size=4, unique=True), auth_value,
                 st.dictionaries(st.sampled_from(["access_token", "x"]), st.text(max_size=4), max_size=2),
                 st.text(alphabet="tok=ab; \"x,", max_size=24), proto),
         "random token sources, Authorization, query, Cookie and subprotocol offers",
         "the reference's token and forwarded offer; no bearer.* forwarded", check)


def test_cookie_header_parse_keeps_first_of_each_name(tally):
    pair = st.tuples(st.text(alphabet="abAB_-.x", min_size=1, max_size=4), st.text(alphabet="vw1 \"=", max_size=5))

    def check(pairs, junk):
        header = "; ".join(f"{n}={v}" for n, v in pairs) + junk
        got = parse_cookies(header)
        first = {}
        for n, v in pairs:
            v = v.strip()
            first.setdefault(n, v[1:-1] if len(v) >= 2 and v[0] == v[-1] == '"' else v)
        assert got == first, (header, got)   # the junk pairs (no name, a bad name, empty) add nothing
    fuzz(tally, (st.lists(pair, max_size=4), st.sampled_from(["", ";", "; =x", ";;", "; bad name=1"])),
         "random Cookie headers with repeated names, quotes, junk pairs", "the first value of each name", check)


def test_resume_token_and_last_are_read_from_the_parsed_request(tally):
    def check(token, last, header_token):
        target = "/ws?resume=" + quote(token, safe="")
        if last is not None:
            target += "&last=" + quote(last, safe="")
        extra = [] if header_token is None else [f"Gateway-Resume: {header_token}"]
        head = "\r\n".join([f"GET {target} HTTP/1.1", "Host: x"] + extra).encode("latin-1")
        try:
            req = http1.parse_request(head)
        except Refusal as r:
            assert r.status == 400
            return
        assert resume.requested(req) == (token or (header_token or None))
        try:
            n = reliable.parse_last(req.query.get("last"))
        except Refusal as r:
            assert r.status == 400 and not (last and last.isascii() and last.isdigit() and len(last) <= 19)
            return
        assert n == (None if last is None else int(last))
    header = st.none() | st.text(alphabet="abc.XYZ_-09", min_size=1, max_size=20)
    fuzz(tally, (st.text(max_size=40), st.none() | st.text(max_size=22) | st.integers(0, 10**20).map(str), header),
         "random resume= / last= query values and Gateway-Resume headers",
         "the query's token (else the header's), last= a count or Refusal 400", check)


# ------------------------------------------------------------------ path tricks

ROUTES = config.parse("""\
backends: {b: {type: builtin, handler: echo}}
routes:
  - {name: chat, match: {path: /chat}, backend: b}
  - {name: admin, match: {path_prefix: /admin/}, backend: b}
  - {name: api, match: {path_prefix: /api}, backend: b}
""").routes
ROUTER = Router(ROUTES)

trick = st.sampled_from(["admin", "api", "chat", "..", ".", "%2e%2e", "%2E.", ".%2e", "%2e", "%2f", "%2F", "",
                         "%00", "%25", "%2fadmin", "ADMIN", "api%2f..%2fadmin", "x", "%61dmin", "é", "%c3%a9", "%ff", "apix", "admin.", "%2fapi", "chat%2f"])


def reference_routes(decoded: str) -> list[str]:
    """Segment-wise: /chat exactly; /admin/ and what is below; /api, /api/..."""
    segs = decoded.split("/")[1:]
    out = []
    if decoded == "/chat":
        out.append("chat")
    if segs[:1] == ["admin"] and (len(segs) > 1 or decoded == "/admin"):
        out.append("admin")
    if segs[:1] == ["api"]:
        out.append("api")
    return out


def test_path_tricks_never_reach_a_route_they_should_not(tally):
    def check(parts, query):
        target = "/" + "/".join(parts) + query
        try:
            req = http1.parse_request(f"GET {target} HTTP/1.1\r\nHost: x".encode("latin-1"))
        except Refusal as r:
            assert r.status == 400
            return
        raw_path = target.partition("?")[0]
        decoded = unquote(raw_path, errors="strict")
        assert req.path == decoded
        assert not {".", ".."} & set(decoded.split("/")), target       # dot segments are refused, encoded or not
        got = [r.name for r in ROUTER.candidates(req.path, "x", req.headers, req.query)]
        assert got == reference_routes(decoded), (target, got)
    fuzz(tally, (st.lists(trick, min_size=1, max_size=4), st.sampled_from(["", "?a=1", "?../admin", "?%2e%2e"])),
         "request targets built from '..', '.', %2e, %2f, '//', %00, case and unicode segments",
         "dot segments refused 400; otherwise exactly the segment-wise reference's routes", check)


# ------------------------------------------------------------------ message selector

json_scalar = st.one_of(st.none(), st.booleans(), st.integers(-(2**63), 2**63 - 1),
                        st.floats(allow_nan=False, allow_infinity=False),
                        st.text(alphabet=st.characters(exclude_categories=("Cs",)), max_size=6),
                        st.sampled_from(["buy", "quote", "$default"]))
json_doc = st.recursive(json_scalar, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
    st.sampled_from(["action", "a", "b", "x"]), kids, max_size=3), max_leaves=10)


def reference_select(doc, path):
    for key in path:
        if not isinstance(doc, dict) or key not in doc:
            return None
        doc = doc[key]
    return doc if isinstance(doc, str) else None


class _Sink:
    def __init__(self, name):
        self.name = name


def test_selector_finds_what_a_json_walk_finds(tally):
    sinks = {"buy": _Sink("orders"), "quote": _Sink("quotes")}

    def check(doc, select, lead, default, opcode):
        path = compile_select(select)
        payload = lead.encode() + json.dumps(doc, ensure_ascii=False).encode()
        want = reference_select(doc, path)
        assert select_value(payload, path) == want
        actions = dict(sinks, **({"$default": _Sink("fallback")} if default else {}))
        sink = ActionSink("r", select, actions, "no route").target(opcode, payload)
        named = actions.get(want) if opcode == 1 and want in sinks else None
        assert sink is (named or actions.get("$default")), (doc, select, sink)
    fuzz(tally, (json_doc | st.dictionaries(st.just("action"), json_doc, max_size=1),
                 st.sampled_from(["$.action", "$.a.b", "$.a", "$.x.action"]), st.sampled_from(["", " ", "\n\t"]),
                 st.booleans(), st.sampled_from([1, 2])),
         "random JSON documents (text and binary messages) under $.action, $.a.b, ...",
         "the reference walk's string; its action, else $default (binary always $default)", check)


def test_selector_on_random_bytes_never_raises(tally):
    def check(payload):
        got = select_value(payload, ("action",))
        assert got is None or isinstance(got, str)
    deep = st.integers(1, 3000).map(lambda n: b'{"action":' + b"[" * n + b"]" * n + b"}")
    fuzz(tally, (st.binary(max_size=60) | deep | st.just(b'{"action": 1e999}') | st.just(b'{"action":"\\ud800"}')
                 | st.text(max_size=30).map(lambda t: ('{"action":' + t).encode()),),
         "random bytes, truncated JSON, 3000-deep arrays, 1e999, lone surrogates", "None or a string", check)
