"""Prometheus metrics: request counters, and the caches' own state read at scrape time.

The request path only bumps two plain counters (a dict increment per response,
one more per rejection); everything else (key cache, token cache, key store) is
read from the objects that already keep it when Prometheus scrapes, through one
custom collector. Each app has its own registry, never the process-global one.

``GET /metrics`` on the main port is protected like any route unless
``METRICS_PUBLIC=true``; ``METRICS_PORT`` adds a listener that serves only
``/metrics``, public, for a scraper inside the network.

With ``serve --workers N`` every worker is a process with its own registry, and
both ports are shared through ``SO_REUSEPORT``: a scrape reaches one worker, picked
by the kernel, and shows that worker's counts only (``process_start_time_seconds``
tells them apart). For exact fleet totals run one worker per container and scrape
each container; see README, "Local stack".
"""

from __future__ import annotations

from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field

from aiohttp import web
from aiohttp.typedefs import Handler
from prometheus_client import CollectorRegistry, ProcessCollector
from prometheus_client.aiohttp import make_aiohttp_handler
from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    Metric,
)

from validators import RateLimitExceeded, TooManyFailedAttempts

from .jwks import JwksCache
from .keystore import KeyStoreWatcher
from .log import app_logger
from .policy import public
from .settings import Settings
from .token_cache import TokenCache

__all__ = (
    "METRICS_PATH",
    "METRICS_REGISTRY",
    "RATE_LIMIT_CODES",
    "REQUEST_COUNTERS",
    "RequestCounters",
    "ServiceCollector",
    "setup_metrics",
)

METRICS_PATH = "/metrics"
# The rejections that are rate limits, reported apart so an alert needs no regex.
RATE_LIMIT_CODES = (RateLimitExceeded.code, TooManyFailedAttempts.code)


@dataclass(slots=True)
class RequestCounters:
    """What the middleware counts: responses by status, rejections by code."""

    responses: Counter[int] = field(default_factory=Counter)
    rejections: Counter[str] = field(default_factory=Counter)


REQUEST_COUNTERS: web.AppKey[RequestCounters] = web.AppKey("request_counters")
# Other parts (the shared store, the rate limiter) may register collectors here.
METRICS_REGISTRY: web.AppKey[CollectorRegistry] = web.AppKey("metrics_registry")


