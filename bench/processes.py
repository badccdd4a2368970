"""Pinned child processes and what /proc says about them: CPU time, memory, core use."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO

__all__ = (
    "CLOCK_TICKS",
    "PinnedProcess",
    "core_busy_seconds",
    "free_port",
    "process_cpu_seconds",
    "resident_bytes",
    "wait_for_http",
)

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")
_STOP_TIMEOUT = 40.0


def free_port() -> int:
    """A port free right now; the caller binds it soon after."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def process_cpu_seconds(pid: int) -> float:
    """User plus system CPU of one process (fields 14 and 15 of /proc/<pid>/stat)."""
    text = Path(f"/proc/{pid}/stat").read_text(encoding="ascii")
    # The command name may hold spaces and parentheses: split after the last ")".
    fields = text[text.rindex(")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def children_of(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        with contextlib.suppress(OSError, ValueError):
            text = (entry / "stat").read_text(encoding="ascii")
            parent = int(text[text.rindex(")") + 2 :].split()[1])
            if parent == pid:
                found.append(int(entry.name))
    return found


def resident_bytes(pid: int) -> int:
    """VmRSS from /proc/<pid>/status."""
    for line in Path(f"/proc/{pid}/status").read_text(encoding="ascii").splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"process {pid} reports no VmRSS")


def core_busy_seconds(core: int) -> float:
    """Time one core spent running tasks (user, nice, system) since boot."""
    name = f"cpu{core}"
    for line in Path("/proc/stat").read_text(encoding="ascii").splitlines():
        fields = line.split()
        if fields[0] == name:
            return (int(fields[1]) + int(fields[2]) + int(fields[3])) / CLOCK_TICKS
    raise RuntimeError(f"/proc/stat has no line for {name}")


def wait_for_http(url: str, *, timeout: float, want_status: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last: str = "no answer"
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(url, timeout=2) as response:  # noqa: S310
                if response.status == want_status:
                    return
                last = f"status {response.status}"
        except urllib.error.HTTPError as err:
            last = f"status {err.code}"
        except OSError as err:
            last = str(err)
        time.sleep(0.05)
    raise RuntimeError(f"{url} did not answer {want_status} in {timeout} s ({last})")


@dataclass
class PinnedProcess:
    """A child started under ``taskset`` on one core, with its output in files."""

    name: str
    process: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    _files: tuple[IO[bytes], IO[bytes]]

    @classmethod
    def start(
        cls,
        name: str,
        command: Sequence[str],
        *,
        cores: str,
        workdir: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> PinnedProcess:
        stdout_path = workdir / f"{name}.stdout"
        stderr_path = workdir / f"{name}.stderr"
        stdout = stdout_path.open("wb")
        stderr = stderr_path.open("wb")
        # taskset execs the command, so the child's pid is the server's own.
        process = subprocess.Popen(  # noqa: S603
            ["taskset", "-c", cores, *command],  # noqa: S607
            stdout=stdout,
            stderr=stderr,
            env=dict(env) if env is not None else None,
            cwd=cwd,
        )
        return cls(name, process, stdout_path, stderr_path, (stdout, stderr))

    @property
    def pid(self) -> int:
        return self.process.pid

    def cpu_seconds(self) -> float:
        """CPU of the process and of its children (the workers of a supervisor)."""
        total = process_cpu_seconds(self.pid)
        for child in children_of(self.pid):
            with contextlib.suppress(OSError):
                total += process_cpu_seconds(child)
        return total

    def resident_bytes(self) -> int:
        return resident_bytes(self.pid)

    def check_alive(self) -> None:
        code = self.process.poll()
        if code is not None:
            tail = self.stderr_path.read_text(errors="replace")[-2000:]
            raise RuntimeError(f"{self.name} exited with {code}:\n{tail}")

    def stop(self) -> int:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGTERM)
            try:
                self.process.wait(timeout=_STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        for stream in self._files:
            stream.close()
        return int(self.process.returncode)
