"""The OpenAPI 3.0 document, built from the route table and the validation settings."""

from __future__ import annotations

import copy
import inspect
import json
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from importlib import metadata
from typing import Any, TypeVar

import orjson
from aiohttp import web
from apispec import APISpec

from validators import AccessPolicy, AuthError, TokenExpired
from validators import errors as auth_errors

from .appkeys import SETTINGS
from .policy import policy_of
from .responses import challenge_for, error_response
from .settings import Settings

__all__ = (
    "BEARER_SCHEME",
    "HEALTH_SCHEMA",
    "IDENTITY_SCHEMA",
    "LIVENESS_SCHEMA",
    "OPENAPI_VERSION",
    "READINESS_SCHEMA",
    "SERVICE_ERROR_SCHEMA",
    "SUBSCRIPTION_KEY_HEADER",
    "SUBSCRIPTION_KEY_SCHEME",
    "NamedSchema",
    "OperationDoc",
    "ResponseDoc",
    "auth_error_codes",
    "build_openapi",
    "documented",
    "hidden",
    "operation_doc_of",
    "render_openapi",
)

# Swagger UI 4.15.5 (the copy swagger-ui-bundle ships) renders 3.0.x only; 3.1
# support arrived in Swagger UI 5. Schemathesis and APIM import both read 3.0.3.
OPENAPI_VERSION = "3.0.3"
SUBSCRIPTION_KEY_SCHEME = "apimSubscriptionKey"
BEARER_SCHEME = "entraIdBearer"
SUBSCRIPTION_KEY_HEADER = "Ocp-Apim-Subscription-Key"
_TITLE = "rag-api-core"
_DEFAULT_TAG = "api"
_ATTRIBUTE = "__operation_doc__"
_HIDDEN = "__openapi_hidden__"
_PATH_PARAMETER = re.compile(r"\{([^}:]+)(?::[^}]*)?\}")
_EVERY_METHOD = ("get", "post", "put", "patch", "delete")
_JSON = "application/json"

HandlerT = TypeVar("HandlerT", bound=Callable[..., Any])


@dataclass(frozen=True, slots=True)
class NamedSchema:
    """A JSON schema published under ``components/schemas/<name>``."""

    name: str
    schema: Mapping[str, Any]


@dataclass(frozen=True, slots=True)
class ResponseDoc:
    """One documented response: what it means and, optionally, its body."""

    description: str
    body: NamedSchema | None = None
    content_type: str = _JSON


@dataclass(frozen=True, slots=True)
class OperationDoc:
    """What a handler says about itself; the security comes from its access policy."""

    summary: str
    description: str = ""
    tag: str = _DEFAULT_TAG
    success: ResponseDoc = ResponseDoc("Success")
    responses: Mapping[int, ResponseDoc] = field(default_factory=dict)
    parameters: tuple[Mapping[str, Any], ...] = ()


def documented(
    summary: str,
    *,
    tag: str = _DEFAULT_TAG,
    body: NamedSchema | None = None,
    content_type: str = _JSON,
    description: str | None = None,
    responses: Mapping[int, ResponseDoc] | None = None,
    parameters: tuple[Mapping[str, Any], ...] = (),
) -> Callable[[HandlerT], HandlerT]:
    """Describe a handler for the spec: its summary, tag and 200 body.

    ``responses`` adds statuses the handler itself returns (the auth statuses
    are added from the route's access policy). The description defaults to the
    handler's docstring.
    """

    def mark(handler: HandlerT) -> HandlerT:
        doc = OperationDoc(
            summary=summary,
            description=description or inspect.getdoc(handler) or "",
            tag=tag,
            success=ResponseDoc("Success", body, content_type),
            responses=dict(responses or {}),
            parameters=parameters,
        )
        setattr(handler, _ATTRIBUTE, doc)
        return handler

    return mark


def hidden(handler: HandlerT) -> HandlerT:
    """Leave a route out of the document (the gate's catch-all for unknown paths)."""
    setattr(handler, _HIDDEN, True)
    return handler


def operation_doc_of(handler: object) -> OperationDoc:
    """A handler's description; an undescribed handler gets one from its docstring."""
    doc = getattr(handler, _ATTRIBUTE, None)
    if isinstance(doc, OperationDoc):
        return doc
    text = inspect.getdoc(handler) or ""
    name = getattr(handler, "__name__", "operation")
    summary = text.splitlines()[0] if text else name.replace("_", " ").capitalize()
    return OperationDoc(summary=summary, description=text)


