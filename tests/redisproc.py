"""Throwaway redis-server processes for the tests: one server, or a Sentinel set.

Each listens on 127.0.0.1 only, on a port picked free, with no persistence
and its own temp dir, so a test can kill it, start it again on the same port
(empty: nothing is saved) and find it where it was. Every wait polls with a
bound; nothing sleeps a fixed time hoping a server is up.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

INSTALL_HINT = "redis-server is not on PATH; install it (Debian/Ubuntu: apt-get install redis-server)"


def require_redis_server() -> str:
    path = shutil.which("redis-server")
    if path is None:
        raise RuntimeError(INSTALL_HINT)
    return path


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_for(predicate, timeout_s: float, what: str, interval_s: float = 0.05):
    """Poll `predicate` until it returns something truthy; fail after `timeout_s`."""
    deadline = time.monotonic() + timeout_s
    last_error = None
    while True:
        try:
            value = predicate()
            if value:
                return value
        except (redis.RedisError, OSError) as e:
            last_error = e
        if time.monotonic() >= deadline:
            raise TimeoutError(f"gave up after {timeout_s} s waiting for {what}"
                               + (f" (last error: {last_error!r})" if last_error else ""))
        time.sleep(interval_s)


class RedisProcess:
    """One redis-server (or, with `sentinel_conf`, one sentinel) on a fixed port."""

    def __init__(self, *args: str, port: int | None = None, sentinel_conf: str | None = None):
        self.binary = require_redis_server()
        self.port = port or free_port()
        self.args = args
        self.sentinel_conf = sentinel_conf
        self.dir = tempfile.mkdtemp(prefix="gw-redis-")
        self.proc: subprocess.Popen | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @property
    def address(self) -> tuple[str, int]:
        return ("127.0.0.1", self.port)

    def client(self, **kw) -> redis.Redis:
        """A synchronous client for the test's own checks (short timeouts, no retries)."""
        kw.setdefault("socket_timeout", 0.5)
        kw.setdefault("socket_connect_timeout", 0.5)
        return redis.Redis(host="127.0.0.1", port=self.port, retry=Retry(NoBackoff(), 0),
                           **kw)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def start(self, timeout_s: float = 10.0) -> "RedisProcess":
        if self.running:
            return self
        if self.sentinel_conf is not None:
            conf = os.path.join(self.dir, "sentinel.conf")
            with open(conf, "w") as f:          # sentinel rewrites its file: a fresh one each start
                f.write(f"port {self.port}\nbind 127.0.0.1\ndir {self.dir}\n{self.sentinel_conf}")
            cmd = [self.binary, conf, "--sentinel"]
        else:
            cmd = [self.binary, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                   "--appendonly", "no", "--dir", self.dir, "--protected-mode", "no", *self.args]
        log = open(os.path.join(self.dir, "redis.log"), "ab")
        self.proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
        log.close()
        wait_for(self._ping, timeout_s, f"redis-server on port {self.port} to answer PING")
        return self

    def _ping(self) -> bool:
        if not self.running:
            raise RuntimeError(f"redis-server on port {self.port} exited: {self.log_tail()}")
        with contextlib.closing(self.client()) as c:
            return c.ping()

    def stop(self) -> None:
        """SIGKILL: what a crash looks like to clients (connections reset, nothing saved)."""
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.send_signal(signal.SIGKILL)
            self.proc.wait(timeout=5)
            self.proc = None

    def close(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)

    def log_tail(self, n: int = 20) -> str:
        with contextlib.suppress(OSError), open(os.path.join(self.dir, "redis.log"), "rb") as f:
            return b"".join(f.readlines()[-n:]).decode(errors="replace")
        return ""


class SentinelSet:
    """A master, one replica and three sentinels (quorum 2) watching them as `m`.

    Failure detection is tuned down (down-after 1000 ms) so that a test that
    kills the master sees the replica promoted in a few seconds."""

    def __init__(self, master_name: str = "m"):
        self.master_name = master_name
        self.master = RedisProcess()
        self.replica = RedisProcess("--replicaof", "127.0.0.1", str(self.master.port))
        conf = (f"sentinel monitor {master_name} 127.0.0.1 {self.master.port} 2\n"
                f"sentinel down-after-milliseconds {master_name} 1000\n"
                f"sentinel failover-timeout {master_name} 3000\n"
                f"sentinel parallel-syncs {master_name} 1\n")
        self.sentinels = [RedisProcess(sentinel_conf=conf) for _ in range(3)]

    @property
    def addresses(self) -> list[tuple[str, int]]:
        return [s.address for s in self.sentinels]

    def start(self, timeout_s: float = 15.0) -> "SentinelSet":
        self.master.start()
        self.replica.start()
        for s in self.sentinels:
            s.start()
        wait_for(self._replica_in_sync, timeout_s, "the replica to sync with the master")
        wait_for(self._sentinels_ready, timeout_s, "the sentinels to see each other and the replica")
        return self

    def _replica_in_sync(self) -> bool:
        with contextlib.closing(self.replica.client()) as c:
            return c.info("replication").get("master_link_status") == "up"

    def _sentinels_ready(self) -> bool:
        for s in self.sentinels:
            with contextlib.closing(s.client()) as c:
                state = c.sentinel_master(self.master_name)
                replicas = c.sentinel_slaves(self.master_name)
            if int(state.get("num-other-sentinels", 0)) < len(self.sentinels) - 1:
                return False
            if not any(r["port"] == self.replica.port and not r["is_sdown"] for r in replicas):
                return False
        return True

    def master_port(self) -> int | None:
        """The master's port as the sentinels' majority reports it, or None."""
        ports = []
        for s in self.sentinels:
            with contextlib.suppress(redis.RedisError, OSError), contextlib.closing(s.client()) as c:
                addr = c.sentinel_get_master_addr_by_name(self.master_name)
                if addr:
                    ports.append(int(addr[1]))
        for p in set(ports):
            if ports.count(p) >= 2:
                return p
        return None

    def wait_promoted(self, timeout_s: float = 20.0) -> None:
        """After the master is killed: until the sentinels name the replica and it takes writes."""
        wait_for(lambda: self.master_port() == self.replica.port, timeout_s, "the sentinels to promote the replica")

        def writable() -> bool:
            with contextlib.closing(self.replica.client()) as c:
                return c.info("replication").get("role") == "master"
        wait_for(writable, timeout_s, "the promoted replica to take writes")

    def close(self) -> None:
        for p in [*self.sentinels, self.replica, self.master]:
            p.close()
