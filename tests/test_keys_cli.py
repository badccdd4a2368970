"""Tests of the ``keys`` command, run in-process through its argument parser."""

from __future__ import annotations

import argparse
import json
from collections.abc import Callable
from pathlib import Path

import pytest

from service import keys_cli
from service.keys_cli import EXIT_ERROR, EXIT_OK, add_keys_parser, run_keys
from service.keystore import KEYS_FILE_ENV, KeyStoreFile, load_store
from validators.base import RateLimit, Subscription

Capture = pytest.CaptureFixture[str]


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="service")
    add_keys_parser(parser.add_subparsers(dest="command", required=True))
    return parser


def _run(*argv: str) -> int:
    args = _parser().parse_args(["keys", *argv])
    handler: Callable[[argparse.Namespace], int] = args.handler
    return handler(args)


def _add_json(path: Path, name: str, capsys: Capture, *extra: str) -> dict[str, str]:
    assert _run("add", "--file", str(path), "--name", name, *extra, "--json") == 0
    issued: dict[str, str] = json.loads(capsys.readouterr().out)
    return issued


def _assert_one_line_error(capsys: Capture, fragment: str) -> None:
    captured = capsys.readouterr()
    assert captured.out == ""
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith("error: ")
    assert fragment in lines[0]
    assert "Traceback" not in captured.err


@pytest.fixture
def path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.delenv(KEYS_FILE_ENV, raising=False)
    return tmp_path / "keys.json"


def test_every_public_name_is_exported() -> None:
    for name in keys_cli.__all__:
        assert hasattr(keys_cli, name), name


@pytest.mark.parametrize(
    "argv",
    [
        ["add", "--name", "a", "--product", "p"],
        ["list"],
        ["regenerate", "--name", "a", "--which", "primary"],
        ["suspend", "--name", "a"],
        ["activate", "--name", "a"],
        ["remove", "--name", "a"],
        ["product", "--name", "p", "--rate-limit", "none"],
    ],
)
def test_every_subcommand_dispatches_to_run_keys(argv: list[str]) -> None:
    args = _parser().parse_args(["keys", *argv])

    assert args.handler is run_keys


def test_keys_without_subcommand_is_a_usage_error(capsys: Capture) -> None:
    with pytest.raises(SystemExit) as caught:
        _parser().parse_args(["keys"])

    assert caught.value.code == 2
    assert "COMMAND" in capsys.readouterr().err


def test_add_json_prints_exactly_name_product_and_both_keys(
    path: Path, capsys: Capture
) -> None:
    issued = _add_json(path, "alice", capsys, "--product", "starter")

    assert list(issued) == ["name", "product", "primary", "secondary"]
    assert issued["name"] == "alice"
    assert issued["product"] == "starter"
    store = load_store(path)
    expected = Subscription("alice", "starter")
    assert store.find(issued["primary"].encode()) == expected
    assert store.find(issued["secondary"].encode()) == expected


def test_add_prints_both_keys_once_for_people(path: Path, capsys: Capture) -> None:
    code = _run("add", "--file", str(path), "--name", "alice", "--product", "starter")

    assert code == EXIT_OK
    out = capsys.readouterr().out
    keys = [
        line.split()[-1] for line in out.splitlines() if line.startswith(("pri", "sec"))
    ]
    assert len(keys) == 2
    store = load_store(path)
    assert all(store.find(key.encode()) is not None for key in keys)
    assert "shown only this once" in out


def test_add_with_rate_limit_stores_it(path: Path, capsys: Capture) -> None:
    issued = _add_json(
        path, "alice", capsys, "--product", "starter", "--rate-limit", "5/1"
    )

    found = load_store(path).find(issued["primary"].encode())
    assert found == Subscription("alice", "starter", RateLimit(5, 1))


@pytest.mark.parametrize("rate_limit", ["fast", "0/60", "10", "none"])
def test_add_with_malformed_rate_limit_fails_and_creates_nothing(
    path: Path, capsys: Capture, rate_limit: str
) -> None:
    code = _run(
        "add", "--file", str(path), "--name", "a", "--product", "p",
        "--rate-limit", rate_limit,
    )  # fmt: skip

    assert code == EXIT_ERROR
    _assert_one_line_error(capsys, f"--rate-limit {rate_limit!r}: rate limit must be")
    assert not path.exists()


def test_add_of_existing_name_fails(path: Path, capsys: Capture) -> None:
    _add_json(path, "alice", capsys, "--product", "starter")
    before = path.read_bytes()

    code = _run("add", "--file", str(path), "--name", "alice", "--product", "other")

    assert code == EXIT_ERROR
    _assert_one_line_error(capsys, "'alice' already exists")
    assert path.read_bytes() == before


