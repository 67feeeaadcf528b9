"""Load and validate routes.yaml.

Every problem names `file:line:column key.path: what is wrong`, all problems
are collected and raised once as ConfigError, and unknown keys are errors:
a typo never silently changes behaviour.
"""

from __future__ import annotations

import os
import re
import socket
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import yaml

from .errors import ConfigError
from .paths import path_has_prefix

# ---------------------------------------------------------------- dataclasses

_frozen = dict(frozen=True, slots=True, kw_only=True)


@dataclass(**_frozen)
class Listen:
    host: str = "0.0.0.0"
    port: int = 8080


@dataclass(**_frozen)
class Admin:
    host: str = "127.0.0.1"
    port: int = 9090
    token_env: str = "GATEWAY_ADMIN_TOKEN"


@dataclass(**_frozen)
class Limits:
    max_message_bytes: int = 1_048_576
    messages_per_second: float = 0
    burst: int = 100
    rate_limit_close_after_s: float = 10
    max_connections: int = 50_000
    max_connections_per_ip: int = 200
    idle_timeout_s: float = 600
    max_lifetime_s: float = 86_400
    send_buffer_bytes: int = 4_194_304
    stall_timeout_s: float = 10
    handshake_timeout_s: float = 10
    ping_interval_s: float = 30
    close_timeout_s: float = 5


@dataclass(**_frozen)
class Drain:
    timeout_s: float = 60
    announce_s: float = 0
    close_code: int = 1012
    rate_per_s: float = 1000
    resume_window_s: float = 120
    replay_max_messages: int = 10_000
    replay_max_bytes: int = 4_194_304


@dataclass(**_frozen)
class Reliable:
    """A route's `reliable:` (docs/reliable.md): the retained window's bounds, the ack pace."""
    max_unacked_bytes: int = 1_048_576
    max_unacked_messages: int = 10_000
    ack_every: int = 64
    ack_ms: float = 200


@dataclass(**_frozen)
class Sentinel:
    master: str
    addresses: tuple[tuple[str, int], ...]


@dataclass(**_frozen)
class Redis:
    url: str | None = None             # redis://host:port/db (or rediss://); or sentinel
    sentinel: Sentinel | None = None
    key_prefix: str = "gw:"
    on_outage: str = "serve"           # serve | reject_new
    heartbeat_s: float = 5
    node_ttl_s: float = 15
    session_ttl_s: float = 300         # refreshed in batches every session_ttl_s / 3
    timeout_s: float = 1               # per Redis call; a down Redis fails fast
    request_timeout_s: float = 2       # how long a node waits for others' answers (API calls)


@dataclass(**_frozen)
class History:
    size: int = 100
    ttl_s: float = 300


@dataclass(**_frozen)
class ChannelRule:
    match: str                         # a channel name, or a pattern with * (fnmatch)
    history: History | None = None


@dataclass(**_frozen)
class JwtKeys:
    jwks_url: str | None = None
    public_key_file: str | None = None
    secret_env: str | None = None


@dataclass(**_frozen)
class Jwt:
    algorithms: tuple[str, ...]
    keys: JwtKeys
    issuer: str | None = None
    audience: tuple[str, ...] | None = None
    leeway_s: float = 30
    sources: tuple[str, ...] = ("header",)
    forward_claims: tuple[str, ...] = ("sub",)
    require: tuple[str, ...] = ("exp",)


@dataclass(**_frozen)
class Auth:
    jwt: Jwt | None = None
    origins: tuple[str, ...] | None = None


@dataclass(**_frozen)
class Health:
    path: str
    interval_s: float = 5
    timeout_s: float = 2
    unhealthy_after: int = 2
    healthy_after: int = 1


@dataclass(**_frozen)
class Backend:
    name: str
    type: str
    endpoints: tuple[str, ...] = ()
    balance: str = "round_robin"
    hash_on: str | None = None
    connect_timeout_s: float = 3
    health: Health | None = None
    eject_after_failures: int = 3
    eject_cooldown_s: float = 10
    on_upstream_close: str = "close"
    timeout_s: float = 5
    max_queue: int = 64
    handler: str | None = None


@dataclass(**_frozen)
class Match:
    path: str | None = None
    path_prefix: str | None = None
    host: str | None = None
    headers: tuple[tuple[str, str], ...] = ()
    query: tuple[tuple[str, str], ...] = ()
    claims: tuple[tuple[str, Any], ...] = ()


@dataclass(**_frozen)
class SplitEntry:
    backend: str
    weight: int


DEFAULT_ERROR_MESSAGE = '{"error":"no route for action"}'


@dataclass(**_frozen)
class Route:
    name: str
    index: int
    match: Match
    auth: str = "none"
    backend: str | None = None
    split: tuple[SplitEntry, ...] = ()
    select: str | None = None
    actions: tuple[tuple[str, str], ...] = ()
    events: tuple[tuple[str, str], ...] = ()
    forward_path: bool = False
    error_message: str = DEFAULT_ERROR_MESSAGE
    reliable: Reliable | None = None   # None: the route does not select gateway.reliable.v1


