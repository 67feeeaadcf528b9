"""Start the chat demo: the example backend and the gateway, then print the URL to open.

    python examples/chat/run.py              # from the repository root, in the gateway's venv

The gateway runs `gateway run` on examples/chat/routes.yaml. With nothing else on
the machine it keeps its sessions in memory (one node: rooms, presence and history
work; a drained session cannot be resumed). With a Redis answering on
127.0.0.1:6379 (or `--redis URL`) the gateway uses it (keys under `chatdemo:`), and
`--nodes 2` starts a second gateway node beside the first so a drain can be watched:
`curl -X POST -H "Authorization: Bearer $TOKEN" http://127.0.0.1:9090/v1/drain` and
the page resumes on the other node (the admin token is printed at start).

Ctrl-C stops everything: the gateway drains first, then the backend stops.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shutil
import signal
import socket
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent.parent
START_TIMEOUT_S = 20


def need(*modules: str) -> None:
    missing = []
    for name in modules:
        try:
            __import__(name)
        except ImportError:
            missing.append(name)
    if missing:
        sys.exit(f"missing Python packages: {', '.join(missing)}. Install the gateway first, from {ROOT}:\n"
                 f"  python3 -m venv .venv && .venv/bin/pip install -q . && "
                 f".venv/bin/python examples/chat/run.py")


def port_free(host: str, port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind((host, port))
        except OSError:
            return False
    return True


def redis_answers(host: str = "127.0.0.1", port: int = 6379) -> bool:
    """A Redis is there if it answers PING with +PONG (within half a second)."""
    try:
        with socket.create_connection((host, port), timeout=0.5) as s:
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def node_config(base: dict, i: int, args: argparse.Namespace) -> dict:
    cfg = dict(base)
    cfg["listen"] = {**base["listen"], "port": args.port + i}
    cfg["admin"] = {**base["admin"], "port": args.admin_port + i}
    chat = {**base["backends"]["chat"], "endpoints": [f"http://127.0.0.1:{args.backend_port}/events"]}
    cfg["backends"] = {**base["backends"], "chat": chat}
    if args.redis:
        cfg["redis"] = {"url": args.redis, "key_prefix": "chatdemo:"}
        cfg["node_id"] = f"chat-node-{i + 1}"
    return cfg


async def ready(url: str, proc: asyncio.subprocess.Process, what: str) -> None:
    """Poll `url` until it answers 200; fail if the process exits or the time runs out."""
    import aiohttp

    deadline = time.monotonic() + START_TIMEOUT_S
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=2)) as http:
        while time.monotonic() < deadline:
            if proc.returncode is not None:
                raise SystemExit(f"{what} exited with {proc.returncode} (its output is above)")
            try:
                async with http.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise SystemExit(f"{what} did not answer {url} within {START_TIMEOUT_S} s")


async def relay(stream: asyncio.StreamReader, label: str) -> None:
    async for line in stream:
        sys.stdout.write(f"[{label}] {line.decode(errors='replace')}")
        sys.stdout.flush()


async def spawn(label: str, *argv: str, env: dict) -> tuple[asyncio.subprocess.Process, asyncio.Task]:
    proc = await asyncio.create_subprocess_exec(*argv, cwd=ROOT, env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    return proc, asyncio.ensure_future(relay(proc.stdout, label))


async def main(args: argparse.Namespace) -> int:
    import yaml

    env = dict(os.environ)
    demo_secret = not env.get("CHAT_JWT_SECRET")
    if demo_secret:
        sys.path.insert(0, str(HERE))
        from backend import DEMO_SECRET
        env["CHAT_JWT_SECRET"] = DEMO_SECRET
    env.setdefault("GATEWAY_ADMIN_TOKEN", secrets.token_urlsafe(24))
    env.setdefault("GATEWAY_LOG_LEVEL", args.log_level)

    base = yaml.safe_load((HERE / "routes.yaml").read_text())
    ports = [("backend", args.backend_port)]
    for i in range(args.nodes):
        ports += [(f"gateway {i + 1}", args.port + i), (f"gateway {i + 1} admin", args.admin_port + i)]
    busy = [f"{what} port {port}" for what, port in ports if not port_free("127.0.0.1", port)]
    if busy:
        raise SystemExit(f"in use: {', '.join(busy)}; choose others (--backend-port, --port, --admin-port)")

    tmp = Path(tempfile.mkdtemp(prefix="chat-demo-"))
    gateways: list[tuple[str, list[str]]] = []
    for i in range(args.nodes):
        path = tmp / f"node-{i + 1}.yaml"
        path.write_text(f"# generated by examples/chat/run.py from {HERE / 'routes.yaml'}\n"
                        + yaml.safe_dump(node_config(base, i, args), sort_keys=False))
        label = f"gateway {i + 1}" if args.nodes > 1 else "gateway"
        gateways.append((label, [sys.executable, "-m", "gateway", "run", "--config", str(path)]))
    backend_argv = [sys.executable, str(HERE / "backend.py"), "--port", str(args.backend_port)]
    for i in range(args.nodes):
        backend_argv += ["--admin", f"http://127.0.0.1:{args.admin_port + i}",
                         "--gateway", f"ws://127.0.0.1:{args.port + i}/chat"]
    running: dict[str, asyncio.subprocess.Process] = {}
    relays = []

    async def start(label: str, argv: list[str]) -> None:
        proc, r = await spawn(label, *argv, env=env)
        running[label] = proc
        relays.append(r)

    # Ctrl-C or SIGTERM at any moment, even while starting, ends in the cleanup below:
    # no gateway or backend is left running without this script.
    loop = asyncio.get_running_loop()
    me = asyncio.current_task()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, me.cancel)
    try:
        for label, argv in gateways:
            await start(label, argv)
        await start("backend", backend_argv)
        for i, (label, _) in enumerate(gateways):
            await ready(f"http://127.0.0.1:{args.admin_port + i}/readyz", running[label], label)
        await ready(f"http://127.0.0.1:{args.backend_port}/config.json", running["backend"], "backend")
        banner(args, env, demo_secret)
        while True:
            exits = {asyncio.ensure_future(p.wait()): label for label, p in running.items()}
            try:
                done, _ = await asyncio.wait(exits, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for task in exits:
                    task.cancel()
            for task in done:
                label = exits[task]
                code = running[label].returncode
                if label == "backend" or code != 0:
                    print(f"{label} exited with {code}; stopping the rest", file=sys.stderr)
                    return 1
                # A gateway node that drained (POST /v1/drain) exits 0: start it again,
                # as Kubernetes replaces a pod, so the demo can be drained again and again.
                print(f"{label} drained and exited; starting it again", flush=True)
                await start(label, dict(gateways)[label])
    except asyncio.CancelledError:
        return 0
    finally:
        # A second Ctrl-C while stopping: do not wait for the drains.
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, lambda: [p.kill() for p in running.values() if p.returncode is None])
        # The gateways first: a drain sends each session's disconnect to the backend.
        for label, p in running.items():
            if p.returncode is None:
                p.send_signal(signal.SIGTERM)
                try:
                    await asyncio.wait_for(p.wait(), 30)
                except asyncio.TimeoutError:
                    p.kill()
                    await p.wait()
        for r in relays:
            r.cancel()
        shutil.rmtree(tmp, ignore_errors=True)


def banner(args: argparse.Namespace, env: dict, demo_secret: bool) -> None:
    store = f"Redis at {args.redis} (keys under chatdemo:)" if args.redis else "in memory (no Redis)"
    nodes = range(args.nodes)
    print()
    print(f"  chat demo: open http://127.0.0.1:{args.backend_port}/ in a browser (two tabs, two names)")
    print(f"  gateway:   {', '.join(f'ws://127.0.0.1:{args.port + i}/chat' for i in nodes)}; sessions {store}")
    print(f"  admin API: {', '.join(f'http://127.0.0.1:{args.admin_port + i}' for i in nodes)}, "
          f"GATEWAY_ADMIN_TOKEN={env['GATEWAY_ADMIN_TOKEN']}")
    if demo_secret:
        print(f"  JWT:       HS256 with the DEMO secret {env['CHAT_JWT_SECRET']!r} (public: anyone can mint "
              "tokens; set CHAT_JWT_SECRET for another)")
    print("  Ctrl-C stops it.")
    print(flush=True)


def cli(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Start the chat demo (examples/chat/README.md).")
    p.add_argument("--backend-port", type=int, default=8000, help="the backend and the page (default 8000)")
    p.add_argument("--port", type=int, default=8080, help="the gateway's WebSocket port (default 8080; node N: +N-1)")
    p.add_argument("--admin-port", type=int, default=9090, help="the gateway's admin port (default 9090; node N: +N-1)")
    p.add_argument("--redis", default="auto",
                   help="redis URL, 'auto' (redis://127.0.0.1:6379/0 if a Redis answers there) or 'none'")
    p.add_argument("--nodes", type=int, default=1, help="gateway nodes (more than 1 needs Redis)")
    p.add_argument("--log-level", default="info", help="the gateway's log level (default info)")
    args = p.parse_args(argv)
    if args.redis == "auto":
        args.redis = "redis://127.0.0.1:6379/0" if redis_answers() else None
    elif args.redis == "none":
        args.redis = None
    if not 1 <= args.nodes <= 8:
        p.error("--nodes must be 1 to 8")
    if args.nodes > 1 and not args.redis:
        p.error("--nodes 2 and more share sessions through Redis: none answers on 127.0.0.1:6379; "
                "start one or give its URL with --redis")
    need("aiohttp", "jwt", "yaml", "gateway")
    sys.exit(asyncio.run(main(args)))


if __name__ == "__main__":
    cli()
