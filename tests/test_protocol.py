"""Requests the HTTP parser refuses: a fixed JSON error, never an echo of them."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong

from service.idp import LocalIdentityProvider
from service.protocol import RefusalLog, SafeAppRunner
from service.server import runner_options


async def _ok(request: web.Request) -> web.Response:
    return web.Response(text="ok")


@pytest_asyncio.fixture
async def port() -> AsyncIterator[int]:
    app = web.Application()
    app.router.add_get("/", _ok)
    runner = SafeAppRunner(app, **runner_options(16384))
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    address = runner.addresses[0]
    yield int(address[1])
    await runner.cleanup()


async def _raw(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(request)
    await writer.drain()
    data = await reader.read()
    writer.close()
    await writer.wait_closed()
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return status, headers, body


async def test_control_character_in_authorization_gets_400_without_the_header(
    port: int, idp: LocalIdentityProvider
) -> None:
    token = idp.mint_token()
    request = (
        f"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {token}\x01\r\n\r\n"
    ).encode()
    status, headers, body = await _raw(port, request)
    assert status == 400
    assert json.loads(body) == {
        "statusCode": 400,
        "code": "BadRequest",
        "message": "The request is not valid HTTP",
    }
    assert headers["Cache-Control"] == "no-store"
    assert token.split(".")[1][:24].encode() not in body


async def test_header_over_the_limit_gets_431_without_the_header(port: int) -> None:
    huge = "A" * 17000
    request = f"GET / HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {huge}\r\n\r\n"
    status, _, body = await _raw(port, request.encode())
    assert status == 431
    assert json.loads(body)["code"] == "RequestHeaderFieldsTooLarge"
    assert b"AAAAAAAAAA" not in body


async def test_header_within_the_raised_limit_is_served(port: int) -> None:
    large = "A" * 12000
    request = (
        f"GET / HTTP/1.1\r\nHost: x\r\nX-Large: {large}\r\nConnection: close\r\n\r\n"
    )
    status, _, body = await _raw(port, request.encode())
    assert status == 200
    assert body == b"ok"


def test_refusals_are_logged_once_per_interval_with_counts(
    caplog: pytest.LogCaptureFixture,
) -> None:
    log = RefusalLog(interval=3600)
    with caplog.at_level(logging.WARNING, logger="rag_api_core"):
        for _ in range(50):
            log.record(LineTooLong(b"line", 8190))
    records = [r for r in caplog.records if r.getMessage() == "http.requests_refused"]
    assert len(records) == 1
    assert records[0].__dict__["counts"] == {"LineTooLong": 1}
