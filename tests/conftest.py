"""Shared fixtures: a real local identity provider, a real key store, the real app."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from service.app import create_app
from service.idp import LocalIdentityProvider
from service.keystore import KeyStoreFile
from service.protocol import SafeAppRunner
from service.server import runner_options
from service.settings import Settings


@dataclass(frozen=True)
class Credentials:
    """A subscription created for the test and its two keys."""

    name: str
    primary: str
    secondary: str
    store: KeyStoreFile


@pytest.fixture
def key_store(tmp_path: Path) -> Credentials:
    store = KeyStoreFile(tmp_path / "keys.json")
    issued = store.add("contoso", "starter")
    return Credentials(issued.name, issued.primary, issued.secondary, store)


@pytest_asyncio.fixture
async def idp() -> AsyncIterator[LocalIdentityProvider]:
    async with LocalIdentityProvider() as provider:
        yield provider


def settings_for(
    idp: LocalIdentityProvider, keys_file: Path, **changes: Any
) -> Settings:
    base = Settings(
        tenant_id=idp.tenant_id,
        audiences=(idp.audience, idp.app_id),
        openid_config_url=idp.openid_config_url,
        issuers=(idp.issuer, idp.issuer_v1),
        subscription_keys_file=keys_file,
        jwks_kid_cooldown_seconds=60,
        keys_reload_seconds=0.05,
    )
    return base.with_changes(**changes) if changes else base


@pytest.fixture
def settings(idp: LocalIdentityProvider, key_store: Credentials) -> Settings:
    return settings_for(idp, key_store.store.path)


class ProductionLikeServer(TestServer):
    """aiohttp's test server, but with the runner and options ``run_server`` uses.

    ``TestServer`` would serve with aiohttp's defaults (8190-byte header limit,
    its own parser-error page, handler cancellation on).
    """

    def __init__(self, app: web.Application, *, max_header_bytes: int) -> None:
        super().__init__(app)
        self.max_header_bytes = max_header_bytes

    async def _make_runner(self, **kwargs: Any) -> SafeAppRunner:
        return SafeAppRunner(self.app, **runner_options(self.max_header_bytes))


AppClient = TestClient[web.Request, web.Application]
MakeClient = Callable[..., Any]


@pytest_asyncio.fixture
async def make_client(
    aiohttp_client: Any, idp: LocalIdentityProvider, key_store: Credentials
) -> MakeClient:
    """Build a client for an app with settings changed as the test needs."""

    async def make(**changes: Any) -> AppClient:
        app_kwargs = changes.pop("app_kwargs", {})
        routes = changes.pop("routes", ())
        settings = settings_for(idp, key_store.store.path, **changes)
        app = create_app(settings, **app_kwargs)
        for path, handler in routes:
            app.router.add_get(path, handler)
        server = ProductionLikeServer(app, max_header_bytes=settings.max_header_bytes)
        client: AppClient = await aiohttp_client(server)
        return client

    return make


@pytest_asyncio.fixture
async def client(make_client: MakeClient) -> AppClient:
    result: AppClient = await make_client()
    return result


def auth_headers(token: str, key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {token}", "Ocp-Apim-Subscription-Key": key}
