"""The ``keys`` command: create, list, rotate and suspend subscription keys."""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections.abc import Callable
from typing import Final

from validators.base import RateLimit

from .keystore import (
    KEY_SLOTS,
    KEYS_FILE_ENV,
    KeyStoreError,
    KeyStoreFile,
    ProductSettings,
    SubscriptionRecord,
    SubscriptionStore,
    format_rate_limit,
    parse_rate_limit,
)

__all__ = ("EXIT_ERROR", "EXIT_OK", "add_keys_parser", "run_keys")

EXIT_OK: Final = 0
EXIT_ERROR: Final = 2

_Action = Callable[[KeyStoreFile, argparse.Namespace], int]


def add_keys_parser(
    subparsers: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    """Register ``keys`` and its subcommands; each sets ``handler=run_keys``."""
    keys = subparsers.add_parser(
        "keys",
        help="manage subscription keys",
        description="Manage the subscription key store. Keys are printed only when"
        " created; the file holds their SHA-256 digests.",
    )
    commands = keys.add_subparsers(dest="keys_command", metavar="COMMAND")
    commands.required = True
    _add_add(commands)
    _add_list(commands)
    _add_regenerate(commands)
    _add_by_name(commands, "suspend", _run_suspend, "Stop accepting a subscription")
    _add_by_name(commands, "activate", _run_activate, "Accept a subscription again")
    _add_by_name(commands, "remove", _run_remove, "Delete a subscription and its keys")
    _add_product(commands)


def run_keys(args: argparse.Namespace) -> int:
    """Run the chosen ``keys`` subcommand; errors are one line on stderr, exit 2."""
    action: _Action = args.keys_action
    try:
        return action(KeyStoreFile(_store_path(args.file)), args)
    except KeyStoreError as err:
        message = " ".join(str(err).splitlines())
        print(f"error: {message}", file=sys.stderr)
        return EXIT_ERROR


def _store_path(given: str | None) -> str:
    path = given or os.environ.get(KEYS_FILE_ENV)
    if not path:
        raise KeyStoreError(f"No key store file: pass --file or set {KEYS_FILE_ENV}")
    return path


def _command(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    action: _Action,
    help_text: str,
) -> argparse.ArgumentParser:
    parser = commands.add_parser(name, help=help_text, description=help_text)
    parser.add_argument(
        "--file",
        metavar="F",
        help=f"the key store file (default: ${KEYS_FILE_ENV})",
    )
    parser.set_defaults(handler=run_keys, keys_action=action)
    return parser


def _add_add(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = _command(
        commands, "add", _run_add, "Create a subscription with two fresh keys"
    )
    parser.add_argument("--name", required=True, help="the subscription's name")
    parser.add_argument("--product", required=True, help="the product it belongs to")
    parser.add_argument(
        "--rate-limit",
        metavar="CALLS/SECONDS",
        help="its own rate limit (default: the product's)",
    )
    _add_json_flag(parser)


def _add_list(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = _command(
        commands, "list", _run_list, "List subscriptions and products, no secrets"
    )
    _add_json_flag(parser)


def _add_regenerate(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
) -> None:
    parser = _command(
        commands, "regenerate", _run_regenerate, "Replace one key of a subscription"
    )
    parser.add_argument("--name", required=True, help="the subscription's name")
    parser.add_argument("--which", required=True, choices=KEY_SLOTS)
    _add_json_flag(parser)


def _add_by_name(
    commands: argparse._SubParsersAction[argparse.ArgumentParser],
    name: str,
    action: _Action,
    help_text: str,
) -> None:
    parser = _command(commands, name, action, help_text)
    parser.add_argument("--name", required=True, help="the subscription's name")


def _add_product(commands: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    parser = _command(
        commands, "product", _run_product, "Set a product's settings, creating it"
    )
    parser.add_argument("--name", required=True, help="the product's name")
    parser.add_argument(
        "--rate-limit",
        required=True,
        metavar="CALLS/SECONDS|none",
        help="each subscription's own limit (counted apart) unless it sets one",
    )


def _add_json_flag(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="print JSON")


def _run_add(store_file: KeyStoreFile, args: argparse.Namespace) -> int:
    text: str | None = args.rate_limit
    rate_limit = None if text is None else _rate_limit_option(text)
    issued = store_file.add(args.name, args.product, rate_limit=rate_limit)
    if args.json:
        document = {
            "name": issued.name,
            "product": issued.product,
            "primary": issued.primary,
            "secondary": issued.secondary,
        }
        print(json.dumps(document))
        return EXIT_OK
    print(f"Created subscription {issued.name!r} in product {issued.product!r}.")
    print("Its keys are shown only this once; the file keeps their digests.")
    print(f"primary:   {issued.primary}")
    print(f"secondary: {issued.secondary}")
    return EXIT_OK


def _run_list(store_file: KeyStoreFile, args: argparse.Namespace) -> int:
    store = store_file.read()
    if args.json:
        print(json.dumps(_list_document(store), indent=2))
    else:
        _print_table(store)
    return EXIT_OK


def _run_regenerate(store_file: KeyStoreFile, args: argparse.Namespace) -> int:
    key = store_file.regenerate(args.name, args.which)
    if args.json:
        print(json.dumps({"name": args.name, "which": args.which, "key": key}))
        return EXIT_OK
    print(f"New {args.which} key of {args.name!r}, shown only this once;")
    print(f"the old {args.which} key no longer works:")
    print(key)
    return EXIT_OK


def _run_suspend(store_file: KeyStoreFile, args: argparse.Namespace) -> int:
    changed = store_file.suspend(args.name)
    print(f"Subscription {args.name!r} {'' if changed else 'was already '}suspended")
    return EXIT_OK


def _run_activate(store_file: KeyStoreFile, args: argparse.Namespace) -> int:
    changed = store_file.activate(args.name)
    print(f"Subscription {args.name!r} {'' if changed else 'was already '}active")
    return EXIT_OK


def _run_remove(store_file: KeyStoreFile, args: argparse.Namespace) -> int:
    store_file.remove(args.name)
    print(f"Subscription {args.name!r} removed")
    return EXIT_OK


def _run_product(store_file: KeyStoreFile, args: argparse.Namespace) -> int:
    text: str = args.rate_limit
    rate_limit = None if text == "none" else _rate_limit_option(text)
    store_file.set_product(args.name, ProductSettings(rate_limit=rate_limit))
    shown = "no rate limit" if rate_limit is None else f"rate limit {text}"
    print(f"Product {args.name!r} now has {shown}")
    return EXIT_OK


def _list_document(store: SubscriptionStore) -> dict[str, object]:
    return {
        "products": {
            name: {"rate_limit": _limit_text(settings.rate_limit)}
            for name, settings in sorted(store.products.items())
        },
        "subscriptions": [
            _record_summary(store, record) for record in store.subscriptions
        ],
    }


def _record_summary(
    store: SubscriptionStore, record: SubscriptionRecord
) -> dict[str, object]:
    return {
        "name": record.name,
        "product": record.product,
        "state": record.state.value,
        "rate_limit": _limit_text(record.rate_limit),
        "effective_rate_limit": _limit_text(store.effective_rate_limit(record)),
        "primary_fingerprint": record.fingerprint("primary"),
        "secondary_fingerprint": record.fingerprint("secondary"),
        "created": record.created.isoformat(),
        "updated": record.updated.isoformat(),
    }


def _print_table(store: SubscriptionStore) -> None:
    if not store.subscriptions:
        print("No subscriptions")
        return
    header = ("NAME", "PRODUCT", "STATE", "RATE LIMIT", "PRIMARY", "SECONDARY")
    rows = [header, *(_table_row(store, record) for record in store.subscriptions)]
    widths = [max(len(row[column]) for row in rows) for column in range(len(header))]
    for row in rows:
        cells = (cell.ljust(width) for cell, width in zip(row, widths, strict=True))
        print("  ".join(cells).rstrip())


def _table_row(
    store: SubscriptionStore, record: SubscriptionRecord
) -> tuple[str, str, str, str, str, str]:
    limit = _limit_text(record.rate_limit)
    if limit is None:
        inherited = _limit_text(store.effective_rate_limit(record))
        limit = "-" if inherited is None else f"{inherited} (product)"
    return (
        record.name,
        record.product,
        record.state.value,
        limit,
        record.fingerprint("primary"),
        record.fingerprint("secondary"),
    )


def _limit_text(rate_limit: RateLimit | None) -> str | None:
    return None if rate_limit is None else format_rate_limit(rate_limit)


def _rate_limit_option(text: str) -> RateLimit:
    try:
        return parse_rate_limit(text)
    except KeyStoreError as err:
        raise KeyStoreError(f"--rate-limit {text!r}: {err}") from None
