"""What the CLI's commands share: the one-line error, the parser, file checks and tables."""

from __future__ import annotations

import argparse
import os
import sqlite3
import sys
from collections.abc import Awaitable, Callable, Sequence
from datetime import datetime, timedelta
from typing import TYPE_CHECKING, NoReturn
from urllib.parse import quote

from ..models import UNLIMITED

if TYPE_CHECKING:
    from ..ledger.base import FeatureUsage
    from ..pricing import Pricing

__all__ = [
    "CLIP",
    "PROG",
    "CliError",
    "Command",
    "Parser",
    "cannot_read",
    "check_sqlite_file",
    "clip",
    "render_plans",
    "render_usage",
]

PROG = "usage-middleware"

Command = Callable[[argparse.Namespace], "int | Awaitable[int]"]


class CliError(Exception):
    """Bad command-line input: printed as one ``usage-middleware: error: ...`` line, exit 2."""


class Parser(argparse.ArgumentParser):
    """An ArgumentParser whose errors are one line (raised, printed by the CLI's ``main``)."""

    def error(self, message: str) -> NoReturn:
        raise CliError(f"{message} (see '{PROG} --help')")


#: Characters of a customer id shown in an error message (then ``…``).
CLIP = 60


def clip(text: str, limit: int = CLIP) -> str:
    """``text`` cut to its first ``limit`` characters plus ``…`` when longer."""
    return text if len(text) <= limit else text[:limit] + "…"


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
        # Plan.title falls back to the plan id: no title in the file shows as "-"
        title = plan.title if plan.title and plan.title != name else "-"
        if not features:
            body.append((name, title, plan.interval, "-", "-"))
        for i, feature in enumerate(features):
            first = i == 0
            body.append(
                (
                    name if first else "",
                    title if first else "",
                    plan.interval if first else "",
                    feature.name,
                    _units(feature.limit),
                )
            )
    return _table(headers, body)


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
