"""The subscription key store: a JSON file of key digests, looked up, reloaded, written.

The file named by ``APIM_SUBSCRIPTION_KEYS_FILE`` holds, per subscription, the SHA-256
digests of its primary and secondary keys, never the keys themselves::

    {
      "version": 1,
      "products": {
        "starter": {"rate_limit": "100/60"},
        "unlimited": {"rate_limit": null}
      },
      "subscriptions": [
        {
          "name": "contoso-search",
          "product": "starter",
          "state": "active",
          "primary_sha256": "<64 lowercase hex: sha256 of the primary key>",
          "secondary_sha256": "<64 lowercase hex: sha256 of the secondary key>",
          "rate_limit": null,
          "created": "2024-05-01T12:00:00Z",
          "updated": "2024-05-01T12:00:00Z"
        }
      ]
    }

Rules, all enforced on every load (a file that breaks one is refused as a whole):

- ``version`` is the integer 1; every field above is present and no other is.
- Subscription and product names are 1 to 128 characters from ``A-Z a-z 0-9 . _ -``,
  starting with a letter or a digit. Subscription names are unique, and no JSON
  object repeats a key.
- ``state`` is ``"active"`` or ``"suspended"``; only active subscriptions are found.
- ``product`` names an entry of ``products``; product settings live there.
- A rate limit is ``"CALLS/SECONDS"`` (two positive integers, as APIM's
  ``rate-limit`` policy) or ``null``. A subscription's own limit wins over its
  product's; with neither, the subscription has no limit.
- A digest is 64 lowercase hex characters, and no digest appears twice.
- ``created`` and ``updated`` are ISO 8601 timestamps with a time zone.

Keys are 32 lowercase hex characters (``secrets.token_hex(16)``, APIM's format). A
running service re-reads the file when it changes (``KeyStoreWatcher``); writers
(``KeyStoreFile``, behind ``python -m service keys``) replace it atomically under a
lock file named ``<file>.lock``, which is left in place on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import fcntl
import hashlib
import hmac
import json
import math
import os
import re
import secrets
import tempfile
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from pathlib import Path
from types import MappingProxyType, TracebackType
from typing import Final, Literal

from validators.base import RateLimit, Subscription

from .log import keys_logger

__all__ = (
    "DEFAULT_RELOAD_INTERVAL",
    "FORMAT_VERSION",
    "KEYS_FILE_ENV",
    "KEY_SLOTS",
    "IssuedKeys",
    "KeySlot",
    "KeyStoreError",
    "KeyStoreFile",
    "KeyStoreWatcher",
    "ProductSettings",
    "SubscriptionRecord",
    "SubscriptionState",
    "SubscriptionStore",
    "format_rate_limit",
    "key_fingerprint",
    "load_store",
    "parse_rate_limit",
    "parse_store",
)

KEYS_FILE_ENV: Final = "APIM_SUBSCRIPTION_KEYS_FILE"
FORMAT_VERSION: Final = 1
DEFAULT_RELOAD_INTERVAL: Final = 2.0
KeySlot = Literal["primary", "secondary"]
KEY_SLOTS: Final[tuple[KeySlot, ...]] = ("primary", "secondary")

# Far above any real store (a subscription is about 400 bytes), low enough that a
# wrong path (a log file, a disk image) is refused before it is read into memory.
MAX_FILE_BYTES: Final = 16 * 1024 * 1024
FINGERPRINT_LENGTH: Final = 12
_MAX_RATE_NUMBER: Final = 999_999_999

_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,127}")
_DIGEST = re.compile(r"[0-9a-f]{64}")
_RATE_LIMIT = re.compile(r"([1-9][0-9]{0,8})/([1-9][0-9]{0,8})")

_TOP_FIELDS: Final = frozenset({"version", "products", "subscriptions"})
_PRODUCT_FIELDS: Final = frozenset({"rate_limit"})
_SUBSCRIPTION_FIELDS: Final = frozenset(
    {
        "name",
        "product",
        "state",
        "primary_sha256",
        "secondary_sha256",
        "rate_limit",
        "created",
        "updated",
    }
)

# A file's (mtime_ns, size, inode): what the watcher compares between polls.
_Signature = tuple[int, int, int]
_NOT_WARNED: Final = object()


class KeyStoreError(ValueError):
    """The key store file is missing, unreadable or malformed, or a change is refused.

    The message names the file and the problem; it never holds a key.
    """


class _FileAccessError(KeyStoreError):
    """The file could not be opened or read, as opposed to parsed."""

    def __init__(self, message: str, *, missing: bool) -> None:
        super().__init__(message)
        self.missing = missing


class SubscriptionState(enum.StrEnum):
    """Whether a subscription's keys are accepted."""

    ACTIVE = "active"
    SUSPENDED = "suspended"


