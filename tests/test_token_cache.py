"""The verified-token cache: bounds, expiry, invalidation, and roles still checked."""

from __future__ import annotations

import dataclasses
import json
import re
import time

import aiohttp
from aiohttp import web
from multidict import CIMultiDict

from service.appkeys import JWKS, KEY_WATCHER, SETTINGS, TOKEN_CACHE
from service.idp import LocalIdentityProvider
from service.keystore import KeyStoreWatcher
from service.metrics import REQUEST_COUNTERS
from service.middleware import build_identity
from service.policy import requires
from service.token_cache import TokenCache, Verdict
from tests.conftest import AppClient, Credentials, MakeClient, auth_headers
from validators import RateLimit, Subscription, VerifiedToken
from validators.jose_parsing import decode_segment


def _verdict(kid: str = "k1", exp: float = 2_000.0) -> Verdict:
    verified = VerifiedToken(kid=kid, header={"alg": "RS256"}, claims={"exp": exp})
    subscription = Subscription(name="s", product="p")
    identity = build_identity(subscription, verified)
    return Verdict(subscription, verified, identity, exp, not_before=0.0)


def _key(token: str) -> bytes:
    return TokenCache.digest(f"Bearer {token}".encode(), b"subscription-key")


def test_cache_holds_at_most_its_size_and_evicts_the_least_recent() -> None:
    cache = TokenCache(3, clock=lambda: 1_000.0)
    for n in range(5):
        cache.put(_key(f"token-{n}"), _verdict())
    assert len(cache) == 3
    assert cache.get(_key("token-0")) is None
    assert cache.get(_key("token-4")) is not None
    assert cache.stats.evictions == 2


def test_entry_expires_at_the_token_exp() -> None:
    now = [1_000.0]
    cache = TokenCache(10, clock=lambda: now[0])
    cache.put(_key("t"), _verdict(exp=1_010.0))
    assert cache.get(_key("t")) is not None
    now[0] = 1_010.0
    assert cache.get(_key("t")) is None
    assert len(cache) == 0


def test_size_zero_turns_the_cache_off() -> None:
    cache = TokenCache(0)
    cache.put(_key("t"), _verdict())
    assert not cache.enabled
    assert cache.get(_key("t")) is None
    assert len(cache) == 0


def test_entries_of_removed_keys_are_dropped() -> None:
    cache = TokenCache(10, clock=lambda: 1_000.0)
    cache.put(_key("a"), _verdict("k1"))
    cache.put(_key("b"), _verdict("k2"))
    assert cache.retain_kids({"k2"}) == 1
    assert cache.get(_key("a")) is None
    assert cache.get(_key("b")) is not None


def test_cache_keys_are_digests_of_both_headers() -> None:
    token, key = "secret-token-value", "secret-subscription-key"
    digest = TokenCache.digest(f"Bearer {token}".encode(), key.encode())
    assert len(digest) == 32
    assert token.encode() not in digest and key.encode() not in digest
    # Either header changed, even in case only, is another entry.
    assert digest != TokenCache.digest(f"Bearer {token}".encode(), (key + "x").encode())
    assert digest != TokenCache.digest(f"Bearer {token}x".encode(), key.encode())
    assert digest != TokenCache.digest(f"bearer {token}".encode(), key.encode())


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
    cache.put(_key("t"), _verdict())
    assert cache.get(_key("t")) is not None
    usable[0] = False
    assert cache.get(_key("t")) is None
    usable[0] = True
    assert cache.get(_key("t")) is not None


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


# -- the verdict cache on the request path ---------------------------------------


