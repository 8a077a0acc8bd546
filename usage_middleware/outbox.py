"""The durable delivery outbox: one SQLite file (WAL) shared by every worker process.

:class:`Outbox` is the storage half of delivery: plain, blocking ``sqlite3`` calls. The
:class:`~usage_middleware.delivery.Reporter` writes each charge here before it counts as
accepted, delivers it, and deletes it once delivered; the CLI
(``usage-middleware outbox ...``) reads and repairs it. Tables: ``outbox`` (undelivered
events, each owned by a live Reporter or free), ``dead_letters`` and ``owners`` (one per
Reporter instance, with a lease). The guarantees (leases, crash windows, dead letters,
``max_retry_age``) are in docs/architecture.md, "Storage and delivery".
"""

from __future__ import annotations

import os
import socket
import time
from collections.abc import Collection, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from . import _sqlite
from ._sqlite import Synchronous
from .idempotency import KeyClaim
from .models import UsageEvent

__all__ = [
    "DEFAULT_MAX_RETRY_AGE",
    "MAX_NOT_BEFORE",
    "DeadLetter",
    "Outbox",
    "OutboxStatus",
    "OwnerStatus",
    "StoredEvent",
    "decode_at",
    "encode_at",
]

#: Default of ``max_retry_age`` (seconds): how long a retryable failure may keep an event
#: in the outbox before it is dead-lettered (3 days: a provider outage over a weekend).
DEFAULT_MAX_RETRY_AGE: float = 3 * 86400.0

#: Seconds ahead beyond which a row's ``not_before`` is read as now (see
#: :meth:`Outbox.claim`): longer than any wait the reporter writes by default.
MAX_NOT_BEFORE = 3600.0

_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_US = timedelta(microseconds=1)

_SCHEMA = """
CREATE TABLE IF NOT EXISTS outbox (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT    NOT NULL,
    customer        TEXT    NOT NULL,
    feature         TEXT    NOT NULL,
    units           INTEGER NOT NULL,
    at_us           INTEGER NOT NULL,
    clobber         INTEGER NOT NULL DEFAULT 0,
    created         REAL    NOT NULL,
    owner           INTEGER,
    held            INTEGER NOT NULL DEFAULT 0,
    attempts        INTEGER NOT NULL DEFAULT 0,
    not_before      REAL    NOT NULL DEFAULT 0,
    last_error      TEXT
);
CREATE TABLE IF NOT EXISTS dead_letters (
    id              INTEGER PRIMARY KEY AUTOINCREMENT,
    idempotency_key TEXT    NOT NULL,
    customer        TEXT    NOT NULL,
    feature         TEXT    NOT NULL,
    units           INTEGER NOT NULL,
    at_us           INTEGER NOT NULL,
    clobber         INTEGER NOT NULL DEFAULT 0,
    created         REAL    NOT NULL,
    failed          REAL    NOT NULL,
    attempts        INTEGER NOT NULL DEFAULT 0,
    status          INTEGER,
    code            TEXT,
    message         TEXT
);
CREATE TABLE IF NOT EXISTS owners (
    id            INTEGER PRIMARY KEY AUTOINCREMENT,
    pid           INTEGER NOT NULL,
    host          TEXT    NOT NULL,
    started       REAL    NOT NULL,
    alive_until   REAL    NOT NULL,
    reaped        INTEGER NOT NULL DEFAULT 0,
    queued        INTEGER NOT NULL DEFAULT 0,
    sent          INTEGER NOT NULL DEFAULT 0,
    retried       INTEGER NOT NULL DEFAULT 0,
    dead_lettered INTEGER NOT NULL DEFAULT 0
);
"""

_EVENT_COLUMNS = "idempotency_key, customer, feature, units, at_us, clobber, created"
_INSERT = f"INSERT INTO outbox ({_EVENT_COLUMNS}, owner, held) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"