class ServiceCollector:
    """Turns the service's counters and cache states into metric families."""

    def __init__(
        self,
        counters: RequestCounters,
        jwks: JwksCache,
        token_cache: TokenCache,
        key_watcher: KeyStoreWatcher | None = None,
    ) -> None:
        self._counters = counters
        self._jwks = jwks
        self._token_cache = token_cache
        self._key_watcher = key_watcher

    def describe(self) -> Iterator[Metric]:
        # The same families without samples: lets the registry catch a name clash.
        yield from self._families(with_samples=False)

    def collect(self) -> Iterator[Metric]:
        yield from self._families(with_samples=True)

    def _families(self, *, with_samples: bool) -> Iterator[Metric]:
        builders = (
            self._requests,
            self._rejections,
            self._rate_limit_rejections,
            self._jwks_fetches,
            self._signing_keys,
            self._token_cache_state,
            self._key_store_state,
        )
        for build in builders:
            for family in build():
                if not with_samples:
                    family.samples = []
                yield family

    def _requests(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "rag_api_requests",
            "Responses the service answered, by HTTP status",
            labels=("status",),
        )
        for status, count in sorted(self._counters.responses.items()):
            family.add_metric((str(status),), count)
        yield family

    def _rejections(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "rag_api_rejections",
            "Requests the validator chain refused, by error code",
            labels=("code",),
        )
        for code, count in sorted(self._counters.rejections.items()):
            family.add_metric((code,), count)
        yield family

    def _rate_limit_rejections(self) -> Iterator[Metric]:
        family = CounterMetricFamily(
            "rag_api_rate_limit_rejections",
            "Requests refused with 429 by a rate limit, by error code",
            labels=("code",),
        )
        # Both codes always appear, at zero until the first 429, so that a rate
        # over them is defined from the first scrape.
        for code in RATE_LIMIT_CODES:
            family.add_metric((code,), self._counters.rejections.get(code, 0))
        yield family

    def _jwks_fetches(self) -> Iterator[Metric]:
        fetches = CounterMetricFamily(
            "rag_api_jwks_fetches",
            "Discovery and key set fetches (shared: adopted from another replica),"
            " by result",
            labels=("what", "result"),
        )
        for (what, result), count in sorted(self._jwks.fetches.items()):
            fetches.add_metric((what, result), count)
        yield fetches
        yield CounterMetricFamily(
            "rag_api_jwks_store_errors",
            "Failed reads or writes of the shared key set copy",
            value=self._jwks.store_errors,
        )

    def _signing_keys(self) -> Iterator[Metric]:
        status = self._jwks.status()
        age = GaugeMetricFamily(
            "rag_api_signing_keys_age_seconds",
            "Seconds since the key set in use was fetched (absent before the first)",
        )
        if status["age_seconds"] is not None:
            age.add_metric((), status["age_seconds"])
        yield age
        yield GaugeMetricFamily(
            "rag_api_signing_keys",
            "Usable signing keys in the key set in use",
            value=status["key_count"],
        )
        yield GaugeMetricFamily(
            "rag_api_signing_keys_degraded",
            "1 when the key set is stale, expired or missing, else 0",
            value=0 if status["state"] == "fresh" else 1,
        )

    def _token_cache_state(self) -> Iterator[Metric]:
        stats = self._token_cache.stats
        lookups = CounterMetricFamily(
            "rag_api_token_cache_lookups",
            "Verified-token cache lookups, by result",
            labels=("result",),
        )
        lookups.add_metric(("hit",), stats.hits)
        lookups.add_metric(("miss",), stats.misses)
        yield lookups
        yield CounterMetricFamily(
            "rag_api_token_cache_evictions",
            "Verified tokens dropped to stay within TOKEN_CACHE_SIZE",
            value=stats.evictions,
        )
        yield GaugeMetricFamily(
            "rag_api_token_cache_entries",
            "Verified tokens held in the cache",
            value=len(self._token_cache),
        )

    def _key_store_state(self) -> Iterator[Metric]:
        if self._key_watcher is None:
            return
        yield GaugeMetricFamily(
            "rag_api_key_store_reload_failed",
            "1 when the key store file on disk was refused and an older copy serves",
            value=0 if self._key_watcher.last_reload_ok else 1,
        )
        yield GaugeMetricFamily(
            "rag_api_key_store_subscriptions",
            "Subscriptions in the key store in use",
            value=self._key_watcher.subscription_count,
        )


def setup_metrics(
    app: web.Application,
    settings: Settings,
    *,
    jwks: JwksCache,
    token_cache: TokenCache,
    key_watcher: KeyStoreWatcher | None,
    counters: RequestCounters | None = None,
) -> RequestCounters:
    """Register the counters, the registry, ``/metrics`` and the metrics port."""
    counters = counters if counters is not None else RequestCounters()
    registry = CollectorRegistry()
    registry.register(ServiceCollector(counters, jwks, token_cache, key_watcher))
    ProcessCollector(registry=registry)
    app[REQUEST_COUNTERS] = counters
    app[METRICS_REGISTRY] = registry

    serve = make_aiohttp_handler(registry)

    async def metrics(request: web.Request) -> web.StreamResponse:
        return await serve(request)

    if settings.metrics_public:
        public(metrics)
    app.router.add_get(METRICS_PATH, metrics, name="metrics")
    if settings.metrics_port is not None:
        app.cleanup_ctx.append(
            _metrics_listener(serve, settings.host, settings.metrics_port)
        )
    return counters


def _metrics_listener(
    serve: Handler, host: str, port: int
) -> Callable[[web.Application], AsyncIterator[None]]:
    async def listener(app: web.Application) -> AsyncIterator[None]:
        metrics_app = web.Application()
        metrics_app.router.add_get(METRICS_PATH, serve)
        runner = web.AppRunner(metrics_app, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            # SO_REUSEPORT as on the main port: under `serve --workers N` every
            # worker binds this port too, instead of failing and restarting.
            site = web.TCPSite(runner, host, port, reuse_port=True)
            await site.start()
            app_logger.info("metrics.listening", extra={"host": host, "port": port})
            yield
        finally:
            await runner.cleanup()

    return listener
