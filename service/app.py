"""The application factory: settings, caches and the validator chain, wired."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator, Callable, Iterable

from aiocache.base import BaseCache
from aiohttp import web

from validators import SubscriptionLookup, Validator

from .appkeys import (
    CHAIN,
    JWKS,
    KEY_STORE,
    KEY_WATCHER,
    SETTINGS,
    SHUTTING_DOWN,
    TOKEN_CACHE,
)
from .chain import ValidatorChain, default_validators, load_extra_validators
from .docs_routes import add_docs_routes
from .jose_backend import ensure_cryptography_backend
from .jwks import JwksCache, JwksPolicy
from .keystore import KeyStoreWatcher
from .log import app_logger
from .metrics import RequestCounters, setup_metrics
from .middleware import AuthGate
from .rate_limit import (
    AUTH_THROTTLE,
    RATE_LIMITER,
    TOKEN_THROTTLE,
    TRUSTED_PROXIES,
    FailedAuthThrottle,
    SubscriptionRateLimiter,
    TokenFailureThrottle,
    WindowCounter,
    parse_trusted_proxies,
)
from .routes import add_routes
from .settings import Settings
from .shared_store import SHARED_STORE, SharedStore, build_shared_store
from .shared_subscriptions import SharedSubscriptions
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
    ``shared_store`` replaces the store of the shared JWKS copy; rate limits and
    subscription state use the store ``CACHE_URL`` names.
    """
    ensure_cryptography_backend()
    watcher: KeyStoreWatcher | None = None
    if subscriptions is None:
        watcher = KeyStoreWatcher(
            settings.subscription_keys_file, interval=settings.keys_reload_seconds
        )
        subscriptions = watcher
    shared = build_shared_store(settings)
    sharing = None
    if watcher is not None and shared.shared:
        sharing = SharedSubscriptions(
            watcher, shared, interval=settings.subscription_sync_seconds
        )
        subscriptions = sharing
    # Separate counters: a flood of addresses must not evict subscription counts.
    rate_limiter = SubscriptionRateLimiter(WindowCounter(shared))
    throttle = FailedAuthThrottle(settings.auth_failure_limit, WindowCounter(shared))
    token_throttle = TokenFailureThrottle(
        settings.token_failure_limit, WindowCounter(shared)
    )

    store = shared_store if shared_store is not None else shared.cache
    jwks = JwksCache(
        settings.openid_config_url,
        settings.issuers,
        JwksPolicy.from_settings(settings),
        store=store,
    )
    token_cache = TokenCache(
        settings.token_cache_size, clock=clock, keys_usable=jwks.keys_usable
    )
    jwks.add_listener(token_cache.retain_kids)
    # Any change to subscriptions or keys drops every cached verdict; with a
    # lookup of the caller's own, the key is checked on every request instead.
    if watcher is not None:
        watcher.add_listener(lambda _store: token_cache.clear())
    if sharing is not None:
        sharing.add_listener(token_cache.clear)
    validators = (
        *default_validators(
            settings,
            subscriptions=subscriptions,
            keys=jwks,
            clock=clock,
            rate_limiter=rate_limiter,
            subscriptions_notify_changes=watcher is not None,
            token_failures=token_throttle if token_throttle.limit else None,
        ),
        *extra_validators,
        *load_extra_validators(settings.extra_validators, settings),
    )
    chain = ValidatorChain(validators)
    counters = RequestCounters()
    trusted = parse_trusted_proxies(settings.trusted_proxies)
    gate = AuthGate(
        chain=chain,
        cache=token_cache,
        throttle=throttle,
        token_throttle=token_throttle,
        trusted_proxies=trusted,
        counters=counters,
        realm=settings.realm,
        max_token_bytes=settings.max_token_bytes,
    )

    app = web.Application()
    gate.install(app)
    app[SETTINGS] = settings
    app[JWKS] = jwks
    app[TOKEN_CACHE] = token_cache
    app[CHAIN] = chain
    app[KEY_STORE] = subscriptions
    app[KEY_WATCHER] = watcher
    app[SHUTTING_DOWN] = [False]
    app[SHARED_STORE] = shared
    app[RATE_LIMITER] = rate_limiter
    app[AUTH_THROTTLE] = throttle
    app[TOKEN_THROTTLE] = token_throttle
    app[TRUSTED_PROXIES] = trusted
    add_routes(app)
    add_docs_routes(app, settings)
    setup_metrics(
        app,
        settings,
        jwks=jwks,
        token_cache=token_cache,
        key_watcher=watcher,
        counters=counters,
    )
    # Before the key cache: started first, so a replica has the fleet's
    # subscription state before it serves; closed last.
    app.cleanup_ctx.append(_shared_state_lifecycle(shared, sharing))
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


def _shared_state_lifecycle(
    shared: SharedStore, sharing: SharedSubscriptions | None
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        await shared.start()
        if sharing is not None:
            await sharing.start()
        yield
        if sharing is not None:
            await sharing.close()
        await shared.close()

    return lifecycle


async def _mark_shutting_down(app: web.Application) -> None:
    # Readiness flips first, so a load balancer stops sending new requests.
    app[SHUTTING_DOWN][0] = True


def _log_start(settings: Settings, chain: ValidatorChain) -> None:
    app_logger.info("app.configured", extra={"chain": list(chain.names)})
    if settings.allow_insecure_http:
        app_logger.warning(
            "app.insecure_http_allowed",
            extra={
                "detail": "ENTRA_ALLOW_INSECURE_HTTP=true: signing keys may come over"
                " plain http; for dev stacks only",
                "openid_config_url": settings.openid_config_url,
            },
        )
    if not settings.role_check_enabled:
        app_logger.warning(
            "app.role_check_disabled",
            extra={
                "detail": "ENTRA_REQUIRED_ROLES and ENTRA_REQUIRED_SCOPES are empty"
            },
        )
