"""The validator protocol and the small protocols validators receive."""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

from multidict import CIMultiDictProxy, MultiMapping

__all__ = (
    "AccessPolicy",
    "AuthContext",
    "Clock",
    "Identity",
    "RateLimit",
    "SigningKeyProvider",
    "Subscription",
    "SubscriptionLookup",
    "Validator",
    "VerificationKey",
    "VerifiedToken",
    "VerifiedTokenCache",
)


@dataclass(frozen=True, slots=True)
class RateLimit:
    """A number of calls allowed per renewal period, as APIM's ``rate-limit``."""

    calls: int
    period_seconds: int


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
    from_cache: bool = False
    identity: Identity | None = None


class Validator(Protocol):
    """One step of the chain: returns on success, raises an ``AuthError`` otherwise."""

    name: str

    async def validate(self, context: AuthContext) -> None: ...


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


class VerifiedTokenCache(Protocol):
    """Remembers tokens that passed every check, keyed by a hash of the token."""

    def get(self, token: str) -> VerifiedToken | None: ...


class Clock(Protocol):
    """Wall-clock seconds since the epoch, for the time claims."""

    def __call__(self) -> float: ...
