"""The benchmark: the service against bare aiohttp under wrk, in interleaved rounds.

Run it with ``make bench`` (``.venv/bin/python bench/run.py``); ``--help`` lists the
knobs. It needs two cores, wrk (installed from Debian when missing) and taskset.
See docs/performance.md for what it measures and why.
"""

from __future__ import annotations

import argparse
import base64
import contextlib
import json
import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any

from load import LoadResult, ensure_wrk, run_wrk, start_wrk
from processes import (
    PinnedProcess,
    core_busy_seconds,
    free_port,
    process_cpu_seconds,
    wait_for_http,
)
from report import Measurement, RegimeSummary, Target, format_table, summarize

__all__ = ("main",)

CLIENT_CORE = 0
SERVER_CORE = 1
HEALTH = "/api/v2/health"
# What every load run requests: a protected route whose handler does the same
# work as the bare server's (one small dict serialized), so the difference is
# the checks alone. /api/v2/health would add its own cost: it reads the state of
# the key cache, the key store, Redis and the limits (about 10 µs).
TARGET = "/api/v2/whoami"
KEY_HEADER = "Ocp-Apim-Subscription-Key"

# The baseline: aiohttp as installed, on the event loop it runs on by default.
BARE = "bare aiohttp"
# The stricter view: bare aiohttp on uvloop too, so uvloop's own gain (which
# the service takes when the speed extra is installed) is not counted.
BARE_UV = "bare aiohttp on uvloop"
# Bare aiohttp plus one RS256 verification per request and nothing else: the
# floor of the new-token regime on this machine, whatever does the checking.
FLOOR = "bare aiohttp + one RS256 verify"
REUSED = "reused token"
NEW = "new token, cache off"
DISTINCT = "distinct tokens, cache on"
REUSED_INFO = "reused token, LOG_LEVEL=INFO"
REGIMES = (BARE, BARE_UV, FLOOR, REUSED, NEW, DISTINCT, REUSED_INFO)
NO_CREDENTIALS = "no key, no token"
NO_KEY = "no key, forged token"
NO_KEY_THROTTLED = "no key, forged token, throttled"

# A run during which other processes took more than this share of a core is
# repeated: on a shared 2-core machine a test suite running beside it would
# otherwise decide the result.
_DISTURBED_SHARE = 0.05
_ATTEMPTS = 3
_WARMUP_SECONDS = 2.0
_START_TIMEOUT = 30.0
# Bounds the distinct-token regime's run, so its pool is never used twice.
_POOL_MARGIN = 1.3
# The memory cap: the warm-up RSS, a budget per cache entry (about 3.4 KiB are
# used), and slack for the allocator's arenas.
_MEMORY_SLACK_BYTES = 16 * 1024 * 1024
_ENTRY_BUDGET_BYTES = 8 * 1024
_FLOOD_RATE_CONNECTIONS = 8
_FLOOD_RATE_DELAY_MS = 8
_REPO = Path(__file__).resolve().parent.parent
_NO_THROTTLES = {"AUTH_FAILURE_LIMIT": "0", "TOKEN_FAILURE_LIMIT": "0"}
_NO_KEY_PAIRS = 3


@dataclass(frozen=True, slots=True)
class Options:
    rounds: int
    seconds: float
    connections: int
    pool_per_round: int
    flood_tokens: int
    cache_size: int
    cold_connections: int
    workers_check: bool
    json_path: Path | None
    keep: bool


@dataclass(frozen=True, slots=True)
class Server:
    name: str
    url: str
    process: PinnedProcess
    cores: str


@dataclass(frozen=True, slots=True)
class Provider:
    process: PinnedProcess
    control_url: str
    info: Mapping[str, Any]

    def hits(self) -> dict[str, int]:
        return dict(_get_json(f"{self.control_url}/hits"))

    def set_outage(self, mode: str, delay: float | None = None) -> None:
        _post_json(f"{self.control_url}/outage", {"mode": mode, "delay": delay})


@dataclass
class Results:
    """Everything measured, for the tables and the JSON file."""

    machine: dict[str, str] = field(default_factory=dict)
    rounds: list[dict[str, Measurement]] = field(default_factory=list)
    summaries: dict[str, RegimeSummary] = field(default_factory=dict)
    # The same regimes, each ratio against bare aiohttp on uvloop.
    uvloop_summaries: dict[str, RegimeSummary] = field(default_factory=dict)
    rejections: list[dict[str, Any]] = field(default_factory=list)
    flood: list[dict[str, Any]] = field(default_factory=list)
    cold_start: dict[str, Any] = field(default_factory=dict)
    memory: dict[str, Any] = field(default_factory=dict)
    workers: list[dict[str, Any]] = field(default_factory=list)
    verify_us: float = 0.0
    # What a token adds to a request without a key, per interleaved pair of runs.
    token_cost_us: list[float] = field(default_factory=list)
    targets: list[Target] = field(default_factory=list)


