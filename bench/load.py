"""The load generator: Debian's wrk, installed when missing, pinned to one core."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import time
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

__all__ = ("LoadResult", "LoadRun", "ensure_wrk", "run_wrk", "start_wrk")

LUA_SCRIPT = Path(__file__).with_name("load.lua")
_MARKER = "BENCH_JSON "


@dataclass(frozen=True, slots=True)
class LoadResult:
    """One wrk run, as its ``done()`` hook reported it, and the client's CPU."""

    requests: int
    seconds: float
    errors: int
    status_errors: int
    timeouts: int
    p50_ms: float
    p90_ms: float
    p99_ms: float
    overrun: int
    client_cpu_seconds: float

    @property
    def requests_per_second(self) -> float:
        return self.requests / self.seconds

    @property
    def client_busy(self) -> float:
        """Share of the run wrk spent on its core: near 1.0 means client-bound."""
        return self.client_cpu_seconds / self.seconds


def ensure_wrk() -> str:
    """The path of wrk, installing Debian's package when it is missing."""
    found = shutil.which("wrk")
    if found is not None:
        return found
    if os.geteuid() != 0:
        raise RuntimeError("wrk is missing; install it with: sudo apt-get install wrk")
    print("installing wrk (apt-get install -y wrk)", flush=True)
    install = ["apt-get", "install", "-y", "-q", "wrk"]
    if _quiet(install) != 0:
        # A fresh container has no package lists yet.
        if _quiet(["apt-get", "update", "-q"]) != 0 or _quiet(install) != 0:
            raise RuntimeError("apt-get could not install wrk")
    found = shutil.which("wrk")
    if found is None:
        raise RuntimeError("apt-get installed wrk but it is not on PATH")
    return found


def _quiet(command: list[str]) -> int:
    done = subprocess.run(  # noqa: S603
        command, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, check=False
    )
    return done.returncode


class LoadRun:
    """A wrk process running in the background; ``result`` waits for it."""

    def __init__(self, process: subprocess.Popen[str], started: float) -> None:
        self._process = process
        self._started = started

    def result(self) -> LoadResult:
        # wait4 gives this child's own CPU, even while other wrk runs go on.
        _, status, usage = os.wait4(self._process.pid, 0)
        self._process.returncode = os.waitstatus_to_exitcode(status)
        wall = time.monotonic() - self._started
        assert self._process.stdout is not None and self._process.stderr is not None
        output = self._process.stdout.read()
        errors = self._process.stderr.read()
        self._process.stdout.close()
        self._process.stderr.close()
        if self._process.returncode != 0:
            raise RuntimeError(f"wrk failed ({self._process.returncode}): {errors}")
        return _parse(output, usage.ru_utime + usage.ru_stime, wall)


def run_wrk(url: str, **options: Any) -> LoadResult:
    """``start_wrk`` and wait for its result."""
    return start_wrk(url, **options).result()


def start_wrk(
    url: str,
    *,
    cores: str,
    connections: int,
    seconds: float,
    mode: str = "fixed",
    headers: Mapping[str, str] | None = None,
    env: Mapping[str, str] | None = None,
    timeout: float = 10.0,
) -> LoadRun:
    """Drive ``url`` with one wrk thread on ``cores``; ``mode`` as in load.lua."""
    command: list[str] = [
        "taskset",
        "-c",
        cores,
        "wrk",
        "-t1",
        f"-c{connections}",
        f"-d{max(1, round(seconds))}s",
        f"--timeout={max(1, round(timeout))}s",
        "-s",
        str(LUA_SCRIPT),
    ]
    for name, value in (headers or {}).items():
        command += ["-H", f"{name}: {value}"]
    command.append(url)
    child_env = {**os.environ, "BENCH_MODE": mode, **(env or {})}
    process = subprocess.Popen(  # noqa: S603
        command,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=child_env,
    )
    return LoadRun(process, time.monotonic())


def _parse(output: str, client_cpu: float, wall: float) -> LoadResult:
    lines = [line for line in output.splitlines() if line.startswith(_MARKER)]
    if not lines:
        raise RuntimeError(f"wrk printed no result line:\n{output}")
    data = json.loads(lines[-1][len(_MARKER) :])
    socket_errors = sum(
        int(data[name]) for name in ("connect_errors", "read_errors", "write_errors")
    )
    seconds = int(data["duration_us"]) / 1e6
    return LoadResult(
        requests=int(data["requests"]),
        seconds=seconds if seconds > 0 else wall,
        errors=socket_errors,
        status_errors=int(data["status_errors"]),
        timeouts=int(data["timeouts"]),
        p50_ms=int(data["p50_us"]) / 1000,
        p90_ms=int(data["p90_us"]) / 1000,
        p99_ms=int(data["p99_us"]) / 1000,
        overrun=int(data["overrun"]),
        client_cpu_seconds=client_cpu,
    )
