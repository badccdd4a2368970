"""The benchmark's identity provider: the real local one, and a control port."""

from __future__ import annotations

import argparse
import asyncio
import sys
from pathlib import Path

from aiohttp import web

from service.idp import LocalIdentityProvider, OutageMode

__all__ = ("main",)

_PROVIDER: web.AppKey[LocalIdentityProvider] = web.AppKey("provider")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--control-port", type=int, required=True)
    args = parser.parse_args()
    asyncio.run(_serve(args.port, args.control_port))
    return 0


async def _serve(port: int, control_port: int) -> None:
    # The control app lives beside the provider, never inside it: the provider
    # stays exactly the one the service and the tests use.
    async with LocalIdentityProvider(port=port) as provider:
        control = web.Application()
        control[_PROVIDER] = provider
        control.router.add_get("/info", _info)
        control.router.add_get("/hits", _hits)
        control.router.add_post("/mint", _mint)
        control.router.add_post("/outage", _outage)
        runner = web.AppRunner(control, access_log=None)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", control_port)
        await site.start()
        print(f"bench identity provider on {provider.base_url}", flush=True)
        try:
            await asyncio.Event().wait()
        finally:
            await runner.cleanup()


async def _info(request: web.Request) -> web.Response:
    provider = request.app[_PROVIDER]
    return web.json_response(
        {
            "tenant_id": provider.tenant_id,
            "app_id": provider.app_id,
            "audience": provider.audience,
            "issuers": [provider.issuer, provider.issuer_v1],
            "openid_config_url": provider.openid_config_url,
            "token": provider.mint_token(),
        }
    )


async def _hits(request: web.Request) -> web.Response:
    return web.json_response(dict(request.app[_PROVIDER].hits))


async def _mint(request: web.Request) -> web.Response:
    """Write ``count`` distinct valid tokens to ``path``, one per line."""
    body = await request.json()
    count = int(body["count"])
    path = Path(str(body["path"]))
    provider = request.app[_PROVIDER]
    # Signing takes about 0.3 ms a token: tens of thousands block for seconds,
    # which is fine here because nothing else needs the provider meanwhile.
    with path.open("w", encoding="ascii") as stream:
        for _ in range(count):
            stream.write(provider.mint_token())
            stream.write("\n")
    return web.json_response({"count": count})


async def _outage(request: web.Request) -> web.Response:
    body = await request.json()
    delay = body.get("delay")
    provider = request.app[_PROVIDER]
    provider.set_outage(
        OutageMode(str(body["mode"])), delay=None if delay is None else float(delay)
    )
    return web.json_response({"mode": provider.outage.mode.value})


if __name__ == "__main__":
    sys.exit(main())
