"""scripts/results_table.py: its junit reading and rendering, and that the committed
docs/results.md is its output (a named commit that exists, totals that match the rows)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path


ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
import results_table  # noqa: E402

JUNIT = """<?xml version="1.0" encoding="utf-8"?>
<testsuites><testsuite name="pytest" tests="5">
 <testcase classname="tests.chaos.test_kill" name="test_kill_9">
  <properties><property name="fault" value="kill -9 node 1"/><property name="load" value="20 x 500"/>
   <property name="sent" value="10000"/><property name="received" value="9990"/>
   <property name="lost" value="3"/><property name="duplicated" value="0"/>
   <property name="other_sessions" value="unaffected"/></properties>
 </testcase>
 <testcase classname="tests.chaos.test_redis" name="test_redis_restart">
  <properties><property name="fault" value="redis | restart"/><property name="lost" value="not counted"/></properties>
  <failure message="AssertionError: boom&#10;second line">trace</failure>
 </testcase>
 <testcase classname="tests.fuzz.test_frames" name="test_rsv">
  <properties><property name="input" value="RSV1 set"/><property name="cases" value="40"/>
   <property name="expected" value="close 1002"/><property name="failures" value="1"/></properties>
  <skipped type="pytest.xfail" message="known: rsv bits"/>
 </testcase>
 <testcase classname="tests.soak.test_soak" name="test_cycles">
  <properties><property name="load" value="connect/send/close"/><property name="cycles" value="5000"/>
   <property name="rss_mib_start" value="40.1"/><property name="rss_mib_end" value="41.0"/>
   <property name="lost" value="2"/></properties>
 </testcase>
 <testcase classname="tests.security.test_x" name="test_plain"/>
</testsuite></testsuites>
"""


def test_rows_carry_outcome_reason_and_properties():
    rows = results_table.parse_junit(JUNIT)
    assert [(r.test_id, r.outcome, r.kind) for r in rows] == [
        ("tests.chaos.test_kill::test_kill_9", "passed", "faults"),
        ("tests.chaos.test_redis::test_redis_restart", "failed", "faults"),
        ("tests.fuzz.test_frames::test_rsv", "xfailed", "inputs"),
        ("tests.soak.test_soak::test_cycles", "passed", "soak"),
        ("tests.security.test_x::test_plain", "passed", "unrecorded"),
    ]
    assert rows[1].reason == "AssertionError: boom"
    assert rows[0].props["sent"] == "10000"


def test_render_sums_what_the_rows_counted_and_marks_what_they_did_not():
    text = results_table.render(results_table.parse_junit(JUNIT), date="2026-12-02", commit="abc",
                                cores=2, command="cmd", missing_suites=("tests/nothing",))
    assert "- Tests: 5 (1 failed, 3 passed, 1 xfailed)" in text
    # 3 (chaos) + 2 (soak); the chaos row with "not counted" is said, not summed as 0
    assert "- What was lost in all: 5 messages (1 rows did not count); duplicated: 0 (1 rows did not count)" in text
    assert "- Lost where a test failed: 0 messages" in text     # the failed row counted nothing
    assert "- Hostile inputs tried: 40; answered other than expected: 1" in text
    assert "`tests/nothing`: not present" in text
    assert "redis \\| restart" in text                     # a pipe cannot break the table
    assert "| — |" in text                                 # a figure not recorded is a dash
    assert "xfailed (known: rsv bits)" in text
    assert "## Tests that recorded no row" in text
    for section in ("## Faults injected", "## Hostile inputs", "## Soak and leaks"):
        assert section in text


def test_the_committed_results_were_written_by_the_script():
    path = ROOT / "docs" / "results.md"
    text = path.read_text()
    m = re.search(r"at commit `([0-9a-f]{7,40})`", text)
    assert m, "the header names the commit it ran at"
    subprocess.run(["git", "cat-file", "-e", m.group(1) + "^{commit}"], cwd=ROOT, check=True)
    assert "by `python scripts/results_table.py`" in text
    # the totals line agrees with the rows below it
    rows = [line for line in text.splitlines() if line.startswith("| `")]
    total = int(re.search(r"- Tests: (\d+)", text).group(1))
    assert total == len(rows)
