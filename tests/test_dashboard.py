"""deploy/grafana/gateway.json names only metrics the gateway exports: every
panel's PromQL is read for gateway_ identifiers and each is checked against the
families prometheus_client's registry holds once gateway.metrics is imported."""

from __future__ import annotations

import json
import pathlib
import re

import prometheus_client

import gateway.httpbackend  # noqa: F401  (declares its metrics)
import gateway.metrics  # noqa: F401

DASHBOARD = pathlib.Path(__file__).resolve().parents[1] / "deploy" / "grafana" / "gateway.json"
NAME = re.compile(r"\bgateway_[a-zA-Z0-9_]*")
HISTOGRAM_SERIES = ("_bucket", "_sum", "_count")


def exported() -> set[str]:
    """What PromQL may name: counters as <name>_total, histograms by family name, gauges as they are."""
    out = set()
    for family in prometheus_client.REGISTRY.collect():
        if family.name.startswith("gateway_"):
            out.add(family.name + "_total" if family.type == "counter" else family.name)
    return out


def panels(items: list) -> list:
    out = []
    for p in items:
        out.append(p)
        out.extend(panels(p.get("panels", [])))
    return out


def exprs(dashboard: dict) -> list[tuple[str, str]]:
    found = [(p.get("title", ""), t["expr"]) for p in panels(dashboard["panels"]) for t in p.get("targets", [])
             if "expr" in t]
    for var in dashboard.get("templating", {}).get("list", []):
        if isinstance(var.get("query"), str) and "gateway_" in var["query"]:
            found.append((f"${var['name']}", var["query"]))
    return found


def metric_names(expr: str) -> set[str]:
    names = set()
    for name in NAME.findall(expr):
        for suffix in HISTOGRAM_SERIES:
            if name.endswith(suffix):
                name = name.removesuffix(suffix)
                break
        names.add(name)
    return names


def test_every_dashboard_expression_names_an_exported_metric():
    dashboard = json.loads(DASHBOARD.read_text())
    known = exported()
    found = exprs(dashboard)
    assert len(found) >= 10
    unknown = {(title, name) for title, expr in found for name in metric_names(expr) if name not in known}
    assert not unknown, f"dashboard names metrics the gateway does not export: {sorted(unknown)}"


def test_dashboard_shows_what_operators_watch():
    used = set().union(*(metric_names(e) for _, e in exprs(json.loads(DASHBOARD.read_text()))))
    for name in ("gateway_sessions_open", "gateway_messages_total", "gateway_session_closes_total",
                 "gateway_handshake_refusals_total", "gateway_draining", "gateway_drain_sessions_left",
                 "gateway_resumes_total", "gateway_resume_refusals_total", "gateway_replayed_messages_total",
                 "gateway_replay_overflows_total", "gateway_reattaches_total", "gateway_store_available",
                 "gateway_store_command_seconds", "gateway_store_errors_total",
                 "gateway_http_backend_round_trip_seconds", "gateway_http_backend_added_seconds",
                 "gateway_http_backend_requests_total"):
        assert name in used, f"{name} is on no panel"


def test_latency_panels_show_p50_and_p99_from_the_buckets():
    found = exprs(json.loads(DASHBOARD.read_text()))
    for name in ("gateway_http_backend_round_trip_seconds", "gateway_http_backend_added_seconds"):
        quantiles = {expr.split(",")[0] for _, expr in found
                     if f"{name}_bucket" in expr and expr.startswith("histogram_quantile(")}
        assert {"histogram_quantile(0.5", "histogram_quantile(0.99"} <= quantiles, (name, quantiles)


def test_metric_names_strips_histogram_series():
    assert metric_names('histogram_quantile(0.99, sum by (le) (rate(gateway_store_command_seconds_bucket[5m])))') \
        == {"gateway_store_command_seconds"}
