"""Real servers for black-box tests: exact request bytes; a service on its own loop."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import json
import os
import re
import signal
import sys
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from aiohttp import web
from multidict import CIMultiDict, CIMultiDictProxy

from service.app import create_app
from service.idp import LocalIdentityProvider
from service.protocol import SafeAppRunner
from service.server import runner_options
from service.settings import Settings

__all__ = (
    "LiveService",
    "RawResponse",
    "RawServer",
    "ServiceProcess",
    "build_request",
    "send_raw",
    "serve_like_production",
    "service_environment",
)

T = TypeVar("T")

_HEAD_LIMIT = 1 << 16
_ROOT = Path(__file__).resolve().parent.parent
_LISTENING = re.compile(r"listening on http://[^\s:]+:(\d+)")
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
            # A response to HEAD announces a length but carries no body.
            return await _read_response(reader, bodiless=request.startswith(b"HEAD "))
        finally:
            writer.close()
            with contextlib.suppress(ConnectionError):
                await writer.wait_closed()


@contextlib.asynccontextmanager
async def serve_like_production(
    app: web.Application, max_header_bytes: int
) -> AsyncIterator[RawServer]:
    """Serve ``app`` on 127.0.0.1 with the runner and options of ``run_server``.

    Not ``TestServer``: it turns ``handler_cancellation`` on, which production
    leaves off, and it drops the header limits these tests are about.
    """
    runner = SafeAppRunner(app, **runner_options(max_header_bytes))
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


async def _read_response(
    reader: asyncio.StreamReader, *, bodiless: bool
) -> RawResponse:
    head = await reader.readuntil(b"\r\n\r\n")
    if len(head) > _HEAD_LIMIT:
        raise ValueError("response head is too large")
    status_line, *header_lines = head[:-4].decode("latin-1").split("\r\n")
    _version, status, *reason = status_line.split(" ", 2)
    headers: CIMultiDict[str] = CIMultiDict()
    for line in header_lines:
        name, _, value = line.partition(":")
        headers.add(name.strip(), value.strip())

    if bodiless:
        body = b""
    elif headers.get("Transfer-Encoding", "").lower() == "chunked":
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


class LiveService:
    """A local identity provider and the app, served on their own loop in a thread.

    For tests that outlive one event loop: a module of attack cases sharing one
    service, or a synchronous hypothesis test. ``run`` (from a thread) and
    ``call`` (from another loop) execute a coroutine on the service's loop,
    which is where the app and the provider must be touched.
    """

    def __init__(
        self,
        keys_file: Path,
        settings_for: Callable[[LocalIdentityProvider, Path], Settings],
        **app_kwargs: Any,
    ) -> None:
        self._keys_file = keys_file
        self._settings_for = settings_for
        self._app_kwargs = app_kwargs
        self._ready = threading.Event()
        self._failure: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._main, name="live-service")
        self.idp: LocalIdentityProvider
        self.app: web.Application
        self.server: RawServer
        self.settings: Settings

    @property
    def url(self) -> str:
        return f"http://{self.server.host}:{self.server.port}"

    def start(self) -> LiveService:
        self._thread.start()
        self._ready.wait(timeout=30)
        if self._failure is not None:
            raise RuntimeError("the live service did not start") from self._failure
        if not self._ready.is_set():
            raise RuntimeError("the live service did not start within 30 s")
        return self

    def stop(self) -> None:
        loop, stop = self._loop, self._stop
        if loop is not None and stop is not None and not loop.is_closed():
            loop.call_soon_threadsafe(stop.set)
        self._thread.join(timeout=30)
        if self._thread.is_alive():
            raise RuntimeError("the live service did not stop within 30 s")
        if self._failure is not None:
            raise RuntimeError("the live service failed") from self._failure

    def run(self, make: Callable[[], Awaitable[T]], timeout: float = 30.0) -> T:
        """Run ``make()`` on the service's loop and wait for it (blocking)."""
        return self._submit(make).result(timeout)

    async def call(self, make: Callable[[], Awaitable[T]]) -> T:
        """Run ``make()`` on the service's loop, awaited from another loop."""
        return await asyncio.wrap_future(self._submit(make))

    def _submit(self, make: Callable[[], Awaitable[T]]) -> concurrent.futures.Future[T]:
        if self._loop is None:
            raise RuntimeError("the live service is not running")

        async def invoke() -> T:
            return await make()

        return asyncio.run_coroutine_threadsafe(invoke(), self._loop)

    def _main(self) -> None:
        loop = asyncio.new_event_loop()
        self._loop = loop
        try:
            loop.run_until_complete(self._serve())
        except BaseException as err:  # handed to start() or stop()
            self._failure = err
        finally:
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.run_until_complete(loop.shutdown_default_executor())
            loop.close()
            self._ready.set()

    async def _serve(self) -> None:
        self._stop = asyncio.Event()
        async with LocalIdentityProvider() as idp:
            settings = self._settings_for(idp, self._keys_file)
            app = create_app(settings, **self._app_kwargs)
            async with serve_like_production(app, settings.max_header_bytes) as server:
                self.idp, self.app, self.server = idp, app, server
                self.settings = settings
                self._ready.set()
                await self._stop.wait()


