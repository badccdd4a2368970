"""Tests of the subscription key store: its format, lookups, writes and reloads."""

from __future__ import annotations

import asyncio
import copy
import hashlib
import itertools
import json
import logging
import os
import secrets
import stat
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from service import keystore
from service.keystore import (
    KEYS_FILE_ENV,
    KeyStoreError,
    KeyStoreFile,
    KeyStoreWatcher,
    ProductSettings,
    SubscriptionState,
    SubscriptionStore,
    format_rate_limit,
    key_fingerprint,
    load_store,
    parse_rate_limit,
    parse_store,
)
from validators.base import RateLimit, Subscription, SubscriptionLookup

Document = dict[str, Any]
Mutation = Callable[[Document], None]

KEYS_LOGGER = "rag_api_core.keys"


def _digest(key: str) -> str:
    return hashlib.sha256(key.encode("ascii")).hexdigest()


def _entry(
    name: str,
    product: str,
    primary: str,
    secondary: str,
    *,
    state: str = "active",
    rate_limit: str | None = None,
) -> dict[str, Any]:
    return {
        "name": name,
        "product": product,
        "state": state,
        "primary_sha256": _digest(primary),
        "secondary_sha256": _digest(secondary),
        "rate_limit": rate_limit,
        "created": "2024-05-01T12:00:00Z",
        "updated": "2024-05-01T12:00:00Z",
    }


@pytest.fixture
def keys() -> dict[str, str]:
    labels = ("alice1", "alice2", "bob1", "bob2", "carol1", "carol2")
    return {label: secrets.token_hex(16) for label in labels}


@pytest.fixture
def document(keys: dict[str, str]) -> Document:
    """Alice inherits starter's limit, bob is suspended, carol has her own limit."""
    return {
        "version": 1,
        "products": {
            "starter": {"rate_limit": "100/60"},
            "free": {"rate_limit": None},
        },
        "subscriptions": [
            _entry("alice", "starter", keys["alice1"], keys["alice2"]),
            _entry("bob", "free", keys["bob1"], keys["bob2"], state="suspended"),
            _entry(
                "carol", "starter", keys["carol1"], keys["carol2"], rate_limit="5/1"
            ),
        ],
    }


@pytest.fixture
def store(document: Document) -> SubscriptionStore:
    return parse_store(json.dumps(document))


@pytest.fixture
def store_path(tmp_path: Path, document: Document) -> Path:
    path = tmp_path / "keys.json"
    _replace_text(path, json.dumps(document))
    return path


@pytest.fixture
def keys_caplog(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, logger=KEYS_LOGGER)
    return caplog


def _replace_text(path: Path, text: str) -> None:
    # Tests change files by replacement, as the CLI does, so that the inode
    # changes and the watcher cannot miss a change within one clock tick.
    temporary = path.with_name(path.name + ".test-tmp")
    temporary.write_text(text, encoding="utf-8")
    os.replace(temporary, path)


def _warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [
        record
        for record in caplog.records
        if record.name == KEYS_LOGGER and record.levelno == logging.WARNING
    ]


def _set(*path: str | int, value: object) -> Mutation:
    def mutate(document: Document) -> None:
        target: Any = document
        for step in path[:-1]:
            target = target[step]
        target[path[-1]] = value

    return mutate


def _delete(*path: str | int) -> Mutation:
    def mutate(document: Document) -> None:
        target: Any = document
        for step in path[:-1]:
            target = target[step]
        del target[path[-1]]

    return mutate


def _copy_field(
    source: tuple[str | int, ...], target: tuple[str | int, ...]
) -> Mutation:
    def mutate(document: Document) -> None:
        value: Any = document
        for step in source:
            value = value[step]
        _set(*target, value=value)(document)

    return mutate


