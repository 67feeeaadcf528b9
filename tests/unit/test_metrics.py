"""gateway/metrics.py: the local books flush exactly what prometheus_client
would have counted itself (they write into its histogram's internals, so a
release that changes those must fail here)."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest

from gateway import metrics

BUCKETS = (.001, .01, .1, 1)
# On a bound, just off it, below the first, past the last, zero.
VALUES = (.001, .0010001, .0005, .05, .1, 2.5, 0.0, 1.0, 7.0)


def _pair(kind, name: str, **kw):
    reg = CollectorRegistry()
    direct = kind(name + "_direct", "d", ["k"], registry=reg, **kw)
    flushed = kind(name + "_flushed", "d", ["k"], registry=reg, **kw)
    return reg, direct, flushed


def _samples(reg, prefix: str) -> list[tuple[str, float]]:
    lines = generate_latest(reg).decode().splitlines()
    return sorted((line.split(" ")[0].replace(prefix, "X"), float(line.split(" ")[1])) for line in lines
                  if line.startswith(prefix) and "_created" not in line)


def test_local_histogram_flushes_what_observe_would_have_counted():
    reg, direct, flushed = _pair(Histogram, "t_seconds", buckets=BUCKETS)
    book = metrics.LocalHistogram(flushed, ("a",))
    for v in VALUES:
        direct.labels("a").observe(v)
        book.observe(v)
    assert not _samples(reg, "t_seconds_flushed")   # nothing until the flush: no child yet
    book.flush()
    assert _samples(reg, "t_seconds_flushed") == _samples(reg, "t_seconds_direct")
    # A second round adds to the first; an empty flush changes nothing.
    for v in VALUES[:3]:
        direct.labels("a").observe(v)
        book.observe(v)
    book.flush()
    book.flush()
    assert _samples(reg, "t_seconds_flushed") == _samples(reg, "t_seconds_direct")


def test_local_counter_flushes_the_difference():
    reg, direct, flushed = _pair(Counter, "c")
    book = metrics.LocalCounter(flushed, ("a",))
    book.n += 3
    direct.labels("a").inc(3)
    book.flush()
    book.flush()
    book.n += 2
    direct.labels("a").inc(2)
    book.flush()
    assert _samples(reg, "c_flushed") == _samples(reg, "c_direct")


def test_local_books_are_shared_per_label_set_and_flushed_at_scrape():
    book = metrics.local(metrics.http_added, "unit-test-backend")
    assert metrics.local(metrics.http_added, "unit-test-backend") is book
    assert metrics.local(metrics.http_added, "another") is not book
    child = metrics.http_added.labels("unit-test-backend")
    before = child._sum.get()
    book.observe(0.5)
    metrics.exposition()
    assert child._sum.get() - before == 0.5
