"""The docs endpoints: the OpenAPI document and a Swagger UI page that works offline."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from swagger_ui_bundle import swagger_ui_path  # type: ignore[import-untyped]

from .openapi import (
    SERVICE_ERROR_SCHEMA,
    NamedSchema,
    ResponseDoc,
    build_openapi,
    documented,
    render_openapi,
)
from .policy import public
from .settings import Settings

__all__ = (
    "ASSETS_PATH",
    "DOCS_PATH",
    "SPEC_PATH",
    "SWAGGER_UI_DIRECTORY",
    "add_docs_routes",
)

DOCS_PATH = "/api/docs"
SPEC_PATH = "/api/docs/openapi.json"
ASSETS_PATH = "/api/docs/assets/{name}"
SWAGGER_UI_DIRECTORY = Path(str(swagger_ui_path))

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

# Only these files are served: a name is looked up, never joined to a path.
_VENDOR_ASSETS = (
    "swagger-ui-bundle.js",
    "swagger-ui.css",
    "favicon-32x32.png",
    "favicon-16x16.png",
)
_INITIALIZER = "rag-api-docs.js"

# The page's links are relative ("docs/..."), so it keeps working when a gateway
# serves the API under a path prefix.
_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>rag-api-core API</title>
<link rel="stylesheet" href="docs/assets/swagger-ui.css">
<link rel="icon" type="image/png" href="docs/assets/favicon-32x32.png">
</head>
<body>
<div id="swagger-ui"></div>
<script src="docs/assets/swagger-ui-bundle.js"></script>
<script src="docs/assets/rag-api-docs.js"></script>
</body>
</html>
"""

# validatorUrl null: the default badge calls validator.swagger.io, which an
# offline page must not do. Credentials are not persisted in localStorage.
_INITIALIZER_SCRIPT = """window.addEventListener("load", function () {
  window.ui = SwaggerUIBundle({
    url: "docs/openapi.json",
    dom_id: "#swagger-ui",
    deepLinking: true,
    validatorUrl: null,
    persistAuthorization: false,
    displayRequestDuration: true,
  });
});
"""

# Everything from this origin; inline styles because Swagger UI sets some.
_PAGE_POLICY = (
    "default-src 'none'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
    "img-src 'self' data:; connect-src 'self'; font-src 'self'; "
    "base-uri 'none'; form-action 'self'; frame-ancestors 'none'"
)

_NO_SNIFF = {"X-Content-Type-Options": "nosniff"}

_SPEC_BODY = NamedSchema(
    "OpenApiDocument",
    {"type": "object", "required": ["openapi", "info", "paths"]},
)

_ASSET_PARAMETER = {
    "in": "path",
    "name": "name",
    "required": True,
    "schema": {"type": "string", "enum": sorted((*_VENDOR_ASSETS, _INITIALIZER))},
}


def add_docs_routes(app: web.Application, settings: Settings) -> None:
    """Serve the document, the page and its assets; public unless DOCS_PUBLIC=false."""
    missing = [n for n in _VENDOR_ASSETS if not (SWAGGER_UI_DIRECTORY / n).is_file()]
    if missing:
        raise RuntimeError(
            f"swagger-ui-bundle lacks Swagger UI files {missing} in "
            f"{SWAGGER_UI_DIRECTORY}"
        )

    handlers = (_spec_handler(), _page_handler(), _asset_handler(settings))
    spec, page, asset = (public(h) if settings.docs_public else h for h in handlers)
    app.router.add_get(SPEC_PATH, spec, name="openapi")
    app.router.add_get(DOCS_PATH, page, name="docs")
    app.router.add_get(ASSETS_PATH, asset, name="docs_asset")


def _spec_handler() -> Handler:
    cached: list[bytes] = []

    @documented(
        "This OpenAPI document",
        tag="docs",
        body=_SPEC_BODY,
        description="The same document `python -m service spec` writes.",
    )
    async def openapi_document(request: web.Request) -> web.Response:
        # Built on first use: the router is frozen by then, so routes added
        # after create_app are included and the document cannot change.
        if not cached:
            cached.append(render_openapi(build_openapi(request.app)))
        return web.Response(
            body=cached[0], content_type="application/json", headers=_NO_SNIFF
        )

    return openapi_document


def _page_handler() -> Handler:
    @documented("Swagger UI for this API", tag="docs", content_type="text/html")
    async def docs_page(request: web.Request) -> web.Response:
        headers = {**_NO_SNIFF, "Content-Security-Policy": _PAGE_POLICY}
        return web.Response(text=_PAGE, content_type="text/html", headers=headers)

    return docs_page


def _asset_handler(settings: Settings) -> Handler:
    # A shared cache may keep the files only when anyone may fetch them.
    cache_control = "max-age=3600" if settings.docs_public else "private, max-age=3600"

    @documented(
        "A file of the docs page",
        tag="docs",
        content_type="*/*",
        parameters=(_ASSET_PARAMETER,),
        responses={404: ResponseDoc("No such file", SERVICE_ERROR_SCHEMA)},
    )
    async def docs_asset(request: web.Request) -> web.StreamResponse:
        name = request.match_info["name"]
        headers = {**_NO_SNIFF, "Cache-Control": cache_control}
        if name == _INITIALIZER:
            return web.Response(
                text=_INITIALIZER_SCRIPT,
                content_type="text/javascript",
                headers=headers,
            )
        if name not in _VENDOR_ASSETS:
            raise web.HTTPNotFound()
        return web.FileResponse(SWAGGER_UI_DIRECTORY / name, headers=headers)

    return docs_asset
