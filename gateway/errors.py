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


class InvalidTransition(GatewayError):
    """A session (or one of its sides) asked to move where its state table has no way:
    a bug in the gateway, never the peer's doing (gateway/session.py)."""


class AuthError(GatewayError):
    """A refused credential. `reason` is a fixed, safe phrase; `status` 401/403."""

    def __init__(self, reason: str, status: int = 401):
        self.reason = reason
        self.status = status
        super().__init__(f"{status} {reason}")


class UnknownKid(AuthError):
    """The token names a key id we do not hold (yet).

    A distinct type so the async caller can refresh the JWKS once and retry.
    `kid` is attacker-controlled: use it for the lookup, never echo it.
    """

    def __init__(self, kid: str | None):
        self.kid = kid
        super().__init__("unknown key", 401)


class JwksFetchError(GatewayError):
    """Internal: a JWKS fetch produced nothing usable. Message is for our log only."""


class ChannelError(GatewayError, ValueError):
    """A bad channel name or too many channels: the text is safe to show."""


class ApiError(GatewayError):
    """A management API call refused: `status` and a JSON `{"error": message, **extra}`."""

    def __init__(self, status: int, message: str, **extra):
        self.status = status
        self.message = message
        self.extra = extra
        super().__init__(f"{status} {message}")


class UpstreamRefused(GatewayError):
    """The endpoint answered the upgrade with an HTTP status (not 101)."""

    def __init__(self, status: int):
        self.status = status
        super().__init__(status)


class NoBackendAvailable(GatewayError):
    """No endpoint of the pool answered the upgrade."""

    def __init__(self, backend: str):
        self.backend = backend
        super().__init__(f"no endpoint of backend {backend!r} answered")


class ReplyTooLarge(GatewayError):
    """An HTTP backend's reply body went past limits.max_message_bytes."""


class StoreUnavailable(GatewayError):
    """The session store (Redis) cannot be reached right now."""


class RecordVersionError(GatewayError):
    """A record written by a newer gateway than this one: not read, logged once."""

    def __init__(self, kind: str, version: object):
        self.kind = kind
        self.version = version
        super().__init__(f"{kind} record has format version {version!r}; this gateway reads up to "
                         f"{RECORD_VERSION}")


class HistoryError(GatewayError):
    """A channel history request that cannot be served whole. `status` is the HTTP answer."""

    status = 409

    def __init__(self, message: str, *, epoch: str, offset: int):
        self.epoch = epoch
        self.offset = offset
        super().__init__(message)


class HistoryEpochChanged(HistoryError):
    status = 409


class HistoryTrimmed(HistoryError):
    status = 410


# The format version of every record the gateway writes to the store.
RECORD_VERSION = 1