@dataclass(**_frozen)
class Config:
    source: str
    listen: Listen = field(default_factory=Listen)
    admin: Admin = field(default_factory=Admin)
    node_id: str = "auto"
    workers: int = 1
    redis: Redis | None = None
    channels: tuple[ChannelRule, ...] = ()
    auth: Auth = field(default_factory=Auth)
    limits: Limits = field(default_factory=Limits)
    drain: Drain = field(default_factory=Drain)
    watch: bool = False
    backends: dict[str, Backend] = field(default_factory=dict)
    routes: tuple[Route, ...] = ()

    def resolved_node_id(self) -> str:
        if self.node_id == "auto":
            return f"{socket.gethostname()}-{os.getpid()}"
        return self.node_id



BUILTIN_HANDLERS = ("echo", "chat")
ALGORITHMS = ("HS256", "HS384", "HS512", "RS256", "RS384", "RS512", "PS256", "PS384",
              "PS512", "ES256", "ES384", "ES512", "EdDSA")


# ------------------------------------------------------------- YAML with marks

Path = tuple


class _Doc:
    """Plain Python values plus where each one was written."""

    def __init__(self, source: str):
        self.source = source
        self.value_marks: dict[Path, tuple[int, int]] = {}
        self.key_marks: dict[Path, tuple[int, int]] = {}
        self.problems: list[tuple[tuple[int, int], str]] = []

    def where(self, path: Path, *, key: bool = False) -> tuple[int, int]:
        marks = self.key_marks if key else self.value_marks
        while path:
            if path in marks:
                return marks[path]
            path = path[:-1]
        return self.value_marks.get((), (1, 1))

    def error(self, path: Path, message: str, *, key: bool = False) -> None:
        self.problems.append((self.where(path, key=key), f"{format_path(path)}: {message}" if path else message))

    def raise_if_any(self) -> None:
        if self.problems:
            self.problems.sort(key=lambda p: p[0])
            raise ConfigError([f"{self.source}:{line}:{col} {msg}" for (line, col), msg in self.problems])


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        if isinstance(part, int):
            out += f"[{part}]"
        else:
            out += ("." if out else "") + str(part)
    return out


def _compose(text: str, doc: _Doc) -> Any:
    try:
        loader = yaml.SafeLoader(text)
    except yaml.reader.ReaderError as exc:  # a character YAML does not allow, found before parsing
        before = text[:exc.position]
        line, col = before.count("\n") + 1, len(before) - (before.rfind("\n") + 1) + 1
        raise ConfigError([f"{doc.source}:{line}:{col} YAML syntax: character {exc.character:#x} is not allowed"]) from None
    try:
        node = loader.get_single_node()
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
        where = (mark.line + 1, mark.column + 1) if mark else (1, 1)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{doc.source}:{where[0]}:{where[1]} YAML syntax: {problem}"]) from None
    except RecursionError:
        mark = loader.get_mark()
        raise ConfigError([f"{doc.source}:{mark.line + 1}:{mark.column + 1} YAML nesting is too deep"]) from None
    finally:
        loader.dispose()
    if node is None:
        return {}
    _check_size(node, doc)
    return _to_python(node, (), doc, loader)


# What a config may expand to once aliases are followed: far above any real
# config, far below what an alias bomb ("billion laughs") or a cycle would take.
MAX_NODES = 100_000
MAX_DEPTH = 64


def _check_size(root, doc: _Doc) -> None:
    """Refuse an alias cycle, an alias bomb and deep nesting before anything is
    expanded: the node graph is walked once (iteratively), each node's expanded
    size counted once."""
    size: dict[int, int] = {}
    depth: dict[int, int] = {}
    open_: set[int] = set()
    stack = [(root, False)]
    while stack:
        node, done = stack.pop()
        key = id(node)
        kids = ([n for pair in node.value for n in pair] if isinstance(node, yaml.MappingNode)
                else node.value if isinstance(node, yaml.SequenceNode) else [])
        if done:
            open_.discard(key)
            size[key] = 1 + sum(size[id(k)] for k in kids)
            depth[key] = 1 + max((depth[id(k)] for k in kids), default=0)
            if size[key] > MAX_NODES or depth[key] > MAX_DEPTH:
                line, col = _mark(node)
                what = (f"expands to more than {MAX_NODES} values (aliases)" if size[key] > MAX_NODES
                        else f"nests deeper than {MAX_DEPTH} levels")
                raise ConfigError([f"{doc.source}:{line}:{col} YAML {what}"])
            continue
        if key in size:
            continue
        if key in open_:
            line, col = _mark(node)
            raise ConfigError([f"{doc.source}:{line}:{col} YAML alias refers to itself (a cycle)"])
        open_.add(key)
        stack.append((node, True))
        stack.extend((k, False) for k in kids if id(k) not in size)


def _mark(node) -> tuple[int, int]:
    return (node.start_mark.line + 1, node.start_mark.column + 1)


