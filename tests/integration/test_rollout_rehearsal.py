"""A rolling update of the chart's Deployment, played on one machine with the
numbers the chart renders (issue 10, 7): nothing lost, nothing doubled.

The chart is rendered by the real helm (tests/helmtool.py) with short drain
timings and 3 replicas. From the manifests come the rollout strategy
(maxSurge / maxUnavailable), terminationGracePeriodSeconds, the container
command and env (the admin token from the rendered Secret), the readiness
probe, the preStop hook and the ConfigMap's routes.yaml. Each pod is a
`gateway run` process started with the rendered command; the test plays the
parts Kubernetes plays:

- the kubelet probes readiness at the rendered path, port and period
  (initial delay, timeout and thresholds too) and, to terminate a pod, runs
  the rendered preStop command, then sends SIGTERM, then SIGKILL if the
  process is still there when the grace period has passed;
- the Service sends a new connection only to a pod that is ready and not
  terminating (an EndpointSlice marks a terminating pod not ready at once);
- the Deployment controller starts new pods and terminates old ones as far as
  maxSurge and maxUnavailable allow, without waiting for a terminating pod to
  be gone (its replacement is started at once, so drains overlap start-ups).

The backend (fleet.py, a raw WebSocket server with state per
Gateway-Session-Id) numbers what it sends, the clients (numbered.py) number
what they send and resume, on a pod the Service picks, when a drain closes
them with 1012 and `resume=<token>`. At the end every message of every
session has arrived once and in order at its far end, every session lives on
a new pod, and every old process exited with 0 by itself within its grace
period. Played with one worker per pod and with two (the hook's drain then
reaches one worker, and the supervisor stops both).
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from ..helmtool import HELM_VERSION, get_helm
from ..helpers import free_port, until
from .fleet import Fleet, holds
from .numbered import NumberedClient, contiguous
from .test_lifecycle import Proc

CHART = Path(__file__).resolve().parents[2] / "deploy" / "helm" / "gateway"
SESSIONS = 40
INTERVAL_S = 0.04     # between two messages of a session, each way
BOUND_S = 60.0        # only trips on a hang (a loaded machine starts a pod slowly); nothing here is timed
# Where the rendered config points at cluster Services; the test's backend
# and redis-server take their place (localize below).
BACKEND_SERVICE = "ws://chat.backend.svc:8000/ws"
REDIS_SERVICE = "redis://redis-master.redis:6379/0"

VALUES = {
    "replicaCount": 3,
    "adminToken": {"value": "rehearsal-admin-token-" + "x" * 26},
    "redis": {"url": REDIS_SERVICE},
    # Short drains keep the run short; the grace period is derived from them
    # by the chart (announce + timeout + its default margin).
    "drain": {"timeoutSeconds": 8, "announceSeconds": 1, "preStopSleepSeconds": 1},
    "probes": {"readiness": {"periodSeconds": 1}},
    "config": {
        "drain": {"rate_per_s": 100},   # several batches per pod
        "backends": {"chat": {"type": "websocket", "endpoints": [BACKEND_SERVICE]}},
        "routes": [{"name": "chat", "match": {"path_prefix": "/ws"}, "auth": "none", "backend": "chat"}],
    },
}


# ------------------------------------------------------------ what the chart renders
class Rendered:
    """The parts of the rendered manifests a rollout runs on."""

    def __init__(self, docs: list[dict]):
        (dep,) = [d for d in docs if d["kind"] == "Deployment"]
        spec = dep["spec"]
        pod = spec["template"]["spec"]
        (c,) = pod["containers"]
        self.replicas = spec["replicas"]
        assert spec["strategy"]["type"] == "RollingUpdate"
        rolling = spec["strategy"]["rollingUpdate"]
        self.max_surge = _scaled(rolling["maxSurge"], self.replicas, math.ceil)        # as the controller rounds
        self.max_unavailable = _scaled(rolling["maxUnavailable"], self.replicas, math.floor)
        self.grace_s = pod["terminationGracePeriodSeconds"]
        self.command = c["command"] + c.get("args", [])
        self.ports = {p["name"]: p["containerPort"] for p in c["ports"]}
        self.pre_stop = c["lifecycle"]["preStop"]["exec"]["command"]
        probe = c["readinessProbe"]
        port = probe["httpGet"]["port"]
        self.readiness = {
            "path": probe["httpGet"]["path"],
            "port": self.ports[port] if isinstance(port, str) else port,
            # Kubernetes' defaults for what the chart leaves out.
            "delay_s": probe.get("initialDelaySeconds", 0), "period_s": probe.get("periodSeconds", 10),
            "timeout_s": probe.get("timeoutSeconds", 1), "success": probe.get("successThreshold", 1),
            "failure": probe.get("failureThreshold", 3),
        }
        secrets = {d["metadata"]["name"]: d for d in docs if d["kind"] == "Secret"}
        self.env = {}
        for e in c.get("env", []):
            if "value" in e:
                self.env[e["name"]] = e["value"]
            else:
                ref = e["valueFrom"]["secretKeyRef"]
                self.env[e["name"]] = base64.b64decode(secrets[ref["name"]]["data"][ref["key"]]).decode()
        (mount,) = [m for m in c["volumeMounts"] if m["name"] == "config"]
        (volume,) = [v for v in pod["volumes"] if v["name"] == "config"]
        (cm,) = [d for d in docs if d["kind"] == "ConfigMap" and d["metadata"]["name"] == volume["configMap"]["name"]]
        self.config_dir = mount["mountPath"]
        self.config_files = cm["data"]


def _scaled(value, replicas: int, rounding) -> int:
    """maxSurge / maxUnavailable: a number, or a percentage of the replicas."""
    if isinstance(value, str) and value.endswith("%"):
        return int(rounding(replicas * int(value[:-1]) / 100))
    return int(value)


def render(tmp_path: Path, workers: int) -> Rendered:
    try:
        helm = get_helm()
    except Exception as exc:  # no skip: without helm the rehearsal would not use the chart's numbers
        pytest.fail(f"the real helm {HELM_VERSION} is needed and could not be had: {exc}")
    values = tmp_path / "values.yaml"
    values.write_text(yaml.safe_dump({**VALUES, "workers": workers}))
    proc = subprocess.run([str(helm), "template", "edge", str(CHART), "--namespace", "gw", "-f", str(values)],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return Rendered([d for d in yaml.safe_load_all(proc.stdout) if d])


def localize(routes_yaml: str, *, ws_port: int, admin_port: int, backend_url: str, redis_url: str) -> str:
    """The rendered routes.yaml with what must differ on one machine, and nothing else:

    - listen and admin: in a cluster every pod has an address of its own and
      binds 0.0.0.0:8080 and :9090; here the pods share 127.0.0.1, so each gets
      free ports (on loopback only: no traffic leaves the machine);
    - the chat backend's endpoint and the Redis URL name cluster Services; here
      they are the test's backend and redis-server.
    """
    cfg = yaml.safe_load(routes_yaml)
    assert cfg["backends"]["chat"]["endpoints"] == [BACKEND_SERVICE]
    assert cfg["redis"]["url"] == REDIS_SERVICE
    cfg["listen"] = {**cfg["listen"], "host": "127.0.0.1", "port": ws_port}
    cfg["admin"] = {**cfg["admin"], "host": "127.0.0.1", "port": admin_port}
    cfg["backends"]["chat"]["endpoints"] = [backend_url]
    cfg["redis"]["url"] = redis_url
    return yaml.safe_dump(cfg)


# ------------------------------------------------------------ the kubelet's part
class Pod:
    """One pod: the rendered container command as a process, with the rendered
    env, and the ConfigMap's files in a directory of its own standing in for
    the mount. Its readiness is what the kubelet's probe last concluded."""

    def __init__(self, name: str, spec: Rendered, tmp_path: Path, backend_url: str, redis_url: str):
        self.name = name
        self.spec = spec
        self.ws_port, self.admin_port = free_port(), free_port()
        root = tmp_path / name / "config"
        root.mkdir(parents=True)
        for file, text in spec.config_files.items():
            (root / file).write_text(localize(text, ws_port=self.ws_port, admin_port=self.admin_port,
                                              backend_url=backend_url, redis_url=redis_url)
                                     if file == "routes.yaml" else text)
        # The image puts `gateway` on PATH: here the virtualenv's bin does.
        self.env = {**os.environ, **spec.env,
                    "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"}
        # The mount path in the command is this pod's directory; nothing else is changed.
        command = [arg.replace(spec.config_dir, str(root), 1) if arg.startswith(spec.config_dir + "/") else arg
                   for arg in spec.command]
        assert command != spec.command, f"the command names no file under {spec.config_dir}: {spec.command}"
        self.log = tmp_path / f"{name}.log"
        with open(self.log, "wb") as err:
            self.proc = subprocess.Popen(command, env=self.env, stdout=subprocess.DEVNULL, stderr=err)
        self.url = f"ws://127.0.0.1:{self.ws_port}"
        self.admin_url = f"http://127.0.0.1:{self.admin_port}"
        self.ready = False
        self.terminating = False
        self.pre_stop: tuple[int, str] | None = None   # the hook's exit code and output
        self.exited_after_s: float | None = None       # from the start of termination
        self.killed = False

    def alive(self) -> bool:
        return self.proc.poll() is None

    def logs(self) -> list[dict]:
        return [json.loads(line) for line in self.log.read_text().splitlines() if line.startswith("{")]

    async def probe_readiness(self, http: aiohttp.ClientSession) -> None:
        """The kubelet's readiness probe: GET path on the probe's port (this pod's
        admin port on this machine) every period; ready after `success` answers
        in 200-399 in a row, not ready after `failure` misses in a row."""
        r = self.spec.readiness
        assert r["port"] == self.spec.ports["admin"]   # the port the config's admin listener binds in a pod
        url = f"{self.admin_url}{r['path']}"
        timeout = aiohttp.ClientTimeout(total=r["timeout_s"])
        await asyncio.sleep(r["delay_s"])   # the probe's schedule, not a wait for anything
        ok = bad = 0
        for _ in range(int(4 * BOUND_S / r["period_s"]) + 1):
            if not self.alive():
                self.ready = False
                return
            try:
                async with http.get(url, timeout=timeout) as resp:
                    passed = 200 <= resp.status < 400
            except (aiohttp.ClientError, asyncio.TimeoutError):
                passed = False
            ok, bad = (ok + 1, 0) if passed else (0, bad + 1)
            if ok >= r["success"]:
                self.ready = True
            elif bad >= r["failure"]:
                self.ready = False
            await asyncio.sleep(r["period_s"])

    async def terminate(self) -> None:
        """As the kubelet ends a pod: preStop, then SIGTERM, then SIGKILL at the
        grace period (counted from the start, the hook's time included)."""
        grace = self.spec.grace_s
        started = time.monotonic()
        self.terminating = True   # the EndpointSlice: no new connections from now on
        rendered = f"127.0.0.1:{self.spec.ports['admin']}"
        hook = self.spec.pre_stop[:-1] + [self.spec.pre_stop[-1].replace(rendered, f"127.0.0.1:{self.admin_port}")]
        assert hook[-1].count(f"127.0.0.1:{self.admin_port}") == 1, self.spec.pre_stop
        proc = await asyncio.create_subprocess_exec(*hook, env=self.env, stdout=asyncio.subprocess.PIPE,
                                                    stderr=asyncio.subprocess.STDOUT)
        try:
            out, _ = await asyncio.wait_for(proc.communicate(), timeout=grace)
            self.pre_stop = (proc.returncode, out.decode(errors="replace"))
        except asyncio.TimeoutError:
            proc.kill()
            await proc.wait()
            self.pre_stop = (-1, f"preStop still running after the grace period ({grace} s)")
        self.proc.send_signal(signal.SIGTERM)   # a no-op when the process is gone already
        deadline = started + grace
        while self.alive() and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        if self.alive():
            self.killed = True
            self.proc.kill()
        self.proc.wait(timeout=10)
        self.exited_after_s = time.monotonic() - started

    def stop(self) -> None:
        if self.alive():
            self.proc.kill()
            self.proc.wait(timeout=10)


