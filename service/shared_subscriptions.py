"""Subscription state shared by replicas: a revoked key stops working fleet-wide.

Each replica reads its own key store file. When its file changes, it publishes
the state of every subscription (name, active or suspended, the two key
digests; never a key) to Redis, stamped with the file's modification time. The
others poll a small version counter every ``SUBSCRIPTION_SYNC_SECONDS`` and
adopt a state newer than their own file.

A shared state can only take access away. A key is accepted when the local file
accepts it and, if the shared state is newer than that file, the shared state
accepts it too. So a suspension or a regenerated key reaches every replica
within seconds, while a new subscription or key works on a replica only once
its own file has it: whoever can write to Redis can deny access, never grant it.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from types import MappingProxyType
from typing import Any, Final

import orjson
from redis.asyncio import Redis

from validators import Subscription

from .keystore import KeyStoreWatcher, SubscriptionState, SubscriptionStore
from .log import keys_logger
from .shared_store import SharedStore, SharedStoreUnavailable, UnexpectedReply

__all__ = ("FORMAT", "SharedSubscriptionState", "SharedSubscriptions")

FORMAT: Final = 1
# A state stamped further ahead than any clock skew would stay "newest" for
# good and freeze the fleet on it: such a state is ignored.
_MAX_FUTURE_US: Final = 300 * 1_000_000
# Refreshed on every publish; an abandoned prefix cleans itself up, and a live
# fleet republishes within one poll if the keys expire.
_STATE_TTL_MS: Final = 7 * 86400 * 1000
_NAME: Final = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DIGEST: Final = re.compile(r"[0-9a-f]{64}")
_STATES: Final = frozenset(state.value for state in SubscriptionState)

# Replaces the state only with a newer one, and bumps the version in the same
# step. Entries of the wrong type (written by someone else) are replaced.
_PUBLISH_SCRIPT: Final = """
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then redis.call('DEL', KEYS[1]) end
local current = tonumber(redis.call('HGET', KEYS[1], 'written_at_us'))
if current and current >= tonumber(ARGV[1]) then return 0 end
redis.call('HSET', KEYS[1], 'written_at_us', ARGV[1], 'doc', ARGV[2])
redis.call('PEXPIRE', KEYS[1], ARGV[3])
local version = redis.pcall('INCR', KEYS[2])
if type(version) ~= 'number' then
  redis.call('DEL', KEYS[2])
  version = redis.call('INCR', KEYS[2])