def _to_python(node, path: Path, doc: _Doc, loader) -> Any:
    doc.value_marks[path] = _mark(node)
    if isinstance(node, yaml.MappingNode):
        try:
            loader.flatten_mapping(node)
        except yaml.YAMLError as exc:  # a merge key (<<) whose value is not mappings
            line, col = _mark(node)
            raise ConfigError([f"{doc.source}:{line}:{col} YAML merge: {getattr(exc, 'problem', None) or exc}"]) from None
        out: dict = {}
        for key_node, value_node in node.value:
            key = _construct(key_node, doc, loader)
            if not isinstance(key, (str, int, bool, float)) or key is None:
                doc.problems.append((_mark(key_node), f"{format_path(path) or 'top level'}: keys must be strings"))
                continue
            key = str(key) if not isinstance(key, str) else key
            sub = path + (key,)
            doc.key_marks[sub] = _mark(key_node)
            if key in out:
                doc.problems.append((_mark(key_node), f"{format_path(sub)}: duplicate key"))
            out[key] = _to_python(value_node, sub, doc, loader)
        return out
    if isinstance(node, yaml.SequenceNode):
        return [_to_python(item, path + (i,), doc, loader) for i, item in enumerate(node.value)]
    return _construct(node, doc, loader)


def _construct(node, doc: _Doc, loader) -> Any:
    """A scalar (or a complex key) as Python; an unknown tag or a value its tag cannot
    hold (`!foo x`, `=`, a timestamp 2020-13-45) is a ConfigError at the node."""
    try:
        return loader.construct_object(node, deep=True)
    except (yaml.YAMLError, ValueError, OverflowError) as exc:
        line, col = _mark(node)
        problem = getattr(exc, "problem", None) or str(exc)
        raise ConfigError([f"{doc.source}:{line}:{col} YAML value: {problem}"]) from None


# ------------------------------------------------------------------ checking

_MISSING = object()


class _Reader:
    """Typed access to a mapping that records problems instead of raising."""

    def __init__(self, doc: _Doc):
        self.doc = doc

    def mapping(self, value: Any, path: Path, allowed: tuple[str, ...]) -> dict | None:
        if value is None:
            return {}
        if not isinstance(value, dict):
            self.doc.error(path, f"must be a mapping, got {_kind(value)}")
            return None
        for key in value:
            if key not in allowed:
                hint = _closest(key, allowed)
                self.doc.error(path + (key,), f"unknown key{hint} (allowed: {', '.join(allowed)})", key=True)
        return value

    def get(self, m: dict, path: Path, key: str, kind: str, default: Any = _MISSING, *,
            choices: tuple = (), minimum: float | None = None) -> Any:
        sub = path + (key,)
        if key not in m or m[key] is None and default is not _MISSING and kind != "any":
            if default is _MISSING:
                self.doc.error(sub if key in m else path, "is required" if key in m else f"missing required key '{key}'")
                return None
            return default
        value = m[key]
        ok = True
        if kind == "int":
            ok = isinstance(value, int) and not isinstance(value, bool)
            expected = "an integer"
        elif kind == "number":
            ok = isinstance(value, (int, float)) and not isinstance(value, bool)
            expected = "a number"
        elif kind == "str":
            ok = isinstance(value, str) and value != ""
            expected = "a non-empty string"
        elif kind == "bool":
            ok = isinstance(value, bool)
            expected = "true or false"
        elif kind == "strlist":
            ok = isinstance(value, list) and all(isinstance(v, str) and v for v in value)
            expected = "a list of strings"
        elif kind == "any":
            expected = ""
        else:  # pragma: no cover - programming error
            raise AssertionError(kind)
        if not ok:
            self.doc.error(sub, f"has value {value!r} ({_kind(value)}); expected {expected}")
            return default if default is not _MISSING else None
        if choices and value not in choices:
            self.doc.error(sub, f"has value {value!r}; expected one of: {', '.join(map(str, choices))}")
            return default if default is not _MISSING else None
        if minimum is not None and value < minimum:
            self.doc.error(sub, f"has value {value!r}; must be at least {minimum}")
            return default if default is not _MISSING else None
        return tuple(value) if kind == "strlist" else value


def _kind(value: Any) -> str:
    if value is None:
        return "null"
    return {dict: "mapping", list: "list", str: "string", bool: "boolean", int: "integer",
            float: "number"}.get(type(value), type(value).__name__)


def _closest(word: str, options: tuple[str, ...]) -> str:
    import difflib

    near = difflib.get_close_matches(str(word), options, n=1)
    return f" '{word}' (did you mean '{near[0]}'?)" if near else f" '{word}'"


# ------------------------------------------------------------------ sections

def load(path: str) -> Config:
    """Read and validate a config file. Raises ConfigError with every problem."""
    try:
        with open(path, encoding="utf-8") as fh:
            text = fh.read()
    except OSError as exc:
        raise ConfigError([f"{path}: cannot read config: {exc.strerror}"]) from None
    except UnicodeDecodeError:
        raise ConfigError([f"{path}: config is not valid UTF-8"]) from None
    return parse(text, source=path)


def parse(text: str, source: str = "routes.yaml") -> Config:
    doc = _Doc(source)
    raw = _compose(text, doc)
    r = _Reader(doc)
    top = r.mapping(raw, (), ("listen", "admin", "node_id", "workers", "redis", "channels",
                              "auth", "limits", "drain", "watch", "backends", "routes"))
    if top is None:
        doc.raise_if_any()
    cfg = _build(top, r, doc, source)
    doc.raise_if_any()
    return cfg


