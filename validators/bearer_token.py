"""Checks for exactly one bearer token with a strict compact-JWS shape."""

from __future__ import annotations

import re

from .base import AuthContext
from .errors import AmbiguousCredentials, TokenInvalid, TokenNotPresent

__all__ = ("BearerTokenValidator",)

# Three base64url segments without padding (RFC 7515 §7.1, RFC 4648 §5). Checked
# before any library sees the token: python-jose accepts padding and junk inside
# segments, which would give one token many spellings.
_COMPACT_JWS = re.compile(r"[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+\.[A-Za-z0-9_-]+")
# RFC 6750 §2.1: "Bearer" 1*SP b64token; the scheme is case-insensitive (RFC 9110).
_BEARER = re.compile(r"(?i:bearer) +(\S+)")
# Both at once, in one pass over the header: this runs on every request, and two
# passes over a 1-2 KB token cost about 5 µs more (docs/performance.md).
_BEARER_COMPACT_JWS = re.compile(r"(?i:bearer) +(" + _COMPACT_JWS.pattern + ")")


class BearerTokenValidator:
    """Extracts the token from the single ``Authorization: Bearer`` header."""

    name = "bearer-token"
    cacheable = True

    def __init__(self, max_token_bytes: int) -> None:
        self._max_token_bytes = max_token_bytes

    def validate(self, context: AuthContext) -> None:
        values = context.headers.getall("Authorization", ())
        if len(values) > 1:
            raise AmbiguousCredentials()
        if not values or not values[0].strip():
            raise TokenNotPresent()

        value = values[0]
        if len(value) > self._max_token_bytes + 16:
            raise TokenInvalid("The bearer token is larger than this API accepts")
        match = _BEARER_COMPACT_JWS.fullmatch(value)
        if match is None:
            # Only to say which part is wrong; the pattern above decided.
            if _BEARER.fullmatch(value) is None:
                raise TokenInvalid("The Authorization header must be 'Bearer <token>'")
            raise TokenInvalid("The bearer token is not a compact JWS")
        context.token = match.group(1)
