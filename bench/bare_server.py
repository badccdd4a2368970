"""The baseline: bare aiohttp answering a health-like JSON body, with no checks."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import orjson
from aiohttp import web

__all__ = ("main",)

_JSON = "application/json"


async def health(request: web.Request) -> web.Response:
    # Built and serialized per request, about the size and shape of the service's
    # health body, so the baseline does the same JSON work and only skips the checks.
    payload = {
        "status": "ok",
        "identityProvider": {
            "state": "fresh",
            "key_count": 1,
            "age_seconds": 12.345,
            "last_refresh": {"result": "ok", "seconds_ago": 12.345, "error": None},
            "consecutive_failures": 0,
            "retry_in_seconds": 0.0,
            "fetches": {"discovery:ok": 1, "jwks:ok": 1},
        },
        "subscriptionStore": {
            "reload_ok": True,
            "subscriptions": 1,
            "loaded_at": "2026-01-01T00:00:00.000000+00:00",
        },
        "tokenCache": {"entries": 1, "hits": 0},
    }
    return web.Response(body=orjson.dumps(payload), content_type=_JSON)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    args = parser.parse_args()
    loop_name = _install_loop_policy()
    asyncio.run(_serve(args.host, args.port, loop_name))
    return 0


def _install_loop_policy() -> str:
    # The same choice the service makes, so the comparison is loop for loop.
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def _serve(host: str, port: int, loop_name: str) -> None:
    app = web.Application()
    app.router.add_get("/api/v2/health", health)
    runner = web.AppRunner(app, access_log=None, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, host, port, backlog=1024)
    await site.start()
    print(f"bare aiohttp on http://{host}:{port} ({loop_name})", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, stop.set)
    try:
        await stop.wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    sys.exit(main())
