"""Verifies the RS256 signature with the published key chosen by ``kid``."""

from __future__ import annotations

import re

from .base import AuthContext, SigningKeyProvider, VerifiedToken, VerifiedTokenCache
from .errors import TokenInvalid, TokenSignatureInvalid, TokenSignatureKeyNotFound
from .jose_parsing import decode_segment, parse_json_object

__all__ = ("ALLOWED_ALGORITHM", "SignatureValidator")

# The algorithm comes from configuration, never from the token (RFC 8725 §3.1).
ALLOWED_ALGORITHM = "RS256"
_MAX_HEADER_BYTES = 2048
_KID = re.compile(r"[\x21-\x7e]{1,128}")
# Header parameters that would let the token choose its own key or change how it
# is processed (RFC 7515 §4.1, RFC 7797, RFC 7516); Entra never sends them.
_REFUSED_HEADER_PARAMETERS = frozenset(
    {"jku", "jwk", "x5u", "x5c", "crit", "b64", "cty", "zip", "enc"}
)


class SignatureValidator:
    """Checks the JOSE header, picks the key by ``kid`` and verifies the signature."""

    name = "signature"

    def __init__(
        self, keys: SigningKeyProvider, cache: VerifiedTokenCache | None = None
    ) -> None:
        self._keys = keys
        self._cache = cache

    async def validate(self, context: AuthContext) -> None:
        token = context.token
        if token is None:
            raise RuntimeError("the signature validator needs the bearer validator")
        if self._cache is not None:
            cached = self._cache.get(token)
            if cached is not None:
                context.verified = cached
                context.from_cache = True
                return

        header_segment, payload_segment, signature_segment = token.split(".")
        if len(header_segment) > _MAX_HEADER_BYTES:
            raise TokenInvalid("The bearer token header is too large")
        header = parse_json_object(decode_segment(header_segment), "header")
        kid = _check_header(header)
        signature = decode_segment(signature_segment)
        payload_raw = decode_segment(payload_segment)

        key = await self._keys.key_for(kid)
        if key is None:
            raise TokenSignatureKeyNotFound()
        signing_input = f"{header_segment}.{payload_segment}".encode("ascii")
        if not key.verify(signing_input, signature):
            raise TokenSignatureInvalid()

        claims = parse_json_object(payload_raw, "payload")
        context.verified = VerifiedToken(kid=kid, header=header, claims=claims)


def _check_header(header: dict[str, object]) -> str:
    alg = header.get("alg")
    if alg != ALLOWED_ALGORITHM:
        raise TokenInvalid("The bearer token must be signed with RS256")
    typ = header.get("typ")
    if typ is not None and (not isinstance(typ, str) or typ.upper() != "JWT"):
        raise TokenInvalid("The bearer token type must be JWT")
    if not _REFUSED_HEADER_PARAMETERS.isdisjoint(header):
        raise TokenInvalid("The bearer token header has a parameter this API refuses")
    kid = header.get("kid")
    # Entra always sends kid; without one we would have to try every key.
    if not isinstance(kid, str) or not _KID.fullmatch(kid):
        raise TokenInvalid("The bearer token header needs a key id (kid)")
    return kid
