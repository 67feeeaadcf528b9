"""No fixed sleep as synchronisation in tests/: every sleep of a constant, non-zero
time is either listed below with why it is not a wait for something to have
happened (pacing a load, a peer's behaviour, the interval of a bounded poll), or
it fails this test. To wait for a condition, poll it with a bound:
`await until(lambda: asyncio.sleep(0, <condition>), what=...)` (tests/helpers.py).

The scan reads every .py file under tests/ with ast. A call counts as a sleep when
it is `sleep(...)`, `<anything>.sleep(...)` or `<page>.wait_for_timeout(...)`,
and its delay folds to a non-zero number: literals, arithmetic on them, and names
the same module only ever binds to such a value (so `sleep(SLOW_S)` counts,
`sleep(interval_s)` of a parameter does not). An entry is keyed by file, enclosing
function and the call's source, not by line number, so edits elsewhere in a file
do not break it; an entry that matches nothing fails too, so the list stays true.

No wall-clock threshold either: an `assert` whose comparison involves elapsed
time (`time.monotonic() - started < 2`, `loop.time() - t0`, a name or attribute
bound to such a difference, `(datetime.now() - t0).total_seconds()`), or that
orders a clock reading (`time.monotonic() < deadline`), fails this test. What
such an assert means to prove ("bounded by the configured timeout, not waiting
on the peer") is shown by the mechanism instead: what was raised, the log line
or metric that says which timer fired, the state reached; a generous bound
used only to turn a hang into a failure (`asyncio.wait_for`, `until`) is fine."""

from __future__ import annotations

import ast
from pathlib import Path

TESTS = Path(__file__).resolve().parents[1]

POLL = "the interval of a bounded poll (the loop checks its condition and a deadline; only the wait between checks)"

# (path under tests/, enclosing function, call source) -> why this is not synchronisation.
ALLOWED: dict[tuple[str, str, str], str] = {
    # -- pacing a load
    ("integration/test_auth_gateway.py", "test_flood_is_dropped_counted_then_closed_1008.flood",
     "asyncio.sleep(0.002)"): "paces the flood at ~500 msg/s, well past the 5/s limit under test",
    ("integration/test_limits.py", "test_pings_do_not_count_as_activity.pinger", "asyncio.sleep(0.05)"):
        "paces the client's pings (every 50 ms, inside the 0.4 s idle timeout) so that only pings are seen",
    ("integration/test_store.py", "test_heartbeat_refresh_keeps_sessions_and_indexes_alive", "asyncio.sleep(0.25)"):
        "paces the heartbeats (4 per 1 s TTL) for 1.4 s, past the TTL: that time must pass for the test",
    ("browser/test_admin_page.py", "test_admin_page_live.talk", "asyncio.sleep(0.02)"):
        "paces the traffic both ways while the page is watched",
    ("browser/test_chat_demo.py",
     "test_the_chat_page_resumes_on_another_node_through_a_drain_losing_nothing.push",
     "asyncio.sleep(INTERVAL_MS / 1000)"): "paces the backend's pushes to the chat page",
    ("browser/test_chat_cut.py",
     "test_the_chat_page_resumes_through_cut_connections_in_reliable_mode_losing_nothing.bot",
     "asyncio.sleep(INTERVAL_MS / 1000)"): "paces the bot's lines to the chat page",
    # -- a peer's behaviour
    ("integration/test_relay.py", "test_gateway_pings_the_upstream_and_a_silent_upstream_fails_1011.counting",
     "asyncio.sleep(5)"): "the silent upstream: stops reading and answering; cancelled at teardown",
    ("integration/test_metrics_traffic.py", "test_http_backend_round_trip_and_added_latency_are_observed.slow_echo",
     "asyncio.sleep(delay_s)"): "the slow HTTP backend's answer time, the latency the histogram must show",
    ("integration/test_http_backends.py", "test_messages_reach_backend_in_order_one_at_a_time.slow",
     "asyncio.sleep(0.02 if body.endswith(b'0') else 0)"): "a backend slow on every tenth message, so a queue forms",
    ("integration/test_http_backends.py", "test_5xx_and_timeout_are_counted_and_the_connection_stays.handler",
     "asyncio.sleep(2)"): "a backend slower than the route's 0.2 s timeout_s, so the POST times out",
    ("integration/test_http_drain_order.py",
     "test_queued_posts_reach_the_backend_before_the_resumed_sessions_none_lost.answer", "asyncio.sleep(0.05)"):
        "a slow backend: the queue fills behind it",
    ("chaos/test_backend_faults.py", "test_slow_websocket_backend_answers_everything_in_order.slow_echo",
     "asyncio.sleep(SLOW_S)"): "the slow WebSocket backend's answer time, the fault under test",
    ("chaos/test_backend_faults.py", "test_slow_http_backend_answers_everything_in_order.slow_echo",
     "asyncio.sleep(SLOW_S)"): "the slow HTTP backend's answer time, the fault under test",
    # -- sampling while something else runs (not waiting on it)
    ("chaos/test_backend_faults.py",
     "test_backend_that_stops_reading_is_closed_1013_and_memory_stays_bounded.watch", "asyncio.sleep(0.01)"):
        "samples the peak write buffer while the flood runs; the test waits on the closes, not on this",
    ("soak/test_bounds.py", "test_memory_stays_under_the_formula.sample", "asyncio.sleep(0.1)"):
        "samples RSS through the flood so a pass over the bound stops the test at once",
    # -- bounded polls written out where `until` does not fit
    ("integration/test_jwks.py", "until.poll", "asyncio.sleep(0.001)"): POLL + " (under asyncio.wait_for)",
    ("integration/test_reattach_seam.py", "until", "asyncio.sleep(0.005)"): POLL,
    ("integration/test_lifecycle.py", "Proc.ready", "asyncio.sleep(0.1)"): POLL + "; fails with the process's stderr",
    ("integration/test_lifecycle.py", "Proc.wait", "asyncio.sleep(0.05)"): POLL + "; kills the process at the deadline",
    ("integration/test_rollout_rehearsal.py", "Pod.terminate", "asyncio.sleep(0.05)"):
        POLL + ": the kubelet's grace period, after which it kills",
    ("integration/test_drain_resume.py", "test_a_resume_that_fails_half_way_does_not_burn_the_session",
     "asyncio.sleep(0.05)"): POLL + ": 50 tries at the resume, asserted after",
}


