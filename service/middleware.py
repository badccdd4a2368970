"""The gate in front of every route: request ids, checks, the verdict cache, errors."""

from __future__ import annotations

import functools
import itertools
import logging
import math
import os
import re
import secrets
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from multidict import MultiDict, MultiDictProxy, istr

from validators import (
    AccessPolicy,
    AuthContext,
    AuthError,
    Identity,
    LifetimeValidator,
    QueryCredentialsValidator,
    RateLimitValidator,
    RoleValidator,
    Subscription,
    TokenClaimInvalid,
    TokenFailureValidator,
    TokenInvalid,
    TooManyFailedAttempts,
    VerifiedToken,
    token_roles,
    token_scopes,
)
from validators.base import RateLimitUsage
from validators.subscription_key import SUBSCRIPTION_KEY_HEADER

from .appkeys import AUTH_REJECTION, IDENTITY, REQUEST_ID
from .chain import ValidatorChain
from .log import app_logger, auth_logger
from .logging_security import fingerprint
from .metrics import RequestCounters
from .openapi import hidden
from .policy import policy_of
from .rate_limit import (
    FailedAuthThrottle,
    Network,
    TokenFailureThrottle,
    client_address,
)
from .responses import error_response, status_error_response
from .token_cache import TokenCache, Verdict, credential_digest

__all__ = ("AuthGate", "RejectionLog", "build_identity", "request_id_of")

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# Malformed input is worth a warning; the rest are ordinary rejections.
_MALFORMED = (TokenInvalid, TokenClaimInvalid)
_NO_QUERY: MultiDictProxy[str] = MultiDictProxy(MultiDict())
_MAX_KEY_CHARS = 256
_GUARDED = "__auth_gate_guarded__"
# istr: multidict looks them up without lower-casing them on every request.
_REQUEST_ID_HEADER = istr("x-request-id")
_AUTHORIZATION = istr("Authorization")
_SUBSCRIPTION_KEY = istr(SUBSCRIPTION_KEY_HEADER)
# TokenFailureValidator passes every cached verdict (its tokens were valid).
_SHORT_PATH_STEPS = frozenset(
    {
        QueryCredentialsValidator,
        RateLimitValidator,
        TokenFailureValidator,
        LifetimeValidator,
        RoleValidator,
    }
)


class _RequestIds:
    """32 hex digits: a random per-process prefix and a counter.

    Unique across processes and replicas as uuid4 would be, at a fraction of
    its cost; request ids are correlation handles, not secrets.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._prefix = secrets.token_hex(8)
        self._next = itertools.count().__next__

    def new(self) -> str:
        return f"{self._prefix}{self._next():016x}"


_IDS = _RequestIds()
os.register_at_fork(after_in_child=_IDS.reset)


def request_id_of(request: web.BaseRequest) -> str:
    """The caller's ``x-request-id`` when well formed (and alone), else a new one."""
    if "x-request-id" in request.headers:
        return _caller_request_id(request)
    return _IDS.new()


def _caller_request_id(request: web.BaseRequest) -> str:
    values = request.headers.getall("x-request-id", ())
    if len(values) == 1 and _REQUEST_ID.fullmatch(values[0]):
        return values[0]
    return _IDS.new()


