"""Identity-provider faults, rotation, cancellation and shutdown (catalog section 4).

Every fault runs twice: with a warm cache (the last known good keys must keep
serving) and with a cold one (503 with ``Retry-After``, fetches bounded by the
backoff). A heartbeat coroutine watches the event loop meanwhile: a fetch that
blocked it would show as lag, loosely bounded here (a behaviour, not a benchmark).
"""

from __future__ import annotations

import asyncio
import base64
import gc
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web

from service.app import create_app
from service.appkeys import JWKS
from service.idp import LocalIdentityProvider
from service.jwks import JwksCache, JwksPolicy
from tests.conftest import (
    AppClient,
    Credentials,
    MakeClient,
    auth_headers,
    settings_for,
)
from tests.raw_http import (
    RawServer,
    ServiceProcess,
    build_request,
    send_raw,
    serve_like_production,
    service_environment,
)

HEALTH = "/api/v2/health"
# Short, so a hanging or trickling IdP costs each test well under a second.
FAST = {"idp_timeout_seconds": 0.5, "idp_connect_timeout_seconds": 0.2}
MAX_LAG = 0.5
_LOOP_TROUBLE = (
    "never retrieved",
    "Task was destroyed",
    "Unclosed client session",
    "Unclosed connector",
    "Unclosed connection",
)


# --- instruments -------------------------------------------------------------------


@dataclass
class Heartbeat:
    """Measures how late a 10 ms sleep wakes up: a stalled loop shows as lag."""

    max_lag: float = 0.0
    _task: asyncio.Task[None] | None = field(default=None, repr=False)

    async def _beat(self) -> None:
        while True:
            started = time.monotonic()
            await asyncio.sleep(0.01)
            self.max_lag = max(self.max_lag, time.monotonic() - started - 0.01)


@asynccontextmanager
async def heartbeat() -> AsyncIterator[Heartbeat]:
    beat = Heartbeat()
    task = asyncio.create_task(beat._beat())
    try:
        yield beat
    finally:
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)


@pytest_asyncio.fixture
async def attacker_host(aiohttp_server: Any) -> AsyncIterator[tuple[str, list[str]]]:
    """Another host that would happily serve keys: it must never be asked."""
    hits: list[str] = []

    async def serve(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"keys": []})

    app = web.Application()
    app.router.add_get("/{tail:.*}", serve)
    server = await aiohttp_server(app)
    yield str(server.make_url("")).rstrip("/"), hits


