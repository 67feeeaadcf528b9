"""Processes under test: the echo backend and the proxies in front of it.

One ``Target`` abstraction: ``start(tmp)`` writes the target's config into a
private temp dir, launches it (pinned with ``taskset`` when ``core`` is set),
waits until it is ready; ``pids()`` is its process tree (master + workers),
which ``/proc`` readers sum for CPU time and RSS; ``stop()`` ends it.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
HOST = "127.0.0.1"
TICKS = os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- /proc readers
def _stat_fields(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()  # fields from "state" on


def process_tree(root: int) -> list[int]:
    """``root`` and all its descendants (by scanning /proc for parent ids)."""
    children: dict[int, list[int]] = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                children.setdefault(int(_stat_fields(int(entry))[1]), []).append(int(entry))
            except (OSError, IndexError):
                pass
    tree, todo = [], [root]
    while todo:
        pid = todo.pop()
        tree.append(pid)
        todo.extend(children.get(pid, []))
    return tree


def cpu_seconds(pids: list[int]) -> float:
    """utime + stime of the given processes (all their threads), in seconds."""
    return sum(cpu_split(pids))


def cpu_split(pids: list[int]) -> tuple[float, float]:
    """(utime, stime) of the given processes (all their threads), in seconds.

    Apart, because a change to the gateway's Python moves utime while the
    loopback TCP that dominates the total is stime, and noisier."""
    user = system = 0
    for pid in pids:
        try:
            fields = _stat_fields(pid)
            user += int(fields[11])
            system += int(fields[12])
        except (OSError, IndexError):
            pass
    return user / TICKS, system / TICKS


def rss_kb(pids: list[int]) -> int:
    """Sum of VmRSS (KiB) of the given processes."""
    total = 0
    for pid in pids:
        try:
            with open(f"/proc/{pid}/status") as f:
                total += next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))
        except (OSError, StopIteration):
            pass
    return total


def _die_with_parent() -> None:
    """In the child before exec: get SIGTERM when the harness dies (prctl PR_SET_PDEATHSIG)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)
    except (OSError, AttributeError):
        pass


def pinned(argv: list[str], core: str | None) -> list[str]:
    return ["taskset", "-c", core, *argv] if core and shutil.which("taskset") else argv


# ---------------------------------------------------------------------- targets
class Target:
    """A process (tree) listening on ``port``; subclasses say how to run it."""

    name = "target"
    ready_timeout = 20.0
    cwd = ROOT  # where the process runs (the gateway: which source tree)

    def __init__(self, port: int, upstreams: list[int], core: str | None = "1", workers: int = 1):
        self.port, self.upstreams, self.core, self.workers = port, upstreams, core, workers
        self.proc: subprocess.Popen | None = None
        self.log: Path | None = None

    # -- per target
    def unavailable(self) -> str | None:
        """Reason this target cannot run here, or None."""
        return None

    def argv(self, tmp: Path) -> list[str]:
        raise NotImplementedError

    async def is_ready(self) -> bool:
        try:
            _, writer = await asyncio.open_connection(HOST, self.port)
        except OSError:
            return False
        writer.close()
        return True

    # -- common
    @property
    def url(self) -> str:
        return f"ws://{HOST}:{self.port}/"

    async def start(self, tmp: Path) -> None:
        tmp.mkdir(parents=True, exist_ok=True)
        self.log = tmp / f"{self.name}.log"
        argv = pinned(self.argv(tmp), self.core)
        with open(self.log, "wb") as log:
            self.proc = subprocess.Popen(argv, cwd=self.cwd, stdin=subprocess.DEVNULL, stdout=log,
                                         stderr=subprocess.STDOUT, start_new_session=True,
                                         preexec_fn=_die_with_parent)
        deadline = time.monotonic() + self.ready_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"{self.name} exited with {self.proc.returncode}: {self.log_tail()}")
            if await self.is_ready():
                return
            await asyncio.sleep(0.1)
        self.stop()
        raise RuntimeError(f"{self.name} not ready after {self.ready_timeout}s: {self.log_tail()}")

    def alive(self) -> bool:
        return self.proc is None or self.proc.poll() is None

    def pids(self) -> list[int]:
        return process_tree(self.proc.pid) if self.proc and self.proc.poll() is None else []

    def stop(self) -> None:
        if not self.proc or self.proc.poll() is not None:
            return
        for sig, wait in ((signal.SIGTERM, 10), (signal.SIGKILL, 5)):
            try:
                os.killpg(self.proc.pid, sig)  # own session: the target and its workers only
            except ProcessLookupError:
                return
            try:
                self.proc.wait(wait)
                return
            except subprocess.TimeoutExpired:
                continue

    def log_tail(self, n: int = 1500) -> str:
        try:
            return self.log.read_text(errors="replace")[-n:].strip() if self.log else ""
        except OSError:
            return ""


