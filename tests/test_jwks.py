"""The key cache against a real local identity provider: single flight, rotation."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest

from service.appkeys import JWKS
from service.idp import LocalIdentityProvider
from service.jwks import JwksCache, JwksPolicy, KeySetError, build_key_set
from tests.conftest import AppClient, Credentials, MakeClient, auth_headers


async def _get(client: AppClient, token: str, key: str) -> Any:
    return await client.get("/api/v2/health", headers=auth_headers(token, key))


async def _wait_until(condition: Any, seconds: float = 10.0) -> None:
    for _ in range(int(seconds / 0.02)):
        if condition():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("condition not reached in time")


async def test_cold_cache_under_200_concurrent_requests_fetches_once(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    token = idp.mint_token()
    responses = await asyncio.gather(
        *(_get(client, token, key_store.primary) for _ in range(200))
    )
    assert [r.status for r in responses] == [200] * 200
    assert idp.hits["discovery"] == 1
    assert idp.hits["jwks"] == 1


async def test_new_kid_causes_one_refresh_and_is_accepted(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    assert (await _get(client, idp.mint_token(), key_store.primary)).status == 200
    new_kid = idp.rotate_key()
    token = idp.mint_token()
    responses = await asyncio.gather(
        *(_get(client, token, key_store.primary) for _ in range(20))
    )
    assert [r.status for r in responses] == [200] * 20
    assert idp.hits["jwks"] == 2
    assert new_kid in client.app[JWKS].kids


async def test_unknown_kid_flood_costs_at_most_one_fetch_per_cooldown(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    valid = idp.mint_token()
    assert (await _get(client, valid, key_store.primary)).status == 200
    forged = [idp.mint_token(header={"kid": uuid.uuid4().hex}) for _ in range(100)]
    responses = await asyncio.gather(
        *(_get(client, token, key_store.primary) for token in forged),
        _get(client, valid, key_store.primary),
    )
    codes = [(await r.json())["code"] for r in responses[:-1]]
    assert set(codes) == {"TokenSignatureKeyNotFound"}
    assert responses[-1].status == 200
    assert idp.hits["jwks"] <= 2


async def test_removed_kid_stops_validating_after_the_next_refresh(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    old_kid = idp.current_kid
    old_token = idp.mint_token()
    assert (await _get(client, old_token, key_store.primary)).status == 200
    idp.rotate_key()
    idp.remove_key(old_kid)
    assert await client.app[JWKS].refresh_now()
    response = await _get(client, old_token, key_store.primary)
    assert response.status == 401
    assert (await response.json())["code"] == "TokenSignatureKeyNotFound"
    assert (await _get(client, idp.mint_token(), key_store.primary)).status == 200


@pytest.mark.parametrize(
    "mode",
    [
        "error",
        "refuse",
        "empty_keys",
        "html",
        "invalid_json",
        "foreign_issuer",
        "oversized",
        "redirect",
    ],
)
async def test_failed_refresh_keeps_the_last_known_good_keys(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials, mode: str
) -> None:
    token = idp.mint_token()
    assert (await _get(client, token, key_store.primary)).status == 200
    idp.set_outage(mode)
    assert not await client.app[JWKS].refresh_now()
    assert (await _get(client, idp.mint_token(), key_store.primary)).status == 200
    health = await (await _get(client, idp.mint_token(), key_store.primary)).json()
    assert health["status"] == "degraded"
    assert health["identityProvider"]["state"] == "stale"
    assert health["identityProvider"]["last_refresh"]["result"] == "error"


async def test_identity_provider_down_at_start_recovers_without_restart(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    idp.set_outage("error")
    client = await make_client()
    first = await _get(client, idp.mint_token(), key_store.primary)
    assert first.status == 503
    assert (await client.get("/readyz")).status == 503
    idp.set_outage("ok")
    jwks = client.app[JWKS]
    await _wait_until(lambda: jwks.ready)
    assert (await client.get("/readyz")).status == 200
    assert (await _get(client, idp.mint_token(), key_store.primary)).status == 200


async def test_requests_during_a_cold_outage_do_not_each_fetch(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    idp.set_outage("error")
    client = await make_client()
    token = idp.mint_token()
    responses = await asyncio.gather(
        *(_get(client, token, key_store.primary) for _ in range(50))
    )
    assert {r.status for r in responses} == {503}
    assert idp.hits["discovery"] <= 2


async def test_cache_used_directly_serves_keys_by_kid(
    idp: LocalIdentityProvider,
) -> None:
    cache = JwksCache(idp.openid_config_url, (idp.issuer,), JwksPolicy())
    await cache.start()
    try:
        key = await cache.key_for(idp.current_kid)
        assert key is not None
        assert await cache.key_for("missing") is None
    finally:
        await cache.close()


@pytest.mark.parametrize(
    "document",
    [
        {},
        {"keys": "x"},
        {"keys": []},
        {"keys": [{"kty": "oct", "kid": "a", "k": "AAAA"}]},
        {"keys": [{"kty": "RSA", "kid": "a", "use": "enc", "n": "AQAB", "e": "AQAB"}]},
        [],
    ],
    ids=["empty", "keys-not-list", "no-keys", "symmetric", "encryption-key", "array"],
)
def test_key_set_without_usable_signing_key_is_refused(document: Any) -> None:
    with pytest.raises(KeySetError):
        build_key_set(document)


def test_key_set_with_a_duplicated_kid_is_refused(idp: LocalIdentityProvider) -> None:
    entry = idp.jwks()["keys"][0]
    with pytest.raises(KeySetError, match="twice"):
        build_key_set({"keys": [entry, dict(entry)]})
