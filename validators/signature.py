"""Verifies the RS256 signature with the published key chosen by ``kid``."""

from __future__ import annotations

import re
from collections.abc import Awaitable
from typing import Any, NamedTuple

from .base import AuthContext, SigningKeyProvider, VerificationKey, VerifiedToken
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
    """Checks the JOSE header, picks the key by ``kid`` and verifies the signature.

    With the key already at hand (the usual case) this runs without waiting;
    only a cold start, an unknown ``kid`` or stale keys take the async path.
    """

    name = "signature"
    cacheable = True

    def __init__(self, keys: SigningKeyProvider) -> None:
        self._keys = keys

    def validate(self, context: AuthContext) -> Awaitable[None] | None:
        token = context.token
        if token is None:
            raise RuntimeError("the signature validator needs the bearer validator")

        # One copy of the token as bytes; the segments and the signing input
        # are slices of it.
        try:
            raw = token.encode("ascii")
        except UnicodeEncodeError as err:
            raise TokenInvalid("The bearer token is not a compact JWS") from err
        first = raw.find(b".")
        last = raw.rfind(b".")
        if first < 0 or first == last or raw.count(b".") != 2:
            raise TokenInvalid("The bearer token is not a compact JWS")
        if first > _MAX_HEADER_BYTES:
            raise TokenInvalid("The bearer token header is too large")
        header = parse_json_object(decode_segment(raw[:first]), "header")
        kid = _check_header(header)
        signature = decode_segment(raw[last + 1 :])
        payload_raw = decode_segment(raw[first + 1 : last])
        parsed = _Parsed(kid, header, raw[:last], signature, payload_raw)

        key = self._keys.current_key(kid)
        if key is None:
            return self._with_fetched_key(context, parsed)
        _verify(context, key, parsed)
        return None

    async def _with_fetched_key(self, context: AuthContext, parsed: _Parsed) -> None:
        key = await self._keys.key_for(parsed.kid)
        if key is None:
            raise TokenSignatureKeyNotFound()
        _verify(context, key, parsed)


class _Parsed(NamedTuple):
    """A token taken apart, its signature not yet checked."""

    kid: str
    header: dict[str, Any]
    signing_input: bytes
    signature: bytes
    payload_raw: bytes


def _verify(context: AuthContext, key: VerificationKey, parsed: _Parsed) -> None:
    if not key.verify(parsed.signing_input, parsed.signature):
        raise TokenSignatureInvalid()
    # Claims are parsed only once the signature holds: unverified bytes never
    # reach the JSON reader beyond the header.
    claims = parse_json_object(parsed.payload_raw, "payload")
    context.verified = VerifiedToken(parsed.kid, parsed.header, claims)


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
