"""The command line: ``serve``, ``keys``, ``idp``, ``check-config`` and ``spec``."""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import shutil
import signal
import sys
import tempfile
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import aiohttp
import orjson

from .app import create_app
from .jose_backend import JoseBackendError
from .keys_cli import add_keys_parser
from .keystore import KeyStoreError, KeyStoreFile
from .log import configure_logging
from .logging_security import register_secret
from .openapi import build_openapi, render_openapi
from .server import install_event_loop_policy, run_server, run_workers
from .settings import Settings, SettingsError, load_env_file

if TYPE_CHECKING:
    from .idp import LocalIdentityProvider

__all__ = ("main",)


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

    spec = commands.add_parser(
        "spec", help="write the OpenAPI document (for APIM import)"
    )
    spec.add_argument("--output", type=Path, help="file to write (default: stdout)")
    spec.add_argument("--config", type=Path, help="a KEY=VALUE file of settings")
    spec.set_defaults(handler=_spec)

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
        if settings.port == 0:
            # Each worker would bind its own random port: nothing to share.
            raise SettingsError("--workers", "needs a fixed PORT, not 0")
        # The supervisor's own lines (a worker that died) in the same format.
        configure_logging(settings.log_level, settings.log_format)
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
    # Dev mode listens on loopback and logs readable text unless told otherwise.
    env.setdefault("LOG_FORMAT", "text")
    env["HOST"] = args.host or "127.0.0.1"
    if args.port is not None:
        env["PORT"] = str(args.port)
    configure_logging(
        env.get("LOG_LEVEL", "INFO").strip().upper(), env["LOG_FORMAT"].strip().lower()
    )
    loop_name = install_event_loop_policy()
    workdir = Path(tempfile.mkdtemp(prefix="rag-api-dev-"))
    try:
        asyncio.run(_run_dev(env, workdir, loop_name))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


async def _run_dev(env: dict[str, str], workdir: Path, loop_name: str) -> None:
    from .idp import LocalIdentityProvider

    idp = LocalIdentityProvider()
    await idp.start()
    try:
        keys_file = workdir / "keys.json"
        keys = KeyStoreFile(keys_file).add("dev", "dev")
        register_secret(keys.primary)
        register_secret(keys.secondary)
        # Every other setting (roles, caches, limits) is honoured as given.
        env |= {
            "ENTRA_TENANT_ID": idp.tenant_id,
            "ENTRA_AUDIENCES": f"{idp.audience},{idp.app_id}",
            "ENTRA_OPENID_CONFIG_URL": idp.openid_config_url,
            "ENTRA_ISSUERS": f"{idp.issuer},{idp.issuer_v1}",
            "APIM_SUBSCRIPTION_KEYS_FILE": str(keys_file),
        }
        settings = Settings.from_env(env)
        app = create_app(settings)
        token = await _client_credentials_token(idp)

        def started(bound_host: str, bound_port: int) -> None:
            _print_dev_banner(idp, bound_port, keys.primary, token, loop_name)

        await run_server(
            app,
            settings.host,
            settings.port,
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
    asyncio.run(
        _until_signal(run_idp(args.host, args.port, args.tenant_id, args.app_id))
    )
    return 0


async def _until_signal(work: Coroutine[Any, Any, None]) -> None:
    """Run ``work`` until SIGTERM or SIGINT cancels it, then return cleanly."""
    task = asyncio.create_task(work)
    loop = asyncio.get_running_loop()
    for signum in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(signum, task.cancel)
    with contextlib.suppress(asyncio.CancelledError):
        await task


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


def _spec(args: argparse.Namespace) -> int:
    env = _environment(args.config)
    # The document needs the identity settings only: no key store is read and
    # no identity provider is called, so a build machine can run this.
    env.setdefault("APIM_SUBSCRIPTION_KEYS_FILE", "unused-by-spec.json")
    settings = Settings.from_env(env)
    configure_logging("WARNING", "text", stream=sys.stderr)
    app = create_app(settings, subscriptions=_NoSubscriptions())
    document = render_openapi(build_openapi(app))
    if args.output is None:
        sys.stdout.buffer.write(document)
        sys.stdout.flush()
        return 0
    try:
        args.output.write_bytes(document)
    except OSError as err:
        raise SettingsError(
            "--output", f"cannot write {args.output}: {err.strerror}"
        ) from err
    return 0


class _NoSubscriptions:
    """The key store of an app that is only described, never served."""

    def find(self, key: bytes) -> None:
        return None