_STATES: Final = frozenset(state.value for state in SubscriptionState)


@dataclass(frozen=True, slots=True)
class ProductSettings:
    """What every subscription of a product shares, unless it overrides it."""

    rate_limit: RateLimit | None = None

    def __post_init__(self) -> None:
        _check_rate_limit(self.rate_limit)


@dataclass(frozen=True, slots=True)
class SubscriptionRecord:
    """One subscription as the file stores it: digests of its keys, never the keys."""

    name: str
    product: str
    state: SubscriptionState
    primary_sha256: str
    secondary_sha256: str
    rate_limit: RateLimit | None
    created: datetime
    updated: datetime

    def __post_init__(self) -> None:
        _check_name(self.name, "name")
        _check_name(self.product, "product")
        if not isinstance(self.state, SubscriptionState):
            raise KeyStoreError('state must be "active" or "suspended"')
        _check_digest(self.primary_sha256, "primary_sha256")
        _check_digest(self.secondary_sha256, "secondary_sha256")
        if self.primary_sha256 == self.secondary_sha256:
            raise KeyStoreError("primary and secondary keys are the same key")
        _check_rate_limit(self.rate_limit)
        _check_timestamp(self.created, "created")
        _check_timestamp(self.updated, "updated")

    def digest(self, which: KeySlot) -> str:
        """The stored SHA-256 hex digest of one of the two keys."""
        return self.primary_sha256 if which == "primary" else self.secondary_sha256

    def fingerprint(self, which: KeySlot) -> str:
        """The short digest prefix that logs and ``keys list`` show for a key."""
        return self.digest(which)[:FINGERPRINT_LENGTH]


@dataclass(frozen=True, slots=True)
class IssuedKeys:
    """Two fresh keys: the only moment they exist in clear. Not in the ``repr``."""

    name: str
    product: str
    primary: str = field(repr=False)
    secondary: str = field(repr=False)


@dataclass(frozen=True, slots=True)
class _KeyEntry:
    """What a digest resolves to in the lookup index."""

    digest: bytes
    slot: KeySlot
    record: SubscriptionRecord
    subscription: Subscription


