"""Per-route access policies: public, or protected with the default or its own roles."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from validators import AccessPolicy

__all__ = ("PROTECTED", "PUBLIC", "policy_of", "public", "requires")

PROTECTED = AccessPolicy()
PUBLIC = AccessPolicy(public=True)
_ATTRIBUTE = "__access_policy__"

HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])


def public(handler: HandlerT) -> HandlerT:
    """Mark a handler as open to anyone: no key, no token."""
    setattr(handler, _ATTRIBUTE, PUBLIC)
    return handler


def requires(
    *, roles: tuple[str, ...] | None = None, scopes: tuple[str, ...] | None = None
) -> Callable[[HandlerT], HandlerT]:
    """Protect a handler with its own roles or scopes instead of the defaults."""
    policy = AccessPolicy(roles=roles, scopes=scopes)

    def mark(handler: HandlerT) -> HandlerT:
        setattr(handler, _ATTRIBUTE, policy)
        return handler

    return mark


def policy_of(handler: object) -> AccessPolicy:
    """A handler's policy; unmarked handlers (and unknown routes) are protected."""
    policy = getattr(handler, _ATTRIBUTE, PROTECTED)
    return policy if isinstance(policy, AccessPolicy) else PROTECTED
