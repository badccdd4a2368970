"""Checks that ``aud`` names this API, in either of its accepted forms."""

from __future__ import annotations

from collections.abc import Iterable

from .base import AuthContext
from .claims import verified_claims
from .errors import TokenAudienceNotAllowed

__all__ = ("AudienceValidator",)


class AudienceValidator:
    """Accepts a token when one of its audiences is configured (exact match)."""

    name = "audience"
    cacheable = True

    def __init__(self, audiences: Iterable[str]) -> None:
        self._audiences = frozenset(audiences)
        if not self._audiences:
            raise ValueError("at least one audience is required")

    def validate(self, context: AuthContext) -> None:
        aud = verified_claims(context).get("aud")
        if isinstance(aud, str):
            if aud in self._audiences:
                return
        elif isinstance(aud, list) and aud:
            if any(isinstance(a, str) and a in self._audiences for a in aud):
                return
        elif aud is None:
            # python-jose skips the check when the claim is absent (J-40).
            raise TokenAudienceNotAllowed("The bearer token has no audience (aud)")
        raise TokenAudienceNotAllowed()
