"""The pytest plugin: a started local identity provider as the ``local_idp`` fixture."""

import importlib.util
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from .idp import LocalIdentityProvider

__all__ = ("LocalIdentityProvider", "local_idp")


def __getattr__(name: str) -> object:
    # This plugin loads in every pytest run of the environment it is installed
    # in, so aiohttp and cryptography are imported only when a test needs them.
    if name == "LocalIdentityProvider":
        from .idp import LocalIdentityProvider

        return LocalIdentityProvider
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# Without pytest-asyncio the fixture cannot run; leaving it out keeps pytest
# working for projects that install this package but test something else.
if importlib.util.find_spec("pytest_asyncio") is not None:
    import pytest_asyncio

    @pytest_asyncio.fixture
    async def local_idp() -> AsyncIterator["LocalIdentityProvider"]:
        """A `LocalIdentityProvider` on a random port, closed after the test."""
        from .idp import LocalIdentityProvider

        async with LocalIdentityProvider() as idp:
            yield idp
