"""A local identity provider that behaves like Entra ID, for dev mode and tests."""

import asyncio
import base64
import collections
import contextlib
import datetime as dt
import hashlib
import hmac
import json
import os
import secrets
import socket
import struct
import sys
import time
import urllib.parse
import uuid
import zlib
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from enum import Enum, StrEnum
from http import HTTPStatus
from types import TracebackType
from typing import Any, Final, Literal, Self

from aiohttp import hdrs, web
from aiohttp.typedefs import Handler, Middleware
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import padding, rsa
from cryptography.x509.oid import NameOID

from .log import idp_logger
from .logging_security import fingerprint, register_secret

__all__ = (
    "DEFAULT_APP_ID",
    "DEFAULT_TENANT_ID",
    "ENDPOINT_KINDS",
    "FOREIGN_TENANT_ID",
    "LocalIdentityProvider",
    "Outage",
    "OutageMode",
    "RegisteredClient",
    "run_idp",
)

DEFAULT_TENANT_ID: Final = "00000000-0000-4000-8000-00000000de01"
DEFAULT_APP_ID: Final = "00000000-0000-4000-8000-00000000a991"
# A second tenant, for the discovery document that names someone else's issuer.
FOREIGN_TENANT_ID: Final = "00000000-0000-4000-8000-0000000f0e19"
ENDPOINT_KINDS: Final = ("discovery", "jwks", "token")

_MIB: Final = 1024 * 1024
_BACKLOG: Final = 128
# Short, because a test that closes the provider should not wait on stragglers.
_SHUTDOWN_TIMEOUT: Final = 1.0
_REFLECTED_MAX: Final = 100
_JSON: Final = "application/json"
_NO_STORE: Final = {"Cache-Control": "no-store", "Pragma": "no-cache"}
# Entra lets discovery documents and key sets be cached for a day.
_CACHEABLE: Final = {"Cache-Control": "max-age=86400, private"}
_TRUNCATED_JSON: Final = b'{"keys":[{"kty":"RSA","use":"sig","kid":"'
_CAPTIVE_PORTAL: Final = (
    "<!DOCTYPE html><html><head><title>Sign in to the network</title></head>"
    "<body><h1>Sign in to continue</h1></body></html>"
)


class OutageMode(StrEnum):
    """How the provider misbehaves on the endpoints an `Outage` names."""

    OK = "ok"
    REFUSE = "refuse"
    RESET = "reset"
    ERROR = "error"
    STATUS = "status"
    HANG = "hang"
    SLOW = "slow"
    TRICKLE = "trickle"
    HTML = "html"
    EMPTY_KEYS = "empty_keys"
    INVALID_JSON = "invalid_json"
    OVERSIZED = "oversized"
    GZIP_BOMB = "gzip_bomb"
    BODY = "body"
    FOREIGN_ISSUER = "foreign_issuer"
    REDIRECT = "redirect"


_REDIRECT_STATUSES: Final = frozenset({301, 302, 303, 307, 308})
_DEFAULT_DELAY: Final = {OutageMode.SLOW: 10.0, OutageMode.TRICKLE: 1.0}
_DEFAULT_SIZE: Final = {
    OutageMode.OVERSIZED: 10 * _MIB,
    OutageMode.GZIP_BOMB: 64 * _MIB,
}


@dataclass(frozen=True)
class Outage:
    """A fault played on some endpoints until the next `set_outage`.

    ``delay`` is the wait before answering, in any mode (``slow`` is ``ok`` with a
    delay, 10 s unless given); for ``trickle`` it is the wait between body bytes
    (1 s unless given). ``status`` is the code for ``error`` (503 unless given),
    ``status`` (required), ``body`` (200) and ``redirect`` (302). ``size`` is the
    body size of ``oversized`` (10 MiB) and the inflated size of ``gzip_bomb``
    (64 MiB). ``refuse`` takes the whole server down, whatever ``endpoints`` says.
    """

    mode: OutageMode = OutageMode.OK
    delay: float | None = None
    status: int | None = None
    retry_after: int | None = None
    location: str | None = None
    body: bytes = b""
    content_type: str = _JSON
    size: int | None = None
    endpoints: frozenset[str] = frozenset({"discovery", "jwks"})

    def __post_init__(self) -> None:
        if not isinstance(self.mode, OutageMode):
            raise TypeError("Outage mode must be an OutageMode")
        if self.delay is not None and self.delay < 0:
            raise ValueError("Outage delay must not be negative")
        if self.retry_after is not None and self.retry_after < 0:
            raise ValueError("Outage retry_after must not be negative")
        if self.size is not None and self.size <= 0:
            raise ValueError("Outage size must be positive")
        if not self.endpoints or not self.endpoints <= set(ENDPOINT_KINDS):
            raise ValueError(f"Outage endpoints must be some of {ENDPOINT_KINDS}")
        self._check_status()

    def _check_status(self) -> None:
        if self.status is not None and not 100 <= self.status <= 599:
            raise ValueError("Outage status must be an HTTP status code")
        if self.mode is OutageMode.STATUS and self.status is None:
            raise ValueError("The status mode needs a status code")
        if self.mode is OutageMode.REDIRECT and self.status not in {
            None,
            *_REDIRECT_STATUSES,
        }:
            raise ValueError("The redirect mode needs a redirect status code")

    @property
    def effective_delay(self) -> float:
        """The delay in seconds, with the mode's default filled in."""
        if self.delay is not None:
            return self.delay
        return _DEFAULT_DELAY.get(self.mode, 0.0)

    @property
    def effective_size(self) -> int:
        """The body size in bytes, with the mode's default filled in."""
        return self.size or _DEFAULT_SIZE.get(self.mode, 0)