def _build(top: dict, r: _Reader, doc: _Doc, source: str) -> Config:
    listen = _listen(r, top.get("listen"), ("listen",))
    admin_m = r.mapping(top.get("admin"), ("admin",), ("host", "port", "token_env")) or {}
    admin = Admin(host=r.get(admin_m, ("admin",), "host", "str", "127.0.0.1"),
                  port=r.get(admin_m, ("admin",), "port", "int", 9090),
                  token_env=r.get(admin_m, ("admin",), "token_env", "str", "GATEWAY_ADMIN_TOKEN"))
    _check_port(doc, ("admin", "port"), admin.port)
    node_id = r.get(top, (), "node_id", "str", "auto")
    workers = _workers(r, doc, top)
    redis = _redis(r, doc, top.get("redis")) if top.get("redis") is not None else None
    channels = _channels(r, doc, top.get("channels"))
    limits = _limits(r, top.get("limits"))
    drain = _drain(r, doc, top.get("drain"))
    watch = r.get(top, (), "watch", "bool", False)
    auth = _auth(r, doc, top.get("auth"))
    backends = _backends(r, doc, top.get("backends"))
    routes = _routes(r, doc, top.get("routes"), backends, auth)
    if listen.port == admin.port and listen.port != 0:
        doc.error(("admin", "port"), f"is the same as listen.port ({listen.port})")
    return Config(source=source, listen=listen, admin=admin, node_id=node_id, workers=workers,
                  redis=redis, channels=channels, auth=auth, limits=limits, drain=drain, watch=watch,
                  backends=backends, routes=routes)


def _listen(r: _Reader, value: Any, path: Path) -> Listen:
    m = r.mapping(value, path, ("host", "port")) or {}
    out = Listen(host=r.get(m, path, "host", "str", "0.0.0.0"), port=r.get(m, path, "port", "int", 8080))
    _check_port(r.doc, path + ("port",), out.port)
    return out


def _check_port(doc: _Doc, path: Path, port: int) -> None:
    if not 0 <= port <= 65535:
        doc.error(path, f"has value {port}; a port is 0-65535")


def _workers(r: _Reader, doc: _Doc, top: dict) -> int:
    value = top.get("workers", 1)
    if value == "auto":
        return os.cpu_count() or 1
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        doc.error(("workers",), f"has value {value!r}; expected a whole number >= 1 or 'auto'")
        return 1
    return value


def _redis(r: _Reader, doc: _Doc, value: Any) -> Redis | None:
    path = ("redis",)
    m = r.mapping(value, path, ("url", "sentinel", "key_prefix", "on_outage", "heartbeat_s", "node_ttl_s",
                                "session_ttl_s", "timeout_s", "request_timeout_s"))
    if m is None:
        return None
    url = r.get(m, path, "url", "str", None)
    if url is not None and urlsplit(url).scheme not in ("redis", "rediss", "unix"):
        doc.error(path + ("url",), f"has value {url!r}; expected redis://host:port/db, rediss:// or unix://")
    sentinel = None
    if m.get("sentinel") is not None:
        sp = path + ("sentinel",)
        sm = r.mapping(m["sentinel"], sp, ("master", "addresses")) or {}
        master = r.get(sm, sp, "master", "str")
        addresses = []
        for i, a in enumerate(r.get(sm, sp, "addresses", "strlist") or ()):
            host, _, port = a.rpartition(":")
            if not host or not port.isdigit() or not 0 < int(port) < 65536:
                doc.error(sp + ("addresses", i), f"has value {a!r}; expected host:port")
                continue
            addresses.append((host.strip("[]"), int(port)))
        if master is not None and not addresses and "addresses" in sm:
            doc.error(sp + ("addresses",), "needs at least one sentinel host:port")
        if master is not None and addresses:
            sentinel = Sentinel(master=master, addresses=tuple(addresses))
    if (url is None) == (m.get("sentinel") is None):
        doc.error(path, "set exactly one of url, sentinel")
    d = Redis()
    out = Redis(url=url, sentinel=sentinel,
                key_prefix=r.get(m, path, "key_prefix", "str", d.key_prefix),
                on_outage=r.get(m, path, "on_outage", "str", "serve", choices=("serve", "reject_new")),
                heartbeat_s=r.get(m, path, "heartbeat_s", "number", d.heartbeat_s, minimum=0.1),
                node_ttl_s=r.get(m, path, "node_ttl_s", "number", d.node_ttl_s, minimum=0.3),
                session_ttl_s=r.get(m, path, "session_ttl_s", "number", d.session_ttl_s, minimum=1),
                timeout_s=r.get(m, path, "timeout_s", "number", d.timeout_s, minimum=0.01),
                request_timeout_s=r.get(m, path, "request_timeout_s", "number", d.request_timeout_s, minimum=0.01))
    if out.node_ttl_s <= out.heartbeat_s:
        doc.error(path + ("node_ttl_s",), f"has value {out.node_ttl_s}; must be more than heartbeat_s "
                                          f"({out.heartbeat_s}), or every node looks dead between heartbeats")
    return out


