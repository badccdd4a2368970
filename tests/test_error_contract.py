"""Every row of the README's error table: status, body, code and challenge."""

from __future__ import annotations

import time
from typing import Any

import pytest

from service.appkeys import KEY_WATCHER
from service.idp import LocalIdentityProvider
from service.keystore import KeyStoreWatcher
from tests.conftest import AppClient, Credentials, MakeClient, auth_headers

REALM = 'Bearer realm="rag-api"'


async def _assert_rejected(
    response: Any, status: int, code: str, challenge: str | None
) -> dict[str, Any]:
    body: dict[str, Any] = await response.json()
    assert response.status == status
    assert body["statusCode"] == status
    assert body["code"] == code
    assert body["message"][:1].isupper()
    assert response.headers["Cache-Control"] == "no-store"
    assert response.headers["Content-Type"].startswith("application/json")
    assert response.headers["x-request-id"]
    www = response.headers.get("WWW-Authenticate")
    if challenge is None:
        assert www == REALM
    else:
        assert www is not None
        assert www.startswith(f'{REALM}, error="{challenge}"')
    return body


async def test_missing_subscription_key_is_rejected_with_apim_wording(
    client: AppClient, idp: LocalIdentityProvider
) -> None:
    headers = {"Authorization": f"Bearer {idp.mint_token()}"}
    response = await client.get("/api/v2/health", headers=headers)
    body = await _assert_rejected(response, 401, "SubscriptionKeyNotFound", None)
    assert body["message"] == (
        "Access denied due to missing subscription key. Make sure to include "
        "subscription key when making requests to an API."
    )


async def test_unknown_subscription_key_is_rejected_with_apim_wording(
    client: AppClient, idp: LocalIdentityProvider
) -> None:
    headers = auth_headers(idp.mint_token(), "0" * 32)
    response = await client.get("/api/v2/health", headers=headers)
    body = await _assert_rejected(response, 401, "SubscriptionKeyInvalid", None)
    assert body["message"] == (
        "Access denied due to invalid subscription key. Make sure to provide a "
        "valid key for an active subscription."
    )


