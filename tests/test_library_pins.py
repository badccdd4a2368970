"""Pins for the library traps of the security catalog (section 5).

Most tests have two halves. The first shows the library still behaves as the
catalog reproduced it (python-jose 3.5.0, aiohttp 3.14.5, CPython 3.11). When an
upstream release changes that, the first half fails: the library got safer, so
delete that half and keep the second. The second half shows the service refuses
the same input whatever the library does, so it fails if our own defence goes.
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import time
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import web
from aiohttp.test_utils import make_mocked_request
from aiohttp.web_log import AccessLogger
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from jose import jwk, jwt
from jose.backends import RSAKey
from jose.backends.cryptography_backend import CryptographyRSAKey
from jose.exceptions import JOSEError, JWKError, JWTError

from service.appkeys import JWKS, SETTINGS
from service.idp import LocalIdentityProvider
from service.jose_backend import ensure_cryptography_backend
from service.jwks import build_key_set
from service.keystore import KeyStoreFile
from tests.conftest import Credentials, MakeClient, auth_headers, settings_for
from tests.raw_http import (
    LiveService,
    RawServer,
    build_request,
)

REALM = 'Bearer realm="rag-api"'
HEALTH = "/api/v2/health"
P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


@dataclass(frozen=True)
class Service:
    """The shared app and IdP, and the calls the pins make on them."""

    live: LiveService
    key: str

    @property
    def idp(self) -> LocalIdentityProvider:
        return self.live.idp

    @property
    def jwk(self) -> dict[str, Any]:
        return dict(self.idp.jwks()["keys"][0])

    def claims(self, **changes: Any) -> dict[str, Any]:
        payload = json.loads(_unb64(self.idp.mint_token().split(".")[1]))
        payload.update(changes)
        return dict(payload)

    def header(self, **changes: Any) -> dict[str, Any]:
        return {"typ": "JWT", "alg": "RS256", "kid": self.idp.current_kid, **changes}

    def jose_decode(self, token: str, key: Any = None, **options: Any) -> Any:
        """python-jose as a naive wrapper would call it."""
        options.setdefault("algorithms", ["RS256"])
        if options["algorithms"] is None:
            del options["algorithms"]
        return jwt.decode(
            token,
            self.jwk if key is None else key,
            audience=self.idp.audience,
            **options,
        )

    async def refusal(self, token: str, status: int = 401) -> tuple[str, str | None]:
        """The service's answer: its code and challenge, after checking the status."""
        async with aiohttp.ClientSession(base_url=self.live.url) as session:
            response = await session.get(HEALTH, headers=auth_headers(token, self.key))
            body = await response.json()
        assert response.status == status, body
        assert response.headers["Cache-Control"] == "no-store"
        return body["code"], response.headers.get("WWW-Authenticate")


