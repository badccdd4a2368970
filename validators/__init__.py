"""Validators of the authentication chain, one per module, and their protocols."""

from .audience import AudienceValidator
from .base import (
    AccessPolicy,
    AuthContext,
    Clock,
    Identity,
    RateLimit,
    SigningKeyProvider,
    Subscription,
    SubscriptionLookup,
    Validator,
    VerificationKey,
    VerifiedToken,
    token_roles,
    token_scopes,
)
from .bearer_token import BearerTokenValidator
from .errors import (
    AmbiguousCredentials,
    AuthError,
    CredentialsInQuery,
    IdentityProviderUnavailable,
    InsufficientRole,
    RateLimitExceeded,
    SubscriptionKeyInvalid,
    SubscriptionKeyNotFound,
    TokenAudienceNotAllowed,
    TokenClaimInvalid,
    TokenExpired,
    TokenInvalid,
    TokenIssuerNotAllowed,
    TokenNotPresent,
    TokenNotYetValid,
    TokenSignatureInvalid,
    TokenSignatureKeyNotFound,
    TokenTenantNotAllowed,
    TooManyFailedAttempts,
)
from .issuer import IssuerValidator
from .lifetime import LifetimeValidator
from .query_credentials import QueryCredentialsValidator
from .rate_limit import (
    RateLimiter,
    RateLimitUsage,
    RateLimitValidator,
)
from .roles import RoleValidator
from .signature import SignatureValidator
from .subscription_key import SubscriptionKeyValidator
from .tenant import TenantValidator
from .token_failures import TokenFailureLimit, TokenFailureValidator
from .token_type import AccessTokenValidator

__all__ = (
    "AccessPolicy",
    "AccessTokenValidator",
    "AmbiguousCredentials",
    "AudienceValidator",
    "AuthContext",
    "AuthError",
    "BearerTokenValidator",
    "Clock",
    "CredentialsInQuery",
    "Identity",
    "IdentityProviderUnavailable",
    "InsufficientRole",
    "IssuerValidator",
    "LifetimeValidator",
    "QueryCredentialsValidator",
    "RateLimit",
    "RateLimitExceeded",
    "RateLimitUsage",
    "RateLimitValidator",
    "RateLimiter",
    "RoleValidator",
    "SignatureValidator",
    "SigningKeyProvider",
    "Subscription",
    "SubscriptionKeyInvalid",
    "SubscriptionKeyNotFound",
    "SubscriptionKeyValidator",
    "SubscriptionLookup",
    "TenantValidator",
    "TokenAudienceNotAllowed",
    "TokenClaimInvalid",
    "TokenExpired",
    "TokenFailureLimit",
    "TokenFailureValidator",
    "TokenInvalid",
    "TokenIssuerNotAllowed",
    "TokenNotPresent",
    "TokenNotYetValid",
    "TokenSignatureInvalid",
    "TokenSignatureKeyNotFound",
    "TokenTenantNotAllowed",
    "TooManyFailedAttempts",
    "Validator",
    "VerificationKey",
    "VerifiedToken",
    "token_roles",
    "token_scopes",
)
