"""Drives one or more ``loadgen.js`` processes (Node ``ws`` + ``bufferutil``).

Each process gets its own source address in 127.0.0.0/8 so that tens of
thousands of connections do not run out of ephemeral ports, and each is
pinned (``taskset``) to the load-generator core.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import shutil
import subprocess

from .targets import HERE, pinned, process_tree

NODE_MODULES = HERE / "node_modules"
MAX_CONNS_PER_PROCESS = 9_000  # under the 20,000 open-file limit with room to spare
_source = itertools.count()


def next_source_address() -> str:
    """A fresh loopback source address per generator process (127.0.x.y, never .1)."""
    n = next(_source)
    return f"127.0.{n // 250 % 250 + 1}.{n % 250 + 2}"


def ensure_node_modules() -> None:
    """Install the generator's npm packages (from package-lock.json) when missing."""
    if (NODE_MODULES / "ws").is_dir() and (NODE_MODULES / "bufferutil").is_dir():
        return
    npm = shutil.which("npm")
    if not npm or not shutil.which("node"):
        raise RuntimeError("node and npm are needed for the load generator (apt-get install nodejs npm)")
    subprocess.run([npm, "ci", "--no-audit", "--no-fund", "--loglevel=error"], cwd=HERE, check=True,
                   timeout=300)


class LoadGen:
    """A group of generator processes sharing one job (connections split evenly)."""

    def __init__(self, core: str | None, **cfg):
        total = cfg.get("conns", 0)
        n = max(1, math.ceil(total / MAX_CONNS_PER_PROCESS))
        self.core = core
        self.cfgs = []
        for i in range(n):
            share = dict(cfg, localAddress=next_source_address())
            for key in ("conns", "count"):
                if key in cfg:
                    share[key] = cfg[key] // n + (1 if i < cfg[key] % n else 0)
            if cfg.get("rate"):
                share["rate"] = cfg["rate"] / n
            self.cfgs.append(share)
        self.procs: list[asyncio.subprocess.Process] = []

    async def __aenter__(self) -> "LoadGen":
        for cfg in self.cfgs:
            argv = pinned(["node", str(HERE / "loadgen.js"), json.dumps(cfg)], self.core)
            self.procs.append(await asyncio.create_subprocess_exec(
                *argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, cwd=HERE, limit=64 * 1024 * 1024))
        return self

    async def __aexit__(self, *exc) -> None:
        for p in self.procs:
            if p.returncode is None:
                try:
                    p.kill()
                except ProcessLookupError:
                    pass
            await p.wait()

    def pids(self) -> list[int]:
        return [pid for p in self.procs if p.returncode is None for pid in process_tree(p.pid)]

    async def send(self, command: str) -> None:
        for p in self.procs:
            p.stdin.write(command.encode() + b"\n")
            await p.stdin.drain()

    async def expect(self, event: str, timeout: float) -> list[dict]:
        """Wait until every process has reported ``event``; return their reports."""
        async def one(p: asyncio.subprocess.Process) -> dict:
            while True:
                line = await p.stdout.readline()
                if not line:
                    raise RuntimeError(f"load generator exited (code {await p.wait()}) before '{event}'")
                msg = json.loads(line)
                if msg.get("event") == "error":
                    raise RuntimeError(f"load generator error: {msg.get('error')}")
                if msg.get("event") == event:
                    return msg
        return await asyncio.wait_for(asyncio.gather(*(one(p) for p in self.procs)), timeout)


def merge_hist(hists: list[dict]) -> dict[int, int]:
    merged: dict[int, int] = {}
    for h in hists:
        for bucket, count in h.items():
            merged[int(bucket)] = merged.get(int(bucket), 0) + count
    return merged


def percentile_ms(hist: dict[int, int], q: float) -> float | None:
    """Latency percentile in ms from the 1 %-wide log buckets (bucket midpoint)."""
    total = sum(hist.values())
    if not total:
        return None
    rank, seen = q * total, 0
    for bucket in sorted(hist):
        seen += hist[bucket]
        if seen >= rank:
            return round(1.01 ** (bucket + 0.5) / 1000, 4)
    return None
