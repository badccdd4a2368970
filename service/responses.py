"""Error responses: the JSON body, the RFC 6750 challenge and the cache headers."""

from __future__ import annotations

import orjson
from aiohttp import web

from validators import AuthError, RateLimitExceeded

__all__ = ("challenge_for", "error_response", "json_response", "status_error_response")

_JSON = "application/json"


def json_response(payload: object, *, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(payload), status=status, content_type=_JSON)


def challenge_for(error: AuthError, realm: str) -> str | None:
    """The ``WWW-Authenticate`` value for a rejection, or ``None`` when none fits."""
    if error.status not in (400, 401, 403):
        return None
    parts = [f'Bearer realm="{realm}"']
    if error.challenge is not None:
        parts.append(f'error="{error.challenge}"')
        # Messages are fixed strings of ours: no quotes or backslashes to escape.
        parts.append(f'error_description="{error.message}"')
    if error.challenge == "insufficient_scope" and error.required:
        parts.append(f'scope="{" ".join(error.required)}"')
    return ", ".join(parts)


def error_response(error: AuthError, realm: str) -> web.Response:
    message = error.message
    if isinstance(error, RateLimitExceeded) and error.retry_after is not None:
        message = f"Rate limit is exceeded. Try again in {error.retry_after} seconds."
    body = {"statusCode": error.status, "code": error.code, "message": message}
    response = json_response(body, status=error.status)
    response.headers["Cache-Control"] = "no-store"
    challenge = challenge_for(error, realm)
    if challenge is not None:
        response.headers["WWW-Authenticate"] = challenge
    if error.retry_after is not None:
        response.headers["Retry-After"] = str(error.retry_after)
    return response


def status_error_response(status: int, code: str, message: str) -> web.Response:
    """A non-auth error (404, 405, 500) in the same body shape."""
    body = {"statusCode": status, "code": code, "message": message}
    response = json_response(body, status=status)
    response.headers["Cache-Control"] = "no-store"
    return response
