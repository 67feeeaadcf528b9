"""Prometheus metrics. Names are part of the contract (DESIGN 8b).

Per route, children are bound once when routes are compiled: the relay
counts in plain integers on the session and flushes here on a timer and
at close, never per message.

With several workers, prometheus_client's multiprocess mode is used
(PROMETHEUS_MULTIPROC_DIR is set by the supervisor before the workers
start), so any worker's /metrics answers for the whole node.
"""

from __future__ import annotations

import asyncio
import bisect
import os

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client import multiprocess

MULTIPROC = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))
_gauge_mode = {"multiprocess_mode": "livesum"} if MULTIPROC else {}

sessions_open = Gauge("gateway_sessions_open", "Sessions open now", ["route"], **_gauge_mode)
sessions_total = Counter("gateway_sessions_total", "Sessions upgraded", ["route"])
session_closes = Counter("gateway_session_closes_total", "Sessions ended, by close code", ["route", "code"])
messages = Counter("gateway_messages_total", "Messages relayed", ["route", "direction"])
message_bytes = Counter("gateway_message_bytes_total", "Bytes relayed (frames included)", ["route", "direction"])
refusals = Counter("gateway_handshake_refusals_total", "Handshakes refused before the upgrade", ["reason"])
upstream_failures = Counter("gateway_upstream_connect_failures_total", "Failed upstream dials",
                            ["backend", "endpoint"])
upstream_ejections = Counter("gateway_upstream_ejections_total",
                             "Endpoints taken out of rotation after eject_after_failures failed dials",
                             ["backend", "endpoint"])
protocol_errors = Counter("gateway_protocol_violations_total", "Sessions closed for a protocol violation",
                          ["code"])
slow_consumers = Counter("gateway_slow_consumer_closes_total", "Sessions closed because a peer stopped reading",
                         ["side"])
rate_limited = Counter("gateway_rate_limited_messages_total",
                       "Client messages dropped for exceeding messages_per_second + burst")
resumes = Counter("gateway_resumes_total", "Sessions resumed")
reattaches = Counter("gateway_reattaches_total", "Sessions moved to another upstream endpoint")
reattach_failures = Counter("gateway_reattach_failures_total",
                           "Sessions that could not be moved to another upstream endpoint", ["trigger"])
replayed = Counter("gateway_replayed_messages_total", "Messages replayed after resume")
resume_refusals = Counter("gateway_resume_refusals_total", "Resumes refused, by reason", ["reason"])
replay_buffered = Counter("gateway_replay_buffered_messages_total",
                          "Messages written to detached sessions' replay buffers", ["source"])
replay_overflows = Counter("gateway_replay_overflows_total",
                           "Writes refused by a full replay buffer (drain.replay_max_messages or replay_max_bytes): "
                           "the drain's capture or an API push; that session's resume will be refused")
detached_expired = Counter("gateway_detached_sessions_expired_total",
                           "Detached sessions whose resume window ended without a resume")
drain_left = Gauge("gateway_drain_sessions_left", "Sessions this node still has to detach while it drains",
                   **_gauge_mode)
config_reloads = Counter("gateway_config_reloads_total", "Config reloads", ["result"])
store_available = Gauge("gateway_store_available", "1 while the session store (Redis) answers, 0 during an outage",
                        **({"multiprocess_mode": "min"} if MULTIPROC else {}))
store_seconds = Histogram("gateway_store_command_seconds", "Session store (Redis) calls: time to answer, by op",
                          ["op"], buckets=(.0005, .001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5))
store_errors = Counter("gateway_store_errors_total",
                       "Session store (Redis) calls that failed as unreachable (connection, timeout, failover)",
                       ["op"])
store_resyncs = Counter("gateway_store_resyncs_total",
                        "Times this node rewrote all its records (after an outage or a lost write)")
nodes_reaped = Counter("gateway_nodes_reaped_total", "Dead nodes this node cleaned up, and their sessions",
                       ["what"])
bus_requests = Counter("gateway_cluster_requests_total",
                       "Requests this node sent to other nodes through the store's bus", ["op", "result"])
# Set at each scrape (and each flush) from the scraped process's loop: what a soak test
# and an operator watch for a task leak. With workers, each worker's value is as of its
# own last scrape or flush.
asyncio_tasks = Gauge("gateway_asyncio_tasks", "Asyncio tasks alive in the gateway process(es)", **_gauge_mode)
draining = Gauge("gateway_draining", "1 while this node drains", **({"multiprocess_mode": "max"} if MULTIPROC else {}))
# Children that exist from the start, at 0: increase() needs an earlier sample,
# so an alert on a series born at 1 would miss its first event (a failed reload).
for _label in ("ok", "error"):
    config_reloads.labels(_label)
for _label in ("unknown", "forged", "subject", "expired", "used", "leased", "overflowed", "pending", "lost",
               "route_gone", "other_route", "finish_failed", "store_unreachable_at_drain"):   # resume.py, drain.py
    resume_refusals.labels(_label)
for _label in ("upstream_close", "unhealthy", "drained", "removed"):          # reattach.py
    reattach_failures.labels(_label)
# HTTP backends (httpbackend.py), counted locally per message and flushed (LocalHistogram).
http_round_trip = Histogram(
    "gateway_http_backend_round_trip_seconds",
    "HTTP backend requests that got an answer (any status): from the POST call to the reply body read, "
    "as the gateway's HTTP client sees it (dials to endpoints that refused first included), by event",
    ["backend", "event"], buckets=(.001, .0025, .005, .01, .025, .05, .1, .25, .5, 1, 2.5, 5, 10))
