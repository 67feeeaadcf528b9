"""upstream.dial: one timeout over the connect and the upgrade; someone else's cancel stays a cancel."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.upstream import Endpoint, dial

from ..helpers import until


@pytest.fixture
def silent():
    """A listener that accepts TCP (the kernel does) but never answers the upgrade."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s
    s.close()


@pytest.fixture
def full_queue():
    """A listener whose accept queue is full: the kernel drops further SYNs, so a
    connect hangs in its retransmits, as one to a host that drops packets does."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(0)
    fillers = []
    for _ in range(4):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(s.getsockname())
        fillers.append(c)
    yield s, fillers
    for c in fillers:
        c.close()
    s.close()


@pytest.fixture
def full(full_queue):
    return full_queue[0]


# A hang guard, not a measure: far past the 0.2 s the dials here are given.
HANG_S = 10.0


def endpoint(sock) -> Endpoint:
    return Endpoint(f"ws://127.0.0.1:{sock.getsockname()[1]}/ws")


async def test_no_answer_to_the_upgrade_is_a_timeout(silent):
    task = asyncio.ensure_future(dial(endpoint(silent), "/ws", [], 0.2))
    # A hang guard that leaves the dial alone: if the dial's own 0.2 s timer does
    # not end it, it is still waiting on the peer here, and the test fails.
    await asyncio.wait({task}, timeout=HANG_S)
    if not task.done():
        task.cancel()
        raise AssertionError(f"the dial still waits on a peer that never answers, {HANG_S} s on")
    with pytest.raises(TimeoutError):
        task.result()
    # It had sent its upgrade (so the timer covered the wait for the answer, not
    # only the connect), and gave the connection up.
    silent.setblocking(False)
    conn, _ = silent.accept()
    with conn:
        conn.settimeout(HANG_S)
        got = conn.recv(4096)
        assert got.startswith(b"GET /ws HTTP/1.1\r\n") and got.endswith(b"\r\n\r\n")
        try:
            rest = conn.recv(4096)
        except ConnectionResetError:    # aborted: RST
            rest = b""
        assert rest == b""


async def test_a_connect_that_hangs_is_a_timeout(full):
    with pytest.raises(TimeoutError):
        await dial(endpoint(full), "/ws", [], 0.2)
    assert asyncio.current_task().cancelling() == 0   # the timer's cancel was taken back


def syn_sent_to(port: int, besides: set[int]) -> bool:
    """The kernel holds a socket in SYN_SENT (state 02) to 127.0.0.1:`port` from a
    local port not in `besides`: a connect that hangs in its retransmits."""
    with open("/proc/net/tcp") as f:
        rows = [line.split() for line in f.readlines()[1:]]
    return any(r[3] == "02" and int(r[2].split(":")[1], 16) == port
               and int(r[1].split(":")[1], 16) not in besides for r in rows)


async def upgrade_arrived(listener, got: bytearray) -> bool:
    """The dial's request head reached `listener` (accepted and read here)."""
    listener.setblocking(False)
    try:
        conn, _ = listener.accept()
    except BlockingIOError:
        return False
    with conn:
        conn.setblocking(False)
        for _ in range(100):
            try:
                got += conn.recv(4096)
            except BlockingIOError:
                pass
            if b"\r\n\r\n" in got:
                return True
            await asyncio.sleep(0)
    return b"\r\n\r\n" in got


@pytest.mark.parametrize("fixture", ["silent", "full"])
async def test_someone_elses_cancel_stays_a_cancel(request, fixture):
    sock = request.getfixturevalue(fixture)
    port = sock.getsockname()[1]
    task = asyncio.ensure_future(dial(endpoint(sock), "/ws", [], 30))
    # Cancel only once the dial waits where the test says: on the peer's answer
    # to its upgrade (silent), or on a connect the kernel is still retrying (full).
    if fixture == "silent":
        got = bytearray()
        await until(lambda: upgrade_arrived(sock, got), what="the upgrade request at the silent peer")
        assert got.startswith(b"GET /ws HTTP/1.1\r\n")
    else:
        fillers = {c.getsockname()[1] for c in request.getfixturevalue("full_queue")[1]}
        await until(lambda: asyncio.sleep(0, syn_sent_to(port, fillers)), what="the dial's SYN pending")
    assert not task.done()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
