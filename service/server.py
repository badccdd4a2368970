"""Running the app: one process, or several on one port, with graceful shutdown."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import signal
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web
from aiohttp.abc import AbstractAccessLogger

from .access_log import access_log_options
from .log import app_logger
from .protocol import SafeAppRunner

__all__ = ("install_event_loop_policy", "run_server", "run_workers", "runner_options")

SHUTDOWN_TIMEOUT = 30.0
_RESTART_BACKOFF_MAX = 30.0
# A worker that ran this long before dying starts the backoff again from 1 s.
_RESTART_BACKOFF_RESET = 60.0


def install_event_loop_policy() -> str:
    """Use uvloop when the ``speed`` extra is installed; returns the loop's name."""
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def run_server(
    app: web.Application,
    host: str,
    port: int,
    *,
    max_header_bytes: int,
    reuse_port: bool = False,
    on_started: Callable[[str, int], Awaitable[None] | None] | None = None,
    access_log_class: type[AbstractAccessLogger] | None = None,
) -> None:
    """Serve until SIGTERM or SIGINT, then drain in-flight requests and clean up.

    On the signal the listening socket closes first, then requests in flight get
    up to ``SHUTDOWN_TIMEOUT`` to finish, then the app's cleanup runs (background
    tasks, client sessions), so nothing is cancelled half-way or left unclosed.
    """
    options = runner_options(max_header_bytes)
    if access_log_class is not None:
        options["access_log_class"] = access_log_class
    runner = SafeAppRunner(app, **options)
    await runner.setup()
    # Everything built so far (modules, the app, its caches' structures) lives
    # as long as the process: out of the collector's way, a full collection
    # walks only what requests leave behind (docs/performance.md, "Pauses").
    gc.collect()
    gc.freeze()
    try:
        site = web.TCPSite(runner, host, port, reuse_port=reuse_port, backlog=1024)
        await site.start()
        bound_port = _bound_port(runner, port)
        app_logger.info("server.listening", extra={"host": host, "port": bound_port})
        stop = _stop_event()
        if on_started is not None:
            result = on_started(host, bound_port)
            if result is not None:
                await result
        await stop.wait()
        app_logger.info("server.stopping", extra={"pid": os.getpid()})
    finally:
        await runner.cleanup()


def runner_options(max_header_bytes: int) -> dict[str, Any]:
    """The ``AppRunner`` options production serves with, for tests to serve alike."""
    return {
        "handle_signals": False,
        "shutdown_timeout": SHUTDOWN_TIMEOUT,
        # Entra tokens of users in many groups exceed aiohttp's 8190-byte default.
        "max_line_size": max_header_bytes,
        "max_field_size": max_header_bytes,
        **access_log_options(),
    }


def run_workers(argv: Sequence[str], workers: int) -> int:
    """Run ``workers`` copies of this command sharing one port through SO_REUSEPORT.

    Each worker has its own caches and event loop. A worker that dies is
    restarted with backoff; SIGTERM or SIGINT is passed on and awaited.
    """
    command = [sys.executable, "-m", "service", *argv, "--reuse-port"]
    children: list[subprocess.Popen[bytes]] = []
    stopping = False

    def forward(signum: int, _frame: object) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.poll() is None:
                child.send_signal(signal.SIGTERM)

    # Handlers first: a signal that arrives while the workers start must still
    # reach every one of them, not kill the supervisor and orphan them.
    signal.signal(signal.SIGTERM, forward)
    signal.signal(signal.SIGINT, forward)
    for _ in range(workers):
        if stopping:
            break
        children.append(subprocess.Popen(command))  # noqa: S603
    backoff = 1.0
    last_exit = -_RESTART_BACKOFF_RESET
    while not stopping:
        time.sleep(0.2)
        for index, child in enumerate(children):
            code = child.poll()
            if code is None or stopping:
                continue
            app_logger.warning(
                "server.worker_exited", extra={"exit_code": code, "pid": child.pid}
            )
            if time.monotonic() - last_exit > _RESTART_BACKOFF_RESET:
                backoff = 1.0
            last_exit = time.monotonic()
            time.sleep(backoff)
            backoff = min(backoff * 2, _RESTART_BACKOFF_MAX)
            if not stopping:
                children[index] = subprocess.Popen(command)  # noqa: S603
    codes = []
    for child in children:
        with contextlib.suppress(subprocess.TimeoutExpired):
            child.wait(timeout=SHUTDOWN_TIMEOUT + 5)
        if child.poll() is None:
            child.kill()
        codes.append(child.wait())
    return 0 if all(code in (0, -signal.SIGTERM) for code in codes) else 1


def _stop_event() -> asyncio.Event:
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    return stop


def _bound_port(runner: web.AppRunner, requested: int) -> int:
    for address in runner.addresses:
        if isinstance(address, tuple) and len(address) >= 2:
            return int(address[1])
    return requested
