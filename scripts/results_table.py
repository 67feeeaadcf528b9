"""Run the attack suites and write docs/results.md from what they recorded.

    python scripts/results_table.py            # runs the suites, writes docs/results.md
    python scripts/results_table.py --junit F  # renders an existing junit XML instead

Each test in tests/chaos, tests/fuzz, tests/soak and tests/security records its row with
pytest's `record_property` (keys below); this script runs them with --junitxml, reads
the properties back and renders one table per kind. Nothing in the tables is typed by
hand: the totals are summed from the rows, and a test that records nothing still gets a
row with its outcome, so a missing figure shows as "—" instead of vanishing.
"""

from __future__ import annotations

import argparse
import datetime
import os
import subprocess
import sys
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
SUITES = ("tests/chaos", "tests/fuzz", "tests/soak", "tests/security")
OUT = ROOT / "docs" / "results.md"

FAULT_COLUMNS = ("fault", "load", "sent", "received", "lost", "duplicated", "other_sessions")
INPUT_COLUMNS = ("input", "cases", "expected", "failures", "other_sessions")
SOAK_COLUMNS = ("load", "cycles", "rss_mib_start", "rss_mib_end", "fds_start", "fds_end",
                "tasks_start", "tasks_end", "redis_keys_start", "redis_keys_end", "lost")
MISSING = "—"


@dataclass
class Row:
    test_id: str
    outcome: str                       # passed, failed, error, skipped, xfailed
    reason: str = ""
    props: dict[str, str] = field(default_factory=dict)

    @property
    def kind(self) -> str:
        if "fault" in self.props:
            return "faults"
        if "cycles" in self.props or "rss_mib_start" in self.props:
            return "soak"
        if "input" in self.props:
            return "inputs"
        return "unrecorded"


def parse_junit(text: str) -> list[Row]:
    """The rows of a pytest junit XML: one per testcase, its outcome and properties."""
    rows = []
    for case in ET.fromstring(text).iter("testcase"):
        test_id = f"{case.get('classname', '')}::{case.get('name', '')}".strip(":")
        outcome, reason = "passed", ""
        for tag in ("failure", "error", "skipped"):
            el = case.find(tag)
            if el is not None:
                reason = (el.get("message") or "").splitlines()[0] if el.get("message") else ""
                outcome = tag if tag != "failure" else "failed"
                if tag == "skipped" and (el.get("type") == "pytest.xfail" or "xfail" in reason.lower()):
                    outcome = "xfailed"
                break
        props = {p.get("name", ""): p.get("value", "") for p in case.iter("property")}
        rows.append(Row(test_id, outcome, reason, props))
    return rows


def _int(v: str | None) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def _cell(v: str | None) -> str:
    return MISSING if v in (None, "") else str(v).replace("|", "\\|").replace("\n", " ")


def _table(rows: list[Row], columns: tuple[str, ...]) -> list[str]:
    head = ("test", *columns, "outcome")
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in rows:
        outcome = r.outcome + (f" ({_cell(r.reason)})" if r.reason and r.outcome != "passed" else "")
        cells = [f"`{r.test_id}`", *(_cell(r.props.get(c)) for c in columns), outcome]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def _sum(rows: list[Row], key: str) -> tuple[int, int]:
    """(sum of the key over rows that recorded it, how many did not)."""
    values = [_int(r.props.get(key)) for r in rows]
    return sum(v for v in values if v is not None), sum(1 for v in values if v is None)


def render(rows: list[Row], *, date: str, commit: str, cores: int, command: str,
           missing_suites: tuple[str, ...] = ()) -> str:
    by_kind: dict[str, list[Row]] = {}
    for r in rows:
        by_kind.setdefault(r.kind, []).append(r)
    outcomes: dict[str, int] = {}
    for r in rows:
        outcomes[r.outcome] = outcomes.get(r.outcome, 0) + 1
    lost, lost_unknown = _sum(by_kind.get("faults", []) + by_kind.get("soak", []), "lost")
    dup, dup_unknown = _sum(by_kind.get("faults", []), "duplicated")
    cases, _ = _sum(by_kind.get("inputs", []), "cases")
    failures, fail_unknown = _sum(by_kind.get("inputs", []), "failures")

    out = ["# Results: faults, hostile inputs and soak",
           "",
           f"Generated {date} at commit `{commit}` on a {cores}-core machine by "
           f"`{command}`. Do not edit by hand; rerun the command.",
           "",
           "## Totals",
           "",
           f"- Tests: {len(rows)} ("
           + ", ".join(f"{n} {o}" for o, n in sorted(outcomes.items())) + ")",
           f"- Lost where a test failed: {_sum([r for r in by_kind.get('faults', []) + by_kind.get('soak', []) if r.outcome in ('failed', 'error')], 'lost')[0]} messages",
           f"- What was lost in all: {lost} messages"
           + (f" ({lost_unknown} rows did not count)" if lost_unknown else "")
           + f"; duplicated: {dup}" + (f" ({dup_unknown} rows did not count)" if dup_unknown else ""),
           f"- Hostile inputs tried: {cases}; answered other than expected: {failures}"
           + (f" ({fail_unknown} rows did not count)" if fail_unknown else ""),
           "",
           "A passing row's loss is the one its test allows for that fault, and the client is told by a",
           "close code: the in-flight tail when a process is killed, what a stalled hop or a backend",
           "that stops reading never took (1011, 1013). Everywhere the design promises no loss, the",
           "test asserts none, and the row's lost figure is 0.",
           ]
    for suite in missing_suites:
        out.append(f"- `{suite}`: not present at this commit")
    sections = (("faults", "Faults injected", FAULT_COLUMNS),
                ("inputs", "Hostile inputs", INPUT_COLUMNS),
                ("soak", "Soak and leaks", SOAK_COLUMNS))
    for kind, title, columns in sections:
        if by_kind.get(kind):
            out += ["", f"## {title}", "", *_table(by_kind[kind], columns)]
    if by_kind.get("unrecorded"):
        out += ["", "## Tests that recorded no row", "",
                *_table(by_kind["unrecorded"], ())]
    return "\n".join(out) + "\n"


def _git_commit() -> str:
    return subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=ROOT, check=True,
                          capture_output=True, text=True).stdout.strip()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--junit", type=Path, help="render this junit XML instead of running the suites")
    ap.add_argument("--out", type=Path, default=OUT)
    args = ap.parse_args(argv)
    present = tuple(s for s in SUITES if (ROOT / s).is_dir())
    missing = tuple(s for s in SUITES if s not in present)
    rc = 0
    if args.junit is None:
        fd, name = tempfile.mkstemp(suffix=".xml")
        os.close(fd)
        args.junit = Path(name)
        rc = subprocess.call([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider",
                              "-o", "junit_family=xunit1", f"--junitxml={args.junit}", *present],
                             cwd=ROOT)
    text = render(parse_junit(args.junit.read_text()),
                  date=datetime.date.today().isoformat(), commit=_git_commit(),
                  cores=os.cpu_count() or 0, command="python scripts/results_table.py",
                  missing_suites=missing)
    args.out.write_text(text)
    print(f"wrote {args.out} (pytest exit {rc})")
    return rc


if __name__ == "__main__":
    sys.exit(main())