end
redis.call('PEXPIRE', KEYS[2], ARGV[3])
return version
"""
_READ_VERSION_SCRIPT: Final = """
if redis.call('TYPE', KEYS[1]).ok ~= 'string' then return false end
return redis.call('GET', KEYS[1])
"""
_READ_STATE_SCRIPT: Final = """
if redis.call('TYPE', KEYS[1]).ok ~= 'hash' then return false end
return redis.call('HMGET', KEYS[1], 'written_at_us', 'doc')
"""


class InvalidSharedState(ValueError):
    """The shared state is not a document this service wrote; it is ignored."""


@dataclass(frozen=True, slots=True)
class SharedSubscriptionState:
    """Which key digests belong to which active subscription, as of a moment."""

    written_at_us: int
    accepted: Mapping[bytes, str]
    subscriptions: int
    document: bytes

    @classmethod
    def from_store(
        cls, store: SubscriptionStore, written_at_us: int
    ) -> SharedSubscriptionState:
        entries = [
            {
                "name": record.name,
                "state": record.state.value,
                "primary_sha256": record.primary_sha256,
                "secondary_sha256": record.secondary_sha256,
            }
            for record in store.subscriptions
        ]
        document = orjson.dumps({"format": FORMAT, "subscriptions": entries})
        return cls.parse(document, written_at_us)

    @classmethod
    def parse(cls, document: bytes, written_at_us: int) -> SharedSubscriptionState:
        """Check a published document strictly; raises ``InvalidSharedState``."""
        try:
            parsed = orjson.loads(document)
        except orjson.JSONDecodeError:
            raise InvalidSharedState("the shared state is not JSON") from None
        if not isinstance(parsed, dict) or parsed.get("format") != FORMAT:
            raise InvalidSharedState("the shared state has an unknown format")
        entries = parsed.get("subscriptions")
        if not isinstance(entries, list):
            raise InvalidSharedState("the shared state lists no subscriptions")
        accepted: dict[bytes, str] = {}
        for entry in entries:
            name, active, digests = _entry(entry)
            if active:
                accepted.update(dict.fromkeys(digests, name))
        return cls(written_at_us, MappingProxyType(accepted), len(entries), document)

    def accepts(self, digest: bytes, name: str) -> bool:
        return self.accepted.get(digest) == name

    @property
    def written_at(self) -> str:
        moment = datetime.fromtimestamp(self.written_at_us / 1e6, tz=UTC)
        return moment.isoformat(timespec="milliseconds").replace("+00:00", "Z")


def _entry(entry: object) -> tuple[str, bool, tuple[bytes, bytes]]:
    if not isinstance(entry, dict):
        raise InvalidSharedState("a shared subscription is not an object")
    name, state = entry.get("name"), entry.get("state")
    primary, secondary = entry.get("primary_sha256"), entry.get("secondary_sha256")
    if not isinstance(name, str) or not _NAME.fullmatch(name) or state not in _STATES:
        raise InvalidSharedState("a shared subscription has a bad name or state")
    digests = []
    for digest in (primary, secondary):
        if not isinstance(digest, str) or not _DIGEST.fullmatch(digest):
            raise InvalidSharedState("a shared subscription has a bad key digest")
        digests.append(bytes.fromhex(digest))
    return name, state == SubscriptionState.ACTIVE.value, (digests[0], digests[1])


class SharedSubscriptions:
    """Implements ``SubscriptionLookup``: the key store file, narrowed by a newer
    shared state.

    ``find`` never waits for Redis: it reads the local store and the last state
    adopted. While Redis is away, a replica keeps both, so revocations it has
    learnt stay in force, and its own file keeps working.
    """

    def __init__(
        self,
        watcher: KeyStoreWatcher,
        store: SharedStore,
        *,
        interval: float = 1.0,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._watcher = watcher
        self._store = store
        self._interval = interval
        self._wall = wall
        self._version_key = store.key("subscriptions", "version")
        self._state_key = store.key("subscriptions", "state")
        self._publish = store.script(_PUBLISH_SCRIPT)
        self._read_version = store.script(_READ_VERSION_SCRIPT)
        self._read_state = store.script(_READ_STATE_SCRIPT)
        self._local = self._local_state()
        self._overlay: SharedSubscriptionState | None = None
        self._seen_version: int | None = None
        self._local_changed = asyncio.Event()
        self._publish_pending = True
        self._task: asyncio.Task[None] | None = None
        self._last_sync: float | None = None
        self._last_problem: str | None = None
        self.published = 0
        self.adopted = 0
        self.refused = 0
        self._listeners: list[Callable[[], object]] = []
        watcher.add_listener(self._on_local_change)

    def add_listener(self, listener: Callable[[], object]) -> None:
        """Called each time a shared state from another replica is adopted."""
        self._listeners.append(listener)

    # -- SubscriptionLookup ------------------------------------------------------

    def find(self, key: bytes) -> Subscription | None:
        subscription = self._watcher.find(key)
        if subscription is None:
            return None
        overlay = self._overlay
        if overlay is None or overlay.written_at_us <= self._local.written_at_us:
            return subscription
        digest = hashlib.sha256(key).digest()
        if overlay.accepts(digest, subscription.name):
            return subscription
        self.refused += 1
        keys_logger.info(
            "subscriptions.refused_by_shared_state",
            extra={
                "subscription": subscription.name,
                "key_fingerprint": digest.hex()[:12],
                "shared_state_written_at": overlay.written_at,
            },
        )
        return None

    # -- lifecycle ---------------------------------------------------------------

    async def start(self) -> None:
        """Sync once before serving (bounded by the store's timeouts), then poll."""
        if self._task is not None:
            raise RuntimeError("SharedSubscriptions is already started")
        await self.sync_now()
        self._task = asyncio.create_task(self._run(), name="subscription-sync")

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.wait({task})

    async def sync_now(self) -> bool:
        """One round of the poll; False when Redis did not answer."""
        try:
            await self._sync()
        except SharedStoreUnavailable as err:
            self._last_problem = err.reason
            return False
        self._last_sync = self._wall()
        return True

    def status(self) -> dict[str, Any]:
        overlay = self._overlay
        in_force = overlay is not None and (
            overlay.written_at_us > self._local.written_at_us
        )
        return {
            "sync": "ok" if self._store.available else "unavailable",
            "last_sync_seconds_ago": (
                None
                if self._last_sync is None
                else round(self._wall() - self._last_sync, 3)
            ),
            "problem": self._last_problem,
            "local_written_at": self._local.written_at,
            "shared_state_in_force": in_force,
            "shared_written_at": None if overlay is None else overlay.written_at,
            "published": self.published,
            "adopted": self.adopted,
            "keys_refused": self.refused,
        }

    # -- internals ---------------------------------------------------------------

    def _local_state(self) -> SharedSubscriptionState:
        written_at_us = self._watcher.loaded_mtime_ns // 1000
        return SharedSubscriptionState.from_store(self._watcher.store, written_at_us)

    def _on_local_change(self, store: SubscriptionStore) -> None:
        self._local = self._local_state()
        self._publish_pending = True
        self._local_changed.set()

    def _newest_known(self) -> SharedSubscriptionState:
        overlay = self._overlay
        if overlay is not None and overlay.written_at_us > self._local.written_at_us:
            return overlay
        return self._local

    async def _run(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._local_changed.wait(), self._interval)
            self._local_changed.clear()
            try:
                await self.sync_now()
            except Exception:
                # The outermost catch-all of this task: one bad round must not
                # end sharing for the life of the process.
                keys_logger.exception("subscriptions.sync_failed")

    async def _sync(self) -> None:
        version = await self._store.run(self._get_version)
        if version is not None and version == self._seen_version:
            if not self._publish_pending:
                return
        shared = await self._fetch_shared()
        if shared is not None:
            self._consider(shared)
        newest = self._newest_known()
        if shared is None or newest.written_at_us > shared.written_at_us:
            published = await self._store.run(
                lambda client: self._put_state(client, newest)
            )
            if published:
                self.published += 1
                version = published
            else:
                # Someone published a newer state meanwhile: read it next round.
                version = None
        self._publish_pending = False
        self._seen_version = version

    async def _get_version(self, client: Redis) -> int | None:
        reply = await self._read_version(
            keys=[self._version_key], args=[], client=client
        )
        if reply is None:
            return None
        if not isinstance(reply, bytes) or not reply.isdigit():
            raise UnexpectedReply("the subscription version is not a number")
        return int(reply)

    async def _fetch_shared(self) -> SharedSubscriptionState | None:
        reply = await self._store.run(
            lambda client: self._read_state(
                keys=[self._state_key], args=[], client=client
            )
        )
        if reply is None:
            return None
        try:
            return self._parse_shared(reply)
        except InvalidSharedState as err:
            if self._last_problem != err.args[0]:
                keys_logger.warning(
                    "subscriptions.shared_state_ignored", extra={"reason": err.args[0]}
                )
            self._last_problem = err.args[0]
            return None

    def _parse_shared(self, reply: Any) -> SharedSubscriptionState:
        if not isinstance(reply, list) or len(reply) != 2:
            raise InvalidSharedState("the shared state is not a hash of two fields")
        written, document = reply
        if not isinstance(written, bytes) or not written.isdigit():
            raise InvalidSharedState("the shared state has no time stamp")
        if not isinstance(document, bytes):
            raise InvalidSharedState("the shared state has no document")
        written_at_us = int(written)
        if written_at_us > self._wall() * 1e6 + _MAX_FUTURE_US:
            raise InvalidSharedState("the shared state is stamped in the future")
        return SharedSubscriptionState.parse(document, written_at_us)

    def _consider(self, shared: SharedSubscriptionState) -> None:
        if shared.written_at_us <= self._newest_known().written_at_us:
            return
        self._overlay = shared
        self._last_problem = None
        self.adopted += 1
        for listener in self._listeners:
            listener()
        keys_logger.info(
            "subscriptions.shared_state_adopted",
            extra={
                "shared_written_at": shared.written_at,
                "local_written_at": self._local.written_at,
                "subscriptions": shared.subscriptions,
            },
        )

    async def _put_state(self, client: Redis, state: SharedSubscriptionState) -> int:
        reply = await self._publish(
            keys=[self._state_key, self._version_key],
            args=[state.written_at_us, state.document, _STATE_TTL_MS],
            client=client,
        )
        if type(reply) is not int:
            raise UnexpectedReply("the publish script returned something else")
        return reply
