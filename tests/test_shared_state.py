"""Replicas sharing Redis: one JWKS fetch, fleet-wide revocation, outages survived."""

from __future__ import annotations

import asyncio
import hashlib
import logging
import secrets
import shutil
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import orjson
import pytest
import pytest_asyncio

from service.appkeys import JWKS
from service.idp import LocalIdentityProvider
from service.keystore import KeyStoreFile, SubscriptionState, load_store
from service.logging_security import SECRET_MARKER, ScrubbingFilter, forget_secret
from service.settings import Settings, SettingsError
from service.shared_store import (
    CacheUrl,
    CacheUrlError,
    CircuitBreaker,
    build_shared_store,
)
from tests.conftest import AppClient, Credentials, MakeClient, auth_headers
from tests.redis_proxy import (
    Fleet,
    ProxyMode,
    RedisProxy,
    new_prefix,
    read_everything,
    redis_client,
    require_redis,
)
from validators import RateLimit

REALM = 'Bearer realm="rag-api"'
REDIS_URL = "redis://127.0.0.1:6379/0"


# -- CACHE_URL ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("memory://", CacheUrl("memory")),
        ("redis://cache", CacheUrl("redis", host="cache")),
        (
            "redis://127.0.0.1:6380/2",
            CacheUrl("redis", host="127.0.0.1", port=6380, db=2),
        ),
        (
            "rediss://:p%40ss%3Aword@cache.example:6380/1",
            CacheUrl("rediss", "cache.example", 6380, 1, None, "p@ss:word"),
        ),
        (
            "redis://svc:pw@[::1]:6379/0",
            CacheUrl("redis", "::1", 6379, 0, "svc", "pw"),
        ),
    ],
)
def test_cache_url_forms_are_parsed(text: str, expected: CacheUrl) -> None:
    assert CacheUrl.parse(text) == expected


@pytest.mark.parametrize(
    "text",
    [
        "memcached://cache:11211",
        "http://:hunter2-secret@cache:6379",
        "redis://:hunter2-secret@",
        "redis://:hunter2-secret@cache:port/0",
        "redis://:hunter2-secret@cache:0/0",
        "redis://:hunter2-secret@cache:6379/²",
        "redis://:hunter2-secret@cache:6379/db",
        "redis://:hunter2-secret@cache:6379/0?ssl_cert_reqs=none",
        "memory://somewhere",
    ],
)
def test_malformed_cache_url_is_refused_without_echoing_it(text: str) -> None:
    with pytest.raises(CacheUrlError) as caught:
        CacheUrl.parse(text)

    assert "hunter2" not in str(caught.value)


def test_cache_url_password_stays_out_of_settings_output(tmp_path: Path) -> None:
    settings = Settings.from_env(
        {
            "ENTRA_TENANT_ID": "00000000-0000-4000-8000-000000000001",
            "ENTRA_AUDIENCES": "api://test",
            "APIM_SUBSCRIPTION_KEYS_FILE": str(tmp_path / "keys.json"),
            "CACHE_URL": "rediss://svc:hunter2-secret@cache.example:6380/1",
        }
    )

    assert "hunter2" not in repr(settings)
    assert "hunter2" not in str(settings.redacted())
    assert settings.redacted()["CACHE_URL"] == "rediss://svc:***@cache.example:6380/1"
    assert "hunter2" not in CacheUrl.parse(settings.cache_url).redacted()
    assert "hunter2" not in repr(CacheUrl.parse(settings.cache_url))


