"""The SQLite side of :class:`~usage_middleware.ledger.LocalLedger`: one file, one writer thread.

:class:`LedgerStore` owns one ``sqlite3`` connection and is used only from the ledger's
worker thread; every method is one transaction (``BEGIN IMMEDIATE`` for writes, so the
processes sharing the file serialise their writes and never read-then-write stale data).
The tables (``meta``, ``subscriptions``, ``credits``, ``usage``, ``charges``, ``leases``,
``changes``) are described in ``docs/architecture.md``, "The file".
"""

from __future__ import annotations

import contextlib
import functools
import logging
import os
import sqlite3
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from .. import _sqlite
from ..errors import ConfigurationError, LedgerError, PermanentProviderError
from ..idempotency import KeyClaim
from ..models import UNLIMITED, UsageEvent
from ..pricing import DEFAULT_INTERVAL, Interval, Plan, Pricing, loads_pricing, period_bounds
from .base import FeatureUsage, usage_rows

__all__ = ["LeaseGrant", "LeaseRequest", "LedgerStore", "StoredCharge", "cannot_open", "period_key"]

logger = logging.getLogger("usage_middleware.ledger")

SCHEMA_VERSION = 2

#: Seconds between two retention passes over ``charges``, and rows deleted per pass: the
#: work per tick stays bounded (a backlog goes at 1,000 rows a minute, 1.4 million a day).
_PRUNE_EVERY = 60.0
_PRUNE_ROWS = 1000

#: Seconds a transaction on the worker thread waits for another process's write lock.
BUSY_TIMEOUT = 30.0

_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS subscriptions ("
    " customer TEXT PRIMARY KEY, plan TEXT NOT NULL, since TEXT NOT NULL) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS credits ("
    " customer TEXT NOT NULL, feature TEXT NOT NULL,"
    " credited INTEGER NOT NULL DEFAULT 0, consumed INTEGER NOT NULL DEFAULT 0,"
    " PRIMARY KEY (customer, feature)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS usage ("
    " customer TEXT NOT NULL, feature TEXT NOT NULL, period TEXT NOT NULL,"
    " used INTEGER NOT NULL, PRIMARY KEY (customer, feature, period)) WITHOUT ROWID",
    "CREATE TABLE IF NOT EXISTS charges ("
    " id INTEGER PRIMARY KEY, customer TEXT NOT NULL, feature TEXT NOT NULL,"
    " period TEXT NOT NULL, units INTEGER NOT NULL, requests INTEGER NOT NULL DEFAULT 1,"
    " at TEXT NOT NULL, idempotency_key TEXT UNIQUE, clobber INTEGER NOT NULL DEFAULT 0)",
    # Group commits add to one row per (customer, feature, period, hour): this index finds it.
    "CREATE INDEX IF NOT EXISTS charges_hour ON charges (customer, feature, period, at)"
    " WHERE idempotency_key IS NULL",
    # Retention: the tick deletes the oldest rows by time (see LedgerStore.maintain).
    "CREATE INDEX IF NOT EXISTS charges_at ON charges (at)",
    "CREATE TABLE IF NOT EXISTS leases ("
    " customer TEXT NOT NULL, feature TEXT NOT NULL, period TEXT NOT NULL,"
    " owner TEXT NOT NULL, units INTEGER NOT NULL, expires_at REAL NOT NULL,"
    " PRIMARY KEY (customer, feature, period, owner)) WITHOUT ROWID",
    "CREATE INDEX IF NOT EXISTS leases_owner ON leases (owner)",
    # The tick renews only this owner's rows near expiry and deletes only dead rows: both
    # are range scans, so upkeep does not read every lease of every process.
    "CREATE INDEX IF NOT EXISTS leases_renew ON leases (owner, expires_at)",
    "CREATE INDEX IF NOT EXISTS leases_expiry ON leases (expires_at)",
    "CREATE TABLE IF NOT EXISTS changes ("
    " customer TEXT PRIMARY KEY, generation INTEGER NOT NULL) WITHOUT ROWID",
)


def cannot_open(path: str, exc: sqlite3.Error) -> ConfigurationError:
    """The error for a ledger file SQLite cannot open or set up: names ``path`` and the fix."""
    shown = os.path.abspath(path) if path else "(an empty path)"
    folder = os.path.dirname(os.path.abspath(path)) if path else ""
    if not path:
        why = "the path is empty; pass the path of the ledger file, such as 'usage.db'"
    elif os.path.isdir(path):
        why = "it is a directory; pass the path of a file in it, such as 'usage.db'"
    elif not os.path.isdir(folder):
        why = f"its directory {folder!r} does not exist; create it, or pass another path"
    elif isinstance(exc, sqlite3.DatabaseError) and "not a database" in str(exc):
        why = "it is not a SQLite file; pass the path of a ledger file (or of a new file)"
    elif "readonly" in str(exc) or not os.access(folder, os.W_OK):
        why = (
            "the ledger needs write access to the file and to its directory (SQLite keeps "
            f"-wal and -shm files next to it); let this process write to {folder!r}"
        )
    else:
        why = (
            "check that it is a usage ledger file and that this process may read and write "
            "it and its directory"
        )
    return ConfigurationError(f"cannot open the ledger file {shown!r} ({exc}): {why}")