http_added = Histogram(
    "gateway_http_backend_added_seconds",
    "Client messages to HTTP backends: time the gateway itself adds, from the message read from the client "
    "(or, queued behind an earlier one, from that one's end) to its reply frame written to the client, "
    "minus the backend round trip",
    ["backend"], buckets=(.0001, .00025, .0005, .001, .0025, .005, .01, .025, .05, .1, .25, 1))


class RouteMetrics:
    """Children of the per-route metrics, bound once."""

    __slots__ = ("route", "open", "total", "msgs_in", "msgs_out", "bytes_in", "bytes_out", "_closes")

    def __init__(self, route: str):
        self.route = route
        self.open = sessions_open.labels(route)
        self.total = sessions_total.labels(route)
        self.msgs_in = messages.labels(route, "in")
        self.msgs_out = messages.labels(route, "out")
        self.bytes_in = message_bytes.labels(route, "in")
        self.bytes_out = message_bytes.labels(route, "out")
        self._closes: dict[int, Counter] = {}

    def closed(self, code: int) -> None:
        child = self._closes.get(code)
        if child is None:
            child = self._closes[code] = session_closes.labels(self.route, str(code))
        child.inc()


_store_ops: dict[str, tuple] = {}


def store_op(op: str) -> tuple:
    """(latency histogram child, error counter child) for a store op, bound once per op."""
    children = _store_ops.get(op)
    if children is None:
        children = _store_ops[op] = (store_seconds.labels(op), store_errors.labels(op))
    return children


class LocalHistogram:
    """One histogram child counted in plain numbers, flushed by `flush_local`.

    `observe` is a bisect and two additions: no lock (prometheus_client's
    Histogram.observe takes one and walks the buckets in Python), so the
    per-message path can afford it. A flush adds the new counts into the
    child's own bucket and sum values, which are what multiprocess mode writes
    to its files: with several workers each one's flushed counts are summed
    like any other histogram's.
    """

    __slots__ = ("metric", "labels", "bounds", "counts", "sum", "pending", "_child")

    def __init__(self, metric: Histogram, labels: tuple[str, ...]):
        self.metric = metric
        self.labels = labels
        bounds = [float(b) for b in metric._kwargs["buckets"]]
        if bounds[-1] != float("inf"):
            bounds.append(float("inf"))
        self.bounds = tuple(bounds)
        self.counts = [0] * len(self.bounds)
        self.sum = 0.0
        self.pending = False
        self._child = None

    def observe(self, seconds: float) -> None:
        # The first bucket whose upper bound is >= the value, as Histogram.observe picks it.
        self.counts[bisect.bisect_left(self.bounds, seconds)] += 1
        self.sum += seconds
        self.pending = True

    def flush(self) -> None:
        if not self.pending:
            return
        child = self._child
        if child is None:
            child = self._child = self.metric.labels(*self.labels)
            # prometheus_client keeps a histogram child as one value per bucket
            # (not cumulative) plus the sum; a release that changes that fails here.
            if [float(b) for b in child._upper_bounds] != list(self.bounds):
                raise RuntimeError(f"{self.metric._name}: prometheus_client's histogram layout changed")
        counts = self.counts
        for i, n in enumerate(counts):
            if n:
                child._buckets[i].inc(n)
                counts[i] = 0
        child._sum.inc(self.sum)
        self.sum = 0.0
        self.pending = False


class LocalCounter:
    """One counter child counted in a plain integer (`n += 1`), flushed by `flush_local`."""

    __slots__ = ("metric", "labels", "n", "flushed")

    def __init__(self, metric: Counter, labels: tuple[str, ...]):
        self.metric = metric
        self.labels = labels
        self.n = 0
        self.flushed = 0

    def flush(self) -> None:
        if self.n != self.flushed:
            self.metric.labels(*self.labels).inc(self.n - self.flushed)
            self.flushed = self.n


# One local book per label set, shared by whoever counts it (a backend and its
# replacement after a reload), so they are as bounded as the label sets.
_books: dict[tuple, LocalHistogram | LocalCounter] = {}
FLUSH_S = 1.0


def local(metric, *labels: str):
    """The local book (LocalHistogram or LocalCounter) of `metric` with these label values."""
    key = (metric._name, labels)
    book = _books.get(key)
    if book is None:
        book = _books[key] = (LocalHistogram if isinstance(metric, Histogram) else LocalCounter)(metric, labels)
    return book


def flush_local() -> None:
    """Add what the local books counted since the last flush to the metrics."""
    for book in list(_books.values()):
        book.flush()


class Flusher:
    """Flushes the local books every FLUSH_S while a loop runs them (with
    several workers, a scrape reaches one worker: the others' counts are at
    most FLUSH_S old)."""

    def __init__(self):
        self._timer = None

    def start(self, loop) -> None:
        if self._timer is None:
            self._timer = loop.call_later(FLUSH_S, self._tick, loop)

    def _tick(self, loop) -> None:
        self._timer = loop.call_later(FLUSH_S, self._tick, loop)   # first: a failed flush must not end the timer
        flush_local()
        count_tasks()

    def stop(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        flush_local()


def count_tasks() -> None:
    try:
        asyncio_tasks.set(len(asyncio.all_tasks()))
    except RuntimeError:          # no running loop (a scrape from a thread, a test)
        pass


def exposition() -> bytes:
    flush_local()   # this process's books; other workers' are flushed by their Flusher
    count_tasks()
    if MULTIPROC:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


def worker_exited(pid: int) -> None:
    if MULTIPROC:
        multiprocess.mark_process_dead(pid)
