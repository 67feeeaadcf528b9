"""gateway/http1.py: the request target is split as urlsplit splits a path-only target;
targets a WebSocket client never sends (a fragment, whitespace, control or non-ASCII
characters) are 400, and "//x" is a path, not a host (SECURITY.md)."""

from __future__ import annotations

from urllib.parse import parse_qsl, unquote, urlsplit

import pytest

from gateway import http1
from gateway.errors import Refusal

TARGETS = [
    "/", "/ws", "/a/b/c", "/ws?token=abc", "/ws?a=1&b=2&a=3", "/ws?", "/ws?=x&y", "/?a=%20b+c",
    "/a%20b", "/a%2Fb?x=%E2%82%AC", "/a%ZZ", "/%C3%A9", "/x?y?z", "/a;b?c;d", "/ws?a=1#frag",
    "/ws#f?x=1", "//host/path?q=1", "//", "///x", "/a\tb", "/a\nb?c=\rd", "/caf\xe9", "/a?b=\xe9",
]


REFUSED = {"/ws?a=1#frag", "/ws#f?x=1", "/a\tb", "/a\nb?c=\rd", "/caf\xe9", "/a?b=\xe9"}


def reference(target: str) -> tuple[str, str, dict[str, str]]:
    """The split before the shortcut: urlsplit (of the target as a path) for every target."""
    if target in REFUSED:
        raise UnicodeDecodeError("utf-8", b"", 0, 1, "refused")   # the 400 branch below
    split = urlsplit("http://h" + target)
    return unquote(split.path, errors="strict"), split.query, dict(parse_qsl(split.query, keep_blank_values=True))


@pytest.mark.parametrize("target", TARGETS)
def test_target_split_is_urlsplits(target):
    raw = f"GET {target} HTTP/1.1\r\nHost: h".encode("latin-1")
    try:
        want = reference(target)
    except UnicodeDecodeError:
        with pytest.raises(Refusal) as exc:
            http1.parse_request(raw)
        assert exc.value.status == 400
        return
    head = http1.parse_request(raw)
    assert (head.path, head.query_string, head.query) == want
    assert head.target == target


def test_invalid_percent_utf8_in_the_path_is_400():
    with pytest.raises(Refusal) as exc:
        http1.parse_request(b"GET /%FF HTTP/1.1\r\nHost: h")
    assert (exc.value.status, exc.value.reason) == (400, "bad request target")


@pytest.mark.parametrize("line", [b"Bad\tName: x", b" Lead: x", b"Trail : x", b"\x85Odd: x", b": empty"])
def test_header_names_with_whitespace_or_empty_are_400(line):
    with pytest.raises(Refusal) as exc:
        http1.parse_request(b"GET / HTTP/1.1\r\n" + line)
    assert (exc.value.status, exc.value.reason) == (400, "bad header line")
