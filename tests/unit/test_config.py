"""gateway/config.py: every error names file:line:column and the key path."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from gateway import config
from gateway.errors import ConfigError

GOOD = textwrap.dedent("""\
    listen: {host: 127.0.0.1, port: 8080}
    backends:
      chat: {type: websocket, endpoints: [ws://127.0.0.1:9001/ws], balance: least_connections}
      echo: {type: builtin, handler: echo}
    routes:
      - name: chat
        match: {path: /chat, host: chat.example.com, headers: {x-tenant: acme}, query: {v: "2"}}
        backend: chat
      - name: echo
        match: {path_prefix: /echo}
        backend: echo
    """)


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as exc:
        config.parse(text, source="routes.yaml")
    return exc.value.problems


def test_good_config_parses_with_defaults():
    cfg = config.parse(GOOD)
    assert cfg.listen.port == 8080 and cfg.admin.port == 9090
    assert [r.name for r in cfg.routes] == ["chat", "echo"]
    assert cfg.routes[0].match.headers == (("x-tenant", "acme"),)
    assert cfg.backends["chat"].connect_timeout_s == 3
    assert cfg.limits.max_message_bytes == 1_048_576
    assert cfg.workers == 1


def test_repository_default_config_is_valid():
    cfg = config.load("routes.yaml")
    assert any(r.match.path == "/echo" for r in cfg.routes)


def test_unknown_backend_names_line_column_path_and_known_names():
    text = GOOD.replace("backend: chat", "backend: chta")
    assert problems(text) == [
        "routes.yaml:8:14 routes[0].backend: unknown backend 'chta' (known: chat, echo)"]


def test_unknown_key_is_an_error_with_a_suggestion():
    text = GOOD.replace("listen: {host", "listen: {hots: x, host")
    (p,) = problems(text)
    assert p.startswith("routes.yaml:1:10 listen.hots: unknown key 'hots' (did you mean 'host'?)")


def test_wrong_type_names_value_and_expectation():
    text = GOOD + "limits: {max_message_bytes: lots}\n"
    (p,) = problems(text)
    assert p == ("routes.yaml:12:29 limits.max_message_bytes: has value 'lots' (string); expected an integer")


def test_all_errors_reported_at_once_in_file_order():
    text = GOOD.replace("backend: chat", "backend: nope").replace("handler: echo", "handler: ech") + "workers: 0\n"
    ps = problems(text)
    assert len(ps) == 3
    assert [int(p.split(":")[1]) for p in ps] == sorted(int(p.split(":")[1]) for p in ps)
    assert any("workers" in p for p in ps)
    assert any("handler: has value 'ech'" in p for p in ps)


def test_duplicate_route_names():
    text = GOOD.replace("- name: echo", "- name: chat")
    assert any("duplicate route name 'chat' (first at routes[0])" in p for p in problems(text))


def test_route_shadowed_by_earlier_catch_all():
    text = textwrap.dedent("""\
        backends: {e: {type: builtin, handler: echo}}
        routes:
          - {name: all, match: {path_prefix: /}, backend: e}
          - {name: echo, match: {path: /echo}, backend: e}
        """)
    (p,) = problems(text)
    assert p.startswith("routes.yaml:4:25 routes[1].match: route 'echo' is never reached: route 'all'")


def test_more_specific_route_after_general_one_is_not_shadowed():
    text = textwrap.dedent("""\
        backends: {e: {type: builtin, handler: echo}}
        routes:
          - {name: a, match: {path_prefix: /api, headers: {x-beta: "1"}}, backend: e}
          - {name: b, match: {path_prefix: /api}, backend: e}
        """)
    config.parse(text)


def test_prefix_shadowing_is_segment_aware():
    text = textwrap.dedent("""\
        backends: {e: {type: builtin, handler: echo}}
        routes:
          - {name: a, match: {path_prefix: /api}, backend: e}
          - {name: b, match: {path: /apix}, backend: e}
          - {name: c, match: {path: /api/v1}, backend: e}
        """)
    ps = problems(text)
    assert len(ps) == 1 and "route 'c' is never reached" in ps[0]


def test_yaml_syntax_error_names_position():
    (p,) = problems("routes: [\n  {name: a\n")
    assert p.startswith("routes.yaml:") and "YAML syntax" in p


def test_duplicate_yaml_keys_are_errors():
    assert any("listen: duplicate key" in p for p in problems(GOOD + "listen: {port: 1}\n"))


def test_drain_keys_parse_with_defaults_and_bounds():
    cfg = config.parse(GOOD + "drain: {resume_window_s: 60, announce_s: 2, replay_max_messages: 5}\nwatch: true\n")
    assert (cfg.drain.resume_window_s, cfg.drain.announce_s, cfg.drain.replay_max_messages) == (60, 2, 5)
    assert cfg.drain.close_code == 1012 and cfg.drain.replay_max_bytes == 4_194_304 and cfg.watch is True
    assert any("drain.announce_s" in p and "not less than drain.timeout_s" in p
               for p in problems(GOOD + "drain: {timeout_s: 5, announce_s: 5}\n"))
    assert any("watch" in p for p in problems(GOOD + "watch: sometimes\n"))


def test_bad_endpoint_urls():
    text = GOOD.replace("ws://127.0.0.1:9001/ws", "http://x/ws")
    assert any("expected a ws:// or wss://host:port/path URL" in p for p in problems(text))


def test_consistent_hash_needs_hash_on():
    text = GOOD.replace("balance: least_connections", "balance: consistent_hash")
    assert any("needs hash_on" in p for p in problems(text))


def test_empty_file_says_what_is_missing():
    ps = problems("")
    assert any("define at least one backend" in p for p in ps)
    assert any("define at least one route" in p for p in ps)


def test_top_level_must_be_a_mapping():
    assert problems("- a\n- b\n") == ["routes.yaml:1:1 must be a mapping, got list"]


def test_workers_auto_is_cpu_count():
    import os

    assert config.parse(GOOD + "workers: auto\n").workers == (os.cpu_count() or 1)


def _check(path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gateway", "check", str(path)], capture_output=True, text=True,
                          timeout=60)


def test_gateway_check_exit_codes(tmp_path):
    good = tmp_path / "good.yaml"
    good.write_text(GOOD)
    ok = _check(good)
    assert ok.returncode == 0, ok.stderr
    bad = tmp_path / "bad.yaml"
    bad.write_text(GOOD.replace("backend: chat", "backend: chta"))
    res = _check(bad)
    assert res.returncode == 2
    assert f"{bad}:8:14 routes[0].backend: unknown backend 'chta'" in res.stderr
    missing = _check(tmp_path / "absent.yaml")
    assert missing.returncode == 2 and "cannot read config" in missing.stderr


def test_redis_url_and_defaults():
    cfg = config.parse(GOOD + "redis: {url: 'redis://127.0.0.1:6379/0', on_outage: reject_new}\n")
    r = cfg.redis
    assert (r.url, r.sentinel, r.key_prefix, r.on_outage) == ("redis://127.0.0.1:6379/0", None, "gw:", "reject_new")
    assert (r.heartbeat_s, r.node_ttl_s) == (5, 15)


def test_redis_sentinel_parses_addresses():
    cfg = config.parse(GOOD + "redis: {sentinel: {master: m, addresses: ['127.0.0.1:26379', '[::1]:26380']}}\n")
    assert cfg.redis.sentinel.master == "m"
    assert cfg.redis.sentinel.addresses == (("127.0.0.1", 26379), ("::1", 26380))


@pytest.mark.parametrize("snippet,needle", [
    ("redis: {}\n", "redis: set exactly one of url, sentinel"),
    ("redis: {url: 'redis://x', sentinel: {master: m, addresses: ['h:1']}}\n", "set exactly one of url, sentinel"),
    ("redis: {url: 'http://x'}\n", "redis.url: has value 'http://x'"),
    ("redis: {sentinel: {master: m, addresses: ['nohost']}}\n", "redis.sentinel.addresses[0]: has value 'nohost'"),
    ("redis: {url: 'redis://x', on_outage: drop}\n", "redis.on_outage"),
    ("redis: {url: 'redis://x', heartbeat_s: 5, node_ttl_s: 5}\n", "must be more than heartbeat_s"),
    ("redis: {url: 'redis://x', key_prefx: a}\n", "did you mean 'key_prefix'"),
])
def test_bad_redis_sections_name_the_key(snippet, needle):
    assert any(needle in p for p in problems(GOOD + snippet)), problems(GOOD + snippet)


def test_channel_rules_and_history():
    cfg = config.parse(GOOD + "channels: [{match: 'room:*', history: {size: 50, ttl_s: 60}}, {match: lobby}]\n")
    assert cfg.channels[0].match == "room:*" and cfg.channels[0].history.size == 50
    assert cfg.channels[1].history is None


@pytest.mark.parametrize("snippet,needle", [
    ("channels: {match: x}\n", "channels: must be a list"),
    ("channels: [{match: 'a b'}]\n", "channels[0].match: has value 'a b'"),
    ("channels: [{match: x, history: {size: 0}}]\n", "channels[0].history.size: has value 0"),
    ("channels: [{match: x, history: {size: 1000000}}]\n", "at most 100000"),
])
def test_bad_channel_rules(snippet, needle):
    assert any(needle in p for p in problems(GOOD + snippet)), problems(GOOD + snippet)


def test_history_on_a_route_points_to_channels():
    text = GOOD.replace("    backend: echo\n", "    backend: echo\n    history: {size: 3}\n")
    assert any("routes[1].history: history is set per channel" in p for p in problems(text))