def auth_error_codes() -> dict[str, int]:
    """Every machine code the rejection tree defines, with its HTTP status."""
    return {cls.code: cls.status for cls in _auth_error_classes()}


def build_openapi(app: web.Application) -> dict[str, Any]:
    """The document for an app's routes, as its settings make it validate them."""
    settings = app[SETTINGS]
    pair: dict[str, list[str]] = {SUBSCRIPTION_KEY_SCHEME: [], BEARER_SCHEME: []}
    spec = APISpec(
        title=_TITLE,
        version=_package_version(),
        openapi_version=OPENAPI_VERSION,
        info={"description": _INFO_DESCRIPTION},
        # The default for anything that does not say otherwise: both credentials.
        security=[pair],
    )
    _add_components(spec, settings)
    tags: set[str] = set()
    operation_ids: set[str] = set()
    schemas = {SERVICE_ERROR_SCHEMA.name: SERVICE_ERROR_SCHEMA}
    for path, method, route in _routes(app):
        doc = operation_doc_of(route.handler)
        _register_bodies(spec, doc, schemas)
        policy = policy_of(route.handler)
        operation = _operation(path, doc, policy, settings, pair)
        operation["operationId"] = _operation_id(route, method, operation_ids)
        spec.path(path=path, operations={method: operation})
        tags.add(doc.tag)
    document = spec.to_dict()
    # The application's own tags first, then the service's.
    own = sorted(tags - _TAG_DESCRIPTIONS.keys())
    builtin = [name for name in _TAG_DESCRIPTIONS if name in tags]
    document["tags"] = [_tag(name) for name in (*own, *builtin)]
    return document


def render_openapi(document: Mapping[str, Any]) -> bytes:
    """The stable bytes of a document: sorted keys, two-space indent, final newline."""
    options = orjson.OPT_SORT_KEYS | orjson.OPT_INDENT_2
    return orjson.dumps(document, option=options) + b"\n"


# -- the document's parts ------------------------------------------------------

_INFO_DESCRIPTION = (
    "Every protected operation needs two credentials together: an Azure API "
    "Management subscription key in the `Ocp-Apim-Subscription-Key` header and an "
    "Entra ID access token in `Authorization: Bearer`. Rejections carry a JSON body "
    "`{statusCode, code, message}` whose `code` is stable and documented in "
    "docs/troubleshooting.md; 400, 401 and 403 also carry an RFC 6750 "
    "`WWW-Authenticate` challenge. Every response carries `x-request-id`: the "
    "caller's own id when it sends one matching `[A-Za-z0-9._:-]{1,128}`, else a "
    "fresh one."
)

_TAG_DESCRIPTIONS = {
    "service": "The service's own state and the caller's identity",
    "probes": "Liveness and readiness for orchestrators; no credentials",
    "docs": "This document and the page that renders it",
}

_STATUS_NAMES = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    429: "TooManyRequests",
    503: "ServiceUnavailable",
}

_STATUS_MEANINGS = {
    400: "The credentials were sent in a way that is refused before any check",
    401: "The subscription key or the bearer token is missing or not accepted",
    403: "The token is valid but lacks a role or scope this operation requires",
    429: "Too many calls for the subscription, or too many failed attempts",
    503: "The identity provider's signing keys are not available",
}

_RATE_LIMIT_HEADERS = ("RateLimit-Limit", "RateLimit-Remaining", "RateLimit-Reset")


def _add_components(spec: APISpec, settings: Settings) -> None:
    components = spec.components
    components.security_scheme(
        SUBSCRIPTION_KEY_SCHEME,
        {
            "type": "apiKey",
            "in": "header",
            "name": SUBSCRIPTION_KEY_HEADER,
            "description": (
                "The primary or secondary key of an active APIM subscription. It is "
                "never accepted in the query string (`subscription-key` is refused "
                "with 400 CredentialsInQuery)."
            ),
        },
    )
    components.security_scheme(
        BEARER_SCHEME,
        {
            "type": "http",
            "scheme": "bearer",
            "bearerFormat": "JWT",
            "description": _bearer_description(settings),
        },
    )
    components.schema("AuthError", _auth_error_schema())
    components.schema(
        SERVICE_ERROR_SCHEMA.name, copy.deepcopy(dict(SERVICE_ERROR_SCHEMA.schema))
    )
    for name, header in _headers(settings).items():
        components.header(name, header)
    for status, name in _STATUS_NAMES.items():
        components.response(name, _auth_error_response(status, settings))
    components.response(
        "InternalError",
        {
            "description": "The service failed; nothing about the cause is returned",
            "headers": {"x-request-id": "x-request-id"},
            "content": {_JSON: {"schema": "ServiceError"}},
        },
    )


