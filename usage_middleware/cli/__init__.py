"""The ``usage-middleware`` command: look after the embedded ledger, and run the demo.

::

    usage-middleware [--db PATH] [--pricing PATH] COMMAND
    usage-middleware --version                     the installed version

    plans                              the plans, features, limits and intervals
    subscribe CUSTOMER PLAN            put CUSTOMER on PLAN (e.g. plan:free@1)
    grant CUSTOMER FEATURE UNITS       credit UNITS of FEATURE to CUSTOMER
    show CUSTOMER                      CUSTOMER's limits, usage and credits this period
    demo                               run the example app and meter it over real HTTP
    outbox ...                         the delivery outbox (usage_middleware.cli.outbox)

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

Extra commands: a module ``usage_middleware.cli.outbox`` (the outbox commands) with
``add_outbox_commands(subparsers)`` is wired in when present. Each command it adds calls
``set_defaults(func=f)`` with ``f(args: argparse.Namespace) -> int | Awaitable[int]``;
``args.db`` and ``args.pricing`` are set. Errors from the package's tree
(:class:`~usage_middleware.errors.UsageMiddlewareError`), ``ValueError`` and ``OSError`` it
raises become the one-line error above.

The package: ``_common`` (the one-line error, the parser, file checks, tables), ``ledger``
(the ledger commands), ``outbox`` (the outbox commands), ``demo`` (``usage-middleware
demo``); this module builds the parser and runs a command.
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
from collections.abc import Awaitable, Sequence

from ..errors import UsageMiddlewareError
from ._common import CLIP, PROG, CliError, Command, Parser, clip, render_plans, render_usage
from .ledger import add_ledger_commands

__all__ = ["PROG", "CliError", "build_parser", "main", "render_plans", "render_usage", "version"]


def _cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    return run_demo()


def _optional_commands(subparsers: argparse._SubParsersAction[Parser]) -> None:
    """Wire in ``usage_middleware.cli.outbox`` when that module exists."""
    name = f"{__name__}.outbox"
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
    parser = Parser(
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
    ledger_options = Parser(add_help=False)
    ledger_options.add_argument("--db", default=argparse.SUPPRESS, metavar="PATH", help="as above")
    ledger_options.add_argument(
        "--pricing", default=argparse.SUPPRESS, metavar="PATH", help="as above"
    )
    parser.add_argument(
        "--version", action="version", version=f"{PROG} {version()}", help="print the version"
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=Parser)
    add_ledger_commands(sub, ledger_options)

    p = sub.add_parser(
        "demo",
        help="serve the example FastAPI app on a fresh ledger and meter it over real HTTP",
    )
    p.set_defaults(func=_cmd_demo)

    _optional_commands(sub)
    return parser


def _commands(parser: argparse.ArgumentParser) -> list[str]:
    """The parser's command names, in the order they were added."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return list(action.choices)
    return []


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
        if isinstance(customer, str) and len(customer) > CLIP:  # one readable line
            for text in (repr(customer)[1:-1], customer):
                message = message.replace(text, clip(customer))
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
