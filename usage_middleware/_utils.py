"""Small internal helpers shared across the package."""

from __future__ import annotations

import functools
import inspect
import sqlite3
from typing import Any

__all__ = ["is_async_callable", "is_sqlite_busy"]


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
