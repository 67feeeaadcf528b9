"""Counting what each side of a numbered stream saw, for the chaos tests' rows.

A stream is "p1", "p2", ... as numbered.py sends it. `tally` counts, never assumes:
received is what arrived, duplicated what arrived more than once, lost the numbers
sent that never arrived. `Row` sums the streams of a test and records them with
pytest's `record_property` (scripts/results_table.py reads them from the junit XML).
"""

from __future__ import annotations

import os

SCALE = max(1, int(os.environ.get("CHAOS_SCALE", "1")))


def numbers(prefix: str, seen: list[str]) -> list[int]:
    return [int(m[len(prefix):]) for m in seen if m.startswith(prefix)]


def tally(prefix: str, sent: int, seen: list[str]) -> tuple[int, int, int]:
    """(received, lost, duplicated) of the stream prefix1..prefix<sent> as `seen`."""
    got = numbers(prefix, seen)
    distinct = set(got)
    return len(got), len(set(range(1, sent + 1)) - distinct), len(got) - len(distinct)


def in_order(prefix: str, seen: list[str]) -> None:
    """Strictly increasing: no reordering and no duplicate (gaps are allowed)."""
    got = numbers(prefix, seen)
    bad = [i for i in range(1, len(got)) if got[i] <= got[i - 1]]
    assert not bad, f"{prefix!r} stream out of order or doubled at {bad[:3]}: {got[max(0, bad[0] - 3):bad[0] + 3]}"


class Row:
    def __init__(self, record_property, fault: str, load: str):
        self.record = record_property
        self.fault, self.load = fault, load
        self.sent = self.received = self.lost = self.duplicated = 0

    def add(self, prefix: str, sent: int, seen: list[str]) -> tuple[int, int, int]:
        received, lost, duplicated = tally(prefix, sent, seen)
        self.sent += sent
        self.received += received
        self.lost += lost
        self.duplicated += duplicated
        return received, lost, duplicated

    def done(self, other_sessions: str) -> None:
        for k, v in (("fault", self.fault), ("load", self.load), ("sent", self.sent),
                     ("received", self.received), ("lost", self.lost),
                     ("duplicated", self.duplicated), ("other_sessions", other_sessions)):
            self.record(k, v)