def service_environment(
    idp: LocalIdentityProvider, keys_file: Path, **settings: str
) -> dict[str, str]:
    """The environment of a real ``serve`` process pointed at a local IdP."""
    env = {
        name: value
        for name, value in os.environ.items()
        if not name.startswith(("ENTRA_", "APIM_", "JWKS_", "IDP_", "AUTH_"))
    }
    env.update(
        ENTRA_TENANT_ID=idp.tenant_id,
        ENTRA_AUDIENCES=f"{idp.audience},{idp.app_id}",
        ENTRA_OPENID_CONFIG_URL=idp.openid_config_url,
        ENTRA_ISSUERS=f"{idp.issuer},{idp.issuer_v1}",
        APIM_SUBSCRIPTION_KEYS_FILE=str(keys_file),
        HOST="127.0.0.1",
        PORT="0",
        LOG_FORMAT="json",
        # Unclosed resources must show up in the output instead of passing quietly.
        PYTHONWARNINGS="default",
    )
    env.update(settings)
    return env


class ServiceProcess:
    """``python -m service serve`` as a real process, its whole output kept.

    Use as ``async with``: it returns once the service listens, and stops it
    with SIGTERM on the way out (``stop`` does so earlier, and says how it ended).
    """

    def __init__(self, env: Mapping[str, str], *args: str) -> None:
        self._env = dict(env)
        self._args = args or ("serve",)
        self._process: asyncio.subprocess.Process | None = None
        self._readers: list[asyncio.Task[None]] = []
        self._stdout: list[str] = []
        self._stderr: list[str] = []
        self._port: asyncio.Future[int] | None = None
        self._exited: asyncio.Future[int] | None = None
        self.returncode: int | None = None

    @property
    def pid(self) -> int:
        if self._process is None:
            raise RuntimeError("the service process is not started")
        return self._process.pid

    @property
    def url(self) -> str:
        if self._port is None or not self._port.done():
            raise RuntimeError("the service is not listening yet")
        return f"http://127.0.0.1:{self._port.result()}"

    @property
    def output(self) -> str:
        """Everything written to stdout and stderr so far."""
        return "".join(self._stdout) + "".join(self._stderr)

    @property
    def stderr(self) -> str:
        return "".join(self._stderr)

    async def __aenter__(self) -> ServiceProcess:
        self._port = asyncio.get_running_loop().create_future()
        self._process = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "service",
            *self._args,
            cwd=_ROOT,
            env=self._env,
            stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )
        assert self._process.stdout is not None and self._process.stderr is not None
        self._readers = [
            asyncio.create_task(self._collect(self._process.stdout, self._stdout)),
            asyncio.create_task(self._collect(self._process.stderr, self._stderr)),
        ]
        # Held, not fire-and-forget: the loop keeps only weak references to tasks.
        self._exited = asyncio.ensure_future(self._process.wait())
        try:
            async with asyncio.timeout(30):
                await asyncio.wait(
                    [self._port, self._exited], return_when=asyncio.FIRST_COMPLETED
                )
        except TimeoutError:
            await self.stop()
            raise RuntimeError(f"the service did not listen:\n{self.output}") from None
        if not self._port.done():
            await self.stop()
            raise RuntimeError(f"the service exited at start:\n{self.output}")
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.stop()

    async def stop(self, timeout: float = 45.0) -> int:
        """SIGTERM, then wait for the exit and the last of the output."""
        process = self._process
        if process is None:
            raise RuntimeError("the service process is not started")
        if process.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                process.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(timeout):
                self.returncode = await process.wait()
        except TimeoutError:
            process.kill()
            self.returncode = await process.wait()
        exited = [] if self._exited is None else [self._exited]
        await asyncio.gather(*self._readers, *exited)
        if self._port is not None and not self._port.done():
            self._port.cancel()
        return self.returncode

    async def _collect(self, stream: asyncio.StreamReader, into: list[str]) -> None:
        async for raw in stream:
            line = raw.decode("utf-8", "replace")
            into.append(line)
            match = _LISTENING.search(line)
            if match and self._port is not None and not self._port.done():
                self._port.set_result(int(match.group(1)))
