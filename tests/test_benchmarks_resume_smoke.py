"""Smoke tests of the drain/resume benchmark and the handshake profiler (benchmarks/).

Tiny sizes, no thresholds: every session drained off one node comes back on the
other, and the figures exist; the profiler's stack counting adds up.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.profile_handshake import top

ROOT = Path(__file__).resolve().parents[1]


def test_resume_benchmark_quick(tmp_path):
    if not shutil.which("node"):
        pytest.fail("node is required by the benchmark load generator (benchmarks/loadgen.js)")
    if not shutil.which("redis-server"):
        pytest.fail("redis-server is required (Debian/Ubuntu: apt-get install redis-server)")
    # The timeout only guards against a hung benchmark; it is not a performance threshold.
    proc = subprocess.run([sys.executable, "-m", "benchmarks.resume", "--sessions", "40", "--reps", "1",
                           "--out", str(tmp_path), "--port-base", "26400"], cwd=ROOT, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    r = json.loads((tmp_path / "resume.json").read_text())
    (rep,) = r["reps"]
    assert rep["new"]["opened"] == 40 and rep["new"]["b_us_per_session"] > 0
    res = rep["resume"]
    assert (res["resumed"], res["failed"], res["lost"]) == (40, 0, 0)
    assert res["close_codes"] == {"1012": 40}
    assert res["a_exit_code"] == 0
    assert 0 < res["first_close_s"] <= res["last_close_s"] <= res["last_resume_s"]
    assert len(res["resumed_at_s"]) == 40 and res["b_us_per_resume"] > 0 and res["a_us_per_drained"] > 0


def test_profile_counts_self_and_total(tmp_path):
    stacks = tmp_path / "stacks.txt"
    stacks.write_text("main (a/x.py:1);f (a/y.py:2) 3\nmain (a/x.py:1);f (a/y.py:3);g (a/y.py:9) 1\n")
    text = top(stacks, 5)
    assert text.startswith("4 samples")
    own, total = text.split("total %")
    assert "75.0  f y.py" in own and "25.0  g y.py" in own and "main" not in own
    assert "100.0  main x.py" in total and "100.0  f y.py" in total and "25.0  g y.py" in total
