"""The rejection tree: every way the chain can refuse a request, as data."""

from __future__ import annotations

from typing import ClassVar

__all__ = (
    "AmbiguousCredentials",
    "AuthError",
    "CredentialsInQuery",
    "IdentityProviderUnavailable",
    "InsufficientRole",
    "RateLimitExceeded",
    "SubscriptionKeyInvalid",
    "SubscriptionKeyNotFound",
    "TokenAudienceNotAllowed",
    "TokenClaimInvalid",
    "TokenExpired",
    "TokenInvalid",
    "TokenIssuerNotAllowed",
    "TokenNotPresent",
    "TokenNotYetValid",
    "TokenSignatureInvalid",
    "TokenSignatureKeyNotFound",
    "TokenTenantNotAllowed",
    "TooManyFailedAttempts",
)


class AuthError(Exception):
    """A rejection with an HTTP status, a stable machine code and a client-safe message.

    ``challenge`` is the RFC 6750 ``error`` attribute for ``WWW-Authenticate``
    (``None`` means a bare challenge). ``message`` never holds a token, key or
    secret; it is what the client reads.
    """

    status: ClassVar[int] = 401
    code: ClassVar[str] = "Unauthorized"
    default_message: ClassVar[str] = "Access denied"
    challenge: ClassVar[str | None] = "invalid_token"

    def __init__(
        self,
        message: str | None = None,
        *,
        retry_after: int | None = None,
        required: tuple[str, ...] = (),
    ) -> None:
        self.message = message or self.default_message
        self.retry_after = retry_after
        self.required = required
        super().__init__(self.message)


class CredentialsInQuery(AuthError):
    status = 400
    code = "CredentialsInQuery"
    default_message = (
        "Credentials are not accepted in the query string. Send the subscription "
        "key in the Ocp-Apim-Subscription-Key header and the token in the "
        "Authorization header"
    )
    challenge = "invalid_request"


class AmbiguousCredentials(AuthError):
    status = 400
    code = "AmbiguousCredentials"
    default_message = (
        "Send exactly one Authorization and one Ocp-Apim-Subscription-Key header"
    )
    challenge = "invalid_request"


class SubscriptionKeyNotFound(AuthError):
    code = "SubscriptionKeyNotFound"
    default_message = (
        "Access denied due to missing subscription key. Make sure to include "
        "subscription key when making requests to an API."
    )
    challenge = None


class SubscriptionKeyInvalid(AuthError):
    code = "SubscriptionKeyInvalid"
    default_message = (
        "Access denied due to invalid subscription key. Make sure to provide a valid "
        "key for an active subscription."
    )
    challenge = None


class TokenNotPresent(AuthError):
    code = "TokenNotPresent"
    default_message = (
        "Access denied due to missing bearer token in the Authorization header"
    )
    challenge = None


class TokenInvalid(AuthError):
    code = "TokenInvalid"
    default_message = "The bearer token is malformed"


class TokenClaimInvalid(TokenInvalid):
    code = "TokenClaimInvalid"
    default_message = "The bearer token has a missing or malformed claim"


class TokenExpired(TokenInvalid):
    code = "TokenExpired"
    default_message = "The bearer token has expired"


class TokenNotYetValid(TokenInvalid):
    code = "TokenNotYetValid"
    default_message = "The bearer token is not valid yet"


class TokenSignatureInvalid(TokenInvalid):
    code = "TokenSignatureInvalid"
    default_message = "The bearer token signature is invalid"


class TokenSignatureKeyNotFound(TokenInvalid):
    code = "TokenSignatureKeyNotFound"
    default_message = "The bearer token was signed with an unknown key"


class TokenAudienceNotAllowed(TokenInvalid):
    code = "TokenAudienceNotAllowed"
    default_message = "The bearer token audience is not accepted by this API"


class TokenIssuerNotAllowed(TokenInvalid):
    code = "TokenIssuerNotAllowed"
    default_message = "The bearer token issuer is not accepted by this API"


class TokenTenantNotAllowed(TokenInvalid):
    code = "TokenTenantNotAllowed"
    default_message = "The bearer token was issued for another tenant"


class InsufficientRole(AuthError):
    status = 403
    code = "InsufficientRole"
    default_message = "The bearer token lacks a role or scope this operation requires"
    challenge = "insufficient_scope"


class RateLimitExceeded(AuthError):
    status = 429
    code = "RateLimitExceeded"
    default_message = "Rate limit is exceeded"
    challenge = None


class TooManyFailedAttempts(AuthError):
    status = 429
    code = "TooManyFailedAttempts"
    default_message = "Too many failed authentication attempts from this client"
    challenge = None


class IdentityProviderUnavailable(AuthError):
    status = 503
    code = "IdentityProviderUnavailable"
    default_message = (
        "The signing keys of the identity provider are not available. Try again later"
    )
    challenge = None
