"""A bounded soak: mixed valid and hostile traffic against one real worker process.

About 12 seconds (and at most 30 000 requests) of traffic from 16 concurrent
clients: a quarter of it valid, the rest every kind of refusal the catalog
names, most with tokens never seen before (catalog R-10, R-11). Every valid
request must succeed, no answer may be a 5xx, and the worker's resident memory
must stay flat once warm: unique hostile tokens must not be remembered.
"""

from __future__ import annotations

import asyncio
import base64
import json
import random
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import aiohttp
import psutil
from multidict import CIMultiDict

from service.idp import LocalIdentityProvider
from tests.conftest import Credentials
from tests.raw_http import ServiceProcess, service_environment

HEALTH = "/api/v2/health"
WARM_UP_SECONDS = 3.0
MEASURED_SECONDS = 9.0
MAX_REQUESTS = 30_000
# The warm-up's share of the budget: a fast service would otherwise spend all of
# it warming up and leave the measured phase nothing.
MAX_WARM_UP_REQUESTS = MAX_REQUESTS // 4
CLIENTS = 16
# Generous: the point is "flat", not a budget. Python seldom returns memory, so
# a leak of a few hundred bytes per unique token would show as tens of MB here.
MAX_RSS_GROWTH = 25 * 1024 * 1024
VALID_ADDRESS = "192.0.2.10"
# Anonymous failures (no or a wrong key) count against their address and end in
# 429s; token attacks carry a valid key, so they come from addresses of their own
# and keep exercising the token checks for the whole run.
ANONYMOUS_ADDRESSES = [f"198.51.100.{n}" for n in range(1, 17)]
KEYED_ADDRESSES = [f"203.0.113.{n}" for n in range(1, 17)]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


@dataclass
class Traffic:
    """Builds each request of the mix; all tokens are made before the run."""

    idp: LocalIdentityProvider
    key: str
    valid_tokens: list[str]
    nested: str
    # Seeded: the mix, not its secrecy, matters; a failure replays alike.
    rng: random.Random = field(default_factory=lambda: random.Random(7))  # noqa: S311

    def _payload(self) -> str:
        return self.valid_tokens[0].split(".")[1]

    def valid(self) -> tuple[str, CIMultiDict[str]]:
        token = self.rng.choice(self.valid_tokens)
        return HEALTH, self._headers(token, self.key, VALID_ADDRESS)

    def _headers(
        self, token: str | None, key: str | None, address: str
    ) -> CIMultiDict[str]:
        headers: CIMultiDict[str] = CIMultiDict({"X-Forwarded-For": address})
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        if key is not None:
            headers["Ocp-Apim-Subscription-Key"] = key
        return headers

    def hostile(self) -> tuple[str, CIMultiDict[str]]:
        address = self.rng.choice(KEYED_ADDRESSES)
        anonymous = self.rng.choice(ANONYMOUS_ADDRESSES)
        unique = uuid.uuid4().hex
        kind = self.rng.randrange(9)
        valid = self.rng.choice(self.valid_tokens)
        head, _, signature = valid.split(".")
        if kind == 0:  # J-12: a kid nobody published, unique each time
            header = _b64(json.dumps({"alg": "RS256", "kid": unique}).encode())
            token = f"{header}.{self._payload()}.{'A' * 342}"
        elif kind == 1:  # J-03: the real kid, an edited payload
            token = f"{head}.{_b64(json.dumps({'sub': unique}).encode())}.{signature}"
        elif kind == 2:  # J-14: garbage of a token's shape
            token = f"{_b64(unique.encode())}.{_b64(unique.encode())}.{unique}"
        elif kind == 3:  # J-18: deep nesting under a real signature
            token = self.nested
        elif kind == 4:  # H-02: no key at all, anonymous
            return HEALTH, self._headers(valid, None, anonymous)
        elif kind == 5:  # H-16: a wrong key
            return HEALTH, self._headers(valid, unique, anonymous)
        elif kind == 6:  # H-09: credentials in the query
            return f"{HEALTH}?access_token={valid}", self._headers(
                valid, self.key, address
            )
        elif kind == 7:  # H-08: two Authorization headers
            headers = self._headers(valid, self.key, address)
            headers.add("Authorization", f"Bearer {unique}")
            return HEALTH, headers
        else:  # H-13: a header over the 16 KiB limit
            headers = self._headers(valid, self.key, address)
            headers["X-Padding"] = "p" * 17000
            return HEALTH, headers
        return HEALTH, self._headers(token, self.key, address)