class Service:
    """New connections go round-robin to the pods that are ready and not terminating."""

    def __init__(self):
        self.pods: list[Pod] = []
        self._turn = itertools.count()

    def endpoints(self) -> list[Pod]:
        return [p for p in self.pods if p.ready and not p.terminating]

    def pick(self) -> Pod:
        ready = self.endpoints()
        assert ready, "the Service has no ready endpoint"
        return ready[next(self._turn) % len(ready)]


class Client(NumberedClient):
    """numbered.py's client, connecting (and resuming) wherever the Service sends it."""

    def __init__(self, http: aiohttp.ClientSession, service: Service):
        super().__init__(http, "", interval_s=INTERVAL_S)
        self.service = service
        self.pod: Pod | None = None
        self.sending = False

    async def connect(self, url: str | None = None) -> None:
        self.pod = self.service.pick()
        await super().connect(self.pod.url + "/ws")

    async def _send_loop(self, stop: asyncio.Event) -> None:
        self.sending = True
        try:
            await super()._send_loop(stop)
        finally:
            self.sending = False


# ------------------------------------------------------------ the Deployment controller's part
async def roll_out(spec: Rendered, old: list[Pod], start) -> tuple[list[Pod], list[asyncio.Task]]:
    """Replace `old` with new pods as the strategy allows: at most replicas +
    maxSurge pods not terminating, at least replicas - maxUnavailable ready.
    Returns the new pods and the terminations (still running, maybe)."""
    assert spec.max_surge + spec.max_unavailable > 0
    left, new, terminations = list(old), [], []
    for _ in range(4 * spec.replicas):
        available = sum(p.ready for p in new + left)
        while left and available > spec.replicas - spec.max_unavailable:
            terminations.append(asyncio.ensure_future(left.pop(0).terminate()))
            available -= 1
        while len(new) < spec.replicas and len(new) + len(left) < spec.replicas + spec.max_surge:
            new.append(await start())
        if not left:
            break
        marks = [p.ready for p in new]
        await holds(lambda: [p.ready for p in new] != marks or not all(p.alive() for p in new),
                    BOUND_S, "a new pod is ready")
        for p in new:
            assert p.alive(), f"{p.name} exited: {p.log.read_text()}"
    assert not left, "the rollout did not finish"
    return new, terminations


