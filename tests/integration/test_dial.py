"""upstream.dial: one timeout over the connect and the upgrade; someone else's cancel stays a cancel."""

from __future__ import annotations

import asyncio
import socket

import pytest

from gateway.upstream import Endpoint, dial


@pytest.fixture
def silent():
    """A listener that accepts TCP (the kernel does) but never answers the upgrade."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(8)
    yield s
    s.close()


@pytest.fixture
def full():
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
    yield s
    for c in fillers:
        c.close()
    s.close()


def endpoint(sock) -> Endpoint:
    return Endpoint(f"ws://127.0.0.1:{sock.getsockname()[1]}/ws")


async def test_no_answer_to_the_upgrade_is_a_timeout(silent):
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await dial(endpoint(silent), "/ws", [], 0.2)
    assert loop.time() - started < 5   # bounded, not waiting on the peer


async def test_a_connect_that_hangs_is_a_timeout(full):
    with pytest.raises(TimeoutError):
        await dial(endpoint(full), "/ws", [], 0.2)
    assert asyncio.current_task().cancelling() == 0   # the timer's cancel was taken back


@pytest.mark.parametrize("fixture", ["silent", "full"])
async def test_someone_elses_cancel_stays_a_cancel(request, fixture):
    sock = request.getfixturevalue(fixture)
    task = asyncio.ensure_future(dial(endpoint(sock), "/ws", [], 30))
    await asyncio.sleep(0.1)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
