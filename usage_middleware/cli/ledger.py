"""The ledger commands: ``plans``, ``subscribe``, ``grant`` and ``show`` (the embedded ledger)."""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Awaitable
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING

from ..models import MAX_UNITS, check_customer, check_feature
from ._common import (
    PROG,
    CliError,
    Parser,
    cannot_read,
    check_sqlite_file,
    clip,
    render_plans,
    render_usage,
)

if TYPE_CHECKING:
    from ..ledger.local import LocalLedger
    from ..ledger.store import LedgerStore
    from ..pricing import Pricing

__all__ = ["add_ledger_commands"]


def add_ledger_commands(sub: argparse._SubParsersAction[Parser], ledger_options: Parser) -> None:
    """Add ``plans``, ``subscribe``, ``grant`` and ``show`` (each takes ``ledger_options``)."""
    p = sub.add_parser(
        "plans", parents=[ledger_options], help="list the plans, features, limits and intervals"
    )
    p.set_defaults(func=_cmd_plans)

    p = sub.add_parser("subscribe", parents=[ledger_options], help="put a customer on a plan")
    p.add_argument("customer", metavar="CUSTOMER", help="customer id, e.g. org:acme")
    p.add_argument("plan", metavar="PLAN", help="plan name, e.g. plan:free@1")
    p.set_defaults(func=_cmd_subscribe)

    p = sub.add_parser(
        "grant", parents=[ledger_options], help="credit units of a feature to a customer"
    )
    p.add_argument("customer", metavar="CUSTOMER", help="customer id, e.g. org:acme")
    p.add_argument("feature", metavar="FEATURE", help="feature name, e.g. feature:convert")
    p.add_argument("units", metavar="UNITS", type=_positive_units, help="whole units > 0")
    p.set_defaults(func=_cmd_grant)

    p = sub.add_parser(
        "show", parents=[ledger_options], help="a customer's limits, usage and credits"
    )
    p.add_argument("customer", metavar="CUSTOMER", help="customer id, e.g. org:acme")
    p.set_defaults(func=_cmd_show)


def _check_pricing_path(pricing: str | None) -> None:
    if pricing is None:
        return
    path = Path(pricing)
    if path.is_dir():
        raise CliError(f"pricing file {pricing!r} is a directory; pass a Tier pricing.json file")
    if not path.is_file():
        raise CliError(f"pricing file {pricing!r} not found")


def _check_db(db: str, *, write: bool) -> None:
    """Refuse a ``--db`` that exists but is not a ledger file, before SQLite touches it."""
    tables = check_sqlite_file(db, kind="usage ledger", flag="--db", write=write)
    if tables and not {"meta", "subscriptions", "usage"} <= tables:
        why = "it holds other tables" + (", an outbox" if "outbox" in tables else "")
        raise CliError(f"{db} is not a usage ledger (SQLite) file ({why}); pass --db PATH")


def _no_ledger(db: str) -> CliError:
    return CliError(
        f"no ledger at {db!r}: pass --db PATH, or create it with "
        f"'{PROG} --pricing pricing.json subscribe CUSTOMER PLAN'"
    )


def _read_only_store(db: str) -> LedgerStore:
    """The ledger at ``db`` opened read-only (nothing is written); checked first."""
    from ..ledger.store import LedgerStore

    _check_db(db, write=False)
    if not Path(db).exists():
        raise _no_ledger(db)
    if os.path.getsize(db) == 0:
        raise CliError(f"{db} is an empty file, not a ledger yet: {_no_ledger(db)}")
    store = LedgerStore(db, f"cli-{os.getpid()}", lease_ttl=1.0)
    try:
        store.open_read_only()
    except sqlite3.Error as exc:
        raise cannot_read(db, exc, kind="usage ledger") from None
    return store


def _ledger(args: argparse.Namespace) -> LocalLedger:
    from ..ledger.local import LocalLedger

    _check_pricing_path(args.pricing)
    _check_db(args.db, write=True)
    return LocalLedger(args.db, pricing=args.pricing)