async def _wait_for(condition: Callable[[], bool], timeout: float = 5.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not condition():
        if loop.time() > deadline:
            raise AssertionError("condition not met within the timeout")
        await asyncio.sleep(0.01)


# --- the public surface -----------------------------------------------------------


def test_every_public_name_is_exported() -> None:
    for name in keystore.__all__:
        assert hasattr(keystore, name), name
    assert "KeyStoreError" in keystore.__all__


def test_key_store_error_is_a_value_error() -> None:
    assert issubclass(KeyStoreError, ValueError)


def test_store_and_watcher_satisfy_the_lookup_protocol(
    store: SubscriptionStore, store_path: Path
) -> None:
    lookups: list[SubscriptionLookup] = [store, KeyStoreWatcher(store_path)]
    for lookup in lookups:
        assert lookup.find(b"") is None


# --- parsing ----------------------------------------------------------------------


def test_valid_document_is_parsed_in_full(store: SubscriptionStore) -> None:
    assert [record.name for record in store.subscriptions] == ["alice", "bob", "carol"]
    assert store.products["starter"] == ProductSettings(RateLimit(100, 60))
    assert store.products["free"] == ProductSettings(None)
    bob = store.get("bob")
    assert bob is not None
    assert bob.state is SubscriptionState.SUSPENDED
    assert bob.created == datetime(2024, 5, 1, 12, 0, tzinfo=UTC)
    assert store.active_count == 2


def test_store_written_as_json_parses_back_to_the_same_records(
    store: SubscriptionStore,
) -> None:
    again = parse_store(store.to_json())

    assert again.subscriptions == store.subscriptions
    assert dict(again.products) == dict(store.products)


MALFORMED_DOCUMENTS: list[tuple[str, Mutation, str]] = [
    ("version missing", _delete("version"), "version must be 1"),
    ("version 2", _set("version", value=2), "version must be 1"),
    ("version true", _set("version", value=True), "version must be 1"),
    ("version string", _set("version", value="1"), "version must be 1"),
    ("unknown top field", _set("extra", value=1), "unknown fields 'extra'"),
    ("products missing", _delete("products"), "the file lacks products"),
    ("products array", _set("products", value=[]), "products must be an object"),
    (
        "product not object",
        _set("products", "starter", value="100/60"),
        "products['starter']: the entry must be an object, not a string",
    ),
    (
        "product unknown field",
        _set("products", "starter", "quota", value=5),
        "unknown fields 'quota'",
    ),
    (
        "product bad rate limit",
        _set("products", "starter", "rate_limit", value="100"),
        "products['starter']: rate limit must be CALLS/SECONDS",
    ),
    (
        "product bad name",
        _set("products", "gold plan", value={"rate_limit": None}),
        "the product name must be 1 to 128 characters",
    ),
    (
        "subscriptions object",
        _set("subscriptions", value={}),
        "subscriptions must be an array, not an object",
    ),
    (
        "subscription not object",
        _set("subscriptions", 0, value="alice"),
        "subscriptions[0]: the entry must be an object, not a string",
    ),
    (
        "subscription missing field",
        _delete("subscriptions", 0, "created"),
        "subscriptions[0]: the entry lacks created",
    ),
    (
        "subscription unknown field",
        _set("subscriptions", 0, "owner", value="x"),
        "subscriptions[0]: the entry has unknown fields 'owner'",
    ),
    (
        "name not string",
        _set("subscriptions", 0, "name", value=7),
        "subscriptions[0]: name must be a string, not a number",
    ),
    ("name empty", _set("subscriptions", 0, "name", value=""), "name must be 1 to"),
    (
        "name with newline",
        _set("subscriptions", 0, "name", value="ali\nce"),
        "name must be 1 to",
    ),
    (
        "name too long",
        _set("subscriptions", 0, "name", value="a" * 129),
        "name must be 1 to",
    ),
    (
        "duplicate name",
        _set("subscriptions", 1, "name", value="alice"),
        "subscription name 'alice' is used twice",
    ),
    (
        "unknown state",
        _set("subscriptions", 0, "state", value="paused"),
        'subscriptions[0]: state must be "active" or "suspended"',
    ),
    (
        "state null",
        _set("subscriptions", 0, "state", value=None),
        'state must be "active" or "suspended"',
    ),
    (
        "state upper case",
        _set("subscriptions", 0, "state", value="ACTIVE"),
        'state must be "active" or "suspended"',
    ),
    (
        "rate limit number",
        _set("subscriptions", 0, "rate_limit", value=100),
        "rate_limit must be a string or null, not a number",
    ),
    (
        "product not declared",
        _set("subscriptions", 0, "product", value="gold"),
        "names product 'gold', which is not in products",
    ),
    (
        "digest upper case",
        _set("subscriptions", 0, "primary_sha256", value="A" * 64),
        "subscriptions[0]: primary_sha256 must be a SHA-256 digest",
    ),
    (
        "digest too short",
        _set("subscriptions", 0, "secondary_sha256", value="a" * 63),
        "secondary_sha256 must be a SHA-256 digest",
    ),
    (
        "digest not hex",
        _set("subscriptions", 0, "primary_sha256", value="g" * 64),
        "primary_sha256 must be a SHA-256 digest",
    ),
    (
        "digest null",
        _set("subscriptions", 0, "primary_sha256", value=None),
        "primary_sha256 must be a string, not null",
    ),
    (
        "primary equals secondary",
        _copy_field(
            ("subscriptions", 0, "primary_sha256"),
            ("subscriptions", 0, "secondary_sha256"),
        ),
        "primary and secondary keys are the same key",
    ),
    (
        "digest shared by two subscriptions",
        _copy_field(
            ("subscriptions", 0, "primary_sha256"),
            ("subscriptions", 1, "secondary_sha256"),
        ),
        "shares a key with 'alice'",
    ),
    (
        "timestamp not iso",
        _set("subscriptions", 0, "created", value="yesterday"),
        "created must be an ISO 8601 timestamp",
    ),
    (
        "timestamp without zone",
        _set("subscriptions", 0, "updated", value="2024-05-01T12:00:00"),
        "updated must carry a time zone",
    ),
    (
        "timestamp number",
        _set("subscriptions", 0, "created", value=1714564800),
        "created must be a string, not a number",
    ),
]


@pytest.mark.parametrize(
    ("mutate", "fragment"),
    [
        pytest.param(mutate, fragment, id=case)
        for case, mutate, fragment in MALFORMED_DOCUMENTS
    ],
)
def test_malformed_document_is_refused_with_a_message_naming_the_problem(
    document: Document, mutate: Mutation, fragment: str
) -> None:
    broken = copy.deepcopy(document)
    mutate(broken)

    with pytest.raises(KeyStoreError) as caught:
        parse_store(json.dumps(broken))

    assert str(caught.value).startswith("Key store: ")
    assert fragment in str(caught.value)


@pytest.mark.parametrize(
    "rate_limit",
    [
        "0/60",
        "10/0",
        "10",
        "a/b",
        "-1/60",
        "+1/60",
        " 10/60",
        "10/60\n",
        "10 / 60",
        "1e3/60",
        "1234567890/60",
        "\u0661\u0660/60",
        "10/60/1",
        "",
    ],
)
def test_malformed_rate_limit_is_refused(document: Document, rate_limit: str) -> None:
    document["subscriptions"][0]["rate_limit"] = rate_limit

    with pytest.raises(KeyStoreError, match="rate limit must be CALLS/SECONDS"):
        parse_store(json.dumps(document))


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        pytest.param("", "not valid JSON (Expecting value at line 1", id="empty"),
        pytest.param("{", "not valid JSON", id="truncated"),
        pytest.param("[]", "the file must hold an object, not an array", id="array"),
        pytest.param("null", "the file must hold an object, not null", id="null"),
        pytest.param(
            '{"version": 1, "version": 1, "products": {}, "subscriptions": []}',
            "an object repeats the key 'version'",
            id="duplicate-key",
        ),
        pytest.param(
            '{"version": 1, "products": {"a": {"rate_limit": null},'
            ' "a": {"rate_limit": null}}, "subscriptions": []}',
            "an object repeats the key 'a'",
            id="duplicate-product",
        ),
        pytest.param(
            '{"version": NaN, "products": {}, "subscriptions": []}',
            "NaN is not a JSON number",
            id="nan",
        ),
        pytest.param("[" * 100_000, "not valid JSON", id="deep-nesting"),
        pytest.param(
            '{"version": ' + "1" * 5000 + "}", "not valid JSON", id="huge-int"
        ),
    ],
)
def test_malformed_json_is_refused(text: str, fragment: str) -> None:
    with pytest.raises(KeyStoreError) as caught:
        parse_store(text)

    assert fragment in str(caught.value)


