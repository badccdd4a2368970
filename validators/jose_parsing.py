"""Strict decoding of compact-JWS segments: canonical base64url, plain JSON."""

from __future__ import annotations

import binascii
import json
from typing import Any

import orjson

from .errors import TokenInvalid

__all__ = ("decode_segment", "parse_json_object")

# base64url's two letters become the standard ones; the standard ones and "="
# become "!", which strict decoding refuses: each segment has one spelling.
_URLSAFE_TO_STANDARD = bytes.maketrans(b"-_+/=", b"+/!!!")
_PADDING = (b"", b"", b"==", b"=")
# The characters (as byte values) whose low 4 (after 2 in the group) or 2
# (after 3) bits are 0.
_CANONICAL_LAST: tuple[frozenset[int], ...] = (
    frozenset(),
    frozenset(),
    frozenset(b"AQgw"),
    frozenset(b"AEIMQUYcgkosw048"),
)


def decode_segment(segment: str | bytes) -> bytes:
    """Decode one unpadded base64url segment, refusing non-canonical spellings."""
    if isinstance(segment, str):
        try:
            segment = segment.encode("ascii")
        except UnicodeEncodeError as err:
            raise TokenInvalid("The bearer token has a malformed segment") from err
    remainder = len(segment) % 4
    if remainder == 1:
        raise TokenInvalid("The bearer token has a malformed segment")
    # Unused trailing bits must be zero (RFC 4648 §3.5), or one token would have
    # several spellings, each verifying and each a separate cache entry. With
    # 2 or 3 characters in the last group, 4 or 2 bits are unused: only these
    # final characters leave them zero.
    if remainder and segment[-1] not in _CANONICAL_LAST[remainder]:
        raise TokenInvalid("The bearer token has a non-canonical segment")
    try:
        standard = segment.translate(_URLSAFE_TO_STANDARD)
        # strict_mode refuses any character outside the alphabet ("!" above).
        return binascii.a2b_base64(standard + _PADDING[remainder], strict_mode=True)
    except (binascii.Error, ValueError) as err:
        raise TokenInvalid("The bearer token has a malformed segment") from err


def parse_json_object(raw: bytes, what: str) -> dict[str, Any]:
    """Parse a UTF-8 JSON object with no duplicate names and no NaN or Infinity."""
    value = _parse_canonical(raw)
    if value is None:
        value = _parse_exactly(raw, what)
    if not isinstance(value, dict):
        raise TokenInvalid(f"The bearer token {what} is not a JSON object")
    return value


def _parse_canonical(raw: bytes) -> Any:
    """The fast path: orjson, when ``raw`` is exactly orjson's own spelling.

    Serializing a parsed value can only give unique member names; so when that
    serialization equals the input byte for byte, the input had none twice
    either. Compact JSON as Entra writes it takes this path. Anything else (a
    space, an escape, a number spelled otherwise, a value orjson refuses) goes
    to the exact reader, which decides alone.
    """
    try:
        value = orjson.loads(raw)
        if orjson.dumps(value) == raw:
            return value
    except (orjson.JSONDecodeError, orjson.JSONEncodeError):
        pass
    return None


def _parse_exactly(raw: bytes, what: str) -> Any:
    try:
        text = raw.decode("utf-8")
        value = _DECODER.decode(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as err:
        # RecursionError: deeply nested JSON (python-jose lets it escape, J-18).
        raise TokenInvalid(f"The bearer token {what} is not valid JSON") from err
    # Only a \u escape can produce a lone surrogate (strict UTF-8 decoding above
    # refuses encoded ones), so tokens without escapes skip the check.
    if isinstance(value, dict) and "\\u" in text and _has_lone_surrogate(value):
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
