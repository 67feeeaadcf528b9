"""Print a JWT for the chat demo (DEMO ONLY: HS256 with a secret everyone knows).

    python examples/chat/mint_token.py alice            # valid for an hour
    python examples/chat/mint_token.py alice --ttl 60

The secret is $CHAT_JWT_SECRET, or the demo secret in backend.py, the one
run.py hands the gateway when CHAT_JWT_SECRET is not set. Connect with it:
ws://127.0.0.1:8080/chat?access_token=<token>.
"""

from __future__ import annotations

import argparse
import os
import sys

from backend import DEMO_SECRET, SECRET_ENV, TOKEN_TTL_S, mint


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Print a demo JWT for the chat example (HS256, demo secret).")
    p.add_argument("user", help="the token's subject (sub): 1-32 letters, digits or _ . -")
    p.add_argument("--ttl", type=int, default=TOKEN_TTL_S, help=f"seconds until it expires (default {TOKEN_TTL_S})")
    args = p.parse_args(argv)
    if args.ttl <= 0:
        p.error("--ttl must be a positive number of seconds")
    try:
        token = mint(args.user, ttl_s=args.ttl)
    except ValueError as exc:
        p.error(str(exc))
    if not os.environ.get(SECRET_ENV):
        print(f"demo secret (not for production): {DEMO_SECRET}", file=sys.stderr)
    print(token)


if __name__ == "__main__":
    main()
