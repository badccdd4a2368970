"""Error pages for requests aiohttp refuses before a handler runs, never echoed."""

from __future__ import annotations

import math
import time
import uuid
from collections import Counter

import orjson
from aiohttp import web
from aiohttp.http_exceptions import LineTooLong
from aiohttp.web_protocol import RequestHandler
from aiohttp.web_request import BaseRequest
from aiohttp.web_server import Server

from .log import app_logger

__all__ = ("RefusalLog", "SafeAppRunner", "safe_error_response")

_HEADER_TOO_LARGE = (
    431,
    "RequestHeaderFieldsTooLarge",
    "A request header or the request line is larger than this API accepts",
)
_BAD_REQUEST = (400, "BadRequest", "The request is not valid HTTP")
_SERVER_ERROR = (500, "InternalError", "The service failed")


def safe_error_response(status: int, exc: BaseException | None) -> web.Response:
    """A fixed JSON error for a request the HTTP parser (or the server) refused.

    aiohttp's own page quotes the parser's message, which holds up to 100 bytes of
    the offending header line: the start of a token or key (catalog H-12, H-13).
    """
    if isinstance(exc, LineTooLong):
        status, code, message = _HEADER_TOO_LARGE
    elif status < 500:
        _, code, message = _BAD_REQUEST
    elif status == 500:
        status, code, message = _SERVER_ERROR
    else:
        code, message = "Error", "The service could not answer"
    body = orjson.dumps({"statusCode": status, "code": code, "message": message})
    response = web.Response(body=body, status=status, content_type="application/json")
    response.headers["Cache-Control"] = "no-store"
    response.headers["x-request-id"] = uuid.uuid4().hex
    response.force_close()
    return response


class RefusalLog:
    """One warning per interval for requests the parser refuses, with a count.

    aiohttp logs each refusal at ERROR with a traceback quoting the header
    line; under a flood of malformed requests that is thousands of lines a
    second. Client mistakes get a kind and a count instead, never the text.
    """

    def __init__(self, interval: float = 10.0) -> None:
        self._interval = interval
        self._logged_at = -math.inf
        self._counts: Counter[str] = Counter()

    def record(self, exc: BaseException | None) -> None:
        self._counts[type(exc).__name__ if exc is not None else "unknown"] += 1
        now = time.monotonic()
        if now - self._logged_at < self._interval:
            return
        app_logger.warning(
            "http.requests_refused", extra={"counts": dict(self._counts)}
        )
        self._logged_at = now
        self._counts.clear()


_REFUSALS = RefusalLog()


class _SafeRequestHandler(RequestHandler):
    # The gate's memo of this connection's last credential pair and its digest
    # (service.middleware): a keep-alive client sends the same two values on
    # every request, and comparing them costs less than hashing them again.
    __slots__ = ("credential_memo",)

    def handle_error(
        self,
        request: BaseRequest,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        if status >= 500:
            # Our failure: the parent logs it with its traceback (scrubbed).
            super().handle_error(request, status, exc, None)
            return safe_error_response(status, exc)
        if request.writer.output_size > 0:
            raise ConnectionError("a response was already sent on this connection")
        _REFUSALS.record(exc)
        return safe_error_response(status, exc)


class _SafeServer(Server):
    def __call__(self) -> RequestHandler:
        return _SafeRequestHandler(self, loop=self._loop, **self._kwargs)


class SafeAppRunner(web.AppRunner):
    """An ``AppRunner`` whose connections answer parser errors safely."""

    async def _make_server(self) -> Server:
        server = await super()._make_server()
        # aiohttp offers no hook for the handler class; Server has no __slots__,
        # so the instance it built can take our subclass as it is.
        server.__class__ = _SafeServer
        return server
