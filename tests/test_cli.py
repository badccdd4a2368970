"""The command line as a user runs it: real processes, real output."""

from __future__ import annotations

import json
import os
import shlex
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.idp import LocalIdentityProvider
from tests.conftest import Credentials

ROOT = Path(__file__).resolve().parent.parent


def _env(**values: str) -> dict[str, str]:
    keep = {
        k: v for k, v in os.environ.items() if not k.startswith(("ENTRA_", "APIM_"))
    }
    keep.update(values)
    return keep


def _run(
    *args: str, env: dict[str, str], timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(  # noqa: S603
        [sys.executable, "-m", "service", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def _service_env(idp: LocalIdentityProvider, keys_file: Path) -> dict[str, str]:
    return _env(
        ENTRA_TENANT_ID=idp.tenant_id,
        ENTRA_AUDIENCES=f"{idp.audience},{idp.app_id}",
        ENTRA_OPENID_CONFIG_URL=idp.openid_config_url,
        ENTRA_ISSUERS=f"{idp.issuer},{idp.issuer_v1}",
        APIM_SUBSCRIPTION_KEYS_FILE=str(keys_file),
    )


@pytest.mark.parametrize(
    ("changes", "named"),
    [
        ({"ENTRA_TENANT_ID": ""}, "ENTRA_TENANT_ID"),
        ({"ENTRA_TENANT_ID": "not-a-guid"}, "ENTRA_TENANT_ID"),
        ({"ENTRA_AUDIENCES": ""}, "ENTRA_AUDIENCES"),
        ({"ENTRA_CLOCK_SKEW_SECONDS": "soon"}, "ENTRA_CLOCK_SKEW_SECONDS"),
        (
            {"ENTRA_OPENID_CONFIG_URL": "http://idp.example/x"},
            "ENTRA_OPENID_CONFIG_URL",
        ),
        ({"PORT": "99999"}, "PORT"),
        ({"LOG_LEVEL": "LOUD"}, "LOG_LEVEL"),
        (
            {"APIM_SUBSCRIPTION_KEYS_FILE": "/nonexistent/keys.json"},
            "APIM_SUBSCRIPTION_KEYS_FILE",
        ),
    ],
    ids=[
        "tenant-missing",
        "tenant-not-guid",
        "audiences-empty",
        "skew-not-number",
        "discovery-plain-http",
        "port-out-of-range",
        "log-level",
        "keys-file-missing",
    ],
)
def test_bad_setting_stops_serve_with_a_message_naming_it(
    changes: dict[str, str], named: str, tmp_path: Path, key_store: Credentials
) -> None:
    values = {
        "ENTRA_TENANT_ID": "00000000-0000-0000-0000-000000000001",
        "ENTRA_AUDIENCES": "api://x",
        "APIM_SUBSCRIPTION_KEYS_FILE": str(key_store.store.path),
    }
    env = _env(**(values | changes))
    result = _run("serve", env=env)
    assert result.returncode == 2
    assert result.stderr.startswith(f"error: {named}")
    assert "Traceback" not in result.stderr


def test_config_file_supplies_settings_the_environment_lacks(
    tmp_path: Path, key_store: Credentials
) -> None:
    config = tmp_path / "service.env"
    config.write_text(
        "# settings for check-config\n"
        "ENTRA_TENANT_ID=00000000-0000-0000-0000-000000000001\n"
        "ENTRA_AUDIENCES='api://x'\n"
        f"APIM_SUBSCRIPTION_KEYS_FILE={key_store.store.path}\n"
        "ENTRA_OPENID_CONFIG_URL=http://127.0.0.1:9/x\n"
        "IDP_TIMEOUT_SECONDS=0.5\n",
        encoding="utf-8",
    )
    result = _run("check-config", "--config", str(config), env=_env())
    printed = json.loads(result.stdout.split("\n}\n")[0] + "\n}")
    assert printed["ENTRA_TENANT_ID"] == "00000000-0000-0000-0000-000000000001"
    assert printed["ENTRA_REQUIRED_ROLES"] == ["Api.Access"]
    assert result.returncode == 1  # nothing listens on port 9: the probe fails


async def test_check_config_probes_discovery_and_keys(
    idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    env = _service_env(idp, key_store.store.path)
    result = await _run_async("check-config", env=env)
    assert result.returncode == 0, result.stderr
    assert '"signing_keys": "fresh"' in result.stdout
    assert idp.hits["jwks"] == 1


async def _run_async(
    *args: str, env: dict[str, str]
) -> subprocess.CompletedProcess[str]:
    import asyncio

    return await asyncio.to_thread(_run, *args, env=env)


def test_keys_add_json_prints_both_keys_once(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    result = _run(
        "keys",
        "add",
        "--file",
        str(keys_file),
        "--name",
        "app",
        "--product",
        "p",
        "--json",
        env=_env(),
    )
    printed = json.loads(result.stdout)
    assert result.returncode == 0
    assert set(printed) == {"name", "product", "primary", "secondary"}
    stored = keys_file.read_text(encoding="utf-8")
    assert printed["primary"] not in stored
    assert printed["secondary"] not in stored


@pytest.fixture
def dev_server() -> Iterator[subprocess.Popen[str]]:
    env = _env(PORT="0", LOG_LEVEL="INFO")
    process = subprocess.Popen(
        [sys.executable, "-m", "service", "serve", "--dev", "--port", "0"],
        cwd=ROOT,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    yield process
    if process.poll() is None:
        process.kill()
        process.wait(timeout=10)


def _read_until_curl(process: subprocess.Popen[str], seconds: float = 60) -> list[str]:
    assert process.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        line = process.stdout.readline()
        if not line:
            break
        lines.append(line.rstrip("\n"))
        if line.startswith("curl "):
            return lines
    raise AssertionError(f"serve --dev printed no curl line: {len(lines)} lines")


@pytest.mark.skipif(shutil.which("curl") is None, reason="curl is not installed")
def test_serve_dev_prints_a_curl_command_that_works_as_printed(
    dev_server: subprocess.Popen[str],
) -> None:
    lines = _read_until_curl(dev_server)
    curl = lines[-1]
    result = subprocess.run(  # noqa: S603
        shlex.split(curl), capture_output=True, text=True, timeout=30, check=False
    )
    body = json.loads(result.stdout)
    assert body["status"] == "ok"
    assert body["identityProvider"]["state"] == "fresh"
    assert dev_server.stdout is not None
    after = [dev_server.stdout.readline() for _ in range(3)]
    assert after[1].startswith("PowerShell")
    assert after[2].startswith("$headers = @{")
    assert "Invoke-RestMethod" in after[2]
    dev_server.send_signal(signal.SIGTERM)
    _, stderr = dev_server.communicate(timeout=30)
    assert dev_server.returncode == 0
    assert "Traceback" not in stderr
    assert "Task was destroyed" not in stderr
    assert "Unclosed" not in stderr


def test_idp_command_serves_until_sigterm_and_exits_cleanly() -> None:
    with subprocess.Popen(
        [sys.executable, "-m", "service", "idp", "--port", "0"],
        cwd=ROOT,
        env=_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    ) as process:
        try:
            assert process.stdout is not None
            banner = ""
            for _ in range(20):
                banner = process.stdout.readline()
                if banner.startswith("Local identity provider"):
                    break
            assert "http://127.0.0.1:" in banner
            process.send_signal(signal.SIGTERM)
            _, stderr = process.communicate(timeout=30)
        finally:
            if process.poll() is None:
                process.kill()
    assert process.returncode == 0
    assert "Traceback" not in stderr
