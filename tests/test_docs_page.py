"""The docs page: served offline, and usable in a real browser against the service."""

from __future__ import annotations

import os
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio
from aiohttp.test_utils import TestServer
from playwright.async_api import Browser, Page, Request, async_playwright

from service.app import create_app
from service.docs_routes import SWAGGER_UI_DIRECTORY
from service.idp import LocalIdentityProvider
from service.settings import Settings
from tests.conftest import AppClient, Credentials

CHROMIUM = Path("/usr/bin/chromium")
CHROMIUM_ARGS = [
    "--no-sandbox",
    "--disable-gpu",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--no-first-run",
]
# Generous: the first paint parses a 1 MB bundle on a two-core machine.
UI_TIMEOUT_MS = 30_000


def _chromium_or_skip() -> None:
    if CHROMIUM.is_file():
        return
    reason = f"{CHROMIUM} is absent (scripts/test.sh installs Debian's chromium)"
    if os.environ.get("CI", "").lower() == "true":
        pytest.fail(f"{reason}; CI must run the browser test")
    print(f"skipping the browser test: {reason}")
    pytest.skip(reason)


@pytest_asyncio.fixture
async def browser() -> AsyncIterator[Browser]:
    _chromium_or_skip()
    async with async_playwright() as playwright:
        launched = await playwright.chromium.launch(
            executable_path=str(CHROMIUM), args=CHROMIUM_ARGS
        )
        try:
            yield launched
        finally:
            await launched.close()


@pytest_asyncio.fixture
async def service_url(aiohttp_server: Any, settings: Settings) -> str:
    server: TestServer = await aiohttp_server(create_app(settings))
    return str(server.make_url("/")).rstrip("/")


async def _open_docs(browser: Browser, base: str) -> tuple[Page, list[str], list[str]]:
    page = await browser.new_page()
    requested: list[str] = []
    problems: list[str] = []
    page.on("request", lambda request: requested.append(request.url))
    page.on(
        "console",
        lambda message: (
            problems.append(message.text)
            if message.type in ("error", "warning")
            else None
        ),
    )
    page.on("pageerror", lambda error: problems.append(str(error)))
    await page.goto(f"{base}/api/docs")
    await page.wait_for_selector(".opblock", timeout=UI_TIMEOUT_MS)
    return page, requested, problems


async def _authorize(page: Page, scheme: str, value: str) -> None:
    container = page.locator(".auth-container", has_text=scheme)
    await container.locator("input").fill(value)
    await container.locator("button.authorize").click()
    # Swagger UI swaps Authorize for Logout once it holds the credential.
    await container.get_by_role("button", name="Logout").wait_for()


async def test_page_loads_offline_and_shows_every_operation(
    browser: Browser, service_url: str
) -> None:
    page, requested, problems = await _open_docs(browser, service_url)

    paths = await page.locator(".opblock-summary-path").all_inner_texts()
    shown = {path.replace("\u200b", "").strip() for path in paths}
    assert {
        "/api/v2/health",
        "/api/v2/whoami",
        "/livez",
        "/readyz",
        "/api/docs",
        "/api/docs/openapi.json",
    } <= shown
    assert [url for url in requested if not url.startswith(service_url)] == []
    assert problems == []


async def test_call_from_the_page_with_both_credentials_returns_200(
    browser: Browser,
    service_url: str,
    idp: LocalIdentityProvider,
    key_store: Credentials,
) -> None:
    token = idp.mint_token()
    page, _, problems = await _open_docs(browser, service_url)

    await page.locator("button.authorize").first.click()
    await _authorize(page, "apimSubscriptionKey", key_store.primary)
    await _authorize(page, "entraIdBearer", token)
    await page.locator(".modal-ux .close-modal").click()
    operation = page.locator("#operations-service-health")
    await operation.locator(".opblock-summary").click()
    await operation.locator("button.try-out__btn").click()
    async with page.expect_request(f"{service_url}/api/v2/health") as sent:
        await operation.locator("button.execute").click()
    request: Request = await sent.value
    response = await request.response()

    assert response is not None
    assert response.status == 200
    assert request.headers["ocp-apim-subscription-key"] == key_store.primary
    assert request.headers["authorization"] == f"Bearer {token}"
    status = operation.locator(".live-responses-table tbody .response-col_status")
    await status.wait_for(timeout=UI_TIMEOUT_MS)
    assert (await status.inner_text()).strip() == "200"
    assert problems == []


async def test_page_links_only_to_its_own_assets_under_a_strict_policy(
    client: AppClient,
) -> None:
    response = await client.get("/api/docs")
    html = await response.text()

    assert response.status == 200
    assert response.content_type == "text/html"
    policy = response.headers["Content-Security-Policy"]
    assert "default-src 'none'" in policy
    assert "script-src 'self'" in policy
    assert "http" not in html.replace('lang="en"', "")
    assert 'src="docs/assets/swagger-ui-bundle.js"' in html


async def test_assets_are_the_installed_swagger_ui_files(client: AppClient) -> None:
    response = await client.get("/api/docs/assets/swagger-ui-bundle.js")

    assert response.status == 200
    assert response.headers["X-Content-Type-Options"] == "nosniff"
    bundle = SWAGGER_UI_DIRECTORY / "swagger-ui-bundle.js"
    assert await response.read() == bundle.read_bytes()


async def test_initializer_points_at_the_document_and_disables_the_online_badge(
    client: AppClient,
) -> None:
    response = await client.get("/api/docs/assets/rag-api-docs.js")
    script = await response.text()

    assert response.status == 200
    assert 'url: "docs/openapi.json"' in script
    assert "validatorUrl: null" in script


@pytest.mark.parametrize(
    "name",
    [
        "swagger-initializer.js",
        "index.html",
        "..%2Findex.html",
        "..%2F..%2F__init__.py",
    ],
)
async def test_asset_outside_the_allow_list_is_not_found(
    client: AppClient, name: str
) -> None:
    response = await client.get(f"/api/docs/assets/{name}")
    body = await response.json()

    assert response.status == 404
    assert body["code"] == "NotFound"
    assert "WWW-Authenticate" not in response.headers
