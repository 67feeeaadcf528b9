"""Cluster figures on one real Redis and three gateway processes.

    python -m benchmarks.cluster                 # full: 2,000 pushes, 10,000 subscribers, 210 s at rest
    python -m benchmarks.cluster --quick         # smoke size
    python -m benchmarks.cluster --only fanout   # one part: crossnode | fanout | rest

What it measures (BENCHMARKS.md, "Cluster"):
- crossnode: `POST /v1/connections/{id}/messages` on node A for a session on node B.
  Latency of the API call (it returns once B has confirmed delivery through Redis) and of
  the message's arrival at the client; calls per second with 1 and with 16 in flight.
- fanout: one `POST /v1/channels/lobby/messages` to N subscribers spread over three nodes;
  time from the call to the last subscriber's receipt, and the call's own latency.
- rest: Redis commands per session per minute with S idle sessions, counted by Redis itself
  (INFO commandstats) over a window longer than one session-refresh period, with the
  default heartbeat and TTLs.

The clients are Python (aiohttp) in this process; every process gets its own CPU share of a
2-core machine, so absolute figures are the machine's, the ratios and counts are the design's.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import orjson
import redis.asyncio as aioredis
import yaml

TOKEN = "bench-admin-token"
AUTH = {"Authorization": f"Bearer {TOKEN}"}
FULL = {"pushes": 2000, "subscribers": 10_000, "fanout_rounds": 5, "rest_sessions": 1500, "rest_window_s": 210}
QUICK = {"pushes": 50, "subscribers": 60, "fanout_rounds": 2, "rest_sessions": 30, "rest_window_s": 12}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))] if values else float("nan")


class Redis:
    def __init__(self, workdir: Path):
        binary = shutil.which("redis-server")
        if binary is None:
            raise SystemExit("redis-server is missing: apt-get install redis-server")
        self.port = free_port()
        self.p = subprocess.Popen([binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                                   "--appendonly", "no", "--dir", str(workdir)], stdout=subprocess.DEVNULL)
        self.url = f"redis://127.0.0.1:{self.port}/0"

    async def ready(self) -> None:
        r = aioredis.from_url(self.url)
        try:
            for _ in range(200):
                try:
                    await r.ping()
                    return
                except (OSError, aioredis.ConnectionError):
                    await asyncio.sleep(0.05)
            raise SystemExit("redis-server did not start")
        finally:
            await r.aclose()

    def stop(self) -> None:
        self.p.kill()
        self.p.wait()


class Node:
    def __init__(self, workdir: Path, name: str, redis_url: str, rest: bool):
        self.name = name
        self.port, self.admin = free_port(), free_port()
        redis = {"url": redis_url}
        if not rest:
            redis.update(heartbeat_s=1, node_ttl_s=5)
        cfg = {
            "node_id": name, "redis": redis,
            "listen": {"host": "127.0.0.1", "port": self.port}, "admin": {"host": "127.0.0.1", "port": self.admin},
            "limits": {"max_connections": 20_000, "max_connections_per_ip": 20_000, "idle_timeout_s": 3600,
                       "ping_interval_s": 0},
            "backends": {"echo": {"type": "builtin", "handler": "echo"}, "chat": {"type": "builtin", "handler": "chat"}},
            "routes": [{"name": "echo", "match": {"path": "/echo"}, "auth": "none", "backend": "echo"},
                       {"name": "chat", "match": {"path": "/chat"}, "auth": "none", "select": "$.action",
                        "actions": {"join": "chat"}}],
        }
        path = workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(cfg))
        env = dict(os.environ, GATEWAY_ADMIN_TOKEN=TOKEN)
        self.log = open(workdir / f"{name}.log", "wb")
        self.p = subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", str(path)], env=env,
                                  stderr=self.log, stdout=subprocess.DEVNULL)
        self.url = f"ws://127.0.0.1:{self.port}"
        self.admin_url = f"http://127.0.0.1:{self.admin}"

    async def ready(self, http) -> None:
        for _ in range(300):
            if self.p.poll() is not None:
                raise SystemExit(f"{self.name} exited")
            try:
                async with http.get(self.admin_url + "/readyz") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
        raise SystemExit(f"{self.name} not ready")

    def stop(self) -> None:
        self.p.terminate()
        try:
            self.p.wait(10)
        except subprocess.TimeoutExpired:
            self.p.kill()


async def session_ids(redis_url: str, node: str, n: int, timeout: float = 30) -> list[str]:
    """Connection ids of `n` sessions of `node`, read from the session records."""
    r = aioredis.from_url(redis_url)
    try:
        deadline = time.monotonic() + timeout
        while True:
            sids = await r.smembers(f"gw:node:{node}:sessions")
            if len(sids) >= n or time.monotonic() > deadline:
                break
            await asyncio.sleep(0.1)
        out = []
        for sid in sids:
            raw = await r.get(b"gw:session:" + sid)
            if raw:
                out.append(orjson.loads(raw)["connection"])
        return out
    finally:
        await r.aclose()


async def crossnode(http, a: Node, b: Node, redis_url: str, pushes: int) -> dict:
    clients = [await http.ws_connect(f"{b.url}/echo") for _ in range(16)]
    ids = await session_ids(redis_url, b.name, len(clients))
    by_id = dict(zip(sorted(ids), clients))  # any pairing: we match on payload, not on id
    arrivals: dict[bytes, float] = {}

    async def reader(ws):
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.BINARY:
                arrivals[msg.data] = time.perf_counter()

    readers = [asyncio.ensure_future(reader(ws)) for ws in clients]
    out = {}
    for inflight in (1, 16):
        sent: dict[bytes, float] = {}
        api_ms: list[float] = []
        n = pushes if inflight == 1 else pushes * 2
        queue = asyncio.Queue()
        for i in range(n):
            queue.put_nowait(i)

        async def worker(k: int):
            conn = list(by_id)[k % len(by_id)]
            while not queue.empty():
                i = queue.get_nowait()
                payload = f"{inflight}-{i}".encode()
                t0 = time.perf_counter()
                sent[payload] = t0
                async with http.post(f"{a.admin_url}/v1/connections/{conn}/messages?type=binary",
                                     headers=AUTH, data=payload) as resp:
                    body = await resp.json()
                    assert body == {"delivered": 1}, body
                api_ms.append((time.perf_counter() - t0) * 1000)

        t_start = time.perf_counter()
        await asyncio.gather(*(worker(k) for k in range(inflight)))
        elapsed = time.perf_counter() - t_start
        for _ in range(100):
            if all(p in arrivals for p in sent):
                break
            await asyncio.sleep(0.02)
        deliver_ms = [(arrivals[p] - t) * 1000 for p, t in sent.items() if p in arrivals]
        out[f"inflight_{inflight}"] = {
            "calls": n, "calls_per_s": round(n / elapsed, 1),
            "api_p50_ms": round(pct(api_ms, 0.5), 3), "api_p99_ms": round(pct(api_ms, 0.99), 3),
            "arrival_p50_ms": round(pct(deliver_ms, 0.5), 3), "arrival_p99_ms": round(pct(deliver_ms, 0.99), 3),
            "lost": sum(1 for p in sent if p not in arrivals),
        }
        log(f"crossnode inflight={inflight}: {out[f'inflight_{inflight}']}")
    for r in readers:
        r.cancel()
    for ws in clients:
        await ws.close()
    return out


async def fanout(http, nodes: list[Node], subscribers: int, rounds: int) -> dict:
    clients = []
    got: list[float] = []
    want = {"n": 0}
    done = asyncio.Event()

    async def reader(ws):
        async for msg in ws:
            if msg.type == aiohttp.WSMsgType.TEXT and msg.data.startswith('{"bench"'):
                got.append(time.perf_counter())
                if len(got) >= want["n"]:
                    done.set()

    connector_sessions = [aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) for _ in nodes]
    try:
        for i in range(subscribers):
            node = nodes[i % len(nodes)]
            ws = await connector_sessions[i % len(nodes)].ws_connect(f"{node.url}/chat", max_msg_size=0)
            await ws.send_str('{"action":"join","room":"lobby"}')
            reply = await ws.receive(timeout=30)
            assert "joined" in reply.data, reply.data
            clients.append(ws)
            if (i + 1) % 2000 == 0:
                log(f"fanout: {i + 1} subscribers")
        readers = [asyncio.ensure_future(reader(ws)) for ws in clients]
        # Presence is cluster-wide: wait until the store shows every member.
        for _ in range(600):
            async with http.get(f"{nodes[0].admin_url}/v1/channels/lobby/presence", headers=AUTH) as resp:
                if (await resp.json())["count"] >= subscribers:
                    break
            await asyncio.sleep(0.1)
        results = []
        for r in range(rounds):
            got.clear()
            done.clear()
            want["n"] = subscribers
            t0 = time.perf_counter()
            async with http.post(f"{nodes[0].admin_url}/v1/channels/lobby/messages",
                                 headers={**AUTH, "Content-Type": "application/json"},
                                 data=orjson.dumps({"bench": r})) as resp:
                body = await resp.json()
            api_ms = (time.perf_counter() - t0) * 1000
            try:
                await asyncio.wait_for(done.wait(), 60)
            except asyncio.TimeoutError:
                pass
            last_ms = (max(got) - t0) * 1000 if got else float("nan")
            results.append({"delivered": body.get("delivered"), "received": len(got), "api_ms": round(api_ms, 1),
                            "last_receipt_ms": round(last_ms, 1)})
            log(f"fanout round {r}: {results[-1]}")
            await asyncio.sleep(0.5)
        for t in readers:
            t.cancel()
        return {"subscribers": subscribers, "nodes": len(nodes), "rounds": results,
                "median_last_receipt_ms": statistics.median(x["last_receipt_ms"] for x in results),
                "median_api_ms": statistics.median(x["api_ms"] for x in results)}
    finally:
        for ws in clients:
            await ws.close()
        for s in connector_sessions:
            await s.close()


async def rest(http, nodes: list[Node], redis_url: str, sessions: int, window_s: float) -> dict:
    sess = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0))
    clients = []
    try:
        for i in range(sessions):
            clients.append(await sess.ws_connect(f"{nodes[i % len(nodes)].url}/echo"))
        r = aioredis.from_url(redis_url)
        try:
            for _ in range(300):
                if sum([await r.scard(f"gw:node:{n.name}:sessions") for n in nodes]) >= sessions:
                    break
                await asyncio.sleep(0.1)
            await asyncio.sleep(1)   # let the opens' batches land before counting
            before = await r.info("commandstats")
            t0 = time.monotonic()
            await asyncio.sleep(window_s)
            after = await r.info("commandstats")
            minutes = (time.monotonic() - t0) / 60
        finally:
            await r.aclose()
        calls = {k.removeprefix("cmdstat_"): after[k]["calls"] - before.get(k, {}).get("calls", 0) for k in after}
        calls = {k: v for k, v in calls.items() if v and k != "info"}
        total = sum(calls.values())
        out = {"sessions": sessions, "nodes": len(nodes), "window_s": window_s, "commands": total,
               "by_command": dict(sorted(calls.items(), key=lambda kv: -kv[1])),
               "per_session_per_minute": round(total / sessions / minutes, 3)}
        log(f"rest: {out}")
        return out
    finally:
        for ws in clients:
            await ws.close()
        await sess.close()


async def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--only", choices=("crossnode", "fanout", "rest"))
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "cluster.json"))
    args = ap.parse_args(argv)
    size = QUICK if args.quick else FULL
    parts = [args.only] if args.only else ["crossnode", "fanout", "rest"]
    result = {"started": time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime()), "quick": args.quick,
              "sizes": size}
    with tempfile.TemporaryDirectory(prefix="gw-cluster-bench-") as tmp:
        work = Path(tmp)
        redis = Redis(work)
        await redis.ready()
        nodes: list[Node] = []
        try:
            async with aiohttp.ClientSession() as http:
                for part in parts:
                    for n in nodes:
                        n.stop()
                    r = aioredis.from_url(redis.url)
                    await r.flushall()
                    await r.aclose()
                    nodes = [Node(work, f"bench-{part}-{i}", redis.url, rest=part == "rest") for i in range(3)]
                    for n in nodes:
                        await n.ready(http)
                    log(f"{part}: 3 nodes ready")
                    if part == "crossnode":
                        result[part] = await crossnode(http, nodes[0], nodes[1], redis.url, size["pushes"])
                    elif part == "fanout":
                        result[part] = await fanout(http, nodes, size["subscribers"], size["fanout_rounds"])
                    else:
                        result[part] = await rest(http, nodes, redis.url, size["rest_sessions"],
                                                  size["rest_window_s"])
        finally:
            for n in nodes:
                n.stop()
            redis.stop()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(asyncio.run(main()))
