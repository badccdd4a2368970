"""The signing-key cache: discovery and JWKS fetched in the background, single-flight,
with a last-known-good key set, backoff, and a cooldown on unknown-``kid`` refreshes."""

from __future__ import annotations

import asyncio
import hashlib
import math
import random
import time
from collections import Counter
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

import aiohttp
import orjson
from aiocache.base import BaseCache
from jose import jwk
from jose.backends.base import Key

from validators import IdentityProviderUnavailable, VerificationKey

from .log import jwks_logger
from .settings import Settings, is_loopback_url

__all__ = ("JwksCache", "JwksPolicy", "KeySet", "KeySetError", "build_key_set")

_MAX_KEYS = 64
_MIN_RSA_BITS = 2048
_STORE_TIMEOUT = 0.5
_OUTAGE_LOG_INTERVAL = 300.0
_MAX_RETRY_AFTER = 3600


@dataclass(frozen=True, slots=True)
class JwksPolicy:
    """Timings and bounds of the key cache; see docs/architecture.md."""

    refresh_seconds: float = 3600.0
    kid_cooldown_seconds: float = 60.0
    max_stale_seconds: float = 86400.0
    connect_timeout: float = 2.0
    total_timeout: float = 5.0
    max_body_bytes: int = 1 << 20
    backoff_initial: float = 1.0
    backoff_max: float = 300.0
    allow_insecure_http: bool = False

    @classmethod
    def from_settings(cls, settings: Settings) -> JwksPolicy:
        return cls(
            refresh_seconds=settings.jwks_refresh_seconds,
            kid_cooldown_seconds=settings.jwks_kid_cooldown_seconds,
            max_stale_seconds=settings.jwks_max_stale_seconds,
            connect_timeout=settings.idp_connect_timeout_seconds,
            total_timeout=settings.idp_timeout_seconds,
            allow_insecure_http=settings.allow_insecure_http,
        )


@dataclass(frozen=True, slots=True)
class KeySet:
    """Keys built once per refresh, by ``kid``."""

    keys: Mapping[str, VerificationKey]
    jwks_uri: str
    fetched_at: float  # monotonic, for staleness
    fetched_wall: float  # wall clock, to compare with other replicas' copies
    document: Mapping[str, Any]  # as fetched, for the shared copy


class KeySetError(Exception):
    """A fetch or a document was refused; the message is safe to log."""

    def __init__(self, reason: str, *, retry_after: float | None = None) -> None:
        self.reason = reason
        self.retry_after = retry_after
        super().__init__(reason)


def build_key_set(document: Any) -> dict[str, VerificationKey]:
    """Build the usable RS256 signature keys of a JWKS document.

    Unusable entries (other key types, ``use: enc``, other algorithms, short keys)
    are skipped; a duplicated ``kid`` or an empty result refuses the whole set, so
    it can never replace a good one (catalog R-04, R-15).
    """
    entries = document.get("keys") if isinstance(document, dict) else None
    if not isinstance(entries, list):
        raise KeySetError("the key set is not a JSON object with a keys array")
    keys: dict[str, VerificationKey] = {}
    for entry in entries[:_MAX_KEYS]:
        built = _build_key(entry)
        if built is None:
            continue
        kid, key = built
        if kid in keys:
            raise KeySetError("the key set publishes one kid twice")
        keys[kid] = key
    if not keys:
        raise KeySetError("the key set has no usable RS256 signing key")
    return keys


def _build_key(entry: Any) -> tuple[str, VerificationKey] | None:
    if not isinstance(entry, dict) or entry.get("kty") != "RSA":
        return None
    kid, n, e = entry.get("kid"), entry.get("n"), entry.get("e")
    if not (isinstance(kid, str) and kid and isinstance(n, str) and isinstance(e, str)):
        return None
    if entry.get("use", "sig") != "sig" or entry.get("alg", "RS256") != "RS256":
        return None
    try:
        key: Key = jwk.construct({"kty": "RSA", "n": n, "e": e}, "RS256")
    except Exception:
        return None
    if getattr(getattr(key, "prepared_key", None), "key_size", 0) < _MIN_RSA_BITS:
        return None
    return kid, key


