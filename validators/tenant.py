"""Checks that ``tid`` is this API's tenant."""

from __future__ import annotations

from .base import AuthContext
from .claims import verified_claims
from .errors import TokenTenantNotAllowed

__all__ = ("TenantValidator",)


class TenantValidator:
    """A valid signature is not enough: Entra's keys serve every tenant (J-44)."""

    name = "tenant"
    cacheable = True

    def __init__(self, tenant_id: str) -> None:
        self._tenant_id = tenant_id

    def validate(self, context: AuthContext) -> None:
        tid = verified_claims(context).get("tid")
        if tid != self._tenant_id:
            raise TokenTenantNotAllowed()
