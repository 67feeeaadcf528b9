"""The chart's PrometheusRule, rendered by the real helm: every alert names
only metrics (and labels) the gateway exports, parses as PromQL, links to an
entry of docs/runbook.md that exists, and every runbook entry says what the
alert means, what to check and what to do."""

from __future__ import annotations

import re
from pathlib import Path

import prometheus_client
import promql_parser
import pytest
import yaml

from .test_dashboard import exported, metric_names
from .test_helm import _one, _template, helm  # noqa: F401  (helm: the fixture)

RUNBOOK = Path(__file__).resolve().parent.parent / "docs" / "runbook.md"
# What the issue asks alerts for, each by the alert that covers it.
REQUIRED = {"GatewayRedisUnreachable", "GatewayReplayOverflow", "GatewayResumeFailures",
            "GatewayConfigReloadFailed", "GatewayDrainStuck", "GatewayHandshakeRefusalSpike"}
PARTS = ("What it means", "What to check", "What to do")
# Labels Prometheus adds at scrape time (ServiceMonitor), not the gateway.
TARGET_LABELS = {"job", "namespace", "pod", "instance", "service", "endpoint", "container", "le"}
SELECTOR = re.compile(r"\b(gateway_[a-zA-Z0-9_]*)\{([^}]*)\}")
MATCHER = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)\s*(=~|!~|!=|=)\s*"((?:[^"\\]|\\.)*)"')


def _render(helm, tmp_path, values: dict) -> dict:
    proc = _template(helm, tmp_path, "rule", values)
    assert proc.returncode == 0, proc.stderr
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return {"rule": _one(docs, "PrometheusRule"), "docs": docs}


@pytest.fixture(scope="module")
def rendered(helm, tmp_path_factory):
    return _render(helm, tmp_path_factory.mktemp("alerts"), {"prometheusRule": {"enabled": True}})


def alerts(rule: dict) -> list[dict]:
    return [r for g in rule["spec"]["groups"] for r in g["rules"] if "alert" in r]


def slug(heading: str) -> str:
    """The anchor GitHub (and most Markdown renderers) give a heading."""
    s = heading.strip().lower()
    s = re.sub(r"[^\w\- ]", "", s)
    return s.replace(" ", "-")


def runbook_entries() -> dict[str, str]:
    """Anchor -> text of each `## ` section of docs/runbook.md."""
    out = {}
    for section in re.split(r"^## ", RUNBOOK.read_text(), flags=re.M)[1:]:
        heading, _, body = section.partition("\n")
        out[slug(heading)] = body
    return out


def labelnames() -> dict[str, set[str]]:
    """Exported name (as PromQL names it) -> its label names."""
    out = {}
    for collector in list(prometheus_client.REGISTRY._collector_to_names):
        names = getattr(collector, "_labelnames", None)
        if names is None or not getattr(collector, "_name", "").startswith("gateway_"):
            continue
        name = collector._name + ("_total" if collector._type == "counter" else "")
        out[name] = set(names)
    return out


def test_the_rule_is_off_by_default_and_on_when_asked(rendered, helm, tmp_path):
    proc = _template(helm, tmp_path, "defaults", {})
    assert proc.returncode == 0, proc.stderr
    assert not [d for d in yaml.safe_load_all(proc.stdout) if d and d["kind"] == "PrometheusRule"]
    rule = rendered["rule"]
    assert rule["apiVersion"] == "monitoring.coreos.com/v1"
    assert rule["metadata"]["namespace"] == "gw"
    assert REQUIRED <= {a["alert"] for a in alerts(rule)}


def test_every_alert_names_only_exported_metrics_and_their_labels(rendered):
    known = exported()
    labels = labelnames()
    for a in alerts(rendered["rule"]):
        expr = a["expr"]
        names = metric_names(expr)
        assert names, f"{a['alert']}: names no gateway metric"
        unknown = names - known
        assert not unknown, f"{a['alert']} names metrics the gateway does not export: {sorted(unknown)}"
        for name, matchers in SELECTOR.findall(expr):
            family = next(n for n in metric_names(name))
            for label, _, _ in MATCHER.findall(matchers):
                assert label in TARGET_LABELS or label in labels.get(family, set()), \
                    f"{a['alert']}: {family} has no label {label!r} (it has {sorted(labels.get(family, ()))})"
        assert {"summary", "description", "runbook_url"} <= set(a["annotations"]), a["alert"]
        assert a["labels"]["severity"] in ("critical", "warning"), a["alert"]


def test_alert_expressions_parse_as_promql(rendered):
    for a in alerts(rendered["rule"]):
        try:
            promql_parser.parse(a["expr"])
        except ValueError as exc:
            raise AssertionError(f"{a['alert']}: not valid PromQL ({exc}): {a['expr']}") from None