def main(argv: list[str] | None = None) -> int:
    options = _options(argv)
    if len(os.sched_getaffinity(0)) < 2 or (os.cpu_count() or 1) < 2:
        print("the benchmark needs two cores: one for wrk, one for the server")
        return 2
    ensure_wrk()
    # The orchestrator sleeps while wrk runs; it stays off the server's core.
    os.sched_setaffinity(0, {CLIENT_CORE})
    workdir = Path(tempfile.mkdtemp(prefix="rag-bench-"))
    try:
        with Benchmark(options, workdir) as bench:
            results = bench.run()
    finally:
        if options.keep:
            print(f"kept {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)
    _print_results(results)
    if options.json_path is not None:
        options.json_path.write_text(_results_json(results), encoding="utf-8")
    counted = [target for target in results.targets if not target.informational]
    return 0 if all(target.met for target in counted) else 1


def _options(argv: list[str] | None) -> Options:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=10.0, help="per wrk run")
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument(
        "--pool-per-round",
        type=int,
        default=15000,
        help="distinct valid tokens minted for each round's distinct-token run",
    )
    parser.add_argument("--flood-tokens", type=int, default=1_000_000)
    parser.add_argument("--cache-size", type=int, default=10000)
    parser.add_argument("--cold-connections", type=int, default=500)
    parser.add_argument("--no-workers-check", action="store_true")
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument("--keep", action="store_true", help="keep logs and tokens")
    args = parser.parse_args(argv)
    return Options(
        rounds=args.rounds,
        seconds=args.seconds,
        connections=args.connections,
        pool_per_round=args.pool_per_round,
        flood_tokens=args.flood_tokens,
        cache_size=args.cache_size,
        cold_connections=args.cold_connections,
        workers_check=not args.no_workers_check,
        json_path=args.json,
        keep=args.keep,
    )


