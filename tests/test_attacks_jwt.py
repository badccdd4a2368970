"""JWT attacks of the security catalog (section 1), against the real app and IdP.

Each case is a parametrized test whose id names the catalog row and the advisory
or RFC behind it. Every rejection asserts status, body code and the challenge;
"no fetch" cases also assert the identity provider saw no request.
"""

from __future__ import annotations

import base64
import datetime as dt
import functools
import hashlib
import hmac
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
from aiohttp import ClientResponse, web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, padding, rsa
from cryptography.hazmat.primitives.asymmetric.utils import decode_dss_signature
from cryptography.x509.oid import NameOID
from multidict import CIMultiDict, CIMultiDictProxy, MultiDict, MultiDictProxy

from service.app import create_app
from service.appkeys import JWKS
from service.idp import FOREIGN_TENANT_ID, LocalIdentityProvider
from service.keystore import KeyStoreFile
from service.policy import requires
from service.server import runner_options
from tests.conftest import (
    AppClient,
    Credentials,
    MakeClient,
    auth_headers,
    settings_for,
)
from tests.raw_http import LiveService
from validators import AuthContext, BearerTokenValidator, TokenInvalid

REALM = 'Bearer realm="rag-api"'
GRAPH_APP_ID = "00000003-0000-0000-c000-000000000000"
MSA_TENANT_ID = "9188040d-6c67-4c5b-b112-36a304b66dad"
# Records that mean an unhandled path ran, even if the client saw a 4xx.
_CRASH_MESSAGES = frozenset({"auth.validator_crashed", "request.failed"})

Json = Any
Signer = Callable[[bytes], bytes]


# --- keys and tokens built at test time ----------------------------------------


@dataclass(frozen=True)
class Attacker:
    """Keys the attacker owns: none of them is published by the identity provider."""

    rsa_key: rsa.RSAPrivateKey
    short_rsa: rsa.RSAPrivateKey
    p256: ec.EllipticCurvePrivateKey
    secp256k1: ec.EllipticCurvePrivateKey
    ed25519: ed25519.Ed25519PrivateKey
    certificate_der: bytes


@pytest.fixture(scope="module")
def attacker() -> Attacker:
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Attacker(
        rsa_key=key,
        # Too short on purpose: J-13d plants it in the key set.
        short_rsa=rsa.generate_private_key(65537, key_size=1024),  # noqa: S505
        p256=ec.generate_private_key(ec.SECP256R1()),
        secp256k1=ec.generate_private_key(ec.SECP256K1()),
        ed25519=ed25519.Ed25519PrivateKey.generate(),
        certificate_der=_self_signed(key),
    )


def _self_signed(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "attacker")])
    now = dt.datetime.now(dt.UTC)
    certificate = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=30))
        .sign(key, hashes.SHA256())
    )
    return certificate.public_bytes(serialization.Encoding.DER)


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _unb64(segment: str) -> bytes:
    return base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4))


def _json(value: Json) -> bytes:
    # Bytes pass through untouched: the cases with odd JSON bring their own.
    if isinstance(value, bytes):
        return value
    return json.dumps(value, separators=(",", ":")).encode()


def _rsa_signer(key: rsa.RSAPrivateKey, digest: hashes.HashAlgorithm) -> Signer:
    return lambda data: key.sign(data, padding.PKCS1v15(), digest)


def _pss_signer(key: rsa.RSAPrivateKey, digest: hashes.HashAlgorithm) -> Signer:
    pss = padding.PSS(mgf=padding.MGF1(digest), salt_length=padding.PSS.DIGEST_LENGTH)
    return lambda data: key.sign(data, pss, digest)


def _ecdsa_signer(key: ec.EllipticCurvePrivateKey) -> Signer:
    def sign(data: bytes) -> bytes:
        r, s = decode_dss_signature(key.sign(data, ec.ECDSA(hashes.SHA256())))
        return r.to_bytes(32, "big") + s.to_bytes(32, "big")

    return sign


def _hmac_signer(secret: bytes, digest: str = "sha256") -> Signer:
    return lambda data: hmac.new(secret, data, digest).digest()


@dataclass(frozen=True)
class Forge:
    """Builds tokens for one test: valid claims of our API, any header, any signer."""

    idp: LocalIdentityProvider
    attacker: Attacker

    @property
    def kid(self) -> str:
        return self.idp.current_kid

    def header(self, **changes: Json) -> dict[str, Json]:
        return {"typ": "JWT", "alg": "RS256", "kid": self.kid, **changes}

    def claims(self, **changes: Json) -> dict[str, Json]:
        payload = json.loads(_unb64(self.idp.mint_token().split(".")[1]))
        payload.update(changes)
        return dict(payload)

    def signed(self, header: Json, payload: Json, sign: Signer) -> str:
        signing_input = f"{_b64(_json(header))}.{_b64(_json(payload))}"
        return f"{signing_input}.{_b64(sign(signing_input.encode('ascii')))}"

    def by_idp(self, header: Json = None, payload: Json = None) -> str:
        """Signed for real by the identity provider's current key."""
        head = self.header() if header is None else header
        body = self.claims() if payload is None else payload
        return self.idp.sign_raw(_json(head), _json(body))

    def by_attacker(self, header: Json = None, payload: Json = None) -> str:
        """RS256 by the attacker's RSA key, under the published ``kid``."""
        head = self.header() if header is None else header
        body = self.claims() if payload is None else payload
        return self.signed(
            head, body, _rsa_signer(self.attacker.rsa_key, hashes.SHA256())
        )

    def unsigned(self, header: Json, signature: str = "") -> str:
        return f"{_b64(_json(header))}.{_b64(_json(self.claims()))}.{signature}"

    def published_public_key(self) -> rsa.RSAPublicKey:
        jwk = self.idp.jwks()["keys"][0]
        numbers = rsa.RSAPublicNumbers(
            int.from_bytes(_unb64(jwk["e"]), "big"),
            int.from_bytes(_unb64(jwk["n"]), "big"),
        )
        return numbers.public_key()


Build = Callable[[Forge], str]


# --- the service under attack ----------------------------------------------------


@pytest_asyncio.fixture
async def make_client(
    aiohttp_server: Any,
    aiohttp_client: Any,
    idp: LocalIdentityProvider,
    key_store: Credentials,
) -> MakeClient:
    """conftest's factory, but served with production's header limits.

    ``aiohttp_client(app, server_kwargs=...)`` drops those kwargs (``TestServer``
    ignores what its constructor does not name); ``aiohttp_server`` hands them
    to the runner, so a 12 KB Entra token fits as it does in production.
    """

    async def make(**changes: Any) -> AppClient:
        app_kwargs = changes.pop("app_kwargs", {})
        routes = changes.pop("routes", ())
        settings = settings_for(idp, key_store.store.path, **changes)
        app = create_app(settings, **app_kwargs)
        for path, handler in routes:
            app.router.add_get(path, handler)
        server = await aiohttp_server(app, **runner_options(settings.max_header_bytes))
        client: AppClient = await aiohttp_client(server)
        return client

    return make


@dataclass
class Api:
    """The running app with a warm key cache, and what the IdP has served so far."""

    get: Callable[..., Awaitable[ClientResponse]]
    idp: LocalIdentityProvider
    key: str
    forge: Forge
    refresh: Callable[[], Awaitable[bool]]

    async def send(self, token: str, path: str = "/api/v2/health") -> ClientResponse:
        return await self.get(path, headers=auth_headers(token, self.key))

    @property
    def fetches(self) -> int:
        return self.idp.hits["discovery"] + self.idp.hits["jwks"]

    async def assert_still_admits(self) -> None:
        assert (await self.send(self.idp.mint_token())).status == 200


def _client_api(
    client: AppClient, idp: LocalIdentityProvider, key: str, attacker: Attacker
) -> Api:
    return Api(client.get, idp, key, Forge(idp, attacker), client.app[JWKS].refresh_now)


@dataclass(frozen=True)
class SharedService:
    service: LiveService
    key: str


