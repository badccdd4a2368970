"""The verified-token cache: tokens that passed the checks, bounded by size and exp."""

from __future__ import annotations

import hashlib
import time
from collections import OrderedDict
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from validators import VerifiedToken

__all__ = ("TokenCache", "TokenCacheStats")


@dataclass(slots=True)
class TokenCacheStats:
    hits: int = 0
    misses: int = 0
    stores: int = 0
    evictions: int = 0


class TokenCache:
    """An LRU of verified tokens keyed by SHA-256 of the exact token string.

    Only the digest is kept, never the token. An entry lives no longer than the
    token's ``exp``; the lifetime validator still re-checks the time claims on
    every hit, and role checks always run per route.
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
        self._entries: OrderedDict[bytes, tuple[float, VerifiedToken]] = OrderedDict()
        self.stats = TokenCacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def enabled(self) -> bool:
        return self._max_entries > 0

    def get(self, token: str) -> VerifiedToken | None:
        if not self._max_entries:
            return None
        # Once the signing keys are past their maximum staleness, no token is
        # served from memory either: the request takes the 503 path.
        if self._keys_usable is not None and not self._keys_usable():
            self.stats.misses += 1
            return None
        digest = hashlib.sha256(token.encode("ascii")).digest()
        entry = self._entries.get(digest)
        if entry is None:
            self.stats.misses += 1
            return None
        expires_at, verified = entry
        if self._clock() >= expires_at:
            del self._entries[digest]
            self.stats.misses += 1
            return None
        self._entries.move_to_end(digest)
        self.stats.hits += 1
        return verified

    def put(self, token: str, verified: VerifiedToken) -> None:
        if not self._max_entries:
            return
        exp = verified.claims.get("exp")
        if isinstance(exp, bool) or not isinstance(exp, int | float):
            return
        digest = hashlib.sha256(token.encode("ascii")).digest()
        self._entries[digest] = (float(exp), verified)
        self._entries.move_to_end(digest)
        self.stats.stores += 1
        while len(self._entries) > self._max_entries:
            self._entries.popitem(last=False)
            self.stats.evictions += 1

    def retain_kids(self, kids: Iterable[str]) -> int:
        """Drop entries signed by keys no longer published; returns how many."""
        keep = frozenset(kids)
        stale = [d for d, (_, v) in self._entries.items() if v.kid not in keep]
        for digest in stale:
            del self._entries[digest]
        return len(stale)

    def clear(self) -> None:
        self._entries.clear()
