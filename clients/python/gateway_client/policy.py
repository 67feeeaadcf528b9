"""What to do when a connection ends or an upgrade is refused: a table, no I/O.

The gateway says what it means with close codes (DESIGN 5) and handshake
statuses; this module turns each into one `Action`. The client (client.py)
turns the action into a wait, a token refresh, or the end.
"""

from __future__ import annotations

import enum
import re
from collections.abc import Mapping
from dataclasses import dataclass


class Action(str, enum.Enum):
    STOP = "stop"                    # closed, no retry
    RECONNECT = "reconnect"          # retry with exponential backoff and full jitter
    RESUME = "resume"                # drained (1012 + token): come back at once with the token
    TRY_LATER = "try_later"          # 1013 / 429: back off longer
    RETRY_AFTER = "retry_after"      # 503 with Retry-After: wait what the server asked
    REAUTH = "reauth"                # 1008 / 401 / 403: only with a new token from token_provider
    RESUME_FAILED = "resume_failed"  # the token was refused: start a fresh session, tell the app

    def __str__(self) -> str:
        return self.value


# RFC 6455 7.4.1 codes, and what the gateway means by them (DESIGN 5).
CLOSE_ACTIONS: Mapping[int, Action] = {
    1000: Action.STOP,        # normal: the server meant it
    1001: Action.RECONNECT,   # going away (idle timeout, lifetime end, a backend restarting)
    1006: Action.RECONNECT,   # dropped without a close: network, crash
    1008: Action.REAUTH,      # policy: token expired mid-connection, rate limit
    1011: Action.RECONNECT,   # upstream failed and could not be reattached
    1012: Action.RECONNECT,   # service restart without a token (a node with no session store)
    1013: Action.TRY_LATER,   # try again later: slow consumer, or a resume that could not finish
}

# The reason of the 1013 the gateway sends when a resume went live but could not
# finish (gateway/resume.py): the token was given back, so it is kept for the retry.
RESUME_RETRY_REASON = "resume failed; retry"

# tokens.py in the gateway: `<session id>.<secret>`, after `resume=` in the close reason.
_RESUME_REASON = re.compile(r"resume=([A-Za-z0-9_-]{8,64}\.[A-Za-z0-9_-]{16,64})")


def resume_token(reason: str) -> str | None:
    """The token of a drain's close reason `resume=<token>`, or None."""
    m = _RESUME_REASON.fullmatch(reason)
    return m.group(1) if m else None


@dataclass(frozen=True, slots=True)
class Verdict:
    action: Action
    resume_token: str | None = None  # the token to present on the next attempt
    retry_after_s: float | None = None


def after_close(code: int | None, reason: str, *, resume_token_held: str | None = None,
                overrides: Mapping[int, Action] | None = None) -> Verdict:
    """What follows a close with `code` (None: no close frame, as 1006).

    `resume_token_held`: the token this connection was opened with, kept only
    when the gateway says the resume may be tried again."""
    if code is None:
        code = 1006
    if overrides and code in overrides:
        action = overrides[code]
    else:
        token = resume_token(reason) if code == 1012 else None
        if token is not None:
            return Verdict(Action.RESUME, token)
        action = CLOSE_ACTIONS.get(code, Action.RECONNECT)
    keep = resume_token_held if code == 1013 and reason == RESUME_RETRY_REASON else None
    if action is Action.REAUTH:
        keep = None
    return Verdict(action, keep)


def after_reliable_close(code: int | None, reason: str, *, token: str,
                         overrides: Mapping[int, Action] | None = None) -> Verdict:
    """What follows the end of a reliable connection that got its hello (`token`).

    The gateway parks a reliable session on any end but its own 1000 and
    1008 (docs/reliable.md), so every other close resumes at once with the
    hello's token: 1006 (no close frame: the network lost), 1001, 1011, ...
    A drain's 1012 carries a token of its own, which is the one to present;
    a 1013 backs off longer with the token kept."""
    if code is None:
        code = 1006
    if code in (1000, 1008) or (overrides and code in overrides):
        return after_close(code, reason, overrides=overrides)
    drained = resume_token(reason) if code == 1012 else None
    if drained is not None:
        return Verdict(Action.RESUME, drained)
    if code == 1013:
        return Verdict(Action.TRY_LATER, token)
    return Verdict(Action.RESUME, token)


def after_refusal(status: int, reason: str, retry_after_s: float | None, *,
                  resume_token_held: str | None = None, reliable: bool = False) -> Verdict:
    """What follows an upgrade answered with HTTP `status` (not 101).

    While resuming: 410 (expired, used, overflowed, lost; reliable mode: the
    window no longer has what the client asks for) and a 401 whose reason
    says the resume itself was refused mean the session cannot come back:
    RESUME_FAILED; in reliable mode a 400 too (`last` out of range). A 401
    for the credentials keeps the token: the session is still there for a
    new JWT. 503 keeps it too."""
    if resume_token_held is not None and (
            status == 410 or (status == 401 and reason.startswith("resume refused"))
            or (reliable and status == 400)):
        return Verdict(Action.RESUME_FAILED)
    keep = resume_token_held
    if status in (401, 403):
        return Verdict(Action.REAUTH, keep)
    if status == 503:
        if retry_after_s is not None:
            return Verdict(Action.RETRY_AFTER, keep, retry_after_s)
        return Verdict(Action.RECONNECT, keep)
    if status == 429:
        return Verdict(Action.TRY_LATER, keep)
    if status >= 500:
        return Verdict(Action.RECONNECT, keep)
    # 400, 404 (no route), 405, 426, 431, a backend's own 4xx: retrying the same request cannot help.
    return Verdict(Action.STOP)


def parse_retry_after(value: str | None) -> float | None:
    """Retry-After in seconds (RFC 9110 10.2.3); the HTTP-date form is not used by the gateway."""
    if value is None:
        return None
    try:
        seconds = float(value.strip())
    except ValueError:
        return None
    return seconds if seconds >= 0 else None
