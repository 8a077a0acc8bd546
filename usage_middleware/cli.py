"""The ``usage-middleware`` command: look after the embedded ledger, and run the demo.

::

    usage-middleware [--db PATH] [--pricing PATH] COMMAND
    usage-middleware --version                     the installed version

    plans                              the plans, features, limits and intervals
    subscribe CUSTOMER PLAN            put CUSTOMER on PLAN (e.g. plan:free@1)
    grant CUSTOMER FEATURE UNITS       credit UNITS of FEATURE to CUSTOMER
    show CUSTOMER                      CUSTOMER's limits, usage and credits this period
    demo                               run the example app and meter it over real HTTP
    outbox ...                         the delivery outbox (when usage_middleware.outbox_cli
                                       is installed)

``--db`` and ``--pricing`` may also follow the command (``show org:acme --db x.db``).
``--db`` defaults to ``$USAGE_DB`` or ``usage.db``; ``--pricing`` (a Tier pricing.json)
defaults to ``$USAGE_PRICING``. The ledger stores the pricing it was last given (a later
``--pricing`` replaces it, unless it drops a plan that customers are still on), so only
the first command against a new ledger file needs ``--pricing``.

``plans``, ``show`` and ``outbox status`` open their file read-only (SQLite ``mode=ro``)
and write nothing, so they work on a file this user may only read (``show --pricing`` with a
pricing other than the stored one stores it, as the write commands do). A WAL file in a
directory this user cannot write can only be read while its ``-shm`` file exists (while
the app has it open); otherwise the error says so.

Exit status: 0 on success; 2 on bad input (unknown plan or customer, malformed units,
customer or feature, a missing or invalid pricing file, a ``--db`` that is empty, not a
ledger, or not readable or writable as the command needs), with one line on stderr
``usage-middleware: error: ...`` naming the file and no traceback (a customer id past 60
characters is shown cut, ending in ``…``); 130 when interrupted; 141 (128 + SIGPIPE, as
coreutils) with nothing printed when the reader of stdout goes away (``show X | head -1``).
``grant`` of a feature that no plan of the pricing has succeeds with a
``usage-middleware: note: ...`` line on stderr.

Extra commands: a module ``usage_middleware.outbox_cli`` with
``add_outbox_commands(subparsers)`` is wired in when present. Each command it adds calls
``set_defaults(func=f)`` with ``f(args: argparse.Namespace) -> int | Awaitable[int]``;
``args.db`` and ``args.pricing`` are set. Errors from the package's tree
(:class:`~usage_middleware.errors.UsageMiddlewareError`), ``ValueError`` and ``OSError`` it
raises become the one-line error above.
"""

from __future__ import annotations

import argparse
import asyncio
import importlib
import importlib.util
import inspect
import os
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import quote

from .errors import UsageMiddlewareError
from .models import MAX_UNITS, UNLIMITED, check_customer, check_feature

if TYPE_CHECKING:
    from .ledger.base import FeatureUsage
    from .ledger.local import LocalLedger
    from .ledger.store import LedgerStore
    from .pricing import Pricing

__all__ = ["PROG", "CliError", "main", "render_plans", "render_usage"]

PROG = "usage-middleware"

Command = Callable[[argparse.Namespace], "int | Awaitable[int]"]


class CliError(Exception):
    """Bad command-line input: printed as one ``usage-middleware: error: ...`` line, exit 2."""


class _Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (raised, printed by :func:`main`)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{PROG} --help')")


# -- formatting ------------------------------------------------------------------------


def _infinity() -> str:
    """``∞`` where stdout can print it, else ``unlimited``."""
    encoding = getattr(sys.stdout, "encoding", None) or "ascii"
    try:
        "∞".encode(encoding)
    except (UnicodeEncodeError, LookupError):
        return "unlimited"
    return "∞"


def _units(n: int) -> str:
    return _infinity() if n >= UNLIMITED else str(n)


