"""Rate limits per subscription and the failed-authentication throttle, end to end."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio

from service.idp import LocalIdentityProvider
from service.keystore import ProductSettings
from service.rate_limit import (
    AUTH_THROTTLE,
    RATE_LIMITER,
    LocalCounter,
    WindowCount,
    client_bucket,
)
from service.settings import Settings, SettingsError
from tests.conftest import AppClient, Credentials, MakeClient, auth_headers
from tests.redis_proxy import Fleet, new_prefix, redis_client, require_redis
from validators import RateLimit

REALM = 'Bearer realm="rag-api"'
WRONG_KEY = "0" * 32


def _limited(key_store: Credentials, name: str, calls: int, seconds: int) -> str:
    """A subscription with its own limit; returns its primary key."""
    issued = key_store.store.add(name, "starter", rate_limit=RateLimit(calls, seconds))
    return issued.primary


async def _call(client: AppClient, token: str, key: str, **headers: str) -> Any:
    return await client.get(
        "/api/v2/whoami", headers={**auth_headers(token, key), **headers}
    )


async def _assert_rejected(
    response: Any, status: int, code: str, challenge: str | None
) -> dict[str, Any]:
    """Status, body code and ``WWW-Authenticate`` (``None``: must be absent)."""
    body: dict[str, Any] = await response.json()
    assert response.status == status
    assert body["statusCode"] == status
    assert body["code"] == code
    www = response.headers.get("WWW-Authenticate")
    if challenge is None:
        assert www is None
    elif challenge == "":
        assert www == REALM
    else:
        assert www is not None and www.startswith(f'{REALM}, error="{challenge}"')
    return body


def _usage(response: Any) -> tuple[int, int, int]:
    headers = response.headers
    return (
        int(headers["RateLimit-Limit"]),
        int(headers["RateLimit-Remaining"]),
        int(headers["RateLimit-Reset"]),
    )


# -- per-subscription limits (in memory) -----------------------------------------


async def test_calls_within_the_limit_pass_and_count_down_the_headers(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    key = _limited(key_store, "metered", 3, 60)
    client = await make_client()
    token = idp.mint_token()

    responses = [await _call(client, token, key) for _ in range(3)]

    assert [r.status for r in responses] == [200, 200, 200]
    usages = [_usage(r) for r in responses]
    assert [(limit, remaining) for limit, remaining, _ in usages] == [
        (3, 2),
        (3, 1),
        (3, 0),
    ]
    assert all(1 <= reset <= 60 for _, _, reset in usages)


async def test_call_over_the_subscription_limit_gets_429_with_retry_after(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    key = _limited(key_store, "metered", 2, 60)
    client = await make_client()
    token = idp.mint_token()
    for _ in range(2):
        assert (await _call(client, token, key)).status == 200

    response = await _call(client, token, key)

    body = await _assert_rejected(response, 429, "RateLimitExceeded", None)
    retry_after = int(response.headers["Retry-After"])
    assert 1 <= retry_after <= 60
    assert body["message"] == (
        f"Rate limit is exceeded. Try again in {retry_after} seconds."
    )
    assert _usage(response) == (2, 0, retry_after)
    assert response.headers["Cache-Control"] == "no-store"


async def test_product_limit_applies_to_a_subscription_without_its_own(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    key_store.store.set_product("basic", ProductSettings(rate_limit=RateLimit(1, 30)))
    key = key_store.store.add("on-basic", "basic").primary
    client = await make_client()
    token = idp.mint_token()

    first = await _call(client, token, key)
    second = await _call(client, token, key)

    assert first.status == 200
    assert _usage(first)[:2] == (1, 0)
    await _assert_rejected(second, 429, "RateLimitExceeded", None)


async def test_subscription_without_a_limit_gets_no_ratelimit_headers(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    response = await _call(client, idp.mint_token(), key_store.primary)

    assert response.status == 200
    assert "RateLimit-Limit" not in response.headers
    assert "RateLimit-Remaining" not in response.headers


async def test_limits_are_counted_per_subscription(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    first = _limited(key_store, "first", 1, 60)
    second = _limited(key_store, "second", 1, 60)
    client = await make_client()
    token = idp.mint_token()
    assert (await _call(client, token, first)).status == 200
    assert (await _call(client, token, first)).status == 429

    response = await _call(client, token, second)

    assert response.status == 200
    assert _usage(response)[:2] == (1, 0)


async def test_call_with_a_bad_token_counts_and_its_401_carries_the_headers(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    key = _limited(key_store, "metered", 2, 60)
    client = await make_client()
    expired = idp.mint_token(lifetime=-600)

    response = await _call(client, expired, key)

    await _assert_rejected(response, 401, "TokenExpired", "invalid_token")
    assert _usage(response)[:2] == (2, 1)


async def test_over_the_limit_a_forged_token_is_refused_before_verification(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    # The limit is checked before the token: an exhausted subscription learns
    # nothing about its tokens and costs no signature check.
    key = _limited(key_store, "metered", 1, 60)
    client = await make_client()
    assert (await _call(client, idp.mint_token(), key)).status == 200
    forged = idp.mint_token()[:-8] + "AAAAAAAA"

    response = await _call(client, forged, key)

    await _assert_rejected(response, 429, "RateLimitExceeded", None)


async def test_request_without_a_key_gets_no_ratelimit_headers(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    _limited(key_store, "metered", 5, 60)
    client = await make_client()
    headers = {"Authorization": f"Bearer {idp.mint_token()}"}

    response = await client.get("/api/v2/whoami", headers=headers)

    await _assert_rejected(response, 401, "SubscriptionKeyNotFound", "")
    assert "RateLimit-Limit" not in response.headers


# -- the local counter -------------------------------------------------------------


class _Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_local_counter_renews_its_period_when_it_ends() -> None:
    clock = _Clock()
    counter = LocalCounter(monotonic=clock)
    assert counter.hit("k", 10_000) == WindowCount(1, 10_000)
    clock.now += 4
    assert counter.hit("k", 10_000) == WindowCount(2, 6_000)
    clock.now += 6

    assert counter.hit("k", 10_000) == WindowCount(1, 10_000)


def test_local_counter_carries_on_from_the_last_count_redis_reported() -> None:
    clock = _Clock()
    counter = LocalCounter(monotonic=clock)
    counter.observe("k", WindowCount(7, 30_000))

    assert counter.hit("k", 60_000) == WindowCount(8, 30_000)


def test_local_counter_stays_bounded_under_a_flood_of_keys() -> None:
    counter = LocalCounter(max_entries=100, monotonic=_Clock())
    for index in range(1000):
        counter.hit(f"client-{index}", 60_000)

    assert len(counter) == 100
    assert counter.hit("client-999", 60_000).count == 2


# -- failed-authentication throttle ------------------------------------------------


async def test_client_over_the_failure_limit_gets_429_before_any_other_work(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    key = _limited(key_store, "metered", 100, 60)
    client = await make_client(auth_failure_limit=RateLimit(3, 60))
    token = idp.mint_token()
    assert (await _call(client, token, key)).status == 200
    for _ in range(3):
        response = await _call(client, token, WRONG_KEY)
        await _assert_rejected(response, 401, "SubscriptionKeyInvalid", "")

    responses = [await _call(client, token, key) for _ in range(3)]

    for response in responses:
        body = await _assert_rejected(response, 429, "TooManyFailedAttempts", None)
        assert body["message"][:1].isupper()
        assert 1 <= int(response.headers["Retry-After"]) <= 60
        assert "RateLimit-Limit" not in response.headers
    # No other work: the subscription's counter saw only the first call.
    limiter = client.app[RATE_LIMITER].status()
    assert limiter["local_hits"] == 1
    assert client.app[AUTH_THROTTLE].status()["requests_refused"] == 3


async def test_bad_tokens_with_a_valid_key_do_not_throttle_the_address(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(auth_failure_limit=RateLimit(3, 60))
    expired = idp.mint_token(lifetime=-600)
    for _ in range(6):
        response = await _call(client, expired, key_store.primary)
        await _assert_rejected(response, 401, "TokenExpired", "invalid_token")

    response = await _call(client, idp.mint_token(), key_store.primary)

    assert response.status == 200


async def test_failure_throttle_set_to_zero_never_throttles(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(auth_failure_limit=None)
    token = idp.mint_token()
    for _ in range(60):
        response = await _call(client, token, WRONG_KEY)
        await _assert_rejected(response, 401, "SubscriptionKeyInvalid", "")

    assert (await _call(client, token, key_store.primary)).status == 200


async def test_last_forwarded_hop_is_the_client_behind_a_trusted_proxy(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(
        auth_failure_limit=RateLimit(2, 60), trusted_proxies=("127.0.0.0/8",)
    )
    token = idp.mint_token()
    for _ in range(2):
        await _call(client, token, WRONG_KEY, **{"X-Forwarded-For": "198.51.100.7"})

    # The guesser cannot escape by prepending hops of its choosing...
    spoofed = await _call(
        client,
        token,
        key_store.primary,
        **{"X-Forwarded-For": "203.0.113.9, 198.51.100.7"},
    )
    # ...and a neighbour behind the same proxy is not locked out.
    neighbour = await _call(
        client, token, key_store.primary, **{"X-Forwarded-For": "198.51.100.8"}
    )

    await _assert_rejected(spoofed, 429, "TooManyFailedAttempts", None)
    assert neighbour.status == 200


async def test_forwarded_for_from_an_untrusted_peer_is_ignored(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(auth_failure_limit=RateLimit(2, 60))
    token = idp.mint_token()
    for index in range(2):
        forwarded = {"X-Forwarded-For": f"198.51.100.{index}"}
        await _call(client, token, WRONG_KEY, **forwarded)

    response = await _call(
        client, token, key_store.primary, **{"X-Forwarded-For": "192.0.2.1"}
    )

    await _assert_rejected(response, 429, "TooManyFailedAttempts", None)


@pytest.mark.parametrize(
    ("address", "bucket"),
    [
        ("198.51.100.7", "198.51.100.7"),
        ("2001:db8:1:2:3:4:5:6", "2001:db8:1:2::/64"),
        ("2001:db8:1:2:ffff::1", "2001:db8:1:2::/64"),
        ("::ffff:198.51.100.7", "198.51.100.7"),
        ("not-an-address", "unknown"),
        ("", "unknown"),
    ],
)
def test_clients_are_counted_by_address_and_ipv6_by_its_64(
    address: str, bucket: str
) -> None:
    assert client_bucket(address) == bucket


# -- settings ----------------------------------------------------------------------


def _env(**values: str) -> dict[str, str]:
    return {
        "ENTRA_TENANT_ID": "00000000-0000-4000-8000-000000000001",
        "ENTRA_AUDIENCES": "api://test",
        "APIM_SUBSCRIPTION_KEYS_FILE": "/nonexistent/keys.json",
        **values,
    }


@pytest.mark.parametrize(
    ("text", "limit"),
    [
        ("", RateLimit(50, 60)),
        ("10/30", RateLimit(10, 30)),
        ("0", None),
        ("off", None),
    ],
)
def test_auth_failure_limit_is_read_from_the_environment(
    text: str, limit: RateLimit | None
) -> None:
    settings = Settings.from_env(_env(AUTH_FAILURE_LIMIT=text))

    assert settings.auth_failure_limit == limit
    assert settings.redacted()["AUTH_FAILURE_LIMIT"] == (
        "0" if limit is None else f"{limit.calls}/{limit.period_seconds}"
    )


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("AUTH_FAILURE_LIMIT", "fifty"),
        ("AUTH_FAILURE_LIMIT", "10/0"),
        ("TRUSTED_PROXIES", "10.0.0.0/8, apim.example.com"),
        ("CACHE_KEY_PREFIX", "has space"),
        ("CACHE_TIMEOUT_SECONDS", "30"),
        ("CACHE_CONNECT_TIMEOUT_SECONDS", "0"),
        ("SUBSCRIPTION_SYNC_SECONDS", "0.001"),
    ],
)
def test_malformed_rate_limit_settings_are_refused_by_name(
    name: str, value: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(_env(**{name: value}))

    assert caught.value.name == name


def test_trusted_proxies_are_listed_in_the_redacted_settings() -> None:
    settings = Settings.from_env(_env(TRUSTED_PROXIES="10.0.0.0/8, 192.0.2.4"))

    assert settings.redacted()["TRUSTED_PROXIES"] == ["10.0.0.0/8", "192.0.2.4"]


# -- shared across replicas (real Redis) -------------------------------------------


@pytest_asyncio.fixture
async def fleet(make_client: MakeClient) -> AsyncIterator[Fleet]:
    require_redis()
    replicas = Fleet(make_client, new_prefix())
    yield replicas
    await replicas.close()


async def _replicas(fleet: Fleet, **changes: Any) -> Any:
    url = "redis://127.0.0.1:6379/0"
    # Roomy timeouts: these tests are about counting, and on a loaded machine a
    # slow reply would (rightly) be counted locally instead.
    return [
        await fleet.replica(
            cache_url=url,
            cache_timeout_seconds=2.0,
            cache_connect_timeout_seconds=2.0,
            **changes,
        )
        for _ in range(2)
    ]


async def test_two_replicas_on_redis_admit_exactly_the_limit_under_concurrency(
    idp: LocalIdentityProvider,
    key_store: Credentials,
    fleet: Fleet,
) -> None:
    key = _limited(key_store, "fleet", 10, 60)
    first, second = await _replicas(fleet)
    token = idp.mint_token()

    responses = await asyncio.gather(
        *(_call(first if n % 2 else second, token, key) for n in range(30))
    )

    # Every call was counted in Redis: no replica fell back to its own count.
    assert [c.app[RATE_LIMITER].status()["local_hits"] for c in (first, second)] == [
        0,
        0,
    ]
    statuses = sorted(r.status for r in responses)
    assert statuses == [200] * 10 + [429] * 20
    remaining = sorted(_usage(r)[1] for r in responses if r.status == 200)
    assert remaining == list(range(10))
    client = redis_client()
    try:
        counted = await client.get(f"{fleet.prefix}:rag-api:ratelimit:fleet:10-per-60s")
    finally:
        await client.aclose()
    assert counted == b"30"


async def test_failures_on_one_replica_throttle_the_client_on_the_other(
    idp: LocalIdentityProvider,
    key_store: Credentials,
    fleet: Fleet,
) -> None:
    first, second = await _replicas(fleet, auth_failure_limit=RateLimit(3, 60))
    token = idp.mint_token()
    for _ in range(3):
        await _call(first, token, WRONG_KEY)

    # The other replica learns of the block with its own next failure: one
    # more guess, not another full allowance.
    extra = await _call(second, token, WRONG_KEY)
    response = await _call(second, token, key_store.primary)

    await _assert_rejected(extra, 401, "SubscriptionKeyInvalid", "")
    await _assert_rejected(response, 429, "TooManyFailedAttempts", None)


async def test_a_subscription_sending_bad_tokens_gets_no_more_signature_checks(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(
        token_failure_limit=RateLimit(calls=3, period_seconds=60)
    )
    cached = auth_headers(idp.mint_token(), key_store.primary)
    assert (await client.get("/api/v2/whoami", headers=cached)).status == 200
    header, payload, signature = idp.mint_token().split(".")
    changed = "A" if signature[10] != "A" else "B"
    forged = f"{header}.{payload}.{signature[:10]}{changed}{signature[11:]}"
    for _ in range(3):
        response = await client.get(
            "/api/v2/whoami", headers=auth_headers(forged, key_store.primary)
        )
        assert (await response.json())["code"] == "TokenSignatureInvalid"
    # Now refused before any signature work, new valid tokens included...
    for token in (forged, idp.mint_token()):
        response = await client.get(
            "/api/v2/whoami", headers=auth_headers(token, key_store.primary)
        )
        assert response.status == 429
        assert (await response.json())["code"] == "TooManyFailedAttempts"
        assert int(response.headers["Retry-After"]) > 0
    # ...while credentials already verified are still served,
    assert (await client.get("/api/v2/whoami", headers=cached)).status == 200
    # and the other subscriptions are not concerned.
    health = await (await client.get("/api/v2/health", headers=cached)).json()
    assert health["rateLimits"]["failedTokens"]["subscriptions_throttled"] == 1


async def test_the_token_failure_limit_can_be_turned_off(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(token_failure_limit=None)
    header, payload, _ = idp.mint_token().split(".")
    forged = f"{header}.{payload}.{'A' * 342}"
    for _ in range(30):
        response = await client.get(
            "/api/v2/whoami", headers=auth_headers(forged, key_store.primary)
        )
        assert response.status == 401


def test_token_failure_limit_setting_is_parsed_and_checked() -> None:
    base = {
        "ENTRA_TENANT_ID": "00000000-0000-4000-8000-000000000001",
        "ENTRA_AUDIENCES": "api://x",
        "APIM_SUBSCRIPTION_KEYS_FILE": "/dev/null",
    }
    assert Settings.from_env(base).token_failure_limit is None  # off by default
    off = Settings.from_env({**base, "TOKEN_FAILURE_LIMIT": "0"})
    assert off.token_failure_limit is None
    custom = Settings.from_env({**base, "TOKEN_FAILURE_LIMIT": "5/10"})
    assert custom.token_failure_limit == RateLimit(5, 10)
    with pytest.raises(SettingsError, match="TOKEN_FAILURE_LIMIT"):
        Settings.from_env({**base, "TOKEN_FAILURE_LIMIT": "many"})
