"""Logging set-up: one scrubbing JSON (or text) line per record, from every logger."""

from __future__ import annotations

import asyncio
import datetime
import io
import json
import logging
import re
import secrets
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jose import jwt

from service import log
from service.idp import LocalIdentityProvider
from service.log import (
    access_logger,
    app_logger,
    auth_logger,
    configure_logging,
    idp_logger,
    jwks_logger,
    keys_logger,
)
from service.logging_security import ScrubbingFilter, fingerprint
from service.metrics import REQUEST_COUNTERS
from service.middleware import RejectionLog
from tests.conftest import AppClient, Credentials, auth_headers

LIBRARY_LOGGERS = (
    "aiohttp.access",
    "aiohttp.server",
    "aiohttp.client",
    "aiohttp.web",
    "asyncio",
    "jose",
    "redis",
    "aiocache",
)


@pytest.fixture(scope="module")
def signing_key() -> rsa.RSAPrivateKey:
    return rsa.generate_private_key(public_exponent=65537, key_size=2048)


@pytest.fixture
def token(signing_key: rsa.RSAPrivateKey) -> str:
    pem = signing_key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    claims = {"sub": secrets.token_urlsafe(16), "jti": secrets.token_urlsafe(16)}
    signed: str = jwt.encode(claims, pem.decode(), algorithm="RS256")
    return signed


def _every_handler() -> list[logging.Handler]:
    loggers = [logging.getLogger()]
    for item in logging.Logger.manager.loggerDict.values():
        if isinstance(item, logging.Logger):
            loggers.append(item)
    handlers = [handler for logger in loggers for handler in logger.handlers]
    return handlers + ([logging.lastResort] if logging.lastResort else [])


@pytest.fixture(autouse=True)
def restore_logging() -> Iterator[None]:
    """Undo everything configure_logging changes, so tests stay independent."""
    root = logging.getLogger()
    level, handlers = root.level, list(root.handlers)
    named = {
        name: (
            list(logging.getLogger(name).handlers),
            logging.getLogger(name).propagate,
        )
        for name in (*LIBRARY_LOGGERS, "aiohttp", "py.warnings")
    }
    filters = [(handler, list(handler.filters)) for handler in _every_handler()]
    raise_exceptions = logging.raiseExceptions
    yield
    logging.captureWarnings(False)
    logging.raiseExceptions = raise_exceptions
    root.setLevel(level)
    root.handlers[:] = handlers
    for name, (saved, propagate) in named.items():
        logging.getLogger(name).handlers[:] = saved
        logging.getLogger(name).propagate = propagate
    for handler, saved_filters in filters:
        handler.filters[:] = saved_filters


def _lines(stream: io.StringIO) -> list[dict[str, Any]]:
    return [json.loads(line) for line in stream.getvalue().splitlines()]


def _marker(value: str) -> str:
    return f"[REDACTED:{fingerprint(value)}]"


# --- the JSON lines -------------------------------------------------------------


def test_json_line_has_time_level_logger_message_and_extras(token: str) -> None:
    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream)

    auth_logger.info(
        "rejected %s",
        "expired",
        extra={"reason": "TokenExpired", "token_fp": fingerprint(token)},
    )

    (line,) = _lines(stream)
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line.pop("ts"))
    assert line == {
        "level": "INFO",
        "logger": "rag_api_core.auth",
        "msg": "rejected expired",
        "reason": "TokenExpired",
        "token_fp": fingerprint(token),
    }


def test_json_timestamp_is_the_records_utc_time_to_the_millisecond() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    handler = logging.getLogger().handlers[-1]
    lines = []
    # Two records in one second and one in the next: the formatted second is
    # remembered between lines, and must follow the clock.
    start = datetime.datetime(2026, 12, 3, 14, 40, tzinfo=datetime.UTC).timestamp()
    for created in (start + 0.25, start + 0.999, start + 61.5):
        record = app_logger.makeRecord(
            app_logger.name, logging.INFO, "", 0, "m", (), None
        )
        record.created, record.msecs = created, (created - int(created)) * 1000
        lines.append(json.loads(handler.format(record))["ts"])
    assert lines == [
        "2026-12-03T14:40:00.250Z",
        "2026-12-03T14:40:00.999Z",
        "2026-12-03T14:41:01.500Z",
    ]


