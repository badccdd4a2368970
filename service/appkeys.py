"""Typed keys for application and request state."""

from __future__ import annotations

from typing import TYPE_CHECKING

from aiohttp import web

from validators import Identity

if TYPE_CHECKING:
    from .chain import ValidatorChain
    from .jwks import JwksCache
    from .settings import Settings
    from .token_cache import TokenCache

__all__ = (
    "AUTH_REJECTION",
    "CHAIN",
    "IDENTITY",
    "JWKS",
    "KEY_STORE",
    "KEY_WATCHER",
    "REQUEST_ID",
    "SETTINGS",
    "SHUTTING_DOWN",
    "TOKEN_CACHE",
)

SETTINGS: web.AppKey[Settings] = web.AppKey("settings")
JWKS: web.AppKey[JwksCache] = web.AppKey("jwks")
TOKEN_CACHE: web.AppKey[TokenCache] = web.AppKey("token_cache")
CHAIN: web.AppKey[ValidatorChain] = web.AppKey("chain")
KEY_STORE: web.AppKey[object] = web.AppKey("key_store")
KEY_WATCHER: web.AppKey[object] = web.AppKey("key_watcher")
SHUTTING_DOWN: web.AppKey[list[bool]] = web.AppKey("shutting_down")

IDENTITY: web.RequestKey[Identity] = web.RequestKey("identity")
REQUEST_ID: web.RequestKey[str] = web.RequestKey("request_id")
AUTH_REJECTION: web.RequestKey[str] = web.RequestKey("auth_rejection")
