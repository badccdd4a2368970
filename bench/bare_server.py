"""The baseline: bare aiohttp answering a whoami-like JSON body, with no checks."""

from __future__ import annotations

import argparse
import asyncio
import signal
import sys

import orjson
from aiohttp import web

__all__ = ("main",)

_JSON = "application/json"


async def whoami(request: web.Request) -> web.Response:
    # Built and serialized per request, of the shape and size of the service's
    # /api/v2/whoami body, so the baseline does the same JSON work and only skips
    # the checks.
    payload = {
        "subscription": {"name": "bench", "product": "bench"},
        "tid": "9188040d-6c67-4c5b-b112-36a304b66dad",
        "oid": "7a1d3c55-0c3b-4a45-9d71-6f0d2c8b1e42",
        "sub": "7a1d3c55-0c3b-4a45-9d71-6f0d2c8b1e42",
        "azp": "6e74172b-be56-4843-9ff4-e66a39bb12e3",
        "roles": ["Api.Access"],
        "scp": [],
        "ver": "2.0",
    }
    return web.Response(body=orjson.dumps(payload), content_type=_JSON)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument(
        "--loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="asyncio: aiohttp as installed and run by default; uvloop: the loop"
        " the service runs on when the speed extra is installed",
    )
    args = parser.parse_args()
    loop_name = _install_loop_policy() if args.loop == "uvloop" else "asyncio"
    asyncio.run(_serve(args.host, args.port, loop_name))
    return 0


def _install_loop_policy() -> str:
    # The same choice the service makes, for the loop-for-loop comparison.
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def _serve(host: str, port: int, loop_name: str) -> None:
    app = web.Application()
    app.router.add_get("/api/v2/whoami", whoami)
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