def _when(moment: datetime) -> str:
    if (moment.hour, moment.minute, moment.second, moment.microsecond) == (0, 0, 0, 0):
        return moment.strftime("%Y-%m-%d")
    return moment.isoformat(timespec="seconds")


def _period(start: datetime | None, end: datetime | None) -> str:
    if start is None or end is None:
        return "-"
    last = end - timedelta(microseconds=1)
    if _when(end) == end.strftime("%Y-%m-%d"):  # calendar periods: show the last day
        return f"{_when(start)} to {last:%Y-%m-%d}"
    return f"{_when(start)} to {_when(end)}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [len(h) for h in headers]
    for row in rows:
        widths = [max(w, len(cell)) for w, cell in zip(widths, row, strict=True)]
    lines = [
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths, strict=True)).rstrip()
        for line in [headers, *rows]
    ]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join(lines)


def render_usage(rows: Sequence[FeatureUsage]) -> str:
    """A customer's standing (``Ledger.usage``) as a text table, one feature per line.

    Columns: feature, plan (``-`` for a credit-only feature), limit (``∞`` for
    ``UNLIMITED``), used, credits, remaining (units) and the usage period (UTC, first to
    last day).
    """
    headers = ("FEATURE", "PLAN", "LIMIT", "USED", "CREDITS", "REMAINING", "PERIOD (UTC)")
    body = [
        (
            row.feature,
            row.plan or "- (credits only)",
            _units(row.limit),
            str(row.used),
            str(row.credits),
            _units(row.remaining),
            _period(row.period_start, row.period_end),
        )
        for row in rows
    ]
    return _table(headers, body)


def render_plans(pricing: Pricing) -> str:
    """The plans of a pricing model as a text table, one feature per line."""
    headers = ("PLAN", "TITLE", "INTERVAL", "FEATURE", "LIMIT")
    body: list[tuple[str, str, str, str, str]] = []
    for name in sorted(pricing.plans):
        plan = pricing.plans[name]
        features = sorted(plan.features.values(), key=lambda f: f.name)
        if not features:
            body.append((name, plan.title or "", plan.interval, "-", "-"))
        for i, feature in enumerate(features):
            first = i == 0
            body.append(
                (
                    name if first else "",
                    (plan.title or "") if first else "",
                    plan.interval if first else "",
                    feature.name,
                    _units(feature.limit),
                )
            )
    return _table(headers, body)


# -- commands --------------------------------------------------------------------------


def _check_pricing_path(pricing: str | None) -> None:
    if pricing is None:
        return
    path = Path(pricing)
    if path.is_dir():
        raise CliError(f"pricing file {pricing!r} is a directory; pass a Tier pricing.json file")
    if not path.is_file():
        raise CliError(f"pricing file {pricing!r} not found")


_SQLITE_HEADER = b"SQLite format 3\x00"


def check_sqlite_file(
    path: str, *, kind: str, flag: str, write: bool, a_file: str = ""
) -> set[str] | None:
    """Check the file at ``path`` before SQLite touches it; its table names (None: no file).

    Nothing is created or written: the tables are read with a read-only (``mode=ro``)
    connection. ``kind`` ("usage ledger", "outbox"), ``a_file`` (``"an outbox file"``;
    default ``"a {kind} (SQLite) file"``) and ``flag`` (``--db``) go into the messages.
    ``write`` also checks that this user may write the file and its directory.

    Raises:
        CliError: one line naming ``path``, the problem and what to do.
    """
    if not path:
        raise CliError(f"{flag} is empty: pass {flag} PATH, the {kind} file")

    def not_kind(why: str) -> CliError:
        noun = a_file or f"a {kind} (SQLite) file"
        return CliError(f"{path} is not {noun} ({why}); pass {flag} PATH")

    if os.path.isdir(path):
        raise not_kind("it is a directory")
    if not os.path.exists(path):
        return None
    if not os.path.isfile(path):
        raise not_kind("it is not a regular file")
    try:
        with open(path, "rb") as file:
            header = file.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise CliError(
            f"cannot read the {kind} file {path}: {exc.strerror or exc}; run the command as a "
            "user who may read it"
        ) from None
    if header and header != _SQLITE_HEADER:
        raise not_kind("not a SQLite database")
    tables: set[str] = set()
    if header:
        uri = f"file:{quote(os.path.abspath(path))}?mode=ro"
        try:
            probe = sqlite3.connect(uri, uri=True)
            try:
                tables = {name for (name,) in probe.execute("SELECT name FROM sqlite_master")}
            finally:
                probe.close()
        except sqlite3.Error as exc:
            raise cannot_read(path, exc, kind=kind) from None
    if write:
        folder = os.path.dirname(os.path.abspath(path))
        if not os.access(path, os.W_OK):
            raise CliError(
                f"cannot write to the {kind} file {path}: it is read-only for this user; this "
                f"command changes it: run it as a user who may write {path} and its directory"
            )
        if not os.access(folder, os.W_OK):
            raise CliError(
                f"cannot write to the {kind} file {path}: this user cannot write to its "
                f"directory {folder}, where SQLite keeps its -wal and -shm files; run the "
                "command as a user who may write there"
            )
    return tables


