"""How long to wait before the next attempt: exponential with full jitter.

Full jitter (delay = uniform(0, min(max_delay, base * 2**attempt))) spreads
the clients of a failed node over the whole window instead of bringing them
back together in waves. The random source is injected, so the delays are
exact in tests.
"""

from __future__ import annotations

import random as _random
from collections.abc import Callable
from dataclasses import dataclass, field

# 2**attempt overflows a float somewhere past 1000; the cap is reached long before.
_MAX_EXPONENT = 62


@dataclass(frozen=True, slots=True, kw_only=True)
class Backoff:
    base_s: float = 0.5           # the first window: uniform(0, base_s)
    max_s: float = 30.0           # no wait is longer than this
    try_again_min_s: float = 5.0  # 1013 / 429: never sooner than this
    resume_jitter_s: float = 0.25  # a drained client resumes within this (no thundering herd)
    retry_after_jitter_s: float = 1.0  # added to a 503's Retry-After
    random: Callable[[], float] = field(default=_random.random, compare=False)

    def __post_init__(self) -> None:
        for name in ("base_s", "max_s", "try_again_min_s", "resume_jitter_s", "retry_after_jitter_s"):
            value = getattr(self, name)
            if not value >= 0:
                raise ValueError(f"Backoff.{name} must be >= 0 (got {value!r})")

    def window(self, attempt: int) -> float:
        """The upper bound of the wait before attempt number `attempt` (0-based)."""
        return min(self.max_s, self.base_s * 2.0 ** min(max(attempt, 0), _MAX_EXPONENT))

    def delay(self, attempt: int) -> float:
        """An ordinary retry (network error, 1001, 1006, 1011, ...)."""
        return self.random() * self.window(attempt)

    def try_again_delay(self, attempt: int) -> float:
        """After 1013 (try again later) or 429: at least try_again_min_s, then growing as usual."""
        return min(self.max_s, self.try_again_min_s + self.delay(attempt))

    def resume_delay(self) -> float:
        """After a drain's 1012: at once, give or take resume_jitter_s."""
        return self.random() * self.resume_jitter_s

    def retry_after_delay(self, retry_after_s: float) -> float:
        """After a 503 with Retry-After: what the server asked, plus jitter."""
        return min(self.max_s, max(0.0, retry_after_s)) + self.random() * self.retry_after_jitter_s