def _channels(r: _Reader, doc: _Doc, value: Any) -> tuple[ChannelRule, ...]:
    """`channels: [{match: "room:*", history: {size, ttl_s}}]`: per-channel settings, first match wins."""
    path = ("channels",)
    if value is None:
        return ()
    if not isinstance(value, list):
        doc.error(path, f"must be a list of {{match, history}}, got {_kind(value)}")
        return ()
    out = []
    for i, item in enumerate(value):
        ip = path + (i,)
        m = r.mapping(item, ip, ("match", "history"))
        if m is None:
            continue
        pattern = r.get(m, ip, "match", "str")
        if pattern is not None and not re.fullmatch(r"[A-Za-z0-9_.:@\-*?\[\]!]{1,128}", pattern):
            doc.error(ip + ("match",), f"has value {pattern!r}; a channel name or a pattern of letters, digits, "
                                       "_ - . : @ and * ? [ ]")
            pattern = None
        history = None
        if m.get("history") is not None:
            hp = ip + ("history",)
            hm = r.mapping(m["history"], hp, ("size", "ttl_s")) or {}
            history = History(size=r.get(hm, hp, "size", "int", 100, minimum=1),
                              ttl_s=r.get(hm, hp, "ttl_s", "number", 300, minimum=1))
            if history.size > 100_000:
                doc.error(hp + ("size",), f"has value {history.size}; at most 100000 messages per channel")
        if pattern is not None:
            out.append(ChannelRule(match=pattern, history=history))
    return tuple(out)


def _limits(r: _Reader, value: Any) -> Limits:
    path = ("limits",)
    names = Limits.__dataclass_fields__
    m = r.mapping(value, path, tuple(names)) or {}
    d = Limits()
    kw = {}
    for name in names:
        default = getattr(d, name)
        kind = "int" if isinstance(default, int) and not name.endswith("_s") and name != "messages_per_second" else "number"
        kw[name] = r.get(m, path, name, kind, default, minimum=0)
    return Limits(**kw)


def _drain(r: _Reader, doc: _Doc, value: Any) -> Drain:
    path = ("drain",)
    m = r.mapping(value, path, ("timeout_s", "announce_s", "close_code", "rate_per_s", "resume_window_s",
                                "replay_max_messages", "replay_max_bytes")) or {}
    d = Drain()
    out = Drain(timeout_s=r.get(m, path, "timeout_s", "number", d.timeout_s, minimum=0),
                announce_s=r.get(m, path, "announce_s", "number", d.announce_s, minimum=0),
                close_code=r.get(m, path, "close_code", "int", d.close_code, choices=(1001, 1012)),
                rate_per_s=r.get(m, path, "rate_per_s", "number", d.rate_per_s, minimum=1),
                resume_window_s=r.get(m, path, "resume_window_s", "number", d.resume_window_s, minimum=0),
                replay_max_messages=r.get(m, path, "replay_max_messages", "int", d.replay_max_messages, minimum=0),
                replay_max_bytes=r.get(m, path, "replay_max_bytes", "int", d.replay_max_bytes, minimum=0))
    if out.announce_s >= out.timeout_s > 0:
        doc.error(path + ("announce_s",), f"is {out.announce_s:g} s, not less than drain.timeout_s "
                  f"({out.timeout_s:g} s): no time would be left to move sessions")
    return out


def _auth(r: _Reader, doc: _Doc, value: Any) -> Auth:
    path = ("auth",)
    m = r.mapping(value, path, ("jwt", "origins")) or {}
    origins = r.get(m, path, "origins", "strlist", None)
    for i, pattern in enumerate(origins or ()):
        from .auth import parse_origin_pattern

        try:
            parse_origin_pattern(pattern)
        except ValueError as exc:
            doc.error(path + ("origins", i), f"has value {pattern!r}; {exc}")
    jwt = None
    if m.get("jwt") is not None:
        jp = path + ("jwt",)
        j = r.mapping(m["jwt"], jp, ("algorithms", "keys", "issuer", "audience", "leeway_s",
                                     "sources", "forward_claims", "require")) or {}
        algorithms = r.get(j, jp, "algorithms", "strlist") or ()
        for i, alg in enumerate(algorithms):
            if alg.lower() == "none":
                doc.error(jp + ("algorithms", i), "'none' is never accepted: unsigned tokens prove nothing")
            elif alg not in ALGORITHMS:
                doc.error(jp + ("algorithms", i), f"unknown algorithm {alg!r} (known: {', '.join(ALGORITHMS)})")
        kp = jp + ("keys",)
        k = r.mapping(j.get("keys"), kp, ("jwks_url", "public_key_file", "secret_env")) or {}
        keys = JwtKeys(jwks_url=r.get(k, kp, "jwks_url", "str", None),
                       public_key_file=r.get(k, kp, "public_key_file", "str", None),
                       secret_env=r.get(k, kp, "secret_env", "str", None))
        given = [n for n in ("jwks_url", "public_key_file", "secret_env") if getattr(keys, n)]
        if len(given) != 1:
            doc.error(kp, "set exactly one of jwks_url, public_key_file, secret_env"
                          + (f" (got {', '.join(given)})" if given else ""))
        hmac = [a for a in algorithms if a.startswith("HS")]
        if keys.secret_env and len(hmac) != len(algorithms):
            doc.error(jp + ("algorithms",), "secret_env keys work only with HS256/384/512")
        if (keys.jwks_url or keys.public_key_file) and hmac:
            doc.error(jp + ("algorithms",), "HS* algorithms need secret_env; a public key is never an HMAC secret")
        if keys.jwks_url and urlsplit(keys.jwks_url).scheme not in ("http", "https"):
            doc.error(kp + ("jwks_url",), f"has value {keys.jwks_url!r}; expected an http(s) URL")
        audience = j.get("audience")
        if isinstance(audience, str):
            audience = (audience,)
        elif audience is not None:
            audience = r.get(j, jp, "audience", "strlist", None)
        sources = r.get(j, jp, "sources", "strlist", ("header",))
        for i, s in enumerate(sources):
            kind, _, name = s.partition(":")
            if kind in ("header", "subprotocol") and not name:
                continue
            if kind in ("query", "cookie") and re.fullmatch(r"[A-Za-z0-9_.\-]+", name or ""):
                continue
            doc.error(jp + ("sources", i), f"has value {s!r}; expected header, subprotocol, query:NAME or cookie:NAME")
        forward = r.get(j, jp, "forward_claims", "strlist", ("sub",))
        for i, name in enumerate(forward):
            if not re.fullmatch(r"[A-Za-z0-9_\-]+", name):
                doc.error(jp + ("forward_claims", i), f"has value {name!r}; claim names in headers are letters, digits, _ and -")
        if "sub" not in forward:
            forward = ("sub",) + forward
        jwt = Jwt(algorithms=algorithms, keys=keys, issuer=r.get(j, jp, "issuer", "str", None),
                  audience=audience, leeway_s=r.get(j, jp, "leeway_s", "number", 30, minimum=0),
                  sources=sources, forward_claims=forward,
                  require=r.get(j, jp, "require", "strlist", ("exp",)))
    return Auth(jwt=jwt, origins=origins)


