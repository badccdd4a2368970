"""Whole requests through the chain: what is admitted, and what reaches the handler."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable

import pytest
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from service.appkeys import KEY_WATCHER, TOKEN_CACHE
from service.chain import ValidatorChain
from service.idp import LocalIdentityProvider
from service.keystore import KeyStoreWatcher
from service.settings import Settings, SettingsError
from tests.conftest import AppClient, Credentials, MakeClient, auth_headers
from validators import AuthContext, InsufficientRole


async def test_v2_token_with_the_role_is_admitted_and_identity_attached(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    token = idp.mint_token()
    response = await client.get(
        "/api/v2/whoami", headers=auth_headers(token, key_store.primary)
    )
    body = await response.json()
    assert response.status == 200
    assert body["subscription"] == {"name": "contoso", "product": "starter"}
    assert body["tid"] == idp.tenant_id
    assert body["azp"] == idp.client_id
    assert body["roles"] == ["Api.Access"]
    assert body["ver"] == "2.0"
    assert body["oid"]


async def test_v1_token_is_admitted_with_appid_as_client(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    token = idp.mint_token(version="1.0")
    response = await client.get(
        "/api/v2/whoami", headers=auth_headers(token, key_store.primary)
    )
    body = await response.json()
    assert response.status == 200
    assert body["ver"] == "1.0"
    assert body["azp"] == idp.client_id


@pytest.mark.parametrize("audience_form", ["uri", "guid"])
async def test_both_audience_forms_are_accepted(
    client: AppClient,
    idp: LocalIdentityProvider,
    key_store: Credentials,
    audience_form: str,
) -> None:
    audience = idp.audience if audience_form == "uri" else idp.app_id
    token = idp.mint_token(claims={"aud": audience})
    response = await client.get(
        "/api/v2/health", headers=auth_headers(token, key_store.primary)
    )
    assert response.status == 200


async def test_audience_array_with_one_accepted_member_is_admitted(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    token = idp.mint_token(claims={"aud": ["api://other", idp.app_id]})
    response = await client.get(
        "/api/v2/health", headers=auth_headers(token, key_store.primary)
    )
    assert response.status == 200


async def test_v2_version_with_a_v1_issuer_is_refused(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    token = idp.mint_token(claims={"iss": idp.issuer_v1, "ver": "2.0"})
    response = await client.get(
        "/api/v2/health", headers=auth_headers(token, key_store.primary)
    )
    assert response.status == 401
    assert (await response.json())["code"] == "TokenIssuerNotAllowed"


@pytest.mark.parametrize("scheme", ["bearer", "BEARER", "BeArEr"])
async def test_bearer_scheme_is_case_insensitive(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials, scheme: str
) -> None:
    headers = {
        "Authorization": f"{scheme} {idp.mint_token()}",
        "Ocp-Apim-Subscription-Key": key_store.primary,
    }
    assert (await client.get("/api/v2/health", headers=headers)).status == 200


async def test_secondary_key_is_accepted_like_the_primary(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    headers = auth_headers(idp.mint_token(), key_store.secondary)
    assert (await client.get("/api/v2/health", headers=headers)).status == 200


async def test_subscription_key_header_name_is_case_insensitive(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    headers = {
        "authorization": f"Bearer {idp.mint_token()}",
        "OCP-APIM-SUBSCRIPTION-KEY": key_store.primary,
    }
    assert (await client.get("/api/v2/health", headers=headers)).status == 200


async def test_delegated_scope_admits_when_scopes_are_configured(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(required_scopes=("Data.Read",))
    user_token = idp.mint_token(scopes="Data.Read Profile")
    near_miss = idp.mint_token(scopes="Data.ReadWrite xData.Read")
    ok = await client.get(
        "/api/v2/health", headers=auth_headers(user_token, key_store.primary)
    )
    refused = await client.get(
        "/api/v2/health", headers=auth_headers(near_miss, key_store.primary)
    )
    assert ok.status == 200
    assert refused.status == 403
    assert (await refused.json())["code"] == "InsufficientRole"


async def test_delegated_scope_does_not_admit_when_only_roles_are_configured(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    token = idp.mint_token(scopes="Api.Access")
    response = await client.get(
        "/api/v2/health", headers=auth_headers(token, key_store.primary)
    )
    assert response.status == 403


@pytest.mark.parametrize(
    "roles",
    [
        "Api.Access",
        ["api.access"],
        ["Api.Access "],
        [["Api.Access"]],
        ["NotApi.Access"],
    ],
    ids=["string", "other-case", "trailing-space", "nested", "superstring"],
)
async def test_roles_match_exact_strings_of_an_array(
    client: AppClient,
    idp: LocalIdentityProvider,
    key_store: Credentials,
    roles: object,
) -> None:
    token = idp.mint_token(roles=None, claims={"roles": roles})
    response = await client.get(
        "/api/v2/health", headers=auth_headers(token, key_store.primary)
    )
    assert response.status == 403


async def test_empty_required_roles_turn_the_role_check_off(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(required_roles=())
    token = idp.mint_token(roles=None)
    response = await client.get(
        "/api/v2/health", headers=auth_headers(token, key_store.primary)
    )
    assert response.status == 200


async def test_public_endpoints_need_no_credentials(client: AppClient) -> None:
    assert (await client.get("/livez")).status == 200
    assert (await client.get("/readyz")).status in (200, 503)


async def test_unknown_path_is_protected_before_it_is_not_found(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    anonymous = await client.get("/no/such/path")
    assert anonymous.status == 401
    known = await client.get(
        "/no/such/path", headers=auth_headers(idp.mint_token(), key_store.primary)
    )
    body = await known.json()
    assert known.status == 404
    assert body == {"statusCode": 404, "code": "NotFound", "message": "Not Found"}


async def test_caller_request_id_is_echoed_and_a_bad_one_replaced(
    client: AppClient,
) -> None:
    echoed = await client.get("/livez", headers={"x-request-id": "abc-123"})
    replaced = await client.get("/livez", headers={"x-request-id": "bad id {x}"})
    assert echoed.headers["x-request-id"] == "abc-123"
    assert replaced.headers["x-request-id"] != "bad id {x}"
    assert len(replaced.headers["x-request-id"]) == 32


async def test_key_store_change_is_picked_up_without_restart(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    headers = auth_headers(idp.mint_token(), key_store.primary)
    assert (await client.get("/api/v2/health", headers=headers)).status == 200
    key_store.store.suspend(key_store.name)
    watcher = client.app[KEY_WATCHER]
    assert isinstance(watcher, KeyStoreWatcher)
    for _ in range(250):
        response = await client.get("/api/v2/health", headers=headers)
        if response.status == 401:
            break
        await asyncio.sleep(0.02)
    assert response.status == 401
    assert (await response.json())["code"] == "SubscriptionKeyInvalid"


async def test_regenerated_key_replaces_the_old_one_without_restart(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    new_key = key_store.store.regenerate(key_store.name, "primary")
    watcher = client.app[KEY_WATCHER]
    assert isinstance(watcher, KeyStoreWatcher)
    watcher.reload_now()
    token = idp.mint_token()
    old = await client.get(
        "/api/v2/health", headers=auth_headers(token, key_store.primary)
    )
    new = await client.get("/api/v2/health", headers=auth_headers(token, new_key))
    assert old.status == 401
    assert new.status == 200


class _DenyAppValidator:
    """A user's own validator: refuses one client application."""

    name = "deny-app"

    def __init__(self, denied: str) -> None:
        self.denied = denied

    async def validate(self, context: AuthContext) -> None:
        assert context.verified is not None
        if context.verified.claims.get("azp") == self.denied:
            raise InsufficientRole("This client application is not allowed")