def test_add_with_invalid_name_fails(path: Path, capsys: Capture) -> None:
    code = _run("add", "--file", str(path), "--name", "a b", "--product", "starter")

    assert code == EXIT_ERROR
    _assert_one_line_error(capsys, "name must be 1 to 128 characters")


def test_file_defaults_to_the_environment_setting(
    path: Path, capsys: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(KEYS_FILE_ENV, str(path))

    assert _run("add", "--name", "alice", "--product", "starter", "--json") == 0

    assert load_store(path).get("alice") is not None


def test_explicit_file_wins_over_the_environment_setting(
    path: Path, tmp_path: Path, capsys: Capture, monkeypatch: pytest.MonkeyPatch
) -> None:
    elsewhere = tmp_path / "other.json"
    monkeypatch.setenv(KEYS_FILE_ENV, str(elsewhere))

    _add_json(path, "alice", capsys, "--product", "starter")

    assert path.exists()
    assert not elsewhere.exists()


def test_no_file_and_no_environment_setting_fails_naming_both(
    path: Path, capsys: Capture
) -> None:
    assert _run("list") == EXIT_ERROR

    _assert_one_line_error(capsys, f"pass --file or set {KEYS_FILE_ENV}")


def test_list_shows_subscriptions_and_fingerprints_but_no_key(
    path: Path, capsys: Capture
) -> None:
    alice = _add_json(path, "alice", capsys, "--product", "starter")
    _add_json(path, "bob", capsys, "--product", "free", "--rate-limit", "9/3")
    _run("product", "--file", str(path), "--name", "starter", "--rate-limit", "100/60")
    capsys.readouterr()

    assert _run("list", "--file", str(path)) == EXIT_OK

    out = capsys.readouterr().out
    lines = out.splitlines()
    assert lines[0].split() == [
        "NAME", "PRODUCT", "STATE", "RATE", "LIMIT", "PRIMARY", "SECONDARY",
    ]  # fmt: skip
    record = load_store(path).get("alice")
    assert record is not None
    assert lines[1].split() == [
        "alice", "starter", "active", "100/60", "(product)",
        record.fingerprint("primary"), record.fingerprint("secondary"),
    ]  # fmt: skip
    assert lines[2].split()[:4] == ["bob", "free", "active", "9/3"]
    assert alice["primary"] not in out
    assert alice["secondary"] not in out


def test_list_json_describes_products_and_subscriptions_without_secrets(
    path: Path, capsys: Capture
) -> None:
    alice = _add_json(path, "alice", capsys, "--product", "starter")
    _run("suspend", "--file", str(path), "--name", "alice")
    capsys.readouterr()

    assert _run("list", "--file", str(path), "--json") == EXIT_OK

    out = capsys.readouterr().out
    listing = json.loads(out)
    assert listing["products"] == {"starter": {"rate_limit": None}}
    [entry] = listing["subscriptions"]
    assert entry["name"] == "alice"
    assert entry["state"] == "suspended"
    assert entry["rate_limit"] is None
    assert entry["effective_rate_limit"] is None
    assert len(entry["primary_fingerprint"]) == 12
    assert alice["primary"] not in out
    assert alice["secondary"] not in out


def test_list_of_empty_store_says_so(path: Path, capsys: Capture) -> None:
    path.write_text('{"version": 1, "products": {}, "subscriptions": []}')

    assert _run("list", "--file", str(path)) == EXIT_OK

    assert capsys.readouterr().out == "No subscriptions\n"


def test_list_of_missing_file_fails(path: Path, capsys: Capture) -> None:
    assert _run("list", "--file", str(path)) == EXIT_ERROR

    _assert_one_line_error(capsys, "does not exist")


def test_regenerate_json_prints_a_new_key_that_replaces_the_old(
    path: Path, capsys: Capture
) -> None:
    alice = _add_json(path, "alice", capsys, "--product", "starter")

    code = _run(
        "regenerate", "--file", str(path), "--name", "alice",
        "--which", "secondary", "--json",
    )  # fmt: skip

    assert code == EXIT_OK
    printed = json.loads(capsys.readouterr().out)
    assert list(printed) == ["name", "which", "key"]
    assert printed["which"] == "secondary"
    store = load_store(path)
    assert store.find(printed["key"].encode()) is not None
    assert store.find(alice["secondary"].encode()) is None
    assert store.find(alice["primary"].encode()) is not None


def test_regenerate_prints_the_new_key_for_people(path: Path, capsys: Capture) -> None:
    alice = _add_json(path, "alice", capsys, "--product", "starter")

    code = _run(
        "regenerate", "--file", str(path), "--name", "alice", "--which", "primary"
    )

    assert code == EXIT_OK
    new_key = capsys.readouterr().out.splitlines()[-1]
    store = load_store(path)
    assert store.find(new_key.encode()) is not None
    assert store.find(alice["primary"].encode()) is None


def test_regenerate_with_unknown_slot_is_a_usage_error(
    path: Path, capsys: Capture
) -> None:
    with pytest.raises(SystemExit) as caught:
        _run("regenerate", "--file", str(path), "--name", "a", "--which", "tertiary")

    assert caught.value.code == 2
    assert "invalid choice" in capsys.readouterr().err


def test_regenerate_of_unknown_subscription_fails(path: Path, capsys: Capture) -> None:
    _add_json(path, "alice", capsys, "--product", "starter")

    code = _run(
        "regenerate", "--file", str(path), "--name", "bob", "--which", "primary"
    )

    assert code == EXIT_ERROR
    _assert_one_line_error(capsys, "No subscription named 'bob'")


def test_suspended_subscription_is_refused_until_activated(
    path: Path, capsys: Capture
) -> None:
    alice = _add_json(path, "alice", capsys, "--product", "starter")
    key = alice["primary"].encode()

    assert _run("suspend", "--file", str(path), "--name", "alice") == EXIT_OK
    assert capsys.readouterr().out == "Subscription 'alice' suspended\n"
    assert load_store(path).find(key) is None

    assert _run("suspend", "--file", str(path), "--name", "alice") == EXIT_OK
    assert capsys.readouterr().out == "Subscription 'alice' was already suspended\n"

    assert _run("activate", "--file", str(path), "--name", "alice") == EXIT_OK
    assert capsys.readouterr().out == "Subscription 'alice' active\n"
    assert load_store(path).find(key) is not None


def test_removed_subscription_is_gone(path: Path, capsys: Capture) -> None:
    alice = _add_json(path, "alice", capsys, "--product", "starter")

    assert _run("remove", "--file", str(path), "--name", "alice") == EXIT_OK

    assert load_store(path).find(alice["primary"].encode()) is None


def test_product_rate_limit_applies_until_set_to_none(
    path: Path, capsys: Capture
) -> None:
    alice = _add_json(path, "alice", capsys, "--product", "starter")
    key = alice["primary"].encode()

    code = _run(
        "product", "--file", str(path), "--name", "starter", "--rate-limit", "7/2"
    )
    assert code == EXIT_OK
    assert "rate limit 7/2" in capsys.readouterr().out
    assert load_store(path).find(key) == Subscription(
        "alice", "starter", RateLimit(7, 2)
    )

    code = _run(
        "product", "--file", str(path), "--name", "starter", "--rate-limit", "none"
    )
    assert code == EXIT_OK
    assert "no rate limit" in capsys.readouterr().out
    assert load_store(path).find(key) == Subscription("alice", "starter", None)


def test_product_with_malformed_rate_limit_fails(path: Path, capsys: Capture) -> None:
    code = _run("product", "--file", str(path), "--name", "p", "--rate-limit", "x/y")

    assert code == EXIT_ERROR
    _assert_one_line_error(capsys, "--rate-limit 'x/y'")


@pytest.mark.parametrize(
    "argv",
    [
        ["add", "--name", "bob", "--product", "starter"],
        ["regenerate", "--name", "alice", "--which", "primary"],
        ["suspend", "--name", "alice"],
        ["activate", "--name", "alice"],
        ["remove", "--name", "alice"],
        ["product", "--name", "starter", "--rate-limit", "1/1"],
    ],
)
def test_change_to_corrupt_file_fails_and_leaves_it_untouched(
    path: Path, capsys: Capture, argv: list[str]
) -> None:
    KeyStoreFile(path).add("alice", "starter")
    path.write_text('{"version": 1, "products": {}, "subscriptions": [')

    assert _run(*argv[:1], "--file", str(path), *argv[1:]) == EXIT_ERROR

    _assert_one_line_error(capsys, "refusing to write over a corrupt key store")
    assert path.read_text() == '{"version": 1, "products": {}, "subscriptions": ['


def test_list_of_corrupt_file_fails_with_the_problem(
    path: Path, capsys: Capture
) -> None:
    path.write_text('{"version": 1, "products": {}, "subscriptions": {}}')

    assert _run("list", "--file", str(path)) == EXIT_ERROR

    _assert_one_line_error(capsys, "subscriptions must be an array")
