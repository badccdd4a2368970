"""The service's loggers, under the package's own dotted names, and their set-up."""

from __future__ import annotations

import asyncio
import codecs
import contextlib
import datetime as dt
import logging
import re
import sys
from typing import TextIO

import orjson

from .logging_security import SECRET_MARKER, ScrubbingFilter, extra_fields

__all__ = (
    "LOG_FORMATS",
    "SECRET_MARKER",
    "access_logger",
    "app_logger",
    "auth_logger",
    "cache_logger",
    "configure_logging",
    "idp_logger",
    "jwks_logger",
    "keys_logger",
)

app_logger = logging.getLogger("rag_api_core")
auth_logger = logging.getLogger("rag_api_core.auth")
jwks_logger = logging.getLogger("rag_api_core.jwks")
keys_logger = logging.getLogger("rag_api_core.keys")
cache_logger = logging.getLogger("rag_api_core.cache")
access_logger = logging.getLogger("rag_api_core.access")
idp_logger = logging.getLogger("rag_api_core.idp")

LOG_FORMATS = ("json", "text")

# Library loggers that must reach the root handler (and its filter) and nothing
# else: a handler of their own would write records the filter never saw.
_ROUTED_LOGGERS = (
    "aiohttp",
    "aiohttp.access",
    "aiohttp.client",
    "aiohttp.server",
    "aiohttp.web",
    "asyncio",
    "jose",
    "redis",
    "aiocache",
    "py.warnings",
)

_JSON_OPTIONS = orjson.OPT_NON_STR_KEYS
# orjson escapes C0 controls; these also break lines in some readers (Python's
# str.splitlines, JavaScript, terminals reading C1 CSI), so escape them too.
_JSON_LINE_BREAKS = str.maketrans(
    {chr(c): f"\\u{c:04x}" for c in (*range(0x7F, 0xA0), 0x2028, 0x2029)}
)
_CONTROL_CHARACTERS = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029]")
_SHORT_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}
_BARE_TEXT = re.compile(r"[^\s\"'=]+")


def configure_logging(
    level: str = "INFO", fmt: str = "json", stream: TextIO | None = None
) -> None:
    """Send every record through one scrubbing handler on stdout (or ``stream``).

    Safe to call again: the previous handler this function installed is replaced,
    handlers others attached keep working and get the scrubbing filter too.
    """
    formatter = _formatter_for(fmt)
    root = logging.getLogger()
    root.setLevel(level.upper())

    # A failing emit must not print "--- Logging error ---" with the raw
    # arguments to stderr (catalog L-10).
    logging.raiseExceptions = False
    logging.captureWarnings(True)
    for handler in [h for h in root.handlers if isinstance(h, _ServiceHandler)]:
        # Out with any lines it still holds, to the stream they were meant for.
        handler.flush()
        root.removeHandler(handler)
    handler = _ServiceHandler(sys.stdout if stream is None else stream)
    handler.setFormatter(formatter)
    handler.addFilter(ScrubbingFilter())
    root.addHandler(handler)

    _route_library_loggers()
    _filter_every_handler()


def _formatter_for(fmt: str) -> logging.Formatter:
    if fmt == "json":
        return _JsonFormatter()
    if fmt == "text":
        return _TextFormatter()
    raise ValueError(f"Unknown log format {fmt!r}, expected one of {LOG_FORMATS}")


def _route_library_loggers() -> None:
    for name in _ROUTED_LOGGERS:
        logger = logging.getLogger(name)
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
        logger.propagate = True


def _filter_every_handler() -> None:
    """Put the filter on every handler that exists now, wherever it is attached."""
    loggers: list[logging.Logger] = [logging.getLogger()]
    for item in list(logging.Logger.manager.loggerDict.values()):
        if isinstance(item, logging.Logger):
            loggers.append(item)
    handlers = [handler for logger in loggers for handler in logger.handlers]
    # Records of a logger with no handler on its path go to lastResort.
    if logging.lastResort is not None:
        handlers.append(logging.lastResort)
    for handler in handlers:
        if not any(isinstance(f, ScrubbingFilter) for f in handler.filters):
            handler.addFilter(ScrubbingFilter())


class _ServiceHandler(logging.StreamHandler[TextIO]):
    """A stream handler whose lines always encode: errors="backslashreplace".

    aiohttp decodes header bytes with ``surrogateescape``, so a ``\\udcff`` can
    reach a log line; written to a strict UTF-8 stream it would make ``emit``
    fail and the record vanish.

    Lines below WARNING emitted on an event loop are held and written together
    once per loop iteration: a write system call per access line cost a sixth
    of the line (docs/performance.md). Each write holds whole lines and at most
    ``_ATOMIC_WRITE`` bytes, so when several workers share one pipe (``serve
    --workers``, a container's stdout) their lines never interleave mid-line.
    Warnings, errors and lines emitted outside an event loop are written at
    once, after any held ones.
    """

    def __init__(self, stream: TextIO) -> None:
        super().__init__(stream)
        self._held: list[str] = []
        self._flush_loop: asyncio.AbstractEventLoop | None = None

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record) + self.terminator
            # Called with the handler's lock held (Handler.handle takes it).
            self._held.append(line)
            if record.levelno < logging.WARNING:
                try:
                    loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
                except RuntimeError:
                    loop = None
                if loop is not None and self._flush_loop is loop:
                    return
                if loop is not None and self._flush_loop is None:
                    self._flush_loop = loop
                    loop.call_soon(self._scheduled_flush)
                    return
            # A warning, no loop here, or a write due on another loop (which
            # may be closed and never run it): write everything now.
            self.flush()
        except RecursionError:
            raise
        except Exception:
            self.handleError(record)

    def flush(self) -> None:
        """Write the held lines, in order, in whole-line writes; then flush."""
        self.acquire()
        try:
            self._flush_loop = None
            held, self._held = self._held, []
            stream = self.stream
            for chunk in _whole_line_chunks(held):
                stream.write(chunk)
                stream.flush()
            if not held and stream and hasattr(stream, "flush"):
                stream.flush()
        finally:
            self.release()

    def _scheduled_flush(self) -> None:
        # A failed write is dropped, as ``emit`` does through handleError with
        # logging.raiseExceptions off: reporting it would go through this handler.
        with contextlib.suppress(Exception):
            self.flush()

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        if text.isascii():
            # ASCII encodes in any encoding a log stream would use: the round
            # trip below would give it back unchanged.
            return text
        encoding = _codec_name(getattr(self.stream, "encoding", None))
        return text.encode(encoding, "backslashreplace").decode(encoding)


