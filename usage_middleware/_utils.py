"""Small internal helpers shared across the package."""

from __future__ import annotations

import functools
import inspect
import os
import sqlite3
from typing import Any
from urllib.parse import quote

__all__ = ["is_async_callable", "is_sqlite_busy", "sqlite_tables"]


def is_async_callable(obj: Any) -> bool:
    """Whether calling ``obj`` returns a coroutine (async function, partial or ``__call__``)."""
    while isinstance(obj, functools.partial):
        obj = obj.func
    return inspect.iscoroutinefunction(obj) or (
        callable(obj) and inspect.iscoroutinefunction(getattr(obj, "__call__", None))  # noqa: B004
    )


def is_sqlite_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether SQLite refused for a lock held elsewhere (SQLITE_BUSY / SQLITE_LOCKED)."""
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


_SQLITE_HEADER = b"SQLite format 3\x00"


def sqlite_tables(path: str) -> set[str]:
    """The table names of the SQLite file at ``path``, read without writing to it.

    An empty file (SQLite turns it into a database) has none.

    Raises:
        ValueError: a short reason why the file cannot be read or is not SQLite.
    """
    try:
        with open(path, "rb") as file:
            header = file.read(len(_SQLITE_HEADER))
    except OSError as exc:
        raise ValueError(f"cannot read it: {exc.strerror or exc}") from None
    if not header:
        return set()
    if header != _SQLITE_HEADER:
        raise ValueError("not a SQLite database")
    try:
        probe = sqlite3.connect(f"file:{quote(os.path.abspath(path))}?mode=ro", uri=True)
        try:
            return {name for (name,) in probe.execute("SELECT name FROM sqlite_master")}
        finally:
            probe.close()
    except sqlite3.Error as exc:
        raise ValueError(f"SQLite says: {exc}") from None