@pytest.fixture(scope="module")
def shared(tmp_path_factory: pytest.TempPathFactory) -> Iterator[SharedService]:
    """One service for the cases that change nothing in it: a fresh app and IdP
    per case would spend most of this file's time generating RSA keys."""
    store = KeyStoreFile(tmp_path_factory.mktemp("attacks") / "keys.json")
    issued = store.add("contoso", "starter")
    service = LiveService(store.path, settings_for).start()
    try:
        yield SharedService(service, issued.primary)
    finally:
        service.stop()


@pytest_asyncio.fixture
async def api(shared: SharedService, attacker: Attacker) -> AsyncIterator[Api]:
    service = shared.service
    jwks = service.app[JWKS]

    async def refresh() -> bool:
        return await service.call(jwks.refresh_now)

    async with aiohttp.ClientSession(base_url=service.url) as session:
        idp = service.idp
        api = Api(session.get, idp, shared.key, Forge(idp, attacker), refresh)
        await api.assert_still_admits()
        yield api


@pytest_asyncio.fixture
async def fresh_api(
    client: AppClient,
    idp: LocalIdentityProvider,
    key_store: Credentials,
    attacker: Attacker,
) -> Api:
    """An app of its own, for cases that rotate keys or plant a key set."""
    api = _client_api(client, idp, key_store.primary, attacker)
    await api.assert_still_admits()
    return api


@pytest.fixture(autouse=True)
def _no_unhandled_path(caplog: pytest.LogCaptureFixture) -> Iterator[None]:
    """A 401 produced by the middleware's catch-all still hides a crash: fail on it."""
    caplog.set_level(logging.WARNING)
    yield
    # caplog.records would hold the teardown phase's records only.
    records = [*caplog.get_records("setup"), *caplog.get_records("call")]
    crashes = [
        record
        for record in records
        if record.getMessage() in _CRASH_MESSAGES or record.name == "aiohttp.server"
    ]
    assert not crashes, [record.getMessage() for record in crashes]


async def _expect_rejection(
    response: ClientResponse,
    status: int,
    code: str | frozenset[str],
    challenge: str | None,
    *,
    token: str | None = None,
) -> dict[str, Any]:
    """Status, code and ``WWW-Authenticate``; ``challenge=None`` is a bare one."""
    text = await response.text()
    body = json.loads(text)
    codes = code if isinstance(code, frozenset) else frozenset({code})
    assert (response.status, body["statusCode"]) == (status, status), body
    assert body["code"] in codes, body
    assert response.headers["Cache-Control"] == "no-store"
    www = response.headers.get("WWW-Authenticate")
    if challenge is None:
        assert www == REALM
    else:
        assert www is not None
        assert www.startswith(f'{REALM}, error="{challenge}"')
    if token is not None:
        # H-19: a rejection never echoes the token or any of its segments.
        assert all(part not in text for part in token.split(".") if len(part) > 16)
    return dict(body)


async def _refused(
    api: Api,
    token: str,
    code: str | frozenset[str],
    *,
    fetch_allowed: bool = False,
) -> dict[str, Any]:
    before = api.fetches
    response = await api.send(token)
    body = await _expect_rejection(response, 401, code, "invalid_token", token=token)
    if not fetch_allowed:
        assert api.fetches == before, "the identity provider was asked for keys"
    else:
        # An unknown kid may cost one refresh (discovery + keys), never more.
        assert api.fetches - before <= 2
    return body


# --- 1.1 algorithm and signature -------------------------------------------------


def _hs(alg: str, secret: Callable[[Forge], bytes]) -> Build:
    digest = {"HS256": "sha256", "HS384": "sha384", "HS512": "sha512"}[alg]
    return lambda f: f.signed(
        f.header(alg=alg), f.claims(), _hmac_signer(secret(f), digest)
    )


def _spki_pem(f: Forge) -> bytes:
    return f.published_public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _pkcs1_pem(f: Forge) -> bytes:
    return f.published_public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.PKCS1
    )


def _der(f: Forge) -> bytes:
    return f.published_public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


def _ssh_rsa(f: Forge) -> bytes:
    return f.published_public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


def _certificate_pem(f: Forge) -> bytes:
    der = base64.b64decode(f.idp.jwks()["keys"][0]["x5c"][0])
    certificate = x509.load_der_x509_certificate(der)
    return certificate.public_bytes(serialization.Encoding.PEM)


def _openssh(key: ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey) -> bytes:
    return key.public_key().public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )


_ALG_NONE_SPELLINGS = [
    ("none", "none"),
    ("None", "None"),
    ("NONE", "NONE"),
    ("nOnE", "nOnE"),
    ("none ", "trailing-space"),
    ("", "empty"),
    (None, "null"),
    (["RS256"], "array"),
    (123, "number"),
]

ALGORITHM_ATTACKS = [
    *(
        pytest.param(
            lambda f, alg=alg: f.unsigned(f.header(alg=alg), signature=""),
            id=f"J-01-alg-{name}-empty-signature-CVE-2015-9235",
        )
        for alg, name in _ALG_NONE_SPELLINGS
    ),
    *(
        pytest.param(
            lambda f, alg=alg: f.unsigned(f.header(alg=alg), signature="AAAA"),
            id=f"J-01-alg-{name}-junk-signature-RFC8725-3.1",
        )
        for alg, name in _ALG_NONE_SPELLINGS
    ),
    pytest.param(
        lambda f: f.unsigned({"typ": "JWT", "kid": f.kid}, signature="AAAA"),
        id="J-01-alg-absent-CVE-2022-23540",
    ),
    pytest.param(_hs("HS256", _spki_pem), id="J-04-HS256-spki-pem-CVE-2024-33663"),
    pytest.param(
        _hs("HS256", lambda f: _spki_pem(f).rstrip(b"\n")),
        id="J-04-HS256-spki-pem-no-newline-CVE-2015-9235",
    ),
    pytest.param(
        _hs("HS256", lambda f: _spki_pem(f).replace(b"\n", b"\r\n")),
        id="J-04-HS256-spki-pem-crlf-CVE-2016-10555",
    ),
    pytest.param(_hs("HS256", _pkcs1_pem), id="J-04-HS256-pkcs1-pem-CVE-2017-11424"),
    pytest.param(_hs("HS256", _der), id="J-04-HS256-der-python-jose-398"),
    pytest.param(
        _hs("HS256", lambda f: _json(f.idp.jwks()["keys"][0])),
        id="J-04-HS256-jwk-json-CVE-2022-29217",
    ),
    pytest.param(
        _hs("HS256", _certificate_pem), id="J-04-HS256-x5c-certificate-CVE-2024-33663"
    ),
    pytest.param(_hs("HS256", _ssh_rsa), id="J-04-HS256-ssh-rsa-CVE-2022-29217"),
    pytest.param(
        _hs("HS256", lambda f: _json(f.idp.jwks())), id="J-04-HS256-whole-jwks-RFC8725"
    ),
    pytest.param(_hs("HS384", _spki_pem), id="J-04-HS384-spki-pem-RFC8725-2.1"),
    pytest.param(_hs("HS512", _spki_pem), id="J-04-HS512-spki-pem-RFC8725-2.1"),
    pytest.param(_hs("HS512", _der), id="J-04-HS512-der-python-jose-398"),
    pytest.param(
        _hs("HS256", lambda f: _openssh(f.attacker.p256)),
        id="J-05-HS256-ecdsa-sha2-nistp256-CVE-2024-33663",
    ),
    pytest.param(
        _hs("HS256", lambda f: _openssh(f.attacker.ed25519)),
        id="J-05-HS256-ssh-ed25519-GHSA-6c5p-j8vq-pqhj",
    ),
    pytest.param(_hs("HS256", lambda f: b""), id="J-05-HS256-empty-key-python-jose"),
    *(
        pytest.param(
            lambda f, alg=alg, digest=digest: f.signed(
                f.header(alg=alg), f.claims(), _rsa_signer(f.attacker.rsa_key, digest)
            ),
            id=f"J-06-{alg}-attacker-key-RFC8725-3.1",
        )
        for alg, digest in (("RS384", hashes.SHA384()), ("RS512", hashes.SHA512()))
    ),
    *(
        pytest.param(
            lambda f, alg=alg, digest=digest: f.signed(
                f.header(alg=alg), f.claims(), _pss_signer(f.attacker.rsa_key, digest)
            ),
            id=f"J-06-{alg}-attacker-key-RFC8725-3.1",
        )
        for alg, digest in (("PS256", hashes.SHA256()), ("PS384", hashes.SHA384()))
    ),
    pytest.param(
        lambda f: f.signed(
            f.header(alg="ES256"), f.claims(), _ecdsa_signer(f.attacker.p256)
        ),
        id="J-06-ES256-attacker-key-RFC8725-3.1",
    ),
    pytest.param(
        lambda f: f.signed(
            f.header(alg="ES256K"), f.claims(), _ecdsa_signer(f.attacker.secp256k1)
        ),
        id="J-06-ES256K-attacker-key-RFC8725-3.1",
    ),
    pytest.param(
        lambda f: f.signed(f.header(alg="EdDSA"), f.claims(), f.attacker.ed25519.sign),
        id="J-06-EdDSA-attacker-key-RFC8725-3.1",
    ),
    pytest.param(
        lambda f: f.signed(f.header(alg="ES256"), f.claims(), lambda _: bytes(64)),
        id="J-07-ES256-r-s-zero-CVE-2022-21449",
    ),
    pytest.param(
        lambda f: f.signed(
            f.header(alg="ES256"),
            f.claims(),
            lambda _: _P256_ORDER.to_bytes(32, "big") * 2,
        ),
        id="J-07-ES256-r-s-order-CVE-2022-21449",
    ),
]
_P256_ORDER = 0xFFFFFFFF00000000FFFFFFFFFFFFFFFFBCE6FAADA7179E84F3B9CAC2FC632551