def _is_sleep(call: ast.Call) -> bool:
    f = call.func
    name = f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else ""
    return name in ("sleep", "wait_for_timeout")


def _constants(tree: ast.AST) -> dict[str, float]:
    """Names the module only ever binds to a number that folds from literals."""
    seen: dict[str, list] = {}
    for node in ast.walk(tree):
        targets = []
        if isinstance(node, ast.Assign):
            targets = [(t, node.value) for t in node.targets]
        elif isinstance(node, (ast.AnnAssign, ast.AugAssign)) and node.value is not None:
            targets = [(node.target, node.value if isinstance(node, ast.AnnAssign) else None)]
        elif isinstance(node, (ast.For, ast.AsyncFor, ast.comprehension)):
            targets = [(node.target, None)]
        elif isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
            a = node.args
            targets = [(ast.Name(x.arg), None) for x in a.posonlyargs + a.args + a.kwonlyargs]
        for t, v in targets:
            for n in ast.walk(t):
                if isinstance(n, ast.Name):
                    seen.setdefault(n.id, []).append(v)
    out: dict[str, float] = {}
    for _ in range(3):   # names defined from names
        for name, values in seen.items():
            folded = {_fold(v, out) for v in values}
            if len(folded) == 1 and None not in folded:
                out[name] = folded.pop()
    return out


