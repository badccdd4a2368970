"""GET /metrics: what it counts, who may read it, and the separate metrics port."""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping

import aiohttp
import pytest
from prometheus_client.parser import text_string_to_metric_families

from service.idp import LocalIdentityProvider
from service.metrics import METRICS_REGISTRY, RATE_LIMIT_CODES
from service.settings import Settings, SettingsError
from tests.conftest import AppClient, Credentials, MakeClient, auth_headers
from validators import AuthContext, RateLimitExceeded

__all__: tuple[str, ...] = ()

Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def _samples(text: str) -> Samples:
    samples: Samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, frozenset(sample.labels.items()))] = sample.value
    return samples


def _value(samples: Samples, name: str, **labels: str) -> float | None:
    return samples.get((name, frozenset(labels.items())))


async def _scrape(client: AppClient, headers: Mapping[str, str]) -> Samples:
    response = await client.get("/metrics", headers=headers)
    assert response.status == 200
    return _samples(await response.text())


async def _wait_until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


class _AlwaysRateLimited:
    """A chain extension that answers 429 like the rate limiter does."""

    name = "always-rate-limited"

    async def validate(self, context: AuthContext) -> None:
        raise RateLimitExceeded(retry_after=7)


# Who may read /metrics


async def test_metrics_without_credentials_are_refused_by_default(
    client: AppClient,
) -> None:
    response = await client.get("/metrics")
    body = await response.json()
    assert response.status == 401
    assert body["code"] == "SubscriptionKeyNotFound"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="rag-api"'


async def test_metrics_with_a_token_lacking_the_role_are_refused(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    token = idp.mint_token(roles=["Other.Role"])
    response = await client.get(
        "/metrics", headers=auth_headers(token, key_store.primary)
    )
    body = await response.json()
    assert response.status == 403
    assert body["code"] == "InsufficientRole"
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]


