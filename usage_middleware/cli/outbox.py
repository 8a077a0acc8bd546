"""``usage-middleware outbox status|retry|purge``: look into and replay the delivery outbox.

::

    usage-middleware outbox status [--outbox PATH] [--json] [--limit N] [--max-retry-age S]
    usage-middleware outbox retry  [--outbox PATH] (ID ... | --all)
    usage-middleware outbox purge  [--outbox PATH] (ID ... | --all)

``status`` prints the undelivered depth, held/claimed/waiting rows, the oldest undelivered
age (seconds), how many undelivered events are older than ``--max-retry-age`` (the
reporters' ``max_retry_age``, default 3 days: dead-lettered on their next failed attempt),
every reporter instance's counters (queued, sent, retried, dead-lettered)
and the dead letters with the provider's status/code/message. ``retry`` moves dead letters
back into the outbox (same idempotency key); a running reporter delivers them within its
``poll_interval``. ``purge`` deletes dead letters for good. ``--outbox`` defaults to
``$USAGE_OUTBOX`` or ``usage-outbox.db``.

An app on :class:`~usage_middleware.LocalLedger` alone never has an outbox, so ``status``
with neither ``--outbox`` nor ``$USAGE_OUTBOX`` and no ``usage-outbox.db`` here exits 0 and
says what the outbox is and which providers use it (:data:`NO_OUTBOX`; with ``--json``, an
object with ``"exists": false`` and that text as ``"about"``).

Each command's handler is stored as ``func`` on the parsed namespace and returns the exit
status 0. A path with no file, or a file that is not an outbox (a directory, not SQLite,
a usage ledger), raises :class:`~usage_middleware.cli.CliError`: the CLI prints one line
``usage-middleware: error: no outbox at PATH ...`` or ``... PATH is not an outbox file
(why) ...`` and exits 2 (for ``status``: unless the path is only the default, see above).
Nothing is created or written before that check.
"""

from __future__ import annotations

import argparse
import json
import os
import sqlite3
import sys
import textwrap
from collections.abc import Sequence
from dataclasses import asdict
from typing import TextIO

from ..outbox import DEFAULT_MAX_RETRY_AGE, Outbox, OutboxStatus
from ._common import CliError, cannot_read, check_sqlite_file

__all__ = ["NO_OUTBOX", "add_outbox_commands", "main"]

_DEFAULT_PATH = "usage-outbox.db"

#: What ``outbox status`` prints when the default outbox file does not exist.
NO_OUTBOX = (
    "The outbox is the SQLite file where TierProvider, SpaireProvider and AresProvider keep "
    "each charge until the provider has accepted it (their outbox= argument, default "
    "usage-outbox.db), with the dead letters it refused. RedisLedger keeps the charges it "
    "could not write to Redis in an outbox of the same kind, its spool (spool=, default "
    "usage-redis-spool.db): pass --outbox usage-redis-spool.db. LocalLedger writes charges "
    "straight to its own file and has no outbox: 'usage-middleware show CUSTOMER' shows them."
)