def cannot_read(path: str, exc: sqlite3.Error, *, kind: str) -> CliError:
    """The error for a SQLite file that a read-only connection cannot read: path and fix."""
    folder = os.path.dirname(os.path.abspath(path))
    if _is_wal(path) and not os.path.exists(path + "-shm") and not os.access(folder, os.W_OK):
        # A WAL file is read through its -shm index; a read-only connection may create it
        # but not without write access to the directory. (immutable=1 would skip it, but
        # gives wrong answers or errors while another process writes the file.)
        return CliError(
            f"cannot read the {kind} file {path} ({exc}): it is in WAL mode and SQLite needs "
            f"{path}-shm to read it, which this user cannot create in {folder}; run the "
            f"command as a user who may write to {folder} (such as the app's), or read a copy "
            "of the file in a writable directory"
        )
    return CliError(
        f"cannot read the {kind} file {path} ({exc}); check that this user may read it and "
        "its -wal and -shm files"
    )


def _is_wal(path: str) -> bool:
    """Whether the SQLite file's header says WAL (read and write versions 2)."""
    try:
        with open(path, "rb") as file:
            return file.read(20)[18:20] == b"\x02\x02"
    except OSError:
        return False


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
    from .ledger.store import LedgerStore

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
    from .ledger.local import LocalLedger

    _check_pricing_path(args.pricing)
    _check_db(args.db, write=True)
    return LocalLedger(args.db, pricing=args.pricing)


def _cmd_plans(args: argparse.Namespace) -> int:
    from .pricing import load_pricing

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
    from .pricing import load_pricing

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


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo()


def _positive_units(text: str) -> int:
    """``UNITS``: ASCII digits only (no sign, spaces, ``_`` or other scripts' digits), > 0."""
    shown = _clip(text)
    if not (text.isascii() and text.isdigit()):
        raise argparse.ArgumentTypeError(f"units must be a whole number > 0, got {shown!r}")
    digits = text.lstrip("0")
    units = int(digits or "0") if len(digits) <= 16 else MAX_UNITS + 1  # no 4300-digit parse
    if units <= 0:
        raise argparse.ArgumentTypeError(f"units must be a whole number > 0, got {shown!r}")
    if units > MAX_UNITS:
        raise argparse.ArgumentTypeError(f"units must be at most {MAX_UNITS} (10**15), got {shown}")
    return units


def _optional_commands(subparsers: argparse._SubParsersAction[_Parser]) -> None:
    """Wire in ``usage_middleware.outbox_cli`` when that module exists."""
    name = f"{__package__}.outbox_cli"
    if importlib.util.find_spec(name) is None:
        return
    module = importlib.import_module(name)
    module.add_outbox_commands(subparsers)