async def test_metrics_with_both_credentials_are_prometheus_text(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    headers = auth_headers(idp.mint_token(), key_store.primary)
    response = await client.get("/metrics", headers=headers)
    text = await response.text()
    assert response.status == 200
    assert response.headers["Content-Type"].startswith("text/plain; version=")
    assert "# TYPE rag_api_requests_total counter" in text
    assert "# TYPE rag_api_signing_keys_age_seconds gauge" in text


async def test_metrics_public_setting_opens_the_main_port_route(
    make_client: MakeClient,
) -> None:
    client = await make_client(metrics_public=True)
    response = await client.get("/metrics")
    assert response.status == 200
    assert "rag_api_requests_total" in await response.text()


async def test_metrics_public_setting_leaves_other_routes_protected(
    make_client: MakeClient,
) -> None:
    client = await make_client(metrics_public=True)
    response = await client.get("/api/v2/health")
    body = await response.json()
    assert response.status == 401
    assert body["code"] == "SubscriptionKeyNotFound"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="rag-api"'


# What is counted


async def test_responses_are_counted_by_status_and_rejections_by_code(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(metrics_public=True)
    good = auth_headers(idp.mint_token(), key_store.primary)
    assert (await client.get("/api/v2/health", headers=good)).status == 200
    assert (await client.get("/api/v2/health", headers=good)).status == 200
    assert (await client.get("/api/v2/health")).status == 401
    expired = auth_headers(idp.mint_token(lifetime=-600), key_store.primary)
    assert (await client.get("/api/v2/health", headers=expired)).status == 401
    assert (await client.get("/livez")).status == 200

    samples = await _scrape(client, {})

    assert _value(samples, "rag_api_requests_total", status="200") == 3
    assert _value(samples, "rag_api_requests_total", status="401") == 2
    assert (
        _value(samples, "rag_api_rejections_total", code="SubscriptionKeyNotFound") == 1
    )
    assert _value(samples, "rag_api_rejections_total", code="TokenExpired") == 1


async def test_rate_limit_codes_are_reported_at_zero_before_any_429(
    make_client: MakeClient,
) -> None:
    client = await make_client(metrics_public=True)
    samples = await _scrape(client, {})
    for code in RATE_LIMIT_CODES:
        assert _value(samples, "rag_api_rate_limit_rejections_total", code=code) == 0


async def test_a_429_is_counted_as_a_rate_limit_rejection(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(
        metrics_public=True, app_kwargs={"extra_validators": [_AlwaysRateLimited()]}
    )
    headers = auth_headers(idp.mint_token(), key_store.primary)
    response = await client.get("/api/v2/health", headers=headers)
    body = await response.json()
    assert response.status == 429
    assert body["code"] == "RateLimitExceeded"
    assert response.headers["Retry-After"] == "7"
    assert "WWW-Authenticate" not in response.headers

    samples = await _scrape(client, {})

    assert (
        _value(samples, "rag_api_rate_limit_rejections_total", code="RateLimitExceeded")
        == 1
    )
    assert _value(samples, "rag_api_rejections_total", code="RateLimitExceeded") == 1
    assert _value(samples, "rag_api_requests_total", status="429") == 1


async def test_key_fetches_and_key_age_come_from_the_key_cache(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(metrics_public=True)
    headers = auth_headers(idp.mint_token(), key_store.primary)
    assert (await client.get("/api/v2/health", headers=headers)).status == 200

    samples = await _scrape(client, {})

    fetches = "rag_api_jwks_fetches_total"
    assert _value(samples, fetches, what="discovery", result="ok") == 1
    assert _value(samples, fetches, what="jwks", result="ok") == 1
    age = _value(samples, "rag_api_signing_keys_age_seconds")
    assert age is not None and age >= 0
    assert _value(samples, "rag_api_signing_keys") == 1
    assert _value(samples, "rag_api_signing_keys_degraded") == 0


async def test_identity_provider_outage_shows_degraded_keys_and_fetch_errors(
    make_client: MakeClient, idp: LocalIdentityProvider
) -> None:
    idp.set_outage("error", status=503)
    client = await make_client(metrics_public=True)
    await _wait_until(lambda: idp.hits["discovery"] >= 1)

    samples: Samples = {}
    for _ in range(200):
        samples = await _scrape(client, {})
        errors = "rag_api_jwks_fetches_total"
        if _value(samples, errors, what="discovery", result="error"):
            break
        await asyncio.sleep(0.02)

    assert _value(
        samples, "rag_api_jwks_fetches_total", what="discovery", result="error"
    )
    assert _value(samples, "rag_api_signing_keys_degraded") == 1
    assert _value(samples, "rag_api_signing_keys") == 0
    assert _value(samples, "rag_api_signing_keys_age_seconds") is None


async def test_the_same_token_twice_is_one_cache_miss_then_one_hit(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(metrics_public=True)
    headers = auth_headers(idp.mint_token(), key_store.primary)
    assert (await client.get("/api/v2/health", headers=headers)).status == 200
    assert (await client.get("/api/v2/health", headers=headers)).status == 200

    samples = await _scrape(client, {})

    assert _value(samples, "rag_api_token_cache_lookups_total", result="miss") == 1
    assert _value(samples, "rag_api_token_cache_lookups_total", result="hit") == 1
    assert _value(samples, "rag_api_token_cache_entries") == 1


async def test_a_refused_key_store_file_shows_as_reload_failed(
    make_client: MakeClient, key_store: Credentials
) -> None:
    client = await make_client(metrics_public=True)
    before = await _scrape(client, {})
    assert _value(before, "rag_api_key_store_reload_failed") == 0
    assert _value(before, "rag_api_key_store_subscriptions") == 1

    key_store.store.path.write_text("{not json", encoding="utf-8")
    samples = before
    for _ in range(200):
        samples = await _scrape(client, {})
        if _value(samples, "rag_api_key_store_reload_failed") == 1:
            break
        await asyncio.sleep(0.02)

    assert _value(samples, "rag_api_key_store_reload_failed") == 1
    assert _value(samples, "rag_api_key_store_subscriptions") == 1


async def test_a_scrape_shows_no_token_and_no_subscription_key(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(metrics_public=True)
    token = idp.mint_token()
    for key in (key_store.primary, key_store.secondary, "0" * 32):
        await client.get("/api/v2/health", headers=auth_headers(token, key))

    text = await (await client.get("/metrics")).text()

    for secret in (token, key_store.primary, key_store.secondary):
        assert secret not in text
    assert token.split(".")[1] not in text


async def test_two_apps_in_one_process_keep_their_own_counts(
    make_client: MakeClient,
) -> None:
    first = await make_client(metrics_public=True)
    second = await make_client(metrics_public=True)
    assert first.app[METRICS_REGISTRY] is not second.app[METRICS_REGISTRY]
    for _ in range(3):
        assert (await first.get("/livez")).status == 200

    samples = await _scrape(second, {})

    assert _value(samples, "rag_api_requests_total", status="200") is None


# The metrics port


async def test_metrics_port_serves_metrics_without_credentials(
    make_client: MakeClient, unused_tcp_port_factory: Callable[[], int]
) -> None:
    port = unused_tcp_port_factory()
    client = await make_client(host="127.0.0.1", metrics_port=port)
    assert (await client.get("/livez")).status == 200

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            text = await response.text()
            status = response.status

    assert status == 200
    assert _value(_samples(text), "rag_api_requests_total", status="200") == 1


async def test_metrics_port_does_not_serve_the_api(
    make_client: MakeClient,
    unused_tcp_port_factory: Callable[[], int],
    idp: LocalIdentityProvider,
    key_store: Credentials,
) -> None:
    port = unused_tcp_port_factory()
    await make_client(host="127.0.0.1", metrics_port=port)
    headers = auth_headers(idp.mint_token(), key_store.primary)

    async with aiohttp.ClientSession() as session:
        for path in ("/api/v2/health", "/api/v2/whoami", "/readyz"):
            async with session.get(
                f"http://127.0.0.1:{port}{path}", headers=headers
            ) as response:
                assert response.status == 404


async def test_metrics_port_leaves_the_main_port_route_protected(
    make_client: MakeClient, unused_tcp_port_factory: Callable[[], int]
) -> None:
    client = await make_client(host="127.0.0.1", metrics_port=unused_tcp_port_factory())
    response = await client.get("/metrics")
    body = await response.json()
    assert response.status == 401
    assert body["code"] == "SubscriptionKeyNotFound"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="rag-api"'


async def test_two_workers_can_bind_one_metrics_port(
    make_client: MakeClient,
    unused_tcp_port_factory: Callable[[], int],
) -> None:
    # `serve --workers N` starts N apps with the same METRICS_PORT.
    port = unused_tcp_port_factory()
    await make_client(host="127.0.0.1", metrics_port=port)
    await make_client(host="127.0.0.1", metrics_port=port)

    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{port}/metrics") as response:
            assert response.status == 200


# Settings


def _env(settings: Settings, **values: str) -> dict[str, str]:
    env = {
        "ENTRA_TENANT_ID": settings.tenant_id,
        "ENTRA_AUDIENCES": ",".join(settings.audiences),
        "APIM_SUBSCRIPTION_KEYS_FILE": str(settings.subscription_keys_file),
    }
    env.update(values)
    return env


def test_metrics_settings_default_to_protected_and_no_port(
    settings: Settings,
) -> None:
    loaded = Settings.from_env(_env(settings))
    assert loaded.metrics_port is None
    assert loaded.metrics_public is False
    assert loaded.redacted()["METRICS_PORT"] is None
    assert loaded.redacted()["METRICS_PUBLIC"] is False


def test_metrics_settings_are_read_and_shown(settings: Settings) -> None:
    loaded = Settings.from_env(
        _env(settings, METRICS_PORT="9100", METRICS_PUBLIC="true")
    )
    assert loaded.metrics_port == 9100
    assert loaded.metrics_public is True
    assert loaded.redacted()["METRICS_PORT"] == 9100


@pytest.mark.parametrize(
    ("values", "problem"),
    [
        ({"METRICS_PORT": "metrics"}, "whole number"),
        ({"METRICS_PORT": "0"}, "between"),
        ({"METRICS_PORT": "70000"}, "between"),
        ({"METRICS_PORT": "8080", "PORT": "8080"}, "differ from PORT"),
        ({"METRICS_PUBLIC": "maybe"}, "true or false"),
    ],
)
def test_malformed_metrics_settings_are_refused_by_name(
    settings: Settings, values: dict[str, str], problem: str
) -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(_env(settings, **values))
    assert caught.value.name == next(iter(values))
    assert problem in str(caught.value)