class RejectionLog:
    """Rejection lines, at most ``per_code`` per code in each ``interval``.

    A flood of forged tokens would otherwise write a warning per request, and
    a log line costs more than refusing the request. Past the limit, rejections
    are counted and one ``auth.rejections_suppressed`` line gives the counts
    (written with the first rejection after the interval). The metrics count
    every rejection either way.
    """

    def __init__(
        self,
        per_code: int = 5,
        interval: float = 10.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self._per_code = per_code
        self._interval = interval
        self._monotonic = monotonic
        self._window_ends = -math.inf
        self._counts: dict[str, int] = {}

    def allow(self, code: str) -> bool:
        now = self._monotonic()
        if now >= self._window_ends:
            self._flush()
            self._window_ends = now + self._interval
        count = self._counts.get(code, 0) + 1
        self._counts[code] = count
        return count <= self._per_code

    def _flush(self) -> None:
        # A list of pairs, not a dict by code: the scrubbing filter redacts
        # values under names that look like credentials ("Token...").
        suppressed = [
            {"rejection": code, "count": count - self._per_code}
            for code, count in sorted(self._counts.items())
            if count > self._per_code
        ]
        self._counts.clear()
        if suppressed:
            auth_logger.warning(
                "auth.rejections_suppressed",
                extra={"suppressed": suppressed, "interval_seconds": self._interval},
            )


class AuthGate:
    """Guards every route: protected unless marked ``@public``.

    Not an aiohttp middleware: aiohttp's middleware machinery costs more per
    request than the cached checks themselves (docs/performance.md). At start-up
    (``install``) every route's handler is wrapped, a protected catch-all route
    answers unknown paths (401 before 404, so paths cannot be probed), and the
    router is frozen, so no route can be added later without its guard.

    Requests whose exact credential headers passed the whole chain before are
    answered from the verdict cache (``service.token_cache``): only the
    validators that are not cacheable run for them. Everything it needs is
    bound here once, so the per-request path does no look-ups in the app.
    """

    def __init__(
        self,
        *,
        chain: ValidatorChain,
        cache: TokenCache,
        throttle: FailedAuthThrottle,
        trusted_proxies: tuple[Network, ...],
        token_throttle: TokenFailureThrottle | None = None,
        counters: RequestCounters,
        realm: str,
        max_token_bytes: int,
    ) -> None:
        self._chain = chain
        self._cache = cache if cache.enabled else None
        self._throttle = throttle
        self._token_throttle = token_throttle
        self._trusted = trusted_proxies
        self._responses = counters.responses
        self._rejections = counters.rejections
        self._realm = realm
        # The bearer validator's bound: longer headers are refused, never cached.
        self._max_authorization = max_token_bytes + 16
        self._rejection_log = RejectionLog()
        # The short path for cached credentials applies the per-request steps
        # itself; it knows only the built-in ones (exact types, not subclasses).
        per_request = chain.per_request
        self._short_path = self._cache is not None and all(
            type(v) in _SHORT_PATH_STEPS for v in per_request
        )
        lifetime = next((v for v in per_request if type(v) is LifetimeValidator), None)
        self._clock: Callable[[], float] = lifetime.clock if lifetime else _never
        self._leeway = lifetime.leeway if lifetime else 0
        self._roles = next((v for v in per_request if type(v) is RoleValidator), None)

    # -- installing ------------------------------------------------------------

    def install(self, app: web.Application) -> None:
        """Guard ``app``'s routes when it starts; call once, from the factory."""

        async def guard_routes(app: web.Application) -> None:
            self._guard_router(app.router)
            # Indexed under "/", so aiohttp tries it after every real route.
            app.router.add_route("*", "/{path:.*}", self.wrap(hidden(_unknown_route)))
            # Later routes (another start-up hook's) would go unguarded: refuse
            # them. aiohttp freezes the router right after start-up anyway.
            app.router.freeze()

        app.on_startup.append(guard_routes)

    def _guard_router(self, router: web.UrlDispatcher) -> None:
        for resource in router.resources():
            subapp = getattr(resource, "_app", None)
            if isinstance(subapp, web.Application):
                self._guard_router(subapp.router)
                continue
            for route in resource:
                handler = route.handler
                if not getattr(handler, _GUARDED, False):
                    # aiohttp has no public way to swap a route's handler; a
                    # test pins this attribute (tests/test_library_pins.py).
                    route._handler = self.wrap(handler)  # type: ignore[assignment]

    def wrap(self, handler: Handler) -> Handler:
        """``handler`` behind the gate, with its attributes (policy, docs) kept."""
        policy = policy_of(handler)
        guarded: Handler
        if policy.public:

            async def public(request: web.Request) -> web.StreamResponse:
                request_id = request_id_of(request)
                request[REQUEST_ID] = request_id
                response = await _call_handler(request, handler)
                return self._finish(response, request_id)

            guarded = public
        else:
            guarded = self._protected_handler(handler, policy)

        functools.update_wrapper(guarded, handler)
        setattr(guarded, _GUARDED, True)
        return guarded

    def _protected_handler(self, handler: Handler, policy: AccessPolicy) -> Handler:
        cache = self._cache
        throttle = self._throttle
        clock = self._clock
        leeway = self._leeway
        max_authorization = self._max_authorization
        roles: frozenset[str] = frozenset()
        scopes: frozenset[str] = frozenset()
        if self._roles is not None:
            required_roles, required_scopes = self._roles.required(policy)
            roles, scopes = frozenset(required_roles), frozenset(required_scopes)
        any_role = not roles and not scopes
        short_path = self._short_path

        responses = self._responses
        new_id = _IDS.new
        blocked = throttle.blocked
        digest_pair = TokenCache.digest
        if cache is not None:
            entries = cache.entries
            stats = cache.stats
            keys_usable = cache.keys_usable

        # One function, no helper calls on the way: this body runs for every
        # request with cached credentials, and each call costs (docs/performance.md).
        async def guarded(request: web.Request) -> web.StreamResponse:
            headers = request.headers
            request_id = (
                new_id()
                if _REQUEST_ID_HEADER not in headers
                else _caller_request_id(request)
            )
            request[REQUEST_ID] = request_id
            if cache is None or (blocked and throttle.blocking):
                response = await self._protected(request, handler, policy)
                return self._finish(response, request_id)

            # credential_digest, inline.
            verdict = None
            digest = None
            authorization = headers.getall(_AUTHORIZATION, ())
            key = headers.getall(_SUBSCRIPTION_KEY, ())
            if (
                len(authorization) == 1
                and len(key) == 1
                and len(authorization[0]) <= max_authorization
                and len(key[0]) <= _MAX_KEY_CHARS
            ):
                # The connection's last pair, when it is the same (string
                # equality), gives its digest without hashing it again.
                protocol = request.protocol
                memo = getattr(protocol, "credential_memo", None)
                if (
                    memo is not None
                    and memo[0] == authorization[0]
                    and memo[1] == key[0]
                ):
                    digest = memo[2]
                else:
                    digest = digest_pair(
                        authorization[0].encode("utf-8", "surrogateescape"),
                        key[0].encode("utf-8", "surrogateescape"),
                    )
                    if hasattr(type(protocol), "credential_memo"):
                        protocol.credential_memo = (  # type: ignore[attr-defined]
                            authorization[0],
                            key[0],
                            digest,
                        )
                verdict = entries.get(digest)
            now = clock()
            # The short path: the verdict cache's own checks (the entry's
            # expiry, the keys' staleness), then what the per-request steps
            # would check (query-credentials, rate-limit, lifetime, roles).
            # Anything it cannot settle takes the whole path, which answers
            # precisely.
            if (
                verdict is not None
                and digest is not None
                and short_path
                and now < verdict.expires_at
                and now >= verdict.not_before - leeway
                and keys_usable()
                and "?" not in request.raw_path
                and verdict.subscription.rate_limit is None
                and (
                    any_role
                    or not verdict.roles.isdisjoint(roles)
                    or not verdict.scopes.isdisjoint(scopes)
                )
            ):
                entries.move_to_end(digest)
                stats.hits += 1
                request[IDENTITY] = verdict.identity
                try:
                    response = await handler(request)
                except Exception as exc:
                    response = _handler_failure(request, exc)
            else:
                if verdict is not None:
                    # Let the cache decide (expiry, staleness) and count it.
                    verdict = cache.get(digest)  # type: ignore[arg-type]
                elif digest is not None:
                    stats.misses += 1
                response = await self._protected(
                    request, handler, policy, looked_up=(digest, verdict)
                )
            # Harmless on a streamed response, which its handler already sent.
            response.headers["x-request-id"] = request_id
            responses[response.status] += 1
            return response

        return guarded

    def _finish(
        self, response: web.StreamResponse, request_id: str
    ) -> web.StreamResponse:
        # Inlined at the end of the cached path: harmless on a streamed response,
        # which its handler already sent.
        response.headers["x-request-id"] = request_id
        # One dict increment; labels are built only when Prometheus scrapes.
        self._responses[response.status] += 1
        return response

    # -- checking ----------------------------------------------------------------

    async def _protected(
        self,
        request: web.Request,
        handler: Handler,
        policy: AccessPolicy,
        *,
        looked_up: tuple[bytes | None, Verdict | None] | None = None,
    ) -> web.StreamResponse:
        client: str | None = None
        if self._throttle.blocking:
            # Only while some client is blocked: the address costs a parse.
            client = client_address(request, self._trusted)
            wait = self._throttle.retry_after(client)
            if wait is not None:
                # Before any other work: a throttled client costs one look-up.
                return self._reject(request, TooManyFailedAttempts(retry_after=wait))

        headers = request.headers
        query = request.query if request.query_string else _NO_QUERY
        context = AuthContext(headers, query, policy)
        if looked_up is not None:
            digest, verdict = looked_up
        else:
            digest = None
            if self._cache is not None:
                digest = credential_digest(
                    headers, self._max_authorization, _MAX_KEY_CHARS
                )
            verdict = None
            if digest is not None:
                assert self._cache is not None
                verdict = self._cache.get(digest)
        try:
            if verdict is not None:
                context.subscription = verdict.subscription
                context.verified = verdict.verified
                # The header matched a compact JWS after "Bearer" and spaces.
                context.token = headers["Authorization"][6:].lstrip(" ")
                context.from_cache = True
                pending = self._chain.run_cached(context)
            else:
                pending = self._chain.run(context)
            if pending is not None:
                await pending
        except AuthError as error:
            refusal = await self._refuse(request, error, context, client)
            return _with_usage(refusal, context.usage)
        except Exception:
            auth_logger.exception(
                "auth.validator_crashed", extra={"request_id": request[REQUEST_ID]}
            )
            refusal = await self._refuse(request, TokenInvalid(), context, client)
            return _with_usage(refusal, context.usage)
        if verdict is not None and context.subscription is verdict.subscription:
            request[IDENTITY] = verdict.identity
        else:
            self._accept(request, context, digest)
        response = await _call_handler(request, handler)
        return _with_usage(response, context.usage)

    def _accept(
        self, request: web.Request, context: AuthContext, digest: bytes | None
    ) -> None:
        verified = context.verified
        subscription = context.subscription
        if verified is None or subscription is None:
            # A custom chain without the token or key steps: nothing to attach.
            return
        identity = build_identity(subscription, verified)
        request[IDENTITY] = identity
        if digest is None or context.from_cache or self._cache is None:
            return
        exp = _number(verified.claims.get("exp"))
        if exp is None:
            # A chain without the lifetime step: nothing bounds the entry.
            return
        nbf = _number(verified.claims.get("nbf"))
        not_before = -math.inf if nbf is None else nbf
        verdict = Verdict(
            subscription,
            verified,
            identity,
            exp,
            not_before,
            roles=token_roles(verified.claims),
            scopes=token_scopes(verified.claims),
        )
        self._cache.put(digest, verdict)

    async def _refuse(
        self,
        request: web.Request,
        error: AuthError,
        context: AuthContext,
        client: str | None,
    ) -> web.Response:
        # Only anonymous failures count: a missing or wrong subscription key. Once a
        # key is valid the caller is a subscription, bounded by its own rate limit;
        # counting its bad tokens against the address would also lock out everyone
        # sharing that address (all of APIM, without TRUSTED_PROXIES).
        if error.status == 401 and context.subscription is None:
            if client is None:
                client = client_address(request, self._trusted)
            await self._throttle.record_failure(client)
        elif (
            error.status == 401
            and context.subscription is not None
            and self._token_throttle is not None
        ):
            # The key was valid and its token was not: counted per subscription.
            await self._token_throttle.record_failure(context.subscription)
        return self._reject(request, error, context)

    def _reject(
        self, request: web.Request, error: AuthError, context: AuthContext | None = None
    ) -> web.Response:
        request[AUTH_REJECTION] = error.code
        self._rejections[error.code] += 1
        level = logging.WARNING if isinstance(error, _MALFORMED) else logging.INFO
        if auth_logger.isEnabledFor(level) and self._rejection_log.allow(error.code):
            fields: dict[str, Any] = {
                "rejection": error.code,
                "status": error.status,
                "request_id": request[REQUEST_ID],
                "path": request.path,
            }
            if context is not None and context.token is not None:
                fields["token_fp"] = fingerprint(context.token)
            if context is not None and context.subscription is not None:
                fields["subscription"] = context.subscription.name
            auth_logger.log(level, "auth.rejected", extra=fields)
        return error_response(error, self._realm)


async def _call_handler(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except Exception as exc:
        return _handler_failure(request, exc)


def _handler_failure(request: web.Request, exc: Exception) -> web.StreamResponse:
    """A handler's error as a JSON answer; redirects and other 3xx pass on."""
    if isinstance(exc, web.HTTPException):
        if exc.status < 400:
            raise exc
        response = status_error_response(exc.status, _code_for(exc), exc.reason)
        for name in ("Allow", "Retry-After"):
            if name in exc.headers:
                response.headers[name] = exc.headers[name]
        return response
    app_logger.exception(
        "request.failed", extra={"request_id": request[REQUEST_ID]}, exc_info=exc
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


def _number(value: object) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


def _never() -> float:
    return math.inf


def _string(claims: Any, name: str) -> str | None:
    value = claims.get(name)
    return value if isinstance(value, str) else None


def _with_usage(
    response: web.StreamResponse, usage: RateLimitUsage | None
) -> web.StreamResponse:
    """The ``RateLimit-*`` headers of a counted call (not on a streamed response)."""
    if usage is not None and not response.prepared:
        response.headers["RateLimit-Limit"] = str(usage.limit)
        response.headers["RateLimit-Remaining"] = str(usage.remaining)
        response.headers["RateLimit-Reset"] = str(usage.reset_seconds)
    return response


async def _unknown_route(request: web.Request) -> web.StreamResponse:
    """Behind the gate like any route: 405 with ``Allow`` when the path exists."""
    allowed: set[str] = set()
    own = request.match_info.route.resource
    for resource in request.app.router.resources():
        if resource is own:
            continue
        _, methods = await resource.resolve(request)
        allowed |= methods
    if allowed:
        raise web.HTTPMethodNotAllowed(request.method, allowed)
    raise web.HTTPNotFound()


def _code_for(exc: web.HTTPException) -> str:
    return "".join(word.capitalize() for word in exc.reason.split()) or "Error"