class _CountingStream(io.StringIO):
    """A stream that remembers each write and what each flush pushed out."""

    def __init__(self) -> None:
        super().__init__()
        self.writes: list[str] = []
        self.flushed: list[str] = []

    def write(self, text: str) -> int:
        self.writes.append(text)
        return super().write(text)

    def flush(self) -> None:
        self.flushed.append(self.getvalue())


async def test_lines_on_a_loop_are_written_together_once_per_iteration() -> None:
    stream = _CountingStream()
    configure_logging("INFO", "json", stream)
    for number in range(3):
        app_logger.info("line %d", number)
    # Held: they are written, in one write, once this iteration ends.
    assert stream.writes == []
    await asyncio.sleep(0)
    assert len(stream.writes) == 1
    assert [line["msg"] for line in _lines(stream)] == ["line 0", "line 1", "line 2"]
    assert stream.flushed == [stream.getvalue()]


async def test_a_warning_is_written_at_once_after_the_held_lines() -> None:
    stream = _CountingStream()
    configure_logging("INFO", "json", stream)
    app_logger.info("first")
    app_logger.warning("second")
    assert [line["msg"] for line in _lines(stream)] == ["first", "second"]
    assert stream.flushed == [stream.getvalue()]
    await asyncio.sleep(0)
    # The write the info line had asked for finds nothing left to write.
    assert len(_lines(stream)) == 2


def test_lines_off_a_loop_are_written_at_once() -> None:
    stream = _CountingStream()
    configure_logging("INFO", "json", stream)
    app_logger.info("first")
    app_logger.info("second")
    assert [flushed.count("\n") for flushed in stream.flushed] == [1, 2]


async def test_held_lines_are_written_in_whole_lines_of_at_most_4096_bytes() -> None:
    stream = _CountingStream()
    configure_logging("INFO", "json", stream)
    for number in range(40):
        app_logger.info("line %d %s", number, "x" * 300)
    app_logger.info("long %s", "y" * 5000)
    app_logger.info("after")
    await asyncio.sleep(0)
    # Several workers may share one pipe: a write of at most PIPE_BUF bytes
    # cannot be interleaved with theirs, and no write splits a line.
    assert len(stream.writes) > 1
    for text in stream.writes:
        assert text.endswith("\n")
        assert len(text.encode()) <= 4096 or text.count("\n") == 1
    assert stream.flushed[-1] == stream.getvalue()
    messages = [line["msg"] for line in _lines(stream)]
    assert messages[:2] == ["line 0 " + "x" * 300, "line 1 " + "x" * 300]
    assert messages[-2:] == ["long " + "y" * 5000, "after"]
    assert len(messages) == 42


def _log_on_a_loop_that_stops_at_once(message: str) -> None:
    """Log on a running loop that stops before its next iteration and closes:
    the write it scheduled never runs."""
    loop = asyncio.new_event_loop()

    def log_and_stop() -> None:
        app_logger.info(message)
        loop.stop()

    try:
        loop.call_soon(log_and_stop)
        loop.run_forever()
    finally:
        loop.close()


def test_held_lines_on_a_loop_that_closes_are_written_by_the_next_line() -> None:
    stream = _CountingStream()
    configure_logging("INFO", "json", stream)
    _log_on_a_loop_that_stops_at_once("on a loop that closed")
    assert stream.getvalue() == ""
    app_logger.info("off the loop")
    assert [line["msg"] for line in _lines(stream)] == [
        "on a loop that closed",
        "off the loop",
    ]


def test_held_lines_are_written_when_logging_shuts_down() -> None:
    stream = _CountingStream()
    configure_logging("INFO", "json", stream)
    handler = logging.getLogger().handlers[-1]
    _log_on_a_loop_that_stops_at_once("held")
    assert stream.getvalue() == ""
    # What logging.shutdown() does for every handler at exit.
    handler.flush()
    assert [line["msg"] for line in _lines(stream)] == ["held"]


