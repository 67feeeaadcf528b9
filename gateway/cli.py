"""Command line: parse arguments, start things. Nothing imports this module."""

from __future__ import annotations

import argparse
import json
import os
import sys
import urllib.error
import urllib.request

from . import config as config_mod
from .errors import ConfigError


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="gateway", description="WebSocket edge gateway")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="serve (SIGTERM/SIGINT: graceful shutdown, SIGHUP: reload)")
    run.add_argument("--config", default="routes.yaml")
    run.add_argument("--workers", help="number of worker processes, or 'auto' (overrides the config)")
    run.add_argument("--log-level", default=os.environ.get("GATEWAY_LOG_LEVEL", "info"))
    run.add_argument("--worker-index", type=int, help=argparse.SUPPRESS)
    check = sub.add_parser("check", help="validate a config file: exit 0, or 2 with every error")
    check.add_argument("config", nargs="?", default="routes.yaml")
    drain = sub.add_parser("drain", help="ask a running node to drain (for preStop hooks)")
    drain.add_argument("--admin", default="http://127.0.0.1:9090")
    drain.add_argument("--token-env", default="GATEWAY_ADMIN_TOKEN")
    args = parser.parse_args(argv)

    if args.command == "check":
        try:
            cfg = config_mod.load(args.config)
        except ConfigError as exc:
            print("\n".join(exc.problems), file=sys.stderr)
            print(f"{len(exc.problems)} error(s)", file=sys.stderr)
            return 2
        print(f"{args.config}: ok ({len(cfg.routes)} routes, {len(cfg.backends)} backends)")
        return 0
    if args.command == "drain":
        return _drain(args.admin, os.environ.get(args.token_env))
    return _run(args)


def _run(args) -> int:
    from . import logs

    logs.setup(args.log_level)
    try:
        cfg = config_mod.load(args.config)
        if args.workers is not None:
            cfg = config_mod.with_workers(cfg, args.workers)
        from .admin import admin_token
        from .server import Identity

        admin_token(cfg)
        Identity(cfg)  # keys load now: a missing secret or bad PEM stops here, with exit 2
    except ConfigError as exc:
        print("\n".join(exc.problems), file=sys.stderr)
        return 2
    if args.worker_index is None and cfg.workers > 1:
        from .workers import supervise

        return supervise(os.path.abspath(args.config), cfg.workers, cfg.drain.timeout_s)
    from .app import run

    run(cfg, reuse_port=args.worker_index is not None, worker=args.worker_index)
    return 0


def _drain(admin_url: str, token: str | None) -> int:
    req = urllib.request.Request(admin_url.rstrip("/") + "/v1/drain", method="POST", data=b"")
    if token:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            print(json.dumps(json.loads(resp.read() or b"{}")))
            return 0
    except urllib.error.HTTPError as exc:
        print(f"drain refused: HTTP {exc.code} {exc.read().decode(errors='replace')}", file=sys.stderr)
        return 1
    except OSError as exc:
        print(f"cannot reach {admin_url}: {exc}", file=sys.stderr)
        return 1
