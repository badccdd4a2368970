"""``serve --workers N`` as real processes: one port, signals, graceful shutdown."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO

import aiohttp
import orjson
import pytest_asyncio

from service.idp import LocalIdentityProvider, OutageMode
from tests.conftest import Credentials, auth_headers

# Generous: the test machine may be busy with other suites.
_DEADLINE = 30.0
_POLL = 0.05
_TCP_LISTEN = "0A"
_TCP_ESTABLISHED = "01"
# What asyncio and aiohttp print when a task or a session outlives its loop.
_UNCLEAN_SHUTDOWN = (
    "Task was destroyed",
    "Unclosed client session",
    "Unclosed connector",
    "Traceback",
)


@dataclass
class Supervisor:
    """``python -m service serve --workers N`` and the files it writes to."""

    process: subprocess.Popen[bytes]
    port: int
    stdout: Path
    stderr: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def worker_pids(self) -> set[int]:
        return _children_of(self.process.pid)

    def output(self) -> str:
        return self.stdout.read_text(errors="replace") + self.stderr.read_text(
            errors="replace"
        )


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _children_of(pid: int) -> set[int]:
    children = set()
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            text = (entry / "stat").read_text()
        except OSError:
            continue
        fields = text[text.rindex(")") + 2 :].split()
        # A reaped-but-listed zombie is not a live worker.
        if int(fields[1]) == pid and fields[0] != "Z":
            children.add(int(entry.name))
    return children


def _socket_inodes(pid: int) -> set[int]:
    inodes = set()
    fd_dir = Path(f"/proc/{pid}/fd")
    for fd in fd_dir.iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(int(target[len("socket:[") : -1]))
    return inodes


def _tcp_sockets() -> list[tuple[int, int, str, int]]:
    """(local port, remote port, state, inode) of every IPv4 TCP socket."""
    rows = []
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        fields = line.split()
        local_port = int(fields[1].split(":")[1], 16)
        remote_port = int(fields[2].split(":")[1], 16)
        rows.append((local_port, remote_port, fields[3], int(fields[9])))
    return rows


def _listeners_on(port: int) -> set[int]:
    """The processes holding a listening socket on ``port``."""
    listening = {
        inode
        for local, _, state, inode in _tcp_sockets()
        if local == port and state == _TCP_LISTEN
    }
    return {pid for pid in _all_pids() if _socket_inodes_safe(pid) & listening}


def _owner_of_connection(server_port: int, client_port: int) -> int | None:
    """The process holding the server side of one established connection."""
    inodes = {
        inode
        for local, remote, state, inode in _tcp_sockets()
        if local == server_port and remote == client_port and state == _TCP_ESTABLISHED
    }
    for pid in _all_pids():
        if _socket_inodes_safe(pid) & inodes:
            return pid
    return None


def _all_pids() -> list[int]:
    return [
        int(entry.name) for entry in Path("/proc").iterdir() if entry.name.isdigit()
    ]


def _socket_inodes_safe(pid: int) -> set[int]:
    try:
        return _socket_inodes(pid)
    except OSError:
        return set()


async def _eventually(check: Callable[[], bool], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _DEADLINE
    while not check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(_POLL)


async def _eventually_async(check: Callable[[], Awaitable[bool]], what: str) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + _DEADLINE
    while not await check():
        if loop.time() > deadline:
            raise AssertionError(f"timed out waiting until {what}")
        await asyncio.sleep(_POLL)


async def _answers(url: str) -> bool:
    try:
        async with aiohttp.ClientSession() as session:
            async with session.get(url) as response:
                return response.status == 200
    except aiohttp.ClientError:
        return False


def _refuses_connections(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=1):
            return False
    except OSError:
        return True


async def _wait_for_exit(process: subprocess.Popen[bytes]) -> int:
    await _eventually(lambda: process.poll() is not None, "the supervisor exits")
    return int(process.returncode)


@pytest_asyncio.fixture
async def start_workers(
    idp: LocalIdentityProvider, key_store: Credentials, tmp_path: Path
) -> AsyncIterator[Callable[[int], Awaitable[Supervisor]]]:
    started: list[Supervisor] = []
    copiers: list[threading.Thread] = []

    async def start(workers: int, *, stdout_pipe: bool = False) -> Supervisor:
        """``stdout_pipe``: the workers share one pipe for standard output, as
        in a container; a thread copies it to the file."""
        port = _free_port()
        env = {
            "PATH": os.environ.get("PATH", ""),
            "ENTRA_TENANT_ID": idp.tenant_id,
            "ENTRA_AUDIENCES": f"{idp.audience},{idp.app_id}",
            "ENTRA_OPENID_CONFIG_URL": idp.openid_config_url,
            "ENTRA_ISSUERS": f"{idp.issuer},{idp.issuer_v1}",
            "APIM_SUBSCRIPTION_KEYS_FILE": str(key_store.store.path),
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "LOG_LEVEL": "INFO",
            "LOG_FORMAT": "json",
            # A held key refresh must outlast the shutdown steps of a busy machine.
            "IDP_TIMEOUT_SECONDS": "20",
            # Development mode reports unclosed sessions and connectors at
            # exit; without it a leak at shutdown would pass unnoticed.
            "PYTHONDEVMODE": "1",
        }
        stdout = tmp_path / f"serve-{port}.stdout"
        stderr = tmp_path / f"serve-{port}.stderr"
        with stdout.open("wb") as out, stderr.open("wb") as err:
            process = subprocess.Popen(  # noqa: S603
                [sys.executable, "-m", "service", "serve", "--workers", str(workers)],
                stdout=subprocess.PIPE if stdout_pipe else out,
                stderr=err,
                env=env,
            )
        if process.stdout is not None:
            copier = threading.Thread(
                target=_copy_pipe, args=(process.stdout, stdout), daemon=True
            )
            copier.start()
            copiers.append(copier)
        supervisor = Supervisor(process, port, stdout, stderr)
        started.append(supervisor)
        await _eventually(
            lambda: len(_listeners_on(port) & supervisor.worker_pids()) == workers,
            f"{workers} workers listen on port {port}",
        )
        await _eventually_async(
            lambda: _answers(supervisor.url + "/livez"), "the port answers"
        )
        return supervisor

    yield start

    for supervisor in started:
        # Whatever the test did, leave no process behind.
        pids = supervisor.worker_pids()
        if supervisor.process.poll() is None:
            supervisor.process.kill()
            supervisor.process.wait()
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def _copy_pipe(pipe: IO[bytes], path: Path) -> None:
    # A slow reader, as a log collector under load: the pipe fills up, and a
    # write longer than PIPE_BUF then goes in pieces other writers can split.
    with pipe, path.open("ab") as out:
        for chunk in iter(lambda: os.read(pipe.fileno(), 4096), b""):
            out.write(chunk)
            out.flush()
            time.sleep(0.02)


async def _request_on_own_connection(port: int) -> tuple[int, int]:
    """GET /livez on a fresh keep-alive connection; (status, worker pid)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(b"GET /livez HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        await writer.drain()
        status_line = await reader.readline()
        client_port = writer.get_extra_info("sockname")[1]
        # The connection is still open: whoever holds its server side answered.
        owner = _owner_of_connection(port, client_port)
        assert owner is not None, "no process holds the connection"
        return int(status_line.split()[1]), owner
    finally:
        writer.close()
        await writer.wait_closed()


async def test_two_workers_listen_on_one_port_and_both_answer(
    start_workers: Callable[[int], Awaitable[Supervisor]],
) -> None:
    supervisor = await start_workers(2)
    workers = supervisor.worker_pids()

    answers = [await _request_on_own_connection(supervisor.port) for _ in range(40)]

    assert len(workers) == 2
    assert _listeners_on(supervisor.port) == workers
    assert {status for status, _ in answers} == {200}
    # The kernel spreads connections over both sockets; all 40 on one worker
    # would happen with probability 2**-39.
    assert {owner for _, owner in answers} == workers


async def test_sigterm_stops_the_supervisor_and_every_worker_cleanly(
    start_workers: Callable[[int], Awaitable[Supervisor]],
) -> None:
    supervisor = await start_workers(2)
    workers = supervisor.worker_pids()

    supervisor.process.send_signal(signal.SIGTERM)
    code = await _wait_for_exit(supervisor.process)

    assert code == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in workers)
    assert _refuses_connections(supervisor.port)
    output = supervisor.output()
    assert output.count('"server.stopping"') == 2
    for marker in _UNCLEAN_SHUTDOWN:
        assert marker not in output


