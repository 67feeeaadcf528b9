"""The config loader under fuzzing: any text gives a Config or a ConfigError
whose every problem starts `file:line:col` - never another exception.

Structured cases start from a good config and break it the way a person
does: a wrong type, a value out of range, an extra or misspelled key, an
anchor and alias, a huge integer, unicode. Alias bombs, alias cycles and deep
nesting are refused cleanly (they used to hang or raise RecursionError).
"""

from __future__ import annotations

import copy
import os
import re

import pytest
import yaml
from hypothesis import HealthCheck, given, settings, strategies as st

from gateway import config
from gateway.errors import ConfigError

SCALE = max(1, int(os.environ.get("FUZZ_SCALE", "1")))
SOURCE = "fuzz.yaml"
WHERE = re.compile(r"^fuzz\.yaml:\d+:\d+ ")

BASE = {
    "listen": {"host": "127.0.0.1", "port": 8080},
    "admin": {"host": "127.0.0.1", "port": 9090},
    "limits": {"max_message_bytes": 65536},
    "drain": {"close_code": 1012},
    "backends": {
        "chat": {"type": "websocket", "endpoints": ["ws://127.0.0.1:9001/ws"], "balance": "round_robin",
                 "connect_timeout_s": 3, "health": {"path": "/healthz", "interval_s": 5}},
        "echo": {"type": "builtin", "handler": "echo"},
    },
    "routes": [
        {"name": "chat", "match": {"path": "/chat", "host": "chat.example.com", "headers": {"x-tenant": "acme"}},
         "backend": "chat"},
        {"name": "echo", "match": {"path_prefix": "/echo"}, "backend": "echo"},
    ],
}

settings.register_profile("fuzz", deadline=None, derandomize=True, database=None,
                          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


def _paths(value, prefix=()):
    """Every key path into BASE (dict keys and list indexes)."""
    out = [prefix] if prefix else []
    if isinstance(value, dict):
        for k, v in value.items():
            out += _paths(v, prefix + (k,))
    elif isinstance(value, list):
        for i, v in enumerate(value):
            out += _paths(v, prefix + (i,))
    return out


PATHS = _paths(BASE)
KEYS = sorted({p[-1] for p in PATHS if isinstance(p[-1], str)})

scalars = st.one_of(
    st.none(), st.booleans(), st.integers(), st.integers(min_value=2**63, max_value=2**200),
    st.integers(max_value=-(2**63)), st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=20), st.sampled_from(KEYS), st.sampled_from(["", "ünïcødé", "\u202e", "💥", "ws://", "*.x"]))
values = st.recursive(scalars, lambda kids: st.lists(kids, max_size=3) | st.dictionaries(
    st.one_of(st.sampled_from(KEYS), st.text(max_size=8)), kids, max_size=3), max_leaves=8)


def _set(doc, path, value):
    for part in path[:-1]:
        doc = doc[part]
    doc[path[-1]] = value


def _delete(doc, path):
    for part in path[:-1]:
        doc = doc[part]
    del doc[path[-1]]


@st.composite
def near_valid(draw):
    doc = copy.deepcopy(BASE)
    for _ in range(draw(st.integers(1, 4))):
        path = draw(st.sampled_from(PATHS))
        try:
            action = draw(st.sampled_from(["value", "extra", "delete"]))
            if action == "value":
                _set(doc, path, draw(values))
            elif action == "extra":
                parent = path[:-1]
                target = doc
                for part in parent:
                    target = target[part]
                if isinstance(target, dict):
                    target[draw(st.sampled_from(KEYS) | st.text(min_size=1, max_size=8))] = draw(values)
            else:
                _delete(doc, path)
        except (KeyError, IndexError, TypeError):
            continue  # an earlier mutation removed or replaced this path
    return yaml.safe_dump(doc, allow_unicode=draw(st.booleans()), default_flow_style=draw(st.sampled_from([None, True, False])))