async def sessions_open(http: aiohttp.ClientSession, pod: Pod) -> float:
    async with http.get(pod.admin_url + "/metrics") as r:
        text = await r.text()
    return sum(s.value for fam in text_string_to_metric_families(text) if fam.name == "gateway_sessions_open"
               for s in fam.samples)


@pytest.mark.parametrize("workers", [1, 2], ids=["one worker", "two workers"])
async def test_rolling_update_with_the_charts_numbers_loses_no_message(tmp_path, redis_server, http, workers):
    spec = render(tmp_path, workers)
    assert (spec.replicas, spec.max_surge, spec.max_unavailable) == (3, 1, 0)
    assert spec.grace_s == 1 + 8 + 15   # announce + timeout + margin, as the chart derives it
    fleet = Fleet(interval_s=INTERVAL_S)
    backend = await fleet.endpoint()
    service = Service()
    probes: list[asyncio.Task] = []
    made = itertools.count()

    async def start() -> Pod:
        pod = Pod(f"pod{next(made)}", spec, tmp_path, backend.url, redis_server.url)
        service.pods.append(pod)
        probes.append(asyncio.ensure_future(pod.probe_readiness(http)))
        return pod

    old = [await start() for _ in range(spec.replicas)]
    clients: list[Client] = []
    runs: list[asyncio.Task] = []
    stop = asyncio.Event()
    try:
        await holds(lambda: all(p.ready for p in old) or not all(p.alive() for p in old), BOUND_S, "pods ready")
        assert all(p.alive() for p in old), [p.log.read_text() for p in old]
        sids = []
        for _ in range(SESSIONS):   # one at a time: the backend's next handshake names the session
            c = Client(http, service)
            seen = len(fleet.handshakes)
            await c.connect()
            await holds(lambda: len(fleet.handshakes) > seen, BOUND_S, "the session reached the backend")
            sids.append(fleet.handshakes[seen]["Gateway-Session-Id"])
            clients.append(c)
        assert len(set(sids)) == SESSIONS
        runs = [asyncio.ensure_future(c.run(stop)) for c in clients]

        async def flowing(what: str) -> None:
            marks = [(len(c.got), len(fleet.got[sid])) for c, sid in zip(clients, sids)]
            await holds(lambda: any(r.done() for r in runs) or all(
                len(c.got) > m + 5 and len(fleet.got[sid]) > n + 5 for c, sid, (m, n) in zip(clients, sids, marks)),
                BOUND_S, what)
            for r in runs:
                if r.done():
                    r.result()   # a client that stopped: its error is the failure
                    raise AssertionError("a client stopped: closed without a resume token")

        await flowing("traffic both ways on the old pods")
        assert {c.pod for c in clients} == set(old)

        began = time.monotonic()
        new, terminations = await roll_out(spec, old, start)
        await asyncio.wait_for(asyncio.gather(*terminations), timeout=spec.grace_s + BOUND_S)
        rolled = time.monotonic() - began
        await flowing("traffic both ways after the rollout")

        # Stop both ways, then every message must have arrived, once, in order.
        fleet.quiet = True
        stop.set()
        await holds(lambda: not any(c.sending for c in clients), BOUND_S, "the clients stopped sending")
        for c, sid in zip(clients, sids):
            await holds(lambda: len(fleet.got[sid]) >= c.sent and len(c.got) >= fleet.sent[sid], BOUND_S,
                        f"{sid}'s messages arrived")
            assert contiguous("c", fleet.got[sid]) == c.sent
            assert contiguous("s", c.got) == fleet.sent[sid]
        # Every session is alive on a new pod, resumed (never started over).
        assert not any(r.done() for r in runs)
        assert all(not c.ws.closed and c.pod in new for c in clients)
        assert all(c.resumes >= 1 and all(code == 1012 and reason.startswith("resume=") for code, reason in c.closes)
                   for c in clients), [c.closes for c in clients if c.resumes < 1]
        assert {h["Gateway-Session-Id"] for h in fleet.handshakes} == set(sids)
        resumed = [h for h in fleet.handshakes if h.get("Gateway-Resumed") == "1"]
        assert len(resumed) == sum(c.resumes for c in clients)
        assert all(len(fleet.open[sid]) == 1 for sid in sids)

        async def all_open_on_new_pods():
            return sum([await sessions_open(http, p) for p in new]) == SESSIONS

        await until(all_open_on_new_pods, BOUND_S, f"gateway_sessions_open of the new pods adds up to {SESSIONS}")
        # Every old pod: the hook drained it, it exited with 0 by itself within the grace period.
        for p in old:
            assert p.pre_stop is not None and p.pre_stop[0] == 0, p.pre_stop
            assert '"draining": true' in p.pre_stop[1], p.pre_stop
            assert not p.killed, f"{p.name} was still running after {spec.grace_s} s: SIGKILL"
            assert p.proc.returncode == 0, (p.proc.returncode, p.log.read_text())
            done = [e for e in p.logs() if e["event"] == "drain_done"]
            assert len(done) == workers, done   # each worker drains its own sessions
            assert all(e["buffers_unsealed"] == 0 and not e["timed_out"] for e in done), done
        print(f"rollout of {spec.replicas} pods ({workers} worker(s) each) under {SESSIONS} sessions: {rolled:.1f} s; "
              f"old pods exited {[round(p.exited_after_s, 1) for p in old]} s after their termination began "
              f"(grace {spec.grace_s} s); {sum(c.sent for c in clients)} client and "
              f"{sum(fleet.sent.values())} backend messages, {sum(c.resumes for c in clients)} resumes")
    finally:
        stop.set()
        for c in clients:
            await c.close()
        if runs:
            await asyncio.wait(runs, timeout=BOUND_S)
        for t in probes:
            t.cancel()
        for p in service.pods:
            p.stop()
        await backend.stop()


async def test_the_kubelets_sigterm_after_a_finished_drain_still_exits_0(tmp_path, http):
    """SIGTERM comes when preStop has returned; by then the drain the hook began
    may be over and the process winding down. It must still exit 0 (a pod's
    exit 143 reads as a failure), not die of the signal. Each node gets it as
    soon as it has logged that it stopped."""
    cfg = {"backends": {"echo": {"type": "builtin", "handler": "echo"}},
           "routes": [{"name": "echo", "match": {"path": "/echo"}, "auth": "none", "backend": "echo"}],
           "drain": {"timeout_s": 2}}
    procs = [Proc(tmp_path, cfg, name=f"gw{i}") for i in range(4)]
    try:
        for p in procs:
            await p.ready(http)
        for p in procs:
            async with http.post(p.admin_url + "/v1/drain") as r:
                assert r.status == 202
            await until(lambda: asyncio.sleep(0, '"event":"stopped"' in p.stderr.read_text()), BOUND_S,
                        "the node stopped", interval_s=0.002)
            p.p.send_signal(signal.SIGTERM)
            assert await p.wait(BOUND_S) == 0, p.stderr.read_text()
    finally:
        for p in procs:
            p.stop()