def _cmd_plans(args: argparse.Namespace) -> int:
    from ..pricing import load_pricing

    if args.pricing is not None:
        _check_pricing_path(args.pricing)
        print(render_plans(load_pricing(Path(args.pricing))))
        return 0
    print(render_plans(_stored_pricing(args.db)))
    return 0


def _stored_pricing(db: str) -> Pricing:
    """The pricing stored in the ledger file ``db`` (read-only, one short transaction)."""
    _check_db(db, write=False)
    if not Path(db).exists():
        raise CliError(
            f"no ledger at {db!r} to read plans from: pass --pricing FILE (or --db PATH)"
        )
    store = _read_only_store(db)
    pricing = store.pricing
    store.close()
    if pricing is None:
        raise CliError(f"the ledger at {db!r} has no pricing: pass --pricing FILE")
    return pricing


def _cmd_subscribe(args: argparse.Namespace) -> Awaitable[int]:
    customer = check_customer(args.customer)
    if args.pricing is None and not Path(args.db).exists():
        raise CliError(
            f"no ledger at {args.db!r} and no pricing to create it with: pass --pricing FILE "
            "(a Tier pricing.json)"
        )
    ledger = _ledger(args)

    async def run() -> int:
        async with ledger:
            if ledger.pricing is None:
                raise CliError(f"the ledger at {args.db!r} has no pricing: pass --pricing FILE")
            await ledger.subscribe(customer, args.plan)
        print(f"{customer} is on {args.plan}")
        return 0

    return run()


def _cmd_grant(args: argparse.Namespace) -> Awaitable[int]:
    customer = check_customer(args.customer)
    feature = check_feature(args.feature)
    ledger = _ledger(args)

    async def run() -> int:
        async with ledger:
            balance = await ledger.grant(customer, feature, args.units)
            pricing = ledger.pricing
        print(f"granted {args.units} units of {feature} to {customer}; credit balance {balance}")
        if pricing is not None and not any(feature in p.features for p in pricing.plans.values()):
            print(
                f"{PROG}: note: {feature} is in no plan of the pricing (a typo?); the credits "
                "are kept, and a route metering that feature can spend them",
                file=sys.stderr,
            )
        return 0

    return run()


def _cmd_show(args: argparse.Namespace) -> int | Awaitable[int]:
    """Read-only, unless ``--pricing`` differs from the stored one (then it is stored)."""
    from ..pricing import load_pricing

    customer = check_customer(args.customer)
    _check_pricing_path(args.pricing)
    store = _read_only_store(args.db)
    try:
        if args.pricing is not None and (
            store.pricing is None or store.pricing.to_json() != load_pricing(args.pricing).to_json()
        ):
            store.close()
            return _show_storing_pricing(args, customer)
        rows = store.usage(customer, datetime.now(UTC))
    finally:
        store.close()
    print(f"{customer} (ledger {args.db})")
    print(render_usage(rows))
    return 0


def _show_storing_pricing(args: argparse.Namespace, customer: str) -> Awaitable[int]:
    ledger = _ledger(args)

    async def run() -> int:
        async with ledger:
            rows = await ledger.usage(customer)
        print(f"{customer} (ledger {args.db})")
        print(render_usage(rows))
        return 0

    return run()


def _positive_units(text: str) -> int:
    """``UNITS``: ASCII digits only (no sign, spaces, ``_`` or other scripts' digits), > 0."""
    shown = clip(text)
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"units must be a whole number > 0, got {shown!r}")
    digits = text.lstrip("0")
    units = int(digits or "0") if len(digits) <= 16 else MAX_UNITS + 1  # no 4300-digit parse
    if units <= 0:
        raise argparse.ArgumentTypeError(f"units must be a whole number > 0, got {shown!r}")
    if units > MAX_UNITS:
        raise argparse.ArgumentTypeError(f"units must be at most {MAX_UNITS} (10**15), got {shown}")
    return units