async def test_request_in_flight_at_sigterm_completes_with_its_normal_status(
    start_workers: Callable[[int], Awaitable[Supervisor]],
    idp: LocalIdentityProvider,
    key_store: Credentials,
) -> None:
    supervisor = await start_workers(2)
    # Both workers hold the first key set, so only our request fetches next.
    await _eventually(lambda: idp.hits["jwks"] >= 2, "both workers fetched keys")
    idp.rotate_key()
    token = idp.mint_token()
    idp.set_outage(OutageMode.HANG)
    fetches_before = idp.hits["discovery"]

    async with aiohttp.ClientSession() as session:

        async def health() -> tuple[int, dict[str, object]]:
            async with session.get(
                supervisor.url + "/api/v2/health",
                headers=auth_headers(token, key_store.primary),
            ) as response:
                return response.status, await response.json()

        # A token signed by a key the worker has not seen: it refreshes its
        # keys, and the provider holds that refresh until released.
        request = asyncio.create_task(health())
        await _eventually(
            lambda: idp.hits["discovery"] > fetches_before,
            "the request waits on the identity provider",
        )
        supervisor.process.send_signal(signal.SIGTERM)
        await _eventually(
            lambda: _refuses_connections(supervisor.port),
            "the workers stop listening",
        )
        assert not request.done()
        idp.set_outage(OutageMode.OK)
        status, body = await request

    code = await _wait_for_exit(supervisor.process)
    assert status == 200
    assert body["status"] in ("ok", "degraded")
    assert code == 0
    for marker in _UNCLEAN_SHUTDOWN:
        assert marker not in supervisor.output()