def _register_bodies(
    spec: APISpec, doc: OperationDoc, known: dict[str, NamedSchema]
) -> None:
    for response in (doc.success, *doc.responses.values()):
        named = response.body
        if named is None or known.get(named.name) == named:
            continue
        if named.name in known or named.name == "AuthError":
            raise ValueError(f"two different body schemas are named {named.name!r}")
        known[named.name] = named
        spec.components.schema(named.name, copy.deepcopy(dict(named.schema)))


def _bearer_description(settings: Settings) -> str:
    lines = [
        f"An Entra ID access token (v1.0 or v2.0) issued by tenant "
        f"`{settings.tenant_id}`.",
        f"Accepted audiences (`aud`): {_code_list(settings.audiences)}.",
        f"Accepted issuers (`iss`): {_code_list(settings.issuers)}.",
    ]
    if settings.role_check_enabled:
        lines.append(
            "Unless an operation says otherwise, the token needs "
            + _requirement_text(settings.required_roles, settings.required_scopes)
            + "."
        )
    else:
        lines.append(
            "No app role or scope is required by default "
            "(ENTRA_REQUIRED_ROLES and ENTRA_REQUIRED_SCOPES are empty)."
        )
    return " ".join(lines)


def _requirement_text(roles: tuple[str, ...], scopes: tuple[str, ...]) -> str:
    parts = []
    if roles:
        parts.append(f"one of the app roles {_code_list(roles)} in `roles`")
    if scopes:
        parts.append(f"one of the delegated scopes {_code_list(scopes)} in `scp`")
    return " or ".join(parts)


def _code_list(values: tuple[str, ...]) -> str:
    return ", ".join(f"`{value}`" for value in values)


def _auth_error_classes() -> list[type[AuthError]]:
    classes = (getattr(auth_errors, name) for name in auth_errors.__all__)
    return [c for c in classes if isinstance(c, type) and issubclass(c, AuthError)]


def _auth_error_schema() -> dict[str, Any]:
    return {
        "type": "object",
        "description": "A rejection by the authentication chain",
        "required": ["statusCode", "code", "message"],
        "additionalProperties": False,
        "properties": {
            "statusCode": {
                "type": "integer",
                "description": "The HTTP status again",
                "enum": sorted({cls.status for cls in _auth_error_classes()}),
            },
            "code": {
                "type": "string",
                "description": "A stable machine code; see docs/troubleshooting.md",
                "enum": sorted(auth_error_codes()),
            },
            "message": {
                "type": "string",
                "description": "Safe to show a user; never holds a token or key",
            },
        },
    }


SERVICE_ERROR_SCHEMA = NamedSchema(
    "ServiceError",
    {
        "type": "object",
        "description": "A failure outside authentication, in the same shape",
        "required": ["statusCode", "code", "message"],
        "additionalProperties": False,
        "properties": {
            "statusCode": {"type": "integer"},
            "code": {
                "type": "string",
                "description": "`InternalError`, or the HTTP reason in CamelCase",
            },
            "message": {"type": "string"},
        },
    },
)


def _headers(settings: Settings) -> dict[str, dict[str, Any]]:
    realm = settings.realm
    headers: dict[str, dict[str, Any]] = {
        "WWW-Authenticate": {
            "description": (
                "RFC 6750 challenge: `Bearer realm`, and for a refused token "
                "`error` and `error_description` (`scope` on 403)"
            ),
            "required": True,
            "schema": {"type": "string"},
            "example": challenge_for(TokenExpired(), realm),
        },
        "Retry-After": {
            "description": "Seconds to wait before calling again, when known",
            "schema": {"type": "integer", "minimum": 0},
        },
        "x-request-id": {
            "description": "The request's correlation id, also in the service logs",
            "required": True,
            "schema": {"type": "string"},
        },
        "Cache-Control": {
            "description": "Rejections are never cached",
            "required": True,
            "schema": {"type": "string", "enum": ["no-store"]},
        },
    }
    meanings = {
        "RateLimit-Limit": "Calls allowed in the subscription's current window",
        "RateLimit-Remaining": "Calls left in the current window",
        "RateLimit-Reset": "Seconds until the window renews",
    }
    for name in _RATE_LIMIT_HEADERS:
        headers[name] = {
            "description": meanings[name] + " (when the subscription has a limit)",
            "schema": {"type": "integer", "minimum": 0},
        }
    return headers


