"""The admin page's Prometheus text parser (gateway/adminui/prom.mjs), under `node --test`."""

from __future__ import annotations

import pathlib
import re
import subprocess

from .conftest import node_path

HERE = pathlib.Path(__file__).resolve().parent


def test_prometheus_parser_under_node():
    r = subprocess.run([node_path(), "--test", str(HERE / "prom.test.mjs")], capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr
    passed = re.search(r"^# pass (\d+)$", r.stdout, re.M)
    assert "# fail 0" in r.stdout and passed and int(passed.group(1)) >= 9, r.stdout