def test_configuring_again_writes_held_lines_to_the_stream_they_were_for() -> None:
    first, second = _CountingStream(), _CountingStream()
    configure_logging("INFO", "json", first)
    _log_on_a_loop_that_stops_at_once("held")
    configure_logging("INFO", "json", second)
    assert [line["msg"] for line in _lines(first)] == ["held"]
    assert second.getvalue() == ""


def test_json_line_carries_the_scrubbed_traceback(token: str) -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)

    try:
        raise ValueError(f"bad token {token}")
    except ValueError:
        app_logger.exception("request failed")

    (line,) = _lines(stream)
    assert line["msg"] == "request failed"
    assert line["exc"].startswith("Traceback (most recent call last):")
    assert line["exc"].endswith(f"ValueError: bad token {_marker(token)}")
    assert token not in stream.getvalue()


def test_json_record_with_line_breaks_stays_on_one_physical_line() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    hostile = 'kid\r\n{"level": "ERROR"}\u2028\x1b[2J\x85\x9b\x00end'

    auth_logger.warning("unknown kid %s", hostile, extra={"kid": hostile})

    text = stream.getvalue()
    assert text.endswith("\n")
    assert len(text.splitlines()) == 1
    (line,) = _lines(stream)
    assert line["msg"] == f"unknown kid {hostile}"
    assert line["kid"] == hostile


def test_json_takes_sets_bytes_and_integers_past_64_bits() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)

    app_logger.info("odd", extra={"ids": {7}, "raw": b"caf\xff", "big": 2**70})

    (line,) = _lines(stream)
    assert (line["ids"], line["raw"], line["big"]) == ([7], "caf\\xff", str(2**70))


def test_extra_named_like_a_fixed_field_does_not_replace_it() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)

    app_logger.info("hello", extra={"ts": "forged", "level": "forged"})

    (line,) = _lines(stream)
    assert line["level"] == "INFO"
    assert (line["extra_ts"], line["extra_level"]) == ("forged", "forged")


# --- the text lines -------------------------------------------------------------


def test_text_line_escapes_control_characters_and_keeps_the_traceback_inline(
    token: str,
) -> None:
    stream = io.StringIO()
    configure_logging("INFO", "text", stream)

    try:
        raise ValueError(f"Bearer {token}")
    except ValueError:
        auth_logger.exception("path %s", "/x\r\nFAKE\x1b[2J\u2028", extra={"id": "r1"})

    text = stream.getvalue()
    assert len(text.splitlines()) == 1
    assert " ERROR rag_api_core.auth path /x\\r\\nFAKE\\x1b[2J\\u2028 id=r1\\n" in text
    assert "Traceback (most recent call last):" in text
    assert f"ValueError: Bearer {_marker(token)}" in text
    assert token not in text


def test_text_line_quotes_extras_with_spaces() -> None:
    stream = io.StringIO()
    configure_logging("INFO", "text", stream)

    keys_logger.info("loaded", extra={"subscription": "two words", "count": 2})

    assert stream.getvalue().rstrip("\n").endswith(' subscription="two words" count=2')


# --- never a logging error on stderr (catalog L-10) -----------------------------


def test_lone_surrogate_on_a_strict_stream_is_escaped_not_an_error(
    token: str, capfd: pytest.CaptureFixture[str]
) -> None:
    buffer = io.BytesIO()
    stream = io.TextIOWrapper(buffer, encoding="utf-8", errors="strict")
    configure_logging("INFO", "text", stream)
    logging.raiseExceptions = True  # prove the line encodes, not that errors hide

    auth_logger.warning("bad header %s", f"caf\udcff Bearer {token}")
    stream.flush()

    written = buffer.getvalue().decode("utf-8")
    assert "bad header caf\\udcff Bearer [REDACTED:" in written
    assert capfd.readouterr().err == ""


def test_lone_surrogate_in_json_is_escaped_not_an_error(
    capfd: pytest.CaptureFixture[str],
) -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)
    logging.raiseExceptions = True

    auth_logger.warning("bad header %s", "caf\udcff", extra={"raw": "\udcff"})

    (line,) = _lines(stream)
    assert (line["msg"], line["raw"]) == ("bad header caf\\udcff", "\\udcff")
    assert capfd.readouterr().err == ""


