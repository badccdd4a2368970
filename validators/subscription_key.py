"""Checks the APIM subscription key: present, exactly one, of an active subscription."""

from __future__ import annotations

from .base import AuthContext, SubscriptionLookup
from .errors import (
    AmbiguousCredentials,
    SubscriptionKeyInvalid,
    SubscriptionKeyNotFound,
)

__all__ = ("SUBSCRIPTION_KEY_HEADER", "SubscriptionKeyValidator")

SUBSCRIPTION_KEY_HEADER = "Ocp-Apim-Subscription-Key"
_MAX_KEY_BYTES = 256


class SubscriptionKeyValidator:
    """Resolves the ``Ocp-Apim-Subscription-Key`` header through the key store."""

    name = "subscription-key"

    def __init__(self, lookup: SubscriptionLookup, *, cacheable: bool = False) -> None:
        """``cacheable`` only when the lookup's owner drops cached verdicts each
        time a subscription or key changes (the service's key store does)."""
        self._lookup = lookup
        self.cacheable = cacheable

    def validate(self, context: AuthContext) -> None:
        values = context.headers.getall(SUBSCRIPTION_KEY_HEADER, ())
        if len(values) > 1:
            raise AmbiguousCredentials()
        if not values or not values[0].strip():
            raise SubscriptionKeyNotFound()

        # aiohttp decodes header bytes with surrogateescape; this gives the
        # exact bytes back, so any value compares as bytes and none can raise.
        raw = values[0].encode("utf-8", "surrogateescape")
        subscription = None
        if len(raw) <= _MAX_KEY_BYTES:
            subscription = self._lookup.find(raw)
        if subscription is None:
            raise SubscriptionKeyInvalid()
        context.subscription = subscription
