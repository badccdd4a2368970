"""The command line: ``serve``, ``keys``, ``idp``, ``check-config`` and ``spec``."""

from __future__ import annotations

import argparse
import asyncio
import os
import shutil
import sys
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path

from typing import TYPE_CHECKING

import aiohttp
import orjson

from .app import create_app
from .jose_backend import JoseBackendError
from .keys_cli import add_keys_parser
from .keystore import KeyStoreError, KeyStoreFile
from .log import configure_logging
from .server import install_event_loop_policy, run_server, run_workers
from .settings import Settings, SettingsError, load_env_file

if TYPE_CHECKING:
    from .idp import LocalIdentityProvider

__all__ = ("main",)

_DEV_PORT = 8080


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        return int(args.handler(args))
    except (SettingsError, KeyStoreError, JoseBackendError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m service",
        description="APIM subscription key + Entra ID token front door",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    serve = commands.add_parser("serve", help="run the service")
    serve.add_argument("--host", help="interface to bind (HOST, default 0.0.0.0)")
    serve.add_argument("--port", type=int, help="port (PORT, default 8080)")
    serve.add_argument("--config", type=Path, help="a KEY=VALUE file of settings")
    serve.add_argument(
        "--dev", action="store_true", help="use an embedded local identity provider"
    )
    serve.add_argument("--workers", type=int, default=1, help="processes on one port")
    serve.add_argument("--reuse-port", action="store_true", help=argparse.SUPPRESS)
    serve.set_defaults(handler=_serve)

    idp = commands.add_parser("idp", help="run the local identity provider alone")
    idp.add_argument("--host", default="127.0.0.1")
    idp.add_argument("--port", type=int, default=8081)
    idp.add_argument("--tenant-id")
    idp.add_argument("--app-id")
    idp.set_defaults(handler=_idp)

    check = commands.add_parser(
        "check-config", help="print the effective settings and probe the keys"
    )
    check.add_argument("--config", type=Path)
    check.set_defaults(handler=_check_config)

    add_keys_parser(commands)
    return parser


def _environment(config: Path | None) -> dict[str, str]:
    values = load_env_file(config) if config is not None else {}
    values.update(os.environ)
    return values


def _serve(args: argparse.Namespace) -> int:
    if args.dev:
        return _serve_dev(args)
    env = _environment(args.config)
    settings = Settings.from_env(env)
    settings = settings.with_changes(
        host=args.host or settings.host,
        port=args.port if args.port is not None else settings.port,
    )
    if args.workers < 1:
        raise SettingsError("--workers", "must be 1 or more")
    if args.workers > 1:
        return run_workers(_worker_argv(args), args.workers)
    configure_logging(settings.log_level, settings.log_format)
    app = create_app(settings)
    loop_name = install_event_loop_policy()
    asyncio.run(
        run_server(
            app,
            settings.host,
            settings.port,
            max_header_bytes=settings.max_header_bytes,
            reuse_port=args.reuse_port,
            on_started=lambda host, port: _announce(loop_name, host, port),
        )
    )
    return 0


def _worker_argv(args: argparse.Namespace) -> list[str]:
    argv = ["serve"]
    if args.host:
        argv += ["--host", args.host]
    if args.port is not None:
        argv += ["--port", str(args.port)]
    if args.config is not None:
        argv += ["--config", str(args.config)]
    return argv


def _announce(loop_name: str, host: str, port: int) -> None:
    print(f"rag-api-core listening on http://{host}:{port} ({loop_name})", flush=True)


def _serve_dev(args: argparse.Namespace) -> int:
    env = _environment(args.config)
    log_level = env.get("LOG_LEVEL", "INFO").upper()
    configure_logging(log_level, env.get("LOG_FORMAT", "text").lower())
    host = args.host or "127.0.0.1"
    port = args.port if args.port is not None else int(env.get("PORT", _DEV_PORT))
    loop_name = install_event_loop_policy()
    workdir = Path(tempfile.mkdtemp(prefix="rag-api-dev-"))
    try:
        asyncio.run(_run_dev(env, host, port, workdir, loop_name))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


async def _run_dev(
    env: Mapping[str, str], host: str, port: int, workdir: Path, loop_name: str
) -> None:
    from .idp import LocalIdentityProvider

    idp = LocalIdentityProvider()
    await idp.start()
    try:
        keys = KeyStoreFile(workdir / "keys.json").add("dev", "dev")
        settings = Settings(
            tenant_id=idp.tenant_id,
            audiences=(idp.audience, idp.app_id),
            openid_config_url=idp.openid_config_url,
            issuers=(idp.issuer, idp.issuer_v1),
            subscription_keys_file=workdir / "keys.json",
            host=host,
            port=port,
            log_level=env.get("LOG_LEVEL", "INFO").upper(),
            log_format=env.get("LOG_FORMAT", "text").lower(),
        )
        app = create_app(settings)
        token = await _client_credentials_token(idp)

        def started(bound_host: str, bound_port: int) -> None:
            _print_dev_banner(idp, bound_port, keys.primary, token, loop_name)

        await run_server(
            app,
            host,
            port,
            max_header_bytes=settings.max_header_bytes,
            on_started=started,
        )
    finally:
        await idp.close()


async def _client_credentials_token(idp: LocalIdentityProvider) -> str:
    """Fetch a token the way a real client would: the client-credentials grant."""
    form = {
        "grant_type": "client_credentials",
        "client_id": idp.client_id,
        "client_secret": idp.client_secret,
        "scope": f"{idp.audience}/.default",
    }
    async with aiohttp.ClientSession() as session:
        async with session.post(idp.token_endpoint, data=form) as resp:
            body = await resp.json(loads=orjson.loads)
    return str(body["access_token"])


def _print_dev_banner(
    idp: LocalIdentityProvider, port: int, key: str, token: str, loop_name: str
) -> None:
    url = f"http://127.0.0.1:{port}/api/v2/health"
    lines = [
        f"rag-api-core (dev mode, {loop_name}) on http://127.0.0.1:{port}",
        f"local identity provider: {idp.base_url}",
        f"token endpoint: {idp.token_endpoint}",
        f"client id: {idp.client_id}",
        "",
        "Try it (the token is valid for one hour):",
        f'curl -s -X GET "{url}" -H "Authorization: Bearer {token}" '
        f'-H "Ocp-Apim-Subscription-Key: {key}"',
        "",
        "PowerShell:",
        f'$headers = @{{ Authorization = "Bearer {token}"; '
        f'"Ocp-Apim-Subscription-Key" = "{key}" }}; '
        f'Invoke-RestMethod -Method GET "{url}" -Headers $headers',
        "",
    ]
    print("\n".join(lines), flush=True)


def _idp(args: argparse.Namespace) -> int:
    from .idp import run_idp

    configure_logging(os.environ.get("LOG_LEVEL", "INFO").upper(), "text")
    asyncio.run(run_idp(args.host, args.port, args.tenant_id, args.app_id))
    return 0


def _check_config(args: argparse.Namespace) -> int:
    settings = Settings.from_env(_environment(args.config))
    print(orjson.dumps(settings.redacted(), option=orjson.OPT_INDENT_2).decode())
    configure_logging("WARNING", "text")
    ok = asyncio.run(_probe(settings))
    return 0 if ok else 1


async def _probe(settings: Settings) -> bool:
    from .jwks import JwksCache, JwksPolicy

    cache = JwksCache(
        settings.openid_config_url, settings.issuers, JwksPolicy.from_settings(settings)
    )
    await cache.start()
    try:
        ok = await cache.refresh_now("check-config")
        status = cache.status()
    finally:
        await cache.close()
    report = {"signing_keys": status["state"], "key_count": status["key_count"]}
    if status["last_refresh"] is not None:
        report["error"] = status["last_refresh"]["error"]
    print(orjson.dumps(report, option=orjson.OPT_INDENT_2).decode())
    return ok

