"""The OpenAPI document: valid, pinned, complete, and true to what the service sends.

Refresh the snapshot after an intended change with
``UPDATE_SNAPSHOTS=1 .venv/bin/python -m pytest tests/test_openapi.py -k snapshot``
and review ``git diff tests/snapshots/openapi.json``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from openapi_schema_validator import OAS30Validator
from openapi_spec_validator import OpenAPIV30SpecValidator, validate

from service.app import create_app
from service.cli import main
from service.idp import LocalIdentityProvider
from service.openapi import (
    BEARER_SCHEME,
    SUBSCRIPTION_KEY_SCHEME,
    build_openapi,
    documented,
    render_openapi,
)
from service.policy import policy_of, public, requires
from service.settings import Settings
from tests.conftest import AppClient, Credentials, MakeClient, auth_headers
from validators import AuthError

SNAPSHOT = Path(__file__).parent / "snapshots" / "openapi.json"
SNAPSHOT_TENANT = "72f988bf-86f1-41af-91ab-2d7cd011db47"
SNAPSHOT_APP_ID = "3f1c2b8e-5d4a-4e6f-9a7b-0c1d2e3f4a5b"
BOTH: list[dict[str, list[str]]] = [{SUBSCRIPTION_KEY_SCHEME: [], BEARER_SCHEME: []}]
AUTH_STATUSES = ("400", "401", "403", "429", "503")


def _snapshot_settings(keys_file: Path) -> Settings:
    return Settings(
        tenant_id=SNAPSHOT_TENANT,
        audiences=(f"api://{SNAPSHOT_APP_ID}", SNAPSHOT_APP_ID),
        subscription_keys_file=keys_file,
    )


@requires(roles=("Reports.Read",), scopes=("reports.read",))
@documented("A report for the test", tag="reports")
async def _report(request: web.Request) -> web.Response:
    return web.json_response({"report": "ok"})


@public
async def _open_status(request: web.Request) -> web.Response:
    """An open status page added by the test."""
    return web.json_response({"open": True})


async def _item(request: web.Request) -> web.Response:
    return web.json_response({"item": request.match_info["item_id"]})


async def _document(client: AppClient) -> dict[str, Any]:
    response = await client.get("/api/docs/openapi.json")
    assert response.status == 200
    document: dict[str, Any] = orjson.loads(await response.read())
    return document


def _operations(document: dict[str, Any]) -> dict[tuple[str, str], Any]:
    return {
        (path, method): operation
        for path, item in document["paths"].items()
        for method, operation in item.items()
    }


def _schema(document: dict[str, Any], name: str) -> OAS30Validator:
    return OAS30Validator(document["components"]["schemas"][name])


def _codes_in_tree() -> set[str]:
    found: set[str] = {AuthError.code}
    pending: list[type[AuthError]] = [AuthError]
    while pending:
        for subclass in pending.pop().__subclasses__():
            found.add(subclass.code)
            pending.append(subclass)
    return found


def _clear_settings_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    prefixes = ("ENTRA_", "APIM_", "AUTH_", "DOCS_", "RAG_", "CACHE_", "JWKS_")
    for name in list(os.environ):
        if name.startswith(prefixes):
            monkeypatch.delenv(name)


async def test_served_document_is_valid_openapi_3_0(client: AppClient) -> None:
    document = await _document(client)

    validate(document, cls=OpenAPIV30SpecValidator)
    assert document["openapi"] == "3.0.3"


def test_document_matches_the_snapshot(key_store: Credentials) -> None:
    app = create_app(_snapshot_settings(key_store.store.path))
    rendered = render_openapi(build_openapi(app))

    if os.environ.get("UPDATE_SNAPSHOTS") == "1":
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail("UPDATE_SNAPSHOTS=1 in CI would make this test pass blindly")
        SNAPSHOT.parent.mkdir(exist_ok=True)
        SNAPSHOT.write_bytes(rendered)
        pytest.skip(f"snapshot rewritten: review git diff {SNAPSHOT}")
    assert SNAPSHOT.is_file(), "no snapshot: run once with UPDATE_SNAPSHOTS=1"
    assert rendered.decode() == SNAPSHOT.read_text(encoding="utf-8"), (
        "the OpenAPI document changed: if intended, refresh with UPDATE_SNAPSHOTS=1"
    )


def test_snapshot_is_itself_a_valid_document() -> None:
    validate(orjson.loads(SNAPSHOT.read_bytes()), cls=OpenAPIV30SpecValidator)


async def test_every_route_including_ones_added_later_is_in_the_document(
    make_client: MakeClient,
) -> None:
    client = await make_client(
        routes=[
            ("/api/v2/reports", _report),
            ("/status", _open_status),
            ("/api/v2/items/{item_id}", _item),
        ]
    )
    document = await _document(client)
    operations = _operations(document)

    routes = {
        (route.resource.canonical, route.method.lower()): route
        for route in client.app.router.routes()
        if route.method != "HEAD" and route.resource is not None
    }
    # The gate's catch-all for unknown paths (401, then 404 or 405) is no operation.
    assert ("/{path}", "*") in routes
    del routes[("/{path}", "*")]
    assert set(operations) == set(routes)
    for key, route in routes.items():
        expected = [] if policy_of(route.handler).public else BOTH
        assert operations[key]["security"] == expected, key


async def test_route_with_its_own_roles_documents_them_and_every_auth_response(
    make_client: MakeClient,
) -> None:
    client = await make_client(routes=[("/api/v2/reports", _report)])
    operation = _operations(await _document(client))[("/api/v2/reports", "get")]

    assert operation["summary"] == "A report for the test"
    assert operation["tags"] == ["reports"]
    assert operation["x-entra-required-roles"] == ["Reports.Read"]
    assert operation["x-entra-required-scopes"] == ["reports.read"]
    assert "`Reports.Read`" in operation["description"]
    assert "`reports.read`" in operation["description"]
    for status in AUTH_STATUSES:
        assert status in operation["responses"], status


async def test_undescribed_route_takes_its_summary_from_the_docstring(
    make_client: MakeClient,
) -> None:
    client = await make_client(routes=[("/status", _open_status)])
    operation = _operations(await _document(client))[("/status", "get")]

    assert operation["summary"] == "An open status page added by the test."
    assert operation["security"] == []


async def test_path_variables_are_declared_as_parameters(
    make_client: MakeClient,
) -> None:
    client = await make_client(routes=[("/api/v2/items/{item_id}", _item)])
    document = await _document(client)
    operation = _operations(document)[("/api/v2/items/{item_id}", "get")]

    validate(document, cls=OpenAPIV30SpecValidator)
    assert {"in": "path", "name": "item_id", "required": True}.items() <= next(
        p for p in operation["parameters"] if p.get("in") == "path"
    ).items()


async def test_protected_operations_need_both_credentials_in_one_requirement(
    client: AppClient,
) -> None:
    document = await _document(client)
    operations = _operations(document)

    for key in (("/api/v2/health", "get"), ("/api/v2/whoami", "get")):
        operation = operations[key]
        assert operation["security"] == BOTH, key
        for status in AUTH_STATUSES:
            assert status in operation["responses"], (key, status)
    assert document["security"] == BOTH


async def test_public_operations_say_so_and_list_no_auth_rejections(
    client: AppClient,
) -> None:
    operations = _operations(await _document(client))

    for key in (("/livez", "get"), ("/readyz", "get"), ("/api/docs", "get")):
        operation = operations[key]
        assert operation["security"] == [], key
        assert not {"400", "401", "403", "429"} & set(operation["responses"]), key
    assert "503" in operations[("/readyz", "get")]["responses"]


async def test_security_schemes_are_the_key_header_and_the_entra_bearer(
    client: AppClient, idp: LocalIdentityProvider
) -> None:
    schemes = (await _document(client))["components"]["securitySchemes"]

    assert schemes[SUBSCRIPTION_KEY_SCHEME] == {
        "type": "apiKey",
        "in": "header",
        "name": "Ocp-Apim-Subscription-Key",
        "description": schemes[SUBSCRIPTION_KEY_SCHEME]["description"],
    }
    bearer = schemes[BEARER_SCHEME]
    assert (bearer["type"], bearer["scheme"], bearer["bearerFormat"]) == (
        "http",
        "bearer",
        "JWT",
    )
    assert idp.tenant_id in bearer["description"]
    assert idp.audience in bearer["description"]
    assert idp.app_id in bearer["description"]
    assert "`Api.Access`" in bearer["description"]


async def test_bearer_description_follows_the_configured_scopes(
    make_client: MakeClient,
) -> None:
    client = await make_client(required_roles=(), required_scopes=("rag.query",))
    document = await _document(client)
    bearer = document["components"]["securitySchemes"][BEARER_SCHEME]
    health = _operations(document)[("/api/v2/health", "get")]

    assert "`rag.query` in `scp`" in bearer["description"]
    assert "Api.Access" not in bearer["description"]
    assert health["x-entra-required-scopes"] == ["rag.query"]


async def test_error_code_enum_lists_every_code_of_the_rejection_tree(
    client: AppClient,
) -> None:
    schema = (await _document(client))["components"]["schemas"]["AuthError"]

    assert set(schema["properties"]["code"]["enum"]) == _codes_in_tree()
    assert schema["required"] == ["statusCode", "code", "message"]
    assert schema["properties"]["statusCode"]["type"] == "integer"
    assert schema["properties"]["message"]["type"] == "string"


async def test_rejection_responses_document_their_headers(client: AppClient) -> None:
    responses = (await _document(client))["components"]["responses"]

    def headers(name: str) -> set[str]:
        return set(responses[name]["headers"])

    rate_limit = {"RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset"}
    for name in ("BadRequest", "Unauthorized", "Forbidden"):
        assert {"WWW-Authenticate", "x-request-id"} | rate_limit <= headers(name)
    for name in ("TooManyRequests", "ServiceUnavailable"):
        assert {"Retry-After", "x-request-id"} | rate_limit <= headers(name)
        assert "WWW-Authenticate" not in headers(name)


async def test_every_example_matches_its_schema(client: AppClient) -> None:
    document = await _document(client)
    auth_error = _schema(document, "AuthError")

    examples = [
        example["value"]
        for response in document["components"]["responses"].values()
        for media in response.get("content", {}).values()
        for example in media.get("examples", {}).values()
    ]
    assert {body["code"] for body in examples} == _codes_in_tree()
    for body in examples:
        auth_error.validate(body)


async def test_missing_key_rejection_matches_the_documented_401(
    client: AppClient, idp: LocalIdentityProvider
) -> None:
    document = await _document(client)

    response = await client.get(
        "/api/v2/health", headers={"Authorization": f"Bearer {idp.mint_token()}"}
    )
    body = await response.json()
    assert response.status == 401
    assert body["code"] == "SubscriptionKeyNotFound"
    assert response.headers["WWW-Authenticate"] == 'Bearer realm="rag-api"'
    _schema(document, "AuthError").validate(body)
    documented_headers = document["components"]["responses"]["Unauthorized"]["headers"]
    for name, header in document["components"]["headers"].items():
        if header.get("required") and name in documented_headers:
            assert name in response.headers, name


async def test_insufficient_role_rejection_matches_the_documented_403(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    document = await _document(client)

    token = idp.mint_token(roles=["Other.Role"])
    response = await client.get(
        "/api/v2/whoami", headers=auth_headers(token, key_store.primary)
    )
    body = await response.json()
    assert response.status == 403
    assert body["code"] == "InsufficientRole"
    assert 'error="insufficient_scope"' in response.headers["WWW-Authenticate"]
    _schema(document, "AuthError").validate(body)


async def test_built_in_bodies_match_their_schemas(
    client: AppClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    document = await _document(client)
    headers = auth_headers(idp.mint_token(), key_store.primary)

    for path, schema in (
        ("/api/v2/health", "Health"),
        ("/api/v2/whoami", "Identity"),
        ("/livez", "Liveness"),
        ("/readyz", "Readiness"),
    ):
        response = await client.get(path, headers=headers)
        assert response.status == 200, path
        _schema(document, schema).validate(await response.json())


async def test_docs_are_protected_like_any_route_when_docs_public_is_false(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    client = await make_client(docs_public=False)

    for path in (
        "/api/docs/openapi.json",
        "/api/docs",
        "/api/docs/assets/swagger-ui.css",
    ):
        refused = await client.get(path)
        body = await refused.json()
        assert refused.status == 401, path
        assert body["code"] == "SubscriptionKeyNotFound"
        assert refused.headers["WWW-Authenticate"] == 'Bearer realm="rag-api"'
    headers = auth_headers(idp.mint_token(), key_store.primary)
    admitted = await client.get("/api/docs/openapi.json", headers=headers)
    document = orjson.loads(await admitted.read())
    assert admitted.status == 200
    assert _operations(document)[("/api/docs/openapi.json", "get")]["security"] == BOTH


def test_cli_spec_writes_the_snapshot_document_without_a_key_store(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    _clear_settings_environment(monkeypatch)
    monkeypatch.setenv("ENTRA_TENANT_ID", SNAPSHOT_TENANT)
    monkeypatch.setenv("ENTRA_AUDIENCES", f"api://{SNAPSHOT_APP_ID},{SNAPSHOT_APP_ID}")
    output = tmp_path / "openapi.json"

    assert main(["spec", "--output", str(output)]) == 0
    assert output.read_bytes() == SNAPSHOT.read_bytes()


async def test_cli_spec_on_stdout_equals_the_served_document(
    make_client: MakeClient,
    idp: LocalIdentityProvider,
    monkeypatch: pytest.MonkeyPatch,
    capsysbinary: pytest.CaptureFixture[bytes],
) -> None:
    client = await make_client()
    served = await (await client.get("/api/docs/openapi.json")).read()
    _clear_settings_environment(monkeypatch)
    monkeypatch.setenv("ENTRA_TENANT_ID", idp.tenant_id)
    monkeypatch.setenv("ENTRA_AUDIENCES", f"{idp.audience},{idp.app_id}")
    monkeypatch.setenv("ENTRA_OPENID_CONFIG_URL", idp.openid_config_url)
    monkeypatch.setenv("ENTRA_ISSUERS", f"{idp.issuer},{idp.issuer_v1}")

    assert main(["spec"]) == 0
    assert capsysbinary.readouterr().out == served


def test_cli_spec_names_a_missing_setting(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    _clear_settings_environment(monkeypatch)

    assert main(["spec"]) == 2
    assert "ENTRA_TENANT_ID" in capsys.readouterr().err
