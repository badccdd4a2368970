"""The verified-token cache: bounds, expiry, invalidation, and roles still checked."""

from __future__ import annotations

import dataclasses

from aiohttp import web

from service.appkeys import JWKS, SETTINGS, TOKEN_CACHE
from service.idp import LocalIdentityProvider
from service.policy import requires
from service.token_cache import TokenCache
from tests.conftest import AppClient, Credentials, MakeClient, auth_headers
from validators import VerifiedToken


def _verified(kid: str = "k1", exp: float = 2_000.0) -> VerifiedToken:
    return VerifiedToken(kid=kid, header={"alg": "RS256"}, claims={"exp": exp})


def test_cache_holds_at_most_its_size_and_evicts_the_least_recent() -> None:
    cache = TokenCache(3, clock=lambda: 1_000.0)
    for n in range(5):
        cache.put(f"token-{n}", _verified())
    assert len(cache) == 3
    assert cache.get("token-0") is None
    assert cache.get("token-4") is not None
    assert cache.stats.evictions == 2


def test_entry_expires_at_the_token_exp() -> None:
    now = [1_000.0]
    cache = TokenCache(10, clock=lambda: now[0])
    cache.put("t", _verified(exp=1_010.0))
    assert cache.get("t") is not None
    now[0] = 1_010.0
    assert cache.get("t") is None
    assert len(cache) == 0


def test_size_zero_turns_the_cache_off() -> None:
    cache = TokenCache(0)
    cache.put("t", _verified())
    assert not cache.enabled
    assert cache.get("t") is None
    assert len(cache) == 0


def test_entries_of_removed_keys_are_dropped() -> None:
    cache = TokenCache(10, clock=lambda: 1_000.0)
    cache.put("a", _verified("k1"))
    cache.put("b", _verified("k2"))
    assert cache.retain_kids({"k2"}) == 1
    assert cache.get("a") is None
    assert cache.get("b") is not None


def test_cache_keeps_no_token_text() -> None:
    cache = TokenCache(10, clock=lambda: 1_000.0)
    cache.put("secret-token-value", _verified())
    assert all(isinstance(key, bytes) for key in cache._entries)
    assert b"secret-token-value" not in b"".join(cache._entries)


async def test_valid_token_is_served_from_cache_on_the_second_request(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    headers = auth_headers(idp.mint_token(), key_store.primary)
    assert (await client.get("/api/v2/health", headers=headers)).status == 200
    assert (await client.get("/api/v2/health", headers=headers)).status == 200
    cache = client.app[TOKEN_CACHE]
    assert cache.stats.stores == 1
    assert cache.stats.hits == 1


@requires(roles=("Api.Admin",))
async def _admin(request: web.Request) -> web.Response:
    return web.json_response({"admin": True})


async def test_cached_token_without_the_route_role_still_gets_403(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(routes=[("/admin", _admin)])
    headers = auth_headers(idp.mint_token(), key_store.primary)
    assert (await client.get("/api/v2/whoami", headers=headers)).status == 200
    app = client.app
    assert app[TOKEN_CACHE].stats.stores == 1
    # The same, now cached, token on a route whose own role it lacks.
    response = await client.get("/admin", headers=headers)
    assert response.status == 403
    assert (await response.json())["code"] == "InsufficientRole"
    assert app[TOKEN_CACHE].stats.hits >= 1


async def test_invalid_tokens_are_never_cached(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    token = idp.mint_token(claims={"aud": "api://other"})
    headers = auth_headers(token, key_store.primary)
    for _ in range(3):
        assert (await client.get("/api/v2/health", headers=headers)).status == 401
    assert len(client.app[TOKEN_CACHE]) == 0


async def test_key_removal_evicts_cached_tokens(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    old_kid = idp.current_kid
    headers = auth_headers(idp.mint_token(), key_store.primary)
    assert (await client.get("/api/v2/health", headers=headers)).status == 200
    assert len(client.app[TOKEN_CACHE]) == 1
    idp.rotate_key()
    idp.remove_key(old_kid)
    assert await client.app[JWKS].refresh_now()
    assert len(client.app[TOKEN_CACHE]) == 0
    assert (await client.get("/api/v2/health", headers=headers)).status == 401


def test_nothing_is_served_while_the_signing_keys_are_unusable() -> None:
    usable = [True]
    cache = TokenCache(10, clock=lambda: 1_000.0, keys_usable=lambda: usable[0])
    cache.put("t", _verified())
    assert cache.get("t") is not None
    usable[0] = False
    assert cache.get("t") is None
    usable[0] = True
    assert cache.get("t") is not None


async def test_cached_token_gets_503_once_the_keys_are_too_stale(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client()
    headers = auth_headers(idp.mint_token(), key_store.primary)
    assert (await client.get("/api/v2/health", headers=headers)).status == 200
    jwks = client.app[JWKS]
    idp.set_outage("error")
    # The keys were fetched a day and a second ago, as far as the cache can tell.
    keyset = jwks._keyset
    assert keyset is not None
    stale_for = client.app[SETTINGS].jwks_max_stale_seconds + 1
    jwks._keyset = dataclasses.replace(keyset, fetched_at=keyset.fetched_at - stale_for)
    response = await client.get("/api/v2/health", headers=headers)
    assert response.status == 503
    assert (await response.json())["code"] == "IdentityProviderUnavailable"