def _fold(node, names: dict[str, float]):
    if node is None:
        return None
    if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)) and not isinstance(node.value, bool):
        return node.value
    if isinstance(node, ast.Name):
        return names.get(node.id)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        v = _fold(node.operand, names)
        return None if v is None else (-v if isinstance(node.op, ast.USub) else v)
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
        a, b = _fold(node.left, names), _fold(node.right, names)
        if a is None or b is None or (isinstance(node.op, ast.Div) and b == 0):
            return None
        return {ast.Add: a + b, ast.Sub: a - b, ast.Mult: a * b}.get(type(node.op)) or (
            a / b if isinstance(node.op, ast.Div) else 0)
    if isinstance(node, ast.IfExp):   # sleep(0.02 if ... else 0): fixed when a branch is
        branches = [_fold(node.body, names), _fold(node.orelse, names)]
        return next((v for v in branches if v), None if None in branches else 0)
    return None


def fixed_sleeps(source: str) -> list[tuple[int, str, str]]:
    """(line, enclosing function, call source) of each sleep of a fixed non-zero time in `source`."""
    tree = ast.parse(source)
    names = _constants(tree)
    found: list[tuple[int, str, str]] = []

    def visit(node, scope: list[str]) -> None:
        for child in ast.iter_child_nodes(node):
            if isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
                visit(child, scope + [child.name])
                continue
            if isinstance(child, ast.Call) and _is_sleep(child):
                arg = child.args[0] if child.args else next(
                    (k.value for k in child.keywords if k.arg in ("delay", "seconds", "secs", "timeout")), None)
                if _fold(arg, names):
                    found.append((child.lineno, ".".join(scope), ast.unparse(child)))
            visit(child, scope)

    visit(tree, [])
    return found


def scan() -> list[tuple[str, int, str, str]]:
    out = []
    for path in sorted(TESTS.rglob("*.py")):
        rel = path.relative_to(TESTS).as_posix()
        out += [(rel, line, scope, call) for line, scope, call in fixed_sleeps(path.read_text())]
    return out


def test_no_fixed_sleep_is_used_to_wait_for_something():
    found = scan()
    flagged = [f"tests/{rel}:{line} in {scope or '<module>'}: {call}" for rel, line, scope, call in found
               if (rel, scope, call) not in ALLOWED]
    assert not flagged, ("a fixed sleep is not a wait for a condition; poll it with helpers.until, or, if it "
                         "paces a load or is a peer's behaviour, list it in ALLOWED with why:\n  "
                         + "\n  ".join(flagged))
    stale = set(ALLOWED) - {(rel, scope, call) for rel, _, scope, call in found}
    assert not stale, f"ALLOWED names sleeps that are no longer there: {sorted(stale)}"


def test_every_allowed_sleep_says_why():
    assert all(len(why) > 20 for why in ALLOWED.values())


def test_the_scan_sees_fixed_sleeps_and_only_those():
    src = '''
import asyncio, time
SLOW_S = 0.5
HALF = SLOW_S / 2
async def t(interval_s, page):
    await asyncio.sleep(0.1)
    await asyncio.sleep(SLOW_S)
    await asyncio.sleep(HALF)
    time.sleep(2)
    await page.wait_for_timeout(500)
    await asyncio.sleep(0.02 if interval_s else 0)
    await asyncio.sleep(0)
    await asyncio.sleep(0, "value")
    await asyncio.sleep(interval_s)
    await asyncio.sleep(deadline - time.monotonic())
    class C:
        def m(self):
            time.sleep(delay=1)
'''
    assert [(line, scope) for line, scope, _ in fixed_sleeps(src)] == [
        (6, "t"), (7, "t"), (8, "t"), (9, "t"), (10, "t"), (11, "t"), (18, "t.C.m")]


# ---- wall-clock thresholds in asserts

# Calls that read a clock: time.monotonic(), loop.time(), perf_counter(), datetime.now()...
CLOCKS = {"monotonic", "monotonic_ns", "perf_counter", "perf_counter_ns", "time", "time_ns", "process_time",
          "now", "utcnow"}
_NESTED = (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef, ast.Lambda)
READING, ELAPSED = 1, 2      # what an expression is in time: a point on a clock, or a span between two


def _is_clock(node) -> bool:
    if not isinstance(node, ast.Call):
        return False
    f = node.func
    return (f.id if isinstance(f, ast.Name) else f.attr if isinstance(f, ast.Attribute) else "") in CLOCKS