@dataclass(frozen=True)
class RegisteredClient:
    """A confidential client of the provider (secrets are kept apart, hashed)."""

    client_id: str
    object_id: str
    roles: tuple[str, ...]


@dataclass(frozen=True)
class _SigningKey:
    kid: str
    private_key: rsa.RSAPrivateKey
    certificate_der: bytes


class _Unset(Enum):
    UNSET = "unset"


_UNSET: Final = _Unset.UNSET


class _OAuthError(Exception):
    """A token request refused, in the shape Entra answers with."""

    def __init__(self, *, status: int, error: str, code: int, description: str):
        super().__init__(error)
        self.status = status
        self.error = error
        self.code = code
        self.description = description


@dataclass(frozen=True)
class _Grant:
    grant_type: str
    client_id: str
    client_secret: str | None
    scope: str


class LocalIdentityProvider:
    """An Entra ID look-alike on 127.0.0.1: discovery, keys, client credentials.

    Tokens from the token endpoint and from `mint_token` are RS256 v2 access
    tokens whose ``aud`` is ``api://<app_id>`` unless ``audience`` says otherwise.
    Real Entra puts the app id GUID in v2 ``aud`` and the requested form in v1;
    we follow the user's page (audience ``api://<app-id>``), and tests that want
    the GUID form pass ``claims={"aud": idp.app_id}``.
    """

    def __init__(
        self,
        *,
        tenant_id: str = DEFAULT_TENANT_ID,
        app_id: str = DEFAULT_APP_ID,
        audience: str | None = None,
        host: str = "127.0.0.1",
        port: int = 0,
        roles: Iterable[str] = ("Api.Access",),
        token_lifetime: int = 3600,
        key_size: int = 2048,
    ) -> None:
        self._tenant_id = _guid(tenant_id, "tenant_id")
        self._app_id = _guid(app_id, "app_id")
        self._audience = audience or f"api://{self._app_id}"
        self._host = host
        self._port = port
        self._roles = _role_tuple(roles)
        self._token_lifetime = _positive_int(token_lifetime, "token_lifetime")
        self._key_size = key_size
        self.hits: collections.Counter[str] = collections.Counter()
        self._init_keys()
        self._init_clients()
        self._init_server_state()

    def _init_keys(self) -> None:
        self._keys: dict[str, _SigningKey] = {}
        self._retired: dict[str, _SigningKey] = {}
        self._current_kid = ""
        self.rotate_key()

    def _init_clients(self) -> None:
        self._clients: dict[str, RegisteredClient] = {}
        self._secret_digests: dict[str, bytes] = {}
        self._client_id = str(uuid.uuid4())
        self._client_secret = secrets.token_urlsafe(30)
        self._user_object_id = str(uuid.uuid4())
        self.register_client(self._client_id, self._client_secret)

    def _init_server_state(self) -> None:
        self._outage = Outage()
        self._released = asyncio.Event()
        self._closing = asyncio.Event()
        self._runner: web.AppRunner | None = None
        self._listeners: list[asyncio.Server] = []
        self._held_socket: socket.socket | None = None
        self._reopening: asyncio.Task[None] | None = None
        self._bound_port: int | None = None
        self._closed = False
        self._bombs: dict[int, bytes] = {}

    # Lifecycle

    async def __aenter__(self) -> Self:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        traceback: TracebackType | None,
    ) -> None:
        await self.close()

    async def start(self) -> None:
        """Bind the port and start answering; a provider starts once."""
        if self._runner is not None or self._closed:
            raise RuntimeError("A LocalIdentityProvider can be started only once")
        runner = web.AppRunner(
            self._build_app(), access_log=None, shutdown_timeout=_SHUTDOWN_TIMEOUT
        )
        await runner.setup()
        self._runner = runner
        try:
            sock = _bind(self._host, self._port)
            self._bound_port = sock.getsockname()[1]
            await self._serve_on(sock)
        except BaseException:
            await self.close()
            raise
        idp_logger.info(
            "Local identity provider listening on %s",
            self.base_url,
            extra={"base_url": self.base_url, "tenant_id": self._tenant_id},
        )

    async def close(self) -> None:
        """Stop answering, release hung requests and free the port; idempotent."""
        if self._closed:
            return
        self._closed = True
        self._closing.set()
        self._release_hung_requests()
        while (reopening := self._reopening) is not None:
            await asyncio.gather(reopening, return_exceptions=True)
            if self._reopening is reopening:
                self._reopening = None
        for listener in self._listeners:
            listener.close()
        if self._held_socket is not None:
            self._held_socket.close()
        if self._runner is not None:
            await self._runner.cleanup()
        for listener in self._listeners:
            await listener.wait_closed()

    async def _serve_on(self, sock: socket.socket) -> None:
        protocol_factory = None if self._runner is None else self._runner.server
        if protocol_factory is None:
            raise RuntimeError("The identity provider is not set up")
        loop = asyncio.get_running_loop()
        try:
            listener = await loop.create_server(protocol_factory, sock=sock)
        except BaseException:
            sock.close()
            raise
        self._listeners.append(listener)

    def _build_app(self) -> web.Application:
        app = web.Application(middlewares=[self._fault_middleware()])
        app.router.add_get(
            "/{tenant}/v2.0/.well-known/openid-configuration",
            self._handle_discovery,
            name="discovery",
        )
        app.router.add_get(
            "/{tenant}/discovery/v2.0/keys", self._handle_jwks, name="jwks"
        )
        app.router.add_post(
            "/{tenant}/oauth2/v2.0/token", self._handle_token, name="token"
        )
        return app

    # Addresses

    @property
    def base_url(self) -> str:
        """``http://<host>:<port>``, once started."""
        if self._bound_port is None:
            raise RuntimeError("The identity provider is not started")
        host = f"[{self._host}]" if ":" in self._host else self._host
        return f"http://{host}:{self._bound_port}"

    @property
    def port(self) -> int:
        """The bound port (a random one when constructed with port 0)."""
        if self._bound_port is None:
            raise RuntimeError("The identity provider is not started")
        return self._bound_port

    @property
    def tenant_id(self) -> str:
        return self._tenant_id

    @property
    def app_id(self) -> str:
        return self._app_id

    @property
    def audience(self) -> str:
        return self._audience

    @property
    def issuer(self) -> str:
        return f"{self.base_url}/{self._tenant_id}/v2.0"

    @property
    def issuer_v1(self) -> str:
        return f"{self.base_url}/{self._tenant_id}/"

    @property
    def openid_config_url(self) -> str:
        return f"{self.issuer}/.well-known/openid-configuration"

    @property
    def jwks_uri(self) -> str:
        return f"{self.base_url}/{self._tenant_id}/discovery/v2.0/keys"

    @property
    def token_endpoint(self) -> str:
        return f"{self.base_url}/{self._tenant_id}/oauth2/v2.0/token"

    @property
    def authorization_endpoint(self) -> str:
        """Advertised like Entra's; not served (only client credentials are)."""
        return f"{self.base_url}/{self._tenant_id}/oauth2/v2.0/authorize"

    @property
    def scope(self) -> str:
        """The client-credentials scope, ``<audience>/.default``."""
        return f"{self._audience}/.default"

    # Clients

    @property
    def client_id(self) -> str:
        """The confidential client registered at construction."""
        return self._client_id

    @property
    def client_secret(self) -> str:
        return self._client_secret

    @property
    def clients(self) -> Mapping[str, RegisteredClient]:
        return dict(self._clients)

    def register_client(
        self, client_id: str, secret: str, roles: Iterable[str] | None = None
    ) -> RegisteredClient:
        """Add a confidential client; ``roles`` default to the provider's."""
        if not client_id or not isinstance(client_id, str):
            raise ValueError("client_id must be a non-empty string")
        if client_id in self._clients:
            raise ValueError(f"Client {client_id!r} is already registered")
        if not secret or not isinstance(secret, str):
            raise ValueError("The client secret must be a non-empty string")
        granted = self._roles if roles is None else _role_tuple(roles)
        client = RegisteredClient(client_id, str(uuid.uuid4()), granted)
        self._clients[client_id] = client
        self._secret_digests[client_id] = _digest(secret)
        # Known to the log filter by value, wherever it might surface.
        register_secret(secret)
        return client

    # Keys

    @property
    def current_kid(self) -> str:
        """The key that signs by default (a removed one if all were removed)."""
        return self._current_kid

    @property
    def kids(self) -> tuple[str, ...]:
        """The published key ids, oldest first."""
        return tuple(self._keys)

    def rotate_key(self) -> str:
        """Publish a new key and sign with it from now on; old keys stay."""
        key = _generate_signing_key(self._key_size)
        self._keys[key.kid] = key
        self._current_kid = key.kid
        idp_logger.info("Signing key added", extra={"kid": key.kid})
        return key.kid

    def remove_key(self, kid: str) -> None:
        """Unpublish a key; it can still sign, for tokens nobody should accept."""
        key = self._keys.pop(kid, None)
        if key is None:
            raise ValueError(f"Key {kid!r} is not published")
        self._retired[kid] = key
        if kid == self._current_kid and self._keys:
            self._current_kid = next(reversed(self._keys))
        idp_logger.info("Signing key removed", extra={"kid": kid})

    def jwks(self) -> dict[str, list[dict[str, Any]]]:
        """The key set as the keys endpoint serves it when healthy."""
        return {"keys": [_public_jwk(key) for key in self._keys.values()]}

    def openid_configuration(self, issuer: str | None = None) -> dict[str, Any]:
        """The discovery document as served when healthy."""
        return {
            "issuer": issuer or self.issuer,
            "authorization_endpoint": self.authorization_endpoint,
            "token_endpoint": self.token_endpoint,
            "jwks_uri": self.jwks_uri,
            "token_endpoint_auth_methods_supported": [
                "client_secret_post",
                "client_secret_basic",
            ],
            "grant_types_supported": ["client_credentials"],
            "response_modes_supported": ["query", "fragment", "form_post"],
            "response_types_supported": ["code", "id_token", "code id_token"],
            "subject_types_supported": ["pairwise"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid", "profile", "email", "offline_access"],
            "claims_supported": ["sub", "iss", "aud", "exp", "iat", "nbf", "tid"],
            "tenant_region_scope": "local",
            "cloud_instance_name": "localhost",
        }

    # Tokens

    def mint_token(
        self,
        *,
        claims: Mapping[str, object] | None = None,
        drop: Iterable[str] = (),
        version: Literal["1.0", "2.0"] = "2.0",
        kid: str | None = None,
        header: Mapping[str, object] | None = None,
        drop_header: Iterable[str] = (),
        lifetime: int | None = None,
        roles: Iterable[str] | _Unset | None = _UNSET,
        scopes: str | None = None,
        client_id: str | None = None,
    ) -> str:
        """Sign an access token like Entra's, with chosen changes.

        ``claims`` override or extend the defaults, ``drop`` removes claims after
        that (each must be present, so a typo fails loudly); ``header`` and
        ``drop_header`` do the same for the JOSE header, which never changes the
        signing: always RS256 with key ``kid`` (default the current key, removed
        keys allowed). ``roles=None`` omits the claim; ``scopes`` makes a
        delegated (user) token with ``scp`` and, unless given, no ``roles``.
        A negative ``lifetime`` gives an expired token.
        """
        key = self._signing_key(kid)
        if roles is _UNSET:
            # Entra leaves out the roles claim when the client was granted none.
            granted = self._client(client_id).roles or None
            roles = None if scopes is not None else granted
        payload = self._default_claims(version, lifetime, client_id, scopes)
        if roles is not None:
            payload["roles"] = list(_role_tuple(roles))
        payload.update(claims or {})
        _drop(payload, drop, "claim")
        head = _default_header(version, key.kid)
        head.update(header or {})
        _drop(head, drop_header, "header field")
        return _sign(_json_bytes(head), _json_bytes(payload), key)

    def sign_raw(
        self, header_bytes: bytes, payload_bytes: bytes, kid: str | None = None
    ) -> str:
        """Sign exactly these bytes (duplicate keys, NaN, deep nesting...)."""
        if not isinstance(header_bytes, bytes) or not isinstance(payload_bytes, bytes):
            raise TypeError("sign_raw signs bytes")
        return _sign(header_bytes, payload_bytes, self._signing_key(kid))

    def _signing_key(self, kid: str | None) -> _SigningKey:
        wanted = self._current_kid if kid is None else kid
        key = self._keys.get(wanted) or self._retired.get(wanted)
        if key is None:
            raise ValueError(f"No signing key {wanted!r}")
        return key

    def _client(self, client_id: str | None) -> RegisteredClient:
        wanted = self._client_id if client_id is None else client_id
        client = self._clients.get(wanted)
        if client is None:
            raise ValueError(f"Client {wanted!r} is not registered")
        return client

    def _default_claims(
        self,
        version: str,
        lifetime: int | None,
        client_id: str | None,
        scopes: str | None,
    ) -> dict[str, object]:
        if version not in {"1.0", "2.0"}:
            raise ValueError("version must be '1.0' or '2.0'")
        client = self._client(client_id)
        now = int(time.time())
        principal = client.object_id if scopes is None else self._user_object_id
        token_id = _b64url(secrets.token_bytes(16))
        v1 = version == "1.0"
        payload: dict[str, object] = {
            "aud": self._audience,
            "iss": self.issuer_v1 if v1 else self.issuer,
            "iat": now,
            "nbf": now,
            "exp": now + (self._token_lifetime if lifetime is None else lifetime),
            ("appid" if v1 else "azp"): client.client_id,
            ("appidacr" if v1 else "azpacr"): "1",
            "idtyp": "app" if scopes is None else "user",
            "oid": principal,
            "sub": principal,
            "tid": self._tenant_id,
            "uti": token_id,
            "jti": token_id,
            "ver": version,
        }
        if scopes is not None:
            payload["scp"] = scopes
        return payload

    # Faults

    @property
    def outage(self) -> Outage:
        return self._outage

    def set_outage(
        self,
        mode: OutageMode | str = OutageMode.OK,
        *,
        delay: float | None = None,
        status: int | None = None,
        retry_after: int | None = None,
        location: str | None = None,
        body: bytes = b"",
        content_type: str = _JSON,
        size: int | None = None,
        endpoints: Iterable[str] = ("discovery", "jwks"),
    ) -> Outage:
        """Play a fault from now on (``"ok"`` ends it); see `Outage`."""
        outage = Outage(
            OutageMode(mode),
            delay=delay,
            status=status,
            retry_after=retry_after,
            location=location,
            body=body,
            content_type=content_type,
            size=size,
            endpoints=frozenset(endpoints),
        )
        self._switch_listener(outage.mode is OutageMode.REFUSE)
        self._outage = outage
        self._release_hung_requests()
        idp_logger.info("Outage mode set to %s", outage.mode.value)
        return outage

    def _switch_listener(self, refuse: bool) -> None:
        if self._runner is None or self._closed:
            if refuse:
                raise RuntimeError("The refuse mode needs a started provider")
            return
        if self._reopening is not None:
            # The task that listens again checks the mode once it has finished.
            return
        if refuse and self._held_socket is None:
            self._stop_listening()
        elif not refuse and self._held_socket is not None:
            self._listen_again()

    def _stop_listening(self) -> None:
        # Server.close() closes the listening socket at once; a bound socket
        # that does not listen keeps the port and makes connects fail with
        # ECONNREFUSED, which is what a dead identity provider looks like.
        for listener in self._listeners:
            listener.close()
        self._held_socket = _bind(self._host, self.port)

    def _listen_again(self) -> None:
        sock, self._held_socket = self._held_socket, None
        assert sock is not None
        # Listening now, synchronously, queues connections made right after
        # this call until the server task below starts accepting them.
        sock.listen(_BACKLOG)
        self._reopening = asyncio.get_running_loop().create_task(self._reopen(sock))

    async def _reopen(self, sock: socket.socket) -> None:
        try:
            await self._serve_on(sock)
        finally:
            self._reopening = None
        if not self._closed:
            self._switch_listener(self._outage.mode is OutageMode.REFUSE)

    def _release_hung_requests(self) -> None:
        self._released.set()
        self._released = asyncio.Event()

    def _fault_middleware(self) -> Middleware:
        @web.middleware
        async def play_outage(
            request: web.Request, handler: Handler
        ) -> web.StreamResponse:
            kind = request.match_info.route.name
            if kind is not None:
                self.hits[kind] += 1
            return await self._answer(request, handler, kind)

        return play_outage

    async def _answer(
        self, request: web.Request, handler: Handler, kind: str | None
    ) -> web.StreamResponse:
        while not self._closing.is_set():
            outage = self._outage
            if outage.mode is OutageMode.REFUSE:
                return _reset_connection(request)
            if kind is None or kind not in outage.endpoints:
                return await handler(request)
            if outage.mode is not OutageMode.HANG:
                return await self._play(outage, request, handler, kind)
            await self._released.wait()
        return _status_response(503)

    async def _play(
        self, outage: Outage, request: web.Request, handler: Handler, kind: str
    ) -> web.StreamResponse:
        if outage.mode is OutageMode.TRICKLE:
            return await self._trickle(request, kind, outage.effective_delay)
        await self._pause(outage.effective_delay)
        match outage.mode:
            case OutageMode.RESET:
                return _reset_connection(request)
            case OutageMode.ERROR | OutageMode.STATUS:
                return _status_response(outage.status or 503, outage.retry_after)
            case OutageMode.HTML:
                return web.Response(text=_CAPTIVE_PORTAL, content_type="text/html")
            case OutageMode.EMPTY_KEYS if kind == "jwks":
                return _json_response({"keys": []})
            case OutageMode.INVALID_JSON:
                return web.Response(body=_TRUNCATED_JSON, content_type=_JSON)
            case OutageMode.OVERSIZED:
                return self._oversized(kind, outage.effective_size)
            case OutageMode.GZIP_BOMB:
                return await self._gzip_bomb(outage.effective_size)
            case OutageMode.BODY:
                return _body_response(outage)
            case OutageMode.FOREIGN_ISSUER if kind == "discovery":
                foreign = f"{self.base_url}/{FOREIGN_TENANT_ID}/v2.0"
                return _json_response(self.openid_configuration(issuer=foreign))
            case OutageMode.REDIRECT:
                return _redirect_response(outage, request)
        return await handler(request)

    async def _pause(self, seconds: float) -> None:
        if seconds <= 0:
            return
        # Waiting on the closing event lets close() cut every pause short.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._closing.wait(), seconds)

    def _healthy_document(self, kind: str) -> dict[str, object]:
        if kind == "discovery":
            return self.openid_configuration()
        if kind == "jwks":
            return {"keys": self.jwks()["keys"]}
        return {"token_type": "Bearer", "access_token": ""}

    async def _trickle(
        self, request: web.Request, kind: str, interval: float
    ) -> web.StreamResponse:
        body = _json_bytes(self._healthy_document(kind))
        response = web.StreamResponse(headers={hdrs.CONTENT_TYPE: _JSON})
        response.content_length = len(body)
        await response.prepare(request)
        with contextlib.suppress(ConnectionError):
            for index in range(len(body)):
                if self._closing.is_set():
                    break
                await response.write(body[index : index + 1])
                await self._pause(interval)
        return response

    def _oversized(self, kind: str, size: int) -> web.Response:
        # Valid JSON with the real content, so only a size cap can refuse it.
        document = self._healthy_document(kind)
        document["x-padding"] = ""
        filler = max(size - len(_json_bytes(document)), 0)
        document["x-padding"] = "x" * filler
        return web.Response(body=_json_bytes(document), content_type=_JSON)

    async def _gzip_bomb(self, size: int) -> web.Response:
        if size not in self._bombs:
            # Compressing tens of MiB takes a while: off the loop, then kept.
            self._bombs[size] = await asyncio.to_thread(_build_gzip_bomb, size)
        return web.Response(
            body=self._bombs[size],
            content_type=_JSON,
            headers={hdrs.CONTENT_ENCODING: "gzip"},
        )

    # Endpoints

    async def _handle_discovery(self, request: web.Request) -> web.Response:
        if (refusal := self._tenant_refusal(request)) is not None:
            return refusal
        return _json_response(self.openid_configuration(), headers=_CACHEABLE)

    async def _handle_jwks(self, request: web.Request) -> web.Response:
        if (refusal := self._tenant_refusal(request)) is not None:
            return refusal
        return _json_response(self.jwks(), headers=_CACHEABLE)

    async def _handle_token(self, request: web.Request) -> web.Response:
        if (refusal := self._tenant_refusal(request)) is not None:
            return refusal
        try:
            grant = await _read_grant(request)
            client = self._authenticate(grant)
        except _OAuthError as err:
            idp_logger.info(
                "Token request refused with %s (AADSTS%s)",
                err.error,
                err.code,
                extra={"oauth_error": err.error, "aadsts": err.code},
            )
            return self._oauth_error_response(err)
        return self._issue(client)

    def _tenant_refusal(self, request: web.Request) -> web.Response | None:
        tenant = request.match_info["tenant"]
        if tenant.lower() == self._tenant_id:
            return None
        return self._oauth_error_response(
            _OAuthError(
                status=400,
                error="invalid_tenant",
                code=90002,
                description=f"Tenant '{_reflect(tenant)}' not found.",
            )
        )

    def _authenticate(self, grant: _Grant) -> RegisteredClient:
        if grant.grant_type != "client_credentials":
            raise _OAuthError(
                status=400,
                error="unsupported_grant_type",
                code=70003,
                description="The app requested an unsupported grant type "
                f"'{_reflect(grant.grant_type)}'.",
            )
        resource = _resource_of(grant.scope)
        client = self._clients.get(grant.client_id)
        if client is None:
            raise _OAuthError(
                status=400,
                error="unauthorized_client",
                code=700016,
                description=f"Application with identifier '{_reflect(grant.client_id)}'"
                f" was not found in the directory '{self._tenant_id}'.",
            )
        self._check_secret(grant)
        self._check_resource(resource)
        return client

    def _check_secret(self, grant: _Grant) -> None:
        if grant.client_secret is None:
            raise _OAuthError(
                status=401,
                error="invalid_client",
                code=7000216,
                description="'client_assertion', 'client_secret' or 'request' "
                "is required for the 'client_credentials' grant type.",
            )
        # Digests of equal length, compared in constant time.
        expected = self._secret_digests[grant.client_id]
        if not hmac.compare_digest(_digest(grant.client_secret), expected):
            raise _OAuthError(
                status=401,
                error="invalid_client",
                code=7000215,
                description="Invalid client secret provided. Send the secret's "
                f"value, not its id, for app '{_reflect(grant.client_id)}'.",
            )

    def _check_resource(self, resource: str) -> None:
        known = {self._audience, f"api://{self._app_id}", self._app_id}
        if resource not in known:
            raise _OAuthError(
                status=400,
                error="invalid_resource",
                code=500011,
                description=f"The resource principal named {_reflect(resource)} "
                f"was not found in the tenant named {self._tenant_id}.",
            )

    def _issue(self, client: RegisteredClient) -> web.Response:
        token = self.mint_token(client_id=client.client_id)
        idp_logger.info(
            "Token issued for client %s",
            client.client_id,
            extra={
                "client_id": client.client_id,
                "kid": self._current_kid,
                "token_fp": fingerprint(token),
            },
        )
        return _json_response(
            {
                "token_type": "Bearer",
                "expires_in": self._token_lifetime,
                "ext_expires_in": self._token_lifetime,
                "access_token": token,
            },
            headers=_NO_STORE,
        )

    def _oauth_error_response(self, err: _OAuthError) -> web.Response:
        now = dt.datetime.now(dt.UTC)
        trace_id, correlation_id = str(uuid.uuid4()), str(uuid.uuid4())
        stamp = now.strftime("%Y-%m-%d %H:%M:%SZ")
        headers = dict(_NO_STORE)
        if err.status == 401:
            headers[hdrs.WWW_AUTHENTICATE] = f'Basic realm="{self._tenant_id}"'
        body = {
            "error": err.error,
            "error_description": f"AADSTS{err.code}: {err.description} "
            f"Trace ID: {trace_id} Correlation ID: {correlation_id} "
            f"Timestamp: {stamp}",
            "error_codes": [err.code],
            "timestamp": stamp,
            "trace_id": trace_id,
            "correlation_id": correlation_id,
        }
        return _json_response(body, status=err.status, headers=headers)


# Token requests


def _missing_parameter(name: str) -> _OAuthError:
    return _OAuthError(
        status=400,
        error="invalid_request",
        code=900144,
        description=f"The request body must contain the following parameter: '{name}'.",
    )


def _malformed_request(reason: str) -> _OAuthError:
    return _OAuthError(
        status=400,
        error="invalid_request",
        code=9002313,
        description=f"Invalid request. Request is malformed or invalid: {reason}.",
    )


async def _read_grant(request: web.Request) -> _Grant:
    form = await request.post()
    values = {
        name: _single(form.getall(name, []), name)
        for name in ("grant_type", "client_id", "client_secret", "scope")
    }
    basic = _basic_credentials(request)
    if basic is not None:
        values = _merge_basic(values, basic)
    for name in ("grant_type", "client_id", "scope"):
        if values[name] is None:
            raise _missing_parameter(name)
    return _Grant(
        grant_type=str(values["grant_type"]),
        client_id=str(values["client_id"]),
        client_secret=values["client_secret"],
        scope=str(values["scope"]),
    )


def _single(values: Sequence[object], name: str) -> str | None:
    # RFC 6749 section 3.2: parameters must not be sent more than once.
    if len(values) > 1:
        raise _malformed_request(f"'{name}' is repeated")
    if not values or values[0] == "":
        return None
    if not isinstance(values[0], str):
        raise _malformed_request(f"'{name}' is not a form field")
    return values[0]


def _basic_credentials(request: web.Request) -> tuple[str, str] | None:
    header = request.headers.get(hdrs.AUTHORIZATION)
    if header is None:
        return None
    scheme, _, encoded = header.partition(" ")
    try:
        if scheme.lower() != "basic":
            raise ValueError(scheme)
        decoded = base64.b64decode(encoded.strip(), validate=True).decode("utf-8")
    except ValueError as err:
        raise _malformed_request("the Authorization header is not Basic") from err
    login, colon, password = decoded.partition(":")
    if not colon:
        raise _malformed_request("the Basic credentials have no colon")
    # RFC 6749 section 2.3.1: both parts are form-encoded before Basic encoding.
    return urllib.parse.unquote_plus(login), urllib.parse.unquote_plus(password)


def _merge_basic(
    values: dict[str, str | None], basic: tuple[str, str]
) -> dict[str, str | None]:
    client_id, secret = basic
    # RFC 6749 section 2.3: a client uses one authentication method at a time.
    if values["client_secret"] is not None:
        raise _malformed_request("the client authenticated twice")
    if values["client_id"] not in {None, client_id}:
        raise _malformed_request("two different client ids were sent")
    return {**values, "client_id": client_id, "client_secret": secret or None}


def _resource_of(scope: str) -> str:
    scopes = scope.split()
    if len(scopes) != 1:
        raise _OAuthError(
            status=400,
            error="invalid_scope",
            code=70011,
            description="The provided value for the input parameter 'scope' is not "
            "valid: client credentials take exactly one '/.default' scope.",
        )
    resource, suffix = scopes[0].removesuffix("/.default"), "/.default"
    if not scopes[0].endswith(suffix) or not resource:
        raise _OAuthError(
            status=400,
            error="invalid_scope",
            code=1002012,
            description=f"The provided value for scope {_reflect(scopes[0])} is not "
            "valid. Client credential flows must have a scope value with /.default "
            "suffixed to the resource identifier (application ID URI).",
        )
    return resource


def _reflect(value: str) -> str:
    # Echo only a bounded, printable prefix of what the caller sent.
    printable = "".join(char if char.isprintable() else "?" for char in value)
    return printable[:_REFLECTED_MAX]


# Responses


def _json_bytes(value: object) -> bytes:
    # allow_nan=False: a NaN would make invalid JSON; sign_raw is for that.
    return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()


def _json_response(
    value: object, *, status: int = 200, headers: Mapping[str, str] | None = None
) -> web.Response:
    return web.Response(
        body=_json_bytes(value),
        status=status,
        content_type=_JSON,
        charset="utf-8",
        headers=headers,
    )


def _status_response(status: int, retry_after: int | None = None) -> web.Response:
    headers = {} if retry_after is None else {hdrs.RETRY_AFTER: str(retry_after)}
    reason = _reason(status)
    return web.Response(status=status, text=reason, headers=headers)


def _reason(status: int) -> str:
    try:
        return HTTPStatus(status).phrase
    except ValueError:
        return "Unknown"


def _body_response(outage: Outage) -> web.Response:
    return web.Response(
        body=outage.body,
        status=outage.status or 200,
        headers={hdrs.CONTENT_TYPE: outage.content_type},
    )


def _redirect_response(outage: Outage, request: web.Request) -> web.Response:
    # .invalid never resolves (RFC 6761), so a client that follows fails.
    location = outage.location or f"http://idp.invalid{request.path_qs}"
    return web.Response(status=outage.status or 302, headers={hdrs.LOCATION: location})


def _reset_connection(request: web.Request) -> web.Response:
    transport = request.transport
    if transport is not None:
        sock = transport.get_extra_info("socket")
        if sock is not None:
            # Linger 0 makes close() send RST instead of FIN: a reset, not an EOF.
            sock.setsockopt(
                socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0)
            )
        transport.abort()
    # Never written: the connection is gone, aiohttp drops it quietly.
    return web.Response(status=503)


