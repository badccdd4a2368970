"""Configuration: read from the environment once, checked at start-up, then frozen."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from validators.base import RateLimit

from .keystore import KeyStoreError, parse_rate_limit
from .shared_store import CacheUrl, CacheUrlError

__all__ = (
    "DEFAULT_REQUIRED_ROLES",
    "Settings",
    "SettingsError",
    "is_loopback_url",
    "load_env_file",
)

DEFAULT_REQUIRED_ROLES = ("Api.Access",)
DEFAULT_AUTH_FAILURE_LIMIT = RateLimit(calls=50, period_seconds=60)
# Off unless set: while on, a subscription whose key is being abused cannot
# bring in new valid tokens either (its cached ones keep working).
DEFAULT_TOKEN_FAILURE_LIMIT: RateLimit | None = None
_CACHE_KEY_PREFIX = re.compile(r"[A-Za-z0-9._-]{0,64}")
_GUID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ROLE = re.compile(r"[A-Za-z0-9._:/-]{1,120}")
_LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class SettingsError(ValueError):
    """A setting is missing or malformed; the message names it."""

    def __init__(self, name: str, problem: str) -> None:
        self.name = name
        super().__init__(f"{name}: {problem}")


@dataclass(frozen=True, slots=True)
class Settings:
    """Everything the service reads from its environment. See docs/configuration.md."""

    tenant_id: str
    audiences: tuple[str, ...]
    subscription_keys_file: Path
    openid_config_url: str = ""
    issuers: tuple[str, ...] = ()
    required_roles: tuple[str, ...] = DEFAULT_REQUIRED_ROLES
    required_scopes: tuple[str, ...] = ()
    clock_skew_seconds: int = 60
    max_token_lifetime_seconds: int = 28 * 3600
    max_token_bytes: int = 16384
    max_header_bytes: int = 16384
    host: str = "0.0.0.0"  # noqa: S104 - a container listens on every interface
    port: int = 8080
    log_level: str = "INFO"
    log_format: str = "json"
    realm: str = "rag-api"
    jwks_refresh_seconds: int = 3600
    jwks_kid_cooldown_seconds: int = 60
    jwks_max_stale_seconds: int = 24 * 3600
    idp_connect_timeout_seconds: float = 2.0
    idp_timeout_seconds: float = 5.0
    keys_reload_seconds: float = 2.0
    token_cache_size: int = 10000
    extra_validators: tuple[str, ...] = ()
    docs_public: bool = True
    # Kept out of repr: a Redis URL may carry a password.
    cache_url: str = field(default="memory://", repr=False)
    cache_key_prefix: str = ""
    cache_connect_timeout_seconds: float = 0.25
    cache_timeout_seconds: float = 0.25
    subscription_sync_seconds: float = 1.0
    auth_failure_limit: RateLimit | None = DEFAULT_AUTH_FAILURE_LIMIT
    token_failure_limit: RateLimit | None = DEFAULT_TOKEN_FAILURE_LIMIT
    trusted_proxies: tuple[str, ...] = ()
    metrics_port: int | None = None
    metrics_public: bool = False
    allow_insecure_http: bool = False
    extras: Mapping[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        tenant = self.tenant_id
        if not self.openid_config_url:
            url = (
                f"https://login.microsoftonline.com/{tenant}/v2.0"
                "/.well-known/openid-configuration"
            )
            object.__setattr__(self, "openid_config_url", url)
        if not self.issuers:
            issuers = (
                f"https://login.microsoftonline.com/{tenant}/v2.0",
                f"https://sts.windows.net/{tenant}/",
            )
            object.__setattr__(self, "issuers", issuers)
        self._check()

    @property
    def role_check_enabled(self) -> bool:
        return bool(self.required_roles or self.required_scopes)

    def with_changes(self, **changes: Any) -> Settings:
        return replace(self, **changes)

    def redacted(self) -> dict[str, Any]:
        """The effective configuration with nothing secret in it."""
        return {
            "ENTRA_TENANT_ID": self.tenant_id,
            "ENTRA_AUDIENCES": list(self.audiences),
            "ENTRA_OPENID_CONFIG_URL": self.openid_config_url,
            "ENTRA_ISSUERS": list(self.issuers),
            "ENTRA_REQUIRED_ROLES": list(self.required_roles),
            "ENTRA_REQUIRED_SCOPES": list(self.required_scopes),
            "ENTRA_CLOCK_SKEW_SECONDS": self.clock_skew_seconds,
            "ENTRA_MAX_TOKEN_LIFETIME_SECONDS": self.max_token_lifetime_seconds,
            "APIM_SUBSCRIPTION_KEYS_FILE": str(self.subscription_keys_file),
            "HOST": self.host,
            "PORT": self.port,
            "LOG_LEVEL": self.log_level,
            "LOG_FORMAT": self.log_format,
            "AUTH_REALM": self.realm,
            "JWKS_REFRESH_SECONDS": self.jwks_refresh_seconds,
            "JWKS_KID_COOLDOWN_SECONDS": self.jwks_kid_cooldown_seconds,
            "JWKS_MAX_STALE_SECONDS": self.jwks_max_stale_seconds,
            "IDP_CONNECT_TIMEOUT_SECONDS": self.idp_connect_timeout_seconds,
            "IDP_TIMEOUT_SECONDS": self.idp_timeout_seconds,
            "KEYS_RELOAD_SECONDS": self.keys_reload_seconds,
            "TOKEN_CACHE_SIZE": self.token_cache_size,
            "MAX_TOKEN_BYTES": self.max_token_bytes,
            "MAX_HEADER_BYTES": self.max_header_bytes,
            "AUTH_EXTRA_VALIDATORS": list(self.extra_validators),
            "DOCS_PUBLIC": self.docs_public,
            "CACHE_URL": _redact_url(self.cache_url),
            "CACHE_KEY_PREFIX": self.cache_key_prefix,
            "CACHE_CONNECT_TIMEOUT_SECONDS": self.cache_connect_timeout_seconds,
            "CACHE_TIMEOUT_SECONDS": self.cache_timeout_seconds,
            "SUBSCRIPTION_SYNC_SECONDS": self.subscription_sync_seconds,
            "AUTH_FAILURE_LIMIT": _limit_text(self.auth_failure_limit),
            "TOKEN_FAILURE_LIMIT": _limit_text(self.token_failure_limit),
            "TRUSTED_PROXIES": list(self.trusted_proxies),
            "METRICS_PORT": self.metrics_port,
            "METRICS_PUBLIC": self.metrics_public,
            "ENTRA_ALLOW_INSECURE_HTTP": self.allow_insecure_http,
        }

    def _check(self) -> None:
        if not _GUID.fullmatch(self.tenant_id):
            raise SettingsError("ENTRA_TENANT_ID", "must be a lower-case tenant GUID")
        if not self.audiences or any(not a.strip() for a in self.audiences):
            raise SettingsError("ENTRA_AUDIENCES", "must list at least one audience")
        _check_url(
            "ENTRA_OPENID_CONFIG_URL", self.openid_config_url, self.allow_insecure_http
        )
        if any(not i.startswith(("https://", "http://")) for i in self.issuers):
            raise SettingsError("ENTRA_ISSUERS", "every issuer must be a URL")
        for name, values in (
            ("ENTRA_REQUIRED_ROLES", self.required_roles),
            ("ENTRA_REQUIRED_SCOPES", self.required_scopes),
        ):
            bad = [v for v in values if not _ROLE.fullmatch(v)]
            if bad:
                raise SettingsError(name, "names may hold letters, digits and ._:/-")
        _check_range("ENTRA_CLOCK_SKEW_SECONDS", self.clock_skew_seconds, 0, 600)
        _check_range(
            "ENTRA_MAX_TOKEN_LIFETIME_SECONDS",
            self.max_token_lifetime_seconds,
            60,
            7 * 86400,
        )
        _check_range("MAX_TOKEN_BYTES", self.max_token_bytes, 1024, 65536)
        _check_range("MAX_HEADER_BYTES", self.max_header_bytes, 8190, 65536)
        _check_range("PORT", self.port, 0, 65535)
        _check_range("JWKS_REFRESH_SECONDS", self.jwks_refresh_seconds, 60, 86400)
        _check_range(
            "JWKS_KID_COOLDOWN_SECONDS", self.jwks_kid_cooldown_seconds, 1, 3600
        )
        _check_range(
            "JWKS_MAX_STALE_SECONDS",
            self.jwks_max_stale_seconds,
            self.jwks_refresh_seconds,
            30 * 86400,
        )
        _check_range(
            "IDP_CONNECT_TIMEOUT_SECONDS", self.idp_connect_timeout_seconds, 0.05, 60
        )
        _check_range("IDP_TIMEOUT_SECONDS", self.idp_timeout_seconds, 0.1, 120)
        _check_range("KEYS_RELOAD_SECONDS", self.keys_reload_seconds, 0.01, 3600)
        _check_range("TOKEN_CACHE_SIZE", self.token_cache_size, 0, 10_000_000)
        if self.log_level not in _LOG_LEVELS:
            raise SettingsError("LOG_LEVEL", f"must be one of {', '.join(_LOG_LEVELS)}")
        if self.log_format not in ("json", "text"):
            raise SettingsError("LOG_FORMAT", "must be json or text")
        if not re.fullmatch(r"[A-Za-z0-9 ._:/-]{1,100}", self.realm):
            raise SettingsError("AUTH_REALM", "must be plain text without quotes")
        self._check_shared_state()
        self._check_metrics_port()

    def _check_metrics_port(self) -> None:
        if self.metrics_port is None:
            return
        _check_range("METRICS_PORT", self.metrics_port, 1, 65535)
        if self.metrics_port == self.port:
            raise SettingsError("METRICS_PORT", "must differ from PORT")

    def _check_shared_state(self) -> None:
        try:
            CacheUrl.parse(self.cache_url)
        except CacheUrlError as err:
            # The message never echoes the URL: it may hold a password.
            raise SettingsError("CACHE_URL", str(err)) from None
        if not _CACHE_KEY_PREFIX.fullmatch(self.cache_key_prefix):
            raise SettingsError(
                "CACHE_KEY_PREFIX", "may hold up to 64 letters, digits and ._-"
            )
        _check_range(
            "CACHE_CONNECT_TIMEOUT_SECONDS", self.cache_connect_timeout_seconds, 0.01, 5
        )
        _check_range("CACHE_TIMEOUT_SECONDS", self.cache_timeout_seconds, 0.01, 5)
        _check_range(
            "SUBSCRIPTION_SYNC_SECONDS", self.subscription_sync_seconds, 0.05, 60
        )
        for name, limit in (
            ("AUTH_FAILURE_LIMIT", self.auth_failure_limit),
            ("TOKEN_FAILURE_LIMIT", self.token_failure_limit),
        ):
            if limit is not None and not (
                1 <= limit.calls <= 1_000_000 and 1 <= limit.period_seconds <= 86400
            ):
                raise SettingsError(
                    name, "must be CALLS/SECONDS within 1/1 and 1000000/86400"
                )
        for proxy in self.trusted_proxies:
            try:
                ipaddress.ip_network(proxy, strict=False)
            except ValueError:
                raise SettingsError(
                    "TRUSTED_PROXIES",
                    "must list IP addresses or networks, e.g. 10.0.0.0/8",
                ) from None

    @classmethod
    def from_env(cls, env: Mapping[str, str]) -> Settings:
        """Build settings from environment variables; raises ``SettingsError``."""
        tenant = _required(env, "ENTRA_TENANT_ID").lower()
        roles = _list(env, "ENTRA_REQUIRED_ROLES", DEFAULT_REQUIRED_ROLES)
        return cls(
            tenant_id=tenant,
            audiences=_list(env, "ENTRA_AUDIENCES", None),
            subscription_keys_file=Path(_required(env, "APIM_SUBSCRIPTION_KEYS_FILE")),
            openid_config_url=env.get("ENTRA_OPENID_CONFIG_URL", "").strip(),
            issuers=_list(env, "ENTRA_ISSUERS", ()),
            required_roles=roles,
            required_scopes=_list(env, "ENTRA_REQUIRED_SCOPES", ()),
            clock_skew_seconds=_int(env, "ENTRA_CLOCK_SKEW_SECONDS", 60),
            max_token_lifetime_seconds=_int(
                env, "ENTRA_MAX_TOKEN_LIFETIME_SECONDS", 28 * 3600
            ),
            max_token_bytes=_int(env, "MAX_TOKEN_BYTES", 16384),
            max_header_bytes=_int(env, "MAX_HEADER_BYTES", 16384),
            host=env.get("HOST", "0.0.0.0").strip(),  # noqa: S104
            port=_int(env, "PORT", 8080),
            log_level=env.get("LOG_LEVEL", "INFO").strip().upper(),
            log_format=env.get("LOG_FORMAT", "json").strip().lower(),
            realm=env.get("AUTH_REALM", "rag-api").strip(),
            jwks_refresh_seconds=_int(env, "JWKS_REFRESH_SECONDS", 3600),
            jwks_kid_cooldown_seconds=_int(env, "JWKS_KID_COOLDOWN_SECONDS", 60),
            jwks_max_stale_seconds=_int(env, "JWKS_MAX_STALE_SECONDS", 86400),
            idp_connect_timeout_seconds=_float(env, "IDP_CONNECT_TIMEOUT_SECONDS", 2.0),
            idp_timeout_seconds=_float(env, "IDP_TIMEOUT_SECONDS", 5.0),
            keys_reload_seconds=_float(env, "KEYS_RELOAD_SECONDS", 2.0),
            token_cache_size=_int(env, "TOKEN_CACHE_SIZE", 10000),
            extra_validators=_list(env, "AUTH_EXTRA_VALIDATORS", ()),
            docs_public=_bool(env, "DOCS_PUBLIC", True),
            cache_url=env.get("CACHE_URL", "memory://").strip(),
            cache_key_prefix=env.get("CACHE_KEY_PREFIX", "").strip(),
            cache_connect_timeout_seconds=_float(
                env, "CACHE_CONNECT_TIMEOUT_SECONDS", 0.25
            ),
            cache_timeout_seconds=_float(env, "CACHE_TIMEOUT_SECONDS", 0.25),
            subscription_sync_seconds=_float(env, "SUBSCRIPTION_SYNC_SECONDS", 1.0),
            auth_failure_limit=_failure_limit(
                env, "AUTH_FAILURE_LIMIT", DEFAULT_AUTH_FAILURE_LIMIT
            ),
            token_failure_limit=_failure_limit(
                env, "TOKEN_FAILURE_LIMIT", DEFAULT_TOKEN_FAILURE_LIMIT
            ),
            trusted_proxies=_list(env, "TRUSTED_PROXIES", ()),
            metrics_port=_optional_int(env, "METRICS_PORT"),
            metrics_public=_bool(env, "METRICS_PUBLIC", False),
            allow_insecure_http=_bool(env, "ENTRA_ALLOW_INSECURE_HTTP", False),
            extras={k: v for k, v in env.items() if k.startswith("RAG_")},
        )


def load_env_file(path: Path) -> dict[str, str]:
    """Read ``KEY=VALUE`` lines (``#`` comments, optional quotes) from a file."""
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as err:
        raise SettingsError("--config", f"cannot read {path}: {err.strerror}") from err
    values: dict[str, str] = {}
    for number, raw in enumerate(text.splitlines(), start=1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        name, sep, value = line.removeprefix("export ").partition("=")
        if not sep or not re.fullmatch(r"[A-Z_][A-Z0-9_]*", name.strip()):
            raise SettingsError("--config", f"line {number} is not KEY=VALUE")
        values[name.strip()] = value.strip().strip("'\"")
    return values


def is_loopback_url(url: str) -> bool:
    host = urlsplit(url).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _check_url(name: str, url: str, allow_insecure_http: bool = False) -> None:
    parts = urlsplit(url)
    if parts.scheme == "https" and parts.hostname:
        return
    if parts.scheme == "http" and is_loopback_url(url):
        return
    # Dev stacks only (docker-compose's idp container): keys over plain HTTP can
    # be swapped by anyone on the path, so this is opt-in and logged at start-up.
    if parts.scheme == "http" and parts.hostname and allow_insecure_http:
        return
    raise SettingsError(
        name,
        "must be an https URL (http only on a loopback host, or on any host with "
        "ENTRA_ALLOW_INSECURE_HTTP=true in a dev stack)",
    )


def _check_range(name: str, value: float, low: float, high: float) -> None:
    if not low <= value <= high:
        raise SettingsError(name, f"must be between {low} and {high}")


def _required(env: Mapping[str, str], name: str) -> str:
    value = env.get(name, "").strip()
    if not value:
        raise SettingsError(name, "is required")
    return value


def _list(
    env: Mapping[str, str], name: str, default: tuple[str, ...] | None
) -> tuple[str, ...]:
    if name not in env:
        if default is None:
            raise SettingsError(name, "is required")
        return default
    return tuple(part.strip() for part in env[name].split(",") if part.strip())


def _int(env: Mapping[str, str], name: str, default: int) -> int:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        return int(raw)
    except ValueError:
        raise SettingsError(name, "must be a whole number") from None


def _optional_int(env: Mapping[str, str], name: str) -> int | None:
    if not env.get(name, "").strip():
        return None
    return _int(env, name, 0)


def _float(env: Mapping[str, str], name: str, default: float) -> float:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    try:
        value = float(raw)
    except ValueError:
        raise SettingsError(name, "must be a number") from None
    if value != value or value in (float("inf"), float("-inf")):
        raise SettingsError(name, "must be a finite number")
    return value


def _bool(env: Mapping[str, str], name: str, default: bool) -> bool:
    raw = env.get(name, "").strip().lower()
    if not raw:
        return default
    if raw in ("1", "true", "yes", "on"):
        return True
    if raw in ("0", "false", "no", "off"):
        return False
    raise SettingsError(name, "must be true or false")


def _failure_limit(
    env: Mapping[str, str], name: str, default: RateLimit | None
) -> RateLimit | None:
    raw = env.get(name, "").strip()
    if not raw:
        return default
    if raw in ("0", "off"):
        return None
    try:
        return parse_rate_limit(raw)
    except KeyStoreError:
        raise SettingsError(
            name, "must be CALLS/SECONDS (e.g. 50/60), or 0 for off"
        ) from None


def _limit_text(limit: RateLimit | None) -> str:
    return "0" if limit is None else f"{limit.calls}/{limit.period_seconds}"


def _redact_url(url: str) -> str:
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = f"{parts.username or ''}:***@{parts.hostname}"
    if parts.port:
        netloc += f":{parts.port}"
    return parts._replace(netloc=netloc).geturl()
