"""What the client raises, and hands to `error` handlers."""

from __future__ import annotations


class GatewayClientError(Exception):
    """Base of everything the client raises on purpose."""


class QueueFull(GatewayClientError):
    """send() while the outbound queue is at its bound (overflow="raise")."""


class TooManyRequests(GatewayClientError):
    """request() while max_pending_requests replies are awaited already."""


class ClientClosed(GatewayClientError):
    """The client is closed: by close(), or after a refusal retrying cannot fix."""


class HandshakeRefused(GatewayClientError):
    """The gateway answered the upgrade with an HTTP status instead of 101.

    `reason` is the gateway's JSON `error` (or `reason`) field when it sent
    one; `retry_after_s` is its Retry-After header, if any.
    """

    def __init__(self, status: int, reason: str = "", retry_after_s: float | None = None):
        self.status = status
        self.reason = reason
        self.retry_after_s = retry_after_s
        super().__init__(f"handshake refused: {status} {reason}".rstrip())


class AuthRefused(GatewayClientError):
    """The credentials were refused (handshake 401/403 or close 1008) and no new
    token came from token_provider. `code` is the HTTP status or close code."""

    def __init__(self, code: int, reason: str = ""):
        self.code = code
        self.reason = reason
        super().__init__(f"credentials refused: {code} {reason}".rstrip())
