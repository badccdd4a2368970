"""The validator protocol and the small protocols validators receive."""

from __future__ import annotations

from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from multidict import CIMultiDictProxy, MultiMapping

__all__ = (
    "AccessPolicy",
    "AuthContext",
    "Clock",
    "Identity",
    "RateLimit",
    "RateLimitUsage",
    "SigningKeyProvider",
    "Subscription",
    "SubscriptionLookup",
    "Validator",
    "VerificationKey",
    "VerifiedToken",
    "token_roles",
    "token_scopes",
)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A number of calls allowed per renewal period, as APIM's ``rate-limit``."""

    calls: int
    period_seconds: int


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


@dataclass(frozen=True, slots=True)
class Subscription:
    """An active subscription, as the key store resolved it."""

    name: str
    product: str
    rate_limit: RateLimit | None = None


@dataclass(frozen=True, slots=True)
class AccessPolicy:
    """What a route demands. ``None`` roles or scopes mean the configured defaults."""

    public: bool = False
    roles: tuple[str, ...] | None = None
    scopes: tuple[str, ...] | None = None


@dataclass(frozen=True, slots=True)
class Identity:
    """The caller once every validator has passed, attached to the request."""

    subscription: str
    product: str
    tenant_id: str
    object_id: str | None
    subject: str | None
    client_id: str | None
    roles: tuple[str, ...]
    scopes: tuple[str, ...]
    version: str | None
    claims: Mapping[str, Any]

    def as_dict(self) -> dict[str, Any]:
        return {
            "subscription": {"name": self.subscription, "product": self.product},
            "tid": self.tenant_id,
            "oid": self.object_id,
            "sub": self.subject,
            "azp": self.client_id,
            "roles": list(self.roles),
            "scp": list(self.scopes),
            "ver": self.version,
        }


def token_roles(claims: Mapping[str, Any]) -> frozenset[str]:
    """The string members of a ``roles`` array; anything else grants nothing (J-51)."""
    roles = claims.get("roles")
    if not isinstance(roles, list):
        return frozenset()
    return frozenset(role for role in roles if isinstance(role, str))


def token_scopes(claims: Mapping[str, Any]) -> frozenset[str]:
    """``scp`` split on single spaces; an array or other type grants nothing (J-54)."""
    scp = claims.get("scp")
    if not isinstance(scp, str):
        return frozenset()
    return frozenset(part for part in scp.split(" ") if part)


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token whose signature verified: its parsed header and claims."""

    kid: str
    header: Mapping[str, Any]
    claims: Mapping[str, Any]


@dataclass(slots=True)
class AuthContext:
    """What one request carries through the chain; each validator fills its part."""

    headers: CIMultiDictProxy[str]
    query: MultiMapping[str]
    policy: AccessPolicy = field(default_factory=AccessPolicy)
    subscription: Subscription | None = None
    token: str | None = None
    verified: VerifiedToken | None = None
    # True when subscription, token and verified come from the verdict cache:
    # only the validators that are not ``cacheable`` run (see ``Validator``).
    from_cache: bool = False
    identity: Identity | None = None
    # Set by the rate-limit step, for the ``RateLimit-*`` response headers.
    usage: RateLimitUsage | None = None


class Validator(Protocol):
    """One step of the chain: returns on success, raises an ``AuthError`` otherwise.

    ``validate`` may be a plain method (it returns ``None``) or a coroutine
    function; a plain method may also return an awaitable when, this time, it
    has to wait (a key fetch, a Redis call). The chain awaits only then, so the
    checks that never wait cost no coroutine.

    A validator may set ``cacheable = True`` when its verdict depends only on
    the credential headers, the settings, the key store and the signing keys.
    Requests whose exact credential headers already passed the whole chain skip
    those validators (``AuthContext.from_cache``); the others (time claims,
    per-route roles, rate limits, and any validator without the attribute) run
    on every request.
    """

    name: str

    def validate(self, context: AuthContext) -> Awaitable[None] | None: ...


class SubscriptionLookup(Protocol):
    """Resolves a presented key (its raw bytes) to an active subscription."""

    def find(self, key: bytes) -> Subscription | None: ...


@runtime_checkable
class VerificationKey(Protocol):
    """A public key built once per key-set refresh."""

    def verify(self, msg: bytes, sig: bytes) -> bool: ...


class SigningKeyProvider(Protocol):
    """Hands out verification keys by ``kid``.

    Returns ``None`` for a ``kid`` it does not know (after any refresh it chose to
    make); raises ``IdentityProviderUnavailable`` when it holds no usable keys.
    """

    async def key_for(self, kid: str) -> VerificationKey | None: ...

    def current_key(self, kid: str) -> VerificationKey | None:
        """The key when it is in the current usable set, without waiting.

        ``None`` says nothing more than "ask ``key_for``": the kid may be
        unknown, or the keys may be missing or stale.
        """
        ...


class Clock(Protocol):
    """Wall-clock seconds since the epoch, for the time claims."""

    def __call__(self) -> float: ...
