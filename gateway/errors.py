"""One exception tree. Each error carries what the outside world sees.

Before the upgrade that is an HTTP status and a short body; after it, a
WebSocket close code and reason. The text is always a fixed, safe phrase:
exception messages from libraries never reach a peer (they may leak keys,
paths or token fragments).
"""

from __future__ import annotations

# RFC 6455 7.4.1 close codes the gateway uses.
NORMAL = 1000
GOING_AWAY = 1001
PROTOCOL_ERROR = 1002
UNSUPPORTED_DATA = 1003
INVALID_PAYLOAD = 1007
POLICY_VIOLATION = 1008
MESSAGE_TOO_BIG = 1009
INTERNAL_ERROR = 1011
SERVICE_RESTART = 1012
TRY_AGAIN_LATER = 1013


class GatewayError(Exception):
    """Base of everything the gateway raises on purpose."""


class ConfigError(GatewayError):
    """A config file that cannot be used. Carries every problem found."""

    def __init__(self, problems: list[str]):
        self.problems = problems
        super().__init__("\n".join(problems))


class Refusal(GatewayError):
    """A handshake refused before the upgrade: an HTTP status and a reason.

    `reason` is a short phrase for the body and the logs; `metric` is the
    label for gateway_handshake_refusals_total.
    """

    def __init__(self, status: int, reason: str, *, metric: str | None = None,
                 headers: tuple[tuple[str, str], ...] = ()):
        self.status = status
        self.reason = reason
        self.metric = metric or reason.replace(" ", "_")
        self.headers = headers
        super().__init__(f"{status} {reason}")


class ProtocolViolation(GatewayError):
    """A peer broke RFC 6455 after the upgrade: close with `code`."""

    def __init__(self, code: int, reason: str):
        self.code = code
        self.reason = reason
        super().__init__(f"{code} {reason}")