def _traffic(idp: LocalIdentityProvider, key: str) -> Traffic:
    valid_tokens = [idp.mint_token() for _ in range(40)]
    header = json.dumps({"typ": "JWT", "alg": "RS256", "kid": idp.current_kid})
    nested = idp.sign_raw(header.encode(), b"[" * 3000 + b"]" * 3000)
    return Traffic(idp, key, valid_tokens, nested)


@dataclass
class Tally:
    valid: Counter[int] = field(default_factory=Counter)
    hostile: Counter[int] = field(default_factory=Counter)
    errors: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return sum(self.valid.values()) + sum(self.hostile.values())


async def _drive(
    session: aiohttp.ClientSession,
    traffic: Traffic,
    tally: Tally,
    until: Callable[[], bool],
    limit: int = MAX_REQUESTS,
) -> None:
    while not until() and tally.total < limit:
        is_valid = traffic.rng.random() < 0.25
        path, headers = traffic.valid() if is_valid else traffic.hostile()
        try:
            async with session.get(path, headers=headers) as response:
                await response.read()
                (tally.valid if is_valid else tally.hostile)[response.status] += 1
        except aiohttp.ClientError as err:
            tally.errors.append(f"{'valid' if is_valid else 'hostile'}: {err!r}")


async def test_mixed_traffic_soak_keeps_valid_requests_working_and_memory_flat(
    idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    env = service_environment(
        idp,
        key_store.store.path,
        LOG_LEVEL="WARNING",
        TRUSTED_PROXIES="127.0.0.1/32",
        JWKS_KID_COOLDOWN_SECONDS="1",
    )
    traffic = _traffic(idp, key_store.primary)
    tally = Tally()
    async with ServiceProcess(env) as process:
        worker = psutil.Process(process.pid)
        connector = aiohttp.TCPConnector(limit=CLIENTS)
        async with aiohttp.ClientSession(process.url, connector=connector) as session:
            started = time.monotonic()

            def warm() -> bool:
                return time.monotonic() - started > WARM_UP_SECONDS

            await asyncio.gather(
                *(
                    _drive(session, traffic, tally, warm, MAX_WARM_UP_REQUESTS)
                    for _ in range(CLIENTS)
                )
            )
            warm_rss = worker.memory_info().rss
            warm_total = tally.total

            def done() -> bool:
                return time.monotonic() - started > WARM_UP_SECONDS + MEASURED_SECONDS

            await asyncio.gather(
                *(_drive(session, traffic, tally, done) for _ in range(CLIENTS))
            )
            end_rss = worker.memory_info().rss
        assert worker.is_running()
        code = await process.stop()

    assert tally.errors == []
    assert set(tally.valid) == {200}, tally.valid
    assert tally.total - warm_total > 2000, "the soak sent too little to mean much"
    assert not any(status >= 500 for status in tally.hostile), tally.hostile
    # Every hostile kind was refused, none admitted.
    assert 200 not in tally.hostile
    assert end_rss - warm_rss < MAX_RSS_GROWTH, (warm_rss, end_rss)
    assert code == 0
    assert _unexpected_errors(process.output) == []


def _unexpected_errors(output: str) -> list[str]:
    """Error lines other than aiohttp's parser refusals (the 431s of the mix)."""
    unexpected = []
    for line in output.splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            # Not a log line: the start-up banner, or anything raw on stderr.
            if "listening on" not in line:
                unexpected.append(line)
            continue
        expected = record.get("logger") == "aiohttp.server" and "LineTooLong" in str(
            record.get("exc", "")
        )
        if record.get("level") in ("ERROR", "CRITICAL") and not expected:
            unexpected.append(line[:500])
    return unexpected
