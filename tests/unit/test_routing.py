"""gateway/routing.py: matching rules, pure."""

from __future__ import annotations

import textwrap

import pytest

from gateway import config
from gateway.routing import Router, host_matches, path_has_prefix, strip_port, upstream_target


@pytest.mark.parametrize("path,prefix,expected", [
    ("/api", "/api", True), ("/api/x", "/api", True), ("/apix", "/api", False),
    ("/anything", "/", True), ("/api/", "/api/", True), ("/api", "/api/", True), ("/apix", "/api/", False),
])
def test_path_prefix_is_segment_aware(path, prefix, expected):
    assert path_has_prefix(path, prefix) is expected


@pytest.mark.parametrize("pattern,host,expected", [
    ("chat.example.com", "chat.example.com", True), ("*.example.com", "a.b.example.com", True),
    ("*.example.com", "example.com", False), ("*.example.com", "evilexample.com", False),
])
def test_host_patterns(pattern, host, expected):
    assert host_matches(pattern, host) is expected


@pytest.mark.parametrize("raw,host", [("Chat.Example.com:8080", "chat.example.com"), ("[::1]:80", "[::1]"),
                                      ("example.com", "example.com")])
def test_strip_port(raw, host):
    assert strip_port(raw) == host


ROUTES = textwrap.dedent("""\
    backends: {e: {type: builtin, handler: echo}}
    routes:
      - {name: tenant, match: {path: /chat, headers: {x-tenant: acme}}, backend: e}
      - {name: hosted, match: {path: /chat, host: chat.example.com}, backend: e}
      - {name: v2, match: {path: /chat, query: {v: "2"}}, backend: e}
      - {name: chat, match: {path: /chat}, backend: e}
      - {name: api, match: {path_prefix: /api}, backend: e}
    """)


def first(path, host="x", headers=None, query=None):
    router = Router(config.parse(ROUTES).routes)
    r = next(router.candidates(path, host, headers or {}, query or {}), None)
    return r.name if r else None


def test_first_match_wins():
    assert first("/chat", headers={"x-tenant": "acme"}, host="chat.example.com") == "tenant"
    assert first("/chat", host="CHAT.example.com:443") == "hosted"
    assert first("/chat", query={"v": "2"}) == "v2"
    assert first("/chat") == "chat"
    assert first("/api/orders") == "api"
    assert first("/apiary") is None
    assert first("/") is None


def test_upstream_target_with_forward_path_drops_credentials():
    cfg = config.parse(ROUTES.replace("{name: api, match: {path_prefix: /api}, backend: e}",
                                      "{name: api, match: {path_prefix: /api}, backend: e, forward_path: true}"))
    route = Router(cfg.routes).routes[-1]
    assert upstream_target("/base", "", route, "/api/orders/7", "x=1&access_token=s3cret", ("access_token",)) \
        == "/base/orders/7?x=1"
    assert upstream_target("/", "k=v", route, "/api", "", ()) == "/?k=v"


def test_upstream_target_without_forward_path_is_endpoint_as_written():
    route = Router(config.parse(ROUTES).routes)[-1] if False else Router(config.parse(ROUTES).routes).routes[-1]
    assert upstream_target("/ws", "a=1", route, "/api/x", "y=2", ()) == "/ws?a=1"
