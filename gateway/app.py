"""Wiring: the only place that puts the node, the listener and the admin API together."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import os
import signal

from aiohttp import web

from . import admin, config as config_mod, metrics, reattach
from .cluster import Cluster
from .drain import Drainer
from .errors import ConfigError
from .handshake import Handshake
from .logs import event
from .server import Node
from .store import MemoryStore


def make_store(cfg: config_mod.Config):
    """The store the config names: Redis (a URL or a Sentinel set), or memory."""
    r = cfg.redis
    if r is None:
        return MemoryStore()
    from .store import RedisStore

    sentinel = (r.sentinel.master, list(r.sentinel.addresses)) if r.sentinel is not None else None
    return RedisStore(r.url, sentinel=sentinel, key_prefix=r.key_prefix, timeout_s=r.timeout_s,
                      session_ttl_s=r.session_ttl_s)

log = logging.getLogger("gateway")

WATCH_S = 1.0   # watch: true polls the config file this often


def config_digest(path: str) -> bytes | None:
    """A digest of the file's content as the path resolves now (None: unreadable)."""
    try:
        with open(path, "rb") as fh:
            return hashlib.sha256(fh.read()).digest()
    except OSError:
        return None


class Gateway:
    """A running node: listener, admin API, signal handling, shutdown."""

    def __init__(self, cfg: config_mod.Config, *, reuse_port: bool = False, worker: int | None = None):
        self.cfg = cfg
        self.reuse_port = reuse_port
        self.worker = worker
        self.node: Node | None = None
        self.cluster: Cluster | None = None
        self.drainer: Drainer | None = None
        self.server: asyncio.AbstractServer | None = None
        self.runner: web.AppRunner | None = None
        self.stopping = asyncio.Event()
        self._watcher: asyncio.Task | None = None   # watch: true (watch_config)
        self._applied: bytes | None = None          # digest of the config file as last (re)loaded
        self.ports: tuple[int, int] = (0, 0)

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        cfg = self.cfg
        node = self.node = Node(cfg, loop)
        if self.worker is not None and cfg.node_id != "auto":
            node.node_id = f"{cfg.node_id}-{self.worker}"   # each worker is a node of the cluster
        cluster = self.cluster = Cluster(node, make_store(cfg), cfg.redis)
        node.cluster = cluster
        node.on_open = cluster.opened
        node.on_close = cluster.closed
        node.channels.observer = cluster
        node.drainer = self.drainer = Drainer(node, cluster)
        app = admin.build(node, cluster, self.drain_node, self.reload_node)   # refuses an open admin API
        await cluster.start()
        try:
            await node.start_identity()
            self.runner = web.AppRunner(app, access_log=None, handle_signals=False)
            await self.runner.setup()
            site = web.TCPSite(self.runner, cfg.admin.host, cfg.admin.port, reuse_port=self.reuse_port or None)
            await site.start()
            self.server = await loop.create_server(lambda: Handshake(node), cfg.listen.host, cfg.listen.port,
                                                   reuse_port=self.reuse_port or None, backlog=4096)
        except BaseException:
            # A port in use, say: leave no heartbeat behind claiming this node is up.
            await cluster.stop()
            if self.runner is not None:
                await self.runner.cleanup()
            raise
        node.start()
        reattach.watch_health(node)   # a failed health check moves sessions (reattach backends)
        if cfg.watch:
            self.watch_config()
        listen_port = self.server.sockets[0].getsockname()[1]
        admin_port = site._server.sockets[0].getsockname()[1]
        self.ports = (listen_port, admin_port)
        metrics.draining.set(0)
        event(log, "started", node=node.node_id, listen=f"{cfg.listen.host}:{listen_port}",
              admin=f"{cfg.admin.host}:{admin_port}", worker=self.worker, config=cfg.source)

    def request_stop(self) -> None:
        self.stopping.set()

    def drain_node(self) -> None:
        """POST /v1/drain: the whole node drains, not just the worker that got the call."""
        if self.worker is not None:
            os.kill(os.getppid(), signal.SIGTERM)  # the supervisor forwards it to every worker
        else:
            self.request_stop()

    def reload(self) -> list[str]:
        """Re-read the config file. Returns the problems found (nothing changes then,
        and they are logged, each with its file:line:col).

        A valid file applies at once to new sessions; open ones keep their route
        and limits, except that those whose route is gone are drained with 1012
        and a resume token and those whose endpoint is gone move to another
        (reattach backends; Node.reload). No connection is dropped.
        """
        self._applied = config_digest(self.cfg.source)   # what the watcher compares with
        try:
            cfg = config_mod.load(self.cfg.source)
            drained, moving = self.node.reload(cfg)
        except ConfigError as exc:
            return self._refused(exc)
        if (cfg.listen, cfg.admin, cfg.workers, cfg.redis, cfg.node_id) != \
                (self.cfg.listen, self.cfg.admin, self.cfg.workers, self.cfg.redis, self.cfg.node_id):
            event(log, "reload_needs_restart", logging.WARNING,
                  detail="listen, admin, workers, node_id and redis change only on restart; the rest was applied")
        self.cfg = cfg
        metrics.config_reloads.labels("ok").inc()
        event(log, "reloaded", config=cfg.source, drained=drained, moving=moving)
        if cfg.watch:
            self.watch_config()
        return []

    def _refused(self, exc: ConfigError) -> list[str]:
        metrics.config_reloads.labels("error").inc()
        event(log, "reload_failed", logging.ERROR, problems=exc.problems)
        return exc.problems

    def watch_config(self) -> None:
        """watch: true: reload when the file's content changes (polled every WATCH_S).

        The content, not the mtime: a Kubernetes ConfigMap update swaps the
        `..data` symlink the file resolves through, so path, inode and mtime
        of what the path names all change at once, and an editor may keep the
        mtime. A change is applied once it reads the same twice in a row, so a
        file caught half-written is not reloaded (and refused) on the way.
        """
        if self._watcher is None or self._watcher.done():
            if self._applied is None:
                self._applied = config_digest(self.cfg.source)
            self._watcher = asyncio.ensure_future(self._watch())

    async def _watch(self) -> None:
        seen = None
        while self.cfg.watch and not self.stopping.is_set():
            await asyncio.sleep(WATCH_S)
            digest = config_digest(self.cfg.source)
            if digest is None or digest == self._applied:
                seen = None
            elif digest != seen:
                seen = digest   # changed: reload once it has settled
            else:
                seen = None
                event(log, "config_changed", config=self.cfg.source)
                self.reload()

    def reload_node(self) -> list[str] | None:
        """POST /v1/reload: every worker reloads. None when the supervisor was asked
        (the file was checked here first, so that a broken one is answered with its
        problems; then every worker loads and checks it again)."""
        if self.worker is not None:
            try:
                config_mod.load(self.cfg.source)
            except ConfigError as exc:
                return self._refused(exc)
            os.kill(os.getppid(), signal.SIGHUP)
            return None
        return self.reload()

    async def stop(self) -> None:
        """Shutdown, in one place: drain (drain.py), then stop accepting and exit."""
        node = self.node
        if self._watcher is not None:
            self._watcher.cancel()
        await self.drainer.run()   # the listener stays open meanwhile: late clients get a 503, not a reset
        if self.server is not None:
            self.server.close()
        await node.shutdown(node.loop.time() + 5.0)
        # The admin listener goes before the store: a /v1 call then finds no
        # listener (its caller tries another node) rather than a 503 from a node
        # whose store is closing, which could follow a publish that did go out.
        if self.runner is not None:
            await close_admin(self.runner)
        if self.cluster is not None:
            await self.cluster.stop()   # the closes' records, then this node, leave the store
        event(log, "stopped", node=node.node_id)

    async def run_until_signal(self) -> None:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self.request_stop)
        loop.add_signal_handler(signal.SIGINT, self.request_stop)
        loop.add_signal_handler(signal.SIGHUP, self.reload)
        await self.start()
        await self.stopping.wait()
        # Stopping: from here a signal changes nothing, and once the loop closes (or its
        # handler is removed) these signals would go back to their default action: a SIGTERM
        # then (the kubelet's, after a preStop drain that finished first) would kill the
        # process and turn its exit 0 into 143. So they are ignored, and now rather than
        # after the stop: the instant between the loop's handler going and SIG_IGN coming
        # is right after the stop was asked for, not when the drain has ended and a
        # SIGTERM is most likely (a CI run hit it there).
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
            signal.signal(sig, signal.SIG_IGN)
        await self.stop()


ADMIN_CLOSE_GRACE_S = 1.0   # at most this long for a request on its way on a connection already taken


async def close_admin(runner: web.AppRunner) -> None:
    """Close the admin listener, then the admin API. Between the two, a connection the
    listener had taken already but whose request has not come in yet (or not yet
    started) is given up to ADMIN_CLOSE_GRACE_S, so that its request is answered rather
    than cut on its way: its caller could not tell whether a publish cut like that went
    out. Requests under way are waited for (aiohttp's shutdown); an idle keep-alive
    connection is not waited for. (aiohttp's own counters; a version without them is
    closed at once, as before.)"""
    for site in list(runner.sites):
        await site.stop()
    server = runner.server
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ADMIN_CLOSE_GRACE_S

    def on_its_way(h) -> bool:
        return not getattr(h, "_request_count", 1) or bool(getattr(h, "_messages", None))
    while server is not None and loop.time() < deadline and any(on_its_way(h) for h in server.connections):
        await asyncio.sleep(0.01)
    await runner.cleanup()


def run(cfg: config_mod.Config, *, reuse_port: bool = False, worker: int | None = None) -> None:
    import uvloop

    uvloop.run(Gateway(cfg, reuse_port=reuse_port, worker=worker).run_until_signal())
