"""What a debug trace may show of a payload: its first bytes, with whatever
looks like a secret taken out. Pure functions, no I/O.

A trace (gateway/trace.py) keeps the first HEAD_BYTES of each frame. Those
bytes are often the start of a login message, an API call with a key, or a
token refresh, so before they are kept anywhere they pass through here, and
a span that looks like a secret becomes `[redacted]`:

- the value of a field whose name says it holds a secret (token, password,
  secret, authorization, api_key, credential, cookie, ...; or is exactly
  auth, pass, pin, otp, jwt or key), in JSON (also
  JSON escaped inside a JSON string), in a Python/JS literal, a query string
  or a header line: `{"password": [redacted]}`, `access_token=[redacted]`;
- a JWT: `eyJ` and base64url, with or without its dots (a part of one, cut by
  the head limit, included);
- the credentials of an Authorization scheme: `Bearer [redacted]`;
- a long run of base64/base64url (20+ characters mixing upper and lower case
  and digits) or of hex (32+): random keys and opaque tokens. At an edge where
  the head was cut (its end, or the start of a continuation frame) a shorter
  run is enough (12 / 16), because the rest of it was cut off.

It errs towards hiding: a long mixed-case identifier is hidden too, while a
UUID or a 16-character id (connection ids) stays visible. A binary payload is
shown in hex; the same rules are applied to its bytes read as Latin-1, so a
token inside a binary protocol is hidden there as well.
"""

from __future__ import annotations

import re

__all__ = ["HEAD_BYTES", "MARK", "secret_spans", "redact", "text_head", "hex_head"]

HEAD_BYTES = 48
MARK = "[redacted]"

# A field name that says its value is a secret: the whole name (access_token,
# X-Api-Key, client_secret, passwd), matched without regard to case.
_NAME = (r"(?:[A-Za-z0-9_.-]*(?:token|passw(?:or)?d|pass(?:phrase|code)|pwd|secret|authori[sz]ation|api[_-]?key"
         r"|apikey|credential|private[_-]?key|cookie|signature|session[_-]?key)[A-Za-z0-9_.-]*"
         r"|auth|pass|pin|otp|jwt|key)")   # ... or exactly one of these
_FIELD = re.compile(
    r"(?:\\?[\"'])?(?<![A-Za-z0-9_.-])" + _NAME + r"(?:\\?[\"'])?\s*[:=]\s*"
    r"(\\\"(?:(?!\\\").)*(?:\\\"|$)"            # JSON inside a JSON string: \"...\"
    r"|\"(?:[^\"\\]|\\.)*(?:\"|\\?$)"           # "..." (possibly cut by the head limit)
    r"|'(?:[^'\\]|\\.)*(?:'|\\?$)"              # '...'
    r"|(?!(?:bearer|basic|digest)\s)[^\s,;&}\]\"'\\]+)",   # bare: 1234, abc&, true (a scheme: below)
    re.IGNORECASE | re.DOTALL)
_JWT = re.compile(r"eyJ[A-Za-z0-9_-]+(?:\.[A-Za-z0-9_=-]*)*")
_SCHEME = re.compile(r"\b(?:bearer|basic|digest)\s+([A-Za-z0-9._~+/-]+=*)", re.IGNORECASE)   # RFC 6750 b64token
_RUN = re.compile(r"[A-Za-z0-9+/_-]+={0,2}")
_HEX = re.compile(r"[0-9A-Fa-f]+")

LONG_RUN, LONG_HEX = 20, 32      # a run this long is a key or a token
CUT_RUN, CUT_HEX = 12, 16        # ... or this long where the head was cut


# _FIELD is the costly one: run it only where one of these is in the text.
_HINTS = ("token", "pass", "pwd", "secret", "auth", "api", "key", "credential", "cookie", "signature", "pin", "otp",
          "jwt")
_DIGIT, _UPPER, _LOWER = re.compile(r"[0-9]"), re.compile(r"[A-Z]"), re.compile(r"[a-z]")


def _mixed(run: str) -> bool:
    return bool(_DIGIT.search(run) and _UPPER.search(run) and _LOWER.search(run))


def secret_spans(text: str, cut_start: bool = False, cut_end: bool = False) -> list[tuple[int, int]]:
    """The (start, end) spans of `text` that look like secrets, sorted and merged.

    `cut_start` / `cut_end`: the text is a piece of something longer there
    (a continuation frame; the head limit), so a run touching that edge is
    judged by the shorter thresholds.
    """
    low = text.lower()
    spans = [m.span(1) for m in _FIELD.finditer(text)] if any(h in low for h in _HINTS) else []
    spans += [m.span() for m in _JWT.finditer(text)]
    spans += [m.span(1) for m in _SCHEME.finditer(text)]
    n = len(text)
    for m in _RUN.finditer(text):
        start, end = m.span()
        at_cut = (cut_start and start == 0) or (cut_end and end == n)
        run = m.group()
        if len(run) >= (CUT_RUN if at_cut else LONG_RUN) and _mixed(run):
            spans.append((start, end))
    for m in _HEX.finditer(text):
        start, end = m.span()
        at_cut = (cut_start and start == 0) or (cut_end and end == n)
        if end - start >= (CUT_HEX if at_cut else LONG_HEX):
            spans.append((start, end))
    spans.sort()
    merged: list[tuple[int, int]] = []
    for start, end in spans:
        if start == end:
            continue
        if merged and start <= merged[-1][1]:
            if end > merged[-1][1]:
                merged[-1] = (merged[-1][0], end)
        else:
            merged.append((start, end))
    return merged


def redact(text: str, cut_start: bool = False, cut_end: bool = False) -> str:
    """`text` with every secret-looking span replaced by MARK."""
    out = []
    pos = 0
    for start, end in secret_spans(text, cut_start, cut_end):
        out.append(text[pos:start])
        out.append(MARK)
        pos = end
    out.append(text[pos:])
    return "".join(out)


def text_head(head: bytes, cut_start: bool = False, cut_end: bool = False) -> str:
    """The head of a text frame: UTF-8 (a sequence broken by the cut or invalid: U+FFFD), redacted."""
    return redact(head.decode("utf-8", "replace"), cut_start, cut_end)


def hex_head(head: bytes, cut_start: bool = False, cut_end: bool = False) -> str:
    """The head of a binary frame in hex; bytes that read (as Latin-1) like a secret become MARK."""
    out = []
    pos = 0
    for start, end in secret_spans(head.decode("latin-1"), cut_start, cut_end):
        out.append(head[pos:start].hex())
        out.append(MARK)
        pos = end
    out.append(head[pos:].hex())
    return "".join(out)