class JwksCache:
    """Implements ``SigningKeyProvider`` for the validators.

    One background task warms the cache at start-up (without blocking it) and
    refreshes before the interval ends. Every fetch is shared: concurrent callers
    await one task, shielded so a cancelled request never cancels it.
    """

    def __init__(
        self,
        openid_config_url: str,
        issuers: tuple[str, ...],
        policy: JwksPolicy,
        *,
        store: BaseCache | None = None,
        monotonic: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._config_url = openid_config_url
        self._issuers = frozenset(issuers)
        self._policy = policy
        self._store = store
        self._store_key = (
            "rag-api:jwks:"
            + hashlib.sha256(openid_config_url.encode()).hexdigest()[:24]
        )
        self._monotonic = monotonic
        self._wall = wall
        self._session: aiohttp.ClientSession | None = None
        self._closed = False
        self._loop_task: asyncio.Task[None] | None = None
        self._inflight: asyncio.Task[bool] | None = None
        self._keyset: KeySet | None = None
        self._listeners: list[Callable[[frozenset[str]], object]] = []
        self._failures = 0
        self._retry_at = 0.0
        self._last_kid_refresh = -math.inf
        self._last_attempt: tuple[float, str, str | None] | None = None
        self._outage_started: float | None = None
        self._outage_logged_at = -math.inf
        self._unknown_kids = 0
        self._unknown_kid_logged_at = -math.inf
        self.store_errors = 0
        self.fetches: Counter[tuple[str, str]] = Counter()

    # -- lifecycle -------------------------------------------------------------

    async def start(self) -> None:
        timeout = aiohttp.ClientTimeout(
            total=self._policy.total_timeout,
            sock_connect=self._policy.connect_timeout,
        )
        self._session = aiohttp.ClientSession(timeout=timeout, trust_env=False)
        self._loop_task = asyncio.create_task(self._run(), name="jwks-refresh")

    async def close(self) -> None:
        self._closed = True
        for task in (self._loop_task, self._inflight):
            if task is not None and not task.done():
                task.cancel()
        for task in (self._loop_task, self._inflight):
            if task is not None:
                try:
                    await task
                except asyncio.CancelledError:
                    pass
        if self._session is not None:
            await self._session.close()

    def add_listener(self, listener: Callable[[frozenset[str]], object]) -> None:
        """Called with the published kids each time a new key set is installed."""
        self._listeners.append(listener)

    # -- SigningKeyProvider ----------------------------------------------------

    async def key_for(self, kid: str) -> VerificationKey | None:
        keyset = self._usable_keyset()
        if keyset is None:
            keyset = await self._wait_for_first_keys()
        key = keyset.keys.get(kid)
        if key is not None:
            return key
        # Misses that arrive while a refresh runs share it; otherwise at most one
        # refresh per cooldown, whatever the number of distinct unknown kids.
        fetching = self._inflight is not None and not self._inflight.done()
        if not fetching and not self._may_refresh_for_unknown_kid():
            return None
        await self._shared_refresh("unknown-kid")
        keyset = self._usable_keyset()
        return None if keyset is None else keyset.keys.get(kid)

    def current_key(self, kid: str) -> VerificationKey | None:
        """The key for ``kid`` in the usable set, without waiting; else ``None``."""
        keyset = self._usable_keyset()
        return None if keyset is None else keyset.keys.get(kid)

    # -- state -----------------------------------------------------------------

    @property
    def ready(self) -> bool:
        return self._usable_keyset() is not None

    def keys_usable(self) -> bool:
        """``ready`` as a plain method, for the verdict cache to ask on every hit."""
        return self._usable_keyset() is not None

    @property
    def kids(self) -> frozenset[str]:
        keyset = self._usable_keyset()
        return frozenset(keyset.keys) if keyset else frozenset()

    def status(self) -> dict[str, Any]:
        """The cache's state for health and metrics; holds nothing secret."""
        now = self._monotonic()
        keyset = self._keyset
        state = "empty"
        if keyset is not None:
            age = now - keyset.fetched_at
            if age > self._policy.max_stale_seconds:
                state = "expired"
            elif self._failures:
                state = "stale"
            else:
                state = "fresh"
        last = None
        if self._last_attempt is not None:
            at, result, error = self._last_attempt
            last = {"result": result, "seconds_ago": round(now - at, 3), "error": error}
        return {
            "state": state,
            "key_count": len(keyset.keys) if keyset else 0,
            "age_seconds": round(now - keyset.fetched_at, 3) if keyset else None,
            "last_refresh": last,
            "consecutive_failures": self._failures,
            "retry_in_seconds": max(0.0, round(self._retry_at - now, 3)),
            "fetches": {
                f"{what}:{result}": n for (what, result), n in self.fetches.items()
            },
        }

    async def refresh_now(self, reason: str = "manual") -> bool:
        """Refresh outside the schedule (start-up probe, tests), shared like any."""
        return await self._shared_refresh(reason)

    # -- internals -------------------------------------------------------------

    def _usable_keyset(self) -> KeySet | None:
        keyset = self._keyset
        if keyset is None:
            return None
        if self._monotonic() - keyset.fetched_at > self._policy.max_stale_seconds:
            return None
        return keyset

    async def _wait_for_first_keys(self) -> KeySet:
        now = self._monotonic()
        fetching = self._inflight is not None and not self._inflight.done()
        if fetching or now >= self._retry_at:
            await self._shared_refresh("cold")
        keyset = self._usable_keyset()
        if keyset is None:
            retry = max(1, math.ceil(self._retry_at - self._monotonic()))
            raise IdentityProviderUnavailable(retry_after=retry)
        return keyset

    def _may_refresh_for_unknown_kid(self) -> bool:
        now = self._monotonic()
        self._unknown_kids += 1
        self._log_unknown_kids(now)
        if now < self._retry_at:
            return False
        if now - self._last_kid_refresh < self._policy.kid_cooldown_seconds:
            return False
        self._last_kid_refresh = now
        return True

    async def _shared_refresh(self, reason: str) -> bool:
        task = self._inflight
        if task is None or task.done():
            task = asyncio.create_task(self._refresh(reason), name="jwks-fetch")
            self._inflight = task
        limit = 2 * self._policy.total_timeout + 1
        try:
            # asyncio.timeout, not wait_for: on 3.11 wait_for can swallow a
            # cancellation that arrives as the inner task finishes.
            async with asyncio.timeout(limit):
                return await asyncio.shield(task)
        except TimeoutError:
            return False

    async def _run(self) -> None:
        while not self._closed:
            await asyncio.sleep(self._next_delay())
            await self._shared_refresh("scheduled")

    def _next_delay(self) -> float:
        now = self._monotonic()
        if self._failures or self._keyset is None:
            return max(0.0, self._retry_at - now)
        spread = random.uniform(0.85, 0.95)  # noqa: S311 - jitter, not a secret
        due = self._keyset.fetched_at + self._policy.refresh_seconds * spread
        return max(0.0, due - now)

    async def _refresh(self, reason: str) -> bool:
        try:
            keyset = await self._adopt_shared(reason)
            if keyset is None:
                keyset = await self._fetch()
                await self._publish_shared(keyset)
        except KeySetError as err:
            self._record_failure(err)
            return False
        except Exception:
            jwks_logger.exception("jwks.refresh_crashed", extra={"reason": reason})
            self._record_failure(KeySetError("unexpected error while refreshing"))
            return False
        self._install(keyset)
        return True

    async def _fetch(self) -> KeySet:
        discovery = await self._get_json(self._config_url, "discovery")
        jwks_uri = self._check_discovery(discovery)
        document = await self._get_json(jwks_uri, "jwks")
        keys = build_key_set(document)
        return KeySet(keys, jwks_uri, self._monotonic(), self._wall(), document)

    def _check_discovery(self, document: Any) -> str:
        if not isinstance(document, dict):
            raise KeySetError("the discovery document is not a JSON object")
        if document.get("issuer") not in self._issuers:
            raise KeySetError("the discovery document names an issuer not accepted")
        jwks_uri = document.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not _same_origin(
            jwks_uri, self._config_url, self._policy.allow_insecure_http
        ):
            raise KeySetError("the discovery document points at keys on another host")
        return jwks_uri

    async def _get_json(self, url: str, what: str) -> Any:
        if self._session is None:
            raise RuntimeError("JwksCache.start() was not awaited")
        try:
            async with self._session.get(url, allow_redirects=False) as response:
                if response.status != 200:
                    raise KeySetError(
                        f"the {what} endpoint answered HTTP {response.status}",
                        retry_after=_retry_after(response.headers.get("Retry-After")),
                    )
                body = await self._read_capped(response, what)
        except KeySetError:
            self.fetches[(what, "error")] += 1
            raise
        except TimeoutError:
            self.fetches[(what, "error")] += 1
            raise KeySetError(f"the {what} endpoint timed out") from None
        except (aiohttp.ClientError, OSError) as err:
            self.fetches[(what, "error")] += 1
            kind = type(err).__name__
            raise KeySetError(f"the {what} endpoint is unreachable ({kind})") from None
        try:
            value = orjson.loads(body)
        except orjson.JSONDecodeError:
            self.fetches[(what, "error")] += 1
            raise KeySetError(f"the {what} document is not JSON") from None
        self.fetches[(what, "ok")] += 1
        return value

    async def _read_capped(self, response: aiohttp.ClientResponse, what: str) -> bytes:
        limit = self._policy.max_body_bytes
        if response.content_length is not None and response.content_length > limit:
            raise KeySetError(f"the {what} document is larger than {limit} bytes")
        body = bytearray()
        # Chunks arrive decompressed, so the cap also bounds a decompression bomb.
        async for chunk in response.content.iter_chunked(65536):
            body += chunk
            if len(body) > limit:
                raise KeySetError(f"the {what} document is larger than {limit} bytes")
        return bytes(body)

    def _install(self, keyset: KeySet) -> None:
        previous = self._keyset
        self._keyset = keyset
        self._last_attempt = (self._monotonic(), "ok", None)
        if self._failures or self._outage_started is not None:
            jwks_logger.warning(
                "jwks.recovered",
                extra={
                    "failed_attempts": self._failures,
                    "key_count": len(keyset.keys),
                },
            )
        elif previous is None or set(previous.keys) != set(keyset.keys):
            jwks_logger.info(
                "jwks.keys_installed",
                extra={"kids": sorted(keyset.keys), "jwks_uri": keyset.jwks_uri},
            )
        self._failures = 0
        self._retry_at = 0.0
        self._outage_started = None
        kids = frozenset(keyset.keys)
        for listener in self._listeners:
            listener(kids)

    def _record_failure(self, err: KeySetError) -> None:
        now = self._monotonic()
        self._failures += 1
        self._last_attempt = (now, "error", err.reason)
        delay = min(
            self._policy.backoff_max,
            self._policy.backoff_initial * 2 ** min(self._failures - 1, 30),
        )
        delay = delay / 2 + random.uniform(0, delay / 2)  # noqa: S311 - jitter
        if err.retry_after is not None:
            delay = max(delay, min(err.retry_after, _MAX_RETRY_AFTER))
        self._retry_at = now + delay
        self._log_outage(now, err)

    def _log_outage(self, now: float, err: KeySetError) -> None:
        # One warning when an outage starts, then one summary per interval.
        fields = {
            "reason": err.reason,
            "failed_attempts": self._failures,
            "have_keys": self._keyset is not None,
            "retry_in_seconds": round(self._retry_at - now, 1),
        }
        if self._outage_started is None:
            self._outage_started = now
        elif now - self._outage_logged_at < _OUTAGE_LOG_INTERVAL:
            jwks_logger.debug("jwks.refresh_failed", extra=fields)
            return
        self._outage_logged_at = now
        jwks_logger.warning("jwks.refresh_failed", extra=fields)

    def _log_unknown_kids(self, now: float) -> None:
        if now - self._unknown_kid_logged_at < self._policy.kid_cooldown_seconds:
            return
        jwks_logger.warning("jwks.unknown_kid", extra={"count": self._unknown_kids})
        self._unknown_kid_logged_at = now
        self._unknown_kids = 0

    # -- shared copy (aiocache: in memory, or Redis for a fleet) ---------------

    async def _adopt_shared(self, reason: str) -> KeySet | None:
        """Use another replica's recent fetch instead of asking the IdP again."""
        if self._store is None:
            return None
        try:
            async with asyncio.timeout(_STORE_TIMEOUT):
                raw = await self._store.get(self._store_key)
        except Exception:
            self.store_errors += 1
            return None
        if raw is None:
            return None
        try:
            shared = orjson.loads(raw)
            fetched_wall = float(shared["fetched_wall"])
            jwks_uri = str(shared["jwks_uri"])
            document = shared["jwks"]
            keys = build_key_set(document)
        except (KeySetError, KeyError, TypeError, ValueError):
            return None
        age = self._wall() - fetched_wall
        ours = self._keyset.fetched_wall if self._keyset else -math.inf
        if fetched_wall <= ours or not 0 <= age < self._policy.refresh_seconds:
            return None
        if not _same_origin(
            jwks_uri, self._config_url, self._policy.allow_insecure_http
        ):
            return None
        self.fetches[("shared", "ok")] += 1
        return KeySet(keys, jwks_uri, self._monotonic() - age, fetched_wall, document)

    async def _publish_shared(self, keyset: KeySet) -> None:
        if self._store is None:
            return
        value = orjson.dumps(
            {
                "fetched_wall": keyset.fetched_wall,
                "jwks_uri": keyset.jwks_uri,
                "jwks": keyset.document,
            }
        )
        try:
            async with asyncio.timeout(_STORE_TIMEOUT):
                await self._store.set(
                    self._store_key, value, ttl=int(self._policy.max_stale_seconds)
                )
        except Exception:
            self.store_errors += 1


def _same_origin(url: str, reference: str, allow_insecure_http: bool = False) -> bool:
    parts, ref = urlsplit(url), urlsplit(reference)
    if parts.scheme != ref.scheme or parts.netloc.lower() != ref.netloc.lower():
        return False
    if parts.scheme == "https" or is_loopback_url(url):
        return True
    # ENTRA_ALLOW_INSECURE_HTTP (dev stacks): plain http on the configured host,
    # still never another host.
    return parts.scheme == "http" and allow_insecure_http


def _retry_after(value: str | None) -> float | None:
    if value is None or not value.strip().isdigit():
        return None
    return float(min(int(value.strip()), _MAX_RETRY_AFTER))