def test_cache_url_password_is_scrubbed_from_logs_by_its_exact_value(
    tmp_path: Path,
) -> None:
    password = f"pw-{secrets.token_hex(8)}"
    settings = Settings.from_env(
        {
            "ENTRA_TENANT_ID": "00000000-0000-4000-8000-000000000001",
            "ENTRA_AUDIENCES": "api://test",
            "APIM_SUBSCRIPTION_KEYS_FILE": str(tmp_path / "keys.json"),
            "CACHE_URL": f"redis://:{password}@127.0.0.1:6379/0",
        }
    )
    scrubber = ScrubbingFilter()
    record = logging.LogRecord("x", logging.ERROR, "", 0, "auth %s", (password,), None)
    scrubber.filter(record)
    # Alone in a message it matches no pattern: only its exact value gives it away.
    assert password in record.getMessage()

    build_shared_store(settings)
    try:
        record = logging.LogRecord(
            "x", logging.ERROR, "", 0, "auth %s", (password,), None
        )
        scrubber.filter(record)
        assert password not in record.getMessage()
        assert SECRET_MARKER in record.getMessage()
    finally:
        forget_secret(password)


def test_malformed_cache_url_setting_names_the_variable_not_the_password() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(
            {
                "ENTRA_TENANT_ID": "00000000-0000-4000-8000-000000000001",
                "ENTRA_AUDIENCES": "api://test",
                "APIM_SUBSCRIPTION_KEYS_FILE": "/nonexistent/keys.json",
                "CACHE_URL": "redis://:hunter2-secret@cache:notaport/0",
            }
        )

    assert caught.value.name == "CACHE_URL"
    assert "hunter2" not in str(caught.value)


# -- the circuit breaker -----------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_breaker_opens_only_after_failures_in_a_row() -> None:
    breaker = CircuitBreaker(failure_threshold=3, monotonic=_Clock())
    breaker.failed("Redis did not answer in time (TimeoutError)")
    breaker.failed("Redis did not answer in time (TimeoutError)")
    breaker.succeeded()
    breaker.failed("Redis did not answer in time (TimeoutError)")
    breaker.failed("Redis did not answer in time (TimeoutError)")
    assert breaker.status()["breaker"] == "closed"
    assert breaker.allow()

    breaker.failed("Redis did not answer in time (TimeoutError)")

    assert breaker.status()["breaker"] == "open"
    assert not breaker.allow()
    assert breaker.status()["reason"] == "Redis did not answer in time (TimeoutError)"


def test_open_breaker_lets_one_probe_through_after_the_backoff() -> None:
    clock = _Clock()
    breaker = CircuitBreaker(
        failure_threshold=1, backoff_initial=1.0, backoff_max=8.0, monotonic=clock
    )
    breaker.failed("Redis is unreachable (ConnectionError)")
    assert not breaker.allow()
    clock.now += 1.0

    assert breaker.allow()
    assert breaker.status()["breaker"] == "half-open"
    assert not breaker.allow()
    breaker.failed("Redis is unreachable (ConnectionError)")
    clock.now += 0.9
    # The delay doubled (2 s, jittered down to no less than half).
    assert not breaker.allow()
    clock.now += 1.1
    assert breaker.allow()
    breaker.succeeded()
    assert breaker.status()["breaker"] == "closed"
    assert breaker.allow()


def test_backoff_stops_growing_at_its_maximum() -> None:
    clock = _Clock()
    breaker = CircuitBreaker(
        failure_threshold=1, backoff_initial=1.0, backoff_max=4.0, monotonic=clock
    )
    for _ in range(20):
        breaker.failed("Redis is unreachable (ConnectionError)")
        clock.now += 4.0
        assert breaker.allow()

    assert breaker.status()["consecutive_failures"] == 20


def test_breaker_warns_once_per_outage(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO)
    clock = _Clock()
    breaker = CircuitBreaker(failure_threshold=1, monotonic=clock)
    for _outage in range(2):
        for _ in range(5):
            clock.now += 60
            assert breaker.allow()
            breaker.failed("Redis is unreachable (ConnectionError)")
        clock.now += 60
        assert breaker.allow()
        breaker.succeeded()

    warnings = [r for r in caplog.records if r.msg == "shared_store.unavailable"]
    recoveries = [r for r in caplog.records if r.msg == "shared_store.recovered"]
    assert [r.levelno for r in warnings] == [logging.WARNING, logging.WARNING]
    assert len(recoveries) == 2