@functools.lru_cache(maxsize=256)
def period_key(start: datetime, end: datetime) -> str:
    """The usage row's period: an ISO 8601 interval of dates, e.g. ``2026-11-01/2026-12-01``.

    Cached: every customer's slot and lease record share one string per period.
    """
    return f"{start.date().isoformat()}/{end.date().isoformat()}"


def _iso(epoch: float) -> str:
    return datetime.fromtimestamp(epoch, UTC).isoformat()


def _overage(used: int, limit: int) -> int:
    return 0 if limit >= UNLIMITED else max(0, used - limit)


def _capped(units: int) -> int:
    """``units`` clamped at ``UNLIMITED`` (2**63-1): SQLite integers are 64-bit.

    Past it SQLite either refuses a parameter (``OverflowError``) or silently turns the sum
    into a REAL; a usage or credit total that large means "no end" anyway.
    """
    return units if units < UNLIMITED else UNLIMITED


#: ``column + ?`` for a column and an addend in 0..UNLIMITED, clamped at UNLIMITED without
#: ever computing a sum past 2**63-1 (parameters: the addend's headroom, UNLIMITED, addend).
_CAPPED_ADD = "CASE WHEN {0} > ? THEN ? ELSE {0} + ? END"


#: Errors that one charge's data can cause (a group commit then writes entry by entry).
_BAD_ENTRY: tuple[type[Exception], ...] = (
    ArithmeticError,
    ValueError,
    TypeError,
    sqlite3.IntegrityError,
    sqlite3.DataError,
    sqlite3.InterfaceError,
)


def _capped_add_args(units: int) -> tuple[int, int, int]:
    return UNLIMITED - units, UNLIMITED, units


#: One lease of :meth:`LedgerStore.lease_many`: customer, feature, the time (its period),
#: units needed, units wanted, and the (period, units) given back first.
LeaseRequest = tuple[str, str, datetime, int, int, Sequence[tuple[str, int]]]

#: One (customer, feature, period)'s charges in a group commit, for :meth:`LedgerStore.flush`:
#: customer, feature, period key, the limit they were leased under, units, how many of those
#: came from this owner's lease, how many requests, and the last charge's time (epoch s).
StoredCharge = tuple[str, str, str, int, int, int, int, float]


@dataclass(slots=True)
class LeaseGrant:
    """What a lease transaction decided for one (customer, feature).

    ``known`` False means an unknown customer (nothing else is set). Otherwise: the period
    (``end``, exclusive, and the ``period`` key), whether the feature is ``in_plan``,
    ``limit`` (``UNLIMITED``, or 0 outside the plan), ``used`` this period,
    ``credits`` (balance, negative shown as 0), ``others`` (units of this period's capacity
    held by other processes' leases or promised to another period's leases), ``take``
    (units added to this process's lease), ``spare`` (units still free for any process
    after this lease) and ``roomy`` (``spare`` is large: the caller may refill ahead of
    demand).
    """

    known: bool
    in_plan: bool = False
    end: datetime | None = None
    period: str = ""
    limit: int = 0
    used: int = 0
    credits: int = 0
    others: int = 0
    take: int = 0
    spare: int = 0
    roomy: bool = False