_BACKEND_KEYS = {
    "websocket": ("type", "endpoints", "balance", "hash_on", "connect_timeout_s", "health",
                  "eject_after_failures", "eject_cooldown_s", "on_upstream_close"),
    "http": ("type", "endpoints", "balance", "hash_on", "timeout_s", "connect_timeout_s", "max_queue",
             "eject_after_failures", "eject_cooldown_s"),
    "builtin": ("type", "handler"),
}


def _backends(r: _Reader, doc: _Doc, value: Any) -> dict[str, Backend]:
    path = ("backends",)
    if not isinstance(value, dict) or not value:
        doc.error(path, "define at least one backend" if value is None or value == {} else f"must be a mapping of name -> backend, got {_kind(value)}",
                  key=True)
        return {}
    out = {}
    for name, spec in value.items():
        bp = path + (name,)
        if not isinstance(spec, dict):
            doc.error(bp, f"must be a mapping, got {_kind(spec)}")
            continue
        btype = r.get(spec, bp, "type", "str", None, choices=tuple(_BACKEND_KEYS))
        if btype is None:
            if "type" not in spec:
                doc.error(bp, "missing required key 'type' (websocket, http or builtin)")
            continue
        r.mapping(spec, bp, _BACKEND_KEYS[btype])
        out[name] = _backend(r, doc, bp, name, btype, spec)
    return out


def _backend(r: _Reader, doc: _Doc, bp: Path, name: str, btype: str, spec: dict) -> Backend:
    if btype == "builtin":
        return Backend(name=name, type=btype, handler=r.get(spec, bp, "handler", "str", None, choices=BUILTIN_HANDLERS)
                       or _required(doc, bp, spec, "handler"))
    endpoints = r.get(spec, bp, "endpoints", "strlist") or ()
    schemes = ("ws", "wss") if btype == "websocket" else ("http", "https")
    if not endpoints and "endpoints" in spec:
        doc.error(bp + ("endpoints",), "needs at least one endpoint")
    for i, url in enumerate(endpoints):
        parts = urlsplit(url)
        if parts.scheme not in schemes or not parts.hostname:
            doc.error(bp + ("endpoints", i), f"has value {url!r}; expected a {' or '.join(s + '://' for s in schemes)}host:port/path URL")
    if len(set(endpoints)) != len(endpoints):
        doc.error(bp + ("endpoints",), "lists an endpoint twice")
    balance = r.get(spec, bp, "balance", "str", "round_robin",
                    choices=("round_robin", "least_connections", "consistent_hash"))
    hash_on = r.get(spec, bp, "hash_on", "str", None)
    if balance == "consistent_hash" and hash_on is None:
        doc.error(bp, "balance: consistent_hash needs hash_on (claim:X, header:X, query:X or ip)")
    if hash_on is not None and not re.fullmatch(r"(claim|header|query):[A-Za-z0-9_.\-]+|ip", hash_on):
        doc.error(bp + ("hash_on",), f"has value {hash_on!r}; expected claim:X, header:X, query:X or ip")
    health = None
    if spec.get("health") is not None:
        hp = bp + ("health",)
        h = r.mapping(spec["health"], hp, ("path", "interval_s", "timeout_s", "unhealthy_after", "healthy_after")) or {}
        health = Health(path=r.get(h, hp, "path", "str", "/healthz"),
                        interval_s=r.get(h, hp, "interval_s", "number", 5, minimum=0.05),
                        timeout_s=r.get(h, hp, "timeout_s", "number", 2, minimum=0.01),
                        unhealthy_after=r.get(h, hp, "unhealthy_after", "int", 2, minimum=1),
                        healthy_after=r.get(h, hp, "healthy_after", "int", 1, minimum=1))
    on_close = r.get(spec, bp, "on_upstream_close", "str", "close", choices=("close", "reattach"))
    return Backend(name=name, type=btype, endpoints=endpoints, balance=balance, hash_on=hash_on,
                   connect_timeout_s=r.get(spec, bp, "connect_timeout_s", "number", 3, minimum=0.01),
                   health=health,
                   eject_after_failures=r.get(spec, bp, "eject_after_failures", "int", 3, minimum=1),
                   eject_cooldown_s=r.get(spec, bp, "eject_cooldown_s", "number", 10, minimum=0),
                   on_upstream_close=on_close,
                   timeout_s=r.get(spec, bp, "timeout_s", "number", 5, minimum=0.01),
                   max_queue=r.get(spec, bp, "max_queue", "int", 64, minimum=1))