def test_failing_handler_of_someone_else_prints_no_raw_arguments(
    token: str, tmp_path: Path, capfd: pytest.CaptureFixture[str]
) -> None:
    # The catalog's reproduction: a strict UTF-8 file handler already on root.
    strict = logging.FileHandler(tmp_path / "app.log", encoding="utf-8")
    logging.getLogger().addHandler(strict)
    configure_logging("INFO", "json", io.StringIO())

    try:
        auth_logger.warning("bad header %s", f"\udcff Bearer {token}")
        logging.raiseExceptions = True
        auth_logger.warning("again %s", f"\udcff Bearer {token}")
    finally:
        strict.close()

    err = capfd.readouterr().err
    assert token not in err
    assert "Arguments: None" in err  # the dump shows the filter had run first
    assert token not in (tmp_path / "app.log").read_text(errors="replace")


# --- every logger reaches the filter (catalog L-09) -----------------------------


@pytest.mark.parametrize("name", LIBRARY_LOGGERS)
def test_library_logger_reaches_the_scrubbing_handler(name: str, token: str) -> None:
    own_stream = io.StringIO()
    library = logging.getLogger(name)
    library.addHandler(logging.StreamHandler(own_stream))
    library.propagate = False
    stream = io.StringIO()
    configure_logging("DEBUG", "json", stream)

    library.error("Error handling request: Authorization: Bearer %s", token)

    assert own_stream.getvalue() == ""
    (line,) = _lines(stream)
    assert line["logger"] == name
    assert (
        line["msg"] == f"Error handling request: Authorization: Bearer {_marker(token)}"
    )


async def test_asyncio_unretrieved_task_exception_is_scrubbed(token: str) -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)

    asyncio.get_running_loop().call_exception_handler(
        {
            "message": "Task exception was never retrieved",
            "exception": ValueError(f"Bearer {token}"),
        }
    )

    (line,) = _lines(stream)
    assert line["logger"] == "asyncio"
    assert f"ValueError: Bearer {_marker(token)}" in line["exc"]
    assert token not in stream.getvalue()


def test_handler_on_root_before_configuration_gets_the_filter(token: str) -> None:
    earlier = io.StringIO()
    logging.getLogger().addHandler(logging.StreamHandler(earlier))
    configure_logging("INFO", "json", io.StringIO())

    idp_logger.warning("discovery failed for %s", f"Bearer {token}")

    assert earlier.getvalue() == f"discovery failed for Bearer {_marker(token)}\n"


def test_handler_on_a_service_logger_gets_the_filter(token: str) -> None:
    private = io.StringIO()
    audit = logging.getLogger("rag_api_core.tests.audit")
    audit.addHandler(logging.StreamHandler(private))
    audit.propagate = False
    try:
        configure_logging("INFO", "json", io.StringIO())

        audit.warning("saw %s", token)
    finally:
        audit.handlers.clear()

    assert private.getvalue() == f"saw {_marker(token)}\n"


def test_record_with_no_handler_on_its_path_reaches_stderr_scrubbed(
    token: str, capsys: pytest.CaptureFixture[str]
) -> None:
    orphan = logging.getLogger("rag_api_core.tests.orphan")
    orphan.propagate = False
    configure_logging("INFO", "json", io.StringIO())

    orphan.warning("saw %s", token)

    assert capsys.readouterr().err == f"saw {_marker(token)}\n"


def test_warnings_are_logged_through_the_scrubbing_handler(token: str) -> None:
    stream = io.StringIO()
    configure_logging("INFO", "json", stream)

    with warnings.catch_warnings():
        warnings.simplefilter("always")
        warnings.warn(f"token {token} looks odd", UserWarning, stacklevel=1)

    (line,) = _lines(stream)
    assert line["logger"] == "py.warnings"
    assert token not in line["msg"]


# --- configuration --------------------------------------------------------------


