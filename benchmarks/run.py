"""Benchmark harness: one command runs every scenario against every target.

    python -m benchmarks.run                  # full run, 3 repetitions (~20 min)
    python -m benchmarks.run --quick          # smoke size, 1 repetition
    python -m benchmarks.run --targets nginx,gateway --scenarios rate,idle
    python -m benchmarks.run --stretch        # add the 50,000-session stretch run

See BENCHMARKS.md for the method and what every figure means.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from .loadgen import LoadGen, ensure_node_modules, merge_hist, percentile_ms
from .targets import (HERE, TARGET_NAMES, TICKS, EchoBackend, Target, cpu_seconds, cpu_split, make_targets,
                      rss_kb)

GEN_CORE, PROXY_CORE = "0", "1"
SCENARIOS = ["idle", "connrate", "throughput", "rate"]
# Not in the default list: the rate scenario's healthy sessions quiet and under a flood (benchmarks/flood.py).
EXTRA_SCENARIOS = ["flood"]
# Not in the default list: two gateway nodes on a Redis of their own (benchmarks/resume.py).
CLUSTER_SCENARIOS = {"drain": "drain 5,000 sessions off one node and resume them on another"}
PLACEHOLDERS = {
    "fanout": "fan-out of one channel message to 10,000 subscribers",
}
FULL = {
    "throughput": {"conns": 100, "depths": [1, 10], "sizes": [64, 4096], "duration": 5.0},
    "rate": {"rate": 8000, "conns": 500, "size": 64, "duration": 10.0},
    "idle": {"conns": 9_900},
    "connrate": {"count": 3000, "concurrency": 50, "duration": 30.0},
    "stretch": {"conns": 50_000, "workers": 6, "backend_ports": [1, 11, 21, 31]},  # + --port-base
    "flood": {"rate": 2000, "conns": 100, "size": 64, "duration": 10.0, "slow": 40, "half_open": 200},
}
QUICK = {
    "throughput": {"conns": 10, "depths": [1, 10], "sizes": [64, 4096], "duration": 0.5},
    "rate": {"rate": 400, "conns": 20, "size": 64, "duration": 1.0},
    "idle": {"conns": 50},
    "connrate": {"count": 50, "concurrency": 10, "duration": 10.0},
    "stretch": {"conns": 2_000, "workers": 2, "backend_ports": [1, 11]},
    "flood": {"rate": 400, "conns": 20, "size": 64, "duration": 1.0, "slow": 5, "half_open": 20},
}


def log(msg: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def machine_busy_seconds() -> float:
    """CPU seconds all processes of the machine used so far (from /proc/stat)."""
    with open("/proc/stat") as f:  # all CPUs: user nice system idle iowait irq softirq steal
        ticks = [int(x) for x in f.readline().split()[1:9]]
    return (sum(ticks) - ticks[3] - ticks[4]) / TICKS


async def background_load(wait_s: float) -> float:
    """% of one core used by other processes; waits up to ``wait_s`` for it to drop under 15 %."""
    deadline, waited = time.monotonic() + wait_s, False
    while True:
        b0, t0 = machine_busy_seconds(), time.monotonic()
        await asyncio.sleep(1.0)
        pct = 100 * (machine_busy_seconds() - b0) / (time.monotonic() - t0)
        if pct < 15 or time.monotonic() >= deadline:
            return round(pct, 1)
        if not waited:
            log(f"machine busy ({pct:.0f} % of a core used by other processes), waiting up to {wait_s:.0f} s")
            waited = True


class Meter:
    """CPU seconds of the proxy, backend and generator process trees, plus wall time."""

    def __init__(self, target: Target, backend: Target, gen: LoadGen):
        self.target = target
        self.parts = {"proxy": target, "backend": backend, "gen": gen}
        if not target.pids():  # direct: there is no proxy process
            del self.parts["proxy"]
        self.start = self.read()

    def read(self) -> dict:
        return {"t": time.monotonic(), "busy": machine_busy_seconds(),
                **{k: cpu_seconds(v.pids()) for k, v in self.parts.items()},
                "proxy_split": cpu_split(self.target.pids()) if "proxy" in self.parts else (0.0, 0.0)}

    def stop(self) -> dict:
        end = self.read()
        wall = end["t"] - self.start["t"]
        used = {k: end[k] - self.start[k] for k in self.parts}
        # Everything else the machine did meanwhile (other jobs disturb the figures).
        used["other"] = max(0.0, end["busy"] - self.start["busy"] - sum(used.values()))
        out = {"wall_s": round(wall, 3), **{f"{k}_cpu_s": round(v, 3) for k, v in used.items()},
               **{f"{k}_cpu_pct": round(100 * v / wall, 1) for k, v in used.items()}}
        if "proxy" in self.parts:
            out["proxy_user_cpu_s"] = round(end["proxy_split"][0] - self.start["proxy_split"][0], 3)
            out["proxy_sys_cpu_s"] = round(end["proxy_split"][1] - self.start["proxy_split"][1], 3)
        return out


def _checked(ready: list[dict], wanted: int) -> int:
    opened = sum(r["opened"] for r in ready)
    if opened < wanted:
        errors: dict = {}
        for r in ready:
            for k, v in r["errors"].items():
                errors[k] = errors.get(k, 0) + v
        raise RuntimeError(f"only {opened} of {wanted} connections opened: {errors}")
    return opened


# -------------------------------------------------------------------- scenarios
async def run_echo(target: Target, backend: Target, *, conns: int, depth: int = 1, size: int = 64,
                   rate: float = 0, duration: float = 5.0) -> dict:
    """Closed loop (``rate`` 0: ``depth`` messages in flight per connection) or open loop."""
    async with LoadGen(GEN_CORE, mode="echo", url=target.url, conns=conns, depth=depth, size=size,
                       rate=rate, duration=duration, timeout=10, hardLimit=duration + 300) as gen:
        _checked(await gen.expect("ready", 120), conns)
        meter = Meter(target, backend, gen)
        await gen.send("run")
        res = await gen.expect("result", duration + 60)
        cpu = meter.stop()
        await gen.send("close")
        await gen.expect("closed", 60)
    sent, received = sum(r["sent"] for r in res), sum(r["received"] for r in res)
    seconds = max(r["seconds"] for r in res)
    relayed = sent + received  # client->backend and backend->client: 2 relayed messages per echo
    hist = merge_hist([r["hist"] for r in res])
    out = {"conns": conns, "depth": depth, "size": size, "offered_rate": rate, "sent": sent,
           "received": received, "lost": sum(r["lost"] for r in res), "seconds": round(seconds, 3),
           "closed_early": sum(r["closedEarly"] for r in res), "send_errors": sum(r["sendErrors"] for r in res),
           "msgs_per_s": round(received / seconds, 1), "relayed": relayed,
           "gen_max_lag_msgs": max(r["maxLagMsgs"] for r in res),
           "p50_ms": percentile_ms(hist, 0.50), "p99_ms": percentile_ms(hist, 0.99),
           "p999_ms": percentile_ms(hist, 0.999), **cpu}
    if target.pids() and relayed:
        out["proxy_us_per_msg"] = round(cpu["proxy_cpu_s"] * 1e6 / relayed, 2)
        # User space (Python, uvloop) apart from the kernel (loopback TCP): see cpu_split.
        out["proxy_user_us_per_msg"] = round(cpu["proxy_user_cpu_s"] * 1e6 / relayed, 2)
        out["proxy_sys_us_per_msg"] = round(cpu["proxy_sys_cpu_s"] * 1e6 / relayed, 2)
    out["backend_us_per_msg"] = round(cpu["backend_cpu_s"] * 1e6 / max(relayed, 1), 2)
    return out


async def run_connrate(target: Target, backend: Target, *, count: int, concurrency: int,
                       duration: float) -> dict:
    """Open ``count`` connections (each: handshake, one echo, close), ``concurrency`` at once."""
    async with LoadGen(GEN_CORE, mode="connrate", url=target.url, count=count, conns=0,
                       connectConcurrency=concurrency, duration=duration, timeout=10,
                       hardLimit=duration + 120) as gen:
        await gen.expect("ready", 30)
        meter = Meter(target, backend, gen)
        await gen.send("run")
        res = await gen.expect("result", duration + 60)
        cpu = meter.stop()
        await gen.send("close")
        await gen.expect("closed", 30)
    opened, failed = sum(r["opened"] for r in res), sum(r["failed"] for r in res)
    if not opened:
        raise RuntimeError(f"no connection opened: {res[0]['errors']}")
    out = {"count": count, "opened": opened, "failed": failed,
           "conns_per_s": round(opened / max(r["seconds"] for r in res), 1), **cpu}
    if target.pids():
        out["proxy_us_per_conn"] = round(cpu["proxy_cpu_s"] * 1e6 / opened, 1)
    return out


async def run_idle(target: Target, backend: Target, *, conns: int) -> dict:
    """RSS of the target before and while holding ``conns`` idle sessions."""
    await run_connrate(target, backend, count=min(100, conns), concurrency=10, duration=30)  # warm-up
    await asyncio.sleep(0.5)
    before, backend_before = rss_kb(target.pids()), rss_kb(backend.pids())
    async with LoadGen(GEN_CORE, mode="idle", url=target.url, conns=conns, timeout=30,
                       connectConcurrency=100, hardLimit=900) as gen:
        t0 = time.monotonic()
        _checked(await gen.expect("ready", 600), conns)
        connect_s = time.monotonic() - t0
        await asyncio.sleep(1.0)
        after, backend_after = rss_kb(target.pids()), rss_kb(backend.pids())
        await gen.send("run")
        held = sum(r["held"] for r in await gen.expect("result", 60))
        await gen.send("close")
        await gen.expect("closed", 120)
    if held < conns:
        raise RuntimeError(f"only {held} of {conns} idle sessions still open after 1 s")
    out = {"sessions": held, "connect_s": round(connect_s, 2),
           "backend_kb_per_session": round((backend_after - backend_before) / held, 2)}
    if target.pids():
        out.update(rss_before_kb=before, rss_after_kb=after,
                   kb_per_session=round((after - before) / held, 2))
    return out


def scenario_plan(sizes: dict, names: list[str]) -> list[tuple[str, dict, callable]]:
    """(result key, parameters, coroutine function) for every selected scenario."""
    plan = []
    if "idle" in names:
        plan.append(("idle", sizes["idle"], run_idle))
    if "connrate" in names:
        plan.append(("connrate", sizes["connrate"], run_connrate))
    if "throughput" in names:
        t = sizes["throughput"]
        for size in t["sizes"]:
            for depth in t["depths"]:
                plan.append((f"tput_d{depth}_{size}B", {"conns": t["conns"], "depth": depth,
                             "size": size, "duration": t["duration"]}, run_echo))
    if "rate" in names:
        plan.append(("rate", sizes["rate"], run_echo))
    if "flood" in names:
        from .flood import run_flood
        plan.append(("flood", sizes["flood"], run_flood))
    return plan


# ------------------------------------------------------------------- run it all
async def run_targets(targets: list[Target], backend: EchoBackend, plan, reps: int, tmp: Path,
                      results: dict, wait_quiet: float = 0) -> None:
    for t in targets:
        reason = t.unavailable()
        results.setdefault(t.name, {"available": reason is None, "reason": reason, "runs": {}})
        if reason:
            log(f"skip {t.name}: {reason}")
    for rep in range(reps):
        for t in targets:
            entry = results[t.name]
            if not entry["available"]:
                continue
            runs = entry["runs"]
            try:
                await t.start(tmp / f"{t.name}-{rep}")
            except Exception as e:  # noqa: BLE001 - a target that cannot start is a result
                log(f"{t.name} failed to start: {e}")
                for key, _, _ in plan:
                    runs.setdefault(key, []).append({"error": f"start failed: {e}"})
                continue
            try:
                for key, params, fn in plan:
                    if wait_quiet:
                        await background_load(wait_quiet)
                    log(f"rep {rep + 1}/{reps} {t.name} {key} {params}")
                    try:
                        res = await fn(t, backend, **{k: v for k, v in params.items()
                                                      if k not in ("workers", "backend_ports")})
                    except Exception as e:  # noqa: BLE001
                        res = {"error": f"{type(e).__name__}: {e}"}
                    if not t.alive():
                        res["error"] = (f"{t.name} died (exit {t.proc.returncode}) during {key}: "
                                        f"{t.log_tail()}")
                    if not backend.alive():
                        raise RuntimeError(f"echo backend died: {backend.log_tail()}")
                    log(f"  -> {summary_line(res)}")
                    runs.setdefault(key, []).append(res)
                    if not t.alive():
                        break
            finally:
                t.stop()
            await asyncio.sleep(1.0)


def summary_line(res: dict) -> str:
    keys = ("error", "lost", "closed_early", "msgs_per_s", "proxy_us_per_msg", "proxy_user_us_per_msg", "p50_ms",
            "p99_ms", "kb_per_session",
            "backend_kb_per_session", "conns_per_s", "gen_cpu_pct", "proxy_cpu_pct", "other_cpu_pct")
    return ", ".join(f"{k}={res[k]}" for k in keys if k in res)


def summarize(results: dict) -> dict:
    """Median, min and max of every numeric figure over the repetitions."""
    out: dict = {}
    for name, entry in results.items():
        for key, reps in entry["runs"].items():
            ok = [r for r in reps if "error" not in r]
            figures = {}
            for metric in (ok[0] if ok else {}):
                values = [r[metric] for r in ok if isinstance(r.get(metric), (int, float))]
                if values:
                    figures[metric] = {"median": statistics.median(values), "min": min(values),
                                       "max": max(values), "n": len(values)}
            errors = [r["error"] for r in reps if "error" in r]
            out.setdefault(name, {})[key] = {**figures, **({"errors": errors} if errors else {})}
    return out


def environment(args) -> dict:
    def version(cmd: list[str]) -> str | None:
        try:
            p = subprocess.run(cmd, capture_output=True, text=True, timeout=10)
            return (p.stdout + p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.SubprocessError):
            return None
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
                if line.startswith("model name")), platform.processor())
    ws_pkg = HERE / "node_modules" / "ws" / "package.json"
    return {
        "date": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "cpu": cpu, "cores": os.cpu_count(),
        "kernel": platform.release(), "python": platform.python_version(),
        "node": version(["node", "--version"]),
        "ws": json.loads(ws_pkg.read_text())["version"] if ws_pkg.exists() else None,
        "nginx": version(["/usr/sbin/nginx", "-v"]), "haproxy": version(["/usr/sbin/haproxy", "-v"]),
        "pinning": None if args.no_pin else {"load_generator_and_backend": GEN_CORE, "proxy": PROXY_CORE},
        "load_generator": "Node ws + bufferutil (benchmarks/loadgen.js), text frames, no compression",
        "counting": "one echo = 2 relayed messages (client->backend and backend->client); "
                    "proxy_us_per_msg = proxy CPU (utime+stime, process tree) / relayed messages",
        "quick": args.quick, "reps": args.reps,
        "gateway_tree": str(args.gateway_tree) if args.gateway_tree else None,
        "gateway_commit": _commit(args.gateway_tree or HERE.parent),
    }


def _commit(tree: Path) -> str | None:
    try:
        p = subprocess.run(["git", "-C", str(tree), "rev-parse", "--short", "HEAD"], capture_output=True,
                           text=True, timeout=10)
        return p.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


async def main_async(args) -> dict:
    global GEN_CORE, PROXY_CORE
    if args.no_pin:
        GEN_CORE = PROXY_CORE = None
    sizes = json.loads(json.dumps(QUICK if args.quick else FULL))
    if args.rate:
        sizes["rate"]["rate"] = args.rate
    if args.idle_conns:
        sizes["idle"]["conns"] = args.idle_conns
    if args.conn_count:
        sizes["connrate"]["count"] = args.conn_count
    if args.duration:
        sizes["throughput"]["duration"] = sizes["rate"]["duration"] = args.duration
    names = args.scenarios.split(",")
    for name in names:
        if name in PLACEHOLDERS:
            log(f"scenario '{name}' ({PLACEHOLDERS[name]}): not implemented yet")
        elif name not in SCENARIOS + EXTRA_SCENARIOS and name not in CLUSTER_SCENARIOS:
            raise SystemExit(f"unknown scenario {name!r}; choose from "
                             f"{SCENARIOS + EXTRA_SCENARIOS + list(CLUSTER_SCENARIOS) + list(PLACEHOLDERS)}")
    ensure_node_modules()
    background = await background_load(args.wait_quiet)
    if background >= 15:
        log(f"WARNING: other processes use {background} % of a core; figures will be disturbed")
    tmp = Path(tempfile.mkdtemp(prefix="gwbench-"))
    results: dict = {}
    drain = None
    try:
        if "drain" in names:
            from . import resume
            drain = await resume.main_async(resume.parse_args([
                "--sessions", "40" if args.quick else "5000", "--reps", str(args.reps),
                "--port-base", str(args.port_base + 200)] + (["--tree", str(args.gateway_tree)]
                                                             if args.gateway_tree else [])))
            resume.write(drain, args.out)
        if not any(n in SCENARIOS + EXTRA_SCENARIOS for n in names):
            names = []
        backend_port = args.port_base + 1
        backend = EchoBackend([backend_port], core=GEN_CORE)
        await backend.start(tmp / "backend")
        try:
            targets = make_targets(args.targets.split(","), [backend_port], PROXY_CORE, base=args.port_base,
                                   tree=args.gateway_tree) if names else []
            await run_targets(targets, backend, scenario_plan(sizes, names), args.reps, tmp, results,
                              args.wait_quiet)
        finally:
            backend.stop()
        if args.stretch:
            await run_stretch(args, sizes["stretch"], tmp, results)
    finally:
        if not args.keep_tmp:
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            log(f"kept logs and configs in {tmp}")
    return {
        "environment": {**environment(args), "other_cpu_pct_at_start": background},
        "sizes": sizes,
        "not_implemented": {k: f"{v}: not implemented yet" for k, v in PLACEHOLDERS.items()},
        "targets": {k: {"available": v["available"], "reason": v["reason"]} for k, v in results.items()},
        "summary": summarize(results),
        "runs": {k: v["runs"] for k, v in results.items()},
        **({"drain": {"summary": drain["summary"], "file": "resume.json"}} if drain else {}),
    }


async def run_stretch(args, stretch: dict, tmp: Path, results: dict) -> None:
    """50,000 idle sessions: multi-worker targets, several backend and generator processes."""
    ports = [args.port_base + p for p in stretch["backend_ports"]]
    backend = EchoBackend(ports, core=GEN_CORE)
    await backend.start(tmp / "backend-stretch")
    try:
        names = [n for n in args.targets.split(",") if n in ("nginx", "gateway")]
        targets = make_targets(names, ports, None, workers=stretch["workers"], base=args.port_base,
                               tree=args.gateway_tree)
        for t, name in zip(targets, names, strict=True):
            t.name = name  # same column as the single-worker figures, key "stretch_idle"
        plan = [("stretch_idle", {"conns": stretch["conns"]}, run_idle)]
        await run_targets(targets, backend, plan, 1, tmp, results, args.wait_quiet)
    finally:
        backend.stop()


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="smoke sizes, 1 repetition (for tests)")
    p.add_argument("--targets", default=",".join(TARGET_NAMES), help=f"comma list of {TARGET_NAMES}")
    p.add_argument("--scenarios", default=",".join(SCENARIOS),
                   help=f"comma list of {SCENARIOS} (the default) and {list(CLUSTER_SCENARIOS)} (two nodes and "
                        f"Redis: benchmarks/resume.py); placeholders {list(PLACEHOLDERS)} are not implemented yet")
    p.add_argument("--reps", type=int, help="repetitions (default 3, --quick 1)")
    p.add_argument("--rate", type=float, help="offered rate for the 'rate' scenario (msg/s sent by clients)")
    p.add_argument("--idle-conns", type=int, help="idle sessions for the 'idle' scenario")
    p.add_argument("--conn-count", type=int, help="connections the 'connrate' scenario opens (default 3,000)")
    p.add_argument("--duration", type=float, help="seconds per throughput/rate measurement")
    p.add_argument("--stretch", action="store_true", help="also hold 50,000 idle sessions (multi-worker)")
    p.add_argument("--port-base", type=int, default=18000,
                   help="ports used: BASE+1 backend, +2 nginx, +3 haproxy, +4 naive, +80 gateway, +1090 admin")
    p.add_argument("--wait-quiet", type=float, default=0,
                   help="before each measurement, wait up to this many seconds for other processes to go idle")
    p.add_argument("--no-pin", action="store_true", help="do not pin processes to cores with taskset")
    p.add_argument("--out", type=Path, default=HERE / "results", help="directory for latest.json/.md, chart.png")
    p.add_argument("--update-doc", action="store_true", help="write the table into BENCHMARKS.md")
    p.add_argument("--report-only", action="store_true",
                   help="only redo latest.md, chart.png (and --update-doc) from OUT/latest.json")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir with configs and logs")
    p.add_argument("--gateway-tree", type=Path,
                   help="run the gateway from this source tree (a git worktree of another commit: A/B)")
    args = p.parse_args(argv)
    if args.reps is None:
        args.reps = 1 if args.quick else 3
    return args


def main(argv=None) -> int:
    from .report import write_reports
    args = parse_args(argv)
    # SIGTERM like Ctrl-C, so that the finally blocks stop every process we started.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    if args.report_only:
        write_reports(json.loads((args.out / "latest.json").read_text()), args.out, args.update_doc)
        return 0
    report = asyncio.run(main_async(args))
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "latest.json").write_text(json.dumps(report, indent=1))
    write_reports(report, args.out, update_doc=args.update_doc)
    log(f"wrote {args.out / 'latest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
