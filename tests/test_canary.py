"""The canary: real tokens and a real key through every rejection path, then a scan.

A real ``python -m service serve`` process runs at DEBUG; its stdout and stderr are
its file descriptors, so every logger, aiohttp's parser errors, warnings and
tracebacks land there. Requests go over raw sockets so that the exact bytes (two
headers, control characters) reach the server. The scan looks for each token,
each of its segments, its signature alone, URL-encoded forms and the key, in the
process output and in every response body.
"""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import socket
import subprocess
import sys
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pytest_asyncio

from service.idp import LocalIdentityProvider
from tests.conftest import Credentials

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Service:
    port: int
    process: subprocess.Popen[bytes]


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest_asyncio.fixture
async def service(
    idp: LocalIdentityProvider, key_store: Credentials, tmp_path: Path
) -> AsyncIterator[Service]:
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith(("ENTRA_", "APIM_"))}
    env |= {
        "ENTRA_TENANT_ID": idp.tenant_id,
        "ENTRA_AUDIENCES": f"{idp.audience},{idp.app_id}",
        "ENTRA_OPENID_CONFIG_URL": idp.openid_config_url,
        "ENTRA_ISSUERS": f"{idp.issuer},{idp.issuer_v1}",
        "APIM_SUBSCRIPTION_KEYS_FILE": str(key_store.store.path),
        "HOST": "127.0.0.1",
        "PORT": str(port),
        "LOG_LEVEL": "DEBUG",
        "PYTHONASYNCIODEBUG": "1",
    }
    with (
        (tmp_path / "stdout").open("wb") as out,
        (tmp_path / "stderr").open("wb") as err,
    ):
        process = subprocess.Popen(
            [sys.executable, "-X", "dev", "-m", "service", "serve"],
            cwd=ROOT,
            env=env,
            stdout=out,
            stderr=err,
        )
    try:
        await _wait_ready(port)
        yield Service(port, process)
    finally:
        if process.poll() is None:
            process.send_signal(signal.SIGTERM)
            await asyncio.to_thread(process.wait, 30)


async def _wait_ready(port: int) -> None:
    for _ in range(300):
        try:
            status, _ = await _raw(port, b"GET /readyz HTTP/1.1\r\nHost: x\r\n\r\n")
        except OSError:
            status = 0
        if status == 200:
            return
        await asyncio.sleep(0.05)
    raise AssertionError("the service did not become ready")


async def _raw(port: int, request: bytes) -> tuple[int, bytes]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await reader.readuntil(b"\r\n\r\n")
        length = 0
        for line in head.split(b"\r\n"):
            if line.lower().startswith(b"content-length:"):
                length = int(line.split(b":")[1])
        body = await reader.readexactly(length)
    finally:
        writer.close()
    return int(head.split()[1]), head + body


def _request(path: str, *headers: tuple[str, str]) -> bytes:
    lines = [f"GET {path} HTTP/1.1", "Host: canary", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1")


def _needles(secret: str) -> Iterator[str]:
    yield secret
    yield quote(secret, safe="")
    yield secret.replace(".", "%2E")
    if secret.count(".") == 2:
        segments = secret.split(".")
        yield from (s for s in segments if len(s) > 16)
        yield segments[2]
        yield segments[2][:24]


async def test_no_secret_reaches_any_log_stream_or_response_body(
    service: Service,
    idp: LocalIdentityProvider,
    key_store: Credentials,
    tmp_path: Path,
) -> None:
    key = key_store.primary
    good = idp.mint_token()
    canaries = {
        "good": good,
        "expired": idp.mint_token(lifetime=-3600),
        "wrong-audience": idp.mint_token(claims={"aud": "api://someone-else"}),
        "wrong-role": idp.mint_token(roles=["Other.Role"]),
        "unknown-kid": idp.mint_token(header={"kid": "not-published"}),
    }
    bearer = "Authorization", f"Bearer {good}"
    sub = "Ocp-Apim-Subscription-Key", key
    requests = {
        "accepted": _request("/api/v2/whoami", bearer, sub),
        "missing-key": _request("/api/v2/health", bearer),
        "invalid-key": _request("/api/v2/health", bearer, (sub[0], key[::-1])),
        "missing-token": _request("/api/v2/health", sub),
        "malformed": _request("/api/v2/health", (bearer[0], f"Bearer {good}=="), sub),
        "query": _request(f"/api/v2/health?access_token={good}&subscription-key={key}"),
        "two-tokens": _request("/api/v2/health", bearer, bearer, sub),
        "two-keys": _request("/api/v2/health", bearer, sub, sub),
        "basic-with-key": _request("/api/v2/health", ("Authorization", f"Basic {key}")),
        "control-char": _request(
            "/api/v2/health", (bearer[0], bearer[1] + "\x01"), sub
        ),
        "control-char-key": _request("/api/v2/health", bearer, (sub[0], key + "\x7f")),
        "oversized": _request("/api/v2/health", (bearer[0], bearer[1] + "A" * 17000)),
    }
    for name, token in canaries.items():
        requests[name] = _request(
            "/api/v2/health", ("Authorization", f"Bearer {token}"), sub
        )

    bodies: list[bytes] = []
    statuses: dict[str, int] = {}
    for name, raw in requests.items():
        status, response = await _raw(service.port, raw)
        statuses[name] = status
        bodies.append(response)

    service.process.send_signal(signal.SIGTERM)
    await asyncio.to_thread(service.process.wait, 30)
    output = (tmp_path / "stdout").read_bytes() + (tmp_path / "stderr").read_bytes()

    assert statuses["accepted"] == statuses["good"] == 200
    assert statuses["wrong-role"] == 403
    assert statuses["control-char"] == 400
    assert statuses["oversized"] == 431
    assert all(status != 500 for status in statuses.values())
    assert b"http.access" in output  # the scan read real logs, at DEBUG
    assert b"http.requests_refused" in output  # including the parser refusals
    sinks = [output, *bodies]
    for label, secret in [*canaries.items(), ("key", key)]:
        for needle in _needles(secret):
            found = [i for i, sink in enumerate(sinks) if needle.encode() in sink]
            assert not found, f"{label} fragment found in sink {found[0]}"


def test_canary_scan_would_find_a_leaked_signature() -> None:
    """The scan itself: a planted signature segment is found (guards the needles)."""
    segments = [base64.urlsafe_b64encode(os.urandom(48)).decode().rstrip("=")]
    token = ".".join(segments * 3)
    planted = f"DEBUG sig={token.split('.')[2]}".encode()
    assert any(needle.encode() in planted for needle in _needles(token))
