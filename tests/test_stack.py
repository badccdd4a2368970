"""The local stack: docker-compose.yml checked by a real compose, and run as processes.

No Docker engine runs here. ``docker-compose config`` (Debian's package) checks
the file; then the same commands with the same environment start as processes on
127.0.0.1: the identity provider, the one-shot key store step, two replicas (the
image's ``CMD``) against the real Redis, and nginx with ``deploy/nginx.conf`` whose
upstreams are rewritten to the replicas' ports. Without nginx the requests
alternate between the two replicas instead, and the tests that need the load
balancer skip and say so.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NoReturn

import aiohttp
import pytest
import yaml

from service.idp import LocalIdentityProvider, Outage, OutageMode
from service.jwks import JwksCache, JwksPolicy
from service.settings import Settings, SettingsError

__all__: tuple[str, ...] = ()

REPO = Path(__file__).resolve().parent.parent
COMPOSE_FILE = REPO / "docker-compose.yml"
DOCKERFILE = REPO / "Dockerfile"
NGINX_CONF = REPO / "deploy" / "nginx.conf"
IN_CI = bool(os.environ.get("CI"))
REDIS_ADDRESS = ("127.0.0.1", 6379)
STARTUP_SECONDS = 45.0
# The replicas' part of the compose file, as the stack test rewrites it.
COMPOSE_HOSTS = {
    "http://localhost:8080": "{lb_url}",
    "http://idp:8081": "http://127.0.0.1:{idp_port}",
    "redis://redis:6379": "redis://127.0.0.1:6379",
    "172.30.80.10": "127.0.0.1",
}


def _unavailable(reason: str) -> NoReturn:
    """Skip with the reason; in CI, where everything is installed, fail instead."""
    if IN_CI:
        pytest.fail(reason)
    pytest.skip(reason)


def _compose() -> dict[str, Any]:
    document = yaml.safe_load(COMPOSE_FILE.read_text(encoding="utf-8"))
    assert isinstance(document, dict)
    return document


def _dockerfile_json(instruction: str) -> list[str]:
    """The exec-form argument list of the Dockerfile's last ``instruction``."""
    found: list[str] | None = None
    for line in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        if line.startswith(instruction + " "):
            found = json.loads(line[line.index("[") :])
    assert found is not None, f"the Dockerfile has no {instruction} in exec form"
    return found


def _healthcheck_command() -> list[str]:
    return _dockerfile_json("HEALTHCHECK")


def _python(argv: Sequence[str]) -> list[str]:
    """The image's ``python`` is this interpreter here."""
    return [sys.executable if arg == "python" else arg for arg in argv]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def _redis_answers() -> bool:
    try:
        with socket.create_connection(REDIS_ADDRESS, timeout=1) as sock:
            sock.sendall(b"PING\r\n")
            return sock.recv(16).startswith(b"+PONG")
    except OSError:
        return False


def _wait_for(what: str, check: Any, seconds: float = STARTUP_SECONDS) -> Any:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if result:
            return result
        time.sleep(0.1)
    raise AssertionError(f"{what} not reached within {seconds} s")


# docker-compose config


