"""The ordered validator chain, frozen at start-up, and the default order of checks."""

from __future__ import annotations

import importlib
from collections.abc import Awaitable, Callable, Iterable, Sequence

from validators import (
    AccessTokenValidator,
    AudienceValidator,
    AuthContext,
    BearerTokenValidator,
    IssuerValidator,
    LifetimeValidator,
    QueryCredentialsValidator,
    RoleValidator,
    SignatureValidator,
    SigningKeyProvider,
    SubscriptionKeyValidator,
    SubscriptionLookup,
    TenantValidator,
    TokenFailureLimit,
    TokenFailureValidator,
    Validator,
)
from validators.rate_limit import RateLimiter, RateLimitValidator

from .settings import Settings, SettingsError

__all__ = ("ValidatorChain", "default_validators", "load_extra_validators")


Step = Callable[[AuthContext], Awaitable[None] | None]


class ValidatorChain:
    """Runs validators in order; the first failure answers the request.

    ``run`` returns ``None`` when every step finished without waiting, else an
    awaitable for the rest of the chain: a request whose checks never wait
    costs no coroutine. ``run_cached`` runs only the steps that are not
    ``cacheable``, for credentials the verdict cache already holds.
    """

    def __init__(self, validators: Iterable[Validator]) -> None:
        self.validators: tuple[Validator, ...] = tuple(validators)
        if not self.validators:
            raise ValueError("the validator chain is empty: every request would pass")
        for validator in self.validators:
            _check_validator(validator)
        self._steps: tuple[Step, ...] = tuple(v.validate for v in self.validators)
        self._per_request: tuple[Step, ...] = tuple(
            v.validate for v in self.per_request
        )

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(validator.name for validator in self.validators)

    @property
    def per_request(self) -> tuple[Validator, ...]:
        """The validators that run even for cached credentials."""
        return tuple(v for v in self.validators if not _cacheable(v))

    def run(self, context: AuthContext) -> Awaitable[None] | None:
        return _drive(self._steps, context)

    def run_cached(self, context: AuthContext) -> Awaitable[None] | None:
        return _drive(self._per_request, context)


def _drive(steps: tuple[Step, ...], context: AuthContext) -> Awaitable[None] | None:
    for index, step in enumerate(steps):
        pending = step(context)
        if pending is not None:
            return _finish(pending, steps[index + 1 :], context)
    return None


async def _finish(
    pending: Awaitable[None], rest: tuple[Step, ...], context: AuthContext
) -> None:
    await pending
    for step in rest:
        more = step(context)
        if more is not None:
            await more


def _cacheable(validator: Validator) -> bool:
    return getattr(validator, "cacheable", False) is True


def default_validators(
    settings: Settings,
    *,
    subscriptions: SubscriptionLookup,
    keys: SigningKeyProvider,
    clock: Callable[[], float],
    rate_limiter: RateLimiter | None = None,
    subscriptions_notify_changes: bool = False,
    token_failures: TokenFailureLimit | None = None,
) -> tuple[Validator, ...]:
    """The built-in order, written down once: cheapest and least trusting first.

    The key check comes before any token work, so a request without a key costs
    no RSA operation; authorization claims are read only after the signature.
    The rate limit follows the key, whose subscription it counts, and precedes
    the token: as APIM's ``rate-limit`` ahead of ``validate-jwt``, every call
    with a valid key counts, and a caller over its limit costs no RSA check.
    ``subscriptions_notify_changes`` says the caller drops cached verdicts on
    every key-store change, so the key check may be served from that cache.
    """
    rate_limit = () if rate_limiter is None else (RateLimitValidator(rate_limiter),)
    failures = (
        () if token_failures is None else (TokenFailureValidator(token_failures),)
    )
    return (
        QueryCredentialsValidator(),
        SubscriptionKeyValidator(
            subscriptions, cacheable=subscriptions_notify_changes
        ),
        *rate_limit,
        *failures,
        BearerTokenValidator(settings.max_token_bytes),
        SignatureValidator(keys),
        LifetimeValidator(
            clock, settings.clock_skew_seconds, settings.max_token_lifetime_seconds
        ),
        AudienceValidator(settings.audiences),
        IssuerValidator(settings.issuers),
        TenantValidator(settings.tenant_id),
        AccessTokenValidator(),
        RoleValidator(settings.required_roles, settings.required_scopes),
    )


def load_extra_validators(
    paths: Sequence[str], settings: Settings
) -> tuple[Validator, ...]:
    """Build validators named ``package.module:factory`` in ``AUTH_EXTRA_VALIDATORS``.

    The factory (a class or function) is called with the settings and must
    return a validator; it runs after the built-in checks.
    """
    built: list[Validator] = []
    for path in paths:
        module_name, _, attribute = path.partition(":")
        if not module_name or not attribute:
            raise SettingsError(
                "AUTH_EXTRA_VALIDATORS", f"{path!r} is not module:factory"
            )
        try:
            factory = getattr(importlib.import_module(module_name), attribute)
        except (ImportError, AttributeError) as err:
            raise SettingsError(
                "AUTH_EXTRA_VALIDATORS", f"cannot load {path!r}"
            ) from err
        validator = factory(settings)
        try:
            _check_validator(validator)
        except TypeError as err:
            raise SettingsError("AUTH_EXTRA_VALIDATORS", f"{path!r}: {err}") from err
        built.append(validator)
    return tuple(built)


def _check_validator(validator: object) -> None:
    name = getattr(validator, "name", None)
    validate = getattr(validator, "validate", None)
    if not isinstance(name, str) or not name:
        raise TypeError(f"{validator!r} has no name")
    if not callable(validate):
        raise TypeError(f"validator {name!r} needs a validate(context) method")
