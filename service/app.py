"""The application factory: wires settings, caches and the validator chain into aiohttp."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable

from aiocache import SimpleMemoryCache
from aiocache.base import BaseCache
from aiohttp import web

from validators import SubscriptionLookup, Validator

from .appkeys import CHAIN, JWKS, KEY_STORE, KEY_WATCHER, SETTINGS, SHUTTING_DOWN
from .appkeys import TOKEN_CACHE
from .chain import ValidatorChain, default_validators, load_extra_validators
from .jose_backend import ensure_cryptography_backend
from .jwks import JwksCache, JwksPolicy
from .keystore import KeyStoreWatcher
from .log import app_logger
from .middleware import auth_middleware
from .routes import add_routes
from .settings import Settings
from .token_cache import TokenCache

__all__ = ("create_app",)


def create_app(
    settings: Settings,
    *,
    extra_validators: Iterable[Validator] = (),
    subscriptions: SubscriptionLookup | None = None,
    clock: Callable[[], float] = time.time,
    shared_store: BaseCache | None = None,
) -> web.Application:
    """Build the application; raises on any misconfiguration, before serving.

    ``extra_validators`` run after the built-in checks, followed by those named
    in ``AUTH_EXTRA_VALIDATORS``. ``subscriptions`` replaces the key-store file
    (for embedding and tests); ``clock`` is the wall clock for time claims.
    """
    ensure_cryptography_backend()
    watcher: KeyStoreWatcher | None = None
    if subscriptions is None:
        watcher = KeyStoreWatcher(
            settings.subscription_keys_file, interval=settings.keys_reload_seconds
        )
        subscriptions = watcher

    store = shared_store if shared_store is not None else SimpleMemoryCache()
    jwks = JwksCache(
        settings.openid_config_url,
        settings.issuers,
        JwksPolicy.from_settings(settings),
        store=store,
    )
    token_cache = TokenCache(settings.token_cache_size, clock=clock)
    jwks.add_listener(token_cache.retain_kids)
    validators = (
        *default_validators(
            settings,
            subscriptions=subscriptions,
            keys=jwks,
            clock=clock,
            token_cache=token_cache if token_cache.enabled else None,
        ),
        *extra_validators,
        *load_extra_validators(settings.extra_validators, settings),
    )
    chain = ValidatorChain(validators)

    app = web.Application(middlewares=[auth_middleware])
    app[SETTINGS] = settings
    app[JWKS] = jwks
    app[TOKEN_CACHE] = token_cache
    app[CHAIN] = chain
    app[KEY_STORE] = subscriptions
    app[KEY_WATCHER] = watcher
    app[SHUTTING_DOWN] = [False]
    add_routes(app)
    app.cleanup_ctx.append(_lifecycle(jwks, watcher, store))
    app.on_shutdown.append(_mark_shutting_down)
    _log_start(settings, chain)
    return app


def _lifecycle(
    jwks: JwksCache, watcher: KeyStoreWatcher | None, store: BaseCache
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await jwks.start()
        if watcher is not None:
            await watcher.start()
        yield
        if watcher is not None:
            await watcher.close()
        await jwks.close()
        await store.close()

    return lifecycle


async def _mark_shutting_down(app: web.Application) -> None:
    # Readiness flips first, so a load balancer stops sending new requests.
    app[SHUTTING_DOWN][0] = True


def _log_start(settings: Settings, chain: ValidatorChain) -> None:
    app_logger.info("app.configured", extra={"chain": list(chain.names)})
    if not settings.role_check_enabled:
        app_logger.warning(
            "app.role_check_disabled",
            extra={
                "detail": "ENTRA_REQUIRED_ROLES and ENTRA_REQUIRED_SCOPES are empty"
            },
        )