def encode_at(at: datetime) -> int:
    """Return ``at`` (an aware datetime) as whole microseconds since the epoch."""
    return (at - _EPOCH) // _US


def decode_at(at_us: int) -> datetime:
    """Return the aware UTC datetime ``at_us`` microseconds after the epoch."""
    return _EPOCH + timedelta(microseconds=at_us)


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An outbox row claimed for delivery: its row id and the event as it was written."""

    rowid: int
    event: UsageEvent
    attempts: int
    created: float = 0.0  # epoch seconds it entered the outbox
    #: The error of the row's last failed round (``None`` when it has none).
    last_error: str | None = None


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """An event a provider rejected permanently.

    Attributes:
        id: the dead letter's row id (what ``outbox retry``/``purge`` take).
        event: the event, with its original idempotency key.
        created: epoch seconds when the event entered the outbox.
        failed: epoch seconds when it was dead-lettered.
        attempts: failed rounds of retries before the permanent rejection.
        status, code, message: what the provider answered (``ProviderError`` fields).
    """

    id: int
    event: UsageEvent
    created: float
    failed: float
    attempts: int
    status: int | None
    code: str | None
    message: str | None


@dataclass(frozen=True, slots=True)
class OwnerStatus:
    """One reporter instance that used the outbox, with its lifetime counters (events)."""

    id: int
    pid: int
    host: str
    started: float
    alive: bool
    queued: int
    sent: int
    retried: int
    dead_lettered: int


@dataclass(frozen=True, slots=True)
class OutboxStatus:
    """What the outbox file holds now.

    Attributes:
        depth: undelivered events (rows in ``outbox``), all processes.
        held: of those, prepared charges whose response is still being sent.
        claimed: of those, rows a live reporter holds (in its memory or in flight).
        waiting: of those, rows delayed after a failed round of retries.
        oldest_age: seconds since the oldest undelivered event entered, or ``None``.
        dead_letters: rows in the dead-letter table.
        owners: every reporter instance recorded, newest first, with its counters.
        overdue: undelivered events older than ``max_age`` (see :meth:`Outbox.status`):
            past the retry bound, dead-lettered on their next failed attempt.
        max_age: the bound ``overdue`` was counted against, in seconds.
    """

    depth: int
    held: int
    claimed: int
    waiting: int
    oldest_age: float | None
    dead_letters: int
    owners: tuple[OwnerStatus, ...]
    overdue: int = 0
    max_age: float = DEFAULT_MAX_RETRY_AGE


def _event(
    key: str, customer: str, feature: str, units: int, at_us: int, clobber: int
) -> UsageEvent:
    return UsageEvent(
        customer,
        feature,
        units,
        at=decode_at(at_us),
        idempotency_key=key,
        clobber=bool(clobber),
    )


def _row(ev: UsageEvent, owned: bool, held: bool, owner: int, now: float) -> tuple[object, ...]:
    """The outbox row of one event, in ``_INSERT``'s column order."""
    return (
        ev.idempotency_key,
        ev.customer,
        ev.feature,
        ev.units,
        (ev.at - _EPOCH) // _US,
        ev.clobber,
        now,
        owner if owned else None,
        held,
    )