class EchoBackend(Target):
    name = "backend"

    def __init__(self, ports: list[int], core: str | None = "0"):
        super().__init__(ports[0], [], core)
        self.ports = ports

    def argv(self, tmp: Path) -> list[str]:
        return [sys.executable, str(HERE / "echo_backend.py"), "--ports", ",".join(map(str, self.ports))]


class Direct(Target):
    """No proxy: the load generator talks to the backend itself (the floor)."""

    name = "direct"

    async def start(self, tmp: Path) -> None:
        self.port = self.upstreams[0]

    def pids(self) -> list[int]:
        return []

    def stop(self) -> None:
        pass


class Nginx(Target):
    name = "nginx"
    binary = "/usr/sbin/nginx"

    def unavailable(self) -> str | None:
        return None if os.access(self.binary, os.X_OK) else f"{self.binary} not installed"

    def argv(self, tmp: Path) -> list[str]:
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            (tmp / f"{d}_temp").mkdir(exist_ok=True)
        servers = "".join(f"    server {HOST}:{p};\n" for p in self.upstreams)
        (tmp / "nginx.conf").write_text(f"""
daemon off;
master_process on;
worker_processes {self.workers};
worker_rlimit_nofile 20000;
pid {tmp}/nginx.pid;
error_log {tmp}/error.log warn;
# 2 connections (client + upstream) per session; nginx starts dropping not-yet-active
# connections when fewer than 1/16 of worker_connections are free, hence the margin.
events {{ worker_connections 21400; use epoll; }}
http {{
  access_log off;
  client_body_temp_path {tmp}/client_body_temp;
  proxy_temp_path {tmp}/proxy_temp;
  fastcgi_temp_path {tmp}/fastcgi_temp;
  uwsgi_temp_path {tmp}/uwsgi_temp;
  scgi_temp_path {tmp}/scgi_temp;
  map $http_upgrade $connection_upgrade {{ default upgrade; '' close; }}
  upstream echo {{
{servers}  }}
  server {{
    listen {HOST}:{self.port} backlog=4096{' reuseport' if self.workers > 1 else ''};
    location / {{
      proxy_pass http://echo;
      proxy_http_version 1.1;
      proxy_set_header Upgrade $http_upgrade;
      proxy_set_header Connection $connection_upgrade;
      proxy_read_timeout 3600s;
      proxy_send_timeout 3600s;
    }}
  }}
}}
""")
        return [self.binary, "-p", f"{tmp}/", "-e", f"{tmp}/error.log", "-c", f"{tmp}/nginx.conf"]


class HAProxy(Target):
    name = "haproxy"
    binary = "/usr/sbin/haproxy"

    def unavailable(self) -> str | None:
        return None if os.access(self.binary, os.X_OK) else f"{self.binary} not installed"

    def argv(self, tmp: Path) -> list[str]:
        servers = "".join(f"  server s{i} {HOST}:{p}\n" for i, p in enumerate(self.upstreams))
        (tmp / "haproxy.cfg").write_text(f"""
global
  nbthread 1
  maxconn 9950
defaults
  mode http
  timeout connect 5s
  timeout client 1h
  timeout server 1h
  timeout tunnel 1h
frontend fe
  bind {HOST}:{self.port} backlog 4096
  default_backend echo
backend echo
  balance roundrobin
{servers}""")
        return [self.binary, "-db", "-f", str(tmp / "haproxy.cfg")]


