"""The access log: one structured line per request, with no header and no credential."""

from __future__ import annotations

import logging
from typing import Any
from urllib.parse import quote

from aiohttp.abc import AbstractAccessLogger
from aiohttp.web import BaseRequest, StreamResponse

from .appkeys import AUTH_REJECTION, IDENTITY, REQUEST_ID
from .log import access_logger
from .logging_security import is_credential_name

__all__ = ("AccessLogger", "access_log_options", "loggable_path")

_REDACTED = "[REDACTED]"


def loggable_path(request: BaseRequest) -> str:
    """The path with every credential query value replaced (catalog L-02)."""
    path = request.path
    if not request.query_string:
        return path
    parts = []
    for name, value in request.query.items():
        shown = _REDACTED if is_credential_name(name) else quote(value, safe="")
        parts.append(f"{quote(name, safe='')}={shown}")
    return f"{path}?{'&'.join(parts)}"


class AccessLogger(AbstractAccessLogger):
    """Writes ``http.access`` records with fields in ``extra``, never a raw header.

    aiohttp calls ``log`` only when ``enabled`` is true, so with ``LOG_LEVEL``
    above INFO an access line costs nothing.
    """

    @property
    def enabled(self) -> bool:
        return self.logger.isEnabledFor(logging.INFO)

    def log(self, request: BaseRequest, response: StreamResponse, time: float) -> None:
        fields: dict[str, Any] = {
            "method": request.method,
            "path": loggable_path(request),
            "status": response.status,
            "bytes": response.body_length,
            "duration_ms": round(time * 1000, 3),
            "request_id": request.get(REQUEST_ID),
            "remote": request.remote,
        }
        identity = request.get(IDENTITY)
        if identity is not None:
            fields["subscription"] = identity.subscription
            fields["client_id"] = identity.client_id
            fields["oid"] = identity.object_id
        rejection = request.get(AUTH_REJECTION)
        if rejection is not None:
            fields["rejection"] = rejection
        # Built here rather than through ``info``: the caller's file and line
        # (a walk up the stack) say nothing about a request.
        logger = self.logger
        logger.handle(
            logger.makeRecord(
                logger.name, logging.INFO, "", 0, "http.access", (), None, extra=fields
            )
        )


def access_log_options() -> dict[str, Any]:
    """The runner options that install this access log."""
    return {"access_log_class": AccessLogger, "access_log": access_logger}