class _Timing:
    """Which names (per scope) and attributes (per module: `self.took_s = ...`
    read as `p.took_s`) hold a clock reading or an elapsed time."""

    def __init__(self):
        self.attrs: dict[str, int] = {}

    def kind(self, node, names: dict[str, int]) -> int:
        if _is_clock(node):
            return READING
        if isinstance(node, ast.Name):
            return names.get(node.id, 0)
        if isinstance(node, ast.Attribute):
            return self.attrs.get(node.attr, 0)
        if isinstance(node, ast.UnaryOp):
            return self.kind(node.operand, names)
        if isinstance(node, ast.BinOp):
            a, b = self.kind(node.left, names), self.kind(node.right, names)
            if isinstance(node.op, ast.Sub) and READING in (a, b) and ELAPSED not in (a, b):
                # A reading less a reading, or less something unknown (a parameter), is a span;
                # less a constant it is another reading (an hour ago).
                other = node.right if a == READING else node.left
                return READING if b != READING and _fold(other, {}) is not None else ELAPSED
            return max(a, b)
        if isinstance(node, ast.Call):
            f = node.func
            if isinstance(f, ast.Attribute) and f.attr == "total_seconds":
                return self.kind(f.value, names)
            if isinstance(f, ast.Name) and f.id in ("round", "abs", "int", "float", "min", "max"):
                return max((self.kind(a, names) for a in node.args), default=0)
        return 0

    def involves_elapsed(self, node, names) -> bool:
        return any(self.kind(n, names) == ELAPSED for n in ast.walk(node))


def _own_nodes(body):
    """The nodes of a scope, not those of the functions and classes defined in it."""
    stack = [n for n in body if not isinstance(n, _NESTED)]
    while stack:
        node = stack.pop()
        yield node
        stack += [c for c in ast.iter_child_nodes(node) if not isinstance(c, _NESTED)]


def _scopes(tree):
    """(path, own nodes, the scopes defined in it) from the module down."""
    def visit(node, path):
        body = node.body if isinstance(node.body, list) else [node.body]
        own = list(_own_nodes(body))
        inner = [n for n in own for n in ast.iter_child_nodes(n) if isinstance(n, _NESTED)]
        inner += [n for n in body if isinstance(n, _NESTED)]
        return path, node, own, [visit(n, path + [getattr(n, "name", "<lambda>")]) for n in inner]
    return visit(tree, [])


def _bind(timing: _Timing, node, own, inherited: dict[str, int]) -> dict[str, int]:
    """The scope's names that hold a reading or an elapsed time (the stronger if bound to both);
    attributes assigned here are added to `timing.attrs`."""
    names = dict(inherited)
    if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
        a = node.args
        for arg in a.posonlyargs + a.args + a.kwonlyargs + [x for x in (a.vararg, a.kwarg) if x]:
            names.pop(arg.arg, None)         # a parameter shadows the outer name
    for _ in range(3):                       # names defined from names
        for n in own:
            if isinstance(n, ast.Assign):
                pairs = [(t, n.value) for t in n.targets]
            elif isinstance(n, (ast.AnnAssign, ast.AugAssign, ast.NamedExpr)) and n.value is not None:
                pairs = [(n.target, n.value)]
            else:
                continue
            for target, value in pairs:
                k = timing.kind(value, names)
                if not k:
                    continue
                if isinstance(target, ast.Name):
                    names[target.id] = max(names.get(target.id, 0), k)
                elif isinstance(target, ast.Attribute):
                    timing.attrs[target.attr] = max(timing.attrs.get(target.attr, 0), k)
    return names


_ORDER = (ast.Lt, ast.LtE, ast.Gt, ast.GtE)


