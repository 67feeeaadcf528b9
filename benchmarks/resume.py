"""Drain one node, resume its sessions on another: how long, how fast, at what CPU.

    python -m benchmarks.resume                     # 5,000 sessions, 3 repetitions
    python -m benchmarks.resume --sessions 500 --reps 1
    python -m benchmarks.resume --rate-per-s 5000   # drain.rate_per_s of the draining node

Per repetition, everything fresh: one throwaway redis-server on a free port
(no persistence), the echo backend, and two gateway nodes A and B on it
(`workers: 1` each, both pinned to the proxy core; generator, backend and
Redis on the other). Then:

1. **New sessions on B** (the baseline): the generator opens N sessions on B
   (handshake + one echo each) and holds them; B's CPU over that phase / N.
   Then they are closed (B's CPU / N: the close).
2. **Drain and resume**: N sessions are opened on A (one echo each). A gets
   SIGTERM: it detaches its sessions (records to Redis, then 1012 with
   `resume=<token>`, paced at drain.rate_per_s) and exits when every replay
   buffer is sealed. Each client reconnects to B at once with
   `?resume=<token>` and does one echo there. Measured: from SIGTERM to the
   last 1012, to the last resumed echo, and to A's exit; resumes per second
   over time; B's CPU over the phase / resumes (CPU per resume); A's CPU
   from SIGTERM to its exit / sessions (from wait4's rusage: the whole
   process, to its last tick).

CPU is utime + stime from /proc (and rusage for the exited node), as in the
harness. Results: `--out`/resume.json and the chart resume.png (matplotlib).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .loadgen import LoadGen, ensure_node_modules
from .targets import HERE, HOST, EchoBackend, Gateway, cpu_seconds, cpu_split, pinned

GEN_CORE, PROXY_CORE = "0", "1"


def free_port() -> int:
    with socket.socket() as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Redis:
    """A throwaway redis-server: free port, no persistence, its own dir."""

    def __init__(self, core: str | None):
        self.core = core
        self.port = free_port()
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://{HOST}:{self.port}/0"

    def start(self, tmp: Path) -> None:
        binary = shutil.which("redis-server")
        if binary is None:
            raise RuntimeError("redis-server is not on PATH (Debian/Ubuntu: apt-get install redis-server)")
        tmp.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(self.port), "--bind", HOST, "--save", "", "--appendonly", "no",
                "--dir", str(tmp), "--daemonize", "no"]
        self.proc = subprocess.Popen(pinned(argv, self.core), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                     start_new_session=True)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection((HOST, self.port), timeout=0.5) as c:
                    c.sendall(b"PING\r\n")
                    if c.recv(16).startswith(b"+PONG"):
                        return
            except OSError:
                time.sleep(0.05)
        raise RuntimeError("redis-server did not answer PING within 10 s")

    def pids(self) -> list[int]:
        # Not poll(): it reaps an exited process, and then one_rep's wait4 (whose rusage is
        # the figure) fails with ECHILD. A pid that is gone reads as no CPU (cpu_split).
        return [self.proc.pid] if self.proc and self.proc.returncode is None else []

    def stop(self) -> None:
        if self.proc and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)


class Node(Gateway):
    """A gateway node of the two-node cluster (Redis store, drain settings)."""

    def __init__(self, name: str, port: int, admin_port: int, backend_port: int, redis_url: str,
                 rate_per_s: float, tree: Path | None):
        super().__init__(port, [backend_port], PROXY_CORE, admin_port=admin_port, tree=tree)
        self.name = f"gateway-{name}"
        self.node_id = name
        self.redis_url = redis_url
        self.rate_per_s = rate_per_s

    def extra_yaml(self) -> str:
        return (f"node_id: {self.node_id}\n"
                f"redis: {{url: \"{self.redis_url}\"}}\n"
                f"drain: {{timeout_s: 120, rate_per_s: {self.rate_per_s}, resume_window_s: 300}}\n")


class Sampler:
    """CPU % of some processes every `every_s`, for the chart."""

    def __init__(self, parts: dict[str, callable], every_s: float = 0.1):
        self.parts, self.every_s = parts, every_s
        self.samples: list[tuple[float, dict[str, float]]] = []
        self._task: asyncio.Task | None = None

    def start(self, t0: float) -> None:
        self._task = asyncio.ensure_future(self._run(t0))

    async def _run(self, t0: float) -> None:
        last = {k: cpu_seconds(f()) for k, f in self.parts.items()}
        last_t = time.monotonic()
        while True:
            await asyncio.sleep(self.every_s)
            now = time.monotonic()
            cur = {k: cpu_seconds(f()) for k, f in self.parts.items()}
            self.samples.append((round(now - t0, 3), {k: round(100 * max(0.0, cur[k] - last[k]) / (now - last_t), 1)
                                                      for k in cur}))
            last, last_t = cur, now

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()


def _reap(pid: int):
    """wait4: when it exited, its exit status and the rusage of the whole process (every thread, to its end)."""
    _, status, usage = os.wait4(pid, 0)
    return time.monotonic(), status, usage.ru_utime + usage.ru_stime


async def one_rep(args, tmp: Path) -> dict:
    base = args.port_base
    redis = Redis(GEN_CORE)
    redis.start(tmp / "redis")
    backend = EchoBackend([base + 1], core=GEN_CORE)
    a = Node("a", base + 80, base + 1090, base + 1, redis.url, args.rate_per_s, args.tree)
    b = Node("b", base + 81, base + 1091, base + 1, redis.url, args.rate_per_s, args.tree)
    n = args.sessions
    out: dict = {"sessions": n, "rate_per_s": args.rate_per_s}
    try:
        await backend.start(tmp / "backend")
        await a.start(tmp / "a")
        await b.start(tmp / "b")
        for node in (a, b):   # warm-up: imports, first allocations, the store's connections
            async with LoadGen(GEN_CORE, mode="connrate", url=node.url, count=200, conns=0, connectConcurrency=20,
                               duration=60, timeout=10, hardLimit=120) as gen:
                await gen.expect("ready", 30)
                await gen.send("run")
                await gen.expect("result", 60)
                await gen.send("close")
        await asyncio.sleep(1.0)

        # 1. New sessions on B: open (handshake + echo) and hold, then close.
        before = cpu_seconds(b.pids())
        t = time.monotonic()
        async with LoadGen(GEN_CORE, mode="idle", url=b.url, conns=n, timeout=30, connectConcurrency=50,
                           hardLimit=600) as gen:
            ready = await gen.expect("ready", 300)
            opened_s = time.monotonic() - t
            held = cpu_seconds(b.pids())
            await gen.send("run")
            await gen.expect("result", 60)
            await asyncio.sleep(0.5)
            closing = cpu_seconds(b.pids())
            await gen.send("close")
            await gen.expect("closed", 120)
        await asyncio.sleep(0.5)
        closed = cpu_seconds(b.pids())
        opened = sum(r["opened"] for r in ready)
        out["new"] = {"opened": opened, "seconds": round(opened_s, 2),
                      "b_us_per_session": round(1e6 * (held - before) / max(1, opened), 1),
                      "b_us_per_close": round(1e6 * (closed - closing) / max(1, opened), 1)}
        await asyncio.sleep(1.0)

        # 2. Sessions on A; drain A (SIGTERM); every client resumes on B.
        async with LoadGen(GEN_CORE, mode="resume", url=a.url, resumeUrl=b.url, conns=n, timeout=30,
                           connectConcurrency=50, duration=args.timeout, hardLimit=args.timeout + 600) as gen:
            ready = await gen.expect("ready", 300)
            if sum(r["opened"] for r in ready) < n:
                raise RuntimeError(f"only {sum(r['opened'] for r in ready)} of {n} sessions opened on A")
            await asyncio.sleep(0.5)
            a_before, b_before = cpu_seconds(a.pids()), cpu_seconds(b.pids())
            b_split_before = cpu_split(b.pids())
            r_before = cpu_seconds(redis.pids())
            await gen.send("run")
            await gen.expect("armed", 30)
            t0 = time.monotonic()
            sampler = Sampler({"gateway A (draining)": a.pids, "gateway B (resuming)": b.pids,
                               "redis": redis.pids})
            sampler.start(t0)
            spy = None
            if args.profile:   # py-spy on B over the resume phase (collapsed stacks, as profile_handshake)
                pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
                spy = subprocess.Popen([pyspy, "record", "--pid", str(b.proc.pid), "--rate", "1000", "--format",
                                        "raw", "--output", str(args.profile), "--nonblocking"],
                                       stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
                await asyncio.sleep(1.0)
            os.kill(a.proc.pid, signal.SIGTERM)
            reaped = asyncio.get_running_loop().run_in_executor(None, _reap, a.proc.pid)
            res = await gen.expect("result", args.timeout + 120)
            b_after, b_split_after = cpu_seconds(b.pids()), cpu_split(b.pids())
            if spy is not None:
                spy.send_signal(signal.SIGINT)
                spy.wait(30)
            r_after = cpu_seconds(redis.pids())
            exited, status, a_total = await asyncio.wait_for(reaped, 180)
            a_exit_s = exited - t0
            a.proc.returncode = os.waitstatus_to_exitcode(status)
            await asyncio.sleep(0.3)
            sampler.stop()
            await gen.send("close")
            await gen.expect("closed", 120)
        resumed = sum(r["resumed"] for r in res)
        close_at = sorted(t for r in res for t in r["closeAt"])
        resumed_at = sorted(t for r in res for t in r["resumedAt"])
        codes: dict[str, int] = {}
        errors: dict[str, int] = {}
        retries: dict[str, int] = {}
        for r in res:
            for k, v in r["retries"].items():
                retries[k] = retries.get(k, 0) + v
            for k, v in r["codes"].items():
                codes[k] = codes.get(k, 0) + v
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        out["resume"] = {
            "resumed": resumed, "failed": sum(r["failed"] for r in res), "lost": sum(r["lost"] for r in res),
            "retried": sum(r["retried"] for r in res), "retries": retries, "close_codes": codes, "errors": errors,
            "first_close_s": round(close_at[0] / 1000, 3) if close_at else None,
            "last_close_s": round(close_at[-1] / 1000, 3) if close_at else None,
            "last_resume_s": round(resumed_at[-1] / 1000, 3) if resumed_at else None,
            "a_exit_s": round(a_exit_s, 3),
            "a_exit_code": a.proc.returncode,
            "b_us_per_resume": round(1e6 * (b_after - b_before) / max(1, resumed), 1),
            "b_user_us_per_resume": round(1e6 * (b_split_after[0] - b_split_before[0]) / max(1, resumed), 1),
            "b_sys_us_per_resume": round(1e6 * (b_split_after[1] - b_split_before[1]) / max(1, resumed), 1),
            "a_us_per_drained": round(1e6 * (a_total - a_before) / n, 1),
            "redis_us_per_resume": round(1e6 * (r_after - r_before) / max(1, resumed), 1),
            "resume_after_close_ms_p50": _pair_p50(res),
            "resumed_at_s": [round(t / 1000, 4) for t in resumed_at],
            "closed_at_s": [round(t / 1000, 4) for t in close_at],
            "cpu_samples": sampler.samples,
        }
        out["resume"]["resume_vs_new"] = round(out["resume"]["b_us_per_resume"] / max(1e-9, out["new"]["b_us_per_session"]), 2)
    finally:
        for t in (a, b):
            t.stop()
        backend.stop()
        redis.stop()
    return out


def _pair_p50(res: list[dict]):
    """Median time from a session's 1012 to its resumed echo: the generator keeps
    them in arrival order, not paired, so this is the median gap of the sorted lists."""
    close_at = sorted(t for r in res for t in r["closeAt"])
    resumed_at = sorted(t for r in res for t in r["resumedAt"])
    gaps = [r - c for c, r in zip(close_at, resumed_at)]
    return round(statistics.median(gaps), 1) if gaps else None


def chart(result: dict, path: Path, bin_s: float = 0.25) -> bool:
    """Per second in `bin_s` bins: 1012s received and resumes done (the median run);
    resumed so far (every run); CPU of both nodes and Redis (the median run)."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    reps = result["reps"]
    order = sorted(range(len(reps)), key=lambda i: reps[i]["resume"]["last_resume_s"] or 0)
    mid = order[len(order) // 2]
    fig, (rate, total, cpu) = plt.subplots(3, 1, figsize=(10, 9), sharex=True)
    r = reps[mid]["resume"]
    for key, label, style in (("closed_at_s", "1012 + resume token received", ":"),
                              ("resumed_at_s", "resumed on B (first echo back)", "-")):
        times = r[key]
        if not times:
            continue
        counts = [0] * (int(max(times) / bin_s) + 2)
        for t in times:
            counts[int(t / bin_s)] += 1
        rate.plot([k * bin_s for k in range(len(counts))], [c / bin_s for c in counts], style,
                  drawstyle="steps-post", label=label)
    rate.set_ylabel(f"per second ({int(bin_s * 1000)} ms bins)")
    rate.set_title(f"Drain {result['sessions']:,} sessions off node A (SIGTERM at 0 s, drain.rate_per_s "
                   f"{result['rate_per_s']:,.0f}), resume them on node B: run {mid + 1} of {len(reps)}", fontsize=10)
    rate.legend(fontsize=8)
    for i, rep in enumerate(reps):
        times = rep["resume"]["resumed_at_s"]
        total.plot(times, range(1, len(times) + 1), label=f"run {i + 1}: {len(times):,} resumed")
    total.axhline(result["sessions"], color="grey", lw=0.5)
    total.set_ylabel("sessions resumed so far")
    total.legend(fontsize=8)
    samples = r["cpu_samples"]
    if samples:
        for name in samples[0][1]:
            cpu.plot([t for t, _ in samples], [s[name] for _, s in samples], label=name)
    cpu.set_ylabel("CPU % of one core")
    cpu.set_xlabel("seconds since SIGTERM to node A (both nodes share one core)")
    cpu.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return True


def summary(reps: list[dict]) -> dict:
    def med(section: str, key: str):
        vals = [r[section][key] for r in reps if r[section].get(key) is not None]
        return {"median": statistics.median(vals), "min": min(vals), "max": max(vals)} if vals else None
    return {k: med(s, k) for s, keys in (
        ("new", ["b_us_per_session", "b_us_per_close"]),
        ("resume", ["b_us_per_resume", "b_user_us_per_resume", "b_sys_us_per_resume", "resume_vs_new",
                    "a_us_per_drained", "redis_us_per_resume", "first_close_s", "last_close_s", "last_resume_s",
                    "a_exit_s", "resumed", "failed", "retried"])) for k in keys}


async def main_async(args) -> dict:
    ensure_node_modules()
    reps = []
    for i in range(args.reps):
        tmp = Path(tempfile.mkdtemp(prefix="gwresume-"))
        try:
            print(f"[{time.strftime('%H:%M:%S')}] rep {i + 1}/{args.reps}: {args.sessions} sessions", file=sys.stderr,
                  flush=True)
            rep = await one_rep(args, tmp)
            r = rep["resume"]
            print(f"  new on B {rep['new']['b_us_per_session']} us/session; resume on B {r['b_us_per_resume']} "
                  f"us ({r['resume_vs_new']}x); resumed {r['resumed']}/{args.sessions}, failed {r['failed']}; "
                  f"last 1012 {r['last_close_s']} s, last resume {r['last_resume_s']} s, A exit {r['a_exit_s']} s",
                  file=sys.stderr, flush=True)
            reps.append(rep)
        finally:
            if not args.keep_tmp:
                shutil.rmtree(tmp, ignore_errors=True)
    return {"sessions": args.sessions, "rate_per_s": args.rate_per_s, "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
            "summary": summary(reps), "reps": reps}


def write(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    (out / "resume.json").write_text(json.dumps(result, indent=1))
    chart(result, out / "resume.png")


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.resume", description=__doc__.splitlines()[0])
    p.add_argument("--sessions", type=int, default=5000)
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--rate-per-s", type=float, default=1000, help="drain.rate_per_s of the draining node")
    p.add_argument("--timeout", type=float, default=120, help="seconds the generator waits for every resume")
    p.add_argument("--tree", type=Path, help="run the gateway from this source tree")
    p.add_argument("--port-base", type=int, default=18200)
    p.add_argument("--out", type=Path, default=HERE / "results")
    p.add_argument("--keep-tmp", action="store_true")
    p.add_argument("--profile", type=Path, help="py-spy node B over the resume phase into this file "
                   "(collapsed stacks; its CPU figures are then not comparable)")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    result = asyncio.run(main_async(args))
    write(result, args.out)
    print(json.dumps(result["summary"], indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