@pytest.mark.parametrize("build", ALGORITHM_ATTACKS)
async def test_token_choosing_an_algorithm_other_than_rs256_is_refused_unfetched(
    api: Api, build: Build
) -> None:
    await _refused(api, build(api.forge), "TokenInvalid")
    await api.assert_still_admits()


def _truncated(token: str, chars: int) -> str:
    return token[:-chars]


def _swap_signature(f: Forge) -> str:
    first, second = f.idp.mint_token(), f.idp.mint_token()
    return first.rsplit(".", 1)[0] + "." + second.rsplit(".", 1)[1]


def _mixed(f: Forge) -> str:
    a = f.idp.mint_token().split(".")
    b = f.idp.mint_token(claims={"roles": ["Admin"]}).split(".")
    return f"{a[0]}.{b[1]}.{a[2]}"


def _edited_payload(**changes: Json) -> Build:
    def build(f: Forge) -> str:
        head, _, signature = f.idp.mint_token().split(".")
        return f"{head}.{_b64(_json(f.claims(**changes)))}.{signature}"

    return build


SIGNATURE_ATTACKS = [
    pytest.param(
        lambda f: f.idp.mint_token().rsplit(".", 1)[0] + ".",
        "TokenInvalid",
        id="J-02a-signature-stripped-RFC7515-5.2",
    ),
    pytest.param(
        lambda f: f.idp.mint_token().rsplit(".", 1)[0],
        "TokenInvalid",
        id="J-02b-two-segments-RFC7519-7.2",
    ),
    pytest.param(
        lambda f: _truncated(f.idp.mint_token(), 4),
        frozenset({"TokenInvalid", "TokenSignatureInvalid"}),
        id="J-02c-signature-minus-4-chars-jwt_tool",
    ),
    pytest.param(
        lambda f: _truncated(f.idp.mint_token(), 2),
        "TokenSignatureInvalid",
        id="J-02c-signature-minus-one-byte-RFC7515-5.2",
    ),
    pytest.param(
        _swap_signature, "TokenSignatureInvalid", id="J-02d-borrowed-signature"
    ),
    pytest.param(_mixed, "TokenSignatureInvalid", id="J-02e-header-a-payload-b-sig-a"),
    pytest.param(
        lambda f: f.idp.mint_token().rsplit(".", 1)[0] + "." + "A" * 342,
        "TokenSignatureInvalid",
        id="J-02f-signature-all-A-jwt_tool-null-signature",
    ),
    pytest.param(
        _edited_payload(roles=["Admin"]),
        "TokenSignatureInvalid",
        id="J-03-roles-edited-PortSwigger-unverified-signature",
    ),
    pytest.param(
        _edited_payload(tid=FOREIGN_TENANT_ID),
        "TokenSignatureInvalid",
        id="J-03-tid-edited-RFC8725-3.10",
    ),
    pytest.param(
        _edited_payload(oid=str(uuid.uuid4())),
        "TokenSignatureInvalid",
        id="J-03-oid-of-victim-RFC8725-3.10",
    ),
    pytest.param(
        lambda f: f.by_attacker(
            payload=f.claims(tid=FOREIGN_TENANT_ID, iss="https://evil.example/v2.0")
        ),
        "TokenSignatureInvalid",
        id="J-03-unverified-foreign-tenant-triggers-nothing-R-16",
    ),
    pytest.param(
        lambda f: f.by_attacker(),
        "TokenSignatureInvalid",
        id="J-06-RS256-attacker-key-published-kid-RFC8725-3.2",
    ),
]


@pytest.mark.parametrize(("build", "code"), SIGNATURE_ATTACKS)
async def test_broken_or_borrowed_signature_is_refused_and_the_real_token_still_works(
    api: Api, build: Build, code: str | frozenset[str]
) -> None:
    original = api.idp.mint_token()
    assert (await api.send(original)).status == 200
    await _refused(api, build(api.forge), code)
    # jwt_tool's persistence check: a refused forgery poisons nothing.
    assert (await api.send(original)).status == 200


# --- 1.2 key-selection headers ---------------------------------------------------