class SubscriptionStore:
    """An immutable, validated key store, indexed by key digest for ``find``."""

    __slots__ = ("_by_digest", "_by_name", "_products", "_subscriptions")

    def __init__(
        self,
        products: Mapping[str, ProductSettings] | None = None,
        subscriptions: Iterable[SubscriptionRecord] = (),
    ) -> None:
        self._products = MappingProxyType(dict(products or {}))
        for name in self._products:
            _check_name(name, "product name")
        self._subscriptions = tuple(subscriptions)
        self._by_name = _index_by_name(self._subscriptions)
        _check_products_declared(self._subscriptions, self._products)
        self._by_digest = _index_by_digest(self._subscriptions, self._products)

    @property
    def products(self) -> Mapping[str, ProductSettings]:
        return self._products

    @property
    def subscriptions(self) -> tuple[SubscriptionRecord, ...]:
        return self._subscriptions

    @property
    def active_count(self) -> int:
        return sum(
            record.state is SubscriptionState.ACTIVE for record in self._subscriptions
        )

    def get(self, name: str) -> SubscriptionRecord | None:
        return self._by_name.get(name)

    def effective_rate_limit(self, record: SubscriptionRecord) -> RateLimit | None:
        """The subscription's own limit, else its product's, else none."""
        if record.rate_limit is not None:
            return record.rate_limit
        return self._products[record.product].rate_limit

    def find(self, key: bytes) -> Subscription | None:
        """The active subscription one of whose keys is ``key``, else ``None``.

        Any bytes at all are fine: nothing is decoded, only hashed.
        """
        digest = hashlib.sha256(key).digest()
        # SECURITY: the dict finds the entry with a short-circuiting ``==`` on
        # digests. Its timing could at most tell how many leading bytes of
        # SHA-256(guess) match a stored digest. The attacker picks the preimage, not
        # the digest: steering a digest byte by byte would be a preimage attack on
        # SHA-256, against keys of 128 random bits. compare_digest then confirms
        # the hit in constant time, as defence in depth and to make intent plain.
        entry = self._by_digest.get(digest)
        if entry is None or not hmac.compare_digest(digest, entry.digest):
            return None
        if entry.record.state is not SubscriptionState.ACTIVE:
            keys_logger.info(
                "Key of suspended subscription %s presented",
                entry.record.name,
                extra={
                    "subscription": entry.record.name,
                    "key_slot": entry.slot,
                    "key_fingerprint": entry.record.fingerprint(entry.slot),
                },
            )
            return None
        return entry.subscription

    def with_subscription(self, record: SubscriptionRecord) -> SubscriptionStore:
        """A copy with ``record`` added, or replacing the one of the same name."""
        if record.name not in self._by_name:
            return SubscriptionStore(self._products, (*self._subscriptions, record))
        subscriptions = (
            record if existing.name == record.name else existing
            for existing in self._subscriptions
        )
        return SubscriptionStore(self._products, subscriptions)

    def without_subscription(self, name: str) -> SubscriptionStore:
        """A copy without the subscription called ``name``."""
        if name not in self._by_name:
            raise KeyStoreError(f"No subscription named {name!r}")
        kept = (record for record in self._subscriptions if record.name != name)
        return SubscriptionStore(self._products, kept)

    def with_product(self, name: str, settings: ProductSettings) -> SubscriptionStore:
        """A copy with product ``name`` set to ``settings`` (created if absent)."""
        products = {**self._products, name: settings}
        return SubscriptionStore(products, self._subscriptions)

    def to_json(self) -> str:
        """The file's text, in the documented format, ending with a newline."""
        document = {
            "version": FORMAT_VERSION,
            "products": {
                name: {"rate_limit": _rate_limit_text(self._products[name].rate_limit)}
                for name in sorted(self._products)
            },
            "subscriptions": [
                _record_document(record) for record in self._subscriptions
            ],
        }
        return json.dumps(document, indent=2) + "\n"


def key_fingerprint(key: bytes) -> str:
    """A short, non-reversible label for a key, safe to log."""
    return hashlib.sha256(key).hexdigest()[:FINGERPRINT_LENGTH]


def parse_rate_limit(text: str) -> RateLimit:
    """Parse ``"CALLS/SECONDS"``, two positive integers, as APIM's ``rate-limit``."""
    match = _RATE_LIMIT.fullmatch(text)
    if match is None:
        raise KeyStoreError(
            "rate limit must be CALLS/SECONDS with two positive integers, e.g. 100/60"
        )
    return RateLimit(calls=int(match[1]), period_seconds=int(match[2]))


def format_rate_limit(rate_limit: RateLimit) -> str:
    """The ``"CALLS/SECONDS"`` text of a rate limit."""
    return f"{rate_limit.calls}/{rate_limit.period_seconds}"


def parse_store(text: str, *, source: str = "Key store") -> SubscriptionStore:
    """Parse and validate the file's text; ``source`` starts every error message."""
    try:
        return _parse_document(_decode_json(text))
    except KeyStoreError as err:
        raise KeyStoreError(f"{source}: {err}") from None


def load_store(path: str | os.PathLike[str]) -> SubscriptionStore:
    """Read, parse and validate the key store at ``path``."""
    return _read_store(Path(path))[1]