@pytest.fixture(autouse=True)
def _loop_stays_clean(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """No task exception left unretrieved, no task or session left behind."""
    yield
    gc.collect()
    records = [*caplog.get_records("call"), *caplog.get_records("teardown")]
    trouble = [
        r.getMessage()
        for r in records
        if any(text in r.getMessage() for text in _LOOP_TROUBLE)
    ]
    assert not trouble


async def _get(client: AppClient, token: str, key: str) -> aiohttp.ClientResponse:
    return await client.get(HEALTH, headers=auth_headers(token, key))


async def _until(condition: Callable[[], bool], seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError("condition not reached in time")
        await asyncio.sleep(0.02)


async def _expect_unavailable(response: aiohttp.ClientResponse) -> int:
    body = await response.json()
    assert (response.status, body["code"]) == (503, "IdentityProviderUnavailable")
    assert "WWW-Authenticate" not in response.headers
    assert response.headers["Cache-Control"] == "no-store"
    retry_after = int(response.headers["Retry-After"])
    assert retry_after >= 1
    return retry_after


# --- the faults ----------------------------------------------------------------------


@dataclass(frozen=True)
class Fault:
    """One way the identity provider misbehaves, as ``set_outage`` arguments."""

    mode: str
    options: dict[str, Any] = field(default_factory=dict)
    slow: bool = False  # the fetch only ends by our timeout
    foreign: str | None = None  # where the fault points: "redirect" or "jwks_uri"

    def play(self, idp: LocalIdentityProvider, elsewhere: str) -> None:
        options = dict(self.options)
        if self.foreign == "redirect":
            options["location"] = f"{elsewhere}/keys"
        elif self.foreign == "jwks_uri":
            document = {**idp.openid_configuration(), "jwks_uri": f"{elsewhere}/keys"}
            options.update(body=json.dumps(document).encode(), endpoints=("discovery",))
        idp.set_outage(self.mode, **options)


FAULTS = [
    pytest.param(Fault("refuse"), id="R-01-refused"),
    pytest.param(Fault("reset"), id="R-02-connection-reset"),
    pytest.param(Fault("error", {"status": 500}), id="R-04-http-500"),
    pytest.param(Fault("error", {"status": 503}), id="R-02-http-503"),
    pytest.param(Fault("status", {"status": 404}), id="R-04-http-404"),
    pytest.param(Fault("hang", slow=True), id="R-03-black-hole"),
    pytest.param(Fault("slow", {"delay": 3.0}, slow=True), id="R-03-answers-after-3s"),
    pytest.param(Fault("trickle", {"delay": 0.1}, slow=True), id="R-03-trickle"),
    pytest.param(Fault("html"), id="R-04-captive-portal-html"),
    pytest.param(Fault("empty_keys"), id="R-15-empty-key-set"),
    pytest.param(Fault("invalid_json"), id="R-04-truncated-json"),
    pytest.param(Fault("oversized"), id="R-04-10-MiB-body-CWE-400"),
    pytest.param(Fault("gzip_bomb"), id="R-04-gzip-bomb-CWE-409"),
    pytest.param(
        Fault("body", {"body": b"{}", "endpoints": ("jwks",)}), id="R-04-empty-object"
    ),
    pytest.param(
        Fault("body", {"body": b'{"keys":"x"}', "endpoints": ("jwks",)}),
        id="R-04-keys-not-a-list",
    ),
    pytest.param(
        Fault("body", {"body": b"[]", "endpoints": ("jwks",)}), id="R-04-json-array"
    ),
    pytest.param(
        Fault("body", {"body": b"keys", "content_type": "text/plain"}),
        id="R-04-text-plain",
    ),
    pytest.param(Fault("foreign_issuer"), id="J-09-discovery-foreign-issuer-OIDC-4.3"),
    pytest.param(
        Fault("redirect", foreign="redirect"), id="R-04-redirect-to-another-host"
    ),
    pytest.param(
        Fault("body", foreign="jwks_uri"), id="J-09-jwks_uri-on-another-host-CWE-918"
    ),
]


@pytest.mark.parametrize("fault", FAULTS)
async def test_fault_with_a_warm_cache_keeps_the_last_known_good_keys(
    make_client: MakeClient,
    idp: LocalIdentityProvider,
    key_store: Credentials,
    attacker_host: tuple[str, list[str]],
    fault: Fault,
) -> None:
    client = await make_client(**FAST)
    jwks = client.app[JWKS]
    assert (await _get(client, idp.mint_token(), key_store.primary)).status == 200
    elsewhere, foreign_hits = attacker_host
    fault.play(idp, elsewhere)

    async with heartbeat() as beat:
        refresh = asyncio.create_task(jwks.refresh_now())
        await _until(lambda: idp.hits["discovery"] >= 2 or refresh.done())
        response = await _get(client, idp.mint_token(), key_store.primary)
        # a request with a known kid never waits on a refresh in flight.
        assert response.status == 200
        if fault.slow:
            assert not refresh.done()
        assert await refresh is False

    health = await (await _get(client, idp.mint_token(), key_store.primary)).json()
    assert health["identityProvider"]["state"] == "stale"
    assert health["identityProvider"]["last_refresh"]["result"] == "error"
    assert health["identityProvider"]["key_count"] == 1
    assert beat.max_lag < MAX_LAG
    assert foreign_hits == []


@pytest.mark.parametrize("fault", FAULTS)
async def test_fault_with_a_cold_cache_answers_503_and_bounded_fetches(
    make_client: MakeClient,
    idp: LocalIdentityProvider,
    key_store: Credentials,
    attacker_host: tuple[str, list[str]],
    fault: Fault,
) -> None:
    elsewhere, foreign_hits = attacker_host
    fault.play(idp, elsewhere)
    async with heartbeat() as beat:
        client = await make_client(**FAST)
        token = idp.mint_token()
        responses = await asyncio.gather(
            *(_get(client, token, key_store.primary) for _ in range(20))
        )
        for response in responses:
            await _expect_unavailable(response)
        assert (await client.get("/readyz")).status == 503
    # 20 concurrent requests share one fetch; a retry may follow, no more.
    assert idp.hits["discovery"] <= 2
    assert idp.hits["jwks"] <= 2
    assert beat.max_lag < MAX_LAG
    assert foreign_hits == []


async def test_cold_outage_retries_with_backoff_not_per_request(
    make_client: MakeClient,
    idp: LocalIdentityProvider,
    key_store: Credentials,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # a request every 20 ms for 3 s; backoff 1 s doubling, with jitter.
    idp.set_outage("refuse")
    client = await make_client(**FAST)
    token = idp.mint_token()
    deadline = time.monotonic() + 3.0
    sent = 0
    while time.monotonic() < deadline:
        await _expect_unavailable(await _get(client, token, key_store.primary))
        sent += 1
        await asyncio.sleep(0.02)
    attempts = client.app[JWKS].status()["consecutive_failures"]
    assert sent > 50
    assert 2 <= attempts <= 4
    # the first success after the outage makes it ready, no restart.
    idp.set_outage("ok")
    await _until(lambda: client.app[JWKS].ready)
    assert (await _get(client, token, key_store.primary)).status == 200
    # One warning when the outage starts; the retries log at debug.
    warnings = [r for r in caplog.records if r.getMessage() == "jwks.refresh_failed"]
    assert len([r for r in warnings if r.levelno == logging.WARNING]) == 1


async def test_retry_after_from_the_identity_provider_is_honoured(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    # 429 with Retry-After: 120 means no new attempt for two minutes.
    idp.set_outage("status", status=429, retry_after=120)
    client = await make_client(**FAST)
    token = idp.mint_token()
    first = await _get(client, token, key_store.primary)
    assert await _expect_unavailable(first) > 100
    seen = idp.hits["discovery"]
    idp.set_outage("ok")
    for _ in range(10):
        await _expect_unavailable(await _get(client, token, key_store.primary))
        await asyncio.sleep(0.05)
    assert idp.hits["discovery"] == seen


async def test_timeouts_are_ours_not_aiohttps_300_seconds(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    # the fetch ends by its own timeout, recorded as such.
    client = await make_client(**FAST)
    jwks = client.app[JWKS]
    await _until(lambda: jwks.ready)
    idp.set_outage("hang")
    assert await jwks.refresh_now() is False
    error = jwks.status()["last_refresh"]["error"]
    assert error == "the discovery endpoint timed out"


async def test_empty_key_set_during_an_outage_never_becomes_the_last_known_good(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    # down, then {"keys": []} once, then down again: the good keys stay.
    client = await make_client(**FAST)
    jwks = client.app[JWKS]
    token = idp.mint_token()
    assert (await _get(client, token, key_store.primary)).status == 200
    for mode in ("refuse", "empty_keys", "error"):
        idp.set_outage(mode)
        assert await jwks.refresh_now() is False
        assert (await _get(client, token, key_store.primary)).status == 200
    assert jwks.kids == {idp.current_kid}


# --- rotation ------------------------------------------------------------------------


def _unknown_kid_token(payload: str, kid: str) -> str:
    """A well-formed token under a kid nobody published, with a valid payload.

    Its signature is never checked (no key to check it with), so none is made.
    """
    header = {"typ": "JWT", "alg": "RS256", "kid": kid}
    encoded = base64.urlsafe_b64encode(json.dumps(header).encode()).rstrip(b"=")
    return f"{encoded.decode()}.{payload}.{'A' * 342}"


def _payload(idp: LocalIdentityProvider) -> str:
    return idp.mint_token().split(".")[1]


async def test_new_kid_inside_the_cooldown_waits_for_it_then_is_admitted(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    # R-05b: the cooldown was just spent on a forged kid; the real new key gets
    # 401 until the cooldown ends, then one refresh admits it. k1 never stops.
    client = await make_client(jwks_kid_cooldown_seconds=1)
    old_token = idp.mint_token()
    assert (await _get(client, old_token, key_store.primary)).status == 200
    forged = _unknown_kid_token(_payload(idp), uuid.uuid4().hex)
    assert (await _get(client, forged, key_store.primary)).status == 401
    fetches = idp.hits["jwks"]

    idp.rotate_key()
    new_token = idp.mint_token()
    early = await _get(client, new_token, key_store.primary)
    assert early.status == 401
    assert (await early.json())["code"] == "TokenSignatureKeyNotFound"
    assert idp.hits["jwks"] == fetches
    assert (await _get(client, old_token, key_store.primary)).status == 200

    await asyncio.sleep(1.05)
    assert (await _get(client, new_token, key_store.primary)).status == 200
    assert idp.hits["jwks"] == fetches + 1
    assert (await _get(client, old_token, key_store.primary)).status == 200


async def test_removed_key_serves_through_an_outage_and_stops_after_a_good_refresh(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    # R-06 with R-02: an unreachable IdP cannot tell us k1 is gone, so k1 keeps
    # validating (stale-if-error); the first good refresh drops it, and with it
    # its entries in the verified-token cache.
    client = await make_client(**FAST)
    jwks = client.app[JWKS]
    old_kid = idp.current_kid
    old_token = idp.mint_token()
    assert (await _get(client, old_token, key_store.primary)).status == 200
    idp.rotate_key()
    idp.remove_key(old_kid)
    idp.set_outage("error")
    assert await jwks.refresh_now() is False
    assert (await _get(client, old_token, key_store.primary)).status == 200

    idp.set_outage("ok")
    assert await jwks.refresh_now() is True
    refused = await _get(client, old_token, key_store.primary)
    assert refused.status == 401
    assert (await refused.json())["code"] == "TokenSignatureKeyNotFound"
    assert (await _get(client, idp.mint_token(), key_store.primary)).status == 200


async def test_unknown_kid_flood_beside_valid_traffic_costs_one_fetch_per_cooldown(
    make_client: MakeClient,
    idp: LocalIdentityProvider,
    key_store: Credentials,
    caplog: pytest.LogCaptureFixture,
) -> None:
    # J-12: 2.5 s of forged kids at full speed, with valid requests alongside.
    client = await make_client(jwks_kid_cooldown_seconds=1)
    valid = idp.mint_token()
    assert (await _get(client, valid, key_store.primary)).status == 200
    before = idp.hits["jwks"]
    codes: list[str] = []
    valid_statuses: list[int] = []
    payload = _payload(idp)

    async def flood() -> None:
        while time.monotonic() < deadline:
            forged = _unknown_kid_token(payload, uuid.uuid4().hex)
            response = await _get(client, forged, key_store.primary)
            codes.append((await response.json())["code"])

    async def legitimate() -> None:
        while time.monotonic() < deadline:
            valid_statuses.append((await _get(client, valid, key_store.primary)).status)
            await asyncio.sleep(0.01)

    deadline = time.monotonic() + 2.5
    async with heartbeat() as beat:
        await asyncio.gather(*(flood() for _ in range(8)), legitimate())

    assert len(codes) > 200
    assert set(codes) == {"TokenSignatureKeyNotFound"}
    assert valid_statuses and set(valid_statuses) == {200}
    # One refresh per started cooldown window (three in 2.5 s), whatever N is.
    assert idp.hits["jwks"] - before <= 3
    assert client.app[JWKS].kids == {idp.current_kid}
    # One aggregated warning per window, not one per forged request.
    warnings = [r for r in caplog.records if r.getMessage() == "jwks.unknown_kid"]
    assert len(warnings) <= 4
    assert beat.max_lag < MAX_LAG


# --- cancellation ----------------------------------------------------------------


async def test_cancelled_caller_of_a_shared_fetch_does_not_cancel_it(
    idp: LocalIdentityProvider, caplog: pytest.LogCaptureFixture
) -> None:
    # A starts the fetch (slow IdP) and is cancelled; B..J still get keys.
    policy = JwksPolicy(kid_cooldown_seconds=1, total_timeout=5.0)
    cache = JwksCache(idp.openid_config_url, (idp.issuer,), policy)
    await cache.start()
    try:
        await _until(lambda: cache.ready)
        new_kid = idp.rotate_key()
        idp.set_outage("slow", delay=0.3)
        seen = idp.hits["discovery"]
        first = asyncio.create_task(cache.key_for(new_kid))
        await _until(lambda: idp.hits["discovery"] > seen)
        others = [asyncio.create_task(cache.key_for(new_kid)) for _ in range(9)]
        await asyncio.sleep(0)
        first.cancel()
        keys = await asyncio.gather(*others)
        with pytest.raises(asyncio.CancelledError):
            await first
        assert all(key is not None for key in keys)
        assert idp.hits["jwks"] == 2  # the warm-up and the one shared refresh
        idp.set_outage("ok")
        assert await cache.refresh_now() is True
    finally:
        await cache.close()


async def test_client_that_disconnects_during_a_shared_fetch_leaves_others_served(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    # R-08 over HTTP: the test server cancels handlers on disconnect (production
    # does not, which is the easier case); the others still get 200.
    client = await make_client(jwks_kid_cooldown_seconds=1)
    assert (await _get(client, idp.mint_token(), key_store.primary)).status == 200
    idp.rotate_key()
    idp.set_outage("slow", delay=0.3)
    token = idp.mint_token()
    seen = idp.hits["discovery"]
    leaver = asyncio.create_task(_get(client, token, key_store.primary))
    await _until(lambda: idp.hits["discovery"] > seen)
    stayers = [
        asyncio.create_task(_get(client, token, key_store.primary)) for _ in range(9)
    ]
    await asyncio.sleep(0.05)
    leaver.cancel()
    responses = await asyncio.gather(*stayers)
    assert [r.status for r in responses] == [200] * 9
    with pytest.raises(asyncio.CancelledError):
        await leaver


# --- graceful shutdown -----------------------------------------------------------


async def test_shutdown_with_requests_in_flight_and_a_refresh_running_is_clean(
    idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    # R-12 in process: the runner's cleanup (what SIGTERM triggers) while 40
    # requests are in flight and a refresh hangs on the IdP.
    async def slow(request: web.Request) -> web.Response:
        await asyncio.sleep(0.4)
        return web.json_response({"slow": True})

    settings = settings_for(idp, key_store.store.path, **FAST)
    app = create_app(settings)
    app.router.add_get("/slow", slow)
    serving = serve_like_production(app, settings.max_header_bytes)
    server = await serving.__aenter__()
    try:
        jwks = app[JWKS]
        await _until(lambda: jwks.ready)
        idp.set_outage("hang", endpoints=("jwks",))
        refresh = asyncio.create_task(jwks.refresh_now())
        await _until(lambda: idp.hits["jwks"] >= 2)
        headers = list(auth_headers(idp.mint_token(), key_store.primary).items())
        requests = [
            asyncio.create_task(
                send_raw(server.host, server.port, build_request("GET", path, headers))
            )
            for path in ["/slow"] * 20 + [HEALTH] * 20
        ]
        await asyncio.sleep(0.1)
    finally:
        await serving.__aexit__(None, None, None)
    statuses = [response.status for response in await asyncio.gather(*requests)]
    assert statuses == [200] * 40
    # The cleanup cancelled the hung refresh instead of waiting for it.
    assert refresh.done()
    assert refresh.cancelled() or refresh.result() is False


async def test_serve_process_on_sigterm_drains_and_exits_cleanly(
    idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    # R-12 end to end: a real `python -m service serve`; a refresh hangs on the
    # IdP while requests wait on it; SIGTERM; every request sent before the
    # signal gets its normal answer and the output shows no task or session left.
    env = service_environment(idp, key_store.store.path, IDP_TIMEOUT_SECONDS="2")
    async with ServiceProcess(env) as process:
        server = RawServer("127.0.0.1", int(process.url.rsplit(":", 1)[1]))
        headers = auth_headers(idp.mint_token(), key_store.primary)
        valid = build_request("GET", HEALTH, list(headers.items()))
        assert (await server.send(valid)).status == 200
        idp.set_outage("hang", endpoints=("jwks",))
        seen = idp.hits["jwks"]
        forged = _unknown_kid_token(_payload(idp), "rotated-in-an-emergency")
        waiting = build_request(
            "GET", HEALTH, list(auth_headers(forged, key_store.primary).items())
        )
        in_flight = [asyncio.create_task(server.send(waiting)) for _ in range(5)]
        quick = [asyncio.create_task(server.send(valid)) for _ in range(20)]
        await _until(lambda: idp.hits["jwks"] > seen)
        assert [r.status for r in await asyncio.gather(*quick)] == [200] * 20
        code = await process.stop()
        responses = await asyncio.gather(*in_flight)

    assert code == 0
    assert [r.status for r in responses] == [401] * 5
    assert {r.json()["code"] for r in responses} == {"TokenSignatureKeyNotFound"}
    output = process.output
    for trouble in (*_LOOP_TROUBLE, "Traceback", "ResourceWarning"):
        assert trouble not in output, output[-2000:]
