"""Typed access to verified claims, shared by the claim validators."""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from .base import AuthContext
from .errors import TokenClaimInvalid

__all__ = ("numeric_date", "verified_claims")


def verified_claims(context: AuthContext) -> Mapping[str, Any]:
    """The claims of a token whose signature verified; misuse is a programming error."""
    if context.verified is None:
        raise RuntimeError("claim validators must run after the signature validator")
    return context.verified.claims


def numeric_date(claims: Mapping[str, Any], name: str) -> float | None:
    """A NumericDate claim (RFC 7519 §2): a finite JSON number, not a string or bool."""
    if name not in claims:
        return None
    value = claims[name]
    # bool is an int subclass in Python: `"exp": true` must not read as 1.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise TokenClaimInvalid(f"The bearer token claim '{name}' must be a number")
    if isinstance(value, float) and not math.isfinite(value):
        raise TokenClaimInvalid(f"The bearer token claim '{name}' must be finite")
    return float(value)