# -- fixtures and helpers for the Redis tests --------------------------------------


@pytest_asyncio.fixture
async def fleet(make_client: MakeClient) -> AsyncIterator[Fleet]:
    require_redis()
    replicas = Fleet(make_client, new_prefix())
    yield replicas
    await replicas.close()


@pytest_asyncio.fixture
async def proxy() -> AsyncIterator[RedisProxy]:
    require_redis()
    async with RedisProxy() as running:
        yield running


async def _get(
    client: AppClient, token: str, key: str, path: str = "/api/v2/whoami"
) -> Any:
    return await client.get(path, headers=auth_headers(token, key))


async def _health(client: AppClient, token: str, key: str) -> dict[str, Any]:
    response = await _get(client, token, key, "/api/v2/health")
    assert response.status == 200
    body: dict[str, Any] = await response.json()
    return body


async def _eventually(
    check: Callable[[], Awaitable[bool]], *, seconds: float = 15.0
) -> None:
    deadline = time.monotonic() + seconds
    while not await check():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.05)


async def _assert_key_refused(response: Any) -> None:
    body = await response.json()
    assert response.status == 401
    assert body["code"] == "SubscriptionKeyInvalid"
    assert response.headers["WWW-Authenticate"] == REALM


def _replica_file(key_store: Credentials, tmp_path: Path, name: str) -> Path:
    """A second replica's own key store: a copy, with the same modification time."""
    path = tmp_path / name / "keys.json"
    path.parent.mkdir()
    shutil.copy2(key_store.store.path, path)
    return path


async def _replica(
    fleet: Fleet, keys_file: Path | None = None, **changes: Any
) -> AppClient:
    if keys_file is not None:
        changes["subscription_keys_file"] = keys_file
    client: AppClient = await fleet.replica(
        cache_url=changes.pop("cache_url", REDIS_URL),
        subscription_sync_seconds=0.1,
        # Roomier than production's 0.25 s: on a loaded test machine a slow
        # reply must not pass for an outage. Outages here are real ones.
        **{"cache_timeout_seconds": 0.5, "cache_connect_timeout_seconds": 0.5}
        | changes,
    )
    return client


# -- one JWKS fetch for the fleet --------------------------------------------------


async def test_two_replicas_sharing_redis_fetch_the_signing_keys_once(
    idp: LocalIdentityProvider,
    key_store: Credentials,
    fleet: Fleet,
) -> None:
    first = await _replica(fleet)
    token = idp.mint_token()
    assert (await _get(first, token, key_store.primary)).status == 200

    second = await _replica(fleet)
    response = await _get(second, token, key_store.primary)

    assert response.status == 200
    assert idp.hits["discovery"] == 1
    assert idp.hits["jwks"] == 1
    assert second.app[JWKS].fetches[("shared", "ok")] == 1


# -- subscription state across replicas --------------------------------------------


async def test_key_suspended_through_one_replica_is_refused_by_the_other(
    idp: LocalIdentityProvider,
    key_store: Credentials,
    fleet: Fleet,
    tmp_path: Path,
) -> None:
    other_file = _replica_file(key_store, tmp_path, "other")
    await _replica(fleet)
    other = await _replica(fleet, other_file)
    token = idp.mint_token()
    assert (await _get(other, token, key_store.primary)).status == 200

    key_store.store.suspend(key_store.name)

    async def refused() -> bool:
        return bool((await _get(other, token, key_store.primary)).status == 401)

    await _eventually(refused, seconds=5)
    await _assert_key_refused(await _get(other, token, key_store.secondary))
    # The other replica's own file still says active: this came through Redis.
    record = load_store(other_file).get(key_store.name)
    assert record is not None and record.state is SubscriptionState.ACTIVE


