"""Rate limits per subscription and the throttle on failed authentication, per fleet.

Both count calls in fixed renewal periods. On Redis one Lua script increments a
counter and starts its period in one step, so every replica sees the same count
and the limit holds exactly under concurrency. When Redis does not answer, each
replica counts on its own, carrying on from the last count Redis gave it: the
limit still holds, per replica, and nothing is let through uncounted.
"""

from __future__ import annotations

import hashlib
import ipaddress
import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Final

from aiohttp import web
from redis.asyncio import Redis

from validators import RateLimit, Subscription
from validators.rate_limit import RateLimitUsage

from .log import auth_logger
from .shared_store import SharedStore, SharedStoreUnavailable, UnexpectedReply

__all__ = (
    "AUTH_THROTTLE",
    "RATE_LIMITER",
    "TOKEN_THROTTLE",
    "TRUSTED_PROXIES",
    "FailedAuthThrottle",
    "LocalCounter",
    "SubscriptionRateLimiter",
    "TokenFailureThrottle",
    "WindowCount",
    "WindowCounter",
    "client_address",
    "client_bucket",
    "parse_trusted_proxies",
)

Network = ipaddress.IPv4Network | ipaddress.IPv6Network

FORWARDED_FOR: Final = "X-Forwarded-For"
_MAX_LOCAL_ENTRIES: Final = 100_000
# IPv6 hands every subscriber at least a /64: counting single addresses would
# let one client rotate through 2**64 of them.
_IPV6_BUCKET_BITS: Final = 64

# INCR and PEXPIRE in one atomic step. An entry that is not a counter, or whose
# expiry is longer than the period (written by someone else), is replaced: a
# foreign value can neither break counting nor stretch a period.
_HIT_SCRIPT: Final = """
local count = redis.pcall('INCR', KEYS[1])
if type(count) ~= 'number' then
  redis.call('DEL', KEYS[1])
  count = redis.call('INCR', KEYS[1])
end
local period = tonumber(ARGV[1])
local ttl = redis.call('PTTL', KEYS[1])
if ttl < 0 or ttl > period then
  redis.call('PEXPIRE', KEYS[1], period)
  ttl = period
end
return {count, ttl}
"""


@dataclass(frozen=True, slots=True)
class WindowCount:
    """Calls counted in the current period, and milliseconds until it renews."""

    count: int
    reset_ms: int

    @property
    def reset_seconds(self) -> int:
        """Whole seconds for ``Retry-After`` and ``RateLimit-Reset``: at least 1."""
        return max(1, math.ceil(self.reset_ms / 1000))


