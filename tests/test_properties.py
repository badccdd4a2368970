"""Two invariants over anything a client can send, checked with hypothesis.

1. The service never answers 500 (nor any 5xx: the identity provider is up).
2. It never admits (200) a request that lacks a valid key and a valid token
   carrying the role.

How it runs: ``@given`` cannot decorate an ``async def`` test, and a per-example
event loop would rebuild the app each time. So the identity provider and the app
run once per module on their own loop in a thread (``LiveService``), served with
production's runner, and these tests are plain synchronous functions that hand
each request to that loop and block on the answer. Exact bytes go over a socket,
so header values the aiohttp client would refuse to send are generated too.
"""

from __future__ import annotations

import base64
import json
import string
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import yarl
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from service.idp import LocalIdentityProvider
from service.keystore import KeyStoreFile
from service.settings import Settings
from tests.conftest import settings_for
from tests.raw_http import LiveService, RawResponse, build_request, send_raw

HEALTH = "/api/v2/health"
Headers = list[tuple[str | bytes, str | bytes]]
ROLE = "Api.Access"
# The query names that carry credentials (RFC 6750 §2.3, APIM's subscription-key),
# written out here rather than imported, so the test is the specification.
CREDENTIAL_NAMES = frozenset(
    {"access_token", "access-token", "subscription-key", "subscription_key"}
)
# Answers the parser gives before our code runs, and those of our chain.
PARSER_STATUSES = frozenset({400, 431})
REFUSALS = frozenset({400, 401, 403, 431})

FUZZ = settings(
    max_examples=120,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
)


@dataclass(frozen=True)
class Target:
    service: LiveService
    key: str
    secondary: str

    @property
    def idp(self) -> LocalIdentityProvider:
        return self.service.idp

    def send(self, headers: Headers, path: str = HEALTH) -> RawResponse:
        request = build_request("GET", path, headers)
        server = self.service.server
        return self.service.run(lambda: send_raw(server.host, server.port, request))

    def claims(self) -> dict[str, Any]:
        segment = self.idp.mint_token().split(".")[1]
        return dict(json.loads(base64.urlsafe_b64decode(segment + "==")))

    def header(self) -> dict[str, Any]:
        return {"typ": "JWT", "alg": "RS256", "kid": self.idp.current_kid}


def _settings(idp: LocalIdentityProvider, keys_file: Path) -> Settings:
    # Thousands of anonymous refusals from one address would trip the
    # failed-authentication throttle and turn every answer into a 429.
    return settings_for(idp, keys_file, auth_failure_limit=None)


@pytest.fixture(scope="module")
def target(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Target]:
    store = KeyStoreFile(tmp_path_factory.mktemp("properties") / "keys.json")
    issued = store.add("contoso", "starter")
    service = LiveService(store.path, _settings).start()
    try:
        yield Target(service, issued.primary, issued.secondary)
    finally:
        service.stop()


@pytest.fixture(scope="module")
def token(target: Target) -> str:
    """One valid token for the mutation properties, so each example replays alike."""
    return target.idp.mint_token()


def _refused(response: RawResponse) -> None:
    """Invariant 1 and 2 for a request that must not get in."""
    assert response.status in REFUSALS, (response.status, response.body[:300])


def _valid_headers(target: Target, token: str) -> Headers:
    return [
        ("Authorization", f"Bearer {token}"),
        ("Ocp-Apim-Subscription-Key", target.key),
    ]


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


# --- strategies ----------------------------------------------------------------------

JSON = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=20),
    lambda inner: (
        st.lists(inner, max_size=4)
        | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)
HEADER_BYTES = st.binary(max_size=200)
BEARERISH = st.builds(
    lambda scheme, gap, rest: f"{scheme}{gap}{rest}".encode("utf-8", "surrogatepass"),
    st.sampled_from(["Bearer", "bearer", "BEARER", "Basic", "", "Bearer,"]),
    st.sampled_from([" ", "  ", "\t", "", "=", ":"]),
    st.text(max_size=120),
)
B64URL = string.ascii_letters + string.digits + "-_"


