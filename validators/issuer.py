"""Checks ``iss`` against the accepted issuers and its pairing with ``ver``."""

from __future__ import annotations

from collections.abc import Iterable

from .base import AuthContext
from .claims import verified_claims
from .errors import TokenClaimInvalid, TokenIssuerNotAllowed

__all__ = ("IssuerValidator",)

_VERSIONS = ("1.0", "2.0")


class IssuerValidator:
    """Exact string match of ``iss`` (OpenID Connect Core §3.1.3.7)."""

    name = "issuer"
    cacheable = True

    def __init__(self, issuers: Iterable[str]) -> None:
        self._issuers = frozenset(issuers)
        if not self._issuers:
            raise ValueError("at least one issuer is required")

    def validate(self, context: AuthContext) -> None:
        claims = verified_claims(context)
        iss = claims.get("iss")
        if not isinstance(iss, str) or iss not in self._issuers:
            raise TokenIssuerNotAllowed()

        ver = claims.get("ver")
        if ver is None:
            # Entra always sends ver; without it the iss/ver pairing is unchecked.
            raise TokenClaimInvalid("The bearer token has no version (ver)")
        if ver not in _VERSIONS:
            raise TokenClaimInvalid("The bearer token version (ver) is not 1.0 or 2.0")
        # Entra's v2 issuers end in /v2.0 and v1 issuers do not (J-42).
        if (ver == "2.0") != iss.endswith("/v2.0"):
            raise TokenIssuerNotAllowed(
                "The bearer token issuer does not match its version"
            )