def test_pasted_key_in_digest_field_is_refused_without_echoing_it(
    document: Document, keys: dict[str, str]
) -> None:
    document["subscriptions"][0]["primary_sha256"] = keys["alice1"]

    with pytest.raises(KeyStoreError) as caught:
        parse_store(json.dumps(document))

    assert "primary_sha256 must be a SHA-256 digest" in str(caught.value)
    assert keys["alice1"] not in str(caught.value)


def test_empty_store_document_is_valid() -> None:
    store = parse_store('{"version": 1, "products": {}, "subscriptions": []}')

    assert store.subscriptions == ()


def test_file_that_is_not_utf8_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "keys.json"
    path.write_bytes(b'{"version": 1, "products": {"\xff": {}}}')

    with pytest.raises(KeyStoreError, match="is not UTF-8 text"):
        load_store(path)


def test_file_with_byte_order_mark_is_accepted(
    tmp_path: Path, document: Document
) -> None:
    path = tmp_path / "keys.json"
    path.write_bytes(b"\xef\xbb\xbf" + json.dumps(document).encode())

    assert len(load_store(path).subscriptions) == 3


def test_missing_file_is_refused_naming_the_path(tmp_path: Path) -> None:
    path = tmp_path / "absent.json"

    with pytest.raises(KeyStoreError, match=r"absent\.json does not exist"):
        load_store(path)