def _public_jwk(key: rsa.RSAPrivateKey, kid: str | None = None) -> dict[str, str]:
    numbers = key.public_key().public_numbers()
    jwk = {
        "kty": "RSA",
        "n": _b64(numbers.n.to_bytes((numbers.n.bit_length() + 7) // 8, "big")),
        "e": _b64(numbers.e.to_bytes(3, "big")),
    }
    if kid is not None:
        jwk["kid"] = kid
    return jwk


def _thumbprint(jwk: dict[str, str]) -> str:
    # RFC 7638: the required members in lexicographic order, no whitespace.
    canonical = json.dumps(
        {name: jwk[name] for name in ("e", "kty", "n")}, separators=(",", ":")
    )
    return _b64(hashlib.sha256(canonical.encode()).digest())


_FOREIGN_KEY_URLS = [
    ("https://attacker.example/jwks.json", "attacker-host"),
    ("http://169.254.169.254/metadata/identity/oauth2/token", "cloud-metadata"),
    ("file:///etc/passwd", "file"),
    ("https://login.microsoftonline.com.attacker.example/k", "lookalike-suffix"),
    ("https://login.microsoftonline.com@attacker.example/k", "userinfo-trick"),
]


def _with_header(**fields: Json) -> Build:
    return lambda f: f.by_attacker(header=f.header(**fields))


KEY_SELECTION_ATTACKS = [
    pytest.param(
        lambda f: f.by_attacker(header=f.header(jwk=_public_jwk(f.attacker.rsa_key))),
        id="J-08-embedded-jwk-published-kid-CVE-2018-0114",
    ),
    pytest.param(
        lambda f: f.by_attacker(
            header={
                "typ": "JWT",
                "alg": "RS256",
                "jwk": _public_jwk(f.attacker.rsa_key),
            }
        ),
        id="J-08-embedded-jwk-no-kid-CVE-2018-0114",
    ),
    pytest.param(
        lambda f: f.by_attacker(
            header=f.header(
                kid=_thumbprint(_public_jwk(f.attacker.rsa_key)),
                jwk=_public_jwk(f.attacker.rsa_key),
            )
        ),
        id="J-08-embedded-jwk-thumbprint-kid-RFC7638",
    ),
    pytest.param(
        lambda f: f.signed(
            f.header(alg="HS256", jwk={"kty": "oct", "k": _b64(b"s" * 32)}),
            f.claims(),
            _hmac_signer(b"s" * 32),
        ),
        id="J-08-embedded-oct-jwk-HS256-jwt_tool-X-i",
    ),
    *(
        pytest.param(_with_header(jku=url), id=f"J-09-jku-{name}-RFC8725-3.10")
        for url, name in _FOREIGN_KEY_URLS
    ),
    *(
        pytest.param(_with_header(x5u=url), id=f"J-09-x5u-{name}-CWE-918")
        for url, name in _FOREIGN_KEY_URLS
    ),
    pytest.param(
        lambda f: f.by_attacker(
            header=f.header(x5c=[base64.b64encode(f.attacker.certificate_der).decode()])
        ),
        id="J-09-x5c-self-signed-chain-RFC7515-4.1.6",
    ),
]


@pytest.mark.parametrize("build", KEY_SELECTION_ATTACKS)
async def test_header_naming_its_own_key_is_refused_and_never_followed(
    api: Api, build: Build, aiohttp_server: Any
) -> None:
    hits: list[str] = []

    async def record(request: web.Request) -> web.Response:
        hits.append(request.path)
        return web.json_response({"keys": [_public_jwk(api.forge.attacker.rsa_key)]})

    listener = web.Application()
    listener.router.add_get("/{tail:.*}", record)
    server = await aiohttp_server(listener)
    forge = api.forge
    token = build(forge)
    # The same attack once more, pointing at a listener we can watch (F5).
    watched = forge.by_attacker(header=forge.header(jku=str(server.make_url("/k"))))

    await _refused(api, token, "TokenInvalid")
    await _refused(api, watched, "TokenInvalid")
    assert hits == []


_INJECTED_KIDS = [
    ("../../../../../../dev/null", "TokenSignatureKeyNotFound", "path-traversal"),
    ("/dev/null", "TokenSignatureKeyNotFound", "dev-null"),
    ("/invalid_path", "TokenSignatureKeyNotFound", "invalid-path"),
    ("|sleep 10", "TokenInvalid", "shell-sleep"),
    ("| curl http://127.0.0.1:9/", "TokenInvalid", "shell-curl"),
    ("x' UNION SELECT '1';--", "TokenInvalid", "sql-union"),
    ("'OR'1'='1", "TokenSignatureKeyNotFound", "sql-or"),
    ("${jndi:ldap://x/a}", "TokenSignatureKeyNotFound", "jndi"),
    ("k1\r\nINFO auth ok user=admin", "TokenInvalid", "crlf-log-forging-CWE-117"),
    ("k1\u0000", "TokenInvalid", "nul"),
    ("k1 ", "TokenInvalid", "trailing-space"),
    ("\u043a1", "TokenInvalid", "cyrillic-lookalike"),
    ("", "TokenInvalid", "empty"),
    ("k" * 64, "TokenSignatureKeyNotFound", "64-chars"),
    ("k" * 1024, "TokenInvalid", "1024-chars"),
    ("k" * 4096, "TokenInvalid", "4096-chars"),
    ("k" * 6000, "TokenInvalid", "6000-chars"),
]

_NON_STRING_KIDS = [
    (123, "number"),
    (1.5, "float"),
    (True, "true"),
    (None, "null"),
    ([], "empty-array"),
    (["KID"], "array-of-real-kid"),
    ({"k": "KID"}, "object"),
]


def _kid_build(kid: Json, signer: str) -> Build:
    def build(f: Forge) -> str:
        value = _real_kid(kid, f.kid)
        if signer == "hs-empty":
            return f.signed(
                f.header(alg="HS256", kid=value), f.claims(), _hmac_signer(b"")
            )
        return f.by_attacker(header=f.header(kid=value))

    return build


def _real_kid(value: Json, kid: str) -> Json:
    # "KID" stands for the published kid, filled in once the IdP exists.
    if value == "KID":
        return kid
    if isinstance(value, list):
        return [_real_kid(item, kid) for item in value]
    if isinstance(value, dict):
        return {name: _real_kid(item, kid) for name, item in value.items()}
    return value


KID_ATTACKS = [
    *(
        pytest.param(_kid_build(kid, "rsa"), code, id=f"J-10-kid-{name}-RFC8725-3.10")
        for kid, code, name in _INJECTED_KIDS
    ),
    *(
        pytest.param(
            _kid_build(kid, "hs-empty"),
            "TokenInvalid",
            id=f"J-10-HS256-empty-key-kid-{n}",
        )
        for kid, n in (("", "blank"), ("\u0000", "nul"), ("1", "one"))
    ),
    pytest.param(
        lambda f: f.by_attacker(header=f.header(kid=f.kid.upper())),
        "TokenSignatureKeyNotFound",
        id="J-10-kid-case-variant-RFC7515-4.1.4",
    ),
    *(
        pytest.param(
            _kid_build(kid, "rsa"), "TokenInvalid", id=f"J-11-kid-{name}-RFC7515-4.1.4"
        )
        for kid, name in _NON_STRING_KIDS
    ),
]


@pytest.mark.parametrize(("build", "code"), KID_ATTACKS)
async def test_hostile_kid_is_refused_without_a_500_or_a_raw_log_line(
    api: Api, build: Build, code: str, caplog: pytest.LogCaptureFixture
) -> None:
    await _refused(api, build(api.forge), code, fetch_allowed=True)
    forged_lines = [
        r for r in caplog.records if "auth ok user=admin" in str(r.__dict__)
    ]
    assert forged_lines == []
    await api.assert_still_admits()


def _planted_jwks(f: Forge) -> dict[str, Json]:
    real = f.idp.jwks()["keys"]
    return {
        "keys": [
            *real,
            {**_public_jwk(f.attacker.rsa_key, "enc-key"), "use": "enc"},
            {"kty": "oct", "kid": "sym", "k": _b64(b"s" * 32)},
            _public_jwk(f.attacker.short_rsa, "short"),
            {**_public_jwk(f.attacker.rsa_key, "rs512-key"), "alg": "RS512"},
        ]
    }


PLANTED_KEY_ATTACKS = [
    pytest.param(
        lambda f: f.by_attacker(header=f.header(kid="enc-key")),
        "TokenSignatureKeyNotFound",
        id="J-13c-kid-of-encryption-key-RFC7517-4.2",
    ),
    pytest.param(
        lambda f: f.by_attacker(header=f.header(kid="sym")),
        "TokenSignatureKeyNotFound",
        id="J-13d-kid-of-oct-key-RFC8725-3.1",
    ),
    pytest.param(
        lambda f: f.signed(
            f.header(alg="HS256", kid="sym"), f.claims(), _hmac_signer(b"s" * 32)
        ),
        "TokenInvalid",
        id="J-13d-HS256-with-published-oct-key-RFC8725-3.1",
    ),
    pytest.param(
        lambda f: f.signed(
            f.header(kid="short"),
            f.claims(),
            _rsa_signer(f.attacker.short_rsa, hashes.SHA256()),
        ),
        "TokenSignatureKeyNotFound",
        id="J-13d-kid-of-1024-bit-rsa-key-PyJWT-2.11",
    ),
    pytest.param(
        lambda f: f.by_attacker(header=f.header(kid="rs512-key")),
        "TokenSignatureKeyNotFound",
        id="J-06-jwks-entry-alg-RS512-RFC8725-3.1",
    ),
]


@pytest.mark.parametrize(("build", "code"), PLANTED_KEY_ATTACKS)
async def test_key_the_jwks_publishes_but_must_not_be_used_never_verifies(
    fresh_api: Api, build: Build, code: str
) -> None:
    api = fresh_api
    document = _planted_jwks(api.forge)
    api.idp.set_outage("body", body=_json(document), endpoints=("jwks",))
    assert await api.refresh()

    await _refused(api, build(api.forge), code, fetch_allowed=True)
    await api.assert_still_admits()


async def test_token_without_kid_is_refused_rather_than_tried_on_every_key(
    api: Api,
) -> None:
    # J-13a: python-jose tries every key of a JWKS it is handed; we never do.
    token = api.idp.mint_token(drop_header=("kid",))
    await _refused(api, token, "TokenInvalid")


async def test_token_claiming_one_kid_but_signed_by_another_is_refused(
    fresh_api: Api,
) -> None:
    api = fresh_api
    # J-13b: both keys are published; the kid picks k1, so k2's signature fails.
    first = api.idp.current_kid
    second = api.idp.rotate_key()
    assert await api.refresh()
    token = api.idp.mint_token(kid=second, header={"kid": first})
    await _refused(api, token, "TokenSignatureInvalid")


async def test_v1_token_whose_x5t_disagrees_with_its_kid_is_selected_by_kid(
    api: Api,
) -> None:
    # J-13e: x5t is legacy; the kid alone selects the key (Entra access-tokens.md).
    token = api.idp.mint_token(version="1.0", header={"x5t": "bogus-thumbprint"})
    assert (await api.send(token)).status == 200


# --- 1.3 / 1.4 structure, encoding, JOSE extensions ------------------------------


def _flip_unused_bits(segment: str) -> str:
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    # The last character of a segment whose length is 2 or 3 mod 4 carries
    # unused low bits (RFC 4648 §3.5); flipping one leaves the bytes unchanged.
    if len(segment) % 4 == 0:
        raise ValueError("this segment has no unused bits")
    last = alphabet.index(segment[-1])
    return segment[:-1] + alphabet[last ^ 1]


def _segment_edit(index: int, edit: Callable[[str], str]) -> Build:
    def build(f: Forge) -> str:
        parts = _unused_bit_token(f).split(".")
        parts[index] = edit(parts[index])
        return ".".join(parts)

    return build


def _unused_bit_token(f: Forge) -> str:
    # Pad the header until both it and the payload have unused bits to flip.
    for filler in range(3):
        for more in range(3):
            token = f.by_idp(
                header=f.header(x="a" * filler), payload=f.claims(pad="b" * more)
            )
            head, body, _ = token.split(".")
            if len(head) % 4 and len(body) % 4:
                return token
    raise AssertionError("no padding made both segments uneven")


def _with_member(f: Forge, member: bytes) -> bytes:
    """Valid claims plus one raw ``"name":value`` member, replacing any of that name."""
    name = json.loads(b"{" + member + b"}").popitem()[0]
    claims = f.claims()
    claims.pop(name, None)
    return _json(claims)[:-1] + b"," + member + b"}"


def _insert(segment: str, junk: str) -> str:
    return segment[:8] + junk + segment[8:]


def _nested(depth: int) -> bytes:
    return b"[" * depth + b"]" * depth


STRUCTURE_ATTACKS = [
    *(
        pytest.param(lambda f, t=t: t, id=f"J-14-{name}-RFC7515-7.1")
        for t, name in (
            (".", "one-dot"),
            ("..", "two-dots"),
            ("a.b", "two-segments"),
            ("a.b.c.d", "four-segments"),
            ("a.b.c.d.e.f", "six-segments"),
            (".eyJ.sig", "empty-header-segment"),
            ("eyJ.eyJ.sig.", "trailing-dot"),
            (".eyJ.eyJ.sig", "leading-dot"),
        )
    ),
    pytest.param(
        lambda f: f.idp.mint_token() + ".AAAA.AAAA",
        id="J-21-jwe-five-segments-CVE-2024-33664",
    ),
    pytest.param(
        lambda f: ".".join(
            [
                _b64(_json({"alg": "RSA-OAEP-256", "enc": "A256GCM", "zip": "DEF"})),
                "AAAA",
                "AAAA",
                "AAAA",
                "AAAA",
            ]
        ),
        id="J-21-jwe-zip-bomb-header-CVE-2024-33664",
    ),
    pytest.param(
        lambda f: f.idp.mint_token() + "==",
        id="J-15-padding-suffix-python-jose-non-canonical",
    ),
    *(
        pytest.param(
            _segment_edit(2, functools.partial(_insert, junk=junk)),
            id=f"J-15-junk-group-{name}-in-signature-RFC4648-12",
        )
        for junk, name in (("%%%%", "percent"), ("!!!!", "bang"), ("****", "star"))
    ),
    *(
        pytest.param(
            _segment_edit(index, _flip_unused_bits),
            id=f"J-15-{name}-unused-bits-flipped-RFC4648-3.5",
        )
        for index, name in ((0, "header"), (1, "payload"), (2, "signature"))
    ),
    pytest.param(lambda f: f.by_idp(header=b"[]"), id="J-16-header-array-RFC7515-4"),
    pytest.param(lambda f: f.by_idp(header=b'"x"'), id="J-16-header-string-RFC7515-4"),
    pytest.param(lambda f: f.by_idp(header=b"1"), id="J-16-header-number-RFC7515-4"),
    pytest.param(lambda f: f.by_idp(header=b"null"), id="J-16-header-null-RFC7515-4"),
    pytest.param(lambda f: f.by_idp(header=b"true"), id="J-16-header-true-RFC7515-4"),
    pytest.param(
        lambda f: f.by_idp(header=_json(f.header())[:-3]),
        id="J-16-header-truncated-RFC8259",
    ),
    pytest.param(
        lambda f: f.by_idp(header=_json(f.header()) + b"x"),
        id="J-16-header-trailing-garbage-RFC8259",
    ),
    pytest.param(
        lambda f: f.by_idp(header=b"\xef\xbb\xbf" + _json(f.header())),
        id="J-16-header-utf8-bom-RFC8259-8.1",
    ),
    pytest.param(
        lambda f: f.by_idp(header=json.dumps(f.header()).encode("utf-16")),
        id="J-16-header-utf16-RFC8725-3.7",
    ),
    pytest.param(
        lambda f: f.by_idp(header=_json(f.header())[:-1] + b',"x":"\xff\xfe"}'),
        id="J-16-header-invalid-utf8-RFC8259-8.1",
    ),
    pytest.param(
        lambda f: f.by_idp(header=_json(f.header())[:-1] + b',"x":NaN}'),
        id="J-16-header-NaN-RFC8259-6",
    ),
    pytest.param(
        lambda f: f.by_idp(header=b'{"typ":"JWT","alg":"RS256","kid":"\\ud800"}'),
        id="J-16-header-lone-surrogate-kid-RFC8259-8.2",
    ),
    pytest.param(
        lambda f: f.by_idp(
            header=b'{"alg":"none","alg":"RS256","kid":"%s"}' % f.kid.encode()
        ),
        id="J-17-duplicate-alg-last-wins-RFC7515-4",
    ),
    pytest.param(
        lambda f: f.by_idp(
            header=b'{"alg":"RS256","kid":"other","kid":"%s"}' % f.kid.encode()
        ),
        id="J-17-duplicate-kid-Bishop-Fox-JSON-interop",
    ),
    pytest.param(
        lambda f: f.by_idp(header=_nested(2000)), id="J-18a-deep-header-CWE-674"
    ),
    pytest.param(
        lambda f: f.by_idp(header=f.header(pad="x" * 2000)),
        id="J-18-oversized-header-CWE-400",
    ),
    pytest.param(
        lambda f: f.by_idp(header=f.header(crit=["exp"])),
        id="J-19-crit-unknown-extension-python-jose-413",
    ),
    pytest.param(
        lambda f: f.by_idp(header=f.header(b64=False, crit=["b64"])),
        id="J-20-b64-false-RFC7797",
    ),
    pytest.param(
        lambda f: f.by_idp(header=f.header(cty="JWT")), id="J-20-cty-JWT-RFC7519-5.2"
    ),
    pytest.param(
        lambda f: f.by_idp(header=f.header(typ="JWE")), id="J-20-typ-JWE-RFC8725-3.11"
    ),
    pytest.param(
        lambda f: f.by_idp(header=f.header(typ="at+jwt")),
        id="J-20-typ-at+jwt-RFC8725-3.11",
    ),
    pytest.param(
        lambda f: f.by_idp(header=f.header(typ="xyz")), id="J-20-typ-xyz-RFC8725-3.11"
    ),
    pytest.param(
        lambda f: f.by_idp(header=f.header(typ=["JWT"])), id="J-20-typ-array-RFC7519"
    ),
    pytest.param(
        lambda f: f.by_idp(header=f.header(zip="DEF")), id="J-21-zip-on-jws-RFC8725-3.6"
    ),
    pytest.param(
        lambda f: f.by_idp(header=f.header(enc="A256GCM")),
        id="J-21-enc-on-jws-RFC7516-4.1.2",
    ),
]


@pytest.mark.parametrize("build", STRUCTURE_ATTACKS)
async def test_token_of_the_wrong_structure_is_refused_before_any_key_is_fetched(
    api: Api, build: Build
) -> None:
    await _refused(api, build(api.forge), "TokenInvalid")


async def test_mebibyte_token_is_refused_by_length_before_decoding() -> None:
    # J-18d: past aiohttp's header limit, so at the validator itself.
    validator = BearerTokenValidator(max_token_bytes=16384)
    huge = "eyJ" + "A" * (1 << 20) + ".eyJ.sig"
    headers = CIMultiDictProxy(CIMultiDict({"Authorization": f"Bearer {huge}"}))
    context = AuthContext(headers, MultiDictProxy(MultiDict()))
    with pytest.raises(TokenInvalid, match="larger than this API accepts"):
        validator.validate(context)
    assert context.token is None


PAYLOAD_ATTACKS = [
    *(
        pytest.param(
            lambda f, raw=raw: f.by_idp(payload=raw),
            id=f"J-16-payload-{name}-RFC7519-7.2",
        )
        for raw, name in (
            (b"[]", "array"),
            (b'"x"', "string"),
            (b"1", "number"),
            (b"null", "null"),
            (b"true", "true"),
            (b'{"aud":', "truncated"),
            (b"{}x", "trailing-garbage"),
            (b"\xef\xbb\xbf{}", "utf8-bom"),
            ('{"sub":"x"}'.encode("utf-16"), "utf16"),
            (b'{"sub":"\xc3\x28"}', "invalid-utf8"),
        )
    ),
    pytest.param(
        lambda f: f.by_idp(payload=_json(f.claims())[:-1] + b',"x":NaN}'),
        id="J-16-payload-NaN-RFC8259-6",
    ),
    pytest.param(
        lambda f: f.by_idp(payload=_json(f.claims())[:-1] + b',"x":-Infinity}'),
        id="J-16-payload-minus-Infinity-RFC8259-6",
    ),
    pytest.param(
        lambda f: f.by_idp(payload=_with_member(f, b'"name":"\\ud800"')),
        id="J-16-payload-lone-surrogate-sub-RFC7493-2.1",
    ),
    pytest.param(
        lambda f: f.by_idp(payload=_with_member(f, b'"groups":["\\udfff"]')),
        id="J-16-payload-lone-surrogate-in-array-RFC7493-2.1",
    ),
    pytest.param(
        lambda f: f.by_idp(payload=b'{"roles":["Admin"],' + _json(f.claims())[1:]),
        id="J-17-duplicate-roles-claim-RFC8725-3.7",
    ),
    pytest.param(
        lambda f: f.by_idp(
            payload=_json(f.claims())[:-1] + b',"aud":"%s"}' % f.idp.audience.encode()
        ),
        id="J-17-duplicate-aud-claim-Bishop-Fox-JSON-interop",
    ),
    pytest.param(
        lambda f: f.by_idp(payload=_nested(5000)), id="J-18a-deep-payload-CWE-674"
    ),
    pytest.param(
        lambda f: f.by_idp(payload=_json(f.idp.mint_token())),
        id="J-22-payload-is-a-json-string-jwt-RFC8725-2.3",
    ),
    pytest.param(
        lambda f: f.by_idp(
            header=f.header(cty="JWT"), payload=_json(f.idp.mint_token())
        ),
        id="J-22-nested-jwt-with-cty-RFC7519-5.2",
    ),
    pytest.param(
        lambda f: f.by_idp(payload=f.idp.mint_token().encode()),
        id="J-22-payload-is-a-token-RFC8725-3.3",
    ),
]


@pytest.mark.parametrize("build", PAYLOAD_ATTACKS)
async def test_signed_payload_that_is_not_a_plain_claims_object_is_refused(
    api: Api, build: Build
) -> None:
    await _refused(api, build(api.forge), "TokenInvalid")
    await api.assert_still_admits()


async def test_lone_surrogate_claim_never_reaches_a_response(api: Api) -> None:
    # J-16 / L-10: a claim that cannot be encoded as UTF-8 must not reach /whoami.
    token = api.forge.by_idp(payload=_with_member(api.forge, b'"sub":"\\udcff"'))
    response = await api.send(token, "/api/v2/whoami")
    await _expect_rejection(response, 401, "TokenInvalid", "invalid_token")


# --- 1.5 time claims (frozen wall clock) -----------------------------------------

T = float(int(time.time()))


async def _frozen_api(
    make_client: MakeClient,
    idp: LocalIdentityProvider,
    key_store: Credentials,
    attacker: Attacker,
    *,
    leeway: int,
    clock: Callable[[], float] = lambda: T,
) -> Api:
    client = await make_client(clock_skew_seconds=leeway, app_kwargs={"clock": clock})
    api = _client_api(client, idp, key_store.primary, attacker)
    assert (await api.send(_timed(api.forge))).status == 200
    return api


def _timed(f: Forge, **changes: Json) -> str:
    claims = f.claims(iat=T - 60, nbf=T - 60, exp=T + 3600)
    claims.update(changes)
    for name in [name for name, value in changes.items() if value is _DROP]:
        del claims[name]
    return f.by_idp(payload=claims)


_DROP = object()

TIME_CASES = [
    pytest.param(
        0, {"exp": _DROP}, "TokenClaimInvalid", id="J-30-exp-missing-RFC7519-4.1.4"
    ),
    pytest.param(
        0, {"nbf": _DROP}, "TokenClaimInvalid", id="J-30-nbf-missing-RFC8725-3.10"
    ),
    pytest.param(
        0, {"iat": _DROP}, "TokenClaimInvalid", id="J-30-iat-missing-RFC8725-3.10"
    ),
    *(
        pytest.param(
            60, {"exp": value}, "TokenClaimInvalid", id=f"J-31-exp-{name}-RFC7519-2"
        )
        for value, name in (
            (str(int(T) + 600), "numeric-string"),
            ("abc", "string"),
            (None, "null"),
            ([T + 600], "array"),
            ({}, "object"),
            (True, "true"),
            (False, "false"),
        )
    ),
    pytest.param(
        60, {"exp": -1}, "TokenExpired", id="J-31-exp-minus-one-RFC7519-4.1.4"
    ),
    pytest.param(60, {"exp": 0}, "TokenExpired", id="J-31-exp-zero-RFC7519-4.1.4"),
    pytest.param(
        60, {"exp": 10**20}, "TokenClaimInvalid", id="J-31-exp-10e20-lifetime-cap-J-35"
    ),
    pytest.param(0, {"exp": T}, "TokenExpired", id="J-32-exp-equals-now-RFC7519-4.1.4"),
    pytest.param(60, {"exp": T - 61}, "TokenExpired", id="J-32-exp-beyond-leeway"),
    pytest.param(60, {"exp": T - 60}, "TokenExpired", id="J-32-exp-at-leeway-edge"),
    pytest.param(60, {"nbf": T + 61}, "TokenNotYetValid", id="J-33-nbf-beyond-leeway"),
    pytest.param(
        60,
        {"exp": T + 10, "nbf": T + 20},
        "TokenClaimInvalid",
        id="J-33-nbf-after-exp-RFC7519-4.1.5",
    ),
    *(
        pytest.param(
            60, {"nbf": value}, "TokenClaimInvalid", id=f"J-33-nbf-{name}-RFC7519-2"
        )
        for value, name in (("0", "string"), (None, "null"), ([0], "array"))
    ),
    pytest.param(
        60, {"iat": T + 10**6}, "TokenNotYetValid", id="J-34-iat-far-future-PyJWT-794"
    ),
    pytest.param(60, {"iat": T + 61}, "TokenNotYetValid", id="J-34-iat-beyond-leeway"),
    pytest.param(
        60, {"iat": "abc"}, "TokenClaimInvalid", id="J-34-iat-string-RFC7519-2"
    ),
    pytest.param(60, {"iat": None}, "TokenClaimInvalid", id="J-34-iat-null-RFC7519-2"),
    pytest.param(
        60,
        {"iat": T, "nbf": T, "exp": T + 30 * 3600},
        "TokenClaimInvalid",
        id="J-35-lifetime-30h-Envoy-max_lifetime",
    ),
    pytest.param(
        60,
        {"iat": T, "nbf": T, "exp": T + 10 * 365 * 86400},
        "TokenClaimInvalid",
        id="J-35-lifetime-10-years",
    ),
    pytest.param(
        60,
        {"iat": T - 29 * 3600, "nbf": T - 29 * 3600, "exp": T + 60},
        "TokenClaimInvalid",
        id="J-35-old-iat-short-exp",
    ),
]


@pytest.mark.parametrize(("leeway", "changes", "code"), TIME_CASES)
async def test_token_outside_its_validity_window_is_refused(
    make_client: MakeClient,
    idp: LocalIdentityProvider,
    key_store: Credentials,
    attacker: Attacker,
    leeway: int,
    changes: dict[str, Json],
    code: str,
) -> None:
    api = await _frozen_api(make_client, idp, key_store, attacker, leeway=leeway)
    await _refused(api, _timed(api.forge, **changes), code)


@pytest.mark.parametrize(
    ("leeway", "changes"),
    [
        pytest.param(60, {"exp": T - 59}, id="J-32-exp-inside-leeway"),
        pytest.param(0, {"exp": T + 1}, id="J-32-exp-one-second-ahead"),
        pytest.param(60, {"nbf": T + 59}, id="J-33-nbf-inside-leeway"),
        pytest.param(60, {"nbf": T}, id="J-33-nbf-now"),
        pytest.param(60, {"iat": T + 59}, id="J-34-iat-inside-leeway"),
        pytest.param(60, {"exp": T + 600.5}, id="J-31-exp-fractional-RFC7519-2"),
        pytest.param(
            60,
            {"iat": T, "nbf": T, "exp": T + 28 * 3600},
            id="J-35-lifetime-at-the-28h-cap",
        ),
    ],
)
async def test_token_inside_its_validity_window_is_admitted(
    make_client: MakeClient,
    idp: LocalIdentityProvider,
    key_store: Credentials,
    attacker: Attacker,
    leeway: int,
    changes: dict[str, Json],
) -> None:
    api = await _frozen_api(make_client, idp, key_store, attacker, leeway=leeway)
    assert (await api.send(_timed(api.forge, **changes))).status == 200


@pytest.mark.parametrize(
    ("offset", "leeway"),
    [
        pytest.param(600, 300, id="J-36-host-10-min-ahead-leeway-5-min"),
        pytest.param(600, 60, id="J-36-host-10-min-ahead-leeway-60-s"),
        pytest.param(-600, 300, id="J-36-host-10-min-behind-leeway-5-min"),
        pytest.param(-600, 60, id="J-36-host-10-min-behind-leeway-60-s"),
    ],
)
async def test_host_clock_skew_beyond_the_leeway_refuses_deterministically(
    make_client: MakeClient,
    idp: LocalIdentityProvider,
    key_store: Credentials,
    attacker: Attacker,
    offset: int,
    leeway: int,
) -> None:
    now = [T]
    api = await _frozen_api(
        make_client, idp, key_store, attacker, leeway=leeway, clock=lambda: now[0]
    )
    # A token valid for five minutes from T, with nbf and iat at T.
    token = _timed(api.forge, iat=T, nbf=T, exp=T + 300)
    assert (await api.send(token)).status == 200
    before = api.fetches

    now[0] = T + offset
    expected = "TokenExpired" if offset > 0 else "TokenNotYetValid"
    await _refused(api, _timed(api.forge, iat=T, nbf=T, exp=T + 300), expected)
    # The key cache runs on the monotonic clock: a wall-clock jump refetches nothing.
    assert (
        await api.send(_timed(api.forge, iat=now[0], nbf=now[0], exp=now[0] + 300))
    ).status == 200
    assert api.fetches == before


# --- 1.6 audience, issuer and tenant ---------------------------------------------


def _claims_build(**changes: Json) -> Build:
    def build(f: Forge) -> str:
        claims = f.claims(**{k: v for k, v in changes.items() if v is not _DROP})
        for name in [k for k, v in changes.items() if v is _DROP]:
            del claims[name]
        return f.by_idp(payload=_resolve(claims, f.idp))

    return build


def _resolve(value: Json, idp: LocalIdentityProvider) -> Json:
    # Placeholders for values only known once the provider runs.
    names = {
        "<API_ID>": idp.app_id,
        "<API_URI>": idp.audience,
        "<ISS>": idp.issuer,
        "<ISS_V1>": idp.issuer_v1,
        "<BASE>": idp.base_url,
        "<TID>": idp.tenant_id,
    }
    if isinstance(value, str):
        for placeholder, real in names.items():
            value = value.replace(placeholder, real)
        return value
    if isinstance(value, list):
        return [_resolve(item, idp) for item in value]
    if isinstance(value, dict):
        return {name: _resolve(item, idp) for name, item in value.items()}
    return value


CLAIM_ATTACKS = [
    pytest.param(
        _claims_build(aud=_DROP),
        "TokenAudienceNotAllowed",
        id="J-40-aud-missing-python-jose-require_aud",
    ),
    *(
        pytest.param(
            _claims_build(aud=aud),
            "TokenAudienceNotAllowed",
            id=f"J-41-aud-{name}-RFC7519-4.1.3",
        )
        for aud, name in (
            ("api://00000000-0000-4000-8000-0000000000ff", "other-app"),
            (GRAPH_APP_ID, "microsoft-graph-CWE-441"),
            ("API://<API_ID>", "uri-upper-case"),
            ("<API_ID>/", "trailing-slash"),
            ("<API_ID> ", "trailing-space"),
            ([], "empty-array"),
            (["x", "y"], "array-without-ours"),
            (123, "number"),
            (None, "null"),
            ({}, "object"),
            ([["<API_ID>"]], "nested-array"),
        )
    ),
    pytest.param(
        _claims_build(iss="<ISS_V1>", ver="2.0"),
        "TokenIssuerNotAllowed",
        id="J-42-v1-issuer-with-ver-2-Entra-access-tokens",
    ),
    pytest.param(
        _claims_build(ver="1.0"),
        "TokenIssuerNotAllowed",
        id="J-42-v2-issuer-with-ver-1-Entra-access-tokens",
    ),
    pytest.param(_claims_build(ver="3.0"), "TokenClaimInvalid", id="J-42-ver-unknown"),
    pytest.param(_claims_build(ver=2.0), "TokenClaimInvalid", id="J-42-ver-number"),
    pytest.param(_claims_build(ver=_DROP), "TokenClaimInvalid", id="J-42-ver-missing"),
    *(
        pytest.param(
            _claims_build(iss=iss),
            "TokenIssuerNotAllowed",
            id=f"J-43-iss-{name}-CVE-2024-53861",
        )
        for iss, name in (
            (f"<BASE>/{FOREIGN_TENANT_ID}/v2.0", "other-tenant"),
            ("<ISS>/", "trailing-slash"),
            ("<BASE>/{tenantid}/v2.0", "literal-template"),
            ("<BASE>/<TID>/v2", "prefix"),
            ("127.0.0.1", "host-only"),
            ("http", "substring"),
            (["<ISS>"], "array"),
            (None, "null"),
            (_DROP, "missing"),
        )
    ),
    pytest.param(
        lambda f: f.by_idp(payload=f.claims(iss=f.idp.issuer.upper())),
        "TokenIssuerNotAllowed",
        id="J-43-iss-upper-case-OIDC-Core-3.1.3.7",
    ),
    pytest.param(
        lambda f: f.by_idp(
            payload=f.claims(iss=f.idp.issuer.replace("http://", "https://"))
        ),
        "TokenIssuerNotAllowed",
        id="J-43-iss-other-scheme-OIDC-Core-3.1.3.7",
    ),
    pytest.param(
        _claims_build(iss=f"<BASE>/{FOREIGN_TENANT_ID}/v2.0", tid=FOREIGN_TENANT_ID),
        "TokenIssuerNotAllowed",
        id="J-44-other-tenant-signed-by-shared-key-Storm-0558",
    ),
    pytest.param(
        _claims_build(tid=FOREIGN_TENANT_ID),
        "TokenTenantNotAllowed",
        id="J-44-our-issuer-other-tid-Entra-claims-validation",
    ),
    pytest.param(
        _claims_build(tid=MSA_TENANT_ID),
        "TokenTenantNotAllowed",
        id="J-44-personal-account-tenant-Entra-access-tokens",
    ),
    pytest.param(
        _claims_build(tid=_DROP), "TokenTenantNotAllowed", id="J-44-tid-missing"
    ),
    pytest.param(
        lambda f: f.by_idp(payload=f.claims(tid=f.idp.tenant_id.upper())),
        "TokenTenantNotAllowed",
        id="J-45b-tid-upper-case-exact-match",
    ),
    pytest.param(
        _claims_build(
            aud="<API_ID>",
            nonce="n-0S6_WzA2Mj",
            at_hash="77QmUPtjPfzWtF2AnpK9RQ",
            roles=_DROP,
        ),
        "TokenInvalid",
        id="J-46a-id-token-for-our-app-RFC8725-2.8",
    ),
    pytest.param(
        _claims_build(c_hash="LDktKdoQak3Pk0cnXxCltA"),
        "TokenInvalid",
        id="J-46a-c_hash-marks-an-id-token-OIDC-Core-3.3.2.11",
    ),
    pytest.param(
        _claims_build(aud=GRAPH_APP_ID, scp="User.Read"),
        "TokenAudienceNotAllowed",
        id="J-46b-microsoft-graph-token-RFC8725-2.8",
    ),
]


@pytest.mark.parametrize(("build", "code"), CLAIM_ATTACKS)
async def test_token_for_another_audience_issuer_or_tenant_is_refused(
    api: Api, build: Build, code: str
) -> None:
    await _refused(api, build(api.forge), code)


@pytest.mark.parametrize(
    "build",
    [
        pytest.param(
            _claims_build(aud=["x", "<API_ID>"]), id="J-41-aud-array-with-ours"
        ),
        pytest.param(_claims_build(aud="<API_ID>"), id="J-42-v2-aud-client-id"),
        pytest.param(_claims_build(aud="<API_URI>"), id="J-42-v2-aud-app-id-uri"),
        pytest.param(
            _claims_build(iss="<ISS_V1>", ver="1.0", aud="<API_URI>"),
            id="J-42-v1-aud-app-id-uri",
        ),
        pytest.param(
            _claims_build(iss="<ISS_V1>", ver="1.0", aud="<API_ID>"),
            id="J-42-v1-aud-client-id",
        ),
        pytest.param(
            _claims_build(idp="https://sts.windows.net/guest-home-tenant/"),
            id="J-44-guest-user-idp-differs-from-iss",
        ),
    ],
)
async def test_configured_audience_and_issuer_pairs_are_admitted(
    api: Api, build: Build
) -> None:
    assert (await api.send(build(api.forge))).status == 200


@pytest.mark.parametrize(
    "token",
    [
        pytest.param("0.ARoAv4j5cvGGr0GRqy180BHbR1cH5JRf", id="J-46d-refresh-token"),
        pytest.param(
            base64.b64encode(b"<saml:Assertion ID='x'>" * 8).decode(),
            id="J-46e-saml-assertion-base64",
        ),
    ],
)
async def test_credential_that_is_not_a_jws_is_refused_unfetched(
    api: Api, token: str
) -> None:
    await _refused(api, token, "TokenInvalid")


# --- 1.7 authorization claims ------------------------------------------------------


ROLE_ATTACKS = [
    pytest.param(None, id="J-50-roles-missing-IDW10201"),
    *(
        pytest.param(value, id=f"J-51-roles-string-{name}-CVE-2024-53861")
        for value, name in (
            ("Api.Access", "exact"),
            ("NotApi.Access", "superstring"),
            ("Api.Access,Reader", "comma-list"),
            ("Reader Api.Access", "space-list"),
            ("", "empty"),
        )
    ),
    *(
        pytest.param([value], id=f"J-52-roles-{name}-OWASP-authorization")
        for value, name in (
            ("api.access", "lower-case"),
            ("API.ACCESS", "upper-case"),
            (" Api.Access", "leading-space"),
            ("Api.Access ", "trailing-space"),
            ("\u0410pi.Access", "cyrillic-A"),
            ("Api.Access\u200b", "zero-width-space"),
        )
    ),
    *(
        pytest.param(value, id=f"J-53-roles-{name}-CWE-20")
        for value, name in (
            ([None], "null-member"),
            ([1], "number-member"),
            ([["Api.Access"]], "nested-array"),
            ([{"v": "Api.Access"}], "object-member"),
            (["r"] * 2000, "2000-entries"),
        )
    ),
]


@pytest.mark.parametrize("roles", ROLE_ATTACKS)
async def test_roles_claim_that_does_not_name_the_role_exactly_is_forbidden(
    api: Api, roles: Json
) -> None:
    claims = api.forge.claims()
    claims.pop("roles", None)
    if roles is not None:
        claims["roles"] = roles
    response = await api.send(api.forge.by_idp(payload=claims))
    await _expect_rejection(response, 403, "InsufficientRole", "insufficient_scope")
    assert 'scope="Api.Access"' in response.headers["WWW-Authenticate"]


async def test_duplicated_role_and_a_large_roles_array_with_the_role_are_admitted(
    api: Api,
) -> None:
    # J-53: only an exact string match grants, however the array is padded.
    for roles in (["Api.Access", "Api.Access"], ["r"] * 2000 + ["Api.Access"]):
        claims = api.forge.claims(roles=roles)
        assert (await api.send(api.forge.by_idp(payload=claims))).status == 200


SCOPE_CASES = [
    *(
        pytest.param(scp, 403, id=f"J-54-scp-{name}-RFC6749-3.3")
        for scp, name in (
            ("Data.ReadWrite", "superstring"),
            ("Data.Read.All", "longer-name"),
            ("xData.Read", "prefixed"),
            ("Data.Read\tOther", "tab-separated"),
            (["Data.Read"], "array"),
            (None, "missing"),
            ("data.read", "other-case"),
        )
    ),
    pytest.param("Data.Read Other", 200, id="J-54-scp-space-separated"),
    # One exact member after splitting on single spaces: the extra space is no
    # new name, so this is admitted by design.
    pytest.param("Data.Read  Other", 200, id="J-54-scp-two-spaces"),
    pytest.param(" Data.Read", 200, id="J-54-scp-leading-space"),
]


@pytest.mark.parametrize(("scp", "status"), SCOPE_CASES)
async def test_delegated_scope_matches_whole_space_separated_names(
    make_client: MakeClient,
    idp: LocalIdentityProvider,
    key_store: Credentials,
    attacker: Attacker,
    scp: Json,
    status: int,
) -> None:
    client = await make_client(required_roles=(), required_scopes=("Data.Read",))
    api = _client_api(client, idp, key_store.primary, attacker)
    claims = api.forge.claims(idtyp="user")
    claims.pop("roles", None)
    if scp is not None:
        claims["scp"] = scp
    response = await api.send(api.forge.by_idp(payload=claims))
    if status == 200:
        assert response.status == 200
    else:
        await _expect_rejection(response, 403, "InsufficientRole", "insufficient_scope")


@requires(roles=(), scopes=("Data.Read",))
async def _delegated_only(request: web.Request) -> web.Response:
    return web.json_response({"ok": True})


async def test_app_role_named_like_the_scope_is_refused_on_a_delegated_route(
    make_client: MakeClient, idp: LocalIdentityProvider, key_store: Credentials
) -> None:
    # J-55a: the route accepts the delegated scope only; an app role of the same
    # name is another kind of grant (Entra claims-validation.md, "the actor").
    client = await make_client(routes=[("/delegated", _delegated_only)])
    app_token = idp.mint_token(roles=["Data.Read"])
    user_token = idp.mint_token(scopes="Data.Read")
    refused = await client.get(
        "/delegated", headers=auth_headers(app_token, key_store.primary)
    )
    admitted = await client.get(
        "/delegated", headers=auth_headers(user_token, key_store.primary)
    )
    await _expect_rejection(refused, 403, "InsufficientRole", "insufficient_scope")
    assert admitted.status == 200
