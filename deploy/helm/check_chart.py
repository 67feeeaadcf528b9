#!/usr/bin/env python3
"""Check the gateway Helm chart without the helm binary.

Always: every non-template YAML file of the chart parses, Chart.yaml has the
required keys, and every template's {{ }} actions balance.
When Go and the Debian sprig/yaml packages are present (apt-get install
golang-go golang-github-masterminds-sprig-dev golang-gopkg-yaml.v2-dev), it
also renders the chart with render/main.go for a few value sets, parses every
rendered manifest, runs `gateway check` on the rendered routes.yaml when
`gateway` is on PATH, and checks that broken values fail the render.

    python3 deploy/helm/check_chart.py
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import yaml

HERE = Path(__file__).resolve().parent
CHART = HERE / "gateway"
RENDER = HERE / "render" / "main.go"

SCENARIOS = {
    "defaults": [],
    "everything on": ["--set", "metrics.serviceMonitor.enabled=true", "--set", "autoscaling.enabled=true",
                      "--set", "workers=auto", "--set", "drain.timeoutSeconds=30",
                      "--set", "podDisruptionBudget.maxUnavailable=1",
                      "--set", "adminToken={create: false, existingSecret: gw-admin}",
                      "--set", "config.listen.port=8000", "--set", "config.admin.port=9100",
                      "--set", "topologySpreadConstraints=[{maxSkew: 1, topologyKey: zone, "
                               "whenUnsatisfiable: ScheduleAnyway}]",
                      "--set", "extraEnv=[{name: JWT_SECRET, valueFrom: {secretKeyRef: {name: jwt, key: s}}}]"],
}
MUST_FAIL = {
    "no admin token": ["--set", "adminToken.create=false"],
    "loopback admin": ["--set", "config.admin.host=127.0.0.1"],
    "drain disagrees": ["--set", "config.drain={timeout_s: 10}"],
}

problems: list[str] = []


def problem(msg: str) -> None:
    problems.append(msg)
    print("FAIL", msg)


def check_static() -> None:
    for path in sorted(CHART.rglob("*.yaml")):
        if "templates" in path.parts:
            continue
        try:
            yaml.safe_load(path.read_text())
        except yaml.YAMLError as exc:
            problem(f"{path}: {exc}")
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    for key, want in (("apiVersion", "v2"), ("name", "gateway"), ("version", "0.1.0"), ("appVersion", "0.1.0")):
        if str(meta.get(key)) != want:
            problem(f"Chart.yaml: {key} is {meta.get(key)!r}, want {want!r}")
    for path in sorted((CHART / "templates").iterdir()):
        text = path.read_text()
        depth = 0
        for m in re.finditer(r"\{\{|\}\}", text):
            depth += 1 if m.group() == "{{" else -1
            if depth not in (0, 1):
                line = text.count("\n", 0, m.start()) + 1
                problem(f"{path.name}:{line}: unbalanced template braces")
                break
        else:
            if depth:
                problem(f"{path.name}: {depth} unclosed '{{{{'")
        for n, line in enumerate(text.splitlines(), 1):
            if "\t" in line:
                problem(f"{path.name}:{n}: tab character")
    print("static checks done")


def render(binary: str, args: list[str]) -> subprocess.CompletedProcess:
    return subprocess.run([binary, str(CHART), *args], capture_output=True, text=True)


def check_rendered(binary: str) -> None:
    for name, args in SCENARIOS.items():
        out = render(binary, args)
        if out.returncode:
            problem(f"render {name}: {out.stderr.strip()}")
            continue
        docs = [d for d in yaml.safe_load_all(out.stdout) if d]
        kinds = sorted(d["kind"] for d in docs)
        dep = next(d for d in docs if d["kind"] == "Deployment")
        cfg_text = next(d for d in docs if d["kind"] == "ConfigMap")["data"]["routes.yaml"]
        cfg = yaml.safe_load(cfg_text)
        pod = dep["spec"]["template"]["spec"]
        grace = pod["terminationGracePeriodSeconds"]
        if grace <= cfg["drain"]["timeout_s"]:
            problem(f"{name}: terminationGracePeriodSeconds {grace} <= drain.timeout_s {cfg['drain']['timeout_s']}")
        ports = {p["name"]: p["containerPort"] for p in pod["containers"][0]["ports"]}
        if ports != {"ws": cfg["listen"]["port"], "admin": cfg["admin"]["port"]}:
            problem(f"{name}: container ports {ports} do not follow the config")
        if "checksum/config" not in dep["spec"]["template"]["metadata"]["annotations"]:
            problem(f"{name}: no checksum/config annotation")
        gateway = shutil.which("gateway")
        if gateway:
            with tempfile.NamedTemporaryFile("w", suffix=".yaml", delete=False) as f:
                f.write(cfg_text)
            res = subprocess.run([gateway, "check", f.name], capture_output=True, text=True)
            os.unlink(f.name)
            if res.returncode:
                problem(f"{name}: gateway check: {res.stdout}{res.stderr}")
        print(f"render {name}: ok {kinds}" + ("" if gateway else " (gateway not on PATH: config not checked)"))
    for name, args in MUST_FAIL.items():
        out = render(binary, args)
        if out.returncode == 0:
            problem(f"render {name}: should have failed")
        else:
            print(f"render {name}: refused as it should")


def main() -> int:
    check_static()
    go = shutil.which("go")
    if go and Path("/usr/share/gocode/src/github.com/Masterminds/sprig").is_dir():
        with tempfile.TemporaryDirectory() as tmp:
            binary = os.path.join(tmp, "render")
            env = dict(os.environ, GO111MODULE="off", GOPATH="/usr/share/gocode",
                       GOCACHE=os.path.join(tmp, "cache"))
            res = subprocess.run([go, "build", "-o", binary, str(RENDER)], env=env, capture_output=True, text=True)
            if res.returncode:
                problem(f"building the renderer: {res.stderr}")
            else:
                check_rendered(binary)
    else:
        print("go or sprig missing: templates not rendered (static checks only)")
    print(f"{len(problems)} problem(s)")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
