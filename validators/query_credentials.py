"""Refuses credentials sent in the query string: they belong in headers."""

from __future__ import annotations

from .base import AuthContext
from .errors import CredentialsInQuery

__all__ = ("CREDENTIAL_QUERY_PARAMETERS", "QueryCredentialsValidator")

# APIM accepts `subscription-key` in the query when the header is absent; we never
# do, because query strings end up in access logs and proxies (RFC 9700 §4.3.2).
CREDENTIAL_QUERY_PARAMETERS = frozenset(
    {"subscription-key", "subscription_key", "access_token", "access-token"}
)


class QueryCredentialsValidator:
    """Rejects a request whose query string carries a key or a token."""

    name = "query-credentials"

    def validate(self, context: AuthContext) -> None:
        query = context.query
        if not query:
            return
        if any(name.lower() in CREDENTIAL_QUERY_PARAMETERS for name in query):
            raise CredentialsInQuery()
