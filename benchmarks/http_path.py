"""The HTTP-backend message path: each client message POSTed, each 200 reply sent back.

    python -m benchmarks.http_path                             # this checkout, 3 repetitions
    python -m benchmarks.http_path --tree /tmp/ab-a --tree /tmp/ab-b --reps 5   # A/B, interleaved

A route whose backend is `type: http`: an aiohttp backend (its own process,
`--serve-backend`) answers every message `m` with the 200 body `r` + `m`;
`python -m gateway run` (`workers: 1`) has one route to it; N clients (aiohttp,
in this process) each send numbered text messages at a fixed pace, one at a
time (send, read the reply, check it is this message's, wait for the next
slot), so every tree sees the same offered rate and latency is a round trip,
not a queue. Per repetition a fresh gateway; a warm-up, then the measured phase:

- **gateway CPU us per message** = utime + stime of the gateway's process tree
  (/proc, `targets.cpu_split`) over the measured phase / replies received in it.
  One message = one client frame in, one POST out, one reply in, one frame out.
- **p50 / p99 round trip** = client's send to the reply's arrival.
- **other CPU %** = what the rest of the machine used meanwhile (/proc/stat
  minus gateway, backend and this process): the noise.

With several `--tree`s, each repetition runs every tree in turn (A, B, A, B, ...)
and the paired ratio B/A of each repetition is reported. The gateway runs with
its cwd and PYTHONPATH at the tree; the module it imports is checked and printed.
Pinning (default): the gateway on core 1, backend and clients on core 0.
Everything listens on 127.0.0.1. Every loop is bounded by a count and a time.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp

from .run import background_load, machine_busy_seconds
from .targets import HOST, ROOT, Gateway, Target, cpu_seconds, cpu_split

GEN_CORE, PROXY_CORE = "0", "1"


# --------------------------------------------------------------------- backend
def serve_backend(port: int) -> None:
    """The HTTP backend: every POSTed message `m` gets 200 `r` + `m` (short); other events 204."""
    from aiohttp import web

    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass

    async def answer(request: web.Request) -> web.Response:
        body = await request.read()
        if request.headers.get("Gateway-Event") == "message":
            return web.Response(body=b"r" + body, content_type="text/plain")
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/msg", answer)
    web.run_app(app, host=HOST, port=port, print=None, access_log=None, backlog=1024)


class HttpBackend(Target):
    name = "http-backend"

    def argv(self, tmp: Path) -> list[str]:
        return [sys.executable, "-m", "benchmarks.http_path", "--serve-backend", str(self.port)]


class HttpGateway(Gateway):
    """The gateway with one `type: http` backend and one route to it."""

    name = "gateway-http"

    def backend_yaml(self) -> str:
        return f'{{type: http, endpoints: ["http://{HOST}:{self.upstreams[0]}/msg"]}}'


def gateway_module(tree: Path) -> str:
    """Where `import gateway` resolves with the gateway's cwd and PYTHONPATH."""
    env = {**os.environ, "PYTHONPATH": str(tree)}
    out = subprocess.run([sys.executable, "-c", "import gateway; print(gateway.__file__)"],
                         cwd=tree, env=env, capture_output=True, text=True, timeout=30, check=True)
    return out.stdout.strip()


# --------------------------------------------------------------------- clients
class Phase:
    """Shared by the clients: whether replies count, and what they measured."""

    def __init__(self):
        self.measuring = False
        self.replies = 0
        self.latencies: list[float] = []
        self.errors: list[str] = []


async def client(http: aiohttp.ClientSession, url: str, cid: int, interval: float, until: float,
                 max_msgs: int, phase: Phase, offset: float) -> None:
    async with http.ws_connect(url, autoping=True, max_msg_size=1 << 16) as ws:
        next_at = time.monotonic() + offset
        for i in range(max_msgs):
            now = time.monotonic()
            if now >= until:
                return
            if next_at > now:
                await asyncio.sleep(next_at - now)
            next_at += interval
            text = f"{cid}:{i}"
            sent = time.perf_counter()
            await ws.send_str(text)
            msg = await ws.receive(timeout=10)
            got = time.perf_counter()
            if msg.type != aiohttp.WSMsgType.TEXT or msg.data != "r" + text:
                phase.errors.append(f"client {cid} message {i}: {msg.type} {str(msg.data)[:60]!r}")
                return
            if phase.measuring:
                phase.replies += 1
                phase.latencies.append(got - sent)


def percentile_ms(sorted_s: list[float], q: float) -> float | None:
    if not sorted_s:
        return None
    return 1000 * sorted_s[min(len(sorted_s) - 1, int(q * len(sorted_s)))]


