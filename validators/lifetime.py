"""Checks ``exp``, ``nbf`` and ``iat`` with the configured leeway and a lifetime cap."""

from __future__ import annotations

from .base import AuthContext, Clock
from .claims import numeric_date, verified_claims
from .errors import TokenClaimInvalid, TokenExpired, TokenNotYetValid

__all__ = ("LifetimeValidator",)


class LifetimeValidator:
    """Rejects tokens outside their validity window; ``exp`` is required."""

    name = "lifetime"
    # Not cacheable: time moves. Cached tokens take the short path below.

    def __init__(self, clock: Clock, leeway: int, max_lifetime: int) -> None:
        self._clock = clock
        self._leeway = leeway
        self._max_lifetime = max_lifetime

    @property
    def leeway(self) -> int:
        """Seconds of clock skew allowed on ``exp``, ``nbf`` and ``iat``."""
        return self._leeway

    @property
    def clock(self) -> Clock:
        return self._clock

    def validate(self, context: AuthContext) -> None:
        claims = verified_claims(context)
        if context.from_cache:
            # Every other part of the verdict still holds (the claims were
            # checked to be numbers, nbf <= exp, the lifetime cap); only time
            # has moved on. Read directly: this runs on every cached request.
            now = self._clock()
            if now >= claims["exp"] + self._leeway:
                raise TokenExpired()
            if now + self._leeway < claims["nbf"]:
                raise TokenNotYetValid()
            return
        exp = numeric_date(claims, "exp")
        nbf = numeric_date(claims, "nbf")
        iat = numeric_date(claims, "iat")
        if exp is None:
            raise TokenClaimInvalid("The bearer token has no expiry (exp)")
        if nbf is None or iat is None:
            # Entra always sends both; without them the window and the lifetime
            # cap cannot be checked (RFC 8725 §3.10, catalog J-30).
            raise TokenClaimInvalid("The bearer token has no nbf or iat claim")

        now = self._clock()
        leeway = self._leeway
        # RFC 7519 §4.1.4: not accepted *on or after* exp (python-jose is off by one).
        if now >= exp + leeway:
            raise TokenExpired()
        if nbf is not None and now + leeway < nbf:
            raise TokenNotYetValid()
        if iat is not None and iat > now + leeway:
            raise TokenNotYetValid("The bearer token was issued in the future")
        if nbf is not None and nbf > exp:
            raise TokenClaimInvalid("The bearer token is valid only after it expires")
        start = iat if iat is not None else now
        if exp - start > self._max_lifetime + leeway:
            raise TokenClaimInvalid(
                "The bearer token lives longer than this API allows"
            )
