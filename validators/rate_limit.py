"""Counts a call against its subscription's rate limit, as APIM's ``rate-limit``."""

from __future__ import annotations

from collections.abc import Awaitable
from typing import Protocol

from .base import AuthContext, RateLimitUsage, Subscription
from .errors import RateLimitExceeded

__all__ = ("RateLimitUsage", "RateLimitValidator", "RateLimiter")


class RateLimiter(Protocol):
    """Counts one call against ``subscription.rate_limit``.

    Subscriptions without a ``rate_limit`` are not counted at all; for the
    others ``None`` means no limit applies after all.
    """

    async def consume(self, subscription: Subscription) -> RateLimitUsage | None: ...


class RateLimitValidator:
    """Refuses a call over its subscription's limit with 429 and ``Retry-After``.

    It runs once the subscription key is known and before any token work: a
    caller over its limit costs one counter increment, no signature check, and
    calls count whether or not their token turns out valid (see
    docs/architecture.md, "Rate limits"). It runs on every request, cached
    credentials included.
    """

    name = "rate-limit"

    def __init__(self, limiter: RateLimiter) -> None:
        self._limiter = limiter

    def validate(self, context: AuthContext) -> Awaitable[None] | None:
        subscription = context.subscription
        if subscription is None:
            # Only the subscription key step can tell whose budget this is; a
            # chain that puts this step first is a wiring mistake, not a caller's.
            raise RuntimeError("the rate-limit step must follow the subscription key")
        if subscription.rate_limit is None:
            return None
        return self._count(context, subscription)

    async def _count(self, context: AuthContext, subscription: Subscription) -> None:
        usage = await self._limiter.consume(subscription)
        if usage is None:
            return
        context.usage = usage
        if usage.exceeded:
            raise RateLimitExceeded(retry_after=usage.reset_seconds)