class Outbox:
    """A connection to one outbox file. Blocking; use from one thread at a time.

    Args:
        path: the SQLite file (created with its tables when missing unless ``create`` is
            False). Every worker process of an app points at the same file.
        synchronous: ``"NORMAL"`` (default; a committed row survives kill -9) or
            ``"FULL"`` (also survives power loss; an fsync per commit).
        busy_timeout: seconds to wait for another process's write lock.
        create: create the file and tables when missing; False raises
            ``FileNotFoundError`` for a missing file (the CLI's read-only use).
        read_only: open with SQLite ``mode=ro`` (implies ``create=False``): for reads such
            as :meth:`status`; nothing is written to the file.

    Raises:
        sqlite3.Error: the file cannot be opened or is not an outbox.
        FileNotFoundError: ``create`` is False and ``path`` does not exist.
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        *,
        synchronous: Synchronous = "NORMAL",
        busy_timeout: float = 10.0,
        create: bool = True,
        read_only: bool = False,
    ) -> None:
        if synchronous not in ("NORMAL", "FULL"):
            raise ValueError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")
        self.path = os.fspath(path)
        create = create and not read_only
        if not create and not os.path.exists(self.path):
            raise FileNotFoundError(f"no outbox at {self.path}")
        self._db = _sqlite.connect(self.path, timeout=busy_timeout, read_only=read_only)
        self._busy_wait = _sqlite.BusyWait(self._db, busy_timeout)
        if read_only:
            return
        if create:  # small pages for small rows: a one-row commit writes 1 KiB, not 4
            self._db.execute("PRAGMA page_size=1024")  # (no effect on an existing file)
        _sqlite.wal(self._db, synchronous)
        if create:
            self._db.executescript(_SCHEMA)
            _sqlite.create_keys_table(self._db)  # Idempotency-Key claims (remote providers)

    def wait_when_busy(self, wait: bool) -> None:
        """Set whether a locked file waits (``busy_timeout``) or fails at once (inline use)."""
        self._busy_wait(wait)

    def no_autocheckpoint(self) -> None:
        """Never checkpoint inside a commit; the owner calls :meth:`checkpoint` instead."""
        self._db.execute("PRAGMA wal_autocheckpoint=0")

    def checkpoint(self) -> None:
        """Copy the WAL into the database (PASSIVE: never blocks writers)."""
        _sqlite.checkpoint(self._db)

    def close(self) -> None:
        """Close the connection. Idempotent."""
        self._db.close()

    def _write(self) -> _sqlite.write:
        return _sqlite.write(self._db)

    # -- Idempotency-Key claims (see usage_middleware.idempotency) --------------------------

    def claim_key(self, customer: str, route: str, key: str, fingerprint: str = "") -> KeyClaim:
        """Claim ``key`` for ``customer`` on ``route``: ``"new"``, ``"charged"``, ``"busy"``
        or ``"mismatch"`` (see :func:`usage_middleware._sqlite.claim_key`)."""
        with self._write():
            return _sqlite.claim_key(self._db, customer, route, key, time.time(), fingerprint)

    def finish_key(
        self, customer: str, route: str, key: str, charged: bool, fingerprint: str = ""
    ) -> None:
        """Keep ``key`` as charged for 24 hours, or drop the claim."""
        with self._write():
            _sqlite.finish_key(self._db, customer, route, key, charged, time.time(), fingerprint)

    # -- owners ----------------------------------------------------------------------------

    def register(self, lease: float) -> int:
        """Record a new reporter instance alive for ``lease`` seconds; return its owner id."""
        now = time.time()
        with self._write():
            cur = self._db.execute(
                "INSERT INTO owners (pid, host, started, alive_until) VALUES (?, ?, ?, ?)",
                (os.getpid(), socket.gethostname(), now, now + lease),
            )
        assert cur.lastrowid is not None
        return cur.lastrowid

    def heartbeat(self, owner: int, lease: float, counters: tuple[int, int, int, int]) -> bool:
        """Extend ``owner``'s lease by ``lease`` seconds and store its counters.

        ``counters`` is (queued, sent, retried, dead_lettered). Returns False when the owner
        was already reaped (it stalled longer than its lease): its rows are free now.
        """
        with self._write():
            cur = self._db.execute(
                "UPDATE owners SET alive_until = ?, queued = ?, sent = ?, retried = ?,"
                " dead_lettered = ? WHERE id = ? AND reaped = 0",
                (time.time() + lease, *counters, owner),
            )
        return cur.rowcount == 1

    def retire(self, owner: int, counters: tuple[int, int, int, int]) -> int:
        """End ``owner``'s lease now and free its rows (held ones included).

        Called on a clean shutdown: what the owner did not deliver becomes deliverable by
        any worker at once. Returns the number of rows freed.
        """
        with self._write():
            self._db.execute(
                "UPDATE owners SET alive_until = 0, reaped = 1, queued = ?, sent = ?,"
                " retried = ?, dead_lettered = ? WHERE id = ?",
                (*counters, owner),
            )
            cur = self._db.execute(
                "UPDATE outbox SET owner = NULL, held = 0 WHERE owner = ?", (owner,)
            )
        return cur.rowcount

    def reap(self) -> int:
        """Free the rows of every owner whose lease expired; return how many were freed.

        A held row of a dead owner becomes deliverable: its response was about to be sent
        when the process died, and a prepared charge is delivered rather than lost.
        """
        now = time.time()
        dead = [
            r[0]
            for r in self._db.execute(
                "SELECT id FROM owners WHERE reaped = 0 AND alive_until < ?", (now,)
            )
        ]
        if not dead:
            return 0
        marks = ",".join("?" * len(dead))
        with self._write():
            # Re-check inside the write transaction: a heartbeat may have landed.
            dead = [
                r[0]
                for r in self._db.execute(
                    f"SELECT id FROM owners WHERE reaped = 0 AND alive_until < ?"
                    f" AND id IN ({marks})",
                    (now, *dead),
                )
            ]
            if not dead:
                return 0
            marks = ",".join("?" * len(dead))
            cur = self._db.execute(
                f"UPDATE outbox SET owner = NULL, held = 0 WHERE owner IN ({marks})", dead
            )
            self._db.execute(f"UPDATE owners SET reaped = 1 WHERE id IN ({marks})", dead)
        return cur.rowcount

    # -- the reporter's group commit ---------------------------------------------------------

    def apply(
        self,
        owner: int,
        inserts: Sequence[tuple[UsageEvent, bool, bool]] = (),
        *,
        deletes: Collection[int] = (),
        frees: Collection[int] = (),
        dead: Collection[tuple[int, int | None, str | None, str | None]] = (),
        releases: Collection[tuple[int, float, str]] = (),
    ) -> int:
        """Apply one batch of the reporter's changes in one write transaction.

        Args:
            owner: the calling reporter's owner id; rows it changes must be its own.
            inserts: (event, owned, held): new rows, owned by ``owner`` or free, held or not.
                They get consecutive ids in this order.
            deletes: row ids delivered (or cancelled): removed.
            frees: row ids to hand back (owner NULL, not held): deliverable by anyone.
            dead: (row id, status, code, message): moved to ``dead_letters``.
            releases: (row id, not_before, error): handed back after a failed round of
                retries, deliverable again from ``not_before`` (epoch seconds).

        Returns:
            the id of the first inserted row (the others follow it), or 0.
        """
        now = time.time()
        first = 0
        db = self._db
        if len(inserts) == 1 and not (deletes or frees or dead or releases):
            # One row (a prepare at one request in flight): a statement is its own
            # transaction, two statements fewer than BEGIN ... COMMIT.
            ev, owned, held = inserts[0]
            rowid = db.execute(_INSERT, _row(ev, owned, held, owner, now)).lastrowid
            assert rowid is not None
            return rowid
        with self._write():
            if inserts:
                # AUTOINCREMENT under the write lock: the rows get consecutive ids after the
                # largest ever used, so the first id follows from the last one.
                rows = [_row(ev, owned, held, owner, now) for ev, owned, held in inserts]
                if len(rows) == 1:
                    last = db.execute(_INSERT, rows[0]).lastrowid
                else:
                    db.executemany(_INSERT, rows)
                    last = db.execute("SELECT last_insert_rowid()").fetchone()[0]
                assert last is not None
                first = last - len(rows) + 1
            if deletes:
                db.executemany(
                    "DELETE FROM outbox WHERE id BETWEEN ? AND ? AND owner = ?",
                    [(lo, hi, owner) for lo, hi in _runs(deletes)],
                )
            if frees:
                db.executemany(
                    "UPDATE outbox SET owner = NULL, held = 0"
                    " WHERE id BETWEEN ? AND ? AND owner = ?",
                    [(lo, hi, owner) for lo, hi in _runs(frees)],
                )
            if dead:
                dead_rows = [(now, st, code, msg, i, owner) for i, st, code, msg in dead]
                db.executemany(
                    f"INSERT INTO dead_letters ({_EVENT_COLUMNS}, failed, attempts, status,"
                    f" code, message) SELECT {_EVENT_COLUMNS}, ?, attempts, ?, ?, ?"
                    " FROM outbox WHERE id = ? AND owner = ?",
                    dead_rows,
                )
                db.executemany(
                    "DELETE FROM outbox WHERE id = ? AND owner = ?",
                    [(r[4], owner) for r in dead_rows],
                )
            if releases:
                db.executemany(
                    "UPDATE outbox SET owner = NULL, held = 0, attempts = attempts + 1,"
                    " not_before = ?, last_error = ? WHERE id = ? AND owner = ?",
                    [(nb, err, i, owner) for i, nb, err in releases],
                )
        return first

    def claim(
        self, owner: int, limit: int, *, max_wait: float = MAX_NOT_BEFORE
    ) -> list[StoredEvent]:
        """Claim up to ``limit`` free, due rows for ``owner``, oldest first.

        A row is due when its ``not_before`` has passed, or lies more than ``max_wait``
        seconds ahead: no wait this package writes is that long, so such a value (an older
        version honoured any ``Retry-After``, decades included) is clamped to now.
        One write transaction: a row is claimed by at most one live owner.
        """
        now = time.time()
        with self._write():
            rows = self._db.execute(
                "UPDATE outbox SET owner = ? WHERE id IN (SELECT id FROM outbox"
                " WHERE owner IS NULL AND (not_before <= ? OR not_before > ?)"
                " ORDER BY id LIMIT ?)"
                f" RETURNING id, {_EVENT_COLUMNS}, attempts, last_error",
                (owner, now, now + max_wait, limit),
            ).fetchall()
        rows.sort()
        return [
            StoredEvent(
                rowid, _event(key, cust, feat, units, at_us, clob), attempts, created, error
            )
            for rowid, key, cust, feat, units, at_us, clob, created, attempts, error in rows
        ]

    def delete(self, rowid: int, key: str) -> bool:
        """Delete one row by id and idempotency key, whoever holds it; whether it existed.

        For a reporter that closed before a prepared charge was cancelled.
        """
        with self._write():
            cur = self._db.execute(
                "DELETE FROM outbox WHERE id = ? AND idempotency_key = ?", (rowid, key)
            )
        return cur.rowcount == 1

    # -- inspection and admin (CLI) -----------------------------------------------------------

    def status(self, max_age: float = DEFAULT_MAX_RETRY_AGE) -> OutboxStatus:
        """Count what the outbox holds now (one read transaction; scans the table).

        ``max_age``: the reporters' ``max_retry_age`` (seconds); rows that entered the
        outbox longer ago than that are counted as ``overdue``.
        """
        now = time.time()
        db = self._db
        with _sqlite.read(db):
            depth, held, waiting, oldest, overdue = db.execute(
                "SELECT COUNT(*), COALESCE(SUM(held), 0),"
                " COALESCE(SUM(not_before > ? AND not_before <= ?), 0), MIN(created),"
                " COALESCE(SUM(created < ?), 0) FROM outbox",
                (now, now + MAX_NOT_BEFORE, now - max_age),
            ).fetchone()
            claimed = db.execute(
                "SELECT COUNT(*) FROM outbox WHERE owner IN"
                " (SELECT id FROM owners WHERE reaped = 0 AND alive_until >= ?)",
                (now,),
            ).fetchone()[0]
            dead = db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
            owners = tuple(
                OwnerStatus(
                    id=r[0],
                    pid=r[1],
                    host=r[2],
                    started=r[3],
                    alive=not r[5] and r[4] >= now,
                    queued=r[6],
                    sent=r[7],
                    retried=r[8],
                    dead_lettered=r[9],
                )
                for r in db.execute(
                    "SELECT id, pid, host, started, alive_until, reaped, queued, sent,"
                    " retried, dead_lettered FROM owners ORDER BY id DESC"
                )
            )
        return OutboxStatus(
            depth=depth,
            held=held,
            claimed=claimed,
            waiting=waiting,
            oldest_age=None if oldest is None else max(0.0, now - oldest),
            dead_letters=dead,
            owners=owners,
            overdue=overdue,
            max_age=max_age,
        )

    def depth(self) -> tuple[int, float | None]:
        """Return (undelivered rows, epoch seconds the oldest entered or None)."""
        count, oldest = self._db.execute("SELECT COUNT(*), MIN(created) FROM outbox").fetchone()
        return count, oldest

    def dead_count(self) -> int:
        """Return the rows in the dead-letter table (waiting for `outbox retry`/`purge`)."""
        count: int = self._db.execute("SELECT COUNT(*) FROM dead_letters").fetchone()[0]
        return count

    def dead_letters(self, limit: int | None = None) -> list[DeadLetter]:
        """Return dead letters, oldest first (at most ``limit``)."""
        rows = self._db.execute(
            f"SELECT id, {_EVENT_COLUMNS}, failed, attempts, status, code, message"
            " FROM dead_letters ORDER BY id LIMIT ?",
            (-1 if limit is None else limit,),
        ).fetchall()
        return [
            DeadLetter(
                id=r[0],
                event=_event(r[1], r[2], r[3], r[4], r[5], r[6]),
                created=r[7],
                failed=r[8],
                attempts=r[9],
                status=r[10],
                code=r[11],
                message=r[12],
            )
            for r in rows
        ]

    def retry_dead(self, ids: Sequence[int] | None = None) -> int:
        """Move dead letters (``ids``, or all when None) back into the outbox, free.

        They keep their idempotency key and ``at``; they enter the outbox anew (``created``
        is now, so the retry bound ``max_retry_age`` starts again). A running reporter
        delivers them on its next poll. Returns how many moved.
        """
        where, args = _where_ids(ids)
        columns = _EVENT_COLUMNS.replace(", created", "")
        with self._write():
            self._db.execute(
                f"INSERT INTO outbox ({_EVENT_COLUMNS}) SELECT {columns}, ?"
                f" FROM dead_letters {where} ORDER BY id",
                (time.time(), *args),
            )
            cur = self._db.execute(f"DELETE FROM dead_letters {where}", args)
        return cur.rowcount

    def purge_dead(self, ids: Sequence[int] | None = None) -> int:
        """Delete dead letters (``ids``, or all when None) for good; return how many."""
        where, args = _where_ids(ids)
        with self._write():
            cur = self._db.execute(f"DELETE FROM dead_letters {where}", args)
        return cur.rowcount


def _runs(ids: Iterable[int]) -> list[tuple[int, int]]:
    """Runs of consecutive ids as (first, last) pairs: delivered rows are mostly runs."""
    runs: list[tuple[int, int]] = []
    for i in sorted(ids):
        if runs and runs[-1][1] == i - 1:
            runs[-1] = (runs[-1][0], i)
        else:
            runs.append((i, i))
    return runs


def _where_ids(ids: Sequence[int] | None) -> tuple[str, tuple[int, ...]]:
    if ids is None:
        return "", ()
    if not ids:
        return "WHERE 0", ()
    return f"WHERE id IN ({','.join('?' * len(ids))})", tuple(ids)
