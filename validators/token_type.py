"""Refuses tokens that are not access tokens, such as ID tokens for the same app."""

from __future__ import annotations

from .base import AuthContext
from .claims import verified_claims
from .errors import TokenInvalid

__all__ = ("AccessTokenValidator",)

# Claims only ID tokens carry (OpenID Connect Core §2, §3.1.3.6); RFC 8725 §2.8.
_ID_TOKEN_CLAIMS = ("nonce", "at_hash", "c_hash")


class AccessTokenValidator:
    """An ID token has our client id as ``aud`` too; it must not pass as access."""

    name = "access-token"
    cacheable = True

    def validate(self, context: AuthContext) -> None:
        claims = verified_claims(context)
        if any(name in claims for name in _ID_TOKEN_CLAIMS):
            raise TokenInvalid("The bearer token is not an access token")
