"""The store replicas share: aiocache on memory or Redis, with timeouts and a breaker.

``CACHE_URL`` is ``memory://`` (one process, nothing shared) or
``redis://[[user]:password@]host[:port][/db]`` (``rediss://`` for TLS). On Redis,
every call has short connect and read timeouts and goes through one circuit
breaker: after a failure, calls fail at once (callers fall back to what the
replica knows) and a probe retries with exponential backoff. Nothing here ever
answers "allowed"; a failed call is an exception the caller must handle.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Final, Literal, TypeVar
from urllib.parse import unquote, urlsplit

from aiocache import RedisCache, SimpleMemoryCache
from aiocache.base import BaseCache
from aiocache.serializers import NullSerializer
from aiohttp import web
from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.commands.core import AsyncScript
from redis.exceptions import (
    AuthenticationError,
    ConnectionError,
    RedisError,
    ResponseError,
)
from redis.exceptions import TimeoutError as RedisTimeoutError

from .log import cache_logger
from .logging_security import register_secret

if TYPE_CHECKING:
    from .settings import Settings

__all__ = (
    "SHARED_STORE",
    "CacheUrl",
    "CacheUrlError",
    "CircuitBreaker",
    "SharedStore",
    "SharedStorePolicy",
    "SharedStoreUnavailable",
    "UnexpectedReply",
    "build_shared_store",
)

T = TypeVar("T")

DEFAULT_REDIS_PORT: Final = 6379
KEY_ROOT: Final = "rag-api"
_MAX_DB: Final = 999
_PROBE_INTERVAL: Final = 5.0


class CacheUrlError(ValueError):
    """``CACHE_URL`` is malformed. The message never repeats the URL: it may hold
    a password."""


class SharedStoreUnavailable(Exception):
    """Redis did not answer in time, or the breaker is open; ``reason`` is safe to
    show and log."""

    def __init__(self, reason: str) -> None:
        self.reason = reason
        super().__init__(reason)


class UnexpectedReply(Exception):
    """Redis answered something other than what the command returns: a proxy
    speaking garbage, or an entry someone else wrote."""


@dataclass(frozen=True, slots=True)
class CacheUrl:
    """A parsed ``CACHE_URL``; the password is kept out of ``repr``."""

    scheme: Literal["memory", "redis", "rediss"]
    host: str = ""
    port: int = DEFAULT_REDIS_PORT
    db: int = 0
    username: str | None = None
    password: str | None = field(default=None, repr=False)

    @property
    def is_redis(self) -> bool:
        return self.scheme != "memory"

    @property
    def tls(self) -> bool:
        return self.scheme == "rediss"

    @classmethod
    def parse(cls, text: str) -> CacheUrl:
        """Parse and check ``text``; raises ``CacheUrlError`` naming the problem."""
        if text == "memory://":
            return cls("memory")
        scheme, sep, _ = text.partition("://")
        if not sep or scheme not in ("redis", "rediss"):
            raise CacheUrlError(
                "must be memory:// or redis://[:password@]host[:port][/db]"
                " (rediss:// for TLS)"
            )
        parts = urlsplit(text)
        if parts.query or parts.fragment:
            raise CacheUrlError("takes no query string or fragment")
        host = parts.hostname
        if not host:
            raise CacheUrlError("names no host")
        try:
            port = DEFAULT_REDIS_PORT if parts.port is None else parts.port
        except ValueError:
            port = 0
        if not 1 <= port <= 65535:
            raise CacheUrlError("has a port that is not a number from 1 to 65535")
        return cls(
            "rediss" if scheme == "rediss" else "redis",
            host=host,
            port=port,
            db=_database(parts.path),
            # urlsplit leaves %-escapes in place; a password holding "@" or ":"
            # must be written escaped and is used unescaped.
            username=unquote(parts.username) if parts.username else None,
            password=unquote(parts.password) if parts.password else None,
        )

    def redacted(self) -> str:
        """The URL with the password replaced by ``***``; safe to log and show."""
        if not self.is_redis:
            return "memory://"
        credentials = ""
        if self.password is not None:
            credentials = f"{self.username or ''}:***@"
        elif self.username is not None:
            credentials = f"{self.username}@"
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{credentials}{host}:{self.port}/{self.db}"


def _database(path: str) -> int:
    text = path.removeprefix("/")
    if not text:
        return 0
    # str.isdigit() would take "²", which int() then refuses.
    if not (text.isascii() and text.isdigit()) or int(text) > _MAX_DB:
        raise CacheUrlError(f"has a database that is not a number from 0 to {_MAX_DB}")
    return int(text)


@dataclass(frozen=True, slots=True)
class SharedStorePolicy:
    """Timeouts and backoff of the Redis client; see docs/architecture.md."""

    connect_timeout: float = 0.25
    read_timeout: float = 0.25
    pool_size: int = 32
    backoff_initial: float = 0.5
    backoff_max: float = 30.0
    failure_threshold: int = 3
    probe_interval: float = _PROBE_INTERVAL

    @classmethod
    def from_settings(cls, settings: Settings) -> SharedStorePolicy:
        return cls(
            connect_timeout=settings.cache_connect_timeout_seconds,
            read_timeout=settings.cache_timeout_seconds,
        )

    @property
    def deadline(self) -> float:
        """The most one call may take: a pool wait or a connect, then the reply.

        The socket timeouts bound each read; this bounds a whole call, including
        the several round trips of a fresh connection's hand-shake (HELLO, AUTH,
        SELECT, CLIENT SETNAME), and redis-py 8's maintenance notifications,
        which may relax a socket timeout to 10 s while a managed Redis moves.
        """
        return self.connect_timeout + 2 * self.read_timeout


class CircuitBreaker:
    """Closed while Redis answers; open (calls refused at once) after
    ``failure_threshold`` failures in a row.

    One slow reply (a fork for a snapshot, a pause) is not an outage: that call
    falls back on its own and the next one tries Redis again. Once open, and
    the backoff delay has passed, one call is let through as a probe: its
    success closes the breaker, its failure doubles the delay (with jitter, up
    to ``backoff_max``). One warning is logged when an outage starts and one
    line when it ends, however many calls fail in between.
    """

    def __init__(
        self,
        *,
        backoff_initial: float = 0.5,
        backoff_max: float = 30.0,
        failure_threshold: int = 3,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        if failure_threshold < 1:
            raise ValueError("failure_threshold must be at least 1")
        self._threshold = failure_threshold
        self._backoff_initial = backoff_initial
        self._backoff_max = backoff_max
        self._monotonic = monotonic
        self._failures = 0
        self._retry_at = 0.0
        self._probing = False
        self._outage_started: float | None = None
        self._refused_calls = 0
        self.reason: str | None = None

    @property
    def state(self) -> Literal["closed", "open", "half-open"]:
        if self._outage_started is None:
            return "closed"
        return "half-open" if self._probing else "open"

    @property
    def retry_at(self) -> float:
        return self._retry_at

    def allow(self) -> bool:
        """Whether a call may go to Redis now; a True while open makes it the probe."""
        if self._outage_started is None:
            return True
        if self._probing or self._monotonic() < self._retry_at:
            self._refused_calls += 1
            return False
        self._probing = True
        return True

    def succeeded(self) -> None:
        self._probing = False
        started = self._outage_started
        if started is None:
            self._failures = 0
            return
        cache_logger.info(
            "shared_store.recovered",
            extra={
                "outage_seconds": round(self._monotonic() - started, 3),
                "failed_probes": self._failures,
                "calls_served_locally": self._refused_calls,
            },
        )
        self._failures = 0
        self._retry_at = 0.0
        self._outage_started = None
        self._refused_calls = 0
        self.reason = None

    def failed(self, reason: str) -> None:
        now = self._monotonic()
        self._probing = False
        self._failures += 1
        beyond = self._failures - self._threshold
        if beyond < 0:
            return
        delay = min(self._backoff_max, self._backoff_initial * 2 ** min(beyond, 30))
        delay = delay / 2 + random.uniform(0, delay / 2)  # noqa: S311 - jitter
        self._retry_at = now + delay
        self.reason = reason
        if self._outage_started is not None:
            return
        self._outage_started = now
        cache_logger.warning(
            "shared_store.unavailable",
            extra={
                "reason": reason,
                "fallback": "per-replica state",
                "retry_in_seconds": round(delay, 3),
            },
        )

    def abandoned(self) -> None:
        """The probe was cancelled before it could tell: let the next call probe."""
        self._probing = False

    def status(self) -> dict[str, Any]:
        now = self._monotonic()
        started = self._outage_started
        return {
            "breaker": self.state,
            "reason": self.reason,
            "degraded_seconds": None if started is None else round(now - started, 3),
            "consecutive_failures": self._failures,
            "retry_in_seconds": max(0.0, round(self._retry_at - now, 3)),
        }


class _GuardedRedisCache(RedisCache):  # type: ignore[misc]
    """aiocache's Redis backend, with its calls behind the store's breaker.

    It also replaces two calls aiocache 0.12.3 makes that redis-py 8 deprecates,
    so that a ``DeprecationWarning`` (an error under ``-W error``) cannot turn
    every shared JWKS copy into a silent store error: ``SETEX`` (what aiocache
    sends for an integer ``ttl``) and ``Redis.close()``.
    """

    def __init__(self, guard: SharedStore, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._guard = guard

    async def _get(
        self, key: str, encoding: str | None = "utf-8", _conn: Any = None
    ) -> Any:
        async def get(client: Redis) -> Any:
            return await RedisCache._get(self, key, encoding=encoding)

        return await self._guard.run(get)

    async def _set(
        self,
        key: str,
        value: Any,
        ttl: float | None = None,
        _cas_token: Any = None,
        _conn: Any = None,
    ) -> Any:
        if _cas_token is not None:
            raise NotImplementedError("compare-and-set is not used by this service")

        async def put(client: Redis) -> Any:
            if ttl is None:
                return await client.set(key, value)
            if isinstance(ttl, float):
                return await client.set(key, value, px=int(ttl * 1000))
            return await client.set(key, value, ex=ttl)

        return await self._guard.run(put)

    async def _close(self, *args: Any, _conn: Any = None, **kwargs: Any) -> None:
        # The client is the SharedStore's: it closes it once its own tasks have
        # stopped, whoever closes this cache first (the key cache does too).
        return None


class SharedStore:
    """The aiocache store for the JWKS copy, plus guarded Redis calls for the rest.

    With ``memory://``, ``cache`` is a process-local ``SimpleMemoryCache`` and
    ``shared`` is False: callers keep their state in memory. With Redis, the
    aiocache backend's own redis-py client also runs the counter scripts, so
    there is one connection pool, one set of timeouts and one breaker.
    """

    def __init__(
        self,
        url: CacheUrl,
        policy: SharedStorePolicy | None = None,
        *,
        prefix: str = "",
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._url = url
        self._policy = policy or SharedStorePolicy()
        self._prefix = prefix
        self._monotonic = monotonic
        self._breaker = CircuitBreaker(
            backoff_initial=self._policy.backoff_initial,
            backoff_max=self._policy.backoff_max,
            failure_threshold=self._policy.failure_threshold,
            monotonic=monotonic,
        )
        self._cache: BaseCache
        self._client: Redis | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self.calls = 0
        self.failures = 0
        if url.is_redis:
            self._cache = self._redis_cache()
            self._client = self._cache.client
        else:
            self._cache = SimpleMemoryCache(namespace=prefix or None)

    def _redis_cache(self) -> _GuardedRedisCache:
        url, policy = self._url, self._policy
        pool_options: dict[str, Any] = {
            # redis-py 8 waits 5 s by default, older releases forever (catalog
            # R-09); a replica must not hold a request that long for an optimisation.
            "socket_timeout": policy.read_timeout,
            # No retries inside redis-py: the breaker decides when to try again.
            "retry": Retry(NoBackoff(), 0),
            # How long a call waits for a free connection of the bounded pool.
            "timeout": policy.read_timeout,
            "client_name": KEY_ROOT,
        }
        if url.username is not None:
            pool_options["username"] = url.username
        return _GuardedRedisCache(
            self,
            serializer=NullSerializer(encoding=None),
            namespace=self._prefix or None,
            timeout=policy.deadline,
            endpoint=url.host,
            port=url.port,
            db=url.db,
            password=url.password,
            create_connection_timeout=policy.connect_timeout,
            ssl=url.tls,
            pool_max_size=policy.pool_size,
            connection_pool_class=BlockingConnectionPool,
            connection_pool_kwargs=pool_options,
        )

    @property
    def shared(self) -> bool:
        """True when state lives in Redis, where every replica sees it."""
        return self._client is not None

    @property
    def cache(self) -> BaseCache:
        """The aiocache store that ``JwksCache`` keeps its shared copy in."""
        return self._cache

    @property
    def available(self) -> bool:
        """False while the breaker is open: callers use their local state."""
        return self.shared and self._breaker.state == "closed"

    def key(self, *parts: str) -> str:
        """A Redis key: ``[<prefix>:]rag-api:<parts...>``, as aiocache's namespace."""
        name = ":".join((KEY_ROOT, *parts))
        return f"{self._prefix}:{name}" if self._prefix else name

    def script(self, text: str) -> AsyncScript:
        """Register a Lua script (sent by digest, reloaded if Redis lost it)."""
        if self._client is None:
            raise RuntimeError("scripts need a Redis CACHE_URL")
        return self._client.register_script(text)

    async def run(self, operation: Callable[[Redis], Awaitable[T]]) -> T:
        """Run one Redis operation under the deadline and the breaker.

        Raises ``SharedStoreUnavailable`` when the breaker is open or the call
        fails; never returns a default in place of an answer.
        """
        client = self._client
        if client is None:
            raise SharedStoreUnavailable("no shared store is configured")
        if not self._breaker.allow():
            raise SharedStoreUnavailable(self._breaker.reason or "Redis unavailable")
        self.calls += 1
        try:
            result = await asyncio.wait_for(operation(client), self._policy.deadline)
        except (RedisError, OSError, TimeoutError, UnexpectedReply) as err:
            self.failures += 1
            reason = _describe_failure(err)
            self._breaker.failed(reason)
            raise SharedStoreUnavailable(reason) from None
        except BaseException:
            self._breaker.abandoned()
            raise
        self._breaker.succeeded()
        return result

    async def start(self) -> None:
        """Start the probe that notices an outage, and its end, without traffic."""
        if self._client is not None and self._watch_task is None:
            self._watch_task = asyncio.create_task(
                self._watch(), name="shared-store-probe"
            )

    async def close(self) -> None:
        task, self._watch_task = self._watch_task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})
        if self._client is not None:
            await self._client.aclose()
        else:
            await self._cache.close()

    def status(self) -> dict[str, Any]:
        """For health: the backend, its URL without password, and the breaker."""
        if not self.shared:
            return {"backend": "memory", "state": "ok", "shared": False}
        return {
            "backend": "redis",
            "url": self._url.redacted(),
            "state": "ok" if self.available else "degraded",
            "shared": True,
            **self._breaker.status(),
        }

    async def _watch(self) -> None:
        while True:
            wait = self._policy.probe_interval
            if self._breaker.state != "closed":
                wait = max(0.05, self._breaker.retry_at - self._monotonic())
            await asyncio.sleep(wait)
            try:
                await self.run(_ping)
            except SharedStoreUnavailable:
                # Already counted and, if it starts an outage, logged once.
                pass