def add_outbox_commands(subparsers: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    """Add ``outbox status|retry|purge`` to a CLI's subparsers (sets ``func`` on each)."""
    outbox_help = "the outbox file (default: $USAGE_OUTBOX or usage-outbox.db)"
    common = argparse.ArgumentParser(add_help=False)
    # After the command (`outbox status --outbox x.db`); SUPPRESS keeps a value given
    # before it (`outbox --outbox x.db status`, as the docs write it) from being reset.
    common.add_argument("--outbox", metavar="PATH", default=argparse.SUPPRESS, help=outbox_help)
    outbox = subparsers.add_parser(
        "outbox",
        help="inspect the delivery outbox and replay dead letters",
        description="Inspect the delivery outbox and replay or purge dead letters.",
    )
    outbox.add_argument("--outbox", metavar="PATH", default=None, help=outbox_help)
    commands = outbox.add_subparsers(dest="outbox_command", metavar="COMMAND", required=True)

    status = commands.add_parser(
        "status", parents=[common], help="depth, oldest age, counters, dead letters"
    )
    status.add_argument("--json", action="store_true", help="print one JSON object")
    status.add_argument(
        "--limit", type=_count, default=50, metavar="N", help="dead letters to list (default 50)"
    )
    status.add_argument(
        "--max-retry-age",
        type=_seconds,
        default=DEFAULT_MAX_RETRY_AGE,
        metavar="S",
        help="count undelivered events older than S seconds as past the retry bound"
        " (the reporters' max_retry_age; default 3 days)",
    )
    status.set_defaults(func=_status)

    for name, verb in (("retry", "move back into the outbox"), ("purge", "delete for good")):
        cmd = commands.add_parser(name, parents=[common], help=f"dead letters: {verb}")
        cmd.add_argument("ids", nargs="*", type=_count, metavar="ID", help="dead letter ids")
        cmd.add_argument("--all", action="store_true", help="every dead letter")
        cmd.set_defaults(func=_retry if name == "retry" else _purge, _parser=cmd)


_TABLES = {"outbox", "dead_letters", "owners"}


def _open(args: argparse.Namespace, *, write: bool) -> Outbox:
    """The outbox file at ``--outbox``, checked before anything is written to it.

    ``write=False`` opens it read-only (SQLite ``mode=ro``): nothing is written.

    Raises:
        CliError: no file there, it is not an outbox file (a directory, not SQLite, or a
            SQLite file without the outbox tables, such as a ledger), or this user cannot
            read it (or write it, for ``write``).
    """
    path = _resolve(args)

    def not_outbox(why: str) -> CliError:
        return CliError(f"{path} is not an outbox file ({why}); pass --outbox PATH")

    tables = check_sqlite_file(
        path, kind="outbox", a_file="an outbox file", flag="--outbox", write=write
    )
    if tables is None:
        raise CliError(f"no outbox at {path}: pass --outbox PATH (or set $USAGE_OUTBOX)")
    if not _TABLES <= tables:
        kind = "a usage ledger" if "subscriptions" in tables else "no outbox tables"
        raise not_outbox(kind)
    try:
        return Outbox(path, create=False, read_only=not write)
    except sqlite3.Error as exc:
        if not write:
            raise cannot_read(path, exc, kind="outbox") from None
        raise not_outbox(f"SQLite says: {exc}") from None


def _resolve(args: argparse.Namespace) -> str:
    """``--outbox``, else ``$USAGE_OUTBOX``, else the default; stored back on ``args``.

    Sets ``args.outbox_defaulted`` when neither was given.
    """
    if args.outbox is None:
        env = os.environ.get("USAGE_OUTBOX")
        args.outbox_defaulted = not env
        args.outbox = env or _DEFAULT_PATH
    path: str = os.fspath(args.outbox)
    return path


def _status(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out  # looked up now: redirects and tests see it
    path = _resolve(args)
    if getattr(args, "outbox_defaulted", False) and not os.path.lexists(path):
        # No outbox asked for and none here: most likely an app that has none (LocalLedger).
        if args.json:
            json.dump({"path": path, "exists": False, "about": NO_OUTBOX}, out, indent=2)
            out.write("\n")
        else:
            print(f"No outbox here ({path} does not exist).", file=out)
            print(textwrap.fill(NO_OUTBOX, width=88, break_on_hyphens=False), file=out)
        return 0
    outbox = _open(args, write=False)
    try:
        st = outbox.status(max_age=args.max_retry_age)
        dead = outbox.dead_letters(limit=max(args.limit, 0))
    finally:
        outbox.close()
    if args.json:
        doc = asdict(st) | {
            "path": args.outbox,
            "totals": _totals(st),
            "dead_letter_list": [
                {
                    "id": d.id,
                    "idempotency_key": d.event.idempotency_key,
                    "customer": d.event.customer,
                    "feature": d.event.feature,
                    "units": d.event.units,
                    "at": d.event.at.isoformat(),
                    "failed": d.failed,
                    "status": d.status,
                    "code": d.code,
                    "message": d.message,
                }
                for d in dead
            ],
        }
        json.dump(doc, out, indent=2)
        out.write("\n")
        return 0
    age = "-" if st.oldest_age is None else f"{st.oldest_age:.1f}s"
    totals = _totals(st)
    print(f"outbox {args.outbox}", file=out)
    print(
        f"  undelivered {st.depth} (held {st.held}, claimed {st.claimed},"
        f" waiting to retry {st.waiting}); oldest {age}",
        file=out,
    )
    print(
        f"  past max_retry_age ({st.max_age:g}s) {st.overdue}"
        + (": dead-lettered on their next failed attempt" if st.overdue else ""),
        file=out,
    )
    print(
        "  totals: queued {queued} sent {sent} retried {retried}"
        " dead_lettered {dead_lettered}".format(**totals),
        file=out,
    )
    live = [o for o in st.owners if o.alive]
    print(f"  live reporters {len(live)}", file=out)
    for o in live:
        print(
            f"    #{o.id} pid {o.pid}@{o.host}: queued {o.queued} sent {o.sent}"
            f" retried {o.retried} dead_lettered {o.dead_lettered}",
            file=out,
        )
    print(f"  dead letters {st.dead_letters}", file=out)
    for d in dead:
        ev = d.event
        print(
            f"    {d.id}: {ev.customer} {ev.feature} x{ev.units} key={ev.idempotency_key}"
            f" status={d.status} code={d.code} {d.message or ''}".rstrip(),
            file=out,
        )
    if st.dead_letters > len(dead):
        print(f"    ... {st.dead_letters - len(dead)} more (--limit)", file=out)
    return 0


def _totals(st: OutboxStatus) -> dict[str, int]:
    return {
        "queued": sum(o.queued for o in st.owners),
        "sent": sum(o.sent for o in st.owners),
        "retried": sum(o.retried for o in st.owners),
        "dead_lettered": sum(o.dead_lettered for o in st.owners),
    }


def _seconds(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"expected a number of seconds > 0, got {text!r}")
    return value


def _count(text: str) -> int:
    """A whole number from 0 to 2**63-1 (what SQLite stores), for ids and --limit."""
    if not (text.isascii() and text.isdigit()) or len(text) > 19 or int(text) >= 2**63:
        raise argparse.ArgumentTypeError(f"{text[:30]!r} is not a whole number from 0 to 2**63-1")
    return int(text)


def _ids(args: argparse.Namespace) -> list[int] | None:
    if args.all == bool(args.ids):
        args._parser.error("give dead letter ids or --all (not both)")
    return None if args.all else list(args.ids)


def _retry(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out  # looked up now: redirects and tests see it
    ids = _ids(args)
    outbox = _open(args, write=True)
    try:
        n = outbox.retry_dead(ids)
    finally:
        outbox.close()
    print(f"{n} dead letters moved back to the outbox for delivery", file=out)
    return 0


def _purge(args: argparse.Namespace, out: TextIO | None = None) -> int:
    out = sys.stdout if out is None else out  # looked up now: redirects and tests see it
    ids = _ids(args)
    outbox = _open(args, write=True)
    try:
        n = outbox.purge_dead(ids)
    finally:
        outbox.close()
    print(f"{n} dead letters purged", file=out)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``outbox ...`` on its own (``python -m usage_middleware.cli.outbox outbox status``).

    The same as ``usage-middleware outbox ...``: errors are one line, exit status 2.
    """
    from . import main as cli_main

    return cli_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
