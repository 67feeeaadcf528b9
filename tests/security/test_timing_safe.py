"""Secrets are compared in constant time (SECURITY.md, "Secrets"): an AST scan of
gateway/ for ==, != (and startswith/endswith) whose operands are named like a secret,
with every exception listed and said why; and the comparison points themselves,
called, must go through hmac.compare_digest."""

from __future__ import annotations

import ast
import hmac
import pathlib
import re

import aiohttp

from gateway import tokens
from gateway.store import detached as d
from gateway.store.memory import MemoryStore

from .support import ADMIN_TOKEN, record

ROOT = pathlib.Path(__file__).resolve().parents[2] / "gateway"
SECRETISH = re.compile(r"token|secret|key|sig|digest|hash|passw|credential|^th$|^expected$|^got$", re.I)

# (file, the comparison as ast.unparse writes it): why it compares no secret.
ALLOWED = {
    ("app.py", "digest == self._applied"): "the config file's content digest, to notice a change",
    ("app.py", "digest != seen"): "the same, while watching the file",
    ("config.py", "key == 'claims'"): "a config key name",
    ("frames.py", "len(base64.b64decode(key.encode('ascii'), validate=True)) == 16"):
        "a client's Sec-WebSocket-Key length (public)",
    ("handshake.py", "hash_on == 'ip'"): "a config value (consistent-hash source)",
    ("http1.py", "key == 'cookie'"): "a header name",
    ("jwks.py", "len(self._keys) == 1"): "how many public keys a JWKS holds",
    ("server.py", "reason.startswith(tokens.REASON_PREFIX)"): "the public 'resume=' prefix of a close reason",
}


def _names(node) -> list[str]:
    out = []
    for n in ast.walk(node):
        if isinstance(n, ast.Name):
            out.append(n.id)
        elif isinstance(n, ast.Attribute):
            out.append(n.attr)
        elif isinstance(n, ast.Subscript) and isinstance(n.slice, ast.Constant) and isinstance(n.slice.value, str):
            out.append(n.slice.value)
    return out


def scan() -> list[tuple[str, int, str]]:
    """(file, line, expression) of every ==/!=/startswith/endswith touching a secret-like name."""
    found = []
    for path in sorted(ROOT.rglob("*.py")):
        rel = str(path.relative_to(ROOT))
        for node in ast.walk(ast.parse(path.read_text(), filename=rel)):
            if isinstance(node, ast.Compare) and any(isinstance(o, (ast.Eq, ast.NotEq)) for o in node.ops):
                operands = [node.left, *node.comparators]
            elif (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute)
                  and node.func.attr in ("startswith", "endswith")):
                operands = [node.func.value, *node.args]
            else:
                continue
            if any(SECRETISH.search(name) for o in operands for name in _names(o)):
                found.append((rel, node.lineno, ast.unparse(node)))
    return found


def test_no_secret_is_compared_with_eq_outside_the_listed_exceptions(record_property):
    found = scan()
    failures = [f"{f}:{line}: {expr}" for f, line, expr in found if (f, expr) not in ALLOWED]
    stale = [k for k in ALLOWED if k not in {(f, e) for f, _, e in found}]
    failures += [f"listed exception no longer in the code: {k}" for k in stale]
    record(record_property, "AST scan of gateway/ for ==, !=, startswith/endswith on token/secret/key/"
           "signature/hash-like names", len(found), f"only the {len(ALLOWED)} listed exceptions", failures)
    assert not failures, failures


def test_the_scan_finds_a_plain_comparison_of_a_token(record_property):
    """The scan can fail: a `==` on a token, written the way a slip would be."""
    tree = ast.parse("def check(got_token, expected):\n    return got_token == expected\n")
    (node,) = [n for n in ast.walk(tree) if isinstance(n, ast.Compare)]
    failures = [] if any(SECRETISH.search(n) for n in _names(node)) else ["got_token == expected not flagged"]
    record(record_property, "the scan's pattern on `got_token == expected`", 1, "flagged", failures)
    assert not failures


class Recording:
    """hmac.compare_digest, counting its calls."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = hmac.compare_digest

        def compare(a, b):
            self.calls.append((a, b))
            return real(a, b)
        monkeypatch.setattr(hmac, "compare_digest", compare)


async def test_the_comparison_points_go_through_compare_digest(gateway, monkeypatch, record_property):
    rec = Recording(monkeypatch)
    failures = []
    # Resume tokens: the store keeps the secret's SHA-256 and compares hashes.
    tok, th = tokens.new("sessionA1")
    sid, parsed_th = tokens.parse(tok)
    if (sid, parsed_th) != ("sessionA1", th) or len(th) != 64:
        failures.append(f"tokens.parse: {sid}, {parsed_th}")
    if tokens.parse(tok[:-1] + ("A" if tok[-1] != "A" else "B"))[1] == th:
        failures.append("another secret, the same hash")
    store = MemoryStore()
    det = store.detached
    await det.park([d.Parked(record={"session": sid, "node": "n0", "route": "r", "sub": "alice"},
                             token_hash=th, window_s=60)])
    await det.append(sid, [], 10, 100, seal=True)
    before = len(rec.calls)
    status, _ = await det.take(sid, tokens.parse(tok[:-1] + ("Z" if tok[-1] != "Z" else "Y"))[1],
                               "alice", "n1", 30)
    if status != d.FORGED:
        failures.append(f"take with another secret: {status}")
    if len(rec.calls) == before:
        failures.append("detached.take compared the hash without compare_digest")
    status, _ = await det.take(sid, th, "alice", "n1", 30)
    if status != d.OK:
        failures.append(f"take with the right secret: {status}")
    # The admin token: the middleware.
    gw = await gateway({"backends": {"e": {"type": "builtin", "handler": "echo"}},
                        "routes": [{"name": "r", "match": {"path_prefix": "/ws"}, "auth": "none", "backend": "e"}]})
    async with aiohttp.ClientSession() as http:
        for auth, want in ((f"Bearer {ADMIN_TOKEN}", 200), (f"Bearer {ADMIN_TOKEN[:-1]}?", 401)):
            before = len(rec.calls)
            async with http.get(gw.admin_url + "/v1/nodes", headers={"Authorization": auth}) as r:
                if r.status != want:
                    failures.append(f"/v1/nodes with {auth[:12]}...: {r.status}, wanted {want}")
            if not any(ADMIN_TOKEN.encode() in b"".join(x if isinstance(x, bytes) else x.encode() for x in c)
                       for c in rec.calls[before:]):
                failures.append("the admin token was compared without compare_digest")
    record(record_property, "tokens.parse/digest, detached.take (memory store), the admin middleware, "
           "with hmac.compare_digest recorded", 5, "right secret accepted, wrong refused, each via "
           "compare_digest", failures)
    assert not failures, failures
