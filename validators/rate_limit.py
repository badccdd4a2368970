"""Counts a call against its subscription's rate limit, as APIM's ``rate-limit``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from .base import AuthContext, Subscription
from .errors import RateLimitExceeded

__all__ = (
    "RateLimitUsage",
    "RateLimitValidator",
    "RateLimitedContext",
    "RateLimiter",
)


@dataclass(frozen=True, slots=True)
class RateLimitUsage:
    """Where a subscription stands in its current renewal period after this call.

    ``reset_seconds`` is how long until the period renews (at least 1), the value
    of both ``RateLimit-Reset`` and, once over the limit, ``Retry-After``.
    """

    limit: int
    remaining: int
    reset_seconds: int
    exceeded: bool


class RateLimiter(Protocol):
    """Counts one call for a subscription; ``None`` when no limit applies to it."""

    async def consume(self, subscription: Subscription) -> RateLimitUsage | None: ...


@dataclass(slots=True)
class RateLimitedContext(AuthContext):
    """An ``AuthContext`` that also carries the usage, for the response headers.

    The middleware builds this one; with a plain ``AuthContext`` the limit is
    still enforced, only the ``RateLimit-*`` headers are left out.
    """

    usage: RateLimitUsage | None = None


class RateLimitValidator:
    """Refuses a call over its subscription's limit with 429 and ``Retry-After``.

    It runs once the subscription key is known and before any token work: a
    caller over its limit costs one counter increment, no signature check, and
    calls count whether or not their token turns out valid (see
    docs/architecture.md, "Rate limits").
    """

    name = "rate-limit"

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    async def validate(self, context: AuthContext) -> None:
        subscription = context.subscription
        if subscription is None:
            # Only the subscription key step can tell whose budget this is; a
            # chain that puts this step first is a wiring mistake, not a caller's.
            raise RuntimeError("the rate-limit step must follow the subscription key")

        usage = await self._limiter.consume(subscription)
        if usage is None:
            return
        if isinstance(context, RateLimitedContext):
            context.usage = usage
        if usage.exceeded:
            raise RateLimitExceeded(retry_after=usage.reset_seconds)