def _auth_error_response(status: int, settings: Settings) -> dict[str, Any]:
    classes = [cls for cls in _auth_error_classes() if cls.status == status]
    codes = ", ".join(f"`{cls.code}`" for cls in classes)
    headers = ["x-request-id", "Cache-Control", *_RATE_LIMIT_HEADERS]
    if status in (400, 401, 403):
        headers.append("WWW-Authenticate")
    if status in (429, 503):
        headers.append("Retry-After")
    return {
        "description": f"{_STATUS_MEANINGS[status]}. Codes: {codes}",
        "headers": {name: name for name in headers},
        "content": {
            _JSON: {
                "schema": "AuthError",
                "examples": {
                    cls.code: {"value": _example_body(cls, settings)} for cls in classes
                },
            }
        },
    }


def _example_body(cls: type[AuthError], settings: Settings) -> Any:
    # Rendered by the same function the middleware uses, so the examples cannot
    # drift from what a client really receives.
    retry_after = 30 if cls.status in (429, 503) else None
    body = error_response(cls(retry_after=retry_after), settings.realm).body
    if not isinstance(body, bytes):
        raise RuntimeError("error_response no longer renders a bytes body")
    return json.loads(body)


def _routes(app: web.Application) -> Iterator[tuple[str, str, web.AbstractRoute]]:
    for route in app.router.routes():
        if getattr(route.handler, _HIDDEN, False):
            continue
        method = route.method.lower()
        if method == "head":
            # aiohttp adds a HEAD twin to every GET; it answers the same way.
            continue
        path = route.resource.canonical if route.resource is not None else ""
        if not path:
            continue
        for each in _EVERY_METHOD if method == "*" else (method,):
            yield path, each, route


def _operation(
    path: str,
    doc: OperationDoc,
    policy: AccessPolicy,
    settings: Settings,
    pair: Mapping[str, list[str]],
) -> dict[str, Any]:
    operation: dict[str, Any] = {"summary": doc.summary, "tags": [doc.tag]}
    parameters = _parameters(path, doc)
    if parameters:
        operation["parameters"] = parameters
    description = doc.description
    responses: dict[str, Any] = {}
    headers = ["x-request-id"]

    if policy.public:
        operation["security"] = []
    else:
        operation["security"] = [dict(pair)]
        roles = settings.required_roles if policy.roles is None else policy.roles
        scopes = settings.required_scopes if policy.scopes is None else policy.scopes
        operation["x-entra-required-roles"] = list(roles)
        operation["x-entra-required-scopes"] = list(scopes)
        requirement = _requirement_text(roles, scopes) or "no app role or scope"
        description = f"{description}\n\nThe token needs {requirement}.".strip()
        headers.extend(_RATE_LIMIT_HEADERS)
        responses.update({str(status): ref for status, ref in _STATUS_NAMES.items()})

    responses["200"] = _response(doc.success, headers)
    for status, extra in sorted(doc.responses.items()):
        responses[str(status)] = _response(extra, headers)
    responses["500"] = "InternalError"
    if description:
        operation["description"] = description
    operation["responses"] = responses
    return operation


def _parameters(path: str, doc: OperationDoc) -> list[dict[str, Any]]:
    parameters = [dict(parameter) for parameter in doc.parameters]
    declared = {p.get("name") for p in parameters if p.get("in") == "path"}
    # OpenAPI requires every template variable of the path to be declared.
    for name in _PATH_PARAMETER.findall(path):
        if name not in declared:
            variable = {"type": "string"}
            parameters.append(
                {"in": "path", "name": name, "required": True, "schema": variable}
            )
    return parameters


def _response(doc: ResponseDoc, headers: list[str]) -> dict[str, Any]:
    response: dict[str, Any] = {
        "description": doc.description,
        "headers": {name: name for name in headers},
    }
    if doc.body is not None:
        response["content"] = {doc.content_type: {"schema": doc.body.name}}
    elif doc.content_type != _JSON:
        response["content"] = {doc.content_type: {"schema": {"type": "string"}}}
    return response