class Benchmark:
    """Owns the processes and runs every scenario in turn."""

    def __init__(self, options: Options, workdir: Path) -> None:
        self.options = options
        self.workdir = workdir
        self.results = Results()
        self._stack = contextlib.ExitStack()
        self._servers: dict[str, Server] = {}

    def __enter__(self) -> Benchmark:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    # -- set-up -----------------------------------------------------------------

    def run(self) -> Results:
        self.results.machine = _machine()
        self.provider = self._start_provider()
        self.key = self._create_key()
        self.token = str(self.provider.info["token"])
        self.auth = {"Authorization": f"Bearer {self.token}", KEY_HEADER: self.key}
        self.results.verify_us = self._verify_cost_us()
        self.tokens_path = self.workdir / "tokens.txt"
        pool = self.options.pool_per_round * self.options.rounds
        self._mint(max(pool, 3 * self.options.cache_size))

        self._start_main_servers()
        self._rounds()
        self._rejections()
        self._floods()
        self._cold_start()
        self._memory()
        if self.options.workers_check:
            self._workers()
        self._judge()
        return self.results

    def _start_provider(self) -> Provider:
        port, control = free_port(), free_port()
        process = PinnedProcess.start(
            "idp",
            [
                sys.executable,
                str(_REPO / "bench" / "idp_host.py"),
                "--port",
                str(port),
                "--control-port",
                str(control),
            ],
            cores=str(CLIENT_CORE),
            workdir=self.workdir,
            env=_base_env() | {"LOG_LEVEL": "WARNING"},
        )
        self._stack.callback(process.stop)
        control_url = f"http://127.0.0.1:{control}"
        wait_for_http(f"{control_url}/hits", timeout=_START_TIMEOUT)
        return Provider(process, control_url, _get_json(f"{control_url}/info"))

    def _create_key(self) -> str:
        self.keys_path = self.workdir / "keys.json"
        done = subprocess.run(  # noqa: S603
            [
                sys.executable,
                "-m",
                "service",
                "keys",
                "add",
                "--name",
                "bench",
                "--product",
                "bench",
                "--json",
                "--file",
                str(self.keys_path),
            ],
            capture_output=True,
            text=True,
            check=True,
            env=_base_env(),
        )
        return str(json.loads(done.stdout)["primary"])

    def _mint(self, count: int) -> None:
        print(f"minting {count} distinct valid tokens ...", flush=True)
        started = time.monotonic()
        _post_json(
            f"{self.provider.control_url}/mint",
            {"count": count, "path": str(self.tokens_path)},
            timeout=600,
        )
        print(f"  done in {time.monotonic() - started:.1f} s", flush=True)

    def _verify_cost_us(self) -> float:
        """One RS256 verification with the service's own key objects, in-process."""
        from service.jwks import build_key_set

        discovery = _get_json(str(self.provider.info["openid_config_url"]))
        keys = build_key_set(_get_json(str(discovery["jwks_uri"])))
        header, payload, signature = self.token.split(".")
        key = next(iter(keys.values()))
        message = f"{header}.{payload}".encode("ascii")
        raw = base64.urlsafe_b64decode(signature + "=" * (-len(signature) % 4))
        count = 2000
        started = time.perf_counter()
        for _ in range(count):
            key.verify(message, raw)
        return (time.perf_counter() - started) / count * 1e6

    def service_env(
        self, port: int, *, log_level: str = "WARNING", cache_size: int | None = None
    ) -> dict[str, str]:
        info = self.provider.info
        env = _base_env() | {
            "ENTRA_TENANT_ID": str(info["tenant_id"]),
            "ENTRA_AUDIENCES": f"{info['audience']},{info['app_id']}",
            "ENTRA_OPENID_CONFIG_URL": str(info["openid_config_url"]),
            "ENTRA_ISSUERS": ",".join(info["issuers"]),
            "APIM_SUBSCRIPTION_KEYS_FILE": str(self.keys_path),
            "HOST": "127.0.0.1",
            "PORT": str(port),
            "LOG_LEVEL": log_level,
            "LOG_FORMAT": "json",
        }
        if cache_size is not None:
            env["TOKEN_CACHE_SIZE"] = str(cache_size)
        return env

    def start_service(
        self,
        name: str,
        *,
        log_level: str = "WARNING",
        cache_size: int | None = None,
        workers: int = 1,
        cores: str = str(SERVER_CORE),
        ready: bool = True,
        extra_env: Mapping[str, str] | None = None,
    ) -> Server:
        port = free_port()
        command = [sys.executable, "-m", "service", "serve"]
        if workers > 1:
            command += ["--workers", str(workers)]
        process = PinnedProcess.start(
            name,
            command,
            cores=cores,
            workdir=self.workdir,
            env=self.service_env(port, log_level=log_level, cache_size=cache_size)
            | dict(extra_env or {}),
        )
        server = Server(name, f"http://127.0.0.1:{port}", process, cores)
        self._stack.callback(process.stop)
        path = "/readyz" if ready else "/livez"
        wait_for_http(server.url + path, timeout=_START_TIMEOUT)
        self._servers[name] = server
        return server

    def start_bare(
        self,
        name: str = "bare",
        cores: str = str(SERVER_CORE),
        loop: str = "asyncio",
        verify: bool = False,
    ) -> Server:
        port = free_port()
        extra: list[str] = []
        if verify:
            token_file = self.workdir / "floor-token.txt"
            token_file.write_text(self.token, encoding="ascii")
            discovery = _get_json(str(self.provider.info["openid_config_url"]))
            extra = ["--verify", str(token_file), str(discovery["jwks_uri"])]
        process = PinnedProcess.start(
            name,
            [
                sys.executable,
                str(_REPO / "bench" / "bare_server.py"),
                "--port",
                str(port),
                "--loop",
                loop,
                *extra,
            ],
            cores=cores,
            workdir=self.workdir,
            env=_base_env(),
        )
        server = Server(name, f"http://127.0.0.1:{port}", process, cores)
        self._stack.callback(process.stop)
        wait_for_http(server.url + TARGET, timeout=_START_TIMEOUT)
        self._servers[name] = server
        return server

    def _start_main_servers(self) -> None:
        print("starting bare aiohttp, twice, and three services ...", flush=True)
        self.start_bare()
        self.start_bare("bare-uvloop", loop="uvloop")
        self.start_bare("bare-verify", verify=True)
        self.start_service("cached", cache_size=self.options.cache_size)
        # Its failure throttles are off, so the rejection runs below measure
        # the path they name rather than a throttle's 429 (measured on its own).
        self.start_service("uncached", cache_size=0, extra_env=_NO_THROTTLES)
        self.start_service("info", log_level="INFO", cache_size=self.options.cache_size)
        for name in ("cached", "uncached", "info"):
            _expect(self._servers[name].url + TARGET, self.auth, 200, None)

    # -- measuring ----------------------------------------------------------------

    def measure(
        self,
        server: Server,
        regime: str,
        *,
        seconds: float | None = None,
        connections: int | None = None,
        mode: str = "fixed",
        headers: Mapping[str, str] | None = None,
        env: Mapping[str, str] | None = None,
        expect_ok: bool = True,
        retry: bool = True,
    ) -> Measurement:
        """One wrk run on ``server``, repeated when other processes disturbed it."""
        best: Measurement | None = None
        for attempt in range(1, (_ATTEMPTS if retry else 1) + 1):
            server.process.check_alive()
            before = self._cpu_snapshot(server)
            load = run_wrk(
                server.url + TARGET,
                cores=str(CLIENT_CORE),
                connections=connections or self.options.connections,
                seconds=seconds or self.options.seconds,
                mode=mode,
                headers=headers if mode == "fixed" else None,
                env=env,
            )
            after = self._cpu_snapshot(server)
            server_cpu = after["server"] - before["server"]
            foreign = self._foreign_share(server, before, after, load)
            measurement = Measurement(regime, load, server_cpu, foreign, attempt)
            if expect_ok and (load.status_errors or load.errors or load.timeouts):
                tail = server.process.stderr_path.read_text(errors="replace")[-1500:]
                raise RuntimeError(
                    f"{regime}: {load.status_errors} error statuses, {load.errors}"
                    f" socket errors, {load.timeouts} timeouts\n{tail}"
                )
            if best is None or foreign < best.foreign_cpu:
                best = replace(measurement, attempts=attempt)
            if foreign <= _DISTURBED_SHARE:
                break
            again = ", again" if retry and attempt < _ATTEMPTS else ""
            print(f"    disturbed: {foreign:.0%} of a core was not ours{again}")
        assert best is not None
        return best

    def _cpu_snapshot(self, server: Server) -> dict[str, float]:
        return {
            "server": server.process.cpu_seconds(),
            "client_core": core_busy_seconds(CLIENT_CORE),
            "server_core": core_busy_seconds(SERVER_CORE),
            "provider": process_cpu_seconds(self.provider.process.pid),
            "self": _own_cpu(),
        }

    @staticmethod
    def _foreign_share(
        server: Server,
        before: Mapping[str, float],
        after: Mapping[str, float],
        load: LoadResult,
    ) -> float:
        """The largest share of a core that something else used during the run."""
        ours_on_client = (
            load.client_cpu_seconds
            + after["provider"]
            - before["provider"]
            + after["self"]
            - before["self"]
        )
        client = after["client_core"] - before["client_core"] - ours_on_client
        other = 0.0
        if server.cores == str(SERVER_CORE):
            server_cpu = after["server"] - before["server"]
            other = after["server_core"] - before["server_core"] - server_cpu
        return max(client, other, 0.0) / load.seconds

    def _rounds(self) -> None:
        bare, bare_uv = self._servers["bare"], self._servers["bare-uvloop"]
        floor = self._servers["bare-verify"]
        cached, uncached = self._servers["cached"], self._servers["uncached"]
        info = self._servers["info"]
        print("warming up ...", flush=True)
        for server in (bare, bare_uv, floor, cached, uncached, info):
            self.measure(server, "warm-up", seconds=_WARMUP_SECONDS, headers=self.auth)
        slice_size = self.options.pool_per_round
        for number in range(self.options.rounds):
            print(f"round {number + 1} of {self.options.rounds}", flush=True)
            row: dict[str, Measurement] = {}
            row[BARE] = self.measure(bare, BARE, headers=self.auth)
            row[BARE_UV] = self.measure(bare_uv, BARE_UV, headers=self.auth)
            row[FLOOR] = self.measure(floor, FLOOR, headers=self.auth)
            row[REUSED] = self.measure(cached, REUSED, headers=self.auth)
            row[NEW] = self.measure(uncached, NEW, headers=self.auth)
            rate = row[NEW].load.requests_per_second
            seconds = max(
                1, min(self.options.seconds, slice_size / rate / _POOL_MARGIN)
            )
            row[DISTINCT] = self.measure(
                cached,
                DISTINCT,
                seconds=math.floor(seconds),
                mode="pool",
                env=self._pool_env(number * slice_size, slice_size),
                retry=False,
            )
            if row[DISTINCT].load.overrun:
                print("    the token pool ran out: that run is left out")
                del row[DISTINCT]
            row[REUSED_INFO] = self.measure(info, REUSED_INFO, headers=self.auth)
            self.results.rounds.append(row)
            _print_round(row)
        for regime in REGIMES:
            if any(regime in row for row in self.results.rounds):
                self.results.summaries[regime] = summarize(
                    self.results.rounds, regime, BARE
                )
                self.results.uvloop_summaries[regime] = summarize(
                    self.results.rounds, regime, BARE_UV
                )

    def _pool_env(self, first: int, count: int) -> dict[str, str]:
        return {
            "BENCH_TOKENS": str(self.tokens_path),
            "BENCH_FIRST": str(first),
            "BENCH_COUNT": str(count),
            "BENCH_KEY": self.key,
        }

    def _forged_env(self, *, known_kid: bool, key: str) -> dict[str, str]:
        header, payload, _ = self.token.split(".")
        return {
            "BENCH_HEADER": header if known_kid else "",
            "BENCH_PAYLOAD": payload,
            "BENCH_KEY": key,
        }

    # -- scenarios beyond the rounds ---------------------------------------------

    def _rejections(self) -> None:
        """What a refused request costs, on the service with its cache off."""
        print("rejections ...", flush=True)
        server = self._servers["uncached"]
        wrong_key = "0" * len(self.key)
        cases = (
            (NO_CREDENTIALS, None, "", True, "SubscriptionKeyNotFound"),
            (NO_KEY, "forged", "", True, "SubscriptionKeyNotFound"),
            ("unknown key", "forged", wrong_key, True, "SubscriptionKeyInvalid"),
            (
                "valid key, unknown kid",
                "forged",
                self.key,
                False,
                "TokenSignatureKeyNotFound",
            ),
            (
                "valid key, bad signature",
                "forged",
                self.key,
                True,
                "TokenSignatureInvalid",
            ),
        )
        runs: dict[str, list[Measurement]] = {}
        # The two no-key cases alternate, in pairs: their difference (what a
        # token adds) is a few µs, less than this VM drifts between two runs
        # minutes apart, so it is taken pair by pair, then the median.
        order = [0, 1] * _NO_KEY_PAIRS + list(range(2, len(cases)))
        for index in order:
            label, mode, key, known_kid, code = cases[index]
            headers: dict[str, str] = {}
            if mode is not None:
                token = _forged_token(self.token, random_kid=not known_kid)
                headers["Authorization"] = f"Bearer {token}"
            if key:
                headers[KEY_HEADER] = key
            _expect(server.url + TARGET, headers, 401, code)
            run = self.measure(
                server,
                label,
                seconds=self._rejection_seconds,
                mode=mode or "fixed",
                headers=headers,
                env=self._forged_env(known_kid=known_kid, key=key),
                expect_ok=False,
            )
            runs.setdefault(label, []).append(run)
        self.results.token_cost_us = [
            with_token.cpu_us_per_request - without.cpu_us_per_request
            for without, with_token in zip(
                runs[NO_CREDENTIALS], runs[NO_KEY], strict=True
            )
        ]
        for label, _mode, _key, _known_kid, code in cases:
            # The table shows each case's median run by CPU per request.
            ordered = sorted(runs[label], key=lambda run: run.cpu_us_per_request)
            self._record_rejection(label, code, ordered[len(ordered) // 2])
        self._throttled()

    @property
    def _rejection_seconds(self) -> float:
        return max(3.0, self.options.seconds / 2)

    def _throttled(self) -> None:
        """No key from an address over AUTH_FAILURE_LIMIT: the throttle's 429."""
        # Its own process: a throttled address is refused everything, valid
        # requests too, for the rest of the period.
        server = self.start_service("throttled", cache_size=0)
        env = self._forged_env(known_kid=True, key="")
        self.measure(server, "trip", seconds=1, mode="forged", env=env, expect_ok=False)
        headers = {"Authorization": f"Bearer {_forged_token(self.token)}"}
        _expect(server.url + TARGET, headers, 429, "TooManyFailedAttempts")
        run = self.measure(
            server,
            NO_KEY_THROTTLED,
            seconds=self._rejection_seconds,
            mode="forged",
            env=env,
            expect_ok=False,
        )
        self._record_rejection(NO_KEY_THROTTLED, "TooManyFailedAttempts", run)
        server.process.stop()

    def _record_rejection(self, label: str, code: str, run: Measurement) -> None:
        self.results.rejections.append(
            {
                "case": label,
                "code": code,
                "requests_per_second": run.load.requests_per_second,
                "cpu_us_per_request": run.cpu_us_per_request,
                # Every answer should be the refusal: wrk counts >= 400 as errors.
                "not_refused": run.load.requests - run.load.status_errors,
            }
        )

    def _floods(self) -> None:
        """Valid traffic's p99 alone and beside floods of forged tokens."""
        print("floods beside valid traffic ...", flush=True)
        server = self._servers["cached"]
        alone = self.measure(server, "valid alone", headers=self.auth)
        entry = {"case": "valid traffic alone", "valid": alone, "flood": None}
        self.results.flood.append(entry)
        floods: tuple[tuple[str, int | None, dict[str, str]], ...] = (
            (
                f"paced flood ({_FLOOD_RATE_CONNECTIONS} conn., "
                f"{_FLOOD_RATE_DELAY_MS} ms apart)",
                _FLOOD_RATE_CONNECTIONS,
                {"BENCH_DELAY_MS": str(_FLOOD_RATE_DELAY_MS)},
            ),
            (f"flood at full speed ({self.options.connections} conn.)", None, {}),
        )
        for label, connections, extra in floods:
            flood_run = start_wrk(
                server.url + TARGET,
                cores=str(CLIENT_CORE),
                connections=connections or self.options.connections,
                seconds=self.options.seconds + 2,
                mode="forged",
                env=self._forged_env(known_kid=True, key=self.key) | extra,
            )
            time.sleep(1.0)
            valid = self.measure(server, label, headers=self.auth, retry=False)
            flood = flood_run.result()
            self.results.flood.append({"case": label, "valid": valid, "flood": flood})
        self._throttled_flood()

    def _throttled_flood(self) -> None:
        """The full-speed flood again, with TOKEN_FAILURE_LIMIT set (off by default)."""
        limit = "20/60"
        server = self.start_service(
            "token-throttle",
            cache_size=self.options.cache_size,
            extra_env={"TOKEN_FAILURE_LIMIT": limit},
        )
        self.measure(server, "warm-up", seconds=_WARMUP_SECONDS, headers=self.auth)
        alone = self.measure(server, "valid alone", headers=self.auth)
        flood_run = start_wrk(
            server.url + TARGET,
            cores=str(CLIENT_CORE),
            connections=self.options.connections,
            seconds=self.options.seconds + 2,
            mode="forged",
            env=self._forged_env(known_kid=True, key=self.key),
        )
        time.sleep(1.0)
        label = f"flood at full speed, TOKEN_FAILURE_LIMIT={limit}"
        valid = self.measure(server, label, headers=self.auth, retry=False)
        flood = flood_run.result()
        self.results.flood.append(
            {"case": label, "valid": valid, "flood": flood, "alone": alone}
        )

    def _cold_start(self) -> None:
        """A fresh process meets many connections before it holds any key."""
        print("cold start ...", flush=True)
        # A slow provider keeps the first fetch in flight while every
        # connection arrives, so sharing it is what is being measured.
        self.provider.set_outage("slow", delay=1.0)
        before = self.provider.hits()
        server = self.start_service("cold", ready=False)
        load = run_wrk(
            server.url + TARGET,
            cores=str(CLIENT_CORE),
            connections=self.options.cold_connections,
            seconds=3,
            headers=self.auth,
            timeout=15,
        )
        after = self.provider.hits()
        self.provider.set_outage("ok")
        server.process.stop()
        self.results.cold_start = {
            "connections": self.options.cold_connections,
            "discovery_fetches": after.get("discovery", 0) - before.get("discovery", 0),
            "jwks_fetches": after.get("jwks", 0) - before.get("jwks", 0),
            "requests": load.requests,
            "error_statuses": load.status_errors,
            "socket_errors": load.errors,
            "timeouts": load.timeouts,
            "p99_ms": load.p99_ms,
        }

    def _memory(self) -> None:
        """Resident memory of a fresh process through distinct-token floods."""
        print("memory ...", flush=True)
        size = self.options.cache_size
        # Forged tokens all reach the signature step: the worst case for memory.
        server = self.start_service("memory", cache_size=size, extra_env=_NO_THROTTLES)
        self.measure(server, "warm-up", seconds=_WARMUP_SECONDS, headers=self.auth)
        steps: list[dict[str, Any]] = [self._memory_step(server, "after warm-up", 0)]
        distinct = self.results.summaries.get(DISTINCT)
        rate = distinct.requests_per_second if distinct else 1000.0
        for label, first, count in (
            (f"after {size} distinct valid tokens", 0, size),
            (f"after {2 * size} more", size, 2 * size),
        ):
            run = self.measure(
                server,
                label,
                seconds=math.ceil(count / rate * 2) + 1,
                mode="pool",
                env=self._pool_env(first, count),
                retry=False,
            )
            if not run.load.overrun:
                raise RuntimeError(f"memory: {label} did not send every token")
            steps.append(self._memory_step(server, label, run.load.requests))
        sent = self._forged_flood(server, self.options.flood_tokens)
        label = f"after {sent} forged tokens (random kid, signature)"
        steps.append(self._memory_step(server, label, sent))
        base = steps[0]["rss_bytes"]
        self.results.memory = {
            "cache_size": size,
            "steps": steps,
            "per_entry_bytes": (steps[1]["rss_bytes"] - base) / size,
            "cap_bytes": base + size * _ENTRY_BUDGET_BYTES + _MEMORY_SLACK_BYTES,
        }
        server.process.stop()

    def _forged_flood(self, server: Server, count: int) -> int:
        """Send at least ``count`` distinct forged tokens; returns how many went."""
        env = self._forged_env(known_kid=False, key=self.key)
        sent, rate = 0, 0.0
        while sent < count:
            # wrk runs for a time, not a count: size each run by the last rate.
            seconds = 2 if not rate else math.ceil((count - sent) / rate * 1.05)
            run = self.measure(
                server,
                "flood",
                seconds=max(1, seconds),
                mode="forged",
                env=env,
                expect_ok=False,
                retry=False,
            )
            sent += run.load.requests
            rate = run.load.requests_per_second
        return sent

    def _memory_step(self, server: Server, label: str, requests: int) -> dict[str, Any]:
        health = _get_json(server.url + HEALTH, headers=self.auth)
        return {
            "step": label,
            "requests": requests,
            "rss_bytes": server.process.resident_bytes(),
            "cache_entries": health["tokenCache"]["entries"],
        }

    def _workers(self) -> None:
        """One process against ``--workers 2``, with nothing pinned (indicative)."""
        print("process model (unpinned) ...", flush=True)
        both = f"{CLIENT_CORE},{SERVER_CORE}"
        servers = (
            (BARE, self.start_bare("bare-both", cores=both)),
            ("serve", self.start_service("one-worker", cores=both)),
            (
                "serve --workers 2",
                self.start_service("two-workers", workers=2, cores=both),
            ),
        )
        rows: dict[str, list[LoadResult]] = {label: [] for label, _ in servers}
        cpu: dict[str, list[float]] = {label: [] for label, _ in servers}
        for _ in range(2):
            for label, server in servers:
                server.process.check_alive()
                before = server.process.cpu_seconds()
                load = run_wrk(
                    server.url + TARGET,
                    cores=both,
                    connections=self.options.connections,
                    seconds=self.options.seconds,
                    headers=self.auth,
                )
                cpu[label].append(server.process.cpu_seconds() - before)
                rows[label].append(load)
        for label, loads in rows.items():
            self.results.workers.append(
                {
                    "server": label,
                    "requests_per_second": statistics.median(
                        run.requests_per_second for run in loads
                    ),
                    "p99_ms": statistics.median(run.p99_ms for run in loads),
                    "cpu_us_per_request": statistics.median(
                        seconds / max(1, run.requests) * 1e6
                        for seconds, run in zip(cpu[label], loads, strict=True)
                    ),
                }
            )
        for _, server in servers:
            server.process.stop()

    # -- verdict -------------------------------------------------------------------

    def _judge(self) -> None:
        results = self.results
        reused = results.summaries[REUSED]
        new = results.summaries[NEW]
        strict_reused = results.uvloop_summaries[REUSED]
        strict_new = results.uvloop_summaries[NEW]
        floor = results.summaries[FLOOR]
        targets = [
            Target(
                "reused token: req/s vs bare",
                f"{reused.rps_ratio:.2f}",
                ">= 0.85",
                reused.rps_ratio >= 0.85,
            ),
            Target(
                "reused token: p99 vs bare",
                f"{reused.p99_ratio:.2f}",
                "<= 1.5",
                reused.p99_ratio <= 1.5,
            ),
            Target(
                "new token: req/s vs bare",
                f"{new.rps_ratio:.2f}",
                ">= 0.5",
                new.rps_ratio >= 0.5,
            ),
        ]
        # Shown beside the targets, not counted in the exit status.
        targets += [
            Target(
                "reused token: req/s vs bare on uvloop",
                f"{strict_reused.rps_ratio:.2f}",
                ">= 0.85",
                strict_reused.rps_ratio >= 0.85,
                informational=True,
            ),
            Target(
                "reused token: p99 vs bare on uvloop",
                f"{strict_reused.p99_ratio:.2f}",
                "<= 1.5",
                strict_reused.p99_ratio <= 1.5,
                informational=True,
            ),
            Target(
                "new token: req/s vs bare on uvloop",
                f"{strict_new.rps_ratio:.2f}",
                ">= 0.5",
                strict_new.rps_ratio >= 0.5,
                informational=True,
            ),
            Target(
                "floor: bare + one RS256 verify, req/s vs bare",
                f"{floor.rps_ratio:.2f}",
                ">= 0.5 for the new-token target to be reachable",
                floor.rps_ratio >= 0.5,
                informational=True,
            ),
        ]
        cold = results.cold_start
        targets.append(
            Target(
                f"JWKS fetches, cold start, {cold['connections']} connections",
                f"{cold['jwks_fetches']}",
                "1",
                cold["jwks_fetches"] == 1 and cold["error_statuses"] == 0,
            )
        )
        # The same refusal with and without a token: had the token been
        # verified, the difference would be at least one RS256 verification.
        token_cost = statistics.median(results.token_cost_us)
        targets.append(
            Target(
                "no key: CPU a token adds, µs (median of pairs)",
                f"{token_cost:.1f}",
                f"< one RS256 verify ({results.verify_us:.0f})",
                token_cost < results.verify_us,
            )
        )
        alone = results.flood[0]["valid"].load.p99_ms
        for entry in results.flood[1:]:
            own = entry.get("alone")
            base = own.load.p99_ms if own is not None else alone
            ratio = entry["valid"].load.p99_ms / base
            targets.append(
                Target(
                    f"valid p99 beside {entry['case']}",
                    f"{ratio:.2f}x",
                    "<= 1.5x",
                    ratio <= 1.5,
                )
            )
        memory = results.memory
        final = memory["steps"][-1]["rss_bytes"]
        targets.append(
            Target(
                f"RSS after floods, TOKEN_CACHE_SIZE={memory['cache_size']}",
                f"{final / 2**20:.0f} MiB",
                f"<= {memory['cap_bytes'] / 2**20:.0f} MiB",
                final <= memory["cap_bytes"],
            )
        )
        results.targets = targets


# -- helpers -----------------------------------------------------------------------


def _base_env() -> dict[str, str]:
    # Nothing from the caller's shell (a TOKEN_CACHE_SIZE, a LOG_LEVEL) leaks in.
    keep = ("PATH", "HOME", "LANG", "LC_ALL", "TMPDIR", "VIRTUAL_ENV")
    return {name: os.environ[name] for name in keep if name in os.environ}


def _own_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _get_json(
    url: str, *, headers: Mapping[str, str] | None = None, timeout: float = 10
) -> Any:
    request = urllib.request.Request(url, headers=dict(headers or {}))  # noqa: S310
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return json.loads(response.read())


def _post_json(url: str, body: Mapping[str, Any], *, timeout: float = 10) -> Any:
    request = urllib.request.Request(  # noqa: S310
        url,
        data=json.dumps(body).encode(),
        headers={"Content-Type": "application/json"},
        method="POST",
    )
    with urllib.request.urlopen(request, timeout=timeout) as response:  # noqa: S310
        return json.loads(response.read())


def _expect(
    url: str, headers: Mapping[str, str], status: int, code: str | None
) -> None:
    """One request first, so each run is known to measure the path it names."""
    request = urllib.request.Request(url, headers=dict(headers))  # noqa: S310
    try:
        with urllib.request.urlopen(request, timeout=10) as response:  # noqa: S310
            got, body, challenge = response.status, json.loads(response.read()), None
    except urllib.error.HTTPError as err:
        got, body = err.code, json.loads(err.read())
        challenge = err.headers.get("WWW-Authenticate")
    if got != status or (code is not None and body.get("code") != code):
        raise RuntimeError(f"{url}: wanted {status} {code}, got {got} {body}")
    if status == 401 and not challenge:
        raise RuntimeError(f"{url}: a 401 without WWW-Authenticate")


def _forged_token(token: str, *, random_kid: bool = False) -> str:
    """The token with another signature (and, if asked, an unknown kid)."""
    header, payload, _ = token.split(".")
    if random_kid:
        kid = _b64url(os.urandom(20))
        header = _b64url(
            json.dumps({"typ": "JWT", "alg": "RS256", "kid": kid}).encode()
        )
    return f"{header}.{payload}.{_b64url(os.urandom(256))}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _machine() -> dict[str, str]:
    model = "unknown"
    for line in Path("/proc/cpuinfo").read_text(encoding="utf-8").splitlines():
        if line.startswith("model name"):
            model = line.split(":", 1)[1].strip()
            break
    import aiohttp

    from service.server import install_event_loop_policy

    wrk = subprocess.run(
        ["wrk", "--version"],  # noqa: S607
        capture_output=True,
        text=True,
        check=False,
    )
    return {
        "nproc": str(os.cpu_count()),
        "cpu": model,
        "kernel": platform.release(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "event_loop": install_event_loop_policy(),
        "wrk": (wrk.stdout or wrk.stderr).splitlines()[0]
        if wrk.stdout or wrk.stderr
        else "?",
    }


def _print_round(row: Mapping[str, Measurement]) -> None:
    bare = row[BARE].load.requests_per_second
    for regime, run in row.items():
        mark = f"  (taken on attempt {run.attempts})" if run.attempts > 1 else ""
        print(
            f"    {regime:30s} {run.load.requests_per_second:9.0f} req/s"
            f"  p99 {run.load.p99_ms:6.2f} ms  {run.cpu_us_per_request:6.1f} µs/req"
            f"  x{run.load.requests_per_second / bare:.2f}{mark}",
            flush=True,
        )


def _print_results(results: Results) -> None:
    machine = results.machine
    print()
    print(
        f"machine: {machine['nproc']} cores, {machine['cpu']},"
        f" Linux {machine['kernel']}, Python {machine['python']},"
        f" aiohttp {machine['aiohttp']},"
        f" {machine['event_loop']}, {machine['wrk']}"
    )
    print()
    rows = []
    for regime in REGIMES:
        s = results.summaries.get(regime)
        if s is None:
            continue
        uv = results.uvloop_summaries[regime]
        rows.append(
            [
                regime,
                f"{s.requests_per_second:,.0f}",
                f"{s.p50_ms:.2f}",
                f"{s.p99_ms:.2f}",
                f"{s.cpu_us_per_request:.1f}",
                f"{s.rps_ratio:.2f}",
                f"{s.p99_ratio:.2f}",
                f"{uv.rps_ratio:.2f}",
                f"{uv.p99_ratio:.2f}",
                f"{s.rounds}" + (f" ({s.disturbed} retried)" if s.disturbed else ""),
            ]
        )
    headers = [
        "regime",
        "req/s",
        "p50 ms",
        "p99 ms",
        "CPU µs/req",
        "req/s vs bare",
        "p99 vs bare",
        "req/s vs uvloop bare",
        "p99 vs uvloop bare",
        "rounds",
    ]
    print(format_table(headers, rows))
    bare_cpu = results.summaries[BARE].cpu_us_per_request
    client = statistics.median(r[BARE].load.client_busy for r in results.rounds)
    print(f"wrk kept its core {client:.0%} busy against bare aiohttp (below 100%:")
    print("the server, not the client, set the pace)")
    print()
    print(f"one RS256 verification in-process: {results.verify_us:.1f} µs")
    print(
        format_table(
            ["rejection", "code", "req/s", "CPU µs/req", "CPU over bare"],
            [
                [
                    r["case"],
                    r["code"],
                    f"{r['requests_per_second']:,.0f}",
                    f"{r['cpu_us_per_request']:.1f}",
                    f"{r['cpu_us_per_request'] - bare_cpu:+.1f}",
                ]
                for r in results.rejections
            ],
        )
    )
    pairs = ", ".join(f"{cost:+.1f}" for cost in results.token_cost_us)
    print(
        f"a token beside no key, per interleaved pair: {pairs} µs"
        f" (median {statistics.median(results.token_cost_us):+.1f})"
    )
    print()
    flood_rows = []
    for entry in results.flood:
        valid: Measurement = entry["valid"]
        flood: LoadResult | None = entry["flood"]
        # Against valid traffic alone on the same instance.
        alone: Measurement = entry.get("alone") or results.flood[0]["valid"]
        flood_rows.append(
            [
                entry["case"],
                f"{valid.load.requests_per_second:,.0f}",
                f"{valid.load.p99_ms:.2f}",
                f"{valid.load.p99_ms / alone.load.p99_ms:.2f}",
                "-" if flood is None else f"{flood.requests_per_second:,.0f}",
            ]
        )
    print(
        format_table(
            [
                "valid traffic",
                "valid req/s",
                "valid p99 ms",
                "p99 vs alone",
                "flood req/s",
            ],
            flood_rows,
        )
    )
    cold = results.cold_start
    print()
    fetches = f"{cold['discovery_fetches']} discovery, {cold['jwks_fetches']} JWKS"
    outcome = (
        f"{cold['requests']} requests, {cold['error_statuses']} error statuses,"
        f" {cold['timeouts']} timeouts, p99 {cold['p99_ms']:.0f} ms"
    )
    print(f"cold start under {cold['connections']} connections: fetches {fetches};")
    print(f"  {outcome} (the provider took 2 s to answer)")
    memory = results.memory
    print()
    print(
        format_table(
            [
                "memory (TOKEN_CACHE_SIZE=" + str(memory["cache_size"]) + ")",
                "RSS MiB",
                "entries",
            ],
            [
                [
                    step["step"],
                    f"{step['rss_bytes'] / 2**20:.1f}",
                    str(step["cache_entries"]),
                ]
                for step in memory["steps"]
            ],
        )
    )
    print(f"about {memory['per_entry_bytes'] / 1024:.1f} KiB of RSS per cached token")
    info = results.summaries.get(REUSED_INFO)
    reused = results.summaries[REUSED]
    if info is not None:
        print()
        extra = info.cpu_us_per_request - reused.cpu_us_per_request
        print(
            f"access lines at LOG_LEVEL=INFO: {extra:.0f}"
            f" µs of server CPU per request; req/s {info.rps_ratio:.2f} of bare"
            f" against {reused.rps_ratio:.2f} at WARNING"
        )
    if results.workers:
        print()
        print(
            format_table(
                ["process model (unpinned)", "req/s", "p99 ms", "CPU µs/req"],
                [
                    [
                        w["server"],
                        f"{w['requests_per_second']:,.0f}",
                        f"{w['p99_ms']:.2f}",
                        f"{w['cpu_us_per_request']:.1f}",
                    ]
                    for w in results.workers
                ],
            )
        )
    print()
    print(
        format_table(
            ["target", "measured", "wanted", "met"],
            [
                [
                    t.name,
                    t.measured,
                    t.wanted,
                    ("yes" if t.met else "no")
                    + (" (stricter view, not counted)" if t.informational else "")
                    if t.informational
                    else ("yes" if t.met else "NO"),
                ]
                for t in results.targets
            ],
        )
    )


def _results_json(results: Results) -> str:
    def plain(value: Any) -> Any:
        if isinstance(value, Measurement | LoadResult | RegimeSummary | Target):
            return plain(asdict(value))
        if isinstance(value, dict):
            return {str(k): plain(v) for k, v in value.items()}
        if isinstance(value, list | tuple):
            return [plain(v) for v in value]
        return value

    return json.dumps(plain(asdict(results)), indent=2)


if __name__ == "__main__":
    sys.exit(main())
