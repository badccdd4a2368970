"""A TCP proxy in front of Redis that tests switch: pass, refuse, black-hole, close.

Also the helpers every Redis test shares: reaching the real Redis (or skipping,
visibly, outside CI), and a fleet of replicas with a key prefix of its own,
cleaned up after the test.
"""

from __future__ import annotations

import asyncio
import contextlib
import enum
import os
import socket
import uuid
from collections.abc import Awaitable, Callable
from types import TracebackType
from typing import Any

import pytest
from redis.asyncio import Redis

__all__ = (
    "REDIS_HOST",
    "REDIS_PORT",
    "Fleet",
    "ProxyMode",
    "RedisProxy",
    "delete_prefix",
    "new_prefix",
    "read_everything",
    "redis_client",
    "require_redis",
)

REDIS_HOST = "127.0.0.1"
REDIS_PORT = 6379
_CHUNK = 65536


class ProxyMode(enum.StrEnum):
    """What the proxy does with connections, new and open."""

    PASS = "pass"  # noqa: S105 - a mode, not a password: forward both ways
    REFUSE = "refuse"  # stop listening (connection refused), drop open ones
    BLACK_HOLE = "black-hole"  # accept and swallow everything, never answer
    CLOSE = "close"  # accept, then reset at once; reset open ones


class RedisProxy:
    """Listens on 127.0.0.1 (a port of its own, kept across mode changes)."""

    def __init__(
        self, upstream_host: str = REDIS_HOST, upstream_port: int = REDIS_PORT
    ):
        self._upstream = (upstream_host, upstream_port)
        self._mode = ProxyMode.PASS
        self._server: asyncio.Server | None = None
        self._port = 0
        self._links: set[_Link] = set()
        self.accepted = 0

    @property
    def port(self) -> int:
        return self._port

    @property
    def mode(self) -> ProxyMode:
        return self._mode

    def url(self, *, db: int = 0, credentials: str = "") -> str:
        return f"redis://{credentials}127.0.0.1:{self._port}/{db}"

    async def start(self) -> None:
        await self._listen()

    async def close(self) -> None:
        await self._stop_listening()
        await self._drop_links()

    async def __aenter__(self) -> RedisProxy:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def set_mode(self, mode: ProxyMode) -> None:
        self._mode = mode
        if mode is ProxyMode.REFUSE:
            await self._stop_listening()
            await self._drop_links()
            return
        if mode is ProxyMode.CLOSE:
            await self._drop_links()
        if self._server is None:
            await self._listen()

    async def _listen(self) -> None:
        # reuse_address: the same port again right after REFUSE closed it.
        self._server = await asyncio.start_server(
            self._accept, "127.0.0.1", self._port, reuse_address=True
        )
        self._port = self._server.sockets[0].getsockname()[1]

    async def _stop_listening(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
            await server.wait_closed()

    async def _drop_links(self) -> None:
        links, self._links = self._links, set()
        for link in links:
            link.abort()
        for link in links:
            await link.finished()

    async def _accept(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.accepted += 1
        if self._mode is ProxyMode.CLOSE:
            writer.transport.abort()
            return
        try:
            upstream = await asyncio.open_connection(*self._upstream)
        except OSError:
            writer.transport.abort()
            return
        link = _Link(self, (reader, writer), upstream)
        self._links.add(link)
        await link.finished()
        self._links.discard(link)


class _Link:
    """One client connection and its upstream connection, pumped both ways."""

    def __init__(
        self,
        proxy: RedisProxy,
        client: tuple[asyncio.StreamReader, asyncio.StreamWriter],
        upstream: tuple[asyncio.StreamReader, asyncio.StreamWriter],
    ) -> None:
        self._proxy = proxy
        self._writers = (client[1], upstream[1])
        self._tasks = (
            asyncio.create_task(self._pump(client[0], upstream[1])),
            asyncio.create_task(self._pump(upstream[0], client[1])),
        )

    async def _pump(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        with contextlib.suppress(OSError, asyncio.IncompleteReadError):
            while data := await reader.read(_CHUNK):
                if self._proxy.mode is ProxyMode.BLACK_HOLE:
                    continue
                writer.write(data)
                await writer.drain()
        self.abort()

    def abort(self) -> None:
        for writer in self._writers:
            writer.transport.abort()

    async def finished(self) -> None:
        await asyncio.gather(*self._tasks, return_exceptions=True)
        for writer in self._writers:
            writer.close()
            with contextlib.suppress(OSError):
                await writer.wait_closed()


def require_redis() -> None:
    """Skip, saying why, when Redis is unreachable; in CI, fail instead."""
    try:
        with socket.create_connection((REDIS_HOST, REDIS_PORT), timeout=1.0) as sock:
            sock.settimeout(1.0)
            sock.sendall(b"PING\r\n")
            reply = sock.recv(64)
    except OSError as err:
        reason = f"Redis at {REDIS_HOST}:{REDIS_PORT} is unreachable ({err})"
    else:
        if reply.startswith(b"+PONG"):
            return
        reason = f"Redis at {REDIS_HOST}:{REDIS_PORT} did not answer PING"
    if os.environ.get("CI"):
        pytest.fail(f"{reason}; CI must provide Redis")
    pytest.skip(f"{reason}; start it (scripts/test.sh does) to run this test")


def new_prefix() -> str:
    """A ``CACHE_KEY_PREFIX`` no other test run uses."""
    return f"test-{uuid.uuid4().hex[:16]}"


def redis_client() -> Redis:
    return Redis(
        host=REDIS_HOST, port=REDIS_PORT, socket_timeout=2.0, socket_connect_timeout=2.0
    )


async def delete_prefix(prefix: str) -> None:
    client = redis_client()
    try:
        keys = [key async for key in client.scan_iter(match=f"{prefix}:*")]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


async def read_everything(prefix: str) -> dict[bytes, bytes]:
    """Every key under ``prefix`` and the bytes of its value, whatever its type."""
    client = redis_client()
    contents: dict[bytes, bytes] = {}
    try:
        async for key in client.scan_iter(match=f"{prefix}:*"):
            kind = _bytes(await client.type(key))
            if kind == b"string":
                contents[key] = _bytes(await client.get(key))
            elif kind == b"hash":
                fields = await client.hgetall(key)
                contents[key] = b"\n".join(
                    _bytes(k) + b"=" + _bytes(v) for k, v in fields.items()
                )
            else:
                contents[key] = kind
    finally:
        await client.aclose()
    return contents


def _bytes(value: object) -> bytes:
    # This client does not decode replies; anything else is a test bug.
    if not isinstance(value, bytes):
        raise TypeError(f"expected bytes from Redis, got {type(value).__name__}")
    return value


class Fleet:
    """The replicas of one test, sharing a key prefix of their own.

    ``close`` stops the replicas before it deletes their keys: a replica still
    running would publish its state again into the emptied prefix.
    """

    def __init__(self, make: Callable[..., Awaitable[Any]], prefix: str) -> None:
        self._make = make
        self._clients: list[Any] = []
        self.prefix = prefix

    async def replica(self, **changes: Any) -> Any:
        client = await self._make(cache_key_prefix=self.prefix, **changes)
        self._clients.append(client)
        return client

    async def close(self) -> None:
        for client in self._clients:
            await client.close()
        await delete_prefix(self.prefix)
