"""Where a new session's CPU goes: py-spy on the gateway under the connrate load.

    python -m benchmarks.profile_handshake                 # 20,000 sessions, 50 at a time
    python -m benchmarks.profile_handshake --count 5000 --tree /tmp/before   # another checkout

Starts the echo backend and one gateway (the harness's `gateway` target, same
config and pinning), attaches `py-spy record` to the gateway at 1,000 Hz
(idle samples, the event loop waiting in epoll, are not recorded), opens
`--count` sessions (handshake, one echo, close) with the Node generator, and
prints the functions with the most samples: `self` is time in the function
itself (with the C code it calls), `total` with everything below it. The
collapsed stacks go to `--out` (feed them to flamegraph.pl or speedscope).
py-spy: `pip install py-spy` (it needs ptrace, i.e. root or CAP_SYS_PTRACE).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from .loadgen import LoadGen, ensure_node_modules
from .targets import EchoBackend, Gateway, cpu_split

GEN_CORE, PROXY_CORE = "0", "1"


def top(collapsed: Path, n: int) -> str:
    """Self and total sample counts per function from py-spy's raw (collapsed) output."""
    own: collections.Counter = collections.Counter()
    total: collections.Counter = collections.Counter()
    samples = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        samples += k
        frames = [f.split(" (", 1)[0] + " " + f.rsplit("/", 1)[-1].rstrip(")").split(":")[0]
                  for f in stack.split(";")]
        own[frames[-1]] += k
        for f in set(frames):
            total[f] += k
    out = [f"{samples} samples"]
    for title, table in (("self", own), ("total", total)):
        out.append(f"\n{title:>6} %  function")
        for name, k in table.most_common(n):
            out.append(f"{100 * k / max(samples, 1):8.1f}  {name}")
    return "\n".join(out)


async def main_async(args) -> None:
    ensure_node_modules()
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    tmp = Path(tempfile.mkdtemp(prefix="gwprof-"))
    backend = EchoBackend([args.port_base + 1], core=GEN_CORE)
    gw = Gateway(args.port_base + 80, [args.port_base + 1], PROXY_CORE, admin_port=args.port_base + 1090,
                 tree=args.tree)
    await backend.start(tmp / "backend")
    try:
        await gw.start(tmp / "gateway")
        try:
            # Warm up (imports, first allocations), then profile the measured load only.
            async with LoadGen(GEN_CORE, mode="connrate", url=gw.url, count=200, conns=0,
                               connectConcurrency=args.concurrency, duration=60, timeout=10,
                               hardLimit=120) as gen:
                await gen.expect("ready", 30)
                await gen.send("run")
                await gen.expect("result", 60)
                await gen.send("close")
            if args.perf:
                spy = subprocess.Popen(["perf", "record", "-F", str(args.rate), "-p", str(gw.proc.pid),
                                        "-o", str(args.out)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            else:
                spy = subprocess.Popen([pyspy, "record", "--pid", str(gw.proc.pid), "--rate", str(args.rate),
                                        "--format", "raw", "--output", str(args.out)]
                                       + (["--native"] if args.native else ["--nonblocking"]),
                                       stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
            await asyncio.sleep(1.0)
            before = cpu_split(gw.pids())
            async with LoadGen(GEN_CORE, mode="connrate", url=gw.url, count=args.count, conns=0,
                               connectConcurrency=args.concurrency, duration=600, timeout=10,
                               hardLimit=700) as gen:
                await gen.expect("ready", 30)
                await gen.send("run")
                res = await gen.expect("result", 660)
                await gen.send("close")
            after = cpu_split(gw.pids())
            spy.send_signal(2)  # SIGINT: py-spy writes its output and exits
            spy.wait(30)
        finally:
            gw.stop()
    finally:
        backend.stop()
        shutil.rmtree(tmp, ignore_errors=True)
    opened = sum(r["opened"] for r in res)
    user, system = (a - b for a, b in zip(after, before))
    print(f"{opened} sessions; gateway CPU (py-spy attached, so a little higher than in the harness): "
          f"{1e6 * (user + system) / opened:.0f} us per session, user {1e6 * user / opened:.0f}, "
          f"kernel {1e6 * system / opened:.0f}")
    if args.perf:
        print(subprocess.run(["perf", "report", "-i", str(args.out), "--sort", "dso", "--stdio"],
                             capture_output=True, text=True).stdout)
        print(subprocess.run(["perf", "report", "-i", str(args.out), "--sort", "dso,sym", "--stdio"],
                             capture_output=True, text=True).stdout[:12000])
    else:
        print(top(args.out, args.top))


def main(argv=None) -> None:
    p = argparse.ArgumentParser(prog="python -m benchmarks.profile_handshake", description=__doc__.splitlines()[0])
    p.add_argument("--count", type=int, default=20_000, help="sessions to open (handshake, one echo, close)")
    p.add_argument("--concurrency", type=int, default=50)
    p.add_argument("--rate", type=int, default=1000, help="py-spy samples per second")
    p.add_argument("--top", type=int, default=30)
    p.add_argument("--tree", type=Path, help="run the gateway from this source tree")
    p.add_argument("--port-base", type=int, default=18500)
    p.add_argument("--native", action="store_true", help="py-spy --native: C frames (uvloop, the interpreter) too")
    p.add_argument("--perf", action="store_true", help="perf record (native: kernel, interpreter, uvloop) "
                   "instead of py-spy; --out is then perf.data")
    p.add_argument("--out", type=Path, default=Path("handshake-profile.txt"), help="collapsed stacks")
    asyncio.run(main_async(p.parse_args(argv)))


if __name__ == "__main__":
    main()
