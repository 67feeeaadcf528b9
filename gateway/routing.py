"""Route selection: once per handshake, never per message.

Rules are compiled from the config once; `Router.candidates` walks them in
order and yields the routes whose path, host, header and query conditions
hold. Claims are checked by the caller after the token is verified, because a
route whose claims are the only thing that fails answers 403, not 404.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING
from urllib.parse import parse_qsl, quote, urlencode

from .paths import path_has_prefix

if TYPE_CHECKING:  # types only: config imports routing's helpers, not the reverse
    from .config import Match, Route


def host_matches(pattern: str, host: str) -> bool:
    """`pattern` is lowercase, without port; '*.example.com' matches sub-domains."""
    if pattern.startswith("*."):
        return host.endswith(pattern[1:]) and len(host) > len(pattern) - 1
    return host == pattern


def strip_port(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):  # [::1]:8080
        return host[: host.find("]") + 1]
    return host.rsplit(":", 1)[0] if host.count(":") == 1 else host


class CompiledRoute:
    """Everything the handshake needs, bound once."""

    __slots__ = ("route", "name", "match", "needs_token", "wants_token", "backend_name")

    def __init__(self, route: Route):
        self.route = route
        self.name = route.name
        self.match = route.match
        self.needs_token = route.auth == "required"
        self.wants_token = route.auth != "none"
        self.backend_name = route.backend

    def holds(self, path: str, host: str, headers: Mapping[str, str], query: Mapping[str, str]) -> bool:
        m: Match = self.match
        if m.path is not None and path != m.path:
            return False
        if m.path_prefix is not None and not path_has_prefix(path, m.path_prefix):
            return False
        if m.host is not None and not host_matches(m.host, host):
            return False
        for name, value in m.headers:
            if headers.get(name) != value:
                return False
        for name, value in m.query:
            if query.get(name) != value:
                return False
        return True

    def path_remainder(self, path: str) -> str:
        prefix = self.match.path_prefix
        if prefix is None:
            return "" if self.match.path is not None else path
        rest = path[len(prefix.rstrip("/")):]
        return rest


class Router:
    def __init__(self, routes: tuple[Route, ...]):
        self.routes = tuple(CompiledRoute(r) for r in routes)

    def candidates(self, path: str, host: str, headers: Mapping[str, str],
                   query: Mapping[str, str]) -> Iterator[CompiledRoute]:
        host = strip_port(host)
        for route in self.routes:
            if route.holds(path, host, headers, query):
                yield route


def upstream_target(endpoint_path: str, endpoint_query: str, route: CompiledRoute, client_path: str,
                    client_query: str, drop_params: tuple[str, ...]) -> str:
    """The request target sent upstream: the endpoint as written, plus with
    `forward_path` the client's path remainder and query (credentials removed)."""
    base = endpoint_path or "/"
    query = endpoint_query
    if route.route.forward_path:
        rest = route.path_remainder(client_path)
        if rest:
            rest = encode_path(rest)
            base = base.rstrip("/") + (rest if rest.startswith("/") else "/" + rest)
        extra = strip_query(client_query, drop_params)
        if extra:
            query = f"{query}&{extra}" if query else extra
    return f"{base}?{query}" if query else base


def encode_path(path: str) -> str:
    """A decoded path as it travels on (a request line, a header): percent-encoded again,
    so a decoded space, '?', '#', '%' or non-ASCII character cannot change what the
    backend reads. Decoded slashes stay slashes (SECURITY.md, "Paths")."""
    return quote(path, safe="/:@!$&'()*+,;=")


def strip_query(query: str, drop_params: tuple[str, ...]) -> str:
    """`query` without the parameters the gateway consumed (credentials)."""
    if not query or not drop_params:
        return query
    return urlencode([(k, v) for k, v in parse_qsl(query, keep_blank_values=True) if k not in drop_params])
