"""Smoke test of the benchmark harness (benchmarks/, see BENCHMARKS.md).

Runs ``python -m benchmarks.run --quick`` (tiny sizes, one repetition) against
direct, naive proxy and gateway, plus nginx/haproxy when their binaries exist,
and checks the structure of the result JSON. No timing is asserted: the figures
are only required to exist and to be positive.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCENARIOS = ["idle", "connrate", "tput_d1_64B", "tput_d10_64B", "tput_d1_4096B", "tput_d10_4096B", "rate"]


def _targets() -> list[str]:
    targets = ["direct", "naive", "gateway"]
    targets += [name for name, binary in (("nginx", "/usr/sbin/nginx"), ("haproxy", "/usr/sbin/haproxy"))
                if os.access(binary, os.X_OK)]
    return targets


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    if not shutil.which("node"):
        pytest.fail("node is required by the benchmark load generator (benchmarks/loadgen.js)")
    out = tmp_path_factory.mktemp("bench")
    cmd = [sys.executable, "-m", "benchmarks.run", "--quick", "--targets", ",".join(_targets()),
           "--out", str(out), "--port-base", "26000"]  # apart from the default ports of a full run
    # The timeout only guards against a hung harness; it is not a performance threshold.
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"harness failed:\n{proc.stdout}\n{proc.stderr[-5000:]}"
    assert (out / "latest.md").read_text().startswith("| Figure |")
    return json.loads((out / "latest.json").read_text())


def test_every_target_present(report):
    assert set(report["targets"]) == set(_targets())
    assert set(report["summary"]) == set(_targets())
    assert "not implemented yet" in report["not_implemented"]["fanout"]


@pytest.mark.parametrize("target", _targets())
def test_target_measured(report, target):
    if target == "gateway" and not (ROOT / "gateway" / "__main__.py").exists():
        assert not report["targets"]["gateway"]["available"]
        pytest.skip("gateway not available yet")
    assert report["targets"][target]["available"], report["targets"][target]["reason"]
    runs = report["runs"][target]
    for key in SCENARIOS:
        assert key in runs, key
        for run in runs[key]:
            assert "error" not in run, f"{target}/{key}: {run.get('error')}"
    for key in SCENARIOS:
        if key.startswith("tput") or key == "rate":
            for run in runs[key]:
                assert run["sent"] > 0 and run["received"] > 0
                assert run["relayed"] == run["sent"] + run["received"]
                assert run["msgs_per_s"] > 0
                assert 0 < run["p50_ms"] <= run["p99_ms"] <= run["p999_ms"]
                if target != "direct":
                    assert run["proxy_us_per_msg"] >= 0
    assert all(r["opened"] > 0 for r in runs["connrate"])
    assert all(r["sessions"] == report["sizes"]["idle"]["conns"] for r in runs["idle"])
    if target != "direct":
        assert all(r["rss_after_kb"] > 0 for r in runs["idle"])
    summary = report["summary"][target]
    assert summary["tput_d10_64B"]["msgs_per_s"]["median"] > 0
