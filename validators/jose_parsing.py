"""Strict decoding of compact-JWS segments: canonical base64url, plain JSON."""

from __future__ import annotations

import base64
import binascii
import json
from typing import Any

from .errors import TokenInvalid

__all__ = ("decode_segment", "parse_json_object")


def decode_segment(segment: str) -> bytes:
    """Decode one unpadded base64url segment, refusing non-canonical spellings."""
    if len(segment) % 4 == 1:
        raise TokenInvalid("The bearer token has a malformed segment")
    padded = segment + "=" * (-len(segment) % 4)
    try:
        raw = base64.urlsafe_b64decode(padded)
    except (binascii.Error, ValueError) as err:
        raise TokenInvalid("The bearer token has a malformed segment") from err
    # Unused trailing bits must be zero (RFC 4648 §3.5), or one token would have
    # several spellings, each verifying and each a separate cache entry.
    if base64.urlsafe_b64encode(raw).rstrip(b"=") != segment.encode("ascii"):
        raise TokenInvalid("The bearer token has a non-canonical segment")
    return raw


def parse_json_object(raw: bytes, what: str) -> dict[str, Any]:
    """Parse a UTF-8 JSON object with no duplicate names and no NaN or Infinity."""
    try:
        text = raw.decode("utf-8")
        value = _DECODER.decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        # RecursionError: deeply nested JSON (python-jose lets it escape, J-18).
        raise TokenInvalid(f"The bearer token {what} is not valid JSON") from err
    if not isinstance(value, dict):
        raise TokenInvalid(f"The bearer token {what} is not a JSON object")
    # Only a \u escape can produce a lone surrogate (strict UTF-8 decoding above
    # refuses encoded ones), so tokens without escapes skip the check.
    if "\\u" in text and _has_lone_surrogate(value):
        raise TokenInvalid(f"The bearer token {what} is not valid Unicode")
    return value


def _has_lone_surrogate(value: dict[str, Any]) -> bool:
    # RFC 7493 §2.1 (I-JSON): no unpaired surrogates. Python's json accepts
    # them, and a claim holding one cannot be encoded again: orjson raises on
    # it, so it would turn /whoami (or any handler) into a 500 (catalog J-16).
    try:
        json.dumps(value, ensure_ascii=False).encode("utf-8")
    except (UnicodeEncodeError, RecursionError):
        return True
    return False


def _unique_object(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    # RFC 8725 §3.7 / RFC 7515 §4: duplicate member names must be rejected,
    # since parsers disagree on which one wins.
    result = dict(pairs)
    if len(result) != len(pairs):
        raise ValueError("duplicate member name")
    return result


def _refuse_constant(name: str) -> Any:
    # RFC 8259 §6: NaN and Infinity are not JSON; Python's json accepts them.
    raise ValueError(f"{name} is not JSON")


# Built once: json.loads with these options builds a new decoder on every call,
# which costs more than decoding a token header (docs/performance.md).
_DECODER = json.JSONDecoder(
    object_pairs_hook=_unique_object, parse_constant=_refuse_constant
)