@pytest.fixture(scope="module")
def service(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    store = KeyStoreFile(tmp_path_factory.mktemp("pins") / "keys.json")
    issued = store.add("contoso", "starter")
    live = LiveService(store.path, settings_for).start()
    try:
        yield Service(live, issued.primary)
    finally:
        live.stop()


def _invalid_token(code: str, challenge: str | None) -> None:
    assert challenge is not None
    assert challenge.startswith(f'{REALM}, error="invalid_token"'), (code, challenge)


def _signed(service: Service, payload: bytes, header: bytes | None = None) -> str:
    head = header if header is not None else json.dumps(service.header()).encode()
    return service.idp.sign_raw(head, payload)


def _payload_with(service: Service, member: bytes, drop: str) -> bytes:
    claims = service.claims()
    del claims[drop]
    return json.dumps(claims).encode()[:-1] + b"," + member + b"}"


# --- python-jose 3.5.0: claims -----------------------------------------------------


async def test_missing_exp_python_jose_accepts_and_the_service_refuses(
    service: Service,
) -> None:
    """J-30: python-jose's ``require_exp`` defaults to False."""
    token = service.idp.mint_token(drop=("exp",))
    assert "exp" not in service.jose_decode(token)

    code, challenge = await service.refusal(token)
    assert code == "TokenClaimInvalid"
    _invalid_token(code, challenge)


async def test_missing_aud_python_jose_accepts_despite_audience_and_the_service_refuses(
    service: Service,
) -> None:
    """J-40: ``audience=`` is passed, yet a token without ``aud`` passes python-jose."""
    token = service.idp.mint_token(drop=("aud",))
    assert "aud" not in service.jose_decode(token)

    code, challenge = await service.refusal(token)
    assert code == "TokenAudienceNotAllowed"
    _invalid_token(code, challenge)


@pytest.mark.parametrize(
    ("member", "upstream", "ours"),
    [
        pytest.param(
            b'"exp":"%d"' % (time.time() + 600),
            None,
            "TokenClaimInvalid",
            id="J-31-numeric-string-accepted",
        ),
        pytest.param(b'"exp":null', TypeError, "TokenClaimInvalid", id="J-31-null"),
        pytest.param(b'"exp":[1]', TypeError, "TokenClaimInvalid", id="J-31-array"),
        pytest.param(
            b'"exp":Infinity', OverflowError, "TokenInvalid", id="J-16-Infinity"
        ),
        pytest.param(
            b'"exp":1e400', OverflowError, "TokenClaimInvalid", id="J-16-1e400"
        ),
    ],
)
async def test_odd_exp_python_jose_accepts_or_crashes_outside_its_errors_and_we_refuse(
    service: Service,
    member: bytes,
    upstream: type[Exception] | None,
    ours: str,
) -> None:
    """J-31 / J-16: TypeError and OverflowError are no JOSEError: a handler that
    catches JOSE errors only answers 500."""
    token = _signed(service, _payload_with(service, member, "exp"))
    if upstream is None:
        assert service.jose_decode(token)["exp"] == member.split(b'"')[3].decode()
    else:
        with pytest.raises(upstream) as raised:
            service.jose_decode(token)
        assert not isinstance(raised.value, JOSEError)

    code, challenge = await service.refusal(token)
    assert code == ours
    _invalid_token(code, challenge)


def _jose_accepts_exp_equal_to_now(service: Service) -> int:
    # python-jose reads its own clock: retry when the second ticks in between.
    for _ in range(5):
        now = int(time.time())
        token = service.idp.mint_token(claims={"exp": now, "iat": now - 60})
        try:
            service.jose_decode(token)
        except JWTError:
            if int(time.time()) != now:
                continue
            raise
        return now
    raise AssertionError("the clock kept ticking between signing and decoding")


async def test_exp_equal_to_now_python_jose_accepts_and_the_service_refuses(
    service: Service,
    make_client: MakeClient,
    idp: LocalIdentityProvider,
    key_store: Credentials,
) -> None:
    """J-32: RFC 7519 §4.1.4 says not *on or after* exp; python-jose is off by one."""
    _jose_accepts_exp_equal_to_now(service)

    now = float(int(time.time()))
    client = await make_client(clock_skew_seconds=0, app_kwargs={"clock": lambda: now})
    token = idp.mint_token(claims={"exp": now, "iat": now - 60, "nbf": now - 60})
    response = await client.get(HEALTH, headers=auth_headers(token, key_store.primary))
    assert response.status == 401
    assert (await response.json())["code"] == "TokenExpired"


async def test_far_future_iat_python_jose_accepts_and_the_service_refuses(
    service: Service,
) -> None:
    """J-34: python-jose only checks that ``iat`` converts to an integer."""
    token = service.idp.mint_token(claims={"iat": int(time.time()) + 10**6})
    assert service.jose_decode(token)

    code, challenge = await service.refusal(token)
    assert code == "TokenNotYetValid"
    _invalid_token(code, challenge)


# --- python-jose 3.5.0: header and structure --------------------------------------


async def test_unknown_crit_python_jose_ignores_and_the_service_refuses(
    service: Service,
) -> None:
    """J-19, mpdavis/python-jose #413: RFC 7515 §4.1.11 says MUST reject."""
    token = service.idp.mint_token(header={"crit": ["x-unknown"], "x-unknown": 1})
    assert service.jose_decode(token)

    code, challenge = await service.refusal(token)
    assert code == "TokenInvalid"
    _invalid_token(code, challenge)


async def test_duplicate_header_names_python_jose_takes_the_last_and_we_refuse(
    service: Service,
) -> None:
    """J-17: parsers disagree on which duplicate wins (RFC 8725 §3.7)."""
    kid = service.idp.current_kid.encode()
    header = b'{"alg":"none","alg":"RS256","kid":"%s"}' % kid
    token = _signed(service, json.dumps(service.claims()).encode(), header)
    assert service.jose_decode(token)

    code, challenge = await service.refusal(token)
    assert code == "TokenInvalid"
    _invalid_token(code, challenge)


async def test_deeply_nested_json_python_jose_raises_recursion_error_and_we_refuse(
    service: Service,
) -> None:
    """J-18: a bare RecursionError before any signature check, 500 if unhandled."""
    deep = b"[" * 2000 + b"]" * 2000
    header_token = _signed(service, json.dumps(service.claims()).encode(), deep)
    with pytest.raises(RecursionError):
        service.jose_decode(header_token)

    # Ours refuses the header by size first; the payload is parsed after the
    # signature, so nest there to reach our own JSON reader.
    payload_token = _signed(service, b"[" * 5000 + b"]" * 5000)
    for token in (header_token, payload_token):
        code, challenge = await service.refusal(token)
        assert code == "TokenInvalid"
        _invalid_token(code, challenge)


def _unsigned(service: Service, alg: str, signature: str = "AAAA") -> str:
    header = _b64(json.dumps({"alg": alg, "typ": "JWT"}).encode())
    return f"{header}.{_b64(json.dumps(service.claims()).encode())}.{signature}"


async def test_algorithms_omitted_or_a_string_python_jose_leaves_the_jwt_error_tree(
    service: Service,
) -> None:
    """J-01 / J-04: without ``algorithms`` alg:none raises JWKError, not JWTError;
    ``algorithms="RS256"`` is a substring test that lets ``alg: S256`` through."""
    none_token = _unsigned(service, "none", signature="")
    s256_token = _unsigned(service, "S256")
    for token, algorithms in ((none_token, None), (s256_token, "RS256")):
        with pytest.raises(JWKError) as raised:
            service.jose_decode(token, algorithms=algorithms)
        assert not isinstance(raised.value, JWTError)
    # With a list, the alg check itself refuses S256, inside the JWT tree.
    with pytest.raises(JWTError, match="not allowed"):
        service.jose_decode(s256_token)

    for token in (none_token + "AAAA", s256_token):
        code, challenge = await service.refusal(token)
        assert code == "TokenInvalid"
        _invalid_token(code, challenge)


def _hs256(service: Service, secret: bytes) -> str:
    signing_input = (
        f"{_b64(json.dumps({'alg': 'HS256', 'typ': 'JWT'}).encode())}."
        f"{_b64(json.dumps(service.claims()).encode())}"
    )
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{_b64(mac)}"


def _published_der(service: Service) -> bytes:
    numbers = rsa.RSAPublicNumbers(
        int.from_bytes(_unb64(service.jwk["e"]), "big"),
        int.from_bytes(_unb64(service.jwk["n"]), "big"),
    )
    return numbers.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def test_der_key_confusion_python_jose_accepts_and_the_service_refuses(
    service: Service,
) -> None:
    """J-04, mpdavis/python-jose #398: the CVE-2024-33663 fix blocks PEM and
    OpenSSH keys as HMAC secrets, not DER bytes."""
    der = _published_der(service)
    token = _hs256(service, der)
    assert service.jose_decode(token, key=der, algorithms=None)
    assert service.jose_decode(token, key=der, algorithms=["HS256"])

    code, challenge = await service.refusal(token)
    assert code == "TokenInvalid"
    _invalid_token(code, challenge)


async def test_empty_hmac_key_python_jose_accepts_and_the_service_refuses(
    service: Service,
) -> None:
    """J-05 / J-10: a MAC under the empty key verifies in python-jose."""
    token = _hs256(service, b"")
    assert service.jose_decode(token, key="", algorithms=["HS256"])

    code, challenge = await service.refusal(token)
    assert code == "TokenInvalid"
    _invalid_token(code, challenge)


async def test_whole_jwks_python_jose_ignores_the_kid_and_the_service_does_not(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    """J-13: handed the key set, python-jose tries every key, so a token without
    kid and one whose kid names another key both pass."""
    first = idp.current_kid
    second = idp.rotate_key()
    no_kid = idp.mint_token(drop_header=("kid",))
    wrong_kid = idp.mint_token(kid=second, header={"kid": first})
    for token in (no_kid, wrong_kid):
        assert jwt.decode(
            token, idp.jwks(), algorithms=["RS256"], audience=idp.audience
        )

    client = await make_client()
    assert await client.app[JWKS].refresh_now()
    codes = []
    for token in (no_kid, wrong_kid):
        response = await client.get(
            HEALTH, headers=auth_headers(token, key_store.primary)
        )
        assert response.status == 401
        codes.append((await response.json())["code"])
    assert codes == ["TokenInvalid", "TokenSignatureInvalid"]


def _flip_last_unused_bit(segment: str) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return segment[:-1] + alphabet[alphabet.index(segment[-1]) ^ 1]


async def test_non_canonical_base64_python_jose_accepts_and_the_service_refuses(
    service: Service,
) -> None:
    """J-15: one token, many spellings; each would be a separate cache entry."""
    token = service.idp.mint_token()
    head, body, signature = token.split(".")
    assert len(signature) % 4, "a 2048-bit signature has unused bits"
    spellings = [
        token + "==",
        f"{head}.{body}.{signature[:8]}%%%%{signature[8:]}",
        f"{head}.{body}.{_flip_last_unused_bit(signature)}",
    ]
    for spelling in spellings:
        assert service.jose_decode(spelling)

    for spelling in spellings:
        code, challenge = await service.refusal(spelling)
        assert code == "TokenInvalid"
        _invalid_token(code, challenge)


async def test_embedded_jwk_and_jwe_python_jose_refuses_and_so_do_we(
    service: Service,
) -> None:
    """J-08 / J-21: python-jose ignores ``jwk`` and does not decrypt; kept so a
    regression (or a library switch) shows."""
    attacker = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    numbers = attacker.public_key().public_numbers()
    embedded = {
        "kty": "RSA",
        "n": _b64(numbers.n.to_bytes(256, "big")),
        "e": _b64(numbers.e.to_bytes(3, "big")),
    }
    pem = attacker.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    forged = jwt.encode(
        service.claims(),
        pem.decode(),
        algorithm="RS256",
        headers={"kid": service.idp.current_kid, "jwk": embedded},
    )
    jwe_shaped = service.idp.mint_token() + ".AAAA.AAAA"
    for token in (forged, jwe_shaped):
        with pytest.raises(JWTError):
            service.jose_decode(token)

    for token in (forged, jwe_shaped):
        code, challenge = await service.refusal(token)
        assert code == "TokenInvalid"
        _invalid_token(code, challenge)


async def test_psychic_ecdsa_signature_is_refused_by_the_backend_and_by_us(
    service: Service,
) -> None:
    """J-07, CVE-2022-21449: with ES256 allowed, python-jose's cryptography backend
    refuses r = s = 0 and r = s = n; we never allow ES256 at all."""
    key = ec.generate_private_key(ec.SECP256R1())
    numbers = key.public_key().public_numbers()
    public = jwk.construct(
        {
            "kty": "EC",
            "crv": "P-256",
            "x": _b64(numbers.x.to_bytes(32, "big")),
            "y": _b64(numbers.y.to_bytes(32, "big")),
        },
        "ES256",
    )
    for signature in (bytes(64), P256_ORDER.to_bytes(32, "big") * 2):
        assert not public.verify(b"header.payload", signature)

    header = _b64(json.dumps(service.header(alg="ES256")).encode())
    body = _b64(json.dumps(service.claims()).encode())
    code, challenge = await service.refusal(f"{header}.{body}.{_b64(bytes(64))}")
    assert code == "TokenInvalid"
    _invalid_token(code, challenge)


# --- build-time checks -------------------------------------------------------------


def test_python_jose_is_at_least_3_4_with_its_cryptography_backend() -> None:
    """J-05: CVE-2024-33663 / CVE-2024-33664 are fixed in 3.4.0; without
    ``cryptography`` python-jose silently verifies with pure-Python backends."""
    version = tuple(
        int(part) for part in metadata.version("python-jose").split(".")[:2]
    )
    assert version >= (3, 4)
    assert RSAKey is CryptographyRSAKey
    assert ensure_cryptography_backend() == "cryptography"


def test_keys_the_cache_builds_are_cryptography_keys(
    idp: LocalIdentityProvider,
) -> None:
    keys = build_key_set(idp.jwks())
    assert keys
    assert all(isinstance(key, CryptographyRSAKey) for key in keys.values())


# --- aiohttp 3.14.5 ------------------------------------------------------------------


@pytest_asyncio.fixture
async def echo_server() -> AsyncIterator[RawServer]:
    """A bare aiohttp app (none of ours) that shows how aiohttp hands headers over."""

    async def echo(request: web.Request) -> web.Response:
        return web.json_response(
            {
                "get": ascii(request.headers.get("X-Probe")),
                "getall": [ascii(v) for v in request.headers.getall("X-Probe", [])],
            }
        )

    app = web.Application()
    app.router.add_get("/", echo)
    # aiohttp's own runner, as a naive deployment would use it.
    runner = web.AppRunner(app, max_line_size=16384, max_field_size=16384)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        yield RawServer("127.0.0.1", int(runner.addresses[0][1]))
    finally:
        await runner.cleanup()


async def test_duplicate_headers_aiohttp_get_returns_the_first_and_we_refuse(
    echo_server: RawServer, service: Service
) -> None:
    """H-08: ``headers.get()`` silently takes the first of two."""
    probe = [("X-Probe", "first"), ("X-Probe", "second")]
    echoed = (await echo_server.send(build_request("GET", "/", probe))).json()
    assert echoed == {"get": "'first'", "getall": ["'first'", "'second'"]}

    token = service.idp.mint_token()
    headers = [
        ("Authorization", f"Bearer {token}"),
        ("Authorization", f"Bearer {token}"),
        ("Ocp-Apim-Subscription-Key", service.key),
    ]
    response = await service.live.server.send(build_request("GET", HEALTH, headers))
    assert response.status == 400
    assert response.json()["code"] == "AmbiguousCredentials"


async def test_header_bytes_aiohttp_decodes_with_surrogateescape_and_we_compare_bytes(
    echo_server: RawServer, service: Service
) -> None:
    """H-11: a non-UTF-8 byte becomes a lone surrogate; compared as ``str`` with
    ``hmac.compare_digest`` it would raise TypeError (CPython 3.11), a 500."""
    probe = [("X-Probe", b"\xffkey")]
    echoed = (await echo_server.send(build_request("GET", "/", probe))).json()
    assert echoed["get"] == "'\\udcffkey'"
    with pytest.raises(TypeError):
        hmac.compare_digest("\udcffkey", "0" * 32)

    headers: list[tuple[str | bytes, str | bytes]] = [
        ("Authorization", f"Bearer {service.idp.mint_token()}"),
        ("Ocp-Apim-Subscription-Key", b"\xff" + service.key.encode()[1:]),
    ]
    response = await service.live.server.send(build_request("GET", HEALTH, headers))
    assert response.status == 401
    assert response.json()["code"] == "SubscriptionKeyInvalid"


async def test_header_whitespace_aiohttp_trims_and_we_never_keep_spaces_in_the_token(
    echo_server: RawServer, service: Service
) -> None:
    """H-07: leading and trailing whitespace of a value is gone before we see it;
    the spaces after the scheme are ours to skip, never part of the token."""
    probe = [("X-Probe", "  padded\t ")]
    echoed = (await echo_server.send(build_request("GET", "/", probe))).json()
    assert echoed["get"] == "'padded'"

    token = service.idp.mint_token()
    headers = [
        ("Authorization", f"  Bearer    {token}  "),
        ("Ocp-Apim-Subscription-Key", service.key),
    ]
    response = await service.live.server.send(
        build_request("GET", "/api/v2/whoami", headers)
    )
    assert response.status == 200


async def test_parser_errors_aiohttp_echoes_the_header_line_and_our_runner_does_not(
    echo_server: RawServer, service: Service
) -> None:
    """H-12 / H-13: aiohttp's 400 page quotes the offending line, token and all
    (over-long values: their first 100 bytes). Production serves through
    ``SafeAppRunner``, whose fixed body quotes nothing; the log side is
    tests/test_canary.py."""
    token = service.idp.mint_token()
    control = build_request("GET", "/", [("Authorization", f"Bearer {token}\x01")])
    too_long = build_request(
        "GET", "/", [("Authorization", f"Bearer {token}" + "A" * 16384)]
    )
    echoed = await echo_server.send(control)
    clipped = await echo_server.send(too_long)
    assert echoed.status == clipped.status == 400
    assert token.split(".")[1].encode() in echoed.body
    assert f"Bearer {token[:80]}".encode() in clipped.body

    ours = [await service.live.server.send(r) for r in (control, too_long)]
    assert [r.status for r in ours] == [400, 431]
    for response in ours:
        assert all(part.encode() not in response.body for part in token.split("."))
        assert response.json()["code"] in ("BadRequest", "RequestHeaderFieldsTooLarge")


async def test_access_log_aiohttp_writes_the_query_string_and_ours_does_not(
    service: Service, caplog: pytest.LogCaptureFixture
) -> None:
    """H-09 / L-02: the default access log format logs the request line (%r),
    query string included; ours logs the path with credential values redacted."""
    records: list[logging.LogRecord] = []

    class Keep(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            records.append(record)

    logger = logging.getLogger("tests.pins.access")
    keep = Keep()
    logger.addHandler(keep)
    logger.setLevel(logging.INFO)
    logger.propagate = False
    try:
        access = AccessLogger(logger, AccessLogger.LOG_FORMAT)
        request = make_mocked_request("GET", f"{HEALTH}?access_token=eyJ.canary")
        access.log(request, web.Response(), 0.001)
    finally:
        logger.removeHandler(keep)
    assert "access_token=eyJ.canary" in records[0].getMessage()

    caplog.set_level(logging.INFO, logger="rag_api_core.access")
    token = service.idp.mint_token()
    target = f"{HEALTH}?access_token={token}"
    response = await service.live.server.send(build_request("GET", target, []))
    assert response.status == 400
    # aiohttp writes the access line once the response is out: wait for it.
    for _ in range(100):
        lines = [r for r in caplog.records if r.name == "rag_api_core.access"]
        if lines:
            break
        await asyncio.sleep(0.01)
    assert lines
    assert all(token.split(".")[1] not in str(r.__dict__) for r in lines)


def test_default_client_timeout_aiohttp_is_300_seconds() -> None:
    """R-03: the service's own timeouts are tested in tests/test_faults.py."""
    assert aiohttp.client.DEFAULT_TIMEOUT.total == 300


async def test_aiohttp_routes_keep_their_handler_in_handler_which_the_gate_replaces(
    make_client: MakeClient,
) -> None:
    """The gate wraps each route at start-up by setting ``route._handler`` (aiohttp
    has no public way); were the attribute renamed, routes would be unguarded."""

    async def plain(request: web.Request) -> web.Response:
        return web.json_response({"reached": True})

    bare = web.Application()
    route = bare.router.add_get("/probe", plain)
    assert route.handler is plain and route._handler is plain  # aiohttp's layout
    client = await make_client(routes=[("/probe", plain)])
    routes = client.app.router.routes()
    guarded = [r for r in routes if r.resource and r.resource.canonical == "/probe"]
    assert guarded and all(r.handler is not plain for r in guarded)
    assert all(getattr(r.handler, "__wrapped__", None) is plain for r in guarded)
    response = await client.get("/probe")
    assert response.status == 401  # reached the gate, not the handler


async def test_aiohttp_runs_start_up_hooks_before_freezing_so_late_routes_fail_loudly(
    make_client: MakeClient,
) -> None:
    """A route added by a later start-up hook would miss the gate: the gate freezes
    the router, so adding one raises at start-up instead of serving it open."""
    from service.app import create_app

    async def late(app: web.Application) -> None:
        app.router.add_get("/late", late_handler)

    async def late_handler(request: web.Request) -> web.Response:
        return web.json_response({"open": True})

    client = await make_client()
    app = create_app(client.app[SETTINGS])
    app.on_startup.append(late)
    runner = web.AppRunner(app)
    with pytest.raises(RuntimeError, match="frozen"):
        await runner.setup()
    await runner.cleanup()