async def test_suspended_subscription_key_is_rejected(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    key_store.store.suspend(key_store.name)
    watcher = client.app[KEY_WATCHER]
    assert isinstance(watcher, KeyStoreWatcher)
    watcher.reload_now()
    headers = auth_headers(idp.mint_token(), key_store.primary)
    response = await client.get("/api/v2/health", headers=headers)
    await _assert_rejected(response, 401, "SubscriptionKeyInvalid", None)


async def test_missing_token_gets_a_bare_challenge(
    client: AppClient, key_store: Credentials
) -> None:
    headers = {"Ocp-Apim-Subscription-Key": key_store.primary}
    response = await client.get("/api/v2/health", headers=headers)
    await _assert_rejected(response, 401, "TokenNotPresent", None)


@pytest.mark.parametrize(
    "authorization",
    ["Basic dXNlcjpwYXNz", "Bearer", "Bearer not-a-jwt", "Bearer a.b", "Token x.y.z"],
    ids=["basic-scheme", "no-token", "not-jws", "two-segments", "other-scheme"],
)
async def test_malformed_authorization_is_invalid_token(
    client: AppClient, key_store: Credentials, authorization: str
) -> None:
    headers = {
        "Authorization": authorization,
        "Ocp-Apim-Subscription-Key": key_store.primary,
    }
    response = await client.get("/api/v2/health", headers=headers)
    await _assert_rejected(response, 401, "TokenInvalid", "invalid_token")


async def test_two_authorization_headers_are_an_invalid_request(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    token = idp.mint_token()
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("Authorization", f"Bearer {token}"),
        ("Ocp-Apim-Subscription-Key", key_store.primary),
    ]
    response = await client.get("/api/v2/health", headers=headers)
    await _assert_rejected(response, 400, "AmbiguousCredentials", "invalid_request")


async def test_two_subscription_key_headers_are_an_invalid_request(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    headers = [
        ("Authorization", f"Bearer {idp.mint_token()}"),
        ("Ocp-Apim-Subscription-Key", "0" * 32),
        ("Ocp-Apim-Subscription-Key", key_store.primary),
    ]
    response = await client.get("/api/v2/health", headers=headers)
    await _assert_rejected(response, 400, "AmbiguousCredentials", "invalid_request")


@pytest.mark.parametrize("parameter", ["subscription-key", "access_token"])
async def test_credentials_in_the_query_are_refused(
    client: AppClient,
    idp: LocalIdentityProvider,
    key_store: Credentials,
    parameter: str,
) -> None:
    headers = auth_headers(idp.mint_token(), key_store.primary)
    response = await client.get(
        "/api/v2/health", params={parameter: "x"}, headers=headers
    )
    body = await _assert_rejected(
        response, 400, "CredentialsInQuery", "invalid_request"
    )
    assert "header" in body["message"]


_TOKEN_CASES: list[tuple[str, dict[str, Any], str]] = [
    ("expired", {"claims": {"exp": int(time.time()) - 3600}}, "TokenExpired"),
    (
        "not-yet-valid",
        {"claims": {"nbf": int(time.time()) + 3600, "exp": int(time.time()) + 7200}},
        "TokenNotYetValid",
    ),
    ("no-exp", {"drop": ["exp"]}, "TokenClaimInvalid"),
    (
        "exp-as-string",
        {"claims": {"exp": str(int(time.time()) + 600)}},
        "TokenClaimInvalid",
    ),
    (
        "wrong-audience",
        {"claims": {"aud": "api://someone-else"}},
        "TokenAudienceNotAllowed",
    ),
    ("no-audience", {"drop": ["aud"]}, "TokenAudienceNotAllowed"),
    (
        "wrong-issuer",
        {"claims": {"iss": "https://evil.example/v2.0"}},
        "TokenIssuerNotAllowed",
    ),
    (
        "other-tenant",
        {"claims": {"tid": "11111111-2222-3333-4444-555555555555"}},
        "TokenTenantNotAllowed",
    ),
    ("unknown-kid", {"header": {"kid": "no-such-key"}}, "TokenSignatureKeyNotFound"),
    ("hs256", {"header": {"alg": "HS256"}}, "TokenInvalid"),
    ("id-token", {"claims": {"nonce": "abc"}}, "TokenInvalid"),
]


@pytest.mark.parametrize(
    ("mint", "code"),
    [(mint, code) for _, mint, code in _TOKEN_CASES],
    ids=[name for name, _, _ in _TOKEN_CASES],
)
async def test_token_failing_validation_is_invalid_token(
    client: AppClient,
    idp: LocalIdentityProvider,
    key_store: Credentials,
    mint: dict[str, Any],
    code: str,
) -> None:
    token = idp.mint_token(**mint)
    response = await client.get(
        "/api/v2/health", headers=auth_headers(token, key_store.primary)
    )
    await _assert_rejected(response, 401, code, "invalid_token")


async def test_tampered_payload_fails_the_signature(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    header, _, signature = idp.mint_token().split(".")
    _, payload, _ = idp.mint_token(roles=["Admin"]).split(".")
    forged = f"{header}.{payload}.{signature}"
    response = await client.get(
        "/api/v2/health", headers=auth_headers(forged, key_store.primary)
    )
    await _assert_rejected(response, 401, "TokenSignatureInvalid", "invalid_token")


async def test_token_without_the_role_is_forbidden(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    token = idp.mint_token(roles=["Other.Role"])
    response = await client.get(
        "/api/v2/health", headers=auth_headers(token, key_store.primary)
    )
    await _assert_rejected(response, 403, "InsufficientRole", "insufficient_scope")
    assert 'scope="Api.Access"' in response.headers["WWW-Authenticate"]


async def test_identity_provider_down_at_start_gives_503_with_retry_after(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    idp.set_outage("error")
    client = await make_client()
    response = await client.get(
        "/api/v2/health", headers=auth_headers(idp.mint_token(), key_store.primary)
    )
    body = await response.json()
    assert response.status == 503
    assert body["code"] == "IdentityProviderUnavailable"
    assert int(response.headers["Retry-After"]) >= 1
    assert "WWW-Authenticate" not in response.headers
    assert response.headers["Cache-Control"] == "no-store"