def test_every_alert_links_to_a_runbook_entry_that_exists(rendered):
    entries = runbook_entries()
    names = {a["alert"] for a in alerts(rendered["rule"])}
    for a in alerts(rendered["rule"]):
        url = a["annotations"]["runbook_url"]
        base, _, anchor = url.partition("#")
        assert base == "docs/runbook.md", url
        assert anchor in entries, f"{a['alert']}: {url} has no heading in docs/runbook.md"
    # ...and no entry for an alert that is gone.
    assert {slug(n) for n in names} == {k for k in entries if k.startswith("gateway")}


def test_every_runbook_entry_says_what_it_means_what_to_check_what_to_do():
    entries = {k: v for k, v in runbook_entries().items() if k.startswith("gateway")}
    assert len(entries) >= len(REQUIRED)
    for anchor, body in entries.items():
        found = [body.find(f"**{part}.**") for part in PARTS]
        assert all(i >= 0 for i in found), f"#{anchor}: want {PARTS}, found {dict(zip(PARTS, found))}"
        assert found == sorted(found), f"#{anchor}: the parts are out of order"
        for i, start in enumerate(found):
            end = found[i + 1] if i + 1 < len(found) else len(body)
            assert len(body[start:end].split()) > 8, f"#{anchor}: {PARTS[i]} is empty"


def test_knobs(helm, tmp_path):
    out = _render(helm, tmp_path, {"prometheusRule": {
        "enabled": True, "namespace": "monitoring", "labels": {"release": "prom"},
        "alertLabels": {"team": "edge"}, "runbookBaseUrl": "https://git.example.com/gw/blob/main/docs/runbook.md/",
        "selector": 'job="gw"', "disabled": ["GatewayHttpBackendErrors"], "handshakeRefusalRatio": 0.5,
        "additionalRules": [{"record": "gateway:sessions_open:sum", "expr": "sum(gateway_sessions_open)"}]},
        "drain": {"timeoutSeconds": 100, "announceSeconds": 10}})
    rule = out["rule"]
    assert rule["metadata"]["namespace"] == "monitoring" and rule["metadata"]["labels"]["release"] == "prom"
    by_name = {a["alert"]: a for a in alerts(rule)}
    assert "GatewayHttpBackendErrors" not in by_name
    assert by_name["GatewayRedisUnreachable"]["annotations"]["runbook_url"] == \
        "https://git.example.com/gw/blob/main/docs/runbook.md#gatewayredisunreachable"
    assert all(a["labels"]["team"] == "edge" for a in by_name.values())
    assert all('{job="gw"' in a["expr"] or '{job="gw",' in a["expr"] for a in by_name.values())
    assert "> 0.5" in by_name["GatewayHandshakeRefusalSpike"]["expr"]
    # A node is stuck once it drained longer than the grace period the Deployment renders.
    grace = _one(out["docs"], "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"]
    assert grace == 10 + 100 + 15
    assert by_name["GatewayDrainStuck"]["for"] == f"{grace}s"
    assert [r for g in rule["spec"]["groups"] for r in g["rules"] if r.get("record")] == \
        [{"record": "gateway:sessions_open:sum", "expr": "sum(gateway_sessions_open)"}]


def test_default_selector_is_what_the_servicemonitor_scrape_gives(rendered, helm, tmp_path):
    proc = _template(helm, tmp_path, "sm", {"metrics": {"serviceMonitor": {"enabled": True}}})
    docs = [d for d in yaml.safe_load_all(proc.stdout) if d]
    admin = _one(docs, "Service", "edge-gateway-admin")
    assert _one(docs, "ServiceMonitor")["spec"]["endpoints"][0]["port"] == "admin"
    # Prometheus Operator names the job after the scraped Service.
    for a in alerts(rendered["rule"]):
        assert f'job="{admin["metadata"]["name"]}",namespace="gw"' in a["expr"], a["alert"]


@pytest.mark.parametrize("values, message", [
    ({"prometheusRule": {"enabled": True, "runbookBaseUrl": ""}}, "/prometheusRule/runbookBaseUrl"),
    ({"prometheusRule": {"enabled": True, "handshakeRefusalRatio": 2}}, "/prometheusRule/handshakeRefusalRatio"),
    ({"prometheusRule": {"enabled": True, "runbookBaseURL": "x"}}, "'runbookBaseURL' not allowed"),
])
def test_bad_values_fail_the_render(helm, tmp_path, values, message):
    proc = _template(helm, tmp_path, "bad", values)
    assert proc.returncode != 0
    assert message in proc.stderr, proc.stderr