async def test_a_key_store_change_drops_every_cached_verdict(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    headers = auth_headers(idp.mint_token(), key_store.primary)
    assert (await client.get("/api/v2/whoami", headers=headers)).status == 200
    assert len(client.app[TOKEN_CACHE]) == 1
    assert key_store.store.suspend("contoso")
    watcher = client.app[KEY_WATCHER]
    assert isinstance(watcher, KeyStoreWatcher)
    assert watcher.reload_now()
    assert len(client.app[TOKEN_CACHE]) == 0
    response = await client.get("/api/v2/whoami", headers=headers)
    assert response.status == 401
    assert (await response.json())["code"] == "SubscriptionKeyInvalid"


async def test_the_same_token_with_another_key_is_checked_again(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    token = idp.mint_token()
    primary = auth_headers(token, key_store.primary)
    assert (await client.get("/api/v2/whoami", headers=primary)).status == 200
    wrong = auth_headers(token, key_store.primary[:-1] + "x")
    response = await client.get("/api/v2/whoami", headers=wrong)
    assert response.status == 401
    assert (await response.json())["code"] == "SubscriptionKeyInvalid"
    secondary = auth_headers(token, key_store.secondary)
    assert (await client.get("/api/v2/whoami", headers=secondary)).status == 200
    assert len(client.app[TOKEN_CACHE]) == 2


async def test_a_cached_token_expires_at_exp_plus_the_leeway(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    now = [time.time()]
    client = await make_client(app_kwargs={"clock": lambda: now[0]})
    token = idp.mint_token(lifetime=600)
    headers = auth_headers(token, key_store.primary)
    assert (await client.get("/api/v2/whoami", headers=headers)).status == 200
    cache = client.app[TOKEN_CACHE]
    assert (await client.get("/api/v2/whoami", headers=headers)).status == 200
    assert cache.stats.hits == 1
    leeway = client.app[SETTINGS].clock_skew_seconds
    exp = json.loads(decode_segment(token.split(".")[1]))["exp"]
    now[0] = exp - 1
    assert (await client.get("/api/v2/whoami", headers=headers)).status == 200
    # At exp the entry is gone; within the leeway the whole chain still admits.
    now[0] = exp
    assert (await client.get("/api/v2/whoami", headers=headers)).status == 200
    now[0] = exp + leeway
    response = await client.get("/api/v2/whoami", headers=headers)
    assert response.status == 401
    assert (await response.json())["code"] == "TokenExpired"


async def test_a_cached_token_is_refused_before_its_nbf(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    now = [time.time()]
    client = await make_client(app_kwargs={"clock": lambda: now[0]})
    headers = auth_headers(idp.mint_token(), key_store.primary)
    assert (await client.get("/api/v2/whoami", headers=headers)).status == 200
    leeway = client.app[SETTINGS].clock_skew_seconds
    nbf = next(iter(client.app[TOKEN_CACHE].entries.values())).not_before
    now[0] = nbf - leeway - 1  # the clock stepped back
    response = await client.get("/api/v2/whoami", headers=headers)
    assert response.status == 401
    assert (await response.json())["code"] == "TokenNotYetValid"


async def test_cached_credentials_in_the_query_too_are_still_refused(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    headers = auth_headers(idp.mint_token(), key_store.primary)
    assert (await client.get("/api/v2/whoami", headers=headers)).status == 200
    response = await client.get(
        "/api/v2/whoami", headers=headers, params={"subscription-key": "x"}
    )
    assert response.status == 400
    assert (await response.json())["code"] == "CredentialsInQuery"
    # Another query string is fine, and takes the whole chain.
    ok = await client.get("/api/v2/whoami", headers=headers, params={"q": "1"})
    assert ok.status == 200


async def test_a_second_authorization_header_is_never_served_from_the_cache(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    token = idp.mint_token()
    headers = auth_headers(token, key_store.primary)
    assert (await client.get("/api/v2/whoami", headers=headers)).status == 200
    doubled = CIMultiDict(headers)
    doubled.add("Authorization", f"Bearer {token}")
    response = await client.get("/api/v2/whoami", headers=doubled)
    assert response.status == 400
    assert (await response.json())["code"] == "AmbiguousCredentials"


async def test_a_throttled_address_is_refused_even_with_cached_credentials(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(auth_failure_limit=RateLimit(calls=3, period_seconds=60))
    headers = auth_headers(idp.mint_token(), key_store.primary)
    assert (await client.get("/api/v2/whoami", headers=headers)).status == 200
    for _ in range(3):
        response = await client.get("/api/v2/whoami")
        assert response.status == 401
    response = await client.get("/api/v2/whoami", headers=headers)
    assert response.status == 429
    assert (await response.json())["code"] == "TooManyFailedAttempts"


async def test_short_path_answers_carry_the_request_id_and_count(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    headers = auth_headers(idp.mint_token(), key_store.primary)
    first = await client.get("/api/v2/whoami", headers=headers)
    second = await client.get(
        "/api/v2/whoami", headers={**headers, "x-request-id": "abc-123"}
    )
    assert first.status == second.status == 200
    assert re.fullmatch(r"[0-9a-f]{32}", first.headers["x-request-id"])
    assert second.headers["x-request-id"] == "abc-123"
    assert client.app[TOKEN_CACHE].stats.hits == 1
    assert client.app[REQUEST_COUNTERS].responses[200] == 2


async def test_with_the_cache_off_every_request_takes_the_whole_chain(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(token_cache_size=0)
    headers = auth_headers(idp.mint_token(), key_store.primary)
    first = await client.get("/api/v2/whoami", headers=headers)
    second = await client.get(
        "/api/v2/whoami", headers={**headers, "x-request-id": "abc-123"}
    )
    assert first.status == second.status == 200
    assert re.fullmatch(r"[0-9a-f]{32}", first.headers["x-request-id"])
    assert second.headers["x-request-id"] == "abc-123"
    cache = client.app[TOKEN_CACHE]
    assert len(cache) == 0
    assert cache.stats.hits == cache.stats.stores == 0
    assert client.app[REQUEST_COUNTERS].responses[200] == 2
    wrong = auth_headers(idp.mint_token(), key_store.primary[:-1] + "x")
    refused = await client.get("/api/v2/whoami", headers=wrong)
    assert refused.status == 401
    assert "x-request-id" in refused.headers
    assert client.app[REQUEST_COUNTERS].responses[401] == 1


async def test_one_connection_changing_credentials_is_judged_on_each_pair(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    """The gate remembers a connection's last pair to skip hashing it again:
    another pair on the same connection must never ride on that memo."""
    token = idp.mint_token()
    header, payload, signature = token.split(".")
    changed = "A" if signature[10] != "A" else "B"
    forged = f"{header}.{payload}.{signature[:10]}{changed}{signature[11:]}"
    connector = aiohttp.TCPConnector(limit=1)  # every request on one connection
    async with aiohttp.ClientSession(connector=connector) as session:

        async def code(token: str, key: str) -> tuple[int, str | None]:
            url = client.make_url("/api/v2/whoami")
            async with session.get(url, headers=auth_headers(token, key)) as answer:
                body = await answer.json()
                return answer.status, body.get("code")

        assert await code(token, key_store.primary) == (200, None)
        assert await code(token, key_store.primary) == (200, None)
        assert await code(forged, key_store.primary) == (401, "TokenSignatureInvalid")
        last = "1" if key_store.primary[-1] != "1" else "2"
        wrong_key = key_store.primary[:-1] + last
        assert await code(token, wrong_key) == (401, "SubscriptionKeyInvalid")
        assert await code(token, key_store.secondary) == (200, None)
        assert await code(token, key_store.primary) == (200, None)