class LedgerStore:
    """One ledger file's connection; every method is one transaction. Worker thread only.

    ``_rows`` mirrors this owner's lease rows as they should be; it changes only when a
    transaction that wrote them commits, so it is right even when another process deleted
    an expired row.
    """

    def __init__(
        self, path: str, owner: str, *, lease_ttl: float, charges_retention: float | None = None
    ) -> None:
        self.path = path
        self.owner = owner
        self.lease_ttl = lease_ttl
        # Seconds a ``charges`` row is kept (None: forever); pruned by maintain().
        self.charges_retention = charges_retention
        self._pruned_at = -float("inf")
        self.pricing: Pricing | None = None
        self._pricing_generation: int | None = None
        self._conn: sqlite3.Connection | None = None
        self._read_only = False
        self._checkpoint_conn: sqlite3.Connection | None = None
        self._busy_wait: _sqlite.BusyWait | None = None
        # (customer, feature, period) -> units: flat, one small entry per lease (memory per
        # customer); _periods counts the rows per period, so a key's periods are found by
        # probing the few periods in use.
        self._rows: dict[tuple[str, str, str], int] = {}
        self._periods: dict[str, int] = {}
        # Wall time of the last maintain() that committed: until renewed_at + lease_ttl / 2
        # none of this owner's rows can have expired (maintain renews every row that would).
        self._renewed_at = -float("inf")
        # This transaction's writes to this owner's lease rows, (customer, feature, period)
        # -> units, indexed by key so a transaction touching many keys stays linear; and
        # the periods they are in.
        self._staged: dict[tuple[str, str, str], int] = {}
        self._staged_periods: set[str] = set()
        self._ends: dict[str, datetime] = {}  # period key -> its end (shared by the grants)

    # -- connection ----------------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        if self._conn is None:
            raise ConfigurationError("the ledger's database is not open")
        return self._conn

    def open(self, pricing_json: str | None) -> int:
        """Connect, set WAL, create the schema, store or load the pricing; return the generation."""
        # One connection, used by one thread at a time: the ledger's worker thread, or the
        # event loop thread for short transactions with the busy timeout at 0 (see
        # LocalLedger._run). Checkpoints run on a connection of their own (checkpoint()).
        if self.path and os.path.exists(self.path) and not os.path.isdir(self.path):
            if not os.path.isfile(self.path):  # /dev/null, a FIFO: refuse before SQLite
                raise ConfigurationError(  # writes a -journal file next to it
                    f"ledger file {os.path.abspath(self.path)!r} cannot be opened: it is not "
                    "a regular file; pass the path of a ledger file (or of a new file), "
                    "such as 'usage.db'"
                )
        try:
            conn = _sqlite.connect(self.path, timeout=BUSY_TIMEOUT)
        except sqlite3.Error as exc:
            raise cannot_open(self.path, exc) from exc
        self._conn = conn
        self._read_only = False
        self._busy_wait = _sqlite.BusyWait(conn, BUSY_TIMEOUT)
        try:
            try:
                # No checkpoint inside a commit (it may fsync): checkpoint() runs them on
                # the worker thread, every tick.
                mode = _sqlite.wal(conn, "NORMAL", autocheckpoint=False)
            except sqlite3.Error as exc:
                if _sqlite.is_busy(exc):
                    raise
                raise cannot_open(self.path, exc) from exc
            if mode != "wal":
                logger.warning("ledger %s: journal_mode is %s, not wal", self.path, mode)
            with self._write():
                try:
                    for statement in _SCHEMA:
                        conn.execute(statement)
                    _sqlite.create_keys_table(conn)  # Idempotency-Key claims
                except sqlite3.Error as exc:
                    if _sqlite.is_busy(exc):
                        raise
                    raise cannot_open(self.path, exc) from exc
                version = self._meta("schema")
                if version is None:
                    self._set_meta("schema", SCHEMA_VERSION)
                elif int(version) > SCHEMA_VERSION:
                    raise ConfigurationError(
                        f"ledger file {self.path!r} has schema {version}, newer than this "
                        f"usage_middleware understands ({SCHEMA_VERSION}); upgrade it"
                    )
                if pricing_json is not None and self._meta("pricing") != pricing_json:
                    self._check_dropped_plans(pricing_json)
                    self._set_meta("pricing", pricing_json)
                    self._set_meta("pricing_generation", self._bump(None))
                self._refresh_pricing()
                return int(self._meta("generation") or 0)
        except BaseException:
            conn.close()
            self._conn = None
            raise

    def open_read_only(self) -> int:
        """Connect read-only (SQLite ``mode=ro``) for reads only: write nothing; the generation.

        For the CLI's read commands. Creates no schema and stores no pricing; :meth:`close`
        then writes nothing either.

        Raises:
            sqlite3.Error: the file cannot be read (for a WAL file in a directory this user
                cannot write to, SQLite cannot create the ``-shm`` file it needs).
            ConfigurationError: the file's schema is newer than this package.
        """
        conn = _sqlite.connect(self.path, timeout=BUSY_TIMEOUT, read_only=True)
        self._busy_wait = _sqlite.BusyWait(conn, BUSY_TIMEOUT)
        self._conn = conn
        self._read_only = True
        try:
            with self._read():
                version = self._meta("schema")
                if version is not None and int(version) > SCHEMA_VERSION:
                    raise ConfigurationError(
                        f"ledger file {self.path!r} has schema {version}, newer than this "
                        f"usage_middleware understands ({SCHEMA_VERSION}); upgrade it"
                    )
                self._refresh_pricing()
                return int(self._meta("generation") or 0)
        except BaseException:
            conn.close()
            self._conn = None
            raise

    def _check_dropped_plans(self, pricing_json: str) -> None:
        """Refuse a new pricing that drops a plan customers are still on (in a transaction).

        Raises:
            ConfigurationError: naming each dropped plan, how many customers are on it, and
                the fix.
        """
        self._refresh_pricing()
        if self.pricing is None:
            return
        kept = loads_pricing(pricing_json, origin="the new pricing").plans
        dropped = [name for name in self.pricing.plans if name not in kept]
        if not dropped:
            return
        marks = ", ".join("?" * len(dropped))
        counts = self.conn.execute(
            f"SELECT plan, COUNT(*) FROM subscriptions WHERE plan IN ({marks})"
            " GROUP BY plan ORDER BY plan",
            dropped,
        ).fetchall()
        if not counts:
            return
        on = ", ".join(f"{plan} ({n} customer{'' if n == 1 else 's'})" for plan, n in counts)
        raise ConfigurationError(
            f"the new pricing drops plans that customers of the ledger {self.path!r} are "
            f"still on: {on}; keep those plans in the pricing, or move the customers first: "
            "load a pricing with both the old and the new plans, 'usage-middleware subscribe "
            "CUSTOMER NEWPLAN' each customer, then load the pricing without the old plan"
        )

    def wait_when_busy(self, wait: bool) -> None:
        """Set whether a locked file waits (up to ``BUSY_TIMEOUT``) or fails at once."""
        if self._busy_wait is None:
            raise ConfigurationError("the ledger's database is not open")
        self._busy_wait(wait)

    def checkpoint(self) -> None:
        """Copy the WAL into the database (PASSIVE: never blocks writers). Worker thread only."""
        if self._checkpoint_conn is None:
            self._checkpoint_conn = _sqlite.connect(self.path, timeout=BUSY_TIMEOUT)
        _sqlite.checkpoint(self._checkpoint_conn)

    def close(self) -> None:
        """Give back every lease of this owner and close the connection."""
        if self._checkpoint_conn is not None:
            self._checkpoint_conn.close()
            self._checkpoint_conn = None
        if self._conn is None:
            return
        if self._read_only:
            self.conn.close()
            self._conn = None
            return
        try:
            with self._write():
                self.conn.execute("DELETE FROM leases WHERE owner = ?", (self.owner,))
            self._rows.clear()
            self._periods.clear()
        finally:
            self.conn.close()
            self._conn = None

    @contextlib.contextmanager
    def _write(self) -> Iterator[None]:
        self._staged = {}
        self._staged_periods = set()
        try:
            with _sqlite.write(self.conn):
                yield
        except BaseException:
            self._staged = {}
            raise
        rows, periods = self._rows, self._periods
        for key, units in self._staged.items():
            if units > 0:
                if key not in rows:
                    periods[key[2]] = periods.get(key[2], 0) + 1
                rows[key] = units
            elif rows.pop(key, None) is not None:
                left = periods[key[2]] - 1
                if left:
                    periods[key[2]] = left
                else:
                    del periods[key[2]]
        self._staged = {}

    def _read(self) -> contextlib.AbstractContextManager[None]:
        return _sqlite.read(self.conn)

    # -- small reads and writes (inside a transaction) -----------------------------------

    def _meta(self, key: str) -> Any:
        row = self.conn.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else row[0]

    def _set_meta(self, key: str, value: object) -> None:
        self.conn.execute(
            "INSERT INTO meta (key, value) VALUES (?, ?)"
            " ON CONFLICT (key) DO UPDATE SET value = excluded.value",
            (key, value),
        )

    def _bump(self, customer: str | None) -> int:
        """Advance the generation other processes poll; note which customer changed."""
        generation = int(self._meta("generation") or 0) + 1
        self._set_meta("generation", generation)
        if customer is not None:
            self.conn.execute(
                "INSERT INTO changes (customer, generation) VALUES (?, ?)"
                " ON CONFLICT (customer) DO UPDATE SET generation = excluded.generation",
                (customer, generation),
            )
        return generation

    def _refresh_pricing(self) -> None:
        generation = self._meta("pricing_generation")
        if generation == self._pricing_generation:
            return
        text = self._meta("pricing")
        self.pricing = None if text is None else loads_pricing(text, origin="stored pricing")
        self._pricing_generation = generation

    def _used(self, customer: str, feature: str, period: str) -> int:
        row = self.conn.execute(
            "SELECT used FROM usage WHERE customer = ? AND feature = ? AND period = ?",
            (customer, feature, period),
        ).fetchone()
        return 0 if row is None else int(row[0])

    def _balance(self, customer: str, feature: str) -> int:
        row = self.conn.execute(
            "SELECT credited - consumed FROM credits WHERE customer = ? AND feature = ?",
            (customer, feature),
        ).fetchone()
        return 0 if row is None else int(row[0])

    def _plan_of(
        self, customer: str, *, refresh: bool = True
    ) -> tuple[bool, Plan | None, str | None]:
        """(known, plan or None, the subscribed plan's name) for a customer (``refresh``
        False: the pricing was read in this transaction already)."""
        if refresh:
            self._refresh_pricing()
        row = self.conn.execute(
            "SELECT plan FROM subscriptions WHERE customer = ?", (customer,)
        ).fetchone()
        if row is not None:
            name = str(row[0])
            plan = None if self.pricing is None else self.pricing.plans.get(name)
            if plan is None:
                logger.warning("customer %s is on plan %s, which the pricing lacks", customer, name)
            return True, plan, name
        has_credits = self.conn.execute(
            "SELECT 1 FROM credits WHERE customer = ? LIMIT 1", (customer,)
        ).fetchone()
        return has_credits is not None, None, None

    def _own_rows(self, customer: str, feature: str) -> dict[str, int]:
        """This owner's lease rows for (customer, feature) as of now in the transaction."""
        rows: dict[str, int] = {}
        for period in (*self._periods, *self._staged_periods):
            units = self._row(customer, feature, period)
            if units > 0:
                rows[period] = units
        return rows

    def _row(self, customer: str, feature: str, period: str) -> int:
        key = (customer, feature, period)
        staged = self._staged.get(key)
        if staged is not None:
            return staged
        return self._rows.get(key, 0)

    def _claim(self, customer: str, feature: str, period: str, units: int, now: float) -> None:
        """Set this owner's lease row to ``units`` and renew it (after a capacity check)."""
        if units <= 0:
            self._shrink(customer, feature, period, self._row(customer, feature, period), now)
            return
        self.conn.execute(
            "INSERT INTO leases (customer, feature, period, owner, units, expires_at)"
            " VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (customer, feature, period, owner)"
            " DO UPDATE SET units = excluded.units, expires_at = excluded.expires_at",
            (customer, feature, period, self.owner, units, now + self.lease_ttl),
        )
        self._staged[customer, feature, period] = units
        self._staged_periods.add(period)

    def _shrink(self, customer: str, feature: str, period: str, units: int, now: float) -> None:
        """Take ``units`` off this owner's lease row; never revives an expired row."""
        left = self._row(customer, feature, period) - units
        key = (customer, feature, period, self.owner)
        if left <= 0:
            self.conn.execute(
                "DELETE FROM leases WHERE customer = ? AND feature = ? AND period = ?"
                " AND owner = ?",
                key,
            )
        else:
            self.conn.execute(
                "UPDATE leases SET units = ? WHERE customer = ? AND feature = ? AND period = ?"
                " AND owner = ? AND expires_at >= ?",
                (left, *key, now),
            )
        self._staged[customer, feature, period] = max(0, left)
        self._staged_periods.add(period)

    def _taken_elsewhere(
        self, customer: str, feature: str, period: str, limit: int, now: float
    ) -> int:
        """Units of ``period``'s capacity not available to this owner.

        Live leases of other owners in ``period``, plus the credits that live leases in
        other periods (a period rollover) may still consume.
        """
        held: dict[str, int] = {}
        for other_period, units in self.conn.execute(
            "SELECT period, SUM(units) FROM leases WHERE customer = ? AND feature = ?"
            " AND owner <> ? AND expires_at >= ? GROUP BY period",
            (customer, feature, self.owner, now),
        ):
            held[other_period] = int(units)
        for own_period, units in self._own_rows(customer, feature).items():
            if own_period != period:
                held[own_period] = held.get(own_period, 0) + units
        taken = held.pop(period, 0)
        for other_period, units in held.items():
            used = self._used(customer, feature, other_period)
            taken += _overage(used + units, limit) - _overage(used, limit)
        return taken

    def _add_usage(
        self, customer: str, feature: str, period: str, units: int, limit: int, *, clobber: bool
    ) -> tuple[int, int]:
        """Add (or with ``clobber`` set) usage; units beyond the limit consume credits.

        Returns the period's new ``used`` and the credit balance.
        """
        old = self._used(customer, feature, period)
        new = _capped(units if clobber else old + units)
        self.conn.execute(
            "INSERT INTO usage (customer, feature, period, used) VALUES (?, ?, ?, ?)"
            " ON CONFLICT (customer, feature, period) DO UPDATE SET used = excluded.used",
            (customer, feature, period, new),
        )
        delta = _overage(new, limit) - _overage(old, limit)
        if delta > 0:
            self.conn.execute(
                "INSERT INTO credits (customer, feature, credited, consumed) VALUES (?, ?, 0, ?)"
                " ON CONFLICT (customer, feature) DO UPDATE SET consumed = "
                + _CAPPED_ADD.format("consumed"),
                (customer, feature, delta, *_capped_add_args(delta)),
            )
        elif delta < 0:
            self.conn.execute(
                "UPDATE credits SET consumed = MAX(0, consumed + ?)"
                " WHERE customer = ? AND feature = ?",
                (delta, customer, feature),
            )
        return new, self._balance(customer, feature)

    # -- transactions --------------------------------------------------------------------

    def lease(
        self,
        customer: str,
        feature: str,
        at: datetime,
        need: int,
        want: int,
        gives: Sequence[tuple[str, int]],
    ) -> LeaseGrant:
        """Return ``gives`` (period, units); lease ``need`` units or more if they are free.

        The block taken is ``min(want, free // 4)`` units, at least ``need``, where ``free``
        is what no live lease holds (so near the limit blocks shrink to what is asked).
        """
        return self.lease_many([(customer, feature, at, need, want, gives)])[0]

    def lease_many(self, requests: Sequence[LeaseRequest]) -> list[LeaseGrant]:
        """:meth:`lease` for many (customer, feature) at once, in one transaction.

        One grant per request, in order. Requests are applied one after the other, so two
        of the same key see each other's lease.
        """
        now = time.time()
        with self._write():
            self._refresh_pricing()
            return [self._lease(*request, now) for request in requests]

    def _lease(
        self,
        customer: str,
        feature: str,
        at: datetime,
        need: int,
        want: int,
        gives: Sequence[tuple[str, int]],
        now: float,
    ) -> LeaseGrant:
        for period, units in gives:
            self._shrink(customer, feature, period, units, now)
        known, plan, _ = self._plan_of(customer, refresh=False)
        if not known:
            return LeaseGrant(known=False)
        interval: Interval = DEFAULT_INTERVAL if plan is None else plan.interval
        start, end = period_bounds(interval, at)
        period = period_key(start, end)
        if len(self._ends) > 64:
            self._ends.clear()
        end = self._ends.setdefault(period, end)  # one datetime per period, not per slot
        plan_feature = None if plan is None else plan.features.get(feature)
        limit = 0 if plan_feature is None else plan_feature.limit
        grant = LeaseGrant(
            known=True,
            in_plan=plan_feature is not None,
            end=end,
            period=period,
            limit=limit,
            used=self._used(customer, feature, period),
            credits=max(0, self._balance(customer, feature)),
        )
        if limit >= UNLIMITED:
            return grant
        grant.others = self._taken_elsewhere(customer, feature, period, limit, now)
        mine = self._row(customer, feature, period)
        free = max(0, limit - grant.used) + grant.credits - grant.others - mine
        if need <= free:
            grant.take = min(free, max(need, min(want, free // 4)))
        grant.spare = max(0, free - grant.take)
        grant.roomy = grant.spare >= 4 * want
        if grant.take or mine:
            self._claim(customer, feature, period, mine + grant.take, now)
        return grant

    def flush(self, batch: Sequence[StoredCharge]) -> dict[tuple[str, str, str], tuple[int, int]]:
        """Write group-committed charges in one transaction; return (used, balance) per key.

        Each entry adds its units to the period's ``used`` (units beyond the limit consume
        credits; sums stop at ``UNLIMITED``), takes its lease-funded units off this owner's
        lease row, and leaves one ``charges`` row.

        One bad entry never blocks the others: when the transaction fails with an error that
        belongs to one entry's data (:data:`_BAD_ENTRY`: an overflow, a bad value, a
        constraint), the batch is written again entry by entry (a savepoint each) and an
        entry that still fails so is logged (error, with its customer, feature and units)
        and left out of the result. Other errors (locked, busy, I/O) are worth retrying whole.

        Raises:
            sqlite3.Error: nothing was written; retry the whole batch.
        """
        try:
            return self._flush(batch, isolate=False)
        except _BAD_ENTRY:
            logger.warning(
                "ledger %s: a group commit of %d charges failed; writing them one by one",
                self.path,
                len(batch),
                exc_info=True,
            )
            return self._flush(batch, isolate=True)

    def _flush(
        self, batch: Sequence[StoredCharge], *, isolate: bool
    ) -> dict[tuple[str, str, str], tuple[int, int]]:
        now = time.time()
        result: dict[tuple[str, str, str], tuple[int, int]] = {}
        with self._write():
            if not isolate:
                for entry in batch:
                    self._charge_row(entry)
                    self._flush_entry(entry, now, result)
                return result
            for entry in batch:
                staged = dict(self._staged)
                self.conn.execute("SAVEPOINT charge")
                try:
                    self._charge_row(entry)
                    self._flush_entry(entry, now, result)
                except _BAD_ENTRY:
                    self.conn.execute("ROLLBACK TO charge")
                    self._staged = staged
                    result.pop(entry[:3], None)
                    logger.error(
                        "ledger %s: dropped a charge that cannot be written: %d units of %s "
                        "for %s (period %s)",
                        self.path,
                        entry[4],
                        entry[1],
                        entry[0],
                        entry[2],
                        exc_info=True,
                    )
                self.conn.execute("RELEASE charge")
        return result

    def _charge_row(self, entry: StoredCharge) -> None:
        """Add a group commit's charges to their (customer, feature, period, hour) row.

        The audit trail of group commits is coalesced per hour of ``at`` (UTC), so the
        ``charges`` table grows with customers x hours, not with requests; ``at`` is the
        hour's last charge. Rows of :meth:`report` (idempotency keys) stay one per event.
        """
        customer, feature, period, _, units, _, requests, at = entry
        units, requests = _capped(units), _capped(requests)
        hour = int(at // 3600) * 3600
        stamp = _iso(at)
        row = self.conn.execute(
            # INDEXED BY: the planner would otherwise take the idempotency_key index for
            # "IS NULL", which matches every group-commit row (a scan per charge).
            "SELECT id FROM charges INDEXED BY charges_hour"
            " WHERE customer = ? AND feature = ? AND period = ?"
            " AND idempotency_key IS NULL AND at >= ? AND at < ? AND clobber = 0 LIMIT 1",
            (customer, feature, period, _iso(hour), _iso(hour + 3600)),
        ).fetchone()
        if row is None:
            self.conn.execute(
                "INSERT INTO charges (customer, feature, period, units, requests, at)"
                " VALUES (?, ?, ?, ?, ?, ?)",
                (customer, feature, period, units, requests, stamp),
            )
            return
        self.conn.execute(
            "UPDATE charges SET units = "
            + _CAPPED_ADD.format("units")
            + ", requests = "
            + _CAPPED_ADD.format("requests")
            + ", at = MAX(at, ?) WHERE id = ?",
            (*_capped_add_args(units), *_capped_add_args(requests), stamp, row[0]),
        )

    def _flush_entry(
        self,
        entry: StoredCharge,
        now: float,
        result: dict[tuple[str, str, str], tuple[int, int]],
    ) -> None:
        customer, feature, period, limit, units, leased, _, _ = entry
        result[customer, feature, period] = self._add_usage(
            customer, feature, period, units, limit, clobber=False
        )
        if leased:
            self._shrink(customer, feature, period, leased, now)

    def give_back(self, gives: Sequence[tuple[str, str, str, int]]) -> None:
        """Return idle units (customer, feature, period, units) in one transaction."""
        now = time.time()
        with self._write():
            for customer, feature, period, units in gives:
                self._shrink(customer, feature, period, units, now)

    def maintain(
        self, gives: Sequence[tuple[str, str, str, int]], seen: int
    ) -> tuple[int, set[str] | None, set[tuple[str, str, str]]]:
        """Return idle units, renew this owner's leases near expiry, clean up dead ones.

        Returns the generation, the customers changed since ``seen`` (``None``: everything,
        the pricing changed) and this owner's rows that expired before being renewed.
        The work is proportional to ``gives``, the rows renewed (each about once every
        ``lease_ttl / 2``) and the rows expired: the live rows are read only after a stall
        long enough for one of them to have expired.
        """
        now = time.time()
        with self._write():
            conn = self.conn
            for customer, feature, period, units in gives:
                self._shrink(customer, feature, period, units, now)
            lost: set[tuple[str, str, str]] = set()
            if now >= self._renewed_at + self.lease_ttl / 2:
                live = set(
                    conn.execute(
                        "SELECT customer, feature, period FROM leases"
                        " WHERE owner = ? AND expires_at >= ?",
                        (self.owner, now),
                    )
                )
                lost = {
                    (customer, feature, period)
                    for customer, feature, period in {*self._rows, *self._staged}
                    if self._row(customer, feature, period) > 0
                    if (customer, feature, period) not in live
                }
            conn.execute(
                "UPDATE leases SET expires_at = ? WHERE owner = ? AND expires_at >= ?"
                " AND expires_at < ?",
                (now + self.lease_ttl, self.owner, now, now + self.lease_ttl / 2),
            )
            conn.execute("DELETE FROM leases WHERE expires_at < ?", (now,))
            if self.charges_retention is not None and now >= self._pruned_at + _PRUNE_EVERY:
                self._pruned_at = now
                self._prune(now - self.charges_retention)
            generation = int(self._meta("generation") or 0)
            changed: set[str] | None = set()
            if generation != seen:
                if int(self._meta("pricing_generation") or 0) > seen:
                    changed = None
                else:
                    changed = {
                        customer
                        for (customer,) in conn.execute(
                            "SELECT customer FROM changes WHERE generation > ?", (seen,)
                        )
                    }
        self._renewed_at = now
        return generation, changed, lost

    def _prune(self, before: float) -> None:
        """Delete up to ``_PRUNE_ROWS`` of the oldest ``charges`` rows older than ``before``
        (epoch s). The per-period totals (``usage``) are kept: only the audit detail goes,
        and with it the idempotency keys of :meth:`report` events that old."""
        deleted = self.conn.execute(
            "DELETE FROM charges WHERE id IN"
            " (SELECT id FROM charges INDEXED BY charges_at WHERE at < ? ORDER BY at LIMIT ?)",
            (_iso(before), _PRUNE_ROWS),
        ).rowcount
        if deleted:
            logger.info(
                "ledger %s: pruned %d charges rows older than %s", self.path, deleted, _iso(before)
            )

    def subscribe(self, customer: str, plan: str, at: datetime) -> None:
        self.subscribe_many([customer], plan, at)

    def subscribe_many(self, customers: Sequence[str], plan: str, at: datetime) -> None:
        """Put every customer of ``customers`` on ``plan``, in one transaction."""
        who = repr(customers[0]) if len(customers) == 1 else f"{len(customers)} customers"
        with self._write():
            self._refresh_pricing()
            if self.pricing is None:
                raise LedgerError(
                    f"cannot subscribe {who} to {plan!r}: the ledger has no pricing; "
                    "pass pricing='pricing.json' to LocalLedger once"
                )
            if plan not in self.pricing.plans:
                known = ", ".join(sorted(self.pricing.plans)) or "none"
                raise LedgerError(f"unknown plan {plan!r}; known plans: {known}")
            self.conn.executemany(
                "INSERT INTO subscriptions (customer, plan, since) VALUES (?, ?, ?)"
                " ON CONFLICT (customer) DO UPDATE SET plan = excluded.plan,"
                " since = excluded.since",
                [(customer, plan, at.isoformat()) for customer in customers],
            )
            generation = self._bump(None)
            self.conn.executemany(
                "INSERT INTO changes (customer, generation) VALUES (?, ?)"
                " ON CONFLICT (customer) DO UPDATE SET generation = excluded.generation",
                [(customer, generation) for customer in customers],
            )

    def grant(self, customer: str, feature: str, units: int) -> int:
        """Credit ``units``; the credited sum stops at ``UNLIMITED`` (never a REAL)."""
        units = _capped(units)
        with self._write():
            self.conn.execute(
                "INSERT INTO credits (customer, feature, credited) VALUES (?, ?, ?)"
                " ON CONFLICT (customer, feature) DO UPDATE SET credited = "
                + _CAPPED_ADD.format("credited"),
                (customer, feature, units, *_capped_add_args(units)),
            )
            self._bump(customer)
            return self._balance(customer, feature)

    def report(self, events: Sequence[UsageEvent]) -> None:
        with self._write():
            plans: dict[str, tuple[bool, Plan | None]] = {}
            for event in events:
                if event.customer not in plans:
                    known, plan, _ = self._plan_of(event.customer)
                    if not known:
                        raise PermanentProviderError(
                            f"unknown customer {event.customer!r}: subscribe it to a plan or "
                            "grant it credits before reporting usage",
                            code="unknown_customer",
                        )
                    plans[event.customer] = (known, plan)
                plan = plans[event.customer][1]
                start, end = period_bounds(
                    DEFAULT_INTERVAL if plan is None else plan.interval, event.at
                )
                period = period_key(start, end)
                inserted = self.conn.execute(
                    "INSERT OR IGNORE INTO charges"
                    " (customer, feature, period, units, at, idempotency_key, clobber)"
                    " VALUES (?, ?, ?, ?, ?, ?, ?)",
                    (
                        event.customer,
                        event.feature,
                        period,
                        _capped(event.units),
                        event.at.isoformat(),
                        event.idempotency_key,
                        int(event.clobber),
                    ),
                ).rowcount
                if not inserted:
                    continue
                plan_feature = None if plan is None else plan.features.get(event.feature)
                limit = 0 if plan_feature is None else plan_feature.limit
                self._add_usage(
                    event.customer,
                    event.feature,
                    period,
                    event.units,
                    limit,
                    clobber=event.clobber,
                )
            for customer in plans:
                self._bump(customer)

    # -- Idempotency-Key claims (see usage_middleware.idempotency) --------------------------

    def claim_key(
        self, customer: str, route: str, key: str, now: float, fingerprint: str = ""
    ) -> KeyClaim:
        """Claim ``key`` at wall time ``now``: ``"new"``, ``"charged"``, ``"busy"`` or
        ``"mismatch"`` (see :func:`usage_middleware._sqlite.claim_key`)."""
        with self._write():
            return _sqlite.claim_key(self.conn, customer, route, key, now, fingerprint)

    def finish_key(
        self,
        customer: str,
        route: str,
        key: str,
        charged: bool,
        now: float,
        fingerprint: str = "",
    ) -> None:
        """Keep ``key`` as charged for 24 hours from ``now``, or drop the claim."""
        with self._write():
            _sqlite.finish_key(self.conn, customer, route, key, charged, now, fingerprint)

    def usage(self, customer: str, at: datetime) -> list[FeatureUsage]:
        with self._read():
            known, plan, _ = self._plan_of(customer)
            if not known:
                raise LedgerError(
                    f"unknown customer {customer!r}: it has no subscription and no credits"
                )
            start, end = period_bounds(DEFAULT_INTERVAL if plan is None else plan.interval, at)
            period = period_key(start, end)
            credits = {
                str(feature): int(balance)
                for feature, balance in self.conn.execute(
                    "SELECT feature, credited - consumed FROM credits WHERE customer = ?",
                    (customer,),
                )
            }
            used = {
                str(feature): int(units)
                for feature, units in self.conn.execute(
                    "SELECT feature, used FROM usage WHERE customer = ? AND period = ?",
                    (customer, period),
                )
            }
        return usage_rows(plan, credits, used, start, end)
