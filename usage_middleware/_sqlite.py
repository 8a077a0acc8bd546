"""SQLite plumbing shared by the ledger store and the outbox.

* :func:`connect`: an autocommit connection usable from any one thread at a time, with the
  WAL pragmas set (or read-only, ``mode=ro``).
* :func:`write` / :func:`read`: ``BEGIN IMMEDIATE`` ... ``COMMIT`` (``ROLLBACK`` on error)
  and ``BEGIN`` ... ``COMMIT``.
* :class:`BusyWait`: switch a connection between waiting for another process's lock and
  failing at once (SQLITE_BUSY), for the inline use below.
* :class:`InlineRunner`: run a short blocking call inline on the event loop thread when the
  file is free, else on one worker thread that waits for the lock (see
  docs/architecture.md, "Where SQLite runs").
* :data:`KEYS_SCHEMA`, :func:`claim_key`, :func:`finish_key`: the ``Idempotency-Key``
  claims table (:mod:`usage_middleware.idempotency`) that the ledger file and the outbox
  both keep.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Literal, Protocol, TypeVar
from urllib.parse import quote

from .idempotency import IN_FLIGHT_TTL, KEY_TTL, KeyClaim

__all__ = [
    "KEYS_SCHEMA",
    "BusyWait",
    "InlineRunner",
    "Synchronous",
    "claim_key",
    "connect",
    "create_keys_table",
    "finish_key",
    "is_busy",
    "read",
    "write",
]

#: The ``Idempotency-Key`` claims: one row per customer, route and key; ``charged`` 0
#: while in flight; ``fingerprint`` the request's (``idempotency.body_fingerprint``);
#: rows past ``expires_at`` (wall clock) are pruned by later claims.
KEYS_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS idempotency_keys ("
    " id INTEGER PRIMARY KEY, customer TEXT NOT NULL, route TEXT NOT NULL,"
    " key TEXT NOT NULL, charged INTEGER NOT NULL, expires_at REAL NOT NULL,"
    " fingerprint TEXT NOT NULL DEFAULT '',"
    " UNIQUE (customer, route, key))",
    "CREATE INDEX IF NOT EXISTS idempotency_keys_expiry ON idempotency_keys (expires_at)",
)

#: Expired claims deleted per claim (pruning stays bounded per request).
_KEYS_PRUNED = 64


def create_keys_table(conn: sqlite3.Connection) -> None:
    """Create the claims table (:data:`KEYS_SCHEMA`), or add ``fingerprint`` to the table
    of a file written before it existed: its rows get ``''``, which matches no request, so
    a key charged before the upgrade answers 422 rather than serving another body free."""
    for statement in KEYS_SCHEMA:
        conn.execute(statement)
    columns = {row[1] for row in conn.execute("PRAGMA table_info(idempotency_keys)")}
    if "fingerprint" not in columns:
        conn.execute("ALTER TABLE idempotency_keys ADD COLUMN fingerprint TEXT NOT NULL DEFAULT ''")


def claim_key(
    conn: sqlite3.Connection,
    customer: str,
    route: str,
    key: str,
    now: float,
    fingerprint: str = "",
) -> KeyClaim:
    """Claim ``key`` for a request of ``fingerprint`` at wall time ``now`` inside the
    caller's write transaction.

    ``"new"`` (now in flight for ``IN_FLIGHT_TTL``), ``"charged"``, ``"busy"``, or
    ``"mismatch"`` (held for another fingerprint); prunes up to 64 expired rows.
    """
    conn.execute(
        "DELETE FROM idempotency_keys WHERE id IN (SELECT id FROM idempotency_keys"
        " WHERE expires_at <= ? LIMIT ?)",
        (now, _KEYS_PRUNED),
    )
    row = conn.execute(
        "SELECT charged, expires_at, fingerprint FROM idempotency_keys"
        " WHERE customer = ? AND route = ? AND key = ?",
        (customer, route, key),
    ).fetchone()
    if row is not None and row[1] > now:
        if row[2] != fingerprint:
            return "mismatch"
        return "charged" if row[0] else "busy"
    conn.execute(
        "INSERT INTO idempotency_keys (customer, route, key, charged, expires_at, fingerprint)"
        " VALUES (?, ?, ?, 0, ?, ?) ON CONFLICT (customer, route, key)"
        " DO UPDATE SET charged = 0, expires_at = excluded.expires_at,"
        " fingerprint = excluded.fingerprint",
        (customer, route, key, now + IN_FLIGHT_TTL, fingerprint),
    )
    return "new"


def finish_key(
    conn: sqlite3.Connection,
    customer: str,
    route: str,
    key: str,
    charged: bool,
    now: float,
    fingerprint: str = "",
) -> None:
    """Keep ``key`` (for requests of ``fingerprint``) as charged for ``KEY_TTL`` from
    ``now``, or drop the claim (inside the caller's write transaction)."""
    if charged:
        conn.execute(
            "INSERT INTO idempotency_keys (customer, route, key, charged, expires_at, fingerprint)"
            " VALUES (?, ?, ?, 1, ?, ?) ON CONFLICT (customer, route, key)"
            " DO UPDATE SET charged = 1, expires_at = excluded.expires_at,"
            " fingerprint = excluded.fingerprint",
            (customer, route, key, now + KEY_TTL, fingerprint),
        )
    else:
        conn.execute(
            "DELETE FROM idempotency_keys WHERE customer = ? AND route = ? AND key = ?",
            (customer, route, key),
        )


_T = TypeVar("_T")

#: ``synchronous`` setting: NORMAL survives a killed process (kill -9); FULL also
#: survives power loss, at the cost of an fsync per commit.
Synchronous = Literal["NORMAL", "FULL"]


def is_busy(exc: BaseException) -> bool:
    """Whether SQLite refused for a lock held elsewhere (SQLITE_BUSY / SQLITE_LOCKED)."""
    if not isinstance(exc, sqlite3.OperationalError):
        return False
    code = getattr(exc, "sqlite_errorcode", None)
    if code is not None:
        return code & 0xFF in (sqlite3.SQLITE_BUSY, sqlite3.SQLITE_LOCKED)
    return "locked" in str(exc) or "busy" in str(exc)


def connect(path: str, *, timeout: float, read_only: bool = False) -> sqlite3.Connection:
    """An autocommit connection to ``path`` (any one thread at a time).

    ``read_only`` opens it with SQLite ``mode=ro``: nothing is ever written to the file.
    ``timeout``: seconds a statement waits for another process's lock.
    """
    target = f"file:{quote(os.path.abspath(path))}?mode=ro" if read_only else path
    return sqlite3.connect(
        target, timeout=timeout, isolation_level=None, check_same_thread=False, uri=read_only
    )


def wal(
    conn: sqlite3.Connection, synchronous: Synchronous = "NORMAL", *, autocheckpoint: bool = True
) -> str:
    """Set WAL mode and ``synchronous``; return the journal mode SQLite reports.

    ``autocheckpoint`` False: no checkpoint inside a commit (it may fsync); the owner runs
    ``PRAGMA wal_checkpoint(PASSIVE)`` itself, off the event loop.
    """
    mode = str(conn.execute("PRAGMA journal_mode=WAL").fetchone()[0])
    conn.execute(f"PRAGMA synchronous={synchronous}")
    if not autocheckpoint:
        conn.execute("PRAGMA wal_autocheckpoint=0")
    return mode


def checkpoint(conn: sqlite3.Connection) -> None:
    """Copy the WAL into the database (PASSIVE: never blocks writers)."""
    conn.execute("PRAGMA wal_checkpoint(PASSIVE)")


class write:
    """One write transaction: ``BEGIN IMMEDIATE`` (the write lock at once, so processes
    sharing the file never read-then-write stale data), ``COMMIT``; ``ROLLBACK`` when the
    body or the commit fails. A class, not a generator: it runs on the hot path."""

    __slots__ = ("_conn",)

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    def __enter__(self) -> None:
        self._conn.execute("BEGIN IMMEDIATE")

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        conn = self._conn
        if exc_type is None:
            try:
                conn.execute("COMMIT")
                return
            except BaseException:
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise
        if conn.in_transaction:
            conn.execute("ROLLBACK")


@contextlib.contextmanager
def read(conn: sqlite3.Connection) -> Iterator[None]:
    """One read transaction (a consistent snapshot): ``BEGIN`` ... ``COMMIT``."""
    conn.execute("BEGIN")
    try:
        yield
    finally:
        conn.execute("COMMIT")


class BusyWait:
    """Whether ``conn`` waits up to ``timeout`` seconds for a lock or fails at once."""

    __slots__ = ("_conn", "_timeout", "_waits")

    def __init__(self, conn: sqlite3.Connection, timeout: float) -> None:
        self._conn = conn
        self._timeout = timeout
        self._waits = True  # sqlite3.connect(timeout=...) waits

    def __call__(self, wait: bool) -> None:
        if wait != self._waits:
            ms = int(self._timeout * 1000) if wait else 0
            self._conn.execute(f"PRAGMA busy_timeout={ms}")
            self._waits = wait


class _WaitsWhenBusy(Protocol):
    def wait_when_busy(self, wait: bool) -> None: ...


def _resolve(future: asyncio.Future[Any], result: Any, exc: BaseException | None) -> None:
    if future.done():
        return
    if exc is None:
        future.set_result(result)
    else:
        future.set_exception(exc)


class InlineRunner:
    """Run short blocking SQLite calls inline on the event loop when they can, else on one
    worker thread.

    Inline means on the loop thread with the busy timeout at 0: the call either gets the
    lock at once and takes tens of microseconds, or fails with "database is locked" having
    done nothing and goes to the thread, which waits for the lock. A call is inline only
    when none is queued on the thread, so calls still run in submission order. Why: a
    thread hop per small transaction costs a request ~300 us at one in flight, and the GIL
    hand-offs slow every other request of the process.

    Args:
        thread_name: the worker thread's name prefix.
        db: returns the object whose ``wait_when_busy`` switches the connection (``None``
            while there is none yet); called before each call.
    """

    def __init__(self, thread_name: str, db: Callable[[], _WaitsWhenBusy | None]) -> None:
        self._thread_name = thread_name
        self._db = db
        self._executor: ThreadPoolExecutor | None = None
        self._on_thread = 0  # calls queued on or running on the thread

    def start(self) -> None:
        """Create the worker thread (again after :meth:`shutdown`)."""
        self._executor = ThreadPoolExecutor(1, thread_name_prefix=self._thread_name)
        self._on_thread = 0

    def shutdown(self) -> None:
        """Let the worker thread end once its queued calls ran; do not wait for it."""
        if self._executor is not None:
            self._executor.shutdown(wait=False)

    def forget_thread(self) -> None:
        """Count no call as queued (their loop is gone: their callbacks never run)."""
        self._on_thread = 0

    @property
    def threaded(self) -> bool:
        """Whether a call is queued on or running on the worker thread."""
        return self._on_thread > 0

    def submit(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> asyncio.Future[_T]:
        """Run ``fn`` on the worker thread (waiting for locks); results in submission order."""
        assert self._executor is not None
        self._on_thread += 1
        future = asyncio.get_running_loop().run_in_executor(
            self._executor, self._threaded, fn, args, kwargs
        )
        future.add_done_callback(self._thread_done)
        return future

    def background(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """Run ``fn`` on the worker thread without holding back inline calls (for work on a
        connection of its own, such as a checkpoint)."""
        assert self._executor is not None
        return asyncio.get_running_loop().run_in_executor(self._executor, fn, *args)

    def _threaded(self, fn: Callable[..., _T], args: tuple[Any, ...], kwargs: Any) -> _T:
        db = self._db()
        if db is not None:
            db.wait_when_busy(True)
        return fn(*args, **kwargs)

    def _thread_done(self, _: asyncio.Future[Any]) -> None:
        self._on_thread -= 1

    def try_inline(
        self, fn: Callable[..., _T], *args: Any, **kwargs: Any
    ) -> tuple[bool, _T | None]:
        """Run ``fn`` now, on this thread, if no call is on the worker thread.

        Returns ``(True, result)``, or ``(False, None)`` when it did not run or the file was
        locked (nothing changed). Other errors propagate.
        """
        if self._on_thread:
            return False, None
        db = self._db()
        if db is not None:
            db.wait_when_busy(False)
        try:
            return True, fn(*args, **kwargs)
        except sqlite3.OperationalError as exc:
            if not is_busy(exc):
                raise
        return False, None

    async def call(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> _T:
        """Run ``fn`` inline when it can (returning at once), else on the worker thread."""
        done, result = self.try_inline(fn, *args, **kwargs)
        if done:
            return result  # type: ignore[return-value]
        return await self.submit(fn, *args, **kwargs)

    def run(self, fn: Callable[..., _T], *args: Any) -> asyncio.Future[_T]:
        """:meth:`call` as a future resolved on the next loop iteration (like a thread's
        future: callbacks the caller adds now run before the caller resumes)."""
        loop = asyncio.get_running_loop()
        future: asyncio.Future[_T] = loop.create_future()
        try:
            done, result = self.try_inline(fn, *args)
        except Exception as exc:
            loop.call_soon(_resolve, future, None, exc)
            return future
        if done:
            loop.call_soon(_resolve, future, result, None)
            return future
        return self.submit(fn, *args)