def test_directory_instead_of_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(KeyStoreError, match="cannot be read"):
        load_store(tmp_path)


def test_oversized_file_is_refused_before_parsing(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(keystore, "MAX_FILE_BYTES", 100)

    with pytest.raises(KeyStoreError, match="is larger than 100 bytes"):
        load_store(store_path)


def test_error_messages_from_a_file_name_the_file(
    tmp_path: Path, document: Document
) -> None:
    path = tmp_path / "keys.json"
    document["subscriptions"][0]["state"] = "paused"
    path.write_text(json.dumps(document))

    with pytest.raises(KeyStoreError) as caught:
        load_store(path)

    assert str(caught.value).startswith(f"Key store {path}: subscriptions[0]: state")


# --- rate limits ------------------------------------------------------------------


def test_rate_limit_text_round_trips() -> None:
    limit = parse_rate_limit("100/60")

    assert limit == RateLimit(calls=100, period_seconds=60)
    assert format_rate_limit(limit) == "100/60"


@pytest.mark.parametrize("limit", [RateLimit(0, 60), RateLimit(5, 0), RateLimit(-1, 1)])
def test_product_settings_with_non_positive_rate_limit_are_refused(
    limit: RateLimit,
) -> None:
    with pytest.raises(KeyStoreError, match="two positive integers"):
        ProductSettings(limit)


def test_subscription_without_own_limit_gets_its_products(
    store: SubscriptionStore, keys: dict[str, str]
) -> None:
    found = store.find(keys["alice1"].encode())

    assert found == Subscription("alice", "starter", RateLimit(100, 60))


def test_subscription_own_limit_wins_over_its_products(
    store: SubscriptionStore, keys: dict[str, str]
) -> None:
    found = store.find(keys["carol2"].encode())

    assert found == Subscription("carol", "starter", RateLimit(5, 1))


def test_subscription_of_unlimited_product_has_no_limit(
    document: Document, keys: dict[str, str]
) -> None:
    document["subscriptions"][1]["state"] = "active"
    store = parse_store(json.dumps(document))

    assert store.find(keys["bob1"].encode()) == Subscription("bob", "free", None)


# --- lookups ----------------------------------------------------------------------


@pytest.mark.parametrize("label", ["alice1", "alice2"])
def test_primary_or_secondary_key_finds_the_subscription(
    store: SubscriptionStore, keys: dict[str, str], label: str
) -> None:
    found = store.find(keys[label].encode())

    assert found is not None
    assert found.name == "alice"


@pytest.mark.parametrize("label", ["bob1", "bob2"])
def test_key_of_suspended_subscription_is_refused(
    store: SubscriptionStore,
    keys: dict[str, str],
    label: str,
    keys_caplog: pytest.LogCaptureFixture,
) -> None:
    key = keys[label]

    assert store.find(key.encode()) is None
    assert "suspended subscription bob" in keys_caplog.text
    fields = keys_caplog.records[-1].__dict__
    assert fields["key_fingerprint"] == key_fingerprint(key.encode())
    assert key not in keys_caplog.text


def test_unknown_key_is_refused(store: SubscriptionStore) -> None:
    assert store.find(secrets.token_hex(16).encode()) is None


@pytest.mark.parametrize(
    "presented",
    [
        pytest.param(b"", id="empty"),
        pytest.param(b"\xff\xfe\x80\x00", id="not-utf8"),
        pytest.param(b"\x00" * 32, id="nul-bytes"),
        pytest.param(b"\xe2\x80\x8b" * 11, id="zero-width-spaces"),
        pytest.param(b"k" * (1024 * 1024), id="one-mebibyte"),
    ],
)
def test_arbitrary_bytes_find_nothing(
    store: SubscriptionStore, presented: bytes
) -> None:
    assert store.find(presented) is None


@pytest.mark.parametrize(
    "variant",
    [
        pytest.param(lambda key: key.upper(), id="upper-case"),
        pytest.param(lambda key: key + " ", id="trailing-space"),
        pytest.param(lambda key: " " + key, id="leading-space"),
        pytest.param(lambda key: key[:-1], id="truncated"),
        pytest.param(lambda key: key + "\n", id="trailing-newline"),
    ],
)
def test_near_miss_of_a_valid_key_finds_nothing(
    store: SubscriptionStore, keys: dict[str, str], variant: Callable[[str], str]
) -> None:
    assert store.find(variant(keys["alice1"]).encode()) is None


def test_fingerprint_is_the_digest_prefix_shown_by_records(
    store: SubscriptionStore, keys: dict[str, str]
) -> None:
    alice = store.get("alice")

    assert alice is not None
    assert alice.fingerprint("primary") == key_fingerprint(keys["alice1"].encode())
    assert len(alice.fingerprint("secondary")) == 12


# --- writes -----------------------------------------------------------------------


@pytest.fixture
def clock() -> Callable[[], datetime]:
    """A clock one minute later at each reading, so that updates are visible."""
    start = datetime(2025, 1, 1, tzinfo=UTC)
    minutes = itertools.count()
    return lambda: start + timedelta(minutes=next(minutes))


@pytest.fixture
def store_file(tmp_path: Path, clock: Callable[[], datetime]) -> KeyStoreFile:
    return KeyStoreFile(tmp_path / "secrets" / "keys.json", clock=clock)


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def _leftovers(directory: Path) -> list[str]:
    return sorted(
        entry.name for entry in directory.iterdir() if entry.name.endswith(".tmp")
    )


def test_add_creates_directory_and_file_readable_by_owner_only(
    store_file: KeyStoreFile,
) -> None:
    issued = store_file.add("alice", "starter")

    assert _mode(store_file.path) == 0o600
    assert _mode(store_file.lock_path) == 0o600
    assert _leftovers(store_file.path.parent) == []
    store = store_file.read()
    assert store.find(issued.primary.encode()) == Subscription("alice", "starter")
    assert store.find(issued.secondary.encode()) == Subscription("alice", "starter")


def test_add_stores_digests_and_never_the_keys(store_file: KeyStoreFile) -> None:
    issued = store_file.add("alice", "starter")

    text = store_file.path.read_text()
    assert issued.primary not in text
    assert issued.secondary not in text
    assert _digest(issued.primary) in text
    assert _digest(issued.secondary) in text


def test_add_issues_two_distinct_keys_of_32_lowercase_hex(
    store_file: KeyStoreFile,
) -> None:
    issued = store_file.add("alice", "starter")

    for key in (issued.primary, issued.secondary):
        assert len(key) == 32
        assert set(key) <= set("0123456789abcdef")
    assert issued.primary != issued.secondary
    assert issued.primary not in repr(issued)


def test_add_declares_a_new_product_without_settings(store_file: KeyStoreFile) -> None:
    store_file.add("alice", "starter")

    assert store_file.read().products == {"starter": ProductSettings()}


def test_add_writes_the_documented_format(store_file: KeyStoreFile) -> None:
    store_file.add("alice", "starter", rate_limit=RateLimit(10, 1))

    document = json.loads(store_file.path.read_text())
    assert list(document) == ["version", "products", "subscriptions"]
    assert document["products"] == {"starter": {"rate_limit": None}}
    entry = document["subscriptions"][0]
    assert list(entry) == [
        "name",
        "product",
        "state",
        "primary_sha256",
        "secondary_sha256",
        "rate_limit",
        "created",
        "updated",
    ]
    assert entry["state"] == "active"
    assert entry["rate_limit"] == "10/1"
    assert entry["created"] == "2025-01-01T00:00:00Z"


def test_add_keeps_existing_subscriptions(store_file: KeyStoreFile) -> None:
    first = store_file.add("alice", "starter")
    store_file.add("bob", "starter")

    store = store_file.read()
    assert [record.name for record in store.subscriptions] == ["alice", "bob"]
    assert store.find(first.primary.encode()) is not None


def test_add_of_existing_name_is_refused_and_file_unchanged(
    store_file: KeyStoreFile,
) -> None:
    store_file.add("alice", "starter")
    before = store_file.path.read_bytes()

    with pytest.raises(KeyStoreError, match="'alice' already exists"):
        store_file.add("alice", "other")

    assert store_file.path.read_bytes() == before


def test_add_with_invalid_name_creates_nothing(store_file: KeyStoreFile) -> None:
    with pytest.raises(KeyStoreError, match="name must be 1 to 128"):
        store_file.add("../etc", "starter")

    assert not store_file.path.parent.exists()


def test_regenerated_key_replaces_only_that_key(store_file: KeyStoreFile) -> None:
    issued = store_file.add("alice", "starter")

    new_primary = store_file.regenerate("alice", "primary")

    store = store_file.read()
    assert store.find(issued.primary.encode()) is None
    assert store.find(new_primary.encode()) is not None
    assert store.find(issued.secondary.encode()) is not None
    alice = store.get("alice")
    assert alice is not None
    assert alice.updated > alice.created


def test_regenerate_secondary_leaves_primary_working(store_file: KeyStoreFile) -> None:
    issued = store_file.add("alice", "starter")

    new_secondary = store_file.regenerate("alice", "secondary")

    store = store_file.read()
    assert store.find(issued.secondary.encode()) is None
    assert store.find(new_secondary.encode()) is not None
    assert store.find(issued.primary.encode()) is not None


def test_regenerate_of_unknown_subscription_is_refused(
    store_file: KeyStoreFile,
) -> None:
    store_file.add("alice", "starter")

    with pytest.raises(KeyStoreError, match="No subscription named 'bob'"):
        store_file.regenerate("bob", "primary")


def test_suspended_then_activated_subscription_works_again(
    store_file: KeyStoreFile,
) -> None:
    issued = store_file.add("alice", "starter")

    assert store_file.suspend("alice") is True
    assert store_file.read().find(issued.primary.encode()) is None
    assert store_file.suspend("alice") is False
    assert store_file.activate("alice") is True
    assert store_file.read().find(issued.primary.encode()) is not None
    assert store_file.activate("alice") is False


def test_removed_subscription_is_gone(store_file: KeyStoreFile) -> None:
    issued = store_file.add("alice", "starter")

    store_file.remove("alice")

    store = store_file.read()
    assert store.get("alice") is None
    assert store.find(issued.primary.encode()) is None


def test_product_settings_apply_to_subscriptions_without_their_own(
    store_file: KeyStoreFile,
) -> None:
    issued = store_file.add("alice", "starter")

    store_file.set_product("starter", ProductSettings(RateLimit(3, 10)))

    found = store_file.read().find(issued.primary.encode())
    assert found == Subscription("alice", "starter", RateLimit(3, 10))


def test_change_to_missing_file_is_refused_and_creates_nothing(
    store_file: KeyStoreFile,
) -> None:
    with pytest.raises(KeyStoreError, match="does not exist"):
        store_file.suspend("alice")

    assert not store_file.path.exists()


@pytest.mark.parametrize(
    "change",
    [
        pytest.param(lambda f: f.add("bob", "starter"), id="add"),
        pytest.param(lambda f: f.regenerate("alice", "primary"), id="regenerate"),
        pytest.param(lambda f: f.suspend("alice"), id="suspend"),
        pytest.param(lambda f: f.remove("alice"), id="remove"),
        pytest.param(
            lambda f: f.set_product("starter", ProductSettings()), id="product"
        ),
    ],
)
def test_write_over_corrupt_file_is_refused_and_file_unchanged(
    store_file: KeyStoreFile, change: Callable[[KeyStoreFile], object]
) -> None:
    store_file.add("alice", "starter")
    corrupt = store_file.path.read_bytes()[:-20]
    store_file.path.write_bytes(corrupt)

    with pytest.raises(KeyStoreError, match="refusing to write over a corrupt"):
        change(store_file)

    assert store_file.path.read_bytes() == corrupt


def test_failed_replace_leaves_old_file_intact_and_no_temporary(
    store_file: KeyStoreFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_file.add("alice", "starter")
    before = store_file.path.read_bytes()

    def fail(source: str, target: str) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "replace", fail)
    with pytest.raises(KeyStoreError, match=r"Cannot write key store .*No space left"):
        store_file.add("bob", "starter")

    assert store_file.path.read_bytes() == before
    assert _leftovers(store_file.path.parent) == []


def test_failed_fsync_leaves_old_file_intact_and_no_temporary(
    store_file: KeyStoreFile, monkeypatch: pytest.MonkeyPatch
) -> None:
    store_file.add("alice", "starter")
    before = store_file.path.read_bytes()

    def fail(fd: int) -> None:
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(os, "fsync", fail)
    with pytest.raises(KeyStoreError, match="Input/output error"):
        store_file.suspend("alice")

    assert store_file.path.read_bytes() == before
    assert _leftovers(store_file.path.parent) == []


def test_write_tightens_a_loose_file_mode(store_file: KeyStoreFile) -> None:
    store_file.add("alice", "starter")
    store_file.path.chmod(0o644)

    store_file.suspend("alice")

    assert _mode(store_file.path) == 0o600


def test_write_through_symlink_keeps_the_link(
    store_file: KeyStoreFile, tmp_path: Path
) -> None:
    store_file.add("alice", "starter")
    link = tmp_path / "link.json"
    link.symlink_to(store_file.path)

    KeyStoreFile(link).add("bob", "starter")

    assert link.is_symlink()
    assert load_store(store_file.path).get("bob") is not None


def test_concurrent_writers_lose_no_update(store_file: KeyStoreFile) -> None:
    names = [f"sub-{index}" for index in range(8)]
    barrier = threading.Barrier(len(names))
    errors: list[BaseException] = []

    def add(name: str) -> None:
        barrier.wait()
        try:
            KeyStoreFile(store_file.path).add(name, "starter")
        except BaseException as err:  # reported below, in the test's own thread
            errors.append(err)

    threads = [threading.Thread(target=add, args=(name,)) for name in names]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()

    assert errors == []
    stored = {record.name for record in store_file.read().subscriptions}
    assert stored == set(names)


# --- the watcher ------------------------------------------------------------------


def test_watcher_on_missing_file_refuses_to_start_naming_the_setting(
    tmp_path: Path,
) -> None:
    with pytest.raises(KeyStoreError) as caught:
        KeyStoreWatcher(tmp_path / "absent.json")

    message = str(caught.value)
    assert message.startswith(f"{KEYS_FILE_ENV}: ")
    assert "does not exist" in message
    assert "keys add" in message


def test_watcher_on_corrupt_file_refuses_to_start_naming_the_setting(
    tmp_path: Path,
) -> None:
    path = tmp_path / "keys.json"
    path.write_text("{")

    with pytest.raises(KeyStoreError, match=f"^{KEYS_FILE_ENV}: .*not valid JSON"):
        KeyStoreWatcher(path)


@pytest.mark.parametrize("interval", [0.0, -1.0, float("nan"), float("inf")])
def test_watcher_with_bad_interval_is_refused(
    store_path: Path, interval: float
) -> None:
    with pytest.raises(ValueError, match="interval"):
        KeyStoreWatcher(store_path, interval=interval)


def test_watcher_reports_its_state(store_path: Path) -> None:
    before = datetime.now(UTC)

    watcher = KeyStoreWatcher(store_path)

    assert watcher.last_reload_ok is True
    assert watcher.last_error is None
    assert watcher.subscription_count == 3
    assert before <= watcher.loaded_at <= datetime.now(UTC)


def test_reload_now_picks_up_a_new_subscription(store_path: Path) -> None:
    watcher = KeyStoreWatcher(store_path)
    issued = KeyStoreFile(store_path).add("dave", "free")
    loaded_before = watcher.loaded_at

    assert watcher.reload_now() is True

    assert watcher.find(issued.primary.encode()) == Subscription("dave", "free")
    assert watcher.subscription_count == 4
    assert watcher.loaded_at >= loaded_before


def test_corrupt_reload_keeps_last_good_store_and_warns_once(
    store_path: Path, keys: dict[str, str], keys_caplog: pytest.LogCaptureFixture
) -> None:
    watcher = KeyStoreWatcher(store_path)
    _replace_text(store_path, '{"version": 1')

    assert watcher.reload_now() is False
    assert watcher.reload_now() is False

    assert watcher.last_reload_ok is False
    assert watcher.last_error is not None
    assert "not valid JSON" in watcher.last_error
    assert watcher.find(keys["alice1"].encode()) is not None
    assert len(_warnings(keys_caplog)) == 1
    assert "keeping the last good key store" in _warnings(keys_caplog)[0].getMessage()


def test_repaired_file_is_accepted_after_a_refused_one(
    store_path: Path, document: Document
) -> None:
    watcher = KeyStoreWatcher(store_path)
    _replace_text(store_path, "not json")
    watcher.reload_now()
    document["subscriptions"].pop()
    _replace_text(store_path, json.dumps(document))

    assert watcher.reload_now() is True

    assert watcher.last_reload_ok is True
    assert watcher.last_error is None
    assert watcher.subscription_count == 2


async def test_running_watcher_reloads_a_changed_file(store_path: Path) -> None:
    watcher = KeyStoreWatcher(store_path, interval=0.05)
    async with watcher:
        issued = KeyStoreFile(store_path).add("dave", "free")
        await _wait_for(lambda: watcher.find(issued.secondary.encode()) is not None)

    assert watcher.subscription_count == 4


async def test_running_watcher_stops_accepting_a_suspended_key(
    store_path: Path, keys: dict[str, str]
) -> None:
    key = keys["alice1"].encode()
    watcher = KeyStoreWatcher(store_path, interval=0.05)
    async with watcher:
        KeyStoreFile(store_path).suspend("alice")
        await _wait_for(lambda: watcher.find(key) is None)


async def test_running_watcher_warns_once_about_a_corrupt_file(
    store_path: Path,
    keys: dict[str, str],
    keys_caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    polls = _count_calls(monkeypatch, "_stat_signature")
    watcher = KeyStoreWatcher(store_path, interval=0.05)
    async with watcher:
        _replace_text(store_path, "[1, 2")
        await _wait_for(lambda: not watcher.last_reload_ok)
        seen = polls[0]
        await _wait_for(lambda: polls[0] >= seen + 3)

    assert len(_warnings(keys_caplog)) == 1
    assert watcher.find(keys["alice2"].encode()) is not None


async def test_running_watcher_keeps_last_good_store_when_file_disappears(
    store_path: Path,
    document: Document,
    keys: dict[str, str],
    keys_caplog: pytest.LogCaptureFixture,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    polls = _count_calls(monkeypatch, "_stat_signature")
    watcher = KeyStoreWatcher(store_path, interval=0.05)
    async with watcher:
        store_path.unlink()
        await _wait_for(lambda: not watcher.last_reload_ok)
        seen = polls[0]
        await _wait_for(lambda: polls[0] >= seen + 3)
        assert watcher.find(keys["alice1"].encode()) is not None
        assert len(_warnings(keys_caplog)) == 1
        assert "missing or unreadable" in _warnings(keys_caplog)[0].getMessage()

        _replace_text(store_path, json.dumps(document))
        await _wait_for(lambda: watcher.last_reload_ok)


async def test_running_watcher_does_not_reread_an_unchanged_file(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    polls = _count_calls(monkeypatch, "_stat_signature")
    reads = _count_calls(monkeypatch, "_read_store")
    watcher = KeyStoreWatcher(store_path, interval=0.05)
    async with watcher:
        await _wait_for(lambda: polls[0] >= 3)

    assert reads[0] == 1  # the load at construction


async def test_closed_watcher_stops_polling(
    store_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    polls = _count_calls(monkeypatch, "_stat_signature")
    watcher = KeyStoreWatcher(store_path, interval=0.01)
    await watcher.start()
    await _wait_for(lambda: polls[0] >= 1)

    await watcher.close()
    await watcher.close()

    stopped_at = polls[0]
    await asyncio.sleep(0.05)
    assert polls[0] == stopped_at


async def test_watcher_started_twice_is_refused(store_path: Path) -> None:
    watcher = KeyStoreWatcher(store_path, interval=0.05)
    async with watcher:
        with pytest.raises(RuntimeError, match="already started"):
            await watcher.start()


def _count_calls(monkeypatch: pytest.MonkeyPatch, name: str) -> list[int]:
    """Wrap a keystore function; the returned one-item list counts its calls."""
    count = [0]
    original = getattr(keystore, name)

    def counting(*args: Any) -> Any:
        count[0] += 1
        return original(*args)

    monkeypatch.setattr(keystore, name, counting)
    return count