async def test_worker_that_dies_is_replaced_and_the_port_keeps_answering(
    start_workers: Callable[[int], Awaitable[Supervisor]],
) -> None:
    supervisor = await start_workers(2)
    victim, survivor = sorted(supervisor.worker_pids())

    os.kill(victim, signal.SIGKILL)
    await _eventually(
        lambda: len(_listeners_on(supervisor.port) - {survivor}) == 1,
        "a replacement worker listens",
    )

    workers = supervisor.worker_pids()
    assert survivor in workers
    assert victim not in workers
    assert len(workers) == 2
    assert await _answers(supervisor.url + "/livez")
    assert '"server.worker_exited"' in supervisor.output()


async def test_workers_sharing_one_pipe_write_every_access_line_whole(
    start_workers: Callable[..., Awaitable[Supervisor]],
) -> None:
    supervisor = await start_workers(2, stdout_pipe=True)
    per_connection, connections = 40, 96

    async def client() -> None:
        # One connection each: the kernel spreads them over both workers.
        connector = aiohttp.TCPConnector(limit=1)
        async with aiohttp.ClientSession(connector=connector) as session:
            for _ in range(per_connection):
                async with session.get(supervisor.url + "/livez") as response:
                    assert response.status == 200

    await asyncio.gather(*(client() for _ in range(connections)))
    supervisor.process.send_signal(signal.SIGTERM)
    assert await _wait_for_exit(supervisor.process) == 0
    await _eventually(
        lambda: supervisor.stdout.read_bytes().count(b'"server.stopping"') == 2,
        "both workers' last lines reach the file",
    )

    lines = supervisor.stdout.read_bytes().splitlines()
    # Every line is one whole JSON record (or a worker's start-up announcement):
    # none was split by another worker's.
    announced = [line for line in lines if line.startswith(b"rag-api-core listening")]
    assert len(announced) == 2
    records = [orjson.loads(line) for line in lines if line not in announced]
    access = [r for r in records if r["msg"] == "http.access" and r["path"] == "/livez"]
    # The readiness probes of start-up are the only other /livez requests.
    assert len(access) >= per_connection * connections