def _perturbed(values: list[str]) -> st.SearchStrategy[Any]:
    """Near misses of accepted values: the exact-match checks' hard cases."""
    edits = st.sampled_from(
        [
            str.upper,
            str.lower,
            lambda v: v + "/",
            lambda v: " " + v,
            lambda v: v + "\u200b",
            lambda v: v[:-1],
            lambda v: v.replace("-", "\u2010"),
        ]
    )
    near = st.builds(lambda v, edit: edit(v), st.sampled_from(values), edits)
    return near | near.map(lambda v: [v]) | JSON


# --- invariants over headers ---------------------------------------------------------


@FUZZ
@given(value=HEADER_BYTES | BEARERISH)
def test_any_authorization_value_is_refused_never_a_500(
    target: Target, value: bytes
) -> None:
    headers: Headers = [
        ("Ocp-Apim-Subscription-Key", target.key),
        ("Authorization", value),
    ]
    _refused(target.send(headers))


@FUZZ
@given(value=HEADER_BYTES | st.text(max_size=64).map(str.encode))
def test_any_subscription_key_with_a_valid_token_is_refused_never_a_500(
    target: Target, value: bytes
) -> None:
    stripped = value.strip(b" \t")
    assume(stripped not in (target.key.encode(), target.secondary.encode()))
    token = target.idp.mint_token()
    headers: Headers = [
        ("Authorization", f"Bearer {token}"),
        ("Ocp-Apim-Subscription-Key", value),
    ]
    _refused(target.send(headers))


@FUZZ
@given(
    extra=st.lists(
        st.tuples(
            st.text(
                alphabet=string.ascii_letters + string.digits + "-_!#$%&'*+.^`|~",
                min_size=1,
                max_size=20,
            ),
            HEADER_BYTES,
        ),
        max_size=4,
    )
)
def test_any_extra_header_beside_valid_credentials_is_never_a_500(
    target: Target, extra: list[tuple[str, bytes]]
) -> None:
    # Admission is legitimate here (both credentials are valid); a crash is not.
    headers = [*_valid_headers(target, target.idp.mint_token()), *extra]
    response = target.send(headers)
    assert response.status in {200} | REFUSALS, response.body[:300]
    if response.status == 200:
        named = {name.lower() for name, _ in extra}
        assert "authorization" not in named
        assert "ocp-apim-subscription-key" not in named


# --- invariants over tokens ----------------------------------------------------------


@FUZZ
@given(segments=st.lists(st.binary(max_size=80), min_size=1, max_size=6))
def test_token_of_random_base64url_segments_is_refused(
    target: Target, segments: list[bytes]
) -> None:
    token = ".".join(_b64(segment) for segment in segments)
    assume(token)
    _refused(target.send(_valid_headers(target, token)))


@FUZZ
@given(header=JSON)
def test_random_json_header_signed_for_real_is_refused(
    target: Target, header: Any
) -> None:
    kid = target.idp.current_kid
    assume(not (isinstance(header, dict) and header.get("kid") == kid))
    raw = json.dumps(header).encode()
    token = target.idp.sign_raw(raw, json.dumps(target.claims()).encode())
    _refused(target.send(_valid_headers(target, token)))


@FUZZ
@given(payload=JSON)
def test_random_json_payload_signed_for_real_is_refused(
    target: Target, payload: Any
) -> None:
    header = json.dumps(target.header()).encode()
    token = target.idp.sign_raw(header, json.dumps(payload).encode())
    _refused(target.send(_valid_headers(target, token)))


def _admissible(name: str, value: Any, target: Target) -> bool:
    """Whether a replacement value is one of the accepted forms of the claim."""
    idp = target.idp
    if name == "aud":
        accepted = {idp.audience, idp.app_id}
        members = value if isinstance(value, list) else [value]
        return any(isinstance(m, str) and m in accepted for m in members)
    if name == "roles":
        return isinstance(value, list) and ROLE in value
    if name == "iss":
        return isinstance(value, str) and value == idp.issuer
    return isinstance(value, str) and value == idp.tenant_id