def _required(doc: _Doc, path: Path, spec: dict, key: str) -> None:
    if key not in spec:
        doc.error(path, f"missing required key '{key}'")
    return None


_ROUTE_KEYS = ("name", "match", "auth", "backend", "split", "select", "actions", "events",
               "forward_path", "error_message", "history", "reliable")
_MATCH_KEYS = ("path", "path_prefix", "host", "headers", "query", "claims")


def _routes(r: _Reader, doc: _Doc, value: Any, backends: dict[str, Backend], auth: Auth) -> tuple[Route, ...]:
    path = ("routes",)
    if not isinstance(value, list) or not value:
        doc.error(path, "define at least one route" if not value else f"must be a list, got {_kind(value)}", key=True)
        return ()
    out: list[Route] = []
    seen: dict[str, int] = {}
    known = ", ".join(backends) or "none defined"
    default_auth = "required" if auth.jwt else "none"
    for i, spec in enumerate(value):
        rp = path + (i,)
        m = r.mapping(spec, rp, _ROUTE_KEYS)
        if m is not None and "history" in m:
            # A channel is not tied to a route (the API publishes to it by name),
            # so its history is set per channel name or pattern.
            doc.error(rp + ("history",), "history is set per channel: use the top-level "
                                         "'channels: [{match: \"room:*\", history: {size: 100, ttl_s: 300}}]'",
                      key=True)
        if m is None:
            continue
        name = r.get(m, rp, "name", "str")
        if name in seen:
            doc.error(rp + ("name",), f"duplicate route name {name!r} (first at routes[{seen[name]}])")
        elif name:
            seen[name] = i
        match = _match(r, doc, rp + ("match",), m.get("match"))
        route_auth = r.get(m, rp, "auth", "str", default_auth, choices=("required", "optional", "none"))
        if route_auth != "none" and auth.jwt is None:
            doc.error(rp + ("auth",), f"is {route_auth!r} but auth.jwt is not configured")
        if match.claims and route_auth == "none":
            doc.error(rp + ("match", "claims"), "needs auth: required or optional (claims come from the token)")

        def backend_ref(p: Path, ref: Any, types: tuple[str, ...] = ("websocket", "http", "builtin")) -> str | None:
            if not isinstance(ref, str):
                doc.error(p, f"has value {ref!r}; expected a backend name")
                return None
            if ref not in backends:
                doc.error(p, f"unknown backend {ref!r} (known: {known})")
                return None
            if backends[ref].type not in types:
                doc.error(p, f"backend {ref!r} is {backends[ref].type}; expected {' or '.join(types)}")
            return ref

        backend = backend_ref(rp + ("backend",), m["backend"]) if "backend" in m else None
        split: list[SplitEntry] = []
        if "split" in m:
            sp = rp + ("split",)
            if not isinstance(m["split"], list) or not m["split"]:
                doc.error(sp, "must be a non-empty list of {backend, weight}")
            else:
                for j, entry in enumerate(m["split"]):
                    e = r.mapping(entry, sp + (j,), ("backend", "weight"))
                    if e is None:
                        continue
                    ref = backend_ref(sp + (j, "backend"), e.get("backend"))
                    weight = r.get(e, sp + (j,), "weight", "int", minimum=0)
                    if ref is not None and weight is not None:
                        split.append(SplitEntry(backend=ref, weight=weight))
                if split and sum(e.weight for e in split) == 0:
                    doc.error(sp, "weights add up to 0: no backend could be picked")
        select = r.get(m, rp, "select", "str", None)
        if select is not None and not re.fullmatch(r"\$(\.[A-Za-z0-9_\-]+)+", select):
            doc.error(rp + ("select",), f"has value {select!r}; expected a dotted path like $.action")
        actions: list[tuple[str, str]] = []
        if "actions" in m:
            am = r.mapping(m["actions"], rp + ("actions",), tuple(m["actions"]) if isinstance(m["actions"], dict) else ())
            for action, ref in (am or {}).items():
                ref = backend_ref(rp + ("actions", action), ref, ("http", "builtin"))
                if ref:
                    actions.append((action, ref))
        if (select is None) != (not actions):
            doc.error(rp, "select and actions go together")
        events: list[tuple[str, str]] = []
        if "events" in m:
            em = r.mapping(m["events"], rp + ("events",), ("connect", "disconnect")) or {}
            for event, ref in em.items():
                ref = backend_ref(rp + ("events", event), ref, ("http",))
                if ref:
                    events.append((event, ref))
        targets = sum(1 for x in (backend, split, actions) if x)
        if targets == 0 and not any(k in m for k in ("backend", "split", "actions")):
            doc.error(rp, "needs one of: backend, split, select+actions")
        elif sum(1 for k in ("backend", "split", "actions") if k in m) > 1:
            doc.error(rp, "give only one of: backend, split, select+actions")
        out.append(Route(name=name or f"routes[{i}]", index=i, match=match, auth=route_auth, backend=backend,
                         split=tuple(split), select=select, actions=tuple(actions), events=tuple(events),
                         forward_path=r.get(m, rp, "forward_path", "bool", False),
                         error_message=r.get(m, rp, "error_message", "str", DEFAULT_ERROR_MESSAGE),
                         reliable=_reliable(r, doc, rp, m, backends, backend, split, actions)))
    _check_shadowing(doc, out)
    return tuple(out)