def _operation_id(route: web.AbstractRoute, method: str, taken: set[str]) -> str:
    base = route.name or getattr(route.handler, "__name__", "") or "operation"
    candidate = base if base not in taken else f"{base}_{method}"
    number = 2
    while candidate in taken:
        candidate = f"{base}_{method}_{number}"
        number += 1
    taken.add(candidate)
    return candidate


def _tag(name: str) -> dict[str, str]:
    tag = {"name": name}
    if name in _TAG_DESCRIPTIONS:
        tag["description"] = _TAG_DESCRIPTIONS[name]
    return tag


def _package_version() -> str:
    try:
        return metadata.version("rag-api-core")
    except metadata.PackageNotFoundError:
        return "0.0.0"


# -- bodies of the built-in routes ---------------------------------------------
# Kept here so routes.py only names them; schemathesis checks real bodies
# against these, so a change to a handler's output fails until this follows.

_NULLABLE_STRING = {"type": "string", "nullable": True}

HEALTH_SCHEMA = NamedSchema(
    "Health",
    {
        "type": "object",
        "required": [
            "status",
            "identityProvider",
            "subscriptionStore",
            "tokenCache",
        ],
        "properties": {
            "status": {"type": "string", "enum": ["ok", "degraded"]},
            "identityProvider": {
                "type": "object",
                "description": "The signing-key cache; nothing secret",
                "required": ["state", "key_count"],
                "properties": {
                    "state": {
                        "type": "string",
                        "enum": ["empty", "fresh", "stale", "expired"],
                    },
                    "key_count": {"type": "integer", "minimum": 0},
                    "age_seconds": {"type": "number", "nullable": True},
                    "last_refresh": {
                        "type": "object",
                        "nullable": True,
                        "properties": {
                            "result": {"type": "string"},
                            "seconds_ago": {"type": "number"},
                            "error": _NULLABLE_STRING,
                        },
                    },
                    "consecutive_failures": {"type": "integer", "minimum": 0},
                    "retry_in_seconds": {"type": "number", "minimum": 0},
                    "fetches": {
                        "type": "object",
                        "additionalProperties": {"type": "integer"},
                    },
                },
            },
            "subscriptionStore": {
                "type": "object",
                "required": ["reload_ok", "subscriptions"],
                "properties": {
                    "reload_ok": {"type": "boolean"},
                    "subscriptions": {"type": "integer", "nullable": True},
                    "loaded_at": {"type": "string", "format": "date-time"},
                },
            },
            "tokenCache": {
                "type": "object",
                "required": ["entries", "hits"],
                "properties": {
                    "entries": {"type": "integer", "minimum": 0},
                    "hits": {"type": "integer", "minimum": 0},
                },
            },
            "sharedStore": {
                "type": "object",
                "description": "memory, or Redis with its breaker state (no password)",
                "required": ["backend", "state"],
                "properties": {
                    "backend": {"type": "string", "enum": ["memory", "redis"]},
                    "state": {"type": "string", "enum": ["ok", "degraded"]},
                },
            },
            "rateLimits": {
                "type": "object",
                "description": "Where limits are counted; the throttles on failed"
                " keys (per address) and failed tokens (per subscription)",
            },
        },
    },
)

IDENTITY_SCHEMA = NamedSchema(
    "Identity",
    {
        "type": "object",
        "required": ["subscription", "tid", "roles", "scp"],
        "properties": {
            "subscription": {
                "type": "object",
                "required": ["name", "product"],
                "properties": {
                    "name": {"type": "string"},
                    "product": {"type": "string"},
                },
            },
            "tid": {"type": "string", "description": "The token's tenant"},
            "oid": _NULLABLE_STRING,
            "sub": _NULLABLE_STRING,
            "azp": {
                "type": "string",
                "nullable": True,
                "description": "The client application (`azp`, or `appid` in v1)",
            },
            "roles": {"type": "array", "items": {"type": "string"}},
            "scp": {"type": "array", "items": {"type": "string"}},
            "ver": {"type": "string", "nullable": True, "description": "1.0 or 2.0"},
        },
    },
)

LIVENESS_SCHEMA = NamedSchema(
    "Liveness",
    {
        "type": "object",
        "required": ["status"],
        "properties": {"status": {"type": "string", "enum": ["alive"]}},
    },
)

READINESS_SCHEMA = NamedSchema(
    "Readiness",
    {
        "type": "object",
        "required": ["status"],
        "properties": {
            "status": {
                "type": "string",
                "enum": ["ready", "shutting down", "waiting for signing keys"],
            }
        },
    },
)
