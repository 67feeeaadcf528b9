"""Config for HTTP backends, select/actions, split and events (issue: HTTP backends)."""

from __future__ import annotations

import pathlib

import pytest
import yaml

from gateway import config
from gateway.errors import ConfigError

ROOT = pathlib.Path(__file__).resolve().parents[2]


def parse(cfg: dict) -> config.Config:
    return config.parse(yaml.safe_dump(cfg), source="t.yaml")


BASE = {
    "backends": {"orders": {"type": "http", "endpoints": ["http://orders:8000/ev"], "max_queue": 8},
                 "quotes": {"type": "http", "endpoints": ["http://quotes:8000/ev"]},
                 "ws": {"type": "websocket", "endpoints": ["ws://chat:8000/ws"]},
                 "chat": {"type": "builtin", "handler": "chat"}},
}


def test_default_routes_yaml_has_the_chat_demo():
    cfg = config.load(str(ROOT / "routes.yaml"))
    chat = {r.name: r for r in cfg.routes}["chat"]
    assert chat.select == "$.action" and dict(chat.actions)["say"] == "chat"
    assert cfg.backends["chat"].handler == "chat"


def test_http_select_split_and_events_are_accepted():
    cfg = parse({**BASE, "routes": [
        {"name": "api", "match": {"path": "/api"}, "auth": "none", "select": "$.action",
         "actions": {"buy": "orders", "$default": "quotes"}, "events": {"connect": "orders", "disconnect": "orders"},
         "error_message": "nope"},
        {"name": "canary", "match": {"path": "/c"}, "auth": "none",
         "split": [{"backend": "ws", "weight": 9}, {"backend": "orders", "weight": 0}]}]})
    api, canary = cfg.routes
    assert dict(api.actions) == {"buy": "orders", "$default": "quotes"}
    assert dict(api.events) == {"connect": "orders", "disconnect": "orders"}
    assert api.error_message == "nope"
    assert [(e.backend, e.weight) for e in canary.split] == [("ws", 9), ("orders", 0)]
    assert cfg.backends["orders"].max_queue == 8
    default = parse({**BASE, "routes": [{"name": "r", "match": {"path": "/r"}, "auth": "none", "select": "$.a",
                                         "actions": {"x": "orders"}}]})
    assert default.routes[0].error_message == config.DEFAULT_ERROR_MESSAGE


@pytest.mark.parametrize("route,needle", [
    ({"select": "$.a", "actions": {"x": "ws"}}, "backend 'ws' is websocket; expected http or builtin"),
    ({"backend": "chat", "events": {"connect": "ws"}}, "backend 'ws' is websocket; expected http"),
    ({"backend": "chat", "events": {"open": "orders"}}, "unknown key 'open'"),
    ({"select": "action", "actions": {"x": "orders"}}, "expected a dotted path like $.action"),
    ({"split": [{"backend": "orders", "weight": 0}]}, "weights add up to 0"),
    ({"split": [{"backend": "orders", "weight": -1}]}, "must be at least 0"),
    ({"select": "$.a"}, "select and actions go together"),
])
def test_bad_routing_keys_are_errors(route, needle):
    with pytest.raises(ConfigError) as exc:
        parse({**BASE, "routes": [{"name": "r", "match": {"path": "/r"}, "auth": "none", **route}]})
    assert needle in str(exc.value)