def test_compose_file_is_accepted_by_docker_compose_config() -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        _unavailable("docker-compose is not installed (apt-get install docker-compose)")
    result = subprocess.run(  # noqa: S603 - fixed arguments
        [compose, "--file", str(COMPOSE_FILE), "config", "--quiet"],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert result.returncode == 0, result.stderr


def test_compose_config_gives_both_replicas_one_environment() -> None:
    compose = shutil.which("docker-compose")
    if compose is None:
        _unavailable("docker-compose is not installed (apt-get install docker-compose)")
    result = subprocess.run(  # noqa: S603 - fixed arguments
        [compose, "--file", str(COMPOSE_FILE), "config"],
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    services = yaml.safe_load(result.stdout)["services"]

    assert set(services) == {"idp", "redis", "keys-init", "api1", "api2", "lb"}
    assert services["api1"]["environment"] == services["api2"]["environment"]
    environment = services["api1"]["environment"]
    assert environment["CACHE_URL"] == "redis://redis:6379/0"
    assert environment["ENTRA_OPENID_CONFIG_URL"].startswith("http://idp:8081/")
    for replica in ("api1", "api2"):
        assert services[replica]["depends_on"]["keys-init"] == {
            "condition": "service_completed_successfully"
        }
        assert "keys:/data:ro" in services[replica]["volumes"]


def test_compose_load_balancer_trusts_only_its_own_fixed_address() -> None:
    document = _compose()
    lb_address = document["services"]["lb"]["networks"]["default"]["ipv4_address"]
    trusted = document["x-api"]["environment"]["TRUSTED_PROXIES"]
    assert trusted == lb_address


def test_dockerfile_runs_as_a_non_root_user_with_a_python_healthcheck() -> None:
    text = DOCKERFILE.read_text(encoding="utf-8")
    users = re.findall(r"^USER (\S+)$", text, flags=re.MULTILINE)
    assert users and users[-1] not in ("root", "0")
    assert _dockerfile_json("CMD") == ["python", "-m", "service", "serve"]
    assert _healthcheck_command()[0] == "python"
    assert "/readyz" in _healthcheck_command()[-1]


def test_image_healthcheck_fails_when_nothing_answers() -> None:
    env = {**os.environ, "PORT": str(_free_port())}
    result = subprocess.run(  # noqa: S603 - the Dockerfile's own command
        _python(_healthcheck_command()),
        env=env,
        capture_output=True,
        timeout=30,
        check=False,
    )
    assert result.returncode != 0


# ENTRA_ALLOW_INSECURE_HTTP, the setting the compose stack needs


def _idp_env(**values: str) -> dict[str, str]:
    tenant = "00000000-0000-4000-8000-00000000de01"
    env = {
        "ENTRA_TENANT_ID": tenant,
        "ENTRA_AUDIENCES": "api://x",
        "APIM_SUBSCRIPTION_KEYS_FILE": "keys.json",
        "ENTRA_OPENID_CONFIG_URL": f"http://idp:8081/{tenant}/v2.0"
        "/.well-known/openid-configuration",
    }
    env.update(values)
    return env


def test_http_discovery_on_a_non_loopback_host_is_refused_by_default() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(_idp_env())
    assert caught.value.name == "ENTRA_OPENID_CONFIG_URL"
    assert "ENTRA_ALLOW_INSECURE_HTTP" in str(caught.value)


def test_insecure_http_setting_admits_http_discovery_on_any_host() -> None:
    settings = Settings.from_env(_idp_env(ENTRA_ALLOW_INSECURE_HTTP="true"))
    assert settings.allow_insecure_http is True
    assert settings.redacted()["ENTRA_ALLOW_INSECURE_HTTP"] is True


def test_insecure_http_setting_still_needs_a_url() -> None:
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(
            _idp_env(ENTRA_ALLOW_INSECURE_HTTP="true", ENTRA_OPENID_CONFIG_URL="idp")
        )
    assert caught.value.name == "ENTRA_OPENID_CONFIG_URL"


def test_insecure_http_setting_is_off_unless_said_true() -> None:
    assert (
        Settings.from_env(_idp_env(ENTRA_OPENID_CONFIG_URL="https://idp/x")).redacted()[
            "ENTRA_ALLOW_INSECURE_HTTP"
        ]
        is False
    )
    with pytest.raises(SettingsError) as caught:
        Settings.from_env(_idp_env(ENTRA_ALLOW_INSECURE_HTTP="dev"))
    assert caught.value.name == "ENTRA_ALLOW_INSECURE_HTTP"


def _non_loopback_address() -> str | None:
    """An address of this machine that is not loopback, like a container's."""
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as probe:
            # No packet is sent: connect() on UDP only picks the local address.
            probe.connect(("192.0.2.1", 9))
            address: str = probe.getsockname()[0]
    except OSError:
        return None
    return None if address.startswith("127.") else address


def _key_cache(idp: LocalIdentityProvider, *, allow: bool) -> JwksCache:
    return JwksCache(
        idp.openid_config_url,
        (idp.issuer,),
        JwksPolicy(allow_insecure_http=allow, total_timeout=2.0),
    )


async def test_keys_over_http_from_a_non_loopback_host_need_the_setting() -> None:
    address = _non_loopback_address()
    if address is None:
        pytest.skip("this machine has no non-loopback IPv4 address to serve keys on")
    async with LocalIdentityProvider(host=address) as idp:
        refused, admitted = _key_cache(idp, allow=False), _key_cache(idp, allow=True)
        for cache in (refused, admitted):
            await cache.start()
        try:
            assert await refused.refresh_now() is False
            assert refused.status()["last_refresh"]["error"] == (
                "the discovery document points at keys on another host"
            )
            assert await admitted.refresh_now() is True
            assert admitted.kids == frozenset(idp.kids)
        finally:
            for cache in (refused, admitted):
                await cache.close()


async def test_insecure_http_setting_still_refuses_keys_on_another_host(
    idp: LocalIdentityProvider,
) -> None:
    document = idp.openid_configuration()
    document["jwks_uri"] = "http://keys.example/discovery/v2.0/keys"
    idp.set_outage(
        OutageMode.BODY,
        body=json.dumps(document).encode(),
        endpoints=Outage().endpoints - {"jwks"},
    )
    cache = _key_cache(idp, allow=True)
    await cache.start()
    try:
        assert await cache.refresh_now() is False
        assert cache.status()["last_refresh"]["error"] == (
            "the discovery document points at keys on another host"
        )
        assert idp.hits["jwks"] == 0
    finally:
        await cache.close()


# The stack as processes


@dataclass
class _Process:
    name: str
    popen: subprocess.Popen[bytes]
    log: Path

    def output(self) -> str:
        return self.log.read_text(encoding="utf-8", errors="replace")


@dataclass
class Stack:
    """The running stack: where each part listens, and what the docs print."""

    workdir: Path
    idp_port: int
    replica_ports: tuple[int, int]
    metrics_ports: tuple[int, int]
    lb_url: str | None
    keys_file: Path
    token_request: tuple[str, dict[str, str]]
    api_request: tuple[str, dict[str, str]]
    replica_env: dict[str, str]
    processes: list[_Process] = field(default_factory=list)

    def replica_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.replica_ports[index]}"

    def metrics_url(self, index: int) -> str:
        return f"http://127.0.0.1:{self.metrics_ports[index]}/metrics"

    def log_of(self, name: str) -> str:
        return next(p for p in self.processes if p.name == name).output()


def _rewrite(value: str, mapping: Mapping[str, str], mounts: Mapping[str, Path]) -> str:
    for old, new in mapping.items():
        value = value.replace(old, new)
    for inside, outside in mounts.items():
        if value == inside or value.startswith(inside + "/"):
            value = str(outside) + value[len(inside) :]
    return value


def _mounts(service: Mapping[str, Any], volumes: Mapping[str, Path]) -> dict[str, Path]:
    """Container paths to host paths: named volumes to temporary directories."""
    mounts: dict[str, Path] = {}
    for entry in service.get("volumes", ()):
        source, target = entry.split(":")[:2]
        outside = REPO / source if source.startswith(".") else volumes[source]
        mounts[target] = outside.resolve()
    return mounts


def _command(argv: Sequence[str], idp_port: int) -> list[str]:
    command = _python(argv)
    for option, value in (("--host", "127.0.0.1"), ("--port", str(idp_port))):
        if option in command:
            command[command.index(option) + 1] = value
    return command


def _start(
    name: str, argv: Sequence[str], env: Mapping[str, str], workdir: Path
) -> _Process:
    log = workdir / f"{name}.log"
    with log.open("wb") as sink:
        popen = subprocess.Popen(  # noqa: S603 - the compose file's commands
            list(argv),
            env=dict(env),
            cwd=workdir,
            stdout=sink,
            stderr=subprocess.STDOUT,
        )
    return _Process(name, popen, log)


def _stop(processes: Sequence[_Process]) -> None:
    for process in reversed(processes):
        if process.popen.poll() is None:
            process.popen.send_signal(signal.SIGTERM)
    for process in processes:
        try:
            process.popen.wait(timeout=15)
        except subprocess.TimeoutExpired:
            process.popen.kill()
            process.popen.wait()


def _base_env(workdir: Path) -> dict[str, str]:
    # As in the image: this interpreter's directory first on PATH, as /opt/venv/bin.
    path = f"{Path(sys.executable).parent}{os.pathsep}{os.environ.get('PATH', '')}"
    return {"PATH": path, "HOME": str(workdir), "LANG": "C.UTF-8"}


def _parse_token_curl(idp_output: str) -> tuple[str, dict[str, str]]:
    line = next(
        row for row in idp_output.splitlines() if row.startswith("curl -s -X POST ")
    )
    words = shlex.split(line)
    url = words[4]
    form: dict[str, str] = {}
    for flag, value in zip(words[5::2], words[6::2], strict=True):
        assert flag in ("-d", "--data-urlencode")
        name, _, text = value.partition("=")
        form[name] = text
    return url, form


def _parse_api_curl(init_output: str) -> tuple[str, dict[str, str]]:
    line = next(row for row in init_output.splitlines() if row.startswith("curl "))
    words = shlex.split(line)
    url = next(word for word in words if word.startswith("http"))
    headers = {}
    for flag, value in itertools.pairwise(words):
        if flag == "-H":
            name, _, text = value.partition(": ")
            headers[name] = text
    return url, headers


def _ready(stack_env: Mapping[str, str], port: int) -> bool:
    env = {**stack_env, "PORT": str(port)}
    result = subprocess.run(  # noqa: S603 - the Dockerfile's HEALTHCHECK
        _python(_healthcheck_command()),
        env=env,
        capture_output=True,
        timeout=10,
        check=False,
    )
    return result.returncode == 0


def _start_nginx(
    workdir: Path, replica_ports: tuple[int, int], lb_port: int
) -> _Process | None:
    nginx = _nginx()
    if nginx is None:
        return None
    text = NGINX_CONF.read_text(encoding="utf-8")
    for name, port in zip(("api1", "api2"), replica_ports, strict=True):
        text = text.replace(f"server {name}:8080", f"server 127.0.0.1:{port}")
    text = text.replace("listen 8080;", f"listen 127.0.0.1:{lb_port};")
    # The image's scratch paths, moved into this test's own directory.
    text = text.replace("/tmp/", f"{workdir}/nginx-")  # noqa: S108
    config = workdir / "nginx.conf"
    config.write_text(text, encoding="utf-8")
    argv = [nginx, "-e", "stderr", "-p", str(workdir), "-c", str(config)]
    return _start("lb", [*argv, "-g", "daemon off;"], os.environ, workdir)


def _nginx() -> str | None:
    # /usr/sbin is not on every user's PATH.
    return shutil.which("nginx") or shutil.which("/usr/sbin/nginx")


def _listening(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return True
    except OSError:
        return False


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    workdir = tmp_path_factory.mktemp("stack")
    services = _compose()["services"]
    idp_port, lb_port = _free_port(), _free_port()
    replica_ports = (_free_port(), _free_port())
    metrics_ports = (_free_port(), _free_port())
    with_lb = _nginx() is not None
    lb_url = f"http://127.0.0.1:{lb_port}" if with_lb else None
    mapping = {
        old: new.format(idp_port=idp_port, lb_url=lb_url or "http://localhost:8080")
        for old, new in COMPOSE_HOSTS.items()
    }
    volumes = {"keys": workdir / "keys"}
    volumes["keys"].mkdir()
    processes: list[_Process] = []

    def env_of(name: str) -> tuple[dict[str, str], dict[str, Path]]:
        service = services[name]
        mounts = _mounts(service, volumes)
        env = _base_env(workdir)
        for key, value in service.get("environment", {}).items():
            env[key] = _rewrite(str(value), mapping, mounts)
        return env, mounts

    try:
        idp_env, _ = env_of("idp")
        idp = _start(
            "idp", _command(services["idp"]["command"], idp_port), idp_env, workdir
        )
        processes.append(idp)
        _wait_for("the idp's banner", lambda: "curl -s -X POST" in idp.output())
        token_request = _parse_token_curl(idp.output())

        init_env, init_mounts = env_of("keys-init")
        init = subprocess.run(  # noqa: S603 - the compose file's command
            [
                _rewrite(arg, mapping, init_mounts)
                for arg in services["keys-init"]["command"]
            ],
            env=init_env,
            cwd=workdir,
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        api_request = _parse_api_curl(init.stdout)

        # Counters of earlier runs in the same Redis must not count here.
        prefix = f"stack-test-{uuid.uuid4().hex[:12]}"
        replica_env: dict[str, str] = {}
        for index, name in enumerate(("api1", "api2")):
            env, _ = env_of(name)
            env.update(
                HOST="127.0.0.1",
                PORT=str(replica_ports[index]),
                METRICS_PORT=str(metrics_ports[index]),
                CACHE_KEY_PREFIX=prefix,
            )
            replica_env = env
            processes.append(
                _start(name, _python(_dockerfile_json("CMD")), env, workdir)
            )
        for port in replica_ports:
            _wait_for(
                f"readiness on {port}", lambda port=port: _ready(replica_env, port)
            )

        if with_lb:
            lb = _start_nginx(workdir, replica_ports, lb_port)
            assert lb is not None
            processes.append(lb)
            _wait_for("the load balancer", lambda: _listening(lb_port))

        yield Stack(
            workdir=workdir,
            idp_port=idp_port,
            replica_ports=replica_ports,
            metrics_ports=metrics_ports,
            lb_url=lb_url,
            keys_file=volumes["keys"] / "keys.json",
            token_request=token_request,
            api_request=api_request,
            replica_env=replica_env,
            processes=processes,
        )
    except Exception:
        for process in processes:
            sys.stderr.write(f"--- {process.name} ---\n{process.output()[-4000:]}\n")
        raise
    finally:
        _stop(processes)


async def _token(session: aiohttp.ClientSession, stack: Stack) -> str:
    url, form = stack.token_request
    async with session.post(url, data=form) as response:
        assert response.status == 200
        body = await response.json()
    token: str = body["access_token"]
    return token


def _api_headers(stack: Stack, token: str, key: str | None = None) -> dict[str, str]:
    _, headers = stack.api_request
    headers = {name: value.replace("$TOKEN", token) for name, value in headers.items()}
    if key is not None:
        headers["Ocp-Apim-Subscription-Key"] = key
    return headers


def _samples(text: str) -> dict[str, float]:
    values = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            name, _, value = line.rpartition(" ")
            values[name] = float(value)
    return values


async def _metrics(
    session: aiohttp.ClientSession, stack: Stack, index: int
) -> dict[str, float]:
    async with session.get(stack.metrics_url(index)) as response:
        assert response.status == 200
        return _samples(await response.text())


async def test_documented_curl_gives_200_through_the_load_balancer(
    stack: Stack,
) -> None:
    if stack.lb_url is None:
        _unavailable("nginx is not installed: the load balancer config is not run")
    async with aiohttp.ClientSession() as session:
        token = await _token(session, stack)
        url, _ = stack.api_request
        assert url.startswith(stack.lb_url)
        before = [await _metrics(session, stack, i) for i in (0, 1)]
        statuses = []
        for _ in range(4):
            async with session.get(url, headers=_api_headers(stack, token)) as response:
                statuses.append(response.status)
        after = [await _metrics(session, stack, i) for i in (0, 1)]

    assert statuses == [200] * 4
    served = 'rag_api_requests_total{status="200"}'
    # Round robin: each replica answered some of the four.
    for index in (0, 1):
        assert after[index].get(served, 0) > before[index].get(served, 0)


@pytest.mark.parametrize("replica", [0, 1])
async def test_documented_request_gives_200_from_each_replica(
    stack: Stack, replica: int
) -> None:
    async with aiohttp.ClientSession() as session:
        token = await _token(session, stack)
        url = f"{stack.replica_url(replica)}/api/v2/whoami"
        async with session.get(url, headers=_api_headers(stack, token)) as response:
            body = await response.json()
            status = response.status

    assert status == 200
    assert body["subscription"]["name"] == "demo"
    assert body["tid"] == "00000000-0000-4000-8000-00000000de01"


async def test_replicas_refuse_a_request_without_a_token(stack: Stack) -> None:
    _, headers = stack.api_request
    key = {"Ocp-Apim-Subscription-Key": headers["Ocp-Apim-Subscription-Key"]}
    async with aiohttp.ClientSession() as session:
        for replica in (0, 1):
            url = f"{stack.replica_url(replica)}/api/v2/health"
            async with session.get(url, headers=key) as response:
                body = await response.json()
                assert response.status == 401
                assert body["code"] == "TokenNotPresent"
                assert response.headers["WWW-Authenticate"] == 'Bearer realm="rag-api"'


async def test_metrics_port_is_public_and_main_port_metrics_are_not(
    stack: Stack,
) -> None:
    async with aiohttp.ClientSession() as session:
        samples = await _metrics(session, stack, 0)
        async with session.get(f"{stack.replica_url(0)}/metrics") as response:
            body = await response.json()
            status = response.status
            challenge = response.headers["WWW-Authenticate"]

    assert "rag_api_signing_keys_degraded" in samples
    assert samples["rag_api_signing_keys_degraded"] == 0
    assert status == 401
    assert body["code"] == "SubscriptionKeyNotFound"
    assert challenge == 'Bearer realm="rag-api"'


def test_replicas_warn_at_start_up_that_insecure_http_is_on(stack: Stack) -> None:
    for name in ("api1", "api2"):
        assert "app.insecure_http_allowed" in stack.log_of(name)


async def test_logs_of_the_stack_hold_no_token_and_no_key(stack: Stack) -> None:
    async with aiohttp.ClientSession() as session:
        token = await _token(session, stack)
        for replica in (0, 1):
            url = f"{stack.replica_url(replica)}/api/v2/health"
            headers = _api_headers(stack, token)
            async with session.get(url, headers=headers) as response:
                assert response.status == 200
    _, headers = stack.api_request
    key = headers["Ocp-Apim-Subscription-Key"]
    for process in stack.processes:
        if process.name in ("api1", "api2"):
            assert key not in process.output()
            assert token not in process.output()


async def test_one_rate_limit_is_shared_by_both_replicas(stack: Stack) -> None:
    if not _redis_answers():
        _unavailable("no Redis answers on 127.0.0.1:6379: limits cannot be shared")
    keys = [sys.executable, "-m", "service", "keys"]
    issued = {}
    # The limited one first: a replica that knows the probe, added last, has
    # read a file holding both.
    for name, extra in (("shared-limit", ["--rate-limit", "4/60"]), ("probe", [])):
        result = subprocess.run(  # noqa: S603 - the keys command
            [
                *keys,
                "add",
                "--file",
                str(stack.keys_file),
                "--name",
                name,
                "--product",
                "stack-test",
                "--json",
                *extra,
            ],
            capture_output=True,
            text=True,
            timeout=60,
            check=True,
        )
        issued[name] = json.loads(result.stdout)["primary"]

    async with aiohttp.ClientSession() as session:
        token = await _token(session, stack)
        await _wait_until_both_replicas_share(session, stack, token, issued["probe"])
        results = []
        for call in range(6):
            url = f"{stack.replica_url(call % 2)}/api/v2/health"
            headers = _api_headers(stack, token, issued["shared-limit"])
            async with session.get(url, headers=headers) as response:
                results.append(
                    (response.status, dict(response.headers), await response.json())
                )

    assert [status for status, _, _ in results] == [200, 200, 200, 200, 429, 429]
    _, headers, body = results[4]
    assert body["code"] == "RateLimitExceeded"
    assert body["message"].startswith("Rate limit is exceeded. Try again in ")
    assert int(headers["Retry-After"]) >= 1
    assert "WWW-Authenticate" not in headers
    assert [h["RateLimit-Remaining"] for _, h, _ in results[:4]] == ["3", "2", "1", "0"]


async def _wait_until_both_replicas_share(
    session: aiohttp.ClientSession, stack: Stack, token: str, probe_key: str
) -> None:
    """Both replicas see the new subscriptions and count on Redis, not alone."""
    deadline = time.monotonic() + STARTUP_SECONDS
    ready = [False, False]
    while not all(ready):
        assert time.monotonic() < deadline, "the replicas did not load the new keys"
        for index in (0, 1):
            url = f"{stack.replica_url(index)}/api/v2/health"
            headers = _api_headers(stack, token, probe_key)
            async with session.get(url, headers=headers) as response:
                if response.status != 200:
                    continue
                body = await response.json()
                ready[index] = body["sharedStore"]["state"] == "ok"
        if not all(ready):
            await asyncio.sleep(0.2)