async def _ping(client: Redis) -> bool:
    reply = await client.ping()
    if reply is not True:
        raise UnexpectedReply("PING was not answered with PONG")
    return True


def _describe_failure(err: BaseException) -> str:
    """A short, secret-free reason for health and logs (never ``str(err)``)."""
    kind = type(err).__name__
    if isinstance(err, TimeoutError | RedisTimeoutError):
        return f"Redis did not answer in time ({kind})"
    if isinstance(err, AuthenticationError):
        return f"Redis refused the credentials ({kind})"
    if isinstance(err, ConnectionError) and "No connection available" in str(err):
        return f"Redis connection pool exhausted ({kind})"
    if isinstance(err, ConnectionError | OSError):
        return f"Redis is unreachable ({kind})"
    if isinstance(err, ResponseError):
        return f"Redis answered with an error ({kind})"
    return f"Redis answered unexpectedly ({kind})"


def build_shared_store(settings: Settings) -> SharedStore:
    """The store ``CACHE_URL`` names, with the timeouts of the settings."""
    url = CacheUrl.parse(settings.cache_url)
    if url.password is not None:
        # Scrubbed by exact value from now on, wherever a library might write
        # it, not only where it shows as a URL's user-info.
        register_secret(url.password)
    return SharedStore(
        url,
        SharedStorePolicy.from_settings(settings),
        prefix=settings.cache_key_prefix,
    )


SHARED_STORE: web.AppKey[SharedStore] = web.AppKey("shared_store")