class Naive(Target):
    name = "naive"

    def argv(self, tmp: Path) -> list[str]:
        return [sys.executable, str(HERE / "naive_proxy.py"), "--port", str(self.port),
                "--upstream", f"ws://{HOST}:{self.upstreams[0]}"]


class Gateway(Target):
    """``python -m gateway run --config FILE`` (ready when /readyz answers 200)."""

    name = "gateway"
    ready_timeout = 30.0

    # Extra keys for the ``limits`` mapping (the rate-limited target sets a token bucket).
    extra_limits = ""

    def __init__(self, *args, admin_port: int, tree: Path | None = None, **kwargs):
        super().__init__(*args, **kwargs)
        self.admin_port = admin_port
        # `python -m gateway` runs from this tree: another checkout (git worktree) for an A/B.
        self.cwd = Path(tree) if tree is not None else ROOT
        if self.workers != 1:
            self.name = f"gateway-{self.workers}w"

    def unavailable(self) -> str | None:
        if not (self.cwd / "gateway" / "__main__.py").exists():
            return f"gateway not available ({self.cwd}/gateway/__main__.py does not exist)"
        return None

    def backend_yaml(self) -> str:
        """The `bench` backend's mapping: the websocket echo backends."""
        endpoints = ", ".join(f'"ws://{HOST}:{p}/"' for p in self.upstreams)
        return f"{{type: websocket, endpoints: [{endpoints}]}}"

    def extra_yaml(self) -> str:
        """More top-level keys, one per line (a cluster node's id, Redis and drain)."""
        return ""

    def argv(self, tmp: Path) -> list[str]:
        config = tmp / "gateway.yaml"
        config.write_text(f"""\
{self.extra_yaml()}listen: {{host: {HOST}, port: {self.port}}}
admin: {{host: {HOST}, port: {self.admin_port}}}
workers: {self.workers}
limits: {{max_connections: 60000, max_connections_per_ip: 60000, idle_timeout_s: 3600{self.extra_limits}}}
backends:
  bench: {self.backend_yaml()}
routes:
  - name: bench
    match: {{path_prefix: /}}
    auth: none
    backend: bench
""")
        return [sys.executable, "-m", "gateway", "run", "--config", str(config)]

    async def is_ready(self) -> bool:
        try:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as s:
                async with s.get(f"http://{HOST}:{self.admin_port}/readyz") as r:
                    return r.status == 200
        except (aiohttp.ClientError, asyncio.TimeoutError, OSError):
            return False


class RateLimitedGateway(Gateway):
    """The gateway with a per-connection token bucket so large it never drops a message:
    what the rate-limit check itself costs per message."""

    name = "gateway-ratelimited"
    extra_limits = ", messages_per_second: 100000, burst: 100000"


def make_targets(names: list[str], backend_ports: list[int], core: str | None,
                 workers: int | None = None, base: int = 18000, tree: Path | None = None) -> list[Target]:
    """Build targets by name, listening on ``base`` + 2, 3, 4, 80 (admin ``base`` + 1090);
    ``workers`` overrides the worker count (stretch run); the gateway runs from ``tree``
    (default: this checkout)."""
    w = workers or 1
    gw = {"admin_port": base + 1090, "tree": tree}
    factories = {
        "direct": lambda: Direct(0, backend_ports, None),
        "nginx": lambda: Nginx(base + 2, backend_ports, core, workers=w),
        "haproxy": lambda: HAProxy(base + 3, backend_ports, core),
        "naive": lambda: Naive(base + 4, backend_ports, core),
        "gateway": lambda: Gateway(base + 80, backend_ports, core, workers=w, **gw),
        "gateway-ratelimited": lambda: RateLimitedGateway(base + 80, backend_ports, core, workers=w, **gw),
        # Two workers are not pinned: pinned to one core they could not scale.
        "gateway-2w": lambda: Gateway(base + 80, backend_ports, None, workers=2, **gw),
    }
    unknown = [n for n in names if n not in factories]
    if unknown:
        raise SystemExit(f"unknown target(s) {unknown}; choose from {sorted(factories)}")
    return [factories[n]() for n in names]


TARGET_NAMES = ["direct", "nginx", "haproxy", "naive", "gateway", "gateway-ratelimited", "gateway-2w"]