class LocalCounter:
    """Fixed periods in this replica's memory: the fallback, and Redis's mirror.

    Bounded: expired entries go first, then the oldest, so a flood of distinct
    keys (addresses) cannot grow memory without limit.
    """

    def __init__(
        self,
        *,
        max_entries: int = _MAX_LOCAL_ENTRIES,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._max_entries = max_entries
        self._monotonic = monotonic
        self._entries: dict[str, tuple[int, float]] = {}

    def __len__(self) -> int:
        return len(self._entries)

    def hit(self, key: str, period_ms: int) -> WindowCount:
        now = self._monotonic()
        count, ends = self._current(key, now)
        if count == 0:
            ends = now + period_ms / 1000
        self._store(key, count + 1, ends)
        return WindowCount(count + 1, _remaining_ms(ends, now))

    def observe(self, key: str, seen: WindowCount) -> None:
        """Remember what Redis counted, to carry on from it if Redis goes away."""
        now = self._monotonic()
        count, _ = self._current(key, now)
        if seen.count >= count:
            self._store(key, seen.count, now + seen.reset_ms / 1000)

    def _current(self, key: str, now: float) -> tuple[int, float]:
        entry = self._entries.get(key)
        if entry is None or entry[1] <= now:
            return 0, now
        return entry

    def _store(self, key: str, count: int, ends: float) -> None:
        self._entries.pop(key, None)
        self._entries[key] = (count, ends)
        if len(self._entries) > self._max_entries:
            self._evict()

    def _evict(self) -> None:
        now = self._monotonic()
        for key in [k for k, (_, ends) in self._entries.items() if ends <= now]:
            del self._entries[key]
        while len(self._entries) > self._max_entries:
            # Insertion order is update order: the first key is the stalest.
            del self._entries[next(iter(self._entries))]


class WindowCounter:
    """Counts in Redis while it answers, in this replica's memory while not."""

    def __init__(self, store: SharedStore, local: LocalCounter | None = None) -> None:
        self._store = store
        self._local = local or LocalCounter()
        self._hit = store.script(_HIT_SCRIPT) if store.shared else None
        self.shared_hits = 0
        self.local_hits = 0

    @property
    def store(self) -> SharedStore:
        return self._store

    async def hit(self, key: str, period_ms: int) -> WindowCount:
        script = self._hit
        if script is not None:
            try:
                seen = await self._store.run(
                    lambda client: _run_hit(script, client, key, period_ms)
                )
            except SharedStoreUnavailable:
                pass
            else:
                self.shared_hits += 1
                self._local.observe(key, seen)
                return seen
        self.local_hits += 1
        return self._local.hit(key, period_ms)


async def _run_hit(script: Any, client: Redis, key: str, period_ms: int) -> WindowCount:
    reply = await script(keys=[key], args=[period_ms], client=client)
    if (
        not isinstance(reply, list)
        or len(reply) != 2
        or not all(type(value) is int and value >= 0 for value in reply)
    ):
        raise UnexpectedReply("the counter script returned something else")
    return WindowCount(count=reply[0], reset_ms=reply[1])


class SubscriptionRateLimiter:
    """Implements ``RateLimiter``: the subscription's own limit, else its product's.

    ``Subscription.rate_limit`` is already resolved by the key store. A counter
    is named after the subscription and the limit, so changing a limit starts a
    fresh period rather than inheriting one of another length.
    """

    def __init__(self, counter: WindowCounter) -> None:
        self._counter = counter
        self.exceeded = 0

    async def consume(self, subscription: Subscription) -> RateLimitUsage | None:
        limit = subscription.rate_limit
        if limit is None:
            return None

        window = f"{limit.calls}-per-{limit.period_seconds}s"
        key = self._counter.store.key("ratelimit", subscription.name, window)
        seen = await self._counter.hit(key, limit.period_seconds * 1000)

        exceeded = seen.count > limit.calls
        if exceeded:
            self.exceeded += 1
        return RateLimitUsage(
            limit=limit.calls,
            remaining=max(0, limit.calls - seen.count),
            reset_seconds=seen.reset_seconds,
            exceeded=exceeded,
        )

    def status(self) -> dict[str, Any]:
        return {
            "counting": "shared" if self._counter.store.available else "per-replica",
            "exceeded": self.exceeded,
            "shared_hits": self._counter.shared_hits,
            "local_hits": self._counter.local_hits,
        }


class FailedAuthThrottle:
    """Slows down guessing: after ``limit.calls`` 401s from one client within
    ``limit.period_seconds``, that client gets 429 until the period renews.

    The check is in memory, so a throttled client costs no Redis call and no
    validator work; failures are counted fleet-wide. A replica learns of a block
    when it counts its own next failure from that client, so a client spreading
    its guesses over N replicas gets at most N - 1 more than the limit.
    """

    def __init__(
        self,
        limit: RateLimit | None,
        counter: WindowCounter,
        *,
        max_entries: int = _MAX_LOCAL_ENTRIES,
        monotonic: Callable[[], float] = time.monotonic,
        namespace: str = "auth-failures",
        event: str = "auth.client_throttled",
    ) -> None:
        self._limit = limit
        self._counter = counter
        self._namespace = namespace
        self._event = event
        self._max_entries = max_entries
        self._monotonic = monotonic
        self._blocked: dict[str, float] = {}
        # Read by the gate: while empty, no client address need be looked up.
        self.blocked: Mapping[str, float] = self._blocked
        self._blocked_until = -math.inf  # the latest deadline in ``_blocked``
        self.throttled = 0

    @property
    def limit(self) -> RateLimit | None:
        return self._limit

    @property
    def blocking(self) -> bool:
        """Whether any client may be blocked now: when not, nobody need be looked up."""
        if not self._blocked:
            return False
        if self._monotonic() >= self._blocked_until:
            self._blocked.clear()
            return False
        return True

    def retry_after(self, client: str) -> int | None:
        """Seconds this client must wait, or ``None`` when it may try."""
        until = self._blocked.get(client)
        if until is None:
            return None
        left = until - self._monotonic()
        if left <= 0:
            del self._blocked[client]
            return None
        self.throttled += 1
        return max(1, math.ceil(left))

    async def record_failure(self, client: str) -> None:
        limit = self._limit
        if limit is None:
            return

        # The address is hashed: a Redis key is no place for personal data.
        digest = hashlib.sha256(client.encode("utf-8", "surrogateescape")).hexdigest()
        key = self._counter.store.key(self._namespace, digest[:32])
        seen = await self._counter.hit(key, limit.period_seconds * 1000)
        if seen.count < limit.calls:
            return

        newly = client not in self._blocked
        self._blocked.pop(client, None)
        until = self._monotonic() + seen.reset_ms / 1000
        self._blocked[client] = until
        self._blocked_until = max(self._blocked_until, until)
        if len(self._blocked) > self._max_entries:
            del self._blocked[next(iter(self._blocked))]
        if newly:
            auth_logger.warning(
                self._event,
                extra={
                    "client": client,
                    "failures": seen.count,
                    "retry_after": seen.reset_seconds,
                },
            )

    def status(self) -> dict[str, Any]:
        limit = self._limit
        return {
            "limit": None if limit is None else f"{limit.calls}/{limit.period_seconds}",
            "clients_throttled": len(self._blocked),
            "requests_refused": self.throttled,
        }


class TokenFailureThrottle:
    """Implements ``TokenFailureLimit``: the throttle above, per subscription.

    Counts the 401s of requests whose subscription key was valid (their tokens
    were refused); see ``validators.token_failures``.
    """

    def __init__(self, limit: RateLimit | None, counter: WindowCounter) -> None:
        self._throttle = FailedAuthThrottle(
            limit,
            counter,
            namespace="token-failures",
            event="auth.subscription_throttled",
        )

    @property
    def limit(self) -> RateLimit | None:
        return self._throttle.limit

    def retry_after(self, subscription: Subscription) -> int | None:
        if not self._throttle.blocked:
            return None
        return self._throttle.retry_after(subscription.name)

    async def record_failure(self, subscription: Subscription) -> None:
        await self._throttle.record_failure(subscription.name)

    def status(self) -> dict[str, Any]:
        state = self._throttle.status()
        return {
            "limit": state["limit"],
            "subscriptions_throttled": state["clients_throttled"],
            "requests_refused": state["requests_refused"],
        }


def parse_trusted_proxies(values: Sequence[str]) -> tuple[Network, ...]:
    """Addresses or networks (``10.0.0.0/8``); raises ``ValueError`` on a bad one."""
    return tuple(ipaddress.ip_network(value.strip(), strict=False) for value in values)


def client_address(request: web.Request, trusted: tuple[Network, ...]) -> str:
    """Whose failures these are: the peer, or the last ``X-Forwarded-For`` hop.

    The header is read only when the peer is a trusted proxy, and only its last
    hop, the one that proxy wrote itself: anything before it is whatever the
    client chose to send. A last hop that is not an address leaves the peer.
    """
    peer = request.remote or ""
    if trusted and _within(peer, trusted):
        hops = [
            hop.strip()
            for value in request.headers.getall(FORWARDED_FOR, ())
            for hop in value.split(",")
        ]
        if hops and _address(hops[-1]) is not None:
            return client_bucket(hops[-1])
    return client_bucket(peer)


def client_bucket(text: str) -> str:
    """The address as counted: IPv4 as is, IPv6 by its /64, else ``unknown``."""
    address = _address(text)
    if address is None:
        return "unknown"
    if isinstance(address, ipaddress.IPv6Address):
        mapped = address.ipv4_mapped
        if mapped is not None:
            return str(mapped)
        network = ipaddress.IPv6Network((address, _IPV6_BUCKET_BITS), strict=False)
        return str(network)
    return str(address)


def _address(text: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(text)
    except ValueError:
        return None


def _within(peer: str, trusted: Sequence[Network]) -> bool:
    address = _address(peer)
    if address is None:
        return False
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped:
        address = address.ipv4_mapped
    return any(address in network for network in trusted)


def _remaining_ms(ends: float, now: float) -> int:
    return max(0, int((ends - now) * 1000))


RATE_LIMITER: web.AppKey[SubscriptionRateLimiter] = web.AppKey("rate_limiter")
AUTH_THROTTLE: web.AppKey[FailedAuthThrottle] = web.AppKey("auth_throttle")
TOKEN_THROTTLE: web.AppKey[TokenFailureThrottle] = web.AppKey("token_throttle")
TRUSTED_PROXIES: web.AppKey[tuple[Network, ...]] = web.AppKey("trusted_proxies")
