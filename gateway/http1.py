"""The HTTP/1.1 part of a WebSocket handshake: parse heads, build answers.

Small on purpose: a handshake is one GET with headers, and the relay takes
over the socket after the 101. Sizes are bounded by the caller.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from http import HTTPStatus
import re
from urllib.parse import parse_qsl, unquote

from .errors import Refusal

MAX_HEAD_BYTES = 16384
MAX_HEADERS = 100

# What a request head may not hold (SECURITY.md, "What the gateway refuses"): a
# CR or LF that does not end a line, any other control character but HTAB, DEL.
_BAD_HEAD = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]|\r(?!\n)|(?<!\r)\n")
# A header name is an RFC 9110 token.
_TOKEN = re.compile(r"[!#$%&'*+\-.^_`|~0-9A-Za-z]+")
# A request target is visible ASCII, without a fragment ('#' is never sent).
_BAD_TARGET = re.compile(r"[^\x21-\x7e]|#")
# A decoded path holds no control character.
_BAD_PATH = re.compile(r"[\x00-\x1f\x7f]")


@dataclass(slots=True)
class RequestHead:
    method: str
    target: str
    path: str
    query_string: str
    # Header names lowercased; repeated headers joined with ", " (RFC 9110 5.3),
    # except Cookie, joined with "; ".
    headers: dict[str, str]
    raw_headers: list[tuple[str, str]]
    query: dict[str, str] = field(default_factory=dict)


def parse_request(head: bytes) -> RequestHead:
    """Parse the request line and headers (without the final CRLF CRLF)."""
    try:
        text = head.decode("latin-1")
    except UnicodeDecodeError:  # pragma: no cover - latin-1 decodes anything
        raise Refusal(400, "bad request") from None
    if _BAD_HEAD.search(text) is not None:
        raise Refusal(400, "control character in the request head", metric="bad_request")
    lines = text.split("\r\n")
    parts = lines[0].split(" ")
    # A WebSocket upgrade needs HTTP/1.1 (RFC 6455 4.1): HTTP/1.0 and anything else is 400.
    if len(parts) != 3 or parts[2] != "HTTP/1.1":
        raise Refusal(400, "bad request line", metric="bad_request")
    method, target, _version = parts
    if not target.startswith("/") or _BAD_TARGET.search(target) is not None:
        raise Refusal(400, "bad request target", metric="bad_request")
    if len(lines) - 1 > MAX_HEADERS:
        raise Refusal(431, "too many headers", metric="headers_too_large")
    headers: dict[str, str] = {}
    raw: list[tuple[str, str]] = []
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep or _TOKEN.fullmatch(name) is None:
            raise Refusal(400, "bad header line", metric="bad_request")
        value = value.strip(" \t")
        raw.append((name, value))
        key = name.lower()
        if key in headers:
            headers[key] += ("; " if key == "cookie" else ", ") + value
        else:
            headers[key] = value
    # Origin-form only (RFC 9112 3.2.1): a target starting "//" is a path with an
    # empty first segment, not a host; slashes are never merged.
    path, _, query_string = target.partition("?")
    if "%" in path:
        try:
            path = unquote(path, errors="strict")
        except UnicodeDecodeError:
            raise Refusal(400, "bad request target", metric="bad_request") from None
        if _BAD_PATH.search(path) is not None:
            raise Refusal(400, "bad request target", metric="bad_request")
    if "/." in path and any(seg in (".", "..") for seg in path.split("/")):
        # Dot segments (sent as they are or percent-encoded): a backend that resolves them
        # would see a path other than the one the route was chosen for.
        raise Refusal(400, "dot segment in the request path", metric="bad_request")
    query = dict(parse_qsl(query_string, keep_blank_values=True)) if query_string else {}
    return RequestHead(method=method, target=target, path=path, query_string=query_string,
                       headers=headers, raw_headers=raw, query=query)


@dataclass(slots=True)
class ResponseHead:
    status: int
    headers: dict[str, str]


def parse_response(head: bytes) -> ResponseHead:
    lines = head.decode("latin-1").split("\r\n")
    parts = lines[0].split(" ", 2)
    if len(parts) < 2 or not parts[0].startswith("HTTP/1.") or not parts[1].isdigit():
        raise ValueError("bad status line")
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, sep, value = line.partition(":")
        if not sep:
            raise ValueError("bad header line")
        key = name.strip().lower()
        value = value.strip()
        headers[key] = headers[key] + ", " + value if key in headers else value
    return ResponseHead(status=int(parts[1]), headers=headers)


def header_tokens(value: str | None) -> list[str]:
    """Comma-separated header value -> lowercase tokens."""
    if not value:
        return []
    return [t.strip().lower() for t in value.split(",") if t.strip()]


def response(status: int, reason: str, headers: tuple[tuple[str, str], ...] = ()) -> bytes:
    """A complete refusal answer: JSON body, connection closed."""
    body = json.dumps({"error": reason}).encode()
    phrase = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    lines = [f"HTTP/1.1 {status} {phrase}", "Content-Type: application/json",
             f"Content-Length: {len(body)}", "Connection: close"]
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def switching_protocols(accept: str, protocol: str | None, extensions: str | None) -> bytes:
    lines = ["HTTP/1.1 101 Switching Protocols", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Accept: {accept}"]
    if protocol:
        lines.append(f"Sec-WebSocket-Protocol: {protocol}")
    if extensions:
        lines.append(f"Sec-WebSocket-Extensions: {extensions}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def upgrade_request(target: str, host: str, key: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"GET {target} HTTP/1.1", f"Host: {host}", "Upgrade: websocket", "Connection: Upgrade",
             f"Sec-WebSocket-Key: {key}", "Sec-WebSocket-Version: 13"]
    for name, value in headers:
        if "\r" in value or "\n" in value:
            continue  # never let a value split the head
        lines.append(f"{name}: {value}")
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1", "replace")