async def test_regenerated_key_stops_working_on_the_other_replica(
    idp: LocalIdentityProvider,
    key_store: Credentials,
    fleet: Fleet,
    tmp_path: Path,
) -> None:
    other_file = _replica_file(key_store, tmp_path, "other")
    first = await _replica(fleet)
    other = await _replica(fleet, other_file)
    token = idp.mint_token()

    new_primary = key_store.store.regenerate(key_store.name, "primary")

    async def old_key_refused() -> bool:
        return bool((await _get(other, token, key_store.primary)).status == 401)

    await _eventually(old_key_refused, seconds=5)
    await _assert_key_refused(await _get(other, token, key_store.primary))
    assert (await _get(other, token, key_store.secondary)).status == 200
    assert (await _get(first, token, new_primary)).status == 200
    # Shared state only takes access away: the new key works on a replica once
    # that replica's own file has it.
    await _assert_key_refused(await _get(other, token, new_primary))


async def test_replica_started_with_an_older_file_adopts_the_fleets_revocation(
    idp: LocalIdentityProvider,
    key_store: Credentials,
    fleet: Fleet,
    tmp_path: Path,
) -> None:
    stale_file = _replica_file(key_store, tmp_path, "stale")
    first = await _replica(fleet)
    token = idp.mint_token()
    key_store.store.suspend(key_store.name)
    await _eventually(
        lambda: _shared_state_says(fleet.prefix, key_store.name, "suspended")
    )

    late = await _replica(fleet, stale_file)

    await _assert_key_refused(await _get(late, token, key_store.primary))
    # Starting with the older file did not roll the shared state back.
    await _assert_key_refused(await _get(first, token, key_store.primary))


async def _shared_state_says(prefix: str, name: str, state: str) -> bool:
    client = redis_client()
    try:
        document = await client.hget(f"{prefix}:rag-api:subscriptions:state", "doc")
    finally:
        await client.aclose()
    if not isinstance(document, bytes):
        return False
    entries = orjson.loads(document)["subscriptions"]
    return any(e["name"] == name and e["state"] == state for e in entries)


async def _write_shared_state(
    prefix: str, entries: list[dict[str, str]], written_at_us: int
) -> None:
    client = redis_client()
    try:
        await client.hset(
            f"{prefix}:rag-api:subscriptions:state",
            mapping={
                "written_at_us": str(written_at_us),
                "doc": orjson.dumps({"format": 1, "subscriptions": entries}),
            },
        )
        await client.incr(f"{prefix}:rag-api:subscriptions:version")
    finally:
        await client.aclose()


def _entry(name: str, state: str, primary: str, secondary: str) -> dict[str, str]:
    return {
        "name": name,
        "state": state,
        "primary_sha256": hashlib.sha256(primary.encode()).hexdigest(),
        "secondary_sha256": hashlib.sha256(secondary.encode()).hexdigest(),
    }


async def test_shared_state_written_into_redis_cannot_grant_access(
    idp: LocalIdentityProvider,
    key_store: Credentials,
    fleet: Fleet,
) -> None:
    suspended = key_store.store.add("dormant", "starter")
    key_store.store.suspend("dormant")
    replica = await _replica(fleet)
    token = idp.mint_token()
    invented = "1" * 32
    await _write_shared_state(
        fleet.prefix,
        [
            _entry(key_store.name, "active", key_store.primary, key_store.secondary),
            _entry("dormant", "active", suspended.primary, suspended.secondary),
            _entry("invented", "active", invented, "2" * 32),
        ],
        written_at_us=int(time.time() * 1e6),
    )

    async def adopted() -> bool:
        health = await _health(replica, token, key_store.primary)
        return bool(health["sharedStore"]["subscriptions"]["shared_state_in_force"])

    await _eventually(adopted)
    await _assert_key_refused(await _get(replica, token, suspended.primary))
    await _assert_key_refused(await _get(replica, token, invented))
    assert (await _get(replica, token, key_store.primary)).status == 200


