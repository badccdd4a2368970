"""The service's own endpoints: health, whoami, liveness and readiness."""

from __future__ import annotations

from aiohttp import web

from .appkeys import IDENTITY, JWKS, KEY_STORE, KEY_WATCHER, SHUTTING_DOWN, TOKEN_CACHE
from .keystore import KeyStoreWatcher
from .openapi import (
    HEALTH_SCHEMA,
    IDENTITY_SCHEMA,
    LIVENESS_SCHEMA,
    READINESS_SCHEMA,
    ResponseDoc,
    documented,
)
from .policy import public
from .rate_limit import AUTH_THROTTLE, RATE_LIMITER, TOKEN_THROTTLE
from .responses import json_response
from .shared_store import SHARED_STORE
from .shared_subscriptions import SharedSubscriptions

__all__ = ("add_routes",)


@documented("The service's health", tag="service", body=HEALTH_SCHEMA)
async def health(request: web.Request) -> web.Response:
    """Protected: the state of the key cache and the key store, nothing secret."""
    app = request.app
    keys = app[JWKS].status()
    watcher = app[KEY_WATCHER]
    store: dict[str, object] = {"reload_ok": True, "subscriptions": None}
    if isinstance(watcher, KeyStoreWatcher):
        store = {
            "reload_ok": watcher.last_reload_ok,
            "subscriptions": watcher.subscription_count,
            "loaded_at": watcher.loaded_at.isoformat(),
        }
    cache = app[TOKEN_CACHE]
    shared = app[SHARED_STORE].status()
    subscriptions = app[KEY_STORE]
    if isinstance(subscriptions, SharedSubscriptions):
        shared["subscriptions"] = subscriptions.status()
    degraded = (
        keys["state"] != "fresh" or not store["reload_ok"] or shared["state"] != "ok"
    )
    return json_response(
        {
            "status": "degraded" if degraded else "ok",
            "identityProvider": keys,
            "subscriptionStore": store,
            "tokenCache": {"entries": len(cache), "hits": cache.stats.hits},
            # Redis down: "degraded" with the reason; limits count per replica.
            "sharedStore": shared,
            "rateLimits": {
                **app[RATE_LIMITER].status(),
                "failedAuthentication": app[AUTH_THROTTLE].status(),
                "failedTokens": app[TOKEN_THROTTLE].status(),
            },
        }
    )


@documented("The caller's identity", tag="service", body=IDENTITY_SCHEMA)
async def whoami(request: web.Request) -> web.Response:
    """Protected: the validated identity, for troubleshooting."""
    return json_response(request[IDENTITY].as_dict())


@public
@documented("Liveness probe", tag="probes", body=LIVENESS_SCHEMA)
async def livez(request: web.Request) -> web.Response:
    return json_response({"status": "alive"})


@public
@documented(
    "Readiness probe",
    tag="probes",
    body=READINESS_SCHEMA,
    responses={
        503: ResponseDoc("Shutting down, or no signing keys yet", READINESS_SCHEMA)
    },
)
async def readyz(request: web.Request) -> web.Response:
    app = request.app
    if app[SHUTTING_DOWN][0]:
        return json_response({"status": "shutting down"}, status=503)
    if not app[JWKS].ready:
        return json_response({"status": "waiting for signing keys"}, status=503)
    return json_response({"status": "ready"})


def add_routes(app: web.Application) -> None:
    app.router.add_get("/api/v2/health", health, name="health")
    app.router.add_get("/api/v2/whoami", whoami, name="whoami")
    app.router.add_get("/livez", livez, name="livez")
    app.router.add_get("/readyz", readyz, name="readyz")
