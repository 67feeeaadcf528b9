"""Prometheus metrics. Names are part of the contract (DESIGN 8b).

Per route, children are bound once when routes are compiled: the relay
counts in plain integers on the session and flushes here on a timer and
at close, never per message.

With several workers, prometheus_client's multiprocess mode is used
(PROMETHEUS_MULTIPROC_DIR is set by the supervisor before the workers
start), so any worker's /metrics answers for the whole node.
"""

from __future__ import annotations

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
                           "Replay buffers that reached drain.replay_max_messages or replay_max_bytes")
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
draining = Gauge("gateway_draining", "1 while this node drains", **({"multiprocess_mode": "max"} if MULTIPROC else {}))


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


def exposition() -> bytes:
    if MULTIPROC:
        registry = CollectorRegistry()
        multiprocess.MultiProcessCollector(registry)
        return generate_latest(registry)
    return generate_latest()


def worker_exited(pid: int) -> None:
    if MULTIPROC:
        multiprocess.mark_process_dead(pid)
