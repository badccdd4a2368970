"""Contract tests: schemathesis against the service's own OpenAPI document.

The document is fetched from the running service (``/api/docs/openapi.json``), as
APIM would import it. Each documented operation gets generated requests with a
valid subscription key and token, and schemathesis's checks hold the answers to
the document: a status it does not list, a body or header that does not match,
a 5xx, or an operation that answers without its credentials, each fails the run.
The service runs on its own loop in a thread, so these synchronous tests reach
it over real HTTP.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings

from service.idp import LocalIdentityProvider
from service.keystore import KeyStoreFile
from service.settings import Settings
from tests.conftest import settings_for
from tests.raw_http import LiveService


@dataclass(frozen=True)
class Contract:
    service: LiveService
    key: str
    token: str

    @property
    def credentials(self) -> dict[str, str]:
        return {
            "Authorization": f"Bearer {self.token}",
            "Ocp-Apim-Subscription-Key": self.key,
        }


def _settings(idp: LocalIdentityProvider, keys_file: Path) -> Settings:
    # The checks send requests without credentials on purpose (ignored_auth);
    # the failed-authentication throttle would answer those with 429 later on.
    return settings_for(idp, keys_file, auth_failure_limit=None, metrics_public=False)


@pytest.fixture(scope="module")
def contract(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Contract]:
    store = KeyStoreFile(tmp_path_factory.mktemp("contract") / "keys.json")
    issued = store.add("contoso", "starter")
    service = LiveService(store.path, _settings).start()
    try:
        yield Contract(service, issued.primary, service.idp.mint_token())
    finally:
        service.stop()


@pytest.fixture(scope="module")
def api_schema(contract: Contract) -> Any:
    url = contract.service.url
    return schemathesis.openapi.from_url(f"{url}/api/docs/openapi.json")


CONTRACT = settings(
    max_examples=20,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


def test_every_documented_operation_answers_as_documented(
    api_schema: Any, contract: Contract
) -> None:
    # Not @schema.parametrize with schemathesis.pytest.from_fixture: 4.32.5 sets
    # request.node._nodeid, which pytest 9 no longer has (AttributeError). The
    # same checks run here through each operation's hypothesis strategy.
    operations = [result.ok() for result in api_schema.get_all_operations()]
    assert operations
    for operation in operations:

        @CONTRACT
        @given(case=operation.as_strategy())
        def answers_as_documented(case: Any) -> None:
            case.call_and_validate(
                base_url=contract.service.url, headers=contract.credentials
            )

        try:
            answers_as_documented()
        except Exception as err:
            label = f"{operation.method.upper()} {operation.path}"
            raise AssertionError(f"{label} breaks its contract") from err


def test_the_document_lists_the_protected_operations(api_schema: Any) -> None:
    # Without this the parametrized test above could pass on an empty document.
    operations = {
        f"{result.ok().method.upper()} {result.ok().path}"
        for result in api_schema.get_all_operations()
    }
    assert {"GET /api/v2/health", "GET /api/v2/whoami"} <= operations
