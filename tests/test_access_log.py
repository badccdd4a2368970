"""The access log: one line per request, with identity or rejection, never a secret."""

from __future__ import annotations

import io
import json
import logging
from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import ClientSession, web

from service.app import create_app
from service.idp import LocalIdentityProvider
from service.log import configure_logging
from service.protocol import SafeAppRunner
from service.server import runner_options
from service.settings import Settings
from tests.conftest import Credentials, auth_headers


@pytest.fixture
def log_stream() -> Iterator[io.StringIO]:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging("INFO", "json", stream=stream)
    yield stream
    handlers, level = saved
    root.handlers[:] = handlers
    root.setLevel(level)


@pytest_asyncio.fixture
async def base_url(settings: Settings) -> AsyncIterator[str]:
    runner = SafeAppRunner(create_app(settings), **runner_options(16384))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    yield f"http://127.0.0.1:{runner.addresses[0][1]}"
    await runner.cleanup()


def _access_lines(stream: io.StringIO) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in stream.getvalue().splitlines() if line]
    return [line for line in lines if line.get("msg") == "http.access"]


async def test_accepted_request_logs_identity_and_request_id(
    log_stream: io.StringIO,
    base_url: str,
    idp: LocalIdentityProvider,
    key_store: Credentials,
) -> None:
    token = idp.mint_token()
    headers = auth_headers(token, key_store.primary) | {"x-request-id": "req-1"}
    async with ClientSession() as session:
        async with session.get(f"{base_url}/api/v2/whoami", headers=headers) as resp:
            assert resp.status == 200
    [line] = _access_lines(log_stream)
    assert line["method"] == "GET"
    assert line["path"] == "/api/v2/whoami"
    assert line["status"] == 200
    assert line["bytes"] > 0
    assert line["request_id"] == "req-1"
    assert line["subscription"] == "contoso"
    assert line["client_id"] == idp.client_id
    assert line["oid"]
    assert "rejection" not in line
    assert token not in log_stream.getvalue()
    assert key_store.primary not in log_stream.getvalue()


async def test_rejected_request_logs_the_rejection_code(
    log_stream: io.StringIO, base_url: str, key_store: Credentials
) -> None:
    headers = {"Ocp-Apim-Subscription-Key": key_store.primary}
    async with ClientSession() as session:
        async with session.get(f"{base_url}/api/v2/health", headers=headers) as resp:
            assert resp.status == 401
    [line] = _access_lines(log_stream)
    assert line["status"] == 401
    assert line["rejection"] == "TokenNotPresent"
    assert "subscription" not in line


async def test_credential_query_values_are_redacted_in_the_access_line(
    log_stream: io.StringIO,
    base_url: str,
    idp: LocalIdentityProvider,
    key_store: Credentials,
) -> None:
    token = idp.mint_token()
    url = (
        f"{base_url}/api/v2/health?access_token={token}"
        f"&subscription-key={key_store.primary}&page=2"
    )
    async with ClientSession() as session:
        async with session.get(url) as resp:
            assert resp.status == 400
    [line] = _access_lines(log_stream)
    assert line["path"] == (
        "/api/v2/health?access_token=[REDACTED]&subscription-key=[REDACTED]&page=2"
    )
    assert line["rejection"] == "CredentialsInQuery"
    assert token not in log_stream.getvalue()
    assert key_store.primary not in log_stream.getvalue()


async def test_access_log_is_silent_above_info(
    base_url: str, key_store: Credentials
) -> None:
    stream = io.StringIO()
    root = logging.getLogger()
    saved = (root.handlers[:], root.level)
    configure_logging("WARNING", "json", stream=stream)
    try:
        async with ClientSession() as session:
            async with session.get(f"{base_url}/livez") as resp:
                assert resp.status == 200
    finally:
        handlers, level = saved
        root.handlers[:] = handlers
        root.setLevel(level)
    assert _access_lines(stream) == []