@st.composite
def with_aliases(draw):
    """The good config with anchors on some values and aliases elsewhere (merge keys too)."""
    text = yaml.safe_dump(BASE, default_flow_style=False)
    lines = text.splitlines()
    i = draw(st.integers(0, len(lines) - 1))
    j = draw(st.integers(0, len(lines) - 1))
    line = lines[i]
    if ": " in line and not line.rstrip().endswith(":"):
        k, _, v = line.partition(": ")
        lines[i] = f"{k}: &x {v}"
        if j != i and ": " in lines[j]:
            k2, _, _ = lines[j].partition(": ")
            lines[j] = f"{k2}: {draw(st.sampled_from(['*x', '{<<: *x}', '[*x, *x]', '*nope']))}"
    return "\n".join(lines) + "\n"


yamlish = st.text(alphabet=st.sampled_from(list(":-[]{}&*!|>'\"#%@`,? \n\tabc019<=.") + ["\u00e9", "\ufeff", "\x00"]),
                  max_size=80)


def check(text: str) -> str:
    """'ok' or 'error'; fails the test on any other exception or a problem without file:line:col."""
    try:
        cfg = config.parse(text, source=SOURCE)
    except ConfigError as exc:
        assert exc.problems, text
        bad = [p for p in exc.problems if not WHERE.match(p)]
        assert not bad, (text, bad)
        return "error"
    assert isinstance(cfg, config.Config)
    return "ok"


def _run(record_property, strategy, n, inputs):
    seen = {"ok": 0, "error": 0}
    failures = []

    @settings(settings.get_profile("fuzz"), max_examples=n * SCALE)
    @given(strategy)
    def run(text):
        try:
            seen[check(text)] += 1
        except AssertionError:
            failures.append(text)
            raise

    try:
        run()
    finally:
        record_property("input", inputs)
        record_property("cases", seen["ok"] + seen["error"] + len(failures))
        record_property("expected", "Config or ConfigError with file:line:col")
        record_property("failures", len(failures))
    return seen


def test_any_text_gives_config_or_located_config_error(record_property):
    seen = _run(record_property, st.text(max_size=200) | yamlish, 300,
                "arbitrary unicode text and YAML-punctuation text")
    assert seen["error"] > 0


def test_near_valid_configs_give_config_or_located_config_error(record_property):
    seen = _run(record_property, near_valid(), 100,
                "the good config with 1-4 wrong types/values, extra or deleted keys, huge ints, unicode")
    assert seen["error"] > 0


def test_anchors_and_aliases_give_config_or_located_config_error(record_property):
    seen = _run(record_property, with_aliases(), 100,
                "the good config with an anchor and an alias, merge key or unknown alias")
    assert seen["ok"] + seen["error"] > 0


def _bomb(levels: int = 9, width: int = 9) -> str:
    lines = ['listen: {host: 127.0.0.1, port: 8080}', 'a0: &a0 ["lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol", "lol"]']
    for i in range(1, levels + 1):
        lines.append(f"a{i}: &a{i} [" + ", ".join([f"*a{i - 1}"] * width) + "]")
    return "\n".join(lines) + "\n"


def _merge_bomb(levels: int = 40) -> str:
    lines = ["m0: &m0 {k: v}"]
    for i in range(1, levels + 1):
        lines.append(f"m{i}: &m{i} {{<<: [*m{i - 1}, *m{i - 1}], k{i}: v}}")
    return "\n".join(lines) + "\n"


HOSTILE = {
    "billion laughs": (_bomb(), "expands to more than"),
    "merge-key bomb": (_merge_bomb(), "expands to more than"),
    "alias cycle": ("routes: &r [*r]\n", "refers to itself"),
    "mapping cycle": ("listen: &l {host: *l}\n", "refers to itself"),
    "deep nesting": ("routes: " + "[" * 1500 + "]" * 1500 + "\n", "nesting is too deep"),
    "deep but composable nesting": ("routes: " + "[" * 200 + "]" * 200 + "\n", "nests deeper than"),
}


@pytest.mark.parametrize("name", list(HOSTILE))
def test_hostile_yaml_is_refused_cleanly(name, record_property):
    text, phrase = HOSTILE[name]
    record_property("input", f"{name} ({len(text)} bytes of YAML)")
    record_property("cases", 1)
    record_property("expected", f"ConfigError '{phrase}' with file:line:col")
    failures = 1
    try:
        with pytest.raises(ConfigError) as exc:
            config.parse(text, source=SOURCE)
        (problem,) = exc.value.problems
        assert WHERE.match(problem) and phrase in problem, problem
        failures = 0
    finally:
        record_property("failures", failures)