def _reliable(r: _Reader, doc: _Doc, rp: Path, m: dict, backends: dict[str, Backend], backend: str | None,
              split: list[SplitEntry], actions: list[tuple[str, str]]) -> Reliable | None:
    """`reliable:` (null or a mapping; docs/reliable.md). Needs websocket or http
    backends: the gateway strips and adds the kind byte on the message path it runs
    for them (a builtin or select+actions answers from inside the gateway, unnumbered)."""
    if "reliable" not in m:
        return None
    path = rp + ("reliable",)
    v = r.mapping(m["reliable"], path, ("max_unacked_bytes", "max_unacked_messages", "ack_every", "ack_ms"))
    if v is None:
        return None
    d = Reliable()
    out = Reliable(max_unacked_bytes=r.get(v, path, "max_unacked_bytes", "int", d.max_unacked_bytes, minimum=1),
                   max_unacked_messages=r.get(v, path, "max_unacked_messages", "int", d.max_unacked_messages,
                                              minimum=1),
                   ack_every=r.get(v, path, "ack_every", "int", d.ack_every, minimum=1),
                   ack_ms=r.get(v, path, "ack_ms", "number", d.ack_ms, minimum=1))
    names = [backend] if backend else [e.backend for e in split]
    others = sorted({n for n in names if n in backends and backends[n].type not in ("websocket", "http")})
    if actions or others:
        doc.error(path, "needs a websocket or http backend (reliable mode is not built for "
                        f"{'select+actions' if actions else ', '.join(others)})")
    return out


def _match(r: _Reader, doc: _Doc, path: Path, value: Any) -> Match:
    m = r.mapping(value, path, _MATCH_KEYS) or {}
    p = r.get(m, path, "path", "str", None)
    prefix = r.get(m, path, "path_prefix", "str", None)
    for key, v in (("path", p), ("path_prefix", prefix)):
        if v is not None and not v.startswith("/"):
            doc.error(path + (key,), f"has value {v!r}; a path starts with '/'")
    if p is not None and prefix is not None:
        doc.error(path, "give path or path_prefix, not both")

    def pairs(key: str, lower_keys: bool) -> tuple[tuple[str, Any], ...]:
        if key not in m:
            return ()
        sub = r.mapping(m[key], path + (key,), tuple(m[key]) if isinstance(m[key], dict) else ())
        out = []
        for k, v in (sub or {}).items():
            if key == "claims":
                if not (isinstance(v, (str, int, bool)) or (isinstance(v, list) and v and all(isinstance(x, (str, int, bool)) for x in v))):
                    doc.error(path + (key, k), f"has value {v!r}; expected a value or a list of values (any of)")
                    continue
                out.append((k, tuple(v) if isinstance(v, list) else v))
            else:
                if not isinstance(v, (str, int)) or isinstance(v, bool):
                    doc.error(path + (key, k), f"has value {v!r}; expected a string")
                    continue
                out.append((k.lower() if lower_keys else k, str(v)))
        return tuple(sorted(out, key=lambda kv: kv[0]))

    host = r.get(m, path, "host", "str", None)
    return Match(path=p, path_prefix=prefix, host=host.lower() if host else None,
                 headers=pairs("headers", True), query=pairs("query", False), claims=pairs("claims", False))


def _implies(later: Match, earlier: Match) -> bool:
    """True if every request `later` matches is also matched by `earlier`."""
    if earlier.path is not None and later.path != earlier.path:
        return False
    if earlier.path_prefix is not None:
        candidate = later.path if later.path is not None else later.path_prefix
        if candidate is None or not path_has_prefix(candidate, earlier.path_prefix):
            return False
    if earlier.host is not None and later.host != earlier.host:
        return False
    return all(set(getattr(earlier, k)) <= set(getattr(later, k)) for k in ("headers", "query", "claims"))


def _check_shadowing(doc: _Doc, routes: list[Route]) -> None:
    for j, later in enumerate(routes):
        for earlier in routes[:j]:
            if _implies(later.match, earlier.match):
                doc.error(("routes", later.index, "match"),
                          f"route {later.name!r} is never reached: route {earlier.name!r} (routes[{earlier.index}]) "
                          "matches every request it matches")
                break


def with_workers(cfg: Config, value: str) -> Config:
    """Apply `--workers N|auto` from the command line."""
    import dataclasses

    if value == "auto":
        n = os.cpu_count() or 1
    elif value.isdigit() and int(value) >= 1:
        n = int(value)
    else:
        raise ConfigError([f"--workers: has value {value!r}; expected a whole number >= 1 or 'auto'"])
    return dataclasses.replace(cfg, workers=n)