@FUZZ
@given(data=st.data())
def test_valid_claims_with_one_identity_claim_replaced_are_refused(
    target: Target, data: st.DataObject
) -> None:
    idp = target.idp
    accepted = {
        "aud": [idp.audience, idp.app_id],
        "iss": [idp.issuer],
        "tid": [idp.tenant_id],
        "roles": [ROLE],
    }
    name = data.draw(st.sampled_from(sorted(accepted)))
    value = data.draw(_perturbed(accepted[name]))
    assume(not _admissible(name, value, target))
    claims = target.claims()
    claims[name] = value
    header = json.dumps(target.header()).encode()
    token = idp.sign_raw(header, json.dumps(claims).encode())
    _refused(target.send(_valid_headers(target, token)))


@FUZZ
@given(data=st.data())
def test_mutated_valid_token_is_refused(
    target: Target, token: str, data: st.DataObject
) -> None:
    # One token, edited anywhere: unless the edit undoes itself, it must fail.
    # Edits near a segment's end are drawn often: that is where non-canonical
    # base64 (J-15) hides, a different spelling of the very same bytes.
    parts = token.split(".")
    index = data.draw(st.integers(min_value=0, max_value=2))
    segment = parts[index]
    near_end = st.integers(min_value=0, max_value=3).map(
        lambda back: len(segment) - 1 - back
    )
    position = data.draw(
        near_end | st.integers(min_value=0, max_value=len(segment) - 1)
    )
    edit = data.draw(st.sampled_from(["replace", "insert", "delete", "pad", "swap"]))
    char = data.draw(st.sampled_from(B64URL + ".=+/ %!*"))
    if edit == "replace":
        segment = segment[:position] + char + segment[position + 1 :]
    elif edit == "insert":
        segment = segment[:position] + char + segment[position:]
    elif edit == "delete":
        segment = segment[:position] + segment[position + 1 :]
    elif edit == "pad":
        segment += "=" * data.draw(st.integers(min_value=1, max_value=3))
    else:
        parts[1], parts[2] = parts[2], parts[1]
    original = ".".join(parts)
    mutated = ".".join([*parts[:index], segment, *parts[index + 1 :]])
    # Spaces around the token are the header's own whitespace (RFC 6750 1*SP,
    # RFC 9110 OWS), not part of it: the token is unchanged, and admitted.
    assume(mutated.strip(" ") != original or edit == "swap")
    _refused(target.send(_valid_headers(target, mutated)))


@FUZZ
@given(index=st.integers(min_value=0, max_value=2), char=st.sampled_from(B64URL))
def test_respelled_segment_end_is_refused(
    target: Target, token: str, index: int, char: str
) -> None:
    # J-15 / RFC 4648 §3.5: the last character of a segment carries unused
    # bits, so several spellings decode to the same bytes. For the signature a
    # quarter of the alphabet does: a lenient decoder would admit those.
    parts = token.split(".")
    assume(parts[index][-1] != char)
    parts[index] = parts[index][:-1] + char
    _refused(target.send(_valid_headers(target, ".".join(parts))))


def test_the_oracle_admits_a_valid_request(target: Target) -> None:
    # Without this, every property above could pass against a service that
    # refuses everything.
    response = target.send(_valid_headers(target, target.idp.mint_token()))
    assert response.status == 200


# --- invariants over the query string ---------------------------------------------

QUERY_NAMES = st.sampled_from(
    [*CREDENTIAL_NAMES, "Access_Token", "SUBSCRIPTION-KEY", "code", "token", "q", "x"]
) | st.text(alphabet=string.ascii_letters + "_-.%0123456789", max_size=12)
QUERY_VALUES = st.text(
    alphabet=string.ascii_letters + string.digits + "%.-_~+=", max_size=20
)


@FUZZ
@given(
    pairs=st.lists(st.tuples(QUERY_NAMES, QUERY_VALUES), max_size=4),
    separator=st.sampled_from(["&", ";", "&&"]),
)
def test_query_string_never_carries_credentials_and_never_crashes(
    target: Target, pairs: list[tuple[str, str]], separator: str
) -> None:
    query = separator.join(f"{name}={value}" for name, value in pairs)
    path = f"{HEALTH}?{query}"
    response = target.send(_valid_headers(target, target.idp.mint_token()), path)
    assert response.status in {200, 400}, response.body[:300]
    names = {name.lower() for name in yarl.URL(path).query}
    if names & CREDENTIAL_NAMES:
        assert response.status == 400
        assert response.json()["code"] == "CredentialsInQuery"
