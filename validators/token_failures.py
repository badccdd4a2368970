"""Stops verifying new tokens for a subscription that keeps sending bad ones."""

from __future__ import annotations

from typing import Protocol

from .base import AuthContext, Subscription
from .errors import TooManyFailedAttempts

__all__ = ("TokenFailureLimit", "TokenFailureValidator")


class TokenFailureLimit(Protocol):
    """Seconds a subscription must wait before its next new token is checked."""

    def retry_after(self, subscription: Subscription) -> int | None: ...


class TokenFailureValidator:
    """429 for a subscription over its allowance of rejected tokens.

    A valid subscription key sent with forged tokens would otherwise cost one
    RS256 verification per request, however many. Once too many of its tokens
    failed within the period, new tokens are refused before any signature work
    until the period renews; credentials already in the verdict cache (valid
    tokens) are still served. It runs after the key and before the token.
    """

    name = "token-failures"

    def __init__(self, limit: TokenFailureLimit) -> None:
        self._limit = limit

    def validate(self, context: AuthContext) -> None:
        if context.from_cache:
            return
        subscription = context.subscription
        if subscription is None:
            raise RuntimeError("the token-failures step must follow the key step")
        wait = self._limit.retry_after(subscription)
        if wait is not None:
            raise TooManyFailedAttempts(retry_after=wait)
