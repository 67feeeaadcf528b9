"""Smoke tests of the cluster benchmark and the relay micro-benchmark (benchmarks/).

Tiny sizes, no thresholds: they keep the scripts from rotting and check that the
figures they report exist and add up (every push delivered, every subscriber
reached, commands counted).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def test_cluster_benchmark_quick(tmp_path):
    out = tmp_path / "cluster.json"
    # The timeout only guards against a hung harness; it is not a performance threshold.
    proc = subprocess.run([sys.executable, "-m", "benchmarks.cluster", "--quick", "--out", str(out)], cwd=ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads(out.read_text())
    for inflight in ("inflight_1", "inflight_16"):
        c = r["crossnode"][inflight]
        assert c["lost"] == 0 and c["calls_per_s"] > 0 and c["api_p99_ms"] >= c["api_p50_ms"] > 0
    for rnd in r["fanout"]["rounds"]:
        assert rnd["delivered"] == rnd["received"] == r["fanout"]["subscribers"]
    assert r["rest"]["commands"] > 0 and r["rest"]["per_session_per_minute"] > 0


def test_relay_micro_benchmark_runs():
    proc = subprocess.run([sys.executable, "-m", "benchmarks.relay_micro", "-n", "2000", "--rounds", "1"],
                          cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "transparent:" in proc.stdout and "rate-limited:" in proc.stdout
