"""The verdict cache: credentials that passed the chain, bounded by size and exp."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from multidict import CIMultiDictProxy, istr

from validators import Identity, Subscription, VerifiedToken

__all__ = ("TokenCache", "TokenCacheStats", "Verdict", "credential_digest")

# Copied for each digest: hashlib.sha256() sets a context up from scratch
# through OpenSSL every time, which costs more than hashing a token.
_SHA256 = hashlib.sha256()
# istr: multidict compares them without lower-casing them on every look-up.
_AUTHORIZATION = istr("Authorization")
_SUBSCRIPTION_KEY = istr("Ocp-Apim-Subscription-Key")


def credential_digest(
    headers: CIMultiDictProxy[str], max_authorization: int, max_key: int
) -> bytes | None:
    """The verdict cache's key for a request: SHA-256 of its ``Authorization``
    and ``Ocp-Apim-Subscription-Key`` values, as received.

    ``None`` (no caching) unless there is exactly one of each, within bounds:
    other requests take the whole chain, which answers them precisely.
    """
    authorization = headers.getall(_AUTHORIZATION, ())
    key = headers.getall(_SUBSCRIPTION_KEY, ())
    if (
        len(authorization) != 1
        or len(key) != 1
        or len(authorization[0]) > max_authorization
        or len(key[0]) > max_key
    ):
        return None
    # aiohttp decodes header bytes with surrogateescape: this gives them back.
    return TokenCache.digest(
        authorization[0].encode("utf-8", "surrogateescape"),
        key[0].encode("utf-8", "surrogateescape"),
    )


def _always() -> bool:
    return True


@dataclass(slots=True)
class TokenCacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0


@dataclass(frozen=True, slots=True)
class Verdict:
    """What the chain established for one exact pair of credential headers."""

    subscription: Subscription
    verified: VerifiedToken
    identity: Identity
    expires_at: float  # the token's exp: the entry never outlives it
    not_before: float  # the token's nbf
    # Read from the claims once, for the per-route check on every hit.
    roles: frozenset[str] = frozenset()
    scopes: frozenset[str] = frozenset()


class TokenCache:
    """An LRU of verdicts keyed by SHA-256 of the exact credential headers.

    The key is the digest of the ``Authorization`` value and the subscription
    key together, so a hit stands for the whole cacheable part of the chain:
    the key's subscription, the token's shape, signature and static claims.
    Only digests are kept, never a token or a key. An entry lives no longer
    than the token's ``exp``; the validators that are not cacheable (time
    claims, per-route roles, rate limits, custom checks) still run on every hit.
    Entries go when their signing key leaves the JWKS (``retain_kids``) and all
    at once when the key store changes (``clear``).
    """

    def __init__(
        self,
        max_entries: int,
        clock: Callable[[], float] = time.time,
        *,
        keys_usable: Callable[[], bool] | None = None,
    ) -> None:
        if max_entries < 0:
            raise ValueError("max_entries must be zero or more")
        self._max_entries = max_entries
        self._clock = clock
        self._keys_usable = keys_usable
        self._entries: OrderedDict[bytes, Verdict] = OrderedDict()
        self.stats = TokenCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self._max_entries > 0

    @property
    def entries(self) -> OrderedDict[bytes, Verdict]:
        """The entries by digest, for the gate's short path to read (only)."""
        return self._entries

    @property
    def keys_usable(self) -> Callable[[], bool]:
        """Whether the signing keys may still be trusted (not past max staleness)."""
        return self._keys_usable if self._keys_usable is not None else _always

    @staticmethod
    def digest(authorization: bytes, subscription_key: bytes) -> bytes:
        """The entry key, from the header values as received: a value cannot
        hold a newline, so the pair is unambiguous."""
        context = _SHA256.copy()
        context.update(authorization)
        context.update(b"\n")
        context.update(subscription_key)
        return context.digest()

    def get(self, digest: bytes) -> Verdict | None:
        entry = self._entries.get(digest)
        if entry is None:
            self.stats.misses += 1
            return None
        if self._clock() >= entry.expires_at:
            del self._entries[digest]
            self.stats.misses += 1
            return None
        # Once the signing keys are past their maximum staleness, nothing is
        # served from memory either: the request takes the 503 path.
        if self._keys_usable is not None and not self._keys_usable():
            self.stats.misses += 1
            return None
        self._entries.move_to_end(digest)
        self.stats.hits += 1
        return entry

    def put(self, digest: bytes, verdict: Verdict) -> None:
        if not self._max_entries:
            return
        self._entries[digest] = verdict
        self._entries.move_to_end(digest)
        self.stats.stores += 1
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
            self.stats.evictions += 1

    def retain_kids(self, kids: Iterable[str]) -> int:
        """Drop entries signed by keys no longer published; returns how many."""
        keep = frozenset(kids)
        stale = [d for d, v in self._entries.items() if v.verified.kid not in keep]
        for digest in stale:
            del self._entries[digest]
        return len(stale)

    def clear(self) -> None:
        self._entries.clear()
