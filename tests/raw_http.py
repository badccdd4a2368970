"""Exact request bytes over a plain socket to a real server, for header-level tests."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator, Iterable
from dataclasses import dataclass
from typing import Any

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from service.server import runner_options

__all__ = (
    "RawResponse",
    "RawServer",
    "build_request",
    "send_raw",
    "serve_like_production",
)

_HEAD_LIMIT = 1 << 16
_BODY_LIMIT = 1 << 22

HeaderLines = Iterable[tuple[str | bytes, str | bytes]]


@dataclass(frozen=True)
class RawResponse:
    """A response read byte for byte: what the server really sent."""

    status: int
    reason: str
    headers: CIMultiDictProxy[str]
    body: bytes

    def json(self) -> Any:
        return json.loads(self.body)


@dataclass(frozen=True)
class RawServer:
    """Where a real server listens."""

    host: str
    port: int

    async def send(self, request: bytes, *, timeout: float = 10.0) -> RawResponse:
        return await send_raw(self.host, self.port, request, timeout=timeout)


def build_request(
    method: str,
    target: str,
    headers: HeaderLines = (),
    *,
    body: bytes = b"",
    host: str = "127.0.0.1",
) -> bytes:
    """A request with exactly these header lines, in order, nothing normalized.

    ``Host`` and ``Connection: close`` are added first (so one request is one
    connection); a name or value given as bytes is sent as is, control bytes
    included.
    """
    lines = [f"{method} {target} HTTP/1.1".encode("latin-1")]
    lines.append(b"Host: " + host.encode("ascii"))
    lines.append(b"Connection: close")
    for name, value in headers:
        lines.append(_raw(name) + b": " + _raw(value))
    if body:
        lines.append(b"Content-Length: " + str(len(body)).encode("ascii"))
    return b"\r\n".join(lines) + b"\r\n\r\n" + body


async def send_raw(
    host: str, port: int, request: bytes, *, timeout: float = 10.0
) -> RawResponse:
    """Write ``request`` and read one response; the server closes after it."""
    async with asyncio.timeout(timeout):
        reader, writer = await asyncio.open_connection(host, port)
        try:
            writer.write(request)
            await writer.drain()
            return await _read_response(reader)
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def serve_like_production(
    app: web.Application, max_header_bytes: int
) -> AsyncIterator[RawServer]:
    """Serve ``app`` on 127.0.0.1 with the runner options of ``run_server``.

    Not ``TestServer``: it turns ``handler_cancellation`` on, which production
    leaves off, and header limits are exactly what these tests are about.
    """
    runner = web.AppRunner(app, **runner_options(max_header_bytes))
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        address = runner.addresses[0]
        yield RawServer(address[0], int(address[1]))
    finally:
        await runner.cleanup()


def _raw(part: str | bytes) -> bytes:
    # latin-1 maps code points 0-255 to single bytes, so a str can carry any byte.
    return part if isinstance(part, bytes) else part.encode("latin-1")


async def _read_response(reader: asyncio.StreamReader) -> RawResponse:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > _HEAD_LIMIT:
        raise ValueError("response head is too large")
    status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
    _version, status, *reason = status_line.split(" ", 2)
    headers: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())

    if headers.get("Transfer-Encoding", "").lower() == "chunked":
        body = await _read_chunked(reader)
    elif "Content-Length" in headers:
        body = await reader.readexactly(int(headers["Content-Length"]))
    else:
        body = await reader.read(_BODY_LIMIT)
    return RawResponse(int(status), " ".join(reason), CIMultiDictProxy(headers), body)


async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
    body = bytearray()
    while True:
        size_line = await reader.readuntil(b"\r\n")
        size = int(size_line.split(b";")[0], 16)
        if size == 0:
            await reader.readuntil(b"\r\n")
            return bytes(body)
        body += await reader.readexactly(size)
        await reader.readexactly(2)
        if len(body) > _BODY_LIMIT:
            raise ValueError("response body is too large")
