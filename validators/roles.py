"""Checks app roles (``roles``) or delegated scopes (``scp``): any one admits."""

from __future__ import annotations

from collections.abc import Iterable

from .base import AccessPolicy, AuthContext, token_roles, token_scopes
from .claims import verified_claims
from .errors import InsufficientRole

__all__ = ("RoleValidator", "token_roles", "token_scopes")


class RoleValidator:
    """Scope or app permission: a configured role in ``roles`` or scope in ``scp``."""

    name = "roles"
    # Not cacheable: each route has its own policy.

    def __init__(self, roles: Iterable[str], scopes: Iterable[str]) -> None:
        self._roles = tuple(roles)
        self._scopes = tuple(scopes)

    def required(self, policy: AccessPolicy) -> tuple[tuple[str, ...], tuple[str, ...]]:
        """The roles and the scopes a route with ``policy`` asks for, any one of which
        admits; both empty means no check."""
        roles = self._roles if policy.roles is None else policy.roles
        scopes = self._scopes if policy.scopes is None else policy.scopes
        return roles, scopes

    def validate(self, context: AuthContext) -> None:
        roles, scopes = self.required(context.policy)
        if not roles and not scopes:
            return

        claims = verified_claims(context)
        if roles and not token_roles(claims).isdisjoint(roles):
            return
        if scopes and not token_scopes(claims).isdisjoint(scopes):
            return
        raise InsufficientRole(required=(*roles, *scopes))