async def measure(gw: HttpGateway, backend: HttpBackend, args) -> dict:
    """One repetition against a started gateway: warm-up, then the measured phase."""
    phase = Phase()
    interval = args.conns / args.rate
    total = args.warmup + args.duration
    until = time.monotonic() + total + 0.5
    max_msgs = int(total / interval) + 10
    url = f"ws://{HOST}:{gw.port}/"
    own = [os.getpid()]
    async with aiohttp.ClientSession() as http:
        tasks = [asyncio.create_task(client(http, url, c, interval, until, max_msgs, phase,
                                            interval * c / args.conns)) for c in range(args.conns)]
        await asyncio.sleep(args.warmup)
        g0, u0, b0, m0, t0 = cpu_split(gw.pids()), cpu_seconds(own), cpu_seconds(backend.pids()), \
            machine_busy_seconds(), time.monotonic()
        phase.measuring = True
        await asyncio.sleep(args.duration)
        phase.measuring = False
        g1, u1, b1, m1, t1 = cpu_split(gw.pids()), cpu_seconds(own), cpu_seconds(backend.pids()), \
            machine_busy_seconds(), time.monotonic()
        n = phase.replies
        done, pending = await asyncio.wait(tasks, timeout=total + 15)
        for t in pending:
            t.cancel()
        for t in done:
            if t.exception() is not None:
                phase.errors.append(repr(t.exception()))
    wall = t1 - t0
    user, system = g1[0] - g0[0], g1[1] - g0[1]
    lat = sorted(phase.latencies)
    other = max(0.0, (m1 - m0) - (user + system) - (u1 - u0) - (b1 - b0))
    return {
        "messages": n, "msgs_per_s": round(n / wall, 1),
        "gw_cpu_us_per_msg": round(1e6 * (user + system) / n, 1) if n else None,
        "gw_user_us_per_msg": round(1e6 * user / n, 1) if n else None,
        "gw_sys_us_per_msg": round(1e6 * system / n, 1) if n else None,
        "gw_cpu_pct": round(100 * (user + system) / wall, 1),
        "backend_cpu_pct": round(100 * (b1 - b0) / wall, 1),
        "clients_cpu_pct": round(100 * (u1 - u0) / wall, 1),
        "other_cpu_pct": round(100 * other / wall, 1),
        "p50_ms": percentile_ms(lat, 0.50), "p99_ms": percentile_ms(lat, 0.99),
        "errors": phase.errors[:5], "loadavg": os.getloadavg()[0],
    }


async def run_one(tree: Path, backend: HttpBackend, args, tmp: Path) -> dict:
    core = None if args.no_pin else PROXY_CORE
    gw = HttpGateway(args.port, [backend.port], core, admin_port=args.port + 1, tree=tree)
    os.environ["PYTHONPATH"] = str(tree)   # for the gateway's process only (this one has its imports)
    quiet = await background_load(args.wait_quiet) if args.wait_quiet else None
    try:
        await gw.start(tmp)
        return {**await measure(gw, backend, args), "other_cpu_pct_before": quiet}
    finally:
        gw.stop()


def median(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return round(statistics.median(values), 3) if values else None


async def main_async(args) -> dict:
    trees = [Path(t).resolve() for t in (args.tree or [str(ROOT)])]
    modules = {str(t): gateway_module(t) for t in trees}
    for t, m in modules.items():
        print(f"tree {t}: gateway imports from {m}", file=sys.stderr)
        if not m.startswith(t + "/"):
            raise SystemExit(f"gateway from {t} resolves to {m}, not that tree")
    if not args.no_pin:
        os.sched_setaffinity(0, {int(GEN_CORE)})
    runs: dict[str, list[dict]] = {str(t): [] for t in trees}
    with tempfile.TemporaryDirectory(prefix="http-path-") as tmpdir:
        tmp = Path(tmpdir)
        backend = HttpBackend(args.port + 2, [], None if args.no_pin else GEN_CORE)
        backend.cwd = ROOT
        await backend.start(tmp / "backend")
        try:
            for rep in range(args.reps):
                for i, tree in enumerate(trees):
                    r = await run_one(tree, backend, args, tmp / f"r{rep}-{i}")
                    r["rep"] = rep
                    runs[str(tree)].append(r)
                    print(f"rep {rep} {tree.name}: {json.dumps(r)}", file=sys.stderr, flush=True)
        finally:
            backend.stop()
    keys = ["gw_cpu_us_per_msg", "gw_user_us_per_msg", "gw_sys_us_per_msg", "p50_ms", "p99_ms",
            "msgs_per_s", "other_cpu_pct", "loadavg"]
    summary = {t: {k: median([r[k] for r in rs]) for k in keys} for t, rs in runs.items()}
    out = {"args": vars(args), "modules": modules, "runs": runs, "medians": summary}
    if len(trees) == 2:
        a, b = (runs[str(t)] for t in trees)
        out["paired_b_over_a"] = {
            k: {"median": median(ratios), "min": min(ratios), "max": max(ratios)}
            for k in ("gw_cpu_us_per_msg", "gw_user_us_per_msg", "p50_ms", "p99_ms")
            if (ratios := [round(y[k] / x[k], 3) for x, y in zip(a, b) if x[k] and y[k]])}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--tree", action="append", help="gateway source tree (repeat for A/B); default this checkout")
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--conns", type=int, default=50)
    p.add_argument("--rate", type=float, default=2000.0, help="messages/s offered over all clients")
    p.add_argument("--duration", type=float, default=5.0, help="measured seconds per repetition")
    p.add_argument("--warmup", type=float, default=1.5)
    p.add_argument("--port", type=int, default=18580, help="gateway; +1 its admin, +2 the backend")
    p.add_argument("--no-pin", action="store_true")
    p.add_argument("--wait-quiet", type=float, default=0, metavar="S",
                   help="before each run wait up to S s for other processes to drop under 15 %% of a core")
    p.add_argument("--json", help="write every run and the medians here")
    p.add_argument("--serve-backend", type=int, metavar="PORT", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.serve_backend:
        serve_backend(args.serve_backend)
        return
    try:
        import uvloop
        uvloop.install()
    except ImportError:
        pass
    out = asyncio.run(main_async(args))
    if args.json:
        Path(args.json).write_text(json.dumps(out, indent=1))
    print(json.dumps({k: out[k] for k in ("medians", "paired_b_over_a") if k in out}, indent=1))


if __name__ == "__main__":
    main()
