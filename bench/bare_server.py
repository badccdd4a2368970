"""The baseline: bare aiohttp answering a whoami-like JSON body, with no checks."""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal
import sys
import urllib.request
from collections.abc import Awaitable, Callable
from pathlib import Path

import orjson
from aiohttp import web
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.asymmetric import padding, rsa

__all__ = ("main",)

_JSON = "application/json"
Handler = Callable[[web.Request], Awaitable[web.Response]]


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


def verifying(token: str, jwks_url: str) -> Handler:
    """``whoami`` plus one RS256 verification of ``token``: the floor of the new-
    token regime. Key, message and signature are prepared once; nothing else
    about the token is checked."""
    with urllib.request.urlopen(jwks_url, timeout=10) as answer:  # noqa: S310
        keys = json.load(answer)["keys"]
    header, payload, signature = token.split(".")
    kid = json.loads(_b64(header))["kid"]
    jwk = next(k for k in keys if k.get("kid") == kid)
    numbers = rsa.RSAPublicNumbers(
        int.from_bytes(_b64(jwk["e"]), "big"), int.from_bytes(_b64(jwk["n"]), "big")
    )
    key = numbers.public_key()
    message = f"{header}.{payload}".encode("ascii")
    raw = _b64(signature)
    pad, digest = padding.PKCS1v15(), hashes.SHA256()

    async def whoami_verified(request: web.Request) -> web.Response:
        key.verify(raw, message, pad, digest)
        return await whoami(request)

    return whoami_verified


def _b64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


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
    parser.add_argument(
        "--verify",
        nargs=2,
        metavar=("TOKEN_FILE", "JWKS_URL"),
        help="also verify this token's RS256 signature on every request",
    )
    args = parser.parse_args()
    loop_name = _install_loop_policy() if args.loop == "uvloop" else "asyncio"
    handler: Handler = whoami
    if args.verify:
        token = Path(args.verify[0]).read_text(encoding="ascii").strip()
        handler = verifying(token, args.verify[1])
    asyncio.run(_serve(args.host, args.port, loop_name, handler))
    return 0


def _install_loop_policy() -> str:
    # The same choice the service makes, for the loop-for-loop comparison.
    try:
        import uvloop
    except ImportError:
        return "asyncio"
    asyncio.set_event_loop_policy(uvloop.EventLoopPolicy())
    return "uvloop"


async def _serve(host: str, port: int, loop_name: str, handler: Handler) -> None:
    app = web.Application()
    app.router.add_get("/api/v2/whoami", handler)
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
