"""Oversized request heads (SECURITY.md, "Limits"): a head over 16 KiB (one huge
header, a huge request line, or one that never ends) or with more than 100 header
lines is refused 431 before it is parsed, and the gateway serves on."""

from __future__ import annotations

import aiohttp

from gateway import http1

from .support import exchange, record, upgrade

BIG = http1.MAX_HEAD_BYTES


def cases() -> list[tuple[str, bytes, int | None, int]]:
    """(what, bytes, the status wanted, writes to send it in)."""
    return [
        ("one 20 KiB header", upgrade("/ws", extra=[("X-Big", "a" * (20 << 10))]), 431, 1),
        ("one 1 MiB header", upgrade("/ws", extra=[("X-Big", "a" * (1 << 20))]), 431, 1),
        ("one 20 KiB header, in 40 writes", upgrade("/ws", extra=[("X-Big", "a" * (20 << 10))]), 431, 40),
        ("a 20 KiB request line", upgrade("/ws/" + "a" * (20 << 10)), 431, 1),
        ("a 20 KiB query", upgrade("/ws?x=" + "a" * (20 << 10)), 431, 1),
        ("200 small headers", upgrade("/ws", extra=[(f"X-{i}", "v") for i in range(200)]), 431, 1),
        ("96 headers (101 lines)", upgrade("/ws", extra=[(f"X-{i}", "v") for i in range(96)]), 431, 1),
        ("95 headers (100 lines)", upgrade("/ws", extra=[(f"X-{i}", "v") for i in range(95)]), 101, 1),
        # (in two headers: the aiohttp backend's own limit is 8190 bytes a header line)
        ("a head just under the limit", upgrade("/ws", extra=[("X-Big1", "a" * 8000),
                                                                ("X-Big2", "a" * (BIG - 8400))]), 101, 1),
        ("20 KiB with no end of head", b"GET /ws HTTP/1.1\r\nX-A: " + b"a" * (20 << 10), 431, 1),
        ("10,000 empty-valued headers", upgrade("/ws", extra=[("X", "")] * 10_000), 431, 1),
    ]


async def test_oversized_heads_are_431_and_the_gateway_survives(gateway, backend, record_property):
    b = await backend()
    gw = await gateway({"backends": {"b": {"type": "websocket", "endpoints": [b.url]}},
                        "routes": [{"name": "r", "match": {"path_prefix": "/ws"}, "auth": "none", "backend": "b"}]})
    failures = []
    all_cases = cases()
    for what, data, want, writes in all_cases:
        before = len(b.requests)
        a = await exchange(gw.ports[0], data, chunks=writes)
        a.close()
        if a.status != want:
            failures.append(f"{what}: {a.status}, wanted {want}")
        if want == 431 and len(b.requests) != before:
            failures.append(f"{what}: refused, yet it reached the backend")
    # Survives: a normal upgrade and the admin listener still answer.
    ok = await exchange(gw.ports[0], upgrade("/ws"))
    ok.close()
    if ok.status != 101:
        failures.append(f"a normal upgrade afterwards: {ok.status}")
    async with aiohttp.ClientSession() as http:
        async with http.get(gw.admin_url + "/healthz") as r:
            if r.status != 200:
                failures.append(f"/healthz afterwards: {r.status}")
    record(record_property, "one huge header, huge request line/query, many headers, an endless head",
           len(all_cases) + 2, "431 (101 just under the limits); the gateway serves on", failures)
    assert not failures, failures
