"""The aiohttp middleware: request ids, the validator chain, and error rendering."""

from __future__ import annotations

import logging
import re
import secrets
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from validators import (
    AuthContext,
    AuthError,
    Identity,
    Subscription,
    TokenClaimInvalid,
    TokenInvalid,
    TooManyFailedAttempts,
    VerifiedToken,
)
from validators.rate_limit import RateLimitedContext
from validators.roles import token_roles, token_scopes

from .appkeys import AUTH_REJECTION, CHAIN, IDENTITY, REQUEST_ID, SETTINGS, TOKEN_CACHE
from .log import app_logger, auth_logger
from .logging_security import fingerprint
from .metrics import REQUEST_COUNTERS
from .policy import policy_of
from .rate_limit import AUTH_THROTTLE, RATE_LIMIT_USAGE, TRUSTED_PROXIES, client_address
from .responses import error_response, status_error_response

__all__ = ("auth_middleware", "build_identity", "request_id_of")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Malformed input is worth a warning; the rest are ordinary rejections.
_MALFORMED = (TokenInvalid, TokenClaimInvalid)


def request_id_of(request: web.Request) -> str:
    """The caller's ``x-request-id`` when well formed, else a fresh one."""
    values = request.headers.getall("x-request-id", ())
    if len(values) == 1 and _REQUEST_ID.fullmatch(values[0]):
        return values[0]
    # 32 hex digits as uuid4().hex gave, at a quarter of its cost: no UUID object.
    return secrets.token_hex(16)


@web.middleware
async def auth_middleware(request: web.Request, handler: Handler) -> web.StreamResponse:
    request_id = request_id_of(request)
    request[REQUEST_ID] = request_id
    response = await _authenticate_and_handle(request, handler)
    response.headers["x-request-id"] = request_id
    # One dict increment; labels are built only when Prometheus scrapes.
    request.app[REQUEST_COUNTERS].responses[response.status] += 1
    return response


async def _authenticate_and_handle(
    request: web.Request, handler: Handler
) -> web.StreamResponse:
    app = request.app
    policy = policy_of(request.match_info.route.handler)
    if not policy.public:
        context = RateLimitedContext(request.headers, request.query, policy)
        client = client_address(request, app[TRUSTED_PROXIES])
        wait = app[AUTH_THROTTLE].retry_after(client)
        if wait is not None:
            # Before any other work: a throttled client costs one dict look-up.
            return _reject(request, TooManyFailedAttempts(retry_after=wait), context)
        try:
            await app[CHAIN].run(context)
        except AuthError as error:
            return await _refuse(request, error, context, client)
        except Exception:
            auth_logger.exception(
                "auth.validator_crashed", extra={"request_id": request[REQUEST_ID]}
            )
            return await _refuse(request, TokenInvalid(), context, client)
        finally:
            # Read by the response hook, on success and rejection alike.
            if context.usage is not None:
                request[RATE_LIMIT_USAGE] = context.usage
        _accept(request, context)
    return await _call_handler(request, handler)


async def _refuse(
    request: web.Request, error: AuthError, context: AuthContext, client: str
) -> web.Response:
    # Only anonymous failures count: a missing or wrong subscription key. Once a
    # key is valid the caller is a subscription, bounded by its own rate limit;
    # counting its bad tokens against the address would also lock out everyone
    # sharing that address (all of APIM, without TRUSTED_PROXIES).
    if error.status == 401 and context.subscription is None:
        await request.app[AUTH_THROTTLE].record_failure(client)
    return _reject(request, error, context)


def _accept(request: web.Request, context: AuthContext) -> None:
    verified = context.verified
    subscription = context.subscription
    if verified is None or subscription is None:
        # A custom chain without the token or key steps: nothing to attach.
        return
    if not context.from_cache and context.token is not None:
        request.app[TOKEN_CACHE].put(context.token, verified)
    request[IDENTITY] = build_identity(subscription, verified)


def _reject(
    request: web.Request, error: AuthError, context: AuthContext
) -> web.Response:
    request[AUTH_REJECTION] = error.code
    request.app[REQUEST_COUNTERS].rejections[error.code] += 1
    level = logging.WARNING if isinstance(error, _MALFORMED) else logging.INFO
    if auth_logger.isEnabledFor(level):
        fields: dict[str, Any] = {
            "rejection": error.code,
            "status": error.status,
            "request_id": request[REQUEST_ID],
            "path": request.path,
        }
        if context.token is not None:
            fields["token_fp"] = fingerprint(context.token)
        if context.subscription is not None:
            fields["subscription"] = context.subscription.name
        auth_logger.log(level, "auth.rejected", extra=fields)
    return error_response(error, request.app[SETTINGS].realm)


async def _call_handler(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        response = status_error_response(exc.status, _code_for(exc), exc.reason)
        for name in ("Allow", "Retry-After"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    except Exception:
        app_logger.exception(
            "request.failed", extra={"request_id": request[REQUEST_ID]}
        )
        return status_error_response(500, "InternalError", "The service failed")


def build_identity(subscription: Subscription, verified: VerifiedToken) -> Identity:
    claims = verified.claims
    client_id = _string(claims, "azp") or _string(claims, "appid")
    return Identity(
        subscription=subscription.name,
        product=subscription.product,
        tenant_id=_string(claims, "tid") or "",
        object_id=_string(claims, "oid"),
        subject=_string(claims, "sub"),
        client_id=client_id,
        roles=tuple(sorted(token_roles(claims))),
        scopes=tuple(sorted(token_scopes(claims))),
        version=_string(claims, "ver"),
        claims=claims,
    )


def _string(claims: Any, name: str) -> str | None:
    value = claims.get(name)
    return value if isinstance(value, str) else None


def _code_for(exc: web.HTTPException) -> str:
    return "".join(word.capitalize() for word in exc.reason.split()) or "Error"