def deny_app_factory(settings: Settings) -> _DenyAppValidator:
    return _DenyAppValidator(str(settings.extras.get("RAG_DENIED_APP", "")))


async def test_extra_validator_from_the_factory_runs_after_the_built_ins(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    validator = _DenyAppValidator(idp.client_id)
    client = await make_client(app_kwargs={"extra_validators": [validator]})
    response = await client.get(
        "/api/v2/health", headers=auth_headers(idp.mint_token(), key_store.primary)
    )
    assert response.status == 403
    assert (await response.json())[
        "message"
    ] == "This client application is not allowed"


async def test_extra_validator_from_a_dotted_path_is_loaded(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(
        extra_validators=("tests.test_auth_flow:deny_app_factory",),
        extras={"RAG_DENIED_APP": idp.client_id},
    )
    response = await client.get(
        "/api/v2/health", headers=auth_headers(idp.mint_token(), key_store.primary)
    )
    assert response.status == 403


async def test_unloadable_extra_validator_stops_start_up(
    make_client: MakeClient,
) -> None:
    with pytest.raises(SettingsError, match="AUTH_EXTRA_VALIDATORS"):
        await make_client(extra_validators=("no.such.module:factory",))


def test_empty_chain_refuses_to_be_built() -> None:
    with pytest.raises(ValueError, match="empty"):
        ValidatorChain(())


def test_validator_without_a_validate_method_is_refused() -> None:
    class Broken:
        name = "broken"
        validate = None

    with pytest.raises(TypeError, match="validate"):
        ValidatorChain((Broken(),))  # type: ignore[arg-type]


class _Step:
    """Records its name; ``mode`` says how it answers the chain."""

    def __init__(self, name: str, mode: str, seen: list[str]) -> None:
        self.name = name
        self.mode = mode
        self.seen = seen

    def validate(self, context: AuthContext) -> Awaitable[None] | None:
        if self.mode == "sync":
            self.seen.append(self.name)
            return None
        return self._later()

    async def _later(self) -> None:
        await asyncio.sleep(0)
        self.seen.append(self.name)
        if self.mode == "fail":
            raise InsufficientRole()


async def test_plain_and_awaiting_validators_run_in_order() -> None:
    seen: list[str] = []
    chain = ValidatorChain(
        [
            _Step("a", "sync", seen),
            _Step("b", "wait", seen),
            _Step("c", "sync", seen),
            _Step("d", "wait", seen),
        ]
    )
    context = AuthContext(CIMultiDictProxy(CIMultiDict()), MultiDictProxy(MultiDict()))
    pending = chain.run(context)
    assert seen == ["a"]  # it stopped at the first step that has to wait
    assert pending is not None
    await pending
    assert seen == ["a", "b", "c", "d"]


async def test_a_failing_step_stops_the_chain() -> None:
    seen: list[str] = []
    chain = ValidatorChain(
        [_Step("a", "fail", seen), _Step("b", "sync", seen)]  # b must not run
    )
    context = AuthContext(CIMultiDictProxy(CIMultiDict()), MultiDictProxy(MultiDict()))
    pending = chain.run(context)
    assert pending is not None
    with pytest.raises(InsufficientRole):
        await pending
    assert seen == ["a"]


class _Counting:
    """A user's validator that counts its calls; ``cacheable`` as given."""

    name = "counting"

    def __init__(self, cacheable: bool) -> None:
        self.cacheable = cacheable
        self.calls = 0

    def validate(self, context: AuthContext) -> None:
        self.calls += 1


@pytest.mark.parametrize(("cacheable", "calls"), [(False, 3), (True, 1)])
async def test_extra_validators_run_on_cached_credentials_unless_cacheable(
    make_client: MakeClient,
    idp: LocalIdentityProvider,
    key_store: Credentials,
    cacheable: bool,
    calls: int,
) -> None:
    validator = _Counting(cacheable)
    client = await make_client(app_kwargs={"extra_validators": [validator]})
    headers = auth_headers(idp.mint_token(), key_store.primary)
    for _ in range(3):
        assert (await client.get("/api/v2/whoami", headers=headers)).status == 200
    assert client.app[TOKEN_CACHE].stats.hits == 2
    assert validator.calls == calls
