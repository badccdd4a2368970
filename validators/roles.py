"""Checks app roles (``roles``) or delegated scopes (``scp``): any one admits."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from .base import AuthContext
from .claims import verified_claims
from .errors import InsufficientRole

__all__ = ("RoleValidator", "token_roles", "token_scopes")


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


class RoleValidator:
    """Scope or app permission: a configured role in ``roles`` or scope in ``scp``."""

    name = "roles"

    def __init__(self, roles: Iterable[str], scopes: Iterable[str]) -> None:
        self._roles = tuple(roles)
        self._scopes = tuple(scopes)

    async def validate(self, context: AuthContext) -> None:
        policy = context.policy
        roles = self._roles if policy.roles is None else policy.roles
        scopes = self._scopes if policy.scopes is None else policy.scopes
        if not roles and not scopes:
            return

        claims = verified_claims(context)
        if roles and not token_roles(claims).isdisjoint(roles):
            return
        if scopes and not token_scopes(claims).isdisjoint(scopes):
            return
        raise InsufficientRole(required=(*roles, *scopes))