class KeyStoreWatcher:
    """Serves the last good store and re-reads the file when it changes.

    Loads the file at construction, so a missing or corrupt file stops start-up.
    ``start()`` and ``close()`` run the polling task, e.g. from an aiohttp
    ``cleanup_ctx`` (``async with watcher: yield``). A changed file that does not
    parse, or a file that disappears, is refused with one warning per change, and
    the last good store stays in use.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        interval: float = DEFAULT_RELOAD_INTERVAL,
    ) -> None:
        if not (math.isfinite(interval) and interval > 0):
            raise ValueError("interval must be a positive number of seconds")
        self._path = Path(path)
        self._interval = interval
        try:
            signature, store = _read_store(self._path)
        except _FileAccessError as err:
            hint = (
                "; create it with `python -m service keys add`" if err.missing else ""
            )
            raise KeyStoreError(f"{KEYS_FILE_ENV}: {err}{hint}") from err
        except KeyStoreError as err:
            raise KeyStoreError(f"{KEYS_FILE_ENV}: {err}") from err
        self._store = store
        self._seen: _Signature | None = signature
        self._warned_for: object = _NOT_WARNED
        self._loaded_at = datetime.now(UTC)
        self._last_reload_ok = True
        self._last_error: str | None = None
        self._task: asyncio.Task[None] | None = None
        self._loaded_mtime_ns = signature[0]
        self._listeners: list[Callable[[SubscriptionStore], None]] = []
        _log_loaded("Loaded", self._path, store)

    @property
    def path(self) -> Path:
        return self._path

    @property
    def store(self) -> SubscriptionStore:
        return self._store

    @property
    def last_reload_ok(self) -> bool:
        """False while the file on disk is not the store in use."""
        return self._last_reload_ok

    @property
    def last_error(self) -> str | None:
        """Why the last reload was refused (no secrets), or ``None``."""
        return self._last_error

    @property
    def loaded_at(self) -> datetime:
        """When the store in use was read (UTC)."""
        return self._loaded_at

    @property
    def subscription_count(self) -> int:
        return len(self._store.subscriptions)

    @property
    def loaded_mtime_ns(self) -> int:
        """The modification time of the file the store in use was read from.

        Replicas sharing state compare it to tell which of two stores is newer.
        """
        return self._loaded_mtime_ns

    def add_listener(self, listener: Callable[[SubscriptionStore], None]) -> None:
        """Called with the new store each time a changed file is accepted."""
        self._listeners.append(listener)

    def find(self, key: bytes) -> Subscription | None:
        return self._store.find(key)

    def reload_now(self) -> bool:
        """Re-read the file at once, changed or not; True if it was accepted."""
        try:
            signature, store = _read_store(self._path)
        except KeyStoreError as err:
            self._seen = _stat_signature(self._path)
            self._refuse(str(err))
            return False
        self._seen = signature
        self._accept(store)
        return True

    async def start(self) -> None:
        if self._task is not None:
            raise RuntimeError("KeyStoreWatcher is already started")
        self._task = asyncio.get_running_loop().create_task(
            self._run(), name="keystore-watcher"
        )

    async def close(self) -> None:
        task, self._task = self._task, None
        if task is None:
            return
        task.cancel()
        # wait() rather than awaiting the task: the task's own CancelledError must
        # not be mistaken for a cancellation of close() itself.
        await asyncio.wait({task})

    async def __aenter__(self) -> KeyStoreWatcher:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            try:
                await self._poll()
            except Exception:
                # The outermost catch-all of this task: a bug in one poll must not
                # end reloading for the life of the process.
                keys_logger.exception("Key store poll failed")

    async def _poll(self) -> None:
        signature = _stat_signature(self._path)
        if signature == self._seen:
            return
        self._seen = signature
        if signature is None:
            self._refuse(f"Key store {self._path} is missing or unreadable")
            return
        try:
            # Parsing a large file should not stall the event loop.
            signature, store = await asyncio.to_thread(_read_store, self._path)
        except KeyStoreError as err:
            self._refuse(str(err))
            return
        self._seen = signature
        self._accept(store)

    def _accept(self, store: SubscriptionStore) -> None:
        self._store = store
        if self._seen is not None:
            self._loaded_mtime_ns = self._seen[0]
        self._loaded_at = datetime.now(UTC)
        self._last_reload_ok = True
        self._last_error = None
        self._warned_for = _NOT_WARNED
        _log_loaded("Reloaded", self._path, store)
        for listener in self._listeners:
            listener(store)

    def _refuse(self, reason: str) -> None:
        self._last_reload_ok = False
        self._last_error = reason
        if self._warned_for == self._seen:
            return
        self._warned_for = self._seen
        keys_logger.warning(
            "%s; keeping the last good key store (%d subscriptions)",
            reason,
            len(self._store.subscriptions),
            extra={"key_store": str(self._path)},
        )


class KeyStoreFile:
    """Changes the key store file: atomic replacements, one writer at a time."""

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        clock: Callable[[], datetime] | None = None,
    ) -> None:
        # Resolved so that writing through a symlink replaces its target, not the
        # link itself.
        self._path = Path(path).resolve()
        self._clock = clock or _utc_now

    @property
    def path(self) -> Path:
        return self._path

    @property
    def lock_path(self) -> Path:
        return self._path.with_name(self._path.name + ".lock")

    def read(self) -> SubscriptionStore:
        return load_store(self._path)

    def add(
        self, name: str, product: str, *, rate_limit: RateLimit | None = None
    ) -> IssuedKeys:
        """Create a subscription with two fresh keys, and the file if need be."""
        issued = IssuedKeys(name, product, _new_key(), _new_key())
        now = self._now()
        record = SubscriptionRecord(
            name=name,
            product=product,
            state=SubscriptionState.ACTIVE,
            primary_sha256=_hex_digest(issued.primary),
            secondary_sha256=_hex_digest(issued.secondary),
            rate_limit=rate_limit,
            created=now,
            updated=now,
        )

        def change(store: SubscriptionStore) -> SubscriptionStore:
            if store.get(name) is not None:
                raise KeyStoreError(f"Subscription {name!r} already exists")
            if product not in store.products:
                store = store.with_product(product, ProductSettings())
            return store.with_subscription(record)

        self._update(change, create=True)
        return issued

    def regenerate(self, name: str, which: KeySlot) -> str:
        """Replace one key of a subscription; the old one stops working."""
        if which not in KEY_SLOTS:
            raise ValueError('which must be "primary" or "secondary"')
        key = _new_key()

        def change(store: SubscriptionStore) -> SubscriptionStore:
            record = _existing(store, name)
            digest, now = _hex_digest(key), self._now()
            if which == "primary":
                record = replace(record, primary_sha256=digest, updated=now)
            else:
                record = replace(record, secondary_sha256=digest, updated=now)
            return store.with_subscription(record)

        self._update(change)
        return key

    def suspend(self, name: str) -> bool:
        """Stop accepting a subscription's keys; False if it already was suspended."""
        return self._set_state(name, SubscriptionState.SUSPENDED)

    def activate(self, name: str) -> bool:
        """Accept a subscription's keys again; False if it already was active."""
        return self._set_state(name, SubscriptionState.ACTIVE)

    def remove(self, name: str) -> None:
        """Delete a subscription and with it its keys."""
        self._update(lambda store: store.without_subscription(name))

    def set_product(self, name: str, settings: ProductSettings) -> None:
        """Create or change a product's settings."""
        self._update(lambda store: store.with_product(name, settings), create=True)

    def _set_state(self, name: str, state: SubscriptionState) -> bool:
        changed = False

        def change(store: SubscriptionStore) -> SubscriptionStore:
            nonlocal changed
            record = _existing(store, name)
            if record.state is state:
                return store
            changed = True
            updated = replace(record, state=state, updated=self._now())
            return store.with_subscription(updated)

        self._update(change)
        return changed

    def _update(
        self,
        change: Callable[[SubscriptionStore], SubscriptionStore],
        *,
        create: bool = False,
    ) -> None:
        if create:
            _make_parent(self._path)
        with self._locked():
            current = self._read_for_update(create=create)
            updated = change(current)
            if updated is not current:
                _write_atomically(self._path, updated.to_json())

    def _read_for_update(self, *, create: bool) -> SubscriptionStore:
        try:
            return load_store(self._path)
        except _FileAccessError as err:
            if create and err.missing:
                return SubscriptionStore()
            raise
        except KeyStoreError as err:
            raise KeyStoreError(
                f"{err}; refusing to write over a corrupt key store, fix or restore it"
            ) from err

    @contextlib.contextmanager
    def _locked(self) -> Iterator[None]:
        # A separate, never-deleted lock file: the store itself is replaced on every
        # write, so a lock held on it would guard an inode nobody opens any more.
        try:
            fd = os.open(self.lock_path, os.O_RDWR | os.O_CREAT, 0o600)
        except FileNotFoundError:
            # Only a missing directory makes O_CREAT fail this way.
            raise KeyStoreError(f"Key store {self._path} does not exist") from None
        except OSError as err:
            raise KeyStoreError(
                f"Cannot open lock file {self.lock_path}: {_reason(err)}"
            ) from err
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)

    def _now(self) -> datetime:
        return self._clock().astimezone(UTC).replace(microsecond=0)