def test_configuring_twice_leaves_one_handler_of_ours() -> None:
    before = len(logging.getLogger().handlers)
    first, second = io.StringIO(), io.StringIO()
    configure_logging("INFO", "json", first)
    configure_logging("INFO", "json", second)

    jwks_logger.info("refreshed")

    assert len(logging.getLogger().handlers) == before + 1
    assert first.getvalue() == ""
    assert len(_lines(second)) == 1


def test_level_is_set_on_the_root_logger() -> None:
    stream = io.StringIO()
    configure_logging("warning", "json", stream)

    access_logger.info("hidden")
    access_logger.warning("shown")

    assert logging.getLogger().level == logging.WARNING
    assert [line["msg"] for line in _lines(stream)] == ["shown"]


def test_unknown_level_is_rejected() -> None:
    with pytest.raises(ValueError, match="LOUD"):
        configure_logging("LOUD")


def test_unknown_format_is_rejected_before_anything_changes() -> None:
    handlers = list(logging.getLogger().handlers)

    with pytest.raises(ValueError, match="yaml"):
        configure_logging("INFO", "yaml")

    assert logging.getLogger().handlers == handlers


def test_configuration_silences_logging_errors_and_captures_warnings() -> None:
    configure_logging("INFO", "json", io.StringIO())

    assert logging.raiseExceptions is False
    assert warnings.showwarning.__module__ == "logging"


def test_library_loggers_propagate_with_no_handlers_of_their_own() -> None:
    configure_logging("INFO", "json", io.StringIO())

    for name in LIBRARY_LOGGERS:
        logger = logging.getLogger(name)
        assert (logger.handlers, logger.propagate) == ([], True)
    ours = [
        h
        for h in logging.getLogger().handlers
        if any(isinstance(f, ScrubbingFilter) for f in h.filters)
    ]
    assert ours


def test_public_names_are_exported() -> None:
    expected = {
        "access_logger",
        "app_logger",
        "auth_logger",
        "configure_logging",
        "idp_logger",
        "jwks_logger",
        "keys_logger",
        "SECRET_MARKER",
    }

    assert expected <= set(log.__all__)
    assert all(hasattr(log, name) for name in log.__all__)


def test_rejection_lines_are_limited_per_code_and_the_rest_counted(
    caplog: pytest.LogCaptureFixture,
) -> None:
    now = [100.0]
    log = RejectionLog(per_code=2, interval=10.0, monotonic=lambda: now[0])
    allowed = [log.allow("TokenSignatureInvalid") for _ in range(5)]
    assert allowed == [True, True, False, False, False]
    assert log.allow("TokenExpired")  # each code has its own allowance
    with caplog.at_level(logging.WARNING, logger="rag_api_core.auth"):
        now[0] = 110.0
        assert log.allow("TokenSignatureInvalid")  # a new interval
    summaries = [r for r in caplog.records if r.msg == "auth.rejections_suppressed"]
    assert len(summaries) == 1
    suppressed = [{"rejection": "TokenSignatureInvalid", "count": 3}]
    record = summaries[0]
    assert record.__dict__["suppressed"] == suppressed
    # What the scrubbing filter lets through: the counts survive it.
    assert ScrubbingFilter().filter(record)
    assert record.__dict__["suppressed"] == suppressed


async def test_a_flood_of_forged_signatures_writes_a_bounded_number_of_lines(
    client: AppClient,
    idp: LocalIdentityProvider,
    key_store: Credentials,
    caplog: pytest.LogCaptureFixture,
) -> None:
    header, payload, signature = idp.mint_token().split(".")
    changed = "A" if signature[10] != "A" else "B"
    forged = f"{header}.{payload}.{signature[:10]}{changed}{signature[11:]}"
    with caplog.at_level(logging.INFO, logger="rag_api_core.auth"):
        for _ in range(20):
            response = await client.get(
                "/api/v2/whoami", headers=auth_headers(forged, key_store.primary)
            )
            assert response.status == 401
    lines = [r for r in caplog.records if r.msg == "auth.rejected"]
    assert 1 <= len(lines) <= 5
    assert client.app[REQUEST_COUNTERS].rejections["TokenSignatureInvalid"] == 20