def _build_gzip_bomb(size: int) -> bytes:
    # Valid JSON once inflated (whitespace inside an array), so only a cap on
    # the decompressed size refuses it.
    compressor = zlib.compressobj(9, zlib.DEFLATED, 31)
    parts = [compressor.compress(b'{"keys":[')]
    chunk = b" " * _MIB
    for _ in range(size // _MIB):
        parts.append(compressor.compress(chunk))
    parts.append(compressor.compress(b" " * (size % _MIB) + b"]}"))
    parts.append(compressor.flush())
    return b"".join(parts)


# Keys and signing


def _generate_signing_key(key_size: int) -> _SigningKey:
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=key_size)
    certificate = _self_signed_certificate(private_key)
    # Entra's kid is the certificate's x5t: its base64url SHA-1 thumbprint
    # (RFC 7517 section 4.8 defines x5t as SHA-1; it names, it does not protect).
    thumbprint = certificate.fingerprint(hashes.SHA1())  # noqa: S303
    return _SigningKey(
        kid=_b64url(thumbprint),
        private_key=private_key,
        certificate_der=certificate.public_bytes(serialization.Encoding.DER),
    )


def _self_signed_certificate(private_key: rsa.RSAPrivateKey) -> x509.Certificate:
    name = x509.Name(
        [
            x509.NameAttribute(
                NameOID.COMMON_NAME, "rag-api-core local identity provider"
            )
        ]
    )
    now = dt.datetime.now(dt.UTC)
    return (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(private_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .sign(private_key, hashes.SHA256())
    )


def _public_jwk(key: _SigningKey) -> dict[str, Any]:
    numbers = key.private_key.public_key().public_numbers()
    return {
        "kty": "RSA",
        "use": "sig",
        "kid": key.kid,
        "x5t": key.kid,
        "n": _b64url(_int_bytes(numbers.n)),
        "e": _b64url(_int_bytes(numbers.e)),
        "x5c": [base64.b64encode(key.certificate_der).decode()],
        "alg": "RS256",
    }


def _default_header(version: str, kid: str) -> dict[str, object]:
    header: dict[str, object] = {"typ": "JWT", "alg": "RS256"}
    if version == "1.0":
        # Entra's v1 tokens also carry the thumbprint as x5t.
        header["x5t"] = kid
    header["kid"] = kid
    return header


def _sign(header_bytes: bytes, payload_bytes: bytes, key: _SigningKey) -> str:
    signing_input = f"{_b64url(header_bytes)}.{_b64url(payload_bytes)}"
    signature = key.private_key.sign(
        signing_input.encode("ascii"), padding.PKCS1v15(), hashes.SHA256()
    )
    return f"{signing_input}.{_b64url(signature)}"


def _b64url(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _int_bytes(value: int) -> bytes:
    return value.to_bytes((value.bit_length() + 7) // 8, "big")


def _digest(secret: str) -> bytes:
    return hashlib.sha256(secret.encode("utf-8")).digest()


def _drop(values: dict[str, object], names: Iterable[str], what: str) -> None:
    for name in names:
        if name not in values:
            raise ValueError(f"Cannot drop {what} {name!r}: it is not there")
        del values[name]


# Small checks and sockets


def _guid(value: str, setting: str) -> str:
    try:
        return str(uuid.UUID(value))
    except (ValueError, TypeError, AttributeError) as err:
        raise ValueError(f"{setting} must be a GUID") from err


def _role_tuple(roles: Iterable[str]) -> tuple[str, ...]:
    if isinstance(roles, str):
        raise TypeError("roles must be an iterable of strings, not one string")
    values = tuple(roles)
    if not all(isinstance(role, str) and role for role in values):
        raise TypeError("roles must be non-empty strings")
    return values


def _positive_int(value: int, setting: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ValueError(f"{setting} must be a positive integer")
    return value


def _bind(host: str, port: int) -> socket.socket:
    family, kind, proto, _, address = socket.getaddrinfo(
        host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE
    )[0]
    sock = socket.socket(family, kind, proto)
    try:
        # As asyncio does on POSIX, so the port can be bound again at once.
        if os.name == "posix" and sys.platform != "cygwin":
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind(address)
    except OSError:
        sock.close()
        raise
    sock.setblocking(False)
    return sock


# The command


def _banner(idp: LocalIdentityProvider) -> list[str]:
    form = (
        f"-d grant_type=client_credentials -d client_id={idp.client_id} "
        f"-d client_secret={idp.client_secret} --data-urlencode scope={idp.scope}"
    )
    body = (
        f'@{{ grant_type = "client_credentials"; client_id = "{idp.client_id}"; '
        f'client_secret = "{idp.client_secret}"; scope = "{idp.scope}" }}'
    )
    return [
        f"Local identity provider (an Entra ID look-alike) on {idp.base_url}",
        f"tenant id:      {idp.tenant_id}",
        f"app id:         {idp.app_id}",
        f"audience:       {idp.audience}",
        f"issuer:         {idp.issuer}",
        f"discovery:      {idp.openid_config_url}",
        f"jwks:           {idp.jwks_uri}",
        f"token endpoint: {idp.token_endpoint}",
        f"client id:      {idp.client_id}",
        f"client secret:  {idp.client_secret}",
        "",
        "Get a token (client credentials):",
        f'curl -s -X POST "{idp.token_endpoint}" {form}',
        "",
        "PowerShell:",
        f'Invoke-RestMethod -Method POST -Uri "{idp.token_endpoint}" -Body {body}',
        "",
    ]


async def run_idp(
    host: str, port: int, tenant_id: str | None, app_id: str | None
) -> None:
    """Serve a provider and print how to use it, until cancelled."""
    # Key generation takes a noticeable fraction of a second: off the loop.
    provider = await asyncio.to_thread(
        LocalIdentityProvider,
        host=host,
        port=port,
        tenant_id=tenant_id or DEFAULT_TENANT_ID,
        app_id=app_id or DEFAULT_APP_ID,
    )
    async with provider:
        print("\n".join(_banner(provider)), flush=True)
        await asyncio.Event().wait()
