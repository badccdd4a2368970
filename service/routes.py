"""The service's own endpoints: health, whoami, liveness and readiness."""

from __future__ import annotations

from aiohttp import web

from .appkeys import IDENTITY, JWKS, KEY_WATCHER, SHUTTING_DOWN, TOKEN_CACHE
from .keystore import KeyStoreWatcher
from .policy import public
from .responses import json_response

__all__ = ("add_routes",)


async def health(request: web.Request) -> web.Response:
    """Protected: the state of the key cache and the key store, nothing secret."""
    app = request.app
    keys = app[JWKS].status()
    watcher = app[KEY_WATCHER]
    store = {"reload_ok": True, "subscriptions": None}
    if isinstance(watcher, KeyStoreWatcher):
        store = {
            "reload_ok": watcher.last_reload_ok,
            "subscriptions": watcher.subscription_count,
            "loaded_at": watcher.loaded_at.isoformat(),
        }
    cache = app[TOKEN_CACHE]
    degraded = keys["state"] != "fresh" or not store["reload_ok"]
    return json_response(
        {
            "status": "degraded" if degraded else "ok",
            "identityProvider": keys,
            "subscriptionStore": store,
            "tokenCache": {"entries": len(cache), "hits": cache.stats.hits},
        }
    )


async def whoami(request: web.Request) -> web.Response:
    """Protected: the validated identity, for troubleshooting."""
    return json_response(request[IDENTITY].as_dict())


@public
async def livez(request: web.Request) -> web.Response:
    return json_response({"status": "alive"})


@public
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