async def test_shared_state_stamped_in_the_future_is_ignored(
    idp: LocalIdentityProvider,
    key_store: Credentials,
    fleet: Fleet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    replica = await _replica(fleet)
    token = idp.mint_token()
    tomorrow = int((time.time() + 86400) * 1e6)
    await _write_shared_state(
        fleet.prefix,
        [_entry(key_store.name, "suspended", key_store.primary, key_store.secondary)],
        written_at_us=tomorrow,
    )

    async def noticed() -> bool:
        health = await _health(replica, token, key_store.primary)
        return health["sharedStore"]["subscriptions"]["problem"] is not None

    await _eventually(noticed)
    assert (await _get(replica, token, key_store.primary)).status == 200
    ignored = [
        r for r in caplog.records if r.msg == "subscriptions.shared_state_ignored"
    ]
    assert len(ignored) == 1


# -- Redis going away --------------------------------------------------------------


def _shared_store_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.msg == "shared_store.unavailable"]


def _remaining(response: Any) -> int:
    return int(response.headers["RateLimit-Remaining"])


@pytest.mark.parametrize("outage", [ProxyMode.REFUSE, ProxyMode.BLACK_HOLE])
async def test_redis_outage_keeps_auth_working_and_limits_per_replica(
    idp: LocalIdentityProvider,
    key_store: Credentials,
    fleet: Fleet,
    proxy: RedisProxy,
    caplog: pytest.LogCaptureFixture,
    tmp_path: Path,
    outage: ProxyMode,
) -> None:
    caplog.set_level(logging.INFO)
    metered = key_store.store.add("metered", "starter", rate_limit=RateLimit(5, 60))
    revoked = key_store.store.add("revoked", "starter")
    other_file = _replica_file(key_store, tmp_path, "other")
    first = await _replica(fleet, cache_url=proxy.url())
    second = await _replica(fleet, other_file, cache_url=proxy.url())
    token = idp.mint_token()
    assert [
        _remaining(await _get(first, token, metered.primary)) for _ in range(2)
    ] == [
        4,
        3,
    ]
    KeyStoreFile(key_store.store.path).suspend("revoked")

    async def revocation_shared() -> bool:
        return bool((await _get(second, token, revoked.primary)).status == 401)

    await _eventually(revocation_shared)
    assert (await _health(first, token, key_store.primary))["status"] == "ok"

    await proxy.set_mode(outage)

    # Authentication carries on from what each replica knows...
    assert (await _get(first, token, key_store.primary)).status == 200
    assert (await _get(second, token, key_store.primary)).status == 200
    await _assert_key_refused(await _get(second, token, revoked.primary))
    # ...the limit is kept by each replica alone, the first carrying on from
    # the count Redis last gave it...
    during = [await _get(first, token, metered.primary) for _ in range(4)]
    assert [r.status for r in during] == [200, 200, 200, 429]
    assert [_remaining(r) for r in during] == [2, 1, 0, 0]
    assert _remaining(await _get(second, token, metered.primary)) == 4
    # ...and health says so, with the reason.
    health = await _health(first, token, key_store.primary)
    assert health["status"] == "degraded"
    assert health["sharedStore"]["state"] == "degraded"
    assert health["sharedStore"]["reason"].startswith("Redis")
    assert health["rateLimits"]["counting"] == "per-replica"

    async def probed_again(client: AppClient) -> bool:
        body = await _health(client, token, key_store.primary)
        return bool(body["sharedStore"]["consecutive_failures"] >= 3)

    await _eventually(lambda: probed_again(first))
    await _eventually(lambda: probed_again(second))
    # One warning per replica for the whole outage: not one per request, nor
    # one per reconnection attempt.
    assert len(_shared_store_warnings(caplog)) == 2

    await proxy.set_mode(ProxyMode.PASS)

    async def recovered(client: AppClient) -> bool:
        body = await _health(client, token, key_store.primary)
        return bool(body["status"] == "ok")

    await _eventually(lambda: recovered(first), seconds=30)
    await _eventually(lambda: recovered(second), seconds=30)
    # Counting is shared again: Redis still holds the two calls from before.
    assert _remaining(await _get(second, token, metered.primary)) == 2
    assert len(_shared_store_warnings(caplog)) == 2