def version() -> str:
    """The installed distribution's version (``importlib.metadata``), or ``unknown``."""
    from importlib.metadata import PackageNotFoundError
    from importlib.metadata import version as dist_version

    try:
        return dist_version("usage-middleware")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of ``usage-middleware`` (sub-commands set ``func``)."""
    parser = _Parser(
        prog=PROG,
        description="Look after the embedded usage ledger, or run the demo.",
        epilog=(
            "The ledger stores the pricing it was last given (a new --pricing replaces it, "
            "unless it drops a plan customers are still on); later commands on the same "
            "--db need no --pricing."
        ),
    )
    parser.add_argument(
        "--db",
        default=os.environ.get("USAGE_DB") or "usage.db",
        metavar="PATH",
        help="the ledger file (default: $USAGE_DB or usage.db)",
    )
    parser.add_argument(
        "--pricing",
        default=os.environ.get("USAGE_PRICING") or None,
        metavar="PATH",
        help="a Tier pricing.json (default: $USAGE_PRICING, else the one stored in the ledger)",
    )
    # The same options after the command (`show org:acme --db x.db`); SUPPRESS keeps the
    # value given before the command (or the default) when they are not repeated.
    ledger_options = _Parser(add_help=False)
    ledger_options.add_argument("--db", default=argparse.SUPPRESS, metavar="PATH", help="as above")
    ledger_options.add_argument(
        "--pricing", default=argparse.SUPPRESS, metavar="PATH", help="as above"
    )
    parser.add_argument(
        "--version", action="version", version=f"{PROG} {version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

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

    p = sub.add_parser(
        "demo",
        help="serve the example FastAPI app on a fresh ledger and meter it over real HTTP",
    )
    p.set_defaults(func=_cmd_demo)

    _optional_commands(sub)
    return parser


#: Characters of a customer id shown in an error message (then ``…``).
_CLIP = 60


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    """The parser's command names, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


def _clip(text: str, limit: int = _CLIP) -> str:
    """``text`` cut to its first ``limit`` characters plus ``…`` when longer."""
    return text if len(text) <= limit else text[:limit] + "…"


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split())
    return text or type(exc).__name__


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``usage-middleware`` with ``argv`` (default ``sys.argv[1:]``); return the exit code."""
    args: argparse.Namespace | None = None
    try:
        parser = build_parser()
        args = parser.parse_args(argv)
        func: Command | None = getattr(args, "func", None)
        if func is None:
            raise CliError(
                f"choose a command: {', '.join(_commands(parser))} (see '{PROG} --help')"
            )
        result = func(args)
        if inspect.isawaitable(result):
            result = asyncio.run(_await(result))
        sys.stdout.flush()  # a closed pipe shows here, not at exit
        return int(result)
    except BrokenPipeError:
        # The reader went away (`... | head -1`): stop quietly, as coreutils and git do
        # when SIGPIPE ends them (a shell shows 141). stdout goes to devnull so the
        # interpreter's last flush does not fail again (Python docs, "Note on SIGPIPE").
        _stdout_to_devnull()
        return _EXIT_SIGPIPE
    except (CliError, UsageMiddlewareError, ValueError, OSError, sqlite3.Error) as exc:
        message = _one_line(exc)
        outbox = getattr(args, "outbox", None)
        label, path = ("outbox", outbox) if outbox else ("ledger", getattr(args, "db", None))
        if isinstance(exc, sqlite3.Error) and isinstance(path, str) and path not in message:
            message = f"{label} file {path}: {message}"
        customer = getattr(args, "customer", None)
        if isinstance(customer, str) and len(customer) > _CLIP:  # one readable line
            for text in (repr(customer)[1:-1], customer):
                message = message.replace(text, _clip(customer))
        print(f"{PROG}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


#: The exit status of a command ended by a closed output pipe: 128 + SIGPIPE, what a
#: shell reports for coreutils and git in ``cmd | head -1``.
_EXIT_SIGPIPE = 141


def _stdout_to_devnull() -> None:
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # not a real file (a test's capture)
        return
    devnull = os.open(os.devnull, os.O_WRONLY)
    try:
        os.dup2(devnull, fd)
    finally:
        os.close(devnull)


async def _await(awaitable: Awaitable[int]) -> int:
    return await awaitable