# POSIX: a write of at most PIPE_BUF bytes (4096 on Linux) to a pipe is not
# interleaved with other writers' data.
_ATOMIC_WRITE = 4096


def _whole_line_chunks(lines: list[str]) -> list[str]:
    """``lines`` joined into runs of whole lines, each at most ``_ATOMIC_WRITE``
    bytes when encoded (a longer line goes alone)."""
    chunks: list[str] = []
    run: list[str] = []
    size = 0
    for line in lines:
        # Characters count as bytes for ASCII; four bytes bound any other.
        length = len(line) if line.isascii() else 4 * len(line)
        if run and size + length > _ATOMIC_WRITE:
            chunks.append("".join(run))
            run, size = [], 0
        run.append(line)
        size += length
    if run:
        chunks.append("".join(run))
    return chunks


def _codec_name(encoding: object) -> str:
    if not isinstance(encoding, str):
        return "utf-8"
    try:
        return codecs.lookup(encoding).name
    except LookupError:
        return "utf-8"


def _timestamp(record: logging.LogRecord) -> str:
    """``2026-12-03T16:46:16.123Z``: UTC, with the record's own milliseconds."""
    second = int(record.created)
    cached = _LAST_SECOND[0]
    if cached[0] != second:
        moment = dt.datetime.fromtimestamp(second, tz=dt.UTC)
        # Swapped whole: handlers on other threads read it without a lock.
        cached = (second, moment.strftime("%Y-%m-%dT%H:%M:%S"))
        _LAST_SECOND[0] = cached
    return f"{cached[1]}.{int(record.msecs):03d}Z"


# The last second formatted: each line would otherwise build a datetime.
_LAST_SECOND: list[tuple[int, str]] = [(-1, "")]


def _exception_text(formatter: logging.Formatter, record: logging.LogRecord) -> str:
    # The scrubbing filter has already rendered exc_info into exc_text; the
    # fallback only serves a handler that runs this formatter without it.
    if record.exc_text:
        return record.exc_text
    if record.exc_info and record.exc_info[1] is not None:
        return formatter.formatException(record.exc_info)
    return ""


class _JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, exc, stack, then extras."""

    def format(self, record: logging.LogRecord) -> str:
        payload: dict[str, object] = {
            "ts": _timestamp(record),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if exc := _exception_text(self, record):
            payload["exc"] = exc
        if record.stack_info:
            payload["stack"] = record.stack_info
        for name, value in extra_fields(record).items():
            while name in payload:
                name = f"extra_{name}"
            payload[name] = value
        return _dump_json(payload)


class _TextFormatter(logging.Formatter):
    """``ts LEVEL logger message key=value ...``, control characters escaped."""

    def format(self, record: logging.LogRecord) -> str:
        parts = [_timestamp(record), record.levelname, record.name, record.getMessage()]
        for name, value in extra_fields(record).items():
            parts.append(f"{name}={_text_value(value)}")
        line = " ".join(parts)
        if exc := _exception_text(self, record):
            line = f"{line}\n{exc}"
        if record.stack_info:
            line = f"{line}\n{record.stack_info}"
        # One record, one physical line: a newline in a header value or a
        # traceback must not start what looks like a new record (CWE-117).
        return _CONTROL_CHARACTERS.sub(_escape_control, line)


def _escape_control(match: re.Match[str]) -> str:
    char = match[0]
    if char in _SHORT_ESCAPES:
        return _SHORT_ESCAPES[char]
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}"


def _text_value(value: object) -> str:
    if isinstance(value, str) and _BARE_TEXT.fullmatch(value):
        return value
    return _dump_json(value)


def _dump_json(value: object) -> str:
    try:
        raw = orjson.dumps(value, default=_json_default, option=_JSON_OPTIONS)
    except TypeError:
        # Lone surrogates, integers past 64 bits, keys orjson refuses: retry on
        # a copy made only of types it takes.
        raw = orjson.dumps(_json_safe(value), option=_JSON_OPTIONS)
    if raw.isascii():
        # The characters translated below are all outside ASCII.
        return raw.decode("ascii")
    return raw.decode("utf-8").translate(_JSON_LINE_BREAKS)


def _json_default(value: object) -> object:
    if isinstance(value, set | frozenset):
        return list(value)
    # Not str(value): only values the filter turned into plain data get printed.
    return f"<{type(value).__name__}>"


def _json_safe(value: object) -> object:
    if isinstance(value, str):
        return value.encode("utf-8", "backslashreplace").decode("utf-8")
    if isinstance(value, bool) or value is None or isinstance(value, float):
        return value
    if isinstance(value, int):
        return value if -(2**63) <= value < 2**64 else str(value)
    if isinstance(value, dict):
        return {str(_json_safe(k)): _json_safe(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [_json_safe(item) for item in value]
    return _json_default(value)