def _utc_now() -> datetime:
    return datetime.now(UTC)


def _new_key() -> str:
    # 128 bits from the OS's CSPRNG. With that much entropy an unsalted, fast
    # SHA-256 is enough: salting and stretching only help against guessable
    # secrets such as passwords, and nobody enumerates 2**128 candidates.
    return secrets.token_hex(16)


def _hex_digest(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def _existing(store: SubscriptionStore, name: str) -> SubscriptionRecord:
    record = store.get(name)
    if record is None:
        raise KeyStoreError(f"No subscription named {name!r}")
    return record


def _check_name(value: object, what: str) -> None:
    if not isinstance(value, str) or _NAME.fullmatch(value) is None:
        raise KeyStoreError(
            f"{what} must be 1 to 128 characters from A-Z a-z 0-9 . _ -,"
            " starting with a letter or a digit"
        )


def _check_digest(value: object, what: str) -> None:
    # The value is never echoed: someone may have pasted a key where its
    # digest belongs.
    if not isinstance(value, str) or _DIGEST.fullmatch(value) is None:
        raise KeyStoreError(
            f"{what} must be a SHA-256 digest: 64 lowercase hex characters"
        )


def _check_rate_limit(value: RateLimit | None) -> None:
    if value is None:
        return
    numbers = (value.calls, value.period_seconds)
    if not all(type(n) is int and 1 <= n <= _MAX_RATE_NUMBER for n in numbers):
        raise KeyStoreError("rate limit must hold two positive integers")


def _check_timestamp(value: object, what: str) -> None:
    if not isinstance(value, datetime) or value.tzinfo is None:
        raise KeyStoreError(f"{what} must be a timestamp with a time zone")


def _index_by_name(
    subscriptions: tuple[SubscriptionRecord, ...],
) -> dict[str, SubscriptionRecord]:
    by_name: dict[str, SubscriptionRecord] = {}
    for record in subscriptions:
        if record.name in by_name:
            raise KeyStoreError(f"subscription name {record.name!r} is used twice")
        by_name[record.name] = record
    return by_name


def _check_products_declared(
    subscriptions: tuple[SubscriptionRecord, ...],
    products: Mapping[str, ProductSettings],
) -> None:
    # A typo in a product name would otherwise drop its rate limit silently.
    for record in subscriptions:
        if record.product not in products:
            raise KeyStoreError(
                f"subscription {record.name!r} names product {record.product!r},"
                " which is not in products"
            )


def _index_by_digest(
    subscriptions: tuple[SubscriptionRecord, ...],
    products: Mapping[str, ProductSettings],
) -> dict[bytes, _KeyEntry]:
    by_digest: dict[bytes, _KeyEntry] = {}
    for record in subscriptions:
        own = record.rate_limit
        subscription = Subscription(
            name=record.name,
            product=record.product,
            rate_limit=own if own is not None else products[record.product].rate_limit,
        )
        for slot in KEY_SLOTS:
            digest = bytes.fromhex(record.digest(slot))
            if digest in by_digest:
                raise KeyStoreError(
                    f"subscription {record.name!r} shares a key with"
                    f" {by_digest[digest].record.name!r}"
                )
            by_digest[digest] = _KeyEntry(digest, slot, record, subscription)
    return by_digest


def _record_document(record: SubscriptionRecord) -> dict[str, object]:
    return {
        "name": record.name,
        "product": record.product,
        "state": record.state.value,
        "primary_sha256": record.primary_sha256,
        "secondary_sha256": record.secondary_sha256,
        "rate_limit": _rate_limit_text(record.rate_limit),
        "created": _timestamp_text(record.created),
        "updated": _timestamp_text(record.updated),
    }


def _rate_limit_text(rate_limit: RateLimit | None) -> str | None:
    return None if rate_limit is None else format_rate_limit(rate_limit)


def _timestamp_text(moment: datetime) -> str:
    return moment.astimezone(UTC).isoformat(timespec="seconds").replace("+00:00", "Z")


def _read_store(path: Path) -> tuple[_Signature, SubscriptionStore]:
    """The file's signature and parsed store, read from one open file."""
    try:
        with path.open("rb") as stream:
            status = os.fstat(stream.fileno())
            if status.st_size > MAX_FILE_BYTES:
                raise KeyStoreError(
                    f"Key store {path} is larger than {MAX_FILE_BYTES} bytes"
                )
            data = stream.read(MAX_FILE_BYTES + 1)
    except FileNotFoundError:
        raise _FileAccessError(
            f"Key store {path} does not exist", missing=True
        ) from None
    except OSError as err:
        raise _FileAccessError(
            f"Key store {path} cannot be read: {_reason(err)}", missing=False
        ) from err

    signature = (status.st_mtime_ns, status.st_size, status.st_ino)
    try:
        # A byte order mark is tolerated: Windows editors add one.
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError:
        raise KeyStoreError(f"Key store {path} is not UTF-8 text") from None
    return signature, parse_store(text, source=f"Key store {path}")


def _stat_signature(path: Path) -> _Signature | None:
    # TODO(in-place edits): two in-place rewrites of equal size within one tick of
    # the file system clock look alike; KeyStoreFile always replaces the file, so
    # its writes change the inode and are never missed.
    try:
        status = path.stat()
    except OSError:
        return None
    return (status.st_mtime_ns, status.st_size, status.st_ino)


def _make_parent(path: Path) -> None:
    try:
        path.parent.mkdir(mode=0o700, parents=True, exist_ok=True)
    except OSError as err:
        raise KeyStoreError(
            f"Cannot create directory {path.parent}: {_reason(err)}"
        ) from err


def _write_atomically(path: Path, text: str) -> None:
    """Replace ``path`` so that a reader sees the old file or the new, never half."""
    try:
        _replace_file(path, text)
    except OSError as err:
        raise KeyStoreError(f"Cannot write key store {path}: {_reason(err)}") from err
    _sync_directory(path.parent)


def _replace_file(path: Path, text: str) -> None:
    # A temporary file in the same directory, so that os.replace is a rename
    # within one file system, which POSIX makes atomic.
    fd, temporary = tempfile.mkstemp(
        prefix=f".{path.name}.", suffix=".tmp", dir=path.parent
    )
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as stream:
            os.fchmod(stream.fileno(), 0o600)
            stream.write(text)
            stream.flush()
            os.fsync(stream.fileno())
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(temporary)
        raise


def _sync_directory(directory: Path) -> None:
    # The rename lives in the directory: without this fsync a crash could bring
    # the old file back. Best effort: the new file is already in place, so a file
    # system that cannot sync a directory must not turn success into an error.
    with contextlib.suppress(OSError):
        fd = os.open(directory, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def _reason(err: OSError) -> str:
    return err.strerror or type(err).__name__


def _decode_json(text: str) -> object:
    try:
        return json.loads(
            text, object_pairs_hook=_unique_keys, parse_constant=_reject_constant
        )
    except KeyStoreError:
        raise
    except json.JSONDecodeError as err:
        raise KeyStoreError(
            f"not valid JSON ({err.msg} at line {err.lineno}, column {err.colno})"
        ) from None
    except (ValueError, RecursionError):
        # Python's own limits: integers of thousands of digits, deep nesting.
        raise KeyStoreError("not valid JSON (a number or nesting too large)") from None


def _unique_keys(pairs: list[tuple[str, object]]) -> dict[str, object]:
    result: dict[str, object] = {}
    for key, value in pairs:
        if key in result:
            raise KeyStoreError(f"an object repeats the key {key!r}")
        result[key] = value
    return result


def _reject_constant(name: str) -> object:
    raise KeyStoreError(f"not valid JSON ({name} is not a JSON number)")


def _parse_document(document: object) -> SubscriptionStore:
    if not isinstance(document, dict):
        raise KeyStoreError(f"the file must hold an object, not {_kind(document)}")
    version = document.get("version")
    if type(version) is not int or version != FORMAT_VERSION:
        raise KeyStoreError(f"version must be {FORMAT_VERSION}")
    top = _fields(document, "the file", _TOP_FIELDS)
    products = _parse_products(top["products"])
    raw_subscriptions = top["subscriptions"]
    if not isinstance(raw_subscriptions, list):
        raise KeyStoreError(
            f"subscriptions must be an array, not {_kind(raw_subscriptions)}"
        )
    subscriptions = [
        _parse_subscription(item, f"subscriptions[{index}]")
        for index, item in enumerate(raw_subscriptions)
    ]
    return SubscriptionStore(products, subscriptions)


def _parse_products(value: object) -> dict[str, ProductSettings]:
    if not isinstance(value, dict):
        raise KeyStoreError(f"products must be an object, not {_kind(value)}")
    products: dict[str, ProductSettings] = {}
    for name, entry in value.items():
        where = f"products[{name!r}]"
        try:
            _check_name(name, "the product name")
            fields = _fields(entry, "the entry", _PRODUCT_FIELDS)
            products[name] = ProductSettings(_rate_limit_field(fields["rate_limit"]))
        except KeyStoreError as err:
            raise KeyStoreError(f"{where}: {err}") from None
    return products


def _parse_subscription(value: object, where: str) -> SubscriptionRecord:
    try:
        fields = _fields(value, "the entry", _SUBSCRIPTION_FIELDS)
        return SubscriptionRecord(
            name=_string_field(fields, "name"),
            product=_string_field(fields, "product"),
            state=_state_field(fields["state"]),
            primary_sha256=_string_field(fields, "primary_sha256"),
            secondary_sha256=_string_field(fields, "secondary_sha256"),
            rate_limit=_rate_limit_field(fields["rate_limit"]),
            created=_timestamp_field(fields, "created"),
            updated=_timestamp_field(fields, "updated"),
        )
    except KeyStoreError as err:
        raise KeyStoreError(f"{where}: {err}") from None


def _fields(value: object, what: str, expected: frozenset[str]) -> dict[str, object]:
    if not isinstance(value, dict):
        raise KeyStoreError(f"{what} must be an object, not {_kind(value)}")
    missing = sorted(expected - value.keys())
    if missing:
        raise KeyStoreError(f"{what} lacks {', '.join(missing)}")
    unknown = sorted(value.keys() - expected)
    if unknown:
        raise KeyStoreError(
            f"{what} has unknown fields {', '.join(map(repr, unknown))}"
        )
    return value


def _string_field(fields: dict[str, object], name: str) -> str:
    value = fields[name]
    if not isinstance(value, str):
        raise KeyStoreError(f"{name} must be a string, not {_kind(value)}")
    return value


def _state_field(value: object) -> SubscriptionState:
    if isinstance(value, str) and value in _STATES:
        return SubscriptionState(value)
    raise KeyStoreError('state must be "active" or "suspended"')


def _rate_limit_field(value: object) -> RateLimit | None:
    if value is None:
        return None
    if not isinstance(value, str):
        raise KeyStoreError(f"rate_limit must be a string or null, not {_kind(value)}")
    return parse_rate_limit(value)


def _timestamp_field(fields: dict[str, object], name: str) -> datetime:
    text = _string_field(fields, name)
    try:
        moment = datetime.fromisoformat(text)
    except ValueError:
        raise KeyStoreError(f"{name} must be an ISO 8601 timestamp") from None
    if moment.tzinfo is None:
        raise KeyStoreError(f"{name} must carry a time zone, e.g. a final Z")
    return moment.astimezone(UTC)


def _kind(value: object) -> str:
    """A JSON type name, so that messages describe values without quoting them."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, int | float):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, list):
        return "an array"
    return "an object"


def _log_loaded(verb: str, path: Path, store: SubscriptionStore) -> None:
    keys_logger.info(
        "%s key store %s: %d subscriptions, %d active",
        verb,
        path,
        len(store.subscriptions),
        store.active_count,
        extra={"key_store": str(path)},
    )
    if store.active_count == 0:
        keys_logger.warning(
            "Key store %s has no active subscription: every request will be refused",
            path,
            extra={"key_store": str(path)},
        )