async def test_redis_closing_connections_mid_run_falls_back_and_recovers(
    idp: LocalIdentityProvider,
    key_store: Credentials,
    fleet: Fleet,
    proxy: RedisProxy,
) -> None:
    metered = key_store.store.add("metered", "starter", rate_limit=RateLimit(50, 60))
    replica = await _replica(fleet, cache_url=proxy.url())
    token = idp.mint_token()
    assert (await _get(replica, token, metered.primary)).status == 200

    await proxy.set_mode(ProxyMode.CLOSE)
    responses = [await _get(replica, token, metered.primary) for _ in range(5)]
    await proxy.set_mode(ProxyMode.PASS)

    assert [r.status for r in responses] == [200] * 5
    assert [_remaining(r) for r in responses] == [48, 47, 46, 45, 44]

    async def recovered() -> bool:
        body = await _health(replica, token, key_store.primary)
        return bool(body["sharedStore"]["state"] == "ok")

    await _eventually(recovered, seconds=30)


async def test_redis_refusing_the_credentials_never_shows_the_password(
    idp: LocalIdentityProvider,
    key_store: Credentials,
    fleet: Fleet,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    url = "redis://nobody:hunter2-canary@127.0.0.1:6379/0"
    replica = await _replica(fleet, cache_url=url)
    token = idp.mint_token()

    async def degraded() -> bool:
        health = await _health(replica, token, key_store.primary)
        return bool(health["sharedStore"]["state"] == "degraded")

    await _eventually(degraded)
    response = await _get(replica, token, key_store.primary, "/api/v2/health")
    text = await response.text()

    assert "refused the credentials" in text
    assert "nobody:***@127.0.0.1:6379/0" in text
    assert "hunter2" not in text
    assert "hunter2" not in caplog.text
    assert all("hunter2" not in str(r.__dict__) for r in caplog.records)


# -- what Redis holds --------------------------------------------------------------


async def test_redis_holds_no_raw_key_token_or_address(
    idp: LocalIdentityProvider,
    key_store: Credentials,
    fleet: Fleet,
) -> None:
    metered = key_store.store.add("metered", "starter", rate_limit=RateLimit(5, 60))
    # Health is polled with a key of its own, so the polls count against no limit.
    observer = key_store.store.add("observer", "starter").primary
    first = await _replica(fleet, auth_failure_limit=RateLimit(3, 60))
    second = await _replica(fleet)
    token = idp.mint_token()
    guessed = "f" * 32
    for client in (first, second):
        assert (await _get(client, token, metered.primary)).status == 200
        assert (await _get(client, token, key_store.secondary)).status == 200
        assert (await _get(client, token, guessed)).status == 401
    key_store.store.suspend(key_store.name)
    await _eventually(
        lambda: _shared_state_says(fleet.prefix, key_store.name, "suspended")
    )

    contents = await read_everything(fleet.prefix)

    kinds = {key.decode().split(":")[2] for key in contents}
    assert {"jwks", "ratelimit", "auth-failures", "subscriptions"} <= kinds
    secrets = [
        key_store.primary,
        key_store.secondary,
        metered.primary,
        metered.secondary,
        observer,
        guessed,
        token,
        *(part for part in token.split(".")[1:]),
    ]
    for name, value in contents.items():
        for secret in secrets:
            assert secret.encode() not in name
            assert secret.encode() not in value
        if b":jwks:" not in name:
            # The JWKS copy names the IdP's URL; nothing else holds an address.
            assert b"127.0.0.1" not in name + value
