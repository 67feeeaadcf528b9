"""`workers: N`: N processes on one port (SO_REUSEPORT), supervised.

The parent starts each worker as its own interpreter, restarts one that
crashes (with a back-off so a crash loop does not spin), and forwards
SIGTERM/SIGINT (drain and exit) and SIGHUP (reload) to all of them.
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import tempfile
import time

from .logs import event

log = logging.getLogger("gateway.supervisor")


def _die_with(parent: int):
    """A worker's preexec: when the supervisor dies (even by SIGKILL), the kernel
    sends the worker SIGTERM, so it drains and exits instead of serving on,
    orphaned, on the shared port. Linux only; elsewhere a no-op."""
    if not sys.platform.startswith("linux"):
        return None
    import ctypes

    libc = ctypes.CDLL(None, use_errno=True)

    def preexec() -> None:
        libc.prctl(1, signal.SIGTERM)   # PR_SET_PDEATHSIG; kept across exec
        if os.getppid() != parent:      # the supervisor died before the line above
            os._exit(1)
    return preexec


def supervise(config_path: str, n: int, grace_s: float) -> int:
    if not os.environ.get("PROMETHEUS_MULTIPROC_DIR"):
        os.environ["PROMETHEUS_MULTIPROC_DIR"] = tempfile.mkdtemp(prefix="gateway-metrics-")
    from . import metrics

    preexec = _die_with(os.getpid())

    def spawn(i: int) -> subprocess.Popen:
        return subprocess.Popen([sys.executable, "-m", "gateway", "run", "--config", config_path,
                                 "--worker-index", str(i)], preexec_fn=preexec)

    procs = {i: spawn(i) for i in range(n)}
    started = {i: time.monotonic() for i in range(n)}
    stopping = False

    def forward(signum, _frame):
        nonlocal stopping
        if signum in (signal.SIGTERM, signal.SIGINT):
            stopping = True
        for p in procs.values():
            if p.poll() is None:
                p.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        signal.signal(sig, forward)
    event(log, "supervisor_started", workers=n, pids=[p.pid for p in procs.values()])
    deadline = None
    while True:
        time.sleep(0.2)
        if stopping and deadline is None:
            deadline = time.monotonic() + grace_s + 5
        for i, p in list(procs.items()):
            code = p.poll()
            if code is None:
                continue
            metrics.worker_exited(p.pid)
            if stopping:
                continue
            event(log, "worker_exited", logging.ERROR, worker=i, pid=p.pid, code=code)
            # Back off if it died young: a crash loop must not spin the CPU.
            if time.monotonic() - started[i] < 1.0:
                time.sleep(1.0)
            procs[i] = spawn(i)
            started[i] = time.monotonic()
            event(log, "worker_restarted", worker=i, pid=procs[i].pid)
        if stopping:
            if all(p.poll() is not None for p in procs.values()):
                return 0
            if time.monotonic() > deadline:
                for p in procs.values():
                    if p.poll() is None:
                        p.kill()
                return 1
