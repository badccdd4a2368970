"""Tests of the local identity provider, served over real HTTP."""

import asyncio
import base64
import hashlib
import json
import logging
import os
import secrets
import shlex
import shutil
import signal
import socket
import sys
import textwrap
import time
import zlib
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote_plus

import aiohttp
import pytest
import pytest_asyncio
from cryptography import x509
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from jose import jwt
from jose.exceptions import ExpiredSignatureError

from service import idp as idp_module
from service import testing
from service.idp import (
    DEFAULT_APP_ID,
    DEFAULT_TENANT_ID,
    FOREIGN_TENANT_ID,
    LocalIdentityProvider,
    Outage,
    OutageMode,
)

__all__: tuple[str, ...] = ()

REPO = Path(__file__).resolve().parent.parent
Json = dict[str, Any]


@pytest_asyncio.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    timeout = aiohttp.ClientTimeout(total=10)
    async with aiohttp.ClientSession(timeout=timeout) as client:
        yield client


# Helpers


def b64decode(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def key_by_kid(jwks: Mapping[str, Any], kid: str) -> Json:
    matches = [key for key in jwks["keys"] if key["kid"] == kid]
    assert len(matches) == 1
    return dict(matches[0])


def verify_rs256(token: str, key: Mapping[str, Any]) -> None:
    """Check the signature with cryptography alone, whatever the header says."""
    header, payload, signature = token.split(".")
    numbers = rsa.RSAPublicNumbers(
        int.from_bytes(b64decode(key["e"]), "big"),
        int.from_bytes(b64decode(key["n"]), "big"),
    )
    numbers.public_key().verify(
        b64decode(signature),
        f"{header}.{payload}".encode(),
        padding.PKCS1v15(),
        hashes.SHA256(),
    )


def decode(idp: LocalIdentityProvider, token: str, **options: Any) -> Json:
    kid = jwt.get_unverified_header(token)["kid"]
    key = key_by_kid(idp.jwks(), kid)
    claims: Json = jwt.decode(token, key, algorithms=["RS256"], **options)
    return claims


def basic_header(client_id: str, secret: str) -> dict[str, str]:
    # RFC 6749 section 2.3.1: form-encode each part, then Basic-encode the pair.
    pair = f"{quote_plus(client_id)}:{quote_plus(secret)}".encode()
    return {"Authorization": f"Basic {base64.b64encode(pair).decode()}"}


def token_form(idp: LocalIdentityProvider, **changes: str | None) -> dict[str, str]:
    form: dict[str, str | None] = {
        "grant_type": "client_credentials",
        "client_id": idp.client_id,
        "client_secret": idp.client_secret,
        "scope": idp.scope,
    }
    form.update(changes)
    return {name: value for name, value in form.items() if value is not None}


async def get_json(session: aiohttp.ClientSession, url: str) -> tuple[int, Json]:
    async with session.get(url) as response:
        return response.status, await response.json()


async def post_token(
    session: aiohttp.ClientSession, idp: LocalIdentityProvider, form: Any, **kw: Any
) -> tuple[aiohttp.ClientResponse, Json, str]:
    async with session.post(idp.token_endpoint, data=form, **kw) as response:
        text = await response.text()
        return response, json.loads(text), text


async def get_raw(
    session: aiohttp.ClientSession, url: str, **kw: Any
) -> tuple[aiohttp.ClientResponse, bytes]:
    async with session.get(url, **kw) as response:
        return response, await response.read()


# Discovery and keys


async def test_discovery_document_points_at_tenant_keys_and_token_endpoint(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    status, document = await get_json(session, local_idp.openid_config_url)

    assert status == 200
    assert document["issuer"] == local_idp.issuer
    assert document["jwks_uri"] == local_idp.jwks_uri
    assert document["token_endpoint"] == local_idp.token_endpoint
    assert document["authorization_endpoint"] == local_idp.authorization_endpoint
    assert document["id_token_signing_alg_values_supported"] == ["RS256"]
    assert "client_secret_post" in document["token_endpoint_auth_methods_supported"]


async def test_jwks_publishes_the_current_rsa_key_with_entra_fields(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    status, jwks = await get_json(session, local_idp.jwks_uri)

    assert status == 200
    (key,) = jwks["keys"]
    assert key["kty"] == "RSA"
    assert key["use"] == "sig"
    assert key["alg"] == "RS256"
    assert key["kid"] == key["x5t"] == local_idp.current_kid
    assert "=" not in key["n"] + key["e"]
    assert int.from_bytes(b64decode(key["n"]), "big").bit_length() == 2048


async def test_jwks_certificate_matches_the_key_and_its_thumbprint_is_the_kid(
    local_idp: LocalIdentityProvider,
) -> None:
    (key,) = local_idp.jwks()["keys"]
    certificate = x509.load_der_x509_certificate(base64.b64decode(key["x5c"][0]))
    public_key = certificate.public_key()

    assert isinstance(public_key, rsa.RSAPublicKey)
    assert public_key.public_numbers().n == int.from_bytes(b64decode(key["n"]), "big")
    # x5t is a SHA-1 thumbprint by definition (RFC 7517 section 4.8).
    thumbprint = certificate.fingerprint(hashes.SHA1())  # noqa: S303
    assert b64decode(key["x5t"]) == thumbprint


async def test_unknown_tenant_in_path_gets_entra_invalid_tenant_error(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    url = f"{local_idp.base_url}/{FOREIGN_TENANT_ID}/discovery/v2.0/keys"

    status, body = await get_json(session, url)

    assert status == 400
    assert body["error"] == "invalid_tenant"
    assert body["error_codes"] == [90002]
    assert body["error_description"].startswith("AADSTS90002: ")


async def test_unknown_path_is_not_found_and_not_counted(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    response, _ = await get_raw(session, f"{local_idp.base_url}/nothing/here")

    assert response.status == 404
    assert sum(local_idp.hits.values()) == 0


async def test_each_provider_generates_its_own_keys() -> None:
    first, second = LocalIdentityProvider(), LocalIdentityProvider()

    assert first.current_kid != second.current_kid
    assert first.jwks()["keys"][0]["n"] != second.jwks()["keys"][0]["n"]
    assert first.client_secret != second.client_secret


# Token endpoint


async def test_client_credentials_grant_issues_a_v2_app_token_that_verifies(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    response, body, _ = await post_token(session, local_idp, token_form(local_idp))

    assert response.status == 200
    assert response.headers["Cache-Control"] == "no-store"
    assert body["token_type"] == "Bearer"  # noqa: S105 (a type, not a secret)
    assert body["expires_in"] == body["ext_expires_in"] == 3600
    header = jwt.get_unverified_header(body["access_token"])
    assert header == {"typ": "JWT", "alg": "RS256", "kid": local_idp.current_kid}
    claims = decode(
        local_idp,
        body["access_token"],
        audience=local_idp.audience,
        issuer=local_idp.issuer,
    )
    client = local_idp.clients[local_idp.client_id]
    assert claims["aud"] == f"api://{local_idp.app_id}"
    assert claims["tid"] == local_idp.tenant_id
    assert claims["azp"] == local_idp.client_id
    assert claims["azpacr"] == "1"
    assert claims["oid"] == claims["sub"] == client.object_id
    assert claims["roles"] == ["Api.Access"]
    assert claims["ver"] == "2.0"
    assert claims["idtyp"] == "app"
    assert claims["exp"] - claims["iat"] == 3600
    assert claims["nbf"] == claims["iat"]
    assert claims["uti"]


async def test_client_secret_basic_authentication_issues_a_token(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    form = token_form(local_idp, client_id=None, client_secret=None)
    headers = basic_header(local_idp.client_id, local_idp.client_secret)

    response, body, _ = await post_token(session, local_idp, form, headers=headers)

    assert response.status == 200
    assert decode(local_idp, body["access_token"], audience=local_idp.audience)


async def test_app_id_guid_scope_is_accepted_like_entra(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    form = token_form(local_idp, scope=f"{local_idp.app_id}/.default")

    response, _, _ = await post_token(session, local_idp, form)

    assert response.status == 200


async def test_registered_client_gets_its_own_roles_and_identity(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    secret = secrets.token_urlsafe(16)
    client = local_idp.register_client("reporting-app", secret, ["Reports.Read"])
    form = token_form(local_idp, client_id="reporting-app", client_secret=secret)

    response, body, _ = await post_token(session, local_idp, form)

    assert response.status == 200
    claims = decode(local_idp, body["access_token"], audience=local_idp.audience)
    assert claims["roles"] == ["Reports.Read"]
    assert claims["azp"] == "reporting-app"
    assert claims["oid"] == client.object_id
    assert client.object_id != local_idp.clients[local_idp.client_id].object_id


async def test_client_granted_no_roles_gets_a_token_without_roles_claim(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    secret = secrets.token_urlsafe(16)
    local_idp.register_client("bare-app", secret, [])
    form = token_form(local_idp, client_id="bare-app", client_secret=secret)

    _, body, _ = await post_token(session, local_idp, form)

    claims = decode(local_idp, body["access_token"], audience=local_idp.audience)
    assert "roles" not in claims


TOKEN_ERRORS = [
    pytest.param(
        {"grant_type": None}, 400, "invalid_request", 900144, id="grant-type-missing"
    ),
    pytest.param(
        {"grant_type": "password"},
        400,
        "unsupported_grant_type",
        70003,
        id="password-grant",
    ),
    pytest.param(
        {"client_id": None}, 400, "invalid_request", 900144, id="client-id-missing"
    ),
    pytest.param({"scope": None}, 400, "invalid_request", 900144, id="scope-missing"),
    pytest.param(
        {"client_id": "00000000-0000-4000-8000-0000000000aa"},
        400,
        "unauthorized_client",
        700016,
        id="unknown-client",
    ),
    pytest.param(
        {"client_secret": None}, 401, "invalid_client", 7000216, id="secret-missing"
    ),
    pytest.param(
        {"client_secret": "not-the-secret"},
        401,
        "invalid_client",
        7000215,
        id="wrong-secret",
    ),
    pytest.param(
        {"scope": "api://whatever"}, 400, "invalid_scope", 1002012, id="no-default"
    ),
    pytest.param(
        {"scope": "api://a/.default api://b/.default"},
        400,
        "invalid_scope",
        70011,
        id="two-scopes",
    ),
    pytest.param(
        {"scope": "api://another-api/.default"},
        400,
        "invalid_resource",
        500011,
        id="unknown-resource",
    ),
]


@pytest.mark.parametrize(("changes", "status", "error", "code"), TOKEN_ERRORS)
async def test_bad_token_request_gets_entra_shaped_oauth_error(
    local_idp: LocalIdentityProvider,
    session: aiohttp.ClientSession,
    changes: dict[str, str | None],
    status: int,
    error: str,
    code: int,
) -> None:
    form = token_form(local_idp, **changes)

    response, body, text = await post_token(session, local_idp, form)

    assert response.status == status
    assert body["error"] == error
    assert body["error_codes"] == [code]
    assert body["error_description"].startswith(f"AADSTS{code}: ")
    assert response.headers["Cache-Control"] == "no-store"
    assert "access_token" not in body
    assert local_idp.client_secret not in text
    if status == 401:
        assert response.headers["WWW-Authenticate"].startswith("Basic realm=")


async def test_repeated_form_parameter_is_a_malformed_request(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    pairs = [*token_form(local_idp).items(), ("scope", local_idp.scope)]

    response, body, _ = await post_token(session, local_idp, pairs)

    assert response.status == 400
    assert body["error"] == "invalid_request"
    assert body["error_codes"] == [9002313]


async def test_client_authenticating_twice_is_a_malformed_request(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    headers = basic_header(local_idp.client_id, local_idp.client_secret)

    response, body, _ = await post_token(
        session, local_idp, token_form(local_idp), headers=headers
    )

    assert response.status == 400
    assert body["error"] == "invalid_request"


async def test_json_body_instead_of_a_form_lacks_grant_type(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    async with session.post(
        local_idp.token_endpoint, json=token_form(local_idp)
    ) as response:
        body = await response.json()

    assert response.status == 400
    assert body["error_codes"] == [900144]


async def test_token_endpoint_answers_get_with_method_not_allowed(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    response, _ = await get_raw(session, local_idp.token_endpoint)

    assert response.status == 405


async def test_token_requests_never_log_the_secret_or_the_token(
    local_idp: LocalIdentityProvider,
    session: aiohttp.ClientSession,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG, logger="rag_api_core.idp")
    wrong = "wrong-secret-canary-0123456789"

    _, body, _ = await post_token(session, local_idp, token_form(local_idp))
    await post_token(session, local_idp, token_form(local_idp, client_secret=wrong))

    token = body["access_token"]
    logged = caplog.text + repr([record.__dict__ for record in caplog.records])
    for secret in (local_idp.client_secret, wrong, token, *token.split(".")):
        assert secret not in logged
    issued = [r for r in caplog.records if r.getMessage().startswith("Token issued")]
    assert (
        issued[0].__dict__["token_fp"]
        == hashlib.sha256(token.encode()).hexdigest()[:12]
    )


# Minting


async def test_minted_token_verifies_with_the_published_key_and_default_claims(
    local_idp: LocalIdentityProvider,
) -> None:
    token = local_idp.mint_token()

    claims = decode(
        local_idp, token, audience=local_idp.audience, issuer=local_idp.issuer
    )
    assert claims["roles"] == ["Api.Access"]
    assert claims["tid"] == local_idp.tenant_id
    assert claims["azp"] == local_idp.client_id
    assert claims["ver"] == "2.0"


async def test_minted_token_claims_override_and_extend_the_defaults(
    local_idp: LocalIdentityProvider,
) -> None:
    token = local_idp.mint_token(claims={"aud": local_idp.app_id, "extra": [1, 2]})

    claims = decode(local_idp, token, audience=local_idp.app_id)
    assert claims["aud"] == local_idp.app_id
    assert claims["extra"] == [1, 2]


async def test_minted_token_claims_can_have_wrong_types_for_attack_tests(
    local_idp: LocalIdentityProvider,
) -> None:
    token = local_idp.mint_token(claims={"exp": "tomorrow", "roles": "Api.Access"})

    claims = jwt.get_unverified_claims(token)
    assert claims["exp"] == "tomorrow"
    assert claims["roles"] == "Api.Access"
    verify_rs256(token, key_by_kid(local_idp.jwks(), local_idp.current_kid))


async def test_dropped_claims_are_left_out_of_the_minted_token(
    local_idp: LocalIdentityProvider,
) -> None:
    token = local_idp.mint_token(drop=("exp", "roles", "tid"))

    claims = jwt.get_unverified_claims(token)
    assert not {"exp", "roles", "tid"} & claims.keys()
    assert "aud" in claims


async def test_dropping_a_claim_that_is_not_there_is_an_error(
    local_idp: LocalIdentityProvider,
) -> None:
    with pytest.raises(ValueError, match="epx"):
        local_idp.mint_token(drop=("epx",))


async def test_v1_token_uses_the_v1_issuer_and_appid(
    local_idp: LocalIdentityProvider,
) -> None:
    token = local_idp.mint_token(version="1.0")

    claims = decode(
        local_idp, token, audience=local_idp.audience, issuer=local_idp.issuer_v1
    )
    assert claims["ver"] == "1.0"
    assert claims["appid"] == local_idp.client_id
    assert claims["appidacr"] == "1"
    assert "azp" not in claims
    assert local_idp.issuer_v1.endswith(f"/{local_idp.tenant_id}/")
    assert jwt.get_unverified_header(token)["x5t"] == local_idp.current_kid


async def test_unknown_token_version_is_an_error(
    local_idp: LocalIdentityProvider,
) -> None:
    with pytest.raises(ValueError, match="version"):
        local_idp.mint_token(version="3.0")  # type: ignore[arg-type]


async def test_token_with_negative_lifetime_is_already_expired(
    local_idp: LocalIdentityProvider,
) -> None:
    token = local_idp.mint_token(lifetime=-120)

    with pytest.raises(ExpiredSignatureError):
        decode(local_idp, token, audience=local_idp.audience)


async def test_delegated_token_carries_scopes_and_no_roles(
    local_idp: LocalIdentityProvider,
) -> None:
    token = local_idp.mint_token(scopes="Files.Read user_impersonation")

    claims = decode(local_idp, token, audience=local_idp.audience)
    assert claims["scp"] == "Files.Read user_impersonation"
    assert claims["idtyp"] == "user"
    assert "roles" not in claims
    assert claims["oid"] != local_idp.clients[local_idp.client_id].object_id


async def test_roles_none_omits_the_claim_and_empty_roles_give_an_empty_list(
    local_idp: LocalIdentityProvider,
) -> None:
    without = jwt.get_unverified_claims(local_idp.mint_token(roles=None))
    empty = jwt.get_unverified_claims(local_idp.mint_token(roles=()))

    assert "roles" not in without
    assert empty["roles"] == []


async def test_header_overrides_are_signed_as_given_with_the_current_key(
    local_idp: LocalIdentityProvider,
) -> None:
    token = local_idp.mint_token(
        header={"alg": "none", "kid": "unknown"}, drop_header=("typ",)
    )

    assert jwt.get_unverified_header(token) == {"alg": "none", "kid": "unknown"}
    verify_rs256(token, key_by_kid(local_idp.jwks(), local_idp.current_kid))


async def test_minting_with_a_key_that_never_existed_is_an_error(
    local_idp: LocalIdentityProvider,
) -> None:
    with pytest.raises(ValueError, match="No signing key"):
        local_idp.mint_token(kid="never-existed")


async def test_sign_raw_signs_exactly_the_given_bytes(
    local_idp: LocalIdentityProvider,
) -> None:
    kid = local_idp.current_kid
    header = f'{{"alg":"RS256","kid":"{kid}","alg":"none"}}'.encode()
    payload = b'{"aud":"a","aud":"b","exp":NaN}'

    token = local_idp.sign_raw(header, payload)

    header_segment, payload_segment, _ = token.split(".")
    assert b64decode(header_segment) == header
    assert b64decode(payload_segment) == payload
    assert "=" not in token
    verify_rs256(token, key_by_kid(local_idp.jwks(), kid))


async def test_sign_raw_refuses_text(local_idp: LocalIdentityProvider) -> None:
    with pytest.raises(TypeError):
        local_idp.sign_raw("{}", b"{}")  # type: ignore[arg-type]


# Keys


async def test_rotation_publishes_a_new_key_and_keeps_the_old_one(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    old_kid = local_idp.current_kid
    old_token = local_idp.mint_token()

    new_kid = local_idp.rotate_key()

    _, jwks = await get_json(session, local_idp.jwks_uri)
    assert [key["kid"] for key in jwks["keys"]] == [old_kid, new_kid]
    assert local_idp.kids == (old_kid, new_kid)
    assert local_idp.current_kid == new_kid
    new_token = local_idp.mint_token()
    assert jwt.get_unverified_header(new_token)["kid"] == new_kid
    verify_rs256(new_token, key_by_kid(jwks, new_kid))
    verify_rs256(old_token, key_by_kid(jwks, old_kid))


async def test_removed_key_is_no_longer_published_but_can_still_sign(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    old_kid = local_idp.current_kid
    new_kid = local_idp.rotate_key()

    local_idp.remove_key(old_kid)

    _, jwks = await get_json(session, local_idp.jwks_uri)
    assert [key["kid"] for key in jwks["keys"]] == [new_kid]
    orphan = local_idp.mint_token(kid=old_kid)
    assert jwt.get_unverified_header(orphan)["kid"] == old_kid


async def test_removing_the_current_key_makes_the_newest_remaining_one_current(
    local_idp: LocalIdentityProvider,
) -> None:
    first = local_idp.current_kid
    second = local_idp.rotate_key()
    third = local_idp.rotate_key()

    local_idp.remove_key(third)

    assert local_idp.current_kid == second
    assert local_idp.kids == (first, second)


async def test_removing_every_key_publishes_an_empty_set_and_still_signs(
    local_idp: LocalIdentityProvider,
) -> None:
    kid = local_idp.current_kid

    local_idp.remove_key(kid)

    assert local_idp.jwks() == {"keys": []}
    assert jwt.get_unverified_header(local_idp.mint_token())["kid"] == kid


async def test_removing_an_unpublished_key_is_an_error(
    local_idp: LocalIdentityProvider,
) -> None:
    with pytest.raises(ValueError, match="not published"):
        local_idp.remove_key("never-existed")


# Outages


async def test_error_mode_answers_503_on_discovery_and_keys_only(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("error")

    discovery, _ = await get_raw(session, local_idp.openid_config_url)
    keys, _ = await get_raw(session, local_idp.jwks_uri)
    token, _, _ = await post_token(session, local_idp, token_form(local_idp))

    assert (discovery.status, keys.status, token.status) == (503, 503, 200)


async def test_outage_naming_the_token_endpoint_breaks_only_that(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("error", status=500, endpoints=("token",))

    keys, _ = await get_raw(session, local_idp.jwks_uri)
    async with session.post(
        local_idp.token_endpoint, data=token_form(local_idp)
    ) as token:
        pass

    assert (keys.status, token.status) == (200, 500)


async def test_status_mode_answers_the_code_with_retry_after(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("status", status=429, retry_after=120)

    response, _ = await get_raw(session, local_idp.jwks_uri)

    assert response.status == 429
    assert response.headers["Retry-After"] == "120"


async def test_html_mode_answers_a_captive_portal_page(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("html")

    response, body = await get_raw(session, local_idp.openid_config_url)

    assert response.status == 200
    assert response.content_type == "text/html"
    assert body.startswith(b"<!DOCTYPE html>")


async def test_empty_keys_mode_empties_the_key_set_and_keeps_discovery(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("empty_keys")

    _, jwks = await get_json(session, local_idp.jwks_uri)
    _, discovery = await get_json(session, local_idp.openid_config_url)

    assert jwks == {"keys": []}
    assert discovery["issuer"] == local_idp.issuer


async def test_invalid_json_mode_answers_truncated_json(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("invalid_json")

    response, body = await get_raw(session, local_idp.jwks_uri)

    assert response.status == 200
    assert response.content_type == "application/json"
    with pytest.raises(json.JSONDecodeError):
        json.loads(body)


async def test_oversized_mode_answers_valid_json_over_two_mib(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("oversized")

    _, body = await get_raw(session, local_idp.jwks_uri)

    assert len(body) > 2 * 1024 * 1024
    assert json.loads(body)["keys"] == local_idp.jwks()["keys"]


async def test_oversized_mode_size_can_be_chosen(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("oversized", size=3 * 1024 * 1024)

    _, body = await get_raw(session, local_idp.openid_config_url)

    assert len(body) == 3 * 1024 * 1024
    assert json.loads(body)["issuer"] == local_idp.issuer


async def test_gzip_bomb_mode_inflates_far_beyond_what_it_sends(
    local_idp: LocalIdentityProvider,
) -> None:
    local_idp.set_outage("gzip_bomb", size=16 * 1024 * 1024)

    async with aiohttp.ClientSession(auto_decompress=False) as raw_session:
        response, body = await get_raw(raw_session, local_idp.jwks_uri)

    assert response.headers["Content-Encoding"] == "gzip"
    assert len(body) < 1024 * 1024
    inflated = zlib.decompress(body, 31)
    assert len(inflated) > 16 * 1024 * 1024
    assert json.loads(inflated) == {"keys": []}


async def test_body_mode_answers_the_given_bytes(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("body", body=b'{"keys":"x"}', content_type="text/plain")

    response, body = await get_raw(session, local_idp.jwks_uri)

    assert response.status == 200
    assert response.content_type == "text/plain"
    assert body == b'{"keys":"x"}'


async def test_foreign_issuer_mode_names_another_tenant_in_discovery(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("foreign_issuer")

    _, discovery = await get_json(session, local_idp.openid_config_url)
    _, jwks = await get_json(session, local_idp.jwks_uri)

    assert discovery["issuer"] == f"{local_idp.base_url}/{FOREIGN_TENANT_ID}/v2.0"
    assert discovery["jwks_uri"] == local_idp.jwks_uri
    assert jwks == local_idp.jwks()


async def test_redirect_mode_sends_a_redirect_to_another_host(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("redirect")

    response, _ = await get_raw(session, local_idp.jwks_uri, allow_redirects=False)

    assert response.status == 302
    location = response.headers["Location"]
    assert location.startswith("http://idp.invalid/")
    assert location.endswith("/discovery/v2.0/keys")


async def test_redirect_mode_location_and_status_can_be_chosen(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("redirect", status=307, location="http://evil.test/keys")

    response, _ = await get_raw(session, local_idp.jwks_uri, allow_redirects=False)

    assert response.status == 307
    assert response.headers["Location"] == "http://evil.test/keys"


async def test_slow_mode_answers_normally_after_the_delay(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("slow", delay=0.3)
    started = time.monotonic()

    status, jwks = await get_json(session, local_idp.jwks_uri)

    assert time.monotonic() - started >= 0.3
    assert status == 200
    assert jwks == local_idp.jwks()


async def test_delay_composes_with_other_modes(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("status", status=500, delay=0.2)
    started = time.monotonic()

    response, _ = await get_raw(session, local_idp.jwks_uri)

    assert time.monotonic() - started >= 0.2
    assert response.status == 500


async def test_slow_mode_outlasts_a_short_client_timeout(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("slow")

    with pytest.raises(TimeoutError):
        await get_raw(
            session, local_idp.jwks_uri, timeout=aiohttp.ClientTimeout(total=0.3)
        )


async def test_trickle_mode_sends_the_whole_document_in_single_bytes(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("trickle", delay=0)

    status, jwks = await get_json(session, local_idp.jwks_uri)

    assert status == 200
    assert jwks == local_idp.jwks()


async def test_trickle_mode_stalls_a_client_reading_the_body(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("trickle", delay=5)
    timeout = aiohttp.ClientTimeout(sock_read=0.3)

    async with session.get(local_idp.jwks_uri, timeout=timeout) as response:
        assert response.status == 200
        with pytest.raises(TimeoutError):
            await response.read()


async def test_hang_mode_holds_requests_until_the_mode_changes(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("hang")
    request = asyncio.ensure_future(get_json(session, local_idp.jwks_uri))
    await asyncio.sleep(0.3)
    assert not request.done()

    local_idp.set_outage("ok")

    status, jwks = await asyncio.wait_for(request, 5)
    assert status == 200
    assert jwks == local_idp.jwks()


async def test_hang_mode_outlasts_a_client_timeout(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("hang")

    with pytest.raises(TimeoutError):
        await get_raw(
            session, local_idp.openid_config_url, timeout=aiohttp.ClientTimeout(0.3)
        )


async def test_closing_releases_hung_requests_promptly(
    session: aiohttp.ClientSession,
) -> None:
    provider = LocalIdentityProvider()
    await provider.start()
    provider.set_outage("hang")
    request = asyncio.ensure_future(get_raw(session, provider.jwks_uri))
    await asyncio.sleep(0.2)
    started = time.monotonic()

    await provider.close()

    assert time.monotonic() - started < 2
    results = await asyncio.gather(request, return_exceptions=True)
    outcome = results[0]
    if not isinstance(outcome, BaseException):
        assert outcome[0].status == 503
    else:
        assert isinstance(outcome, aiohttp.ClientError)


async def test_reset_mode_drops_the_connection_and_keeps_the_token_endpoint(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("reset")

    with pytest.raises(aiohttp.ClientConnectionError):
        await get_raw(session, local_idp.jwks_uri)
    token, _, _ = await post_token(session, local_idp, token_form(local_idp))

    assert token.status == 200
    assert local_idp.hits["jwks"] >= 1


async def test_refuse_mode_refuses_connections_then_recovers_on_the_same_port(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    await get_raw(session, local_idp.jwks_uri)
    local_idp.set_outage("refuse")

    for url in (local_idp.jwks_uri, local_idp.openid_config_url):
        with pytest.raises(aiohttp.ClientConnectionError):
            await get_raw(session, url)
    with pytest.raises(aiohttp.ClientConnectorError):
        await post_token(session, local_idp, token_form(local_idp))

    local_idp.set_outage("ok")
    status, _ = await get_json(session, local_idp.jwks_uri)
    assert status == 200


async def test_refuse_toggled_within_one_step_still_ends_in_the_last_mode(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("refuse")
    local_idp.set_outage("ok")
    local_idp.set_outage("refuse")
    await asyncio.sleep(0.05)

    with pytest.raises(aiohttp.ClientConnectionError):
        await get_raw(session, local_idp.jwks_uri)

    local_idp.set_outage("ok")
    local_idp.set_outage("refuse")
    local_idp.set_outage("ok")
    status, _ = await get_json(session, local_idp.jwks_uri)
    assert status == 200


async def test_refuse_mode_needs_a_started_provider() -> None:
    with pytest.raises(RuntimeError, match="started"):
        LocalIdentityProvider().set_outage("refuse")


async def test_hits_count_requests_per_kind_during_outages_too(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    await get_raw(session, local_idp.openid_config_url)
    await get_raw(session, local_idp.jwks_uri)
    local_idp.set_outage("error")
    await get_raw(session, local_idp.jwks_uri)
    await post_token(
        session, local_idp, token_form(local_idp, client_secret=secrets.token_hex(8))
    )

    assert local_idp.hits == {"discovery": 1, "jwks": 2, "token": 1}


async def test_outage_ok_ends_the_fault(
    local_idp: LocalIdentityProvider, session: aiohttp.ClientSession
) -> None:
    local_idp.set_outage("error")
    local_idp.set_outage("ok")

    status, _ = await get_json(session, local_idp.jwks_uri)

    assert status == 200
    assert local_idp.outage == Outage()


@pytest.mark.parametrize(
    ("mode", "options", "message"),
    [
        pytest.param("down", {}, "down", id="unknown-mode"),
        pytest.param("status", {}, "status code", id="status-without-code"),
        pytest.param("redirect", {"status": 200}, "redirect", id="redirect-200"),
        pytest.param("slow", {"delay": -1}, "negative", id="negative-delay"),
        pytest.param(
            "error", {"endpoints": ("authorize",)}, "endpoints", id="bad-kind"
        ),
        pytest.param("error", {"endpoints": ()}, "endpoints", id="no-endpoints"),
        pytest.param("error", {"status": 999}, "status", id="not-http-status"),
    ],
)
async def test_invalid_outage_is_refused_and_the_mode_is_kept(
    local_idp: LocalIdentityProvider,
    mode: str,
    options: dict[str, Any],
    message: str,
) -> None:
    local_idp.set_outage("html")

    with pytest.raises(ValueError, match=message):
        local_idp.set_outage(mode, **options)

    assert local_idp.outage.mode is OutageMode.HTML


# Lifecycle


async def test_addresses_follow_the_entra_layout(
    local_idp: LocalIdentityProvider,
) -> None:
    base, tenant = local_idp.base_url, local_idp.tenant_id

    assert base == f"http://127.0.0.1:{local_idp.port}"
    assert local_idp.port != 0
    assert local_idp.issuer == f"{base}/{tenant}/v2.0"
    assert local_idp.issuer_v1 == f"{base}/{tenant}/"
    assert local_idp.openid_config_url == (
        f"{base}/{tenant}/v2.0/.well-known/openid-configuration"
    )
    assert local_idp.jwks_uri == f"{base}/{tenant}/discovery/v2.0/keys"
    assert local_idp.token_endpoint == f"{base}/{tenant}/oauth2/v2.0/token"
    assert local_idp.audience == f"api://{DEFAULT_APP_ID}"
    assert local_idp.scope == f"api://{DEFAULT_APP_ID}/.default"
    assert tenant == DEFAULT_TENANT_ID


async def test_addresses_need_a_started_provider() -> None:
    provider = LocalIdentityProvider()

    with pytest.raises(RuntimeError, match="not started"):
        _ = provider.base_url


async def test_ids_must_be_guids_and_are_lowercased() -> None:
    provider = LocalIdentityProvider(
        tenant_id="AAAAAAAA-0000-4000-8000-000000000001", app_id=DEFAULT_APP_ID
    )

    assert provider.tenant_id == "aaaaaaaa-0000-4000-8000-000000000001"
    with pytest.raises(ValueError, match="tenant_id"):
        LocalIdentityProvider(tenant_id="contoso.onmicrosoft.com")
    with pytest.raises(ValueError, match="app_id"):
        LocalIdentityProvider(app_id="not-a-guid")


async def test_custom_audience_is_stamped_and_accepted_as_a_scope(
    session: aiohttp.ClientSession,
) -> None:
    async with LocalIdentityProvider(audience=DEFAULT_APP_ID) as provider:
        response, body, _ = await post_token(session, provider, token_form(provider))

        claims = decode(provider, body["access_token"], audience=DEFAULT_APP_ID)
    assert response.status == 200
    assert claims["aud"] == DEFAULT_APP_ID


async def test_explicit_port_and_token_lifetime_are_honoured(
    session: aiohttp.ClientSession,
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]

    async with LocalIdentityProvider(port=port, token_lifetime=60) as provider:
        _, body, _ = await post_token(session, provider, token_form(provider))

    assert provider.base_url == f"http://127.0.0.1:{port}"
    assert body["expires_in"] == 60


async def test_provider_starts_only_once_and_closes_idempotently() -> None:
    provider = LocalIdentityProvider()
    await provider.start()

    with pytest.raises(RuntimeError, match="only once"):
        await provider.start()
    await provider.close()
    await provider.close()
    with pytest.raises(RuntimeError, match="only once"):
        await provider.start()


async def test_port_in_use_fails_start_without_leaking(
    local_idp: LocalIdentityProvider,
) -> None:
    provider = LocalIdentityProvider(port=local_idp.port)

    with pytest.raises(OSError):
        await provider.start()


# The command and the plugin


async def read_until_curl(stream: asyncio.StreamReader) -> list[str]:
    lines: list[str] = []
    while not lines or not lines[-1].startswith("curl "):
        line = await asyncio.wait_for(stream.readline(), 20)
        if not line:
            raise AssertionError(f"no curl line in {lines}")
        lines.append(line.decode().rstrip("\n"))
    return lines


async def test_run_idp_prints_a_working_curl_command_and_exits_cleanly() -> None:
    script = textwrap.dedent(
        """
        import asyncio, contextlib, signal
        from service.idp import run_idp
        # As in a terminal: a test run started in the background (`cmd &` in a
        # script) has SIGINT ignored, and children inherit that.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        with contextlib.suppress(KeyboardInterrupt):
            asyncio.run(run_idp("127.0.0.1", 0, None, None))
        """
    )
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-X",
        "dev",
        "-c",
        script,
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    assert process.stdout is not None
    try:
        lines = await read_until_curl(process.stdout)
        await assert_curl_gets_a_token(lines[-1])
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = await asyncio.wait_for(process.communicate(), 20)

    banner = "\n".join(lines)
    assert "client secret:" in banner
    assert f"/{DEFAULT_TENANT_ID}/v2.0/.well-known/openid-configuration" in banner
    assert process.returncode == 0, stderr.decode()
    assert stderr.decode().strip() == ""


async def assert_curl_gets_a_token(command: str) -> None:
    if shutil.which("curl") is None:
        pytest.skip("curl is not installed")
    curl = await asyncio.create_subprocess_exec(
        *shlex.split(command), stdout=asyncio.subprocess.PIPE
    )
    output, _ = await asyncio.wait_for(curl.communicate(), 20)
    body = json.loads(output)
    assert body["token_type"] == "Bearer"  # noqa: S105 (a type, not a secret)
    assert jwt.get_unverified_claims(body["access_token"])["roles"] == ["Api.Access"]


PLUGIN_TEST = """
import aiohttp
{marker}


async def test_users_fixture(local_idp):
    async with aiohttp.ClientSession() as session:
        async with session.get(local_idp.jwks_uri) as response:
            assert response.status == 200
    assert local_idp.hits["jwks"] == 1
"""


@pytest.mark.parametrize(
    ("mode", "marker"),
    [
        pytest.param("auto", "", id="auto-mode"),
        pytest.param(
            "strict", "import pytest\npytestmark = pytest.mark.asyncio", id="strict"
        ),
    ],
)
async def test_plugin_fixture_works_in_a_users_test_suite(
    tmp_path: Path, mode: str, marker: str
) -> None:
    (tmp_path / "test_users.py").write_text(PLUGIN_TEST.format(marker=marker))
    (tmp_path / "pytest.ini").write_text(
        "[pytest]\n"
        f"asyncio_mode = {mode}\n"
        "asyncio_default_fixture_loop_scope = function\n"
        "filterwarnings = error\n"
    )
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    process = await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-p",
        "no:cacheprovider",
        cwd=tmp_path,
        env=env,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output, _ = await asyncio.wait_for(process.communicate(), 60)

    assert process.returncode == 0, output.decode()
    assert "1 passed" in output.decode()


def test_testing_module_reexports_the_provider() -> None:
    assert testing.LocalIdentityProvider is LocalIdentityProvider
    assert set(testing.__all__) == {"LocalIdentityProvider", "local_idp"}


def test_every_public_name_is_exported() -> None:
    for name in idp_module.__all__:
        assert getattr(idp_module, name) is not None
    assert not [name for name in idp_module.__all__ if name.startswith("_")]


@pytest.mark.parametrize(
    "authorization",
    [
        pytest.param("Bearer abc", id="bearer-scheme"),
        pytest.param("Basic !!!", id="not-base64"),
        pytest.param(f"Basic {base64.b64encode(b'no-colon').decode()}", id="no-colon"),
    ],
)
async def test_malformed_client_authorization_header_is_a_malformed_request(
    local_idp: LocalIdentityProvider,
    session: aiohttp.ClientSession,
    authorization: str,
) -> None:
    form = token_form(local_idp, client_secret=None)
    headers = {"Authorization": authorization}

    response, body, _ = await post_token(session, local_idp, form, headers=headers)

    assert response.status == 400
    assert body["error"] == "invalid_request"


async def test_closing_while_refusing_frees_the_port() -> None:
    provider = LocalIdentityProvider()
    await provider.start()
    provider.set_outage("refuse")

    await provider.close()

    with socket.socket() as probe:
        probe.bind(("127.0.0.1", provider.port))


async def test_minting_for_an_unregistered_client_is_an_error(
    local_idp: LocalIdentityProvider,
) -> None:
    with pytest.raises(ValueError, match="not registered"):
        local_idp.mint_token(client_id="nobody")


async def test_registering_a_client_twice_is_an_error(
    local_idp: LocalIdentityProvider,
) -> None:
    with pytest.raises(ValueError, match="already registered"):
        local_idp.register_client(local_idp.client_id, secrets.token_urlsafe(16))