def timed_asserts(source: str) -> list[tuple[int, str, str]]:
    """(line, enclosing function, assert source) of each assert in `source` that
    compares an elapsed time (any comparison: `== pytest.approx(1)` measures too)
    or orders a clock reading (`time.monotonic() < deadline`)."""
    tree = ast.parse(source)
    timing = _Timing()
    root = _scopes(tree)

    def walk(scope, inherited, found):
        path, node, own, inner = scope
        names = _bind(timing, node, own, inherited)
        if found is not None:
            for n in own:
                if isinstance(n, ast.Assert) and any(
                        isinstance(c, ast.Compare) and _timed(c, names) for c in ast.walk(n.test)):
                    found.append((n.lineno, ".".join(path), ast.unparse(n.test)))
        for s in inner:
            walk(s, {} if isinstance(node, ast.ClassDef) else names, found)

    def _timed(c: ast.Compare, names) -> bool:
        sides = [c.left, *c.comparators]
        if any(timing.involves_elapsed(x, names) for x in sides):
            return True
        return any(isinstance(op, _ORDER) for op in c.ops) and any(timing.kind(x, names) for x in sides)

    for _ in range(3):                       # attributes assigned in one function, read in another
        before = dict(timing.attrs)
        walk(root, {}, None)
        if timing.attrs == before:
            break
    found: list[tuple[int, str, str]] = []
    walk(root, {}, found)
    return sorted(found)


def timed_report(rel: str, source: str) -> list[str]:
    """`tests/<rel>:<line> in <function>: assert <source>` for each timed assert in `source`."""
    return [f"tests/{rel}:{line} in {scope or '<module>'}: assert {src}" for line, scope, src in timed_asserts(source)]


def test_no_assert_measures_wall_clock_time():
    flagged = [f for path in sorted(TESTS.rglob("*.py"))
               for f in timed_report(path.relative_to(TESTS).as_posix(), path.read_text())]
    assert not flagged, ("an assert on elapsed time fails on a slow or busy machine and proves little on a fast "
                         "one; check what says the bound held (the exception, the log event or metric naming the "
                         "timer, the state reached), with a generous hang guard if needed:\n  "
                         + "\n  ".join(flagged))


def test_the_scan_sees_wall_clock_asserts_and_only_those():
    src = '''
import asyncio, time
from datetime import datetime
import pytest


async def fails_fast(a, calls):                     # tests/integration/test_store.py, before
    for call in calls:
        started = time.monotonic()
        await call()
        assert time.monotonic() - started < 2.0
    started = time.monotonic()
    await a.listen()
    assert time.monotonic() - started < 2.0 and a.available is False


async def dial_bounded():                           # tests/integration/test_dial.py, before
    loop = asyncio.get_running_loop()
    started = loop.time()
    assert loop.time() - started < 5


async def exits(p):                                 # tests/integration/test_lifecycle.py, before
    started = time.monotonic()
    assert await p.wait(timeout=15) == 0
    assert time.monotonic() - started < 10


async def noticed():                                # tests/integration/test_cluster_processes.py, before
    killed_at = time.monotonic()
    noticed_s = time.monotonic() - killed_at
    assert noticed_s < 30


class Pod:
    def terminate(self, started):
        self.exited_after_s = time.monotonic() - started


def others(pods, t0, deadline):
    assert all(p.exited_after_s < 30 for p in pods)
    assert (datetime.now() - t0).total_seconds() < 1
    assert time.perf_counter() < deadline
    took = round((time.perf_counter() - t0) * 1000)
    assert took == pytest.approx(100, abs=50)
    waited = time.monotonic() - t0

    def inner():
        assert waited <= 3


def not_measuring(rec, got, t0, interval_s):
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        pass
    print(f"{time.monotonic() - t0:.1f} s")
    elapsed = time.monotonic() - t0
    assert len(got) == 3, f"after {elapsed} s"
    assert rec["exp"] == int(time.time()) + 3600
    assert rec["at"] >= 0 and interval_s < 1

    def shadowed(elapsed):
        assert elapsed < 3
'''
    lines = src.splitlines()
    found = timed_asserts(src)
    assert [(line, scope) for line, scope, _ in found] == [
        (11, "fails_fast"), (14, "fails_fast"), (20, "dial_bounded"), (26, "exits"), (32, "noticed"),
        (41, "others"), (42, "others"), (43, "others"), (45, "others"), (49, "others.inner")], found
    assert all(lines[line - 1].lstrip().startswith("assert ") for line, _, _ in found)
    assert timed_report("integration/t.py", src)[4] == "tests/integration/t.py:32 in noticed: assert noticed_s < 30"
