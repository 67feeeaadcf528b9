"""Python time per relayed message in the relay alone: fake transports, no sockets.

    python -m benchmarks.relay_micro                       # this checkout
    python -m benchmarks.relay_micro --tree /tmp/before    # another one (git worktree): A/B

The harness's CPU figures are three quarters kernel time (loopback TCP) and
move by +-10 % between runs on a shared machine; a change to the relay's
Python is a few per cent of that. This measures only the two relay
functions: a 64-byte masked text frame from the client, a 64-byte text frame
from the upstream, N times each, best of R rounds. Rate-limited: a token
bucket so large it never refuses.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path


class FakeTransport:
    """Just what the relay calls on a transport; writes are counted, not sent."""

    def __init__(self):
        self.protocol = None
        self.writes = 0

    def write(self, data) -> None:
        self.writes += 1

    def get_write_buffer_size(self) -> int:
        return 0

    def is_closing(self) -> bool:
        return False

    def set_protocol(self, protocol) -> None:
        self.protocol = protocol

    def set_write_buffer_limits(self, high=None, low=None) -> None:
        pass

    def get_extra_info(self, name, default=None):
        return ("127.0.0.1", 1) if name == "peername" else default

    def pause_reading(self) -> None:
        pass

    def resume_reading(self) -> None:
        pass

    def close(self) -> None:
        pass

    def abort(self) -> None:
        pass


class FakeNode:
    def __init__(self, loop, limits):
        from gateway import session

        self.loop = loop
        self.limits = limits
        if hasattr(session, "LiveLimits"):
            self.live_limits = session.LiveLimits.of(limits)
        self.tick_s, self.idle_ticks, self.ping_ticks = 30.0, 1 << 62, 0  # before LiveLimits

    def count_rate_limited(self, s) -> None:
        pass


def live_session(node, client, upstream, rate_limited: bool):
    from gateway import relay
    from gateway.session import State

    if "transport" in relay.Session.__init__.__code__.co_varnames:
        s = relay.Session(node, client)
        s.state = State.CONNECTING
        s.go_live(b"", upstream)
    else:  # the API before the handshake left the relay (commit ce972c8)
        from gateway.auth import TokenBucket

        s = relay.Session(node)
        s.transport = client
        s.state = State.CONNECTING
        if rate_limited:
            s.bucket = TokenBucket(node.limits.messages_per_second, node.limits.burst)
        s.upgraded(b"", upstream, b"")
    return s


async def measure(n: int, rounds: int, rate_limited: bool) -> float:
    from gateway import config, frames

    limits = config.Limits(messages_per_second=1e12, burst=10**12) if rate_limited else config.Limits()
    node = FakeNode(asyncio.get_running_loop(), limits)
    client, upstream = FakeTransport(), FakeTransport()
    live_session(node, client, upstream, rate_limited)
    from_client = client.protocol.data_received
    from_upstream = upstream.protocol.data_received
    cmsg = frames.frame(frames.OP_TEXT, b"x" * 64, mask=True)
    umsg = frames.frame(frames.OP_TEXT, b"x" * 64)
    best = float("inf")
    for _ in range(rounds):
        t0 = time.perf_counter()
        for _ in range(n):
            from_client(cmsg)
            from_upstream(umsg)
        best = min(best, time.perf_counter() - t0)
    if upstream.writes < n or client.writes < n:
        raise RuntimeError(f"messages were not relayed ({upstream.writes}, {client.writes} of {n})")
    return best / (2 * n) * 1e9


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.relay_micro", description=__doc__.splitlines()[0])
    p.add_argument("--tree", type=Path, help="the gateway source tree to measure (default: this checkout)")
    p.add_argument("-n", type=int, default=200_000, help="messages each way per round")
    p.add_argument("--rounds", type=int, default=5)
    args = p.parse_args(argv)
    if args.tree is not None:
        sys.path.insert(0, str(args.tree.resolve()))
    for rate_limited in (False, True):
        ns = asyncio.run(measure(args.n, args.rounds, rate_limited))
        print(f"{'rate-limited' if rate_limited else 'transparent'}: {ns:.0f} ns per relayed message")
    return 0


if __name__ == "__main__":
    sys.exit(main())
