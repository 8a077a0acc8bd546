"""The embedded ledger: plans, credits and usage in one SQLite file, with a hot path in memory.

:class:`LocalLedger` keeps everything in one SQLite file (tables in :mod:`.store`), which
the worker processes of one machine may share: together they never charge more than a
customer's ``limit + credits``. Requests are served from units leased in blocks and held in
memory, and charges are written in groups every ``flush_interval``, so the event loop never
waits for another process's lock. What that trades, stated plainly: a charge not yet
written is lost if the process is killed (at most ``flush_interval`` of them;
:meth:`LocalLedger.aclose` writes everything), units leased by one process are unavailable
to the others for up to two ticks (1 s each) near the limit, or 30 s after their last use
when leased far from it, and another process's admin writes arrive at the next tick. A
hold lives as long as its request. The design (leases, group commit, where SQLite runs,
many customers) is in ``docs/architecture.md``, "The embedded ledger".
"""

from __future__ import annotations

import asyncio
import os
import uuid
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timedelta
from typing import Any, TypeVar

from .._sqlite import InlineRunner
from ..errors import ConfigurationError
from ..idempotency import KeyClaim
from ..models import UsageEvent, check_customer, check_feature, check_units
from ..pricing import Pricing, load_pricing
from ..provider import ProviderState
from .base import FeatureUsage
from .engine import MAX_SLOTS, Gives, Leased, LeaseEngine, Settled, Upkept
from .store import LeaseGrant, LeaseRequest, LedgerStore, StoredCharge

__all__ = ["LocalLedger"]

T = TypeVar("T")


class _SQLiteLeases:
    """:class:`LedgerStore`'s transactions as the engine's :class:`~.engine.LeaseStore`.

    Short transactions (lease, group commit, upkeep) run inline on the event loop when the
    file is not locked, else on the ledger's worker thread (see
    :class:`~usage_middleware._sqlite.InlineRunner`); the checkpoint and close always run
    on the thread.
    """

    __slots__ = ("_runner", "_store")

    def __init__(self, store: LedgerStore, runner: InlineRunner) -> None:
        self._store = store
        self._runner = runner

    def lease(
        self,
        customer: str,
        feature: str,
        at: datetime,
        need: int,
        want: int,
        gives: Sequence[tuple[str, int]],
    ) -> asyncio.Future[LeaseGrant]:
        return self._runner.run(self._store.lease, customer, feature, at, need, want, gives)

    def lease_many(self, requests: Sequence[LeaseRequest]) -> asyncio.Future[Leased]:
        if len(requests) == 1:  # (one lease: LedgerStore.lease, which tests count)
            return self._runner.run(self._lease_one, requests[0])
        return self._runner.run(self._lease_all, requests)

    def _lease_one(self, request: LeaseRequest) -> Leased:
        return [self._store.lease(*request)]

    def _lease_all(self, requests: Sequence[LeaseRequest]) -> Leased:
        return self._store.lease_many(requests)

    def flush(self, batch: Sequence[StoredCharge]) -> asyncio.Future[Settled]:
        return self._runner.run(self._store.flush, batch)

    def give_back(self, gives: Gives) -> asyncio.Future[None]:
        return self._runner.run(self._store.give_back, gives)

    def maintain(self, gives: Gives, seen: int) -> asyncio.Future[Upkept]:
        return self._runner.run(self._store.maintain, gives, seen)

    async def upkeep(self) -> None:
        """Copy the WAL into the database on the worker thread (its own connection)."""
        await self._runner.background(self._store.checkpoint)

    async def close(self) -> None:
        await self._runner.submit(self._store.close)  # after every queued transaction


#: How long ``charges`` rows are kept by default (see ``LocalLedger(charges_retention=)``).
CHARGES_RETENTION = timedelta(days=400)
_MIN_RETENTION = timedelta(days=2)


class LocalLedger(LeaseEngine):
    """The embedded ledger: one SQLite file, shared safely by the processes of one machine.

    See ``docs/architecture.md`` for the design and its trade-offs (crash window, parked
    units, staleness). Use it from one event loop; it opens lazily on first use if :meth:`open`
    was not called.

    Args:
        path: the SQLite file (created if missing), default ``usage.db``.
        pricing: a Tier pricing.json (path, decoded JSON or :class:`Pricing`). Validated
            here and stored in the file by :meth:`open`, replacing what was stored, so a
            later ``LocalLedger(path)`` without ``pricing`` (the CLI, another worker) uses it.
            :meth:`open` refuses (``ConfigurationError``) a pricing that drops a plan
            customers are still on.
        lease_size: the lease block in units (>= 1); a hot key's block grows up to 64 times
            this, never beyond a quarter of the units still free.
        lease_ttl: seconds a lease lives unrenewed; a killed process's units come back
            after this.
        flush_interval: seconds the flusher waits to group commits into one transaction;
            bounds the crash window for committed charges.
        reservation_timeout: ``None`` (default), or seconds after which a reservation still
            unsettled is logged (WARNING, once): a request that never ends, or a caller
            that never settles. Its hold is kept either way: a hold lives until its
            reservation is settled or garbage-collected (``docs/architecture.md``, "Holds
            live as long as their request").
        now: the clock for usage periods, returning an aware datetime; default UTC now.
        max_slots: the most (customer, feature, period) slots kept in memory, default
            40,000 (about 770 bytes each); beyond it the least recently used idle slots are
            evicted, their leased units given back first (``docs/architecture.md``, "Many
            customers").
        charges_retention: how long the ``charges`` table's audit rows (one per customer,
            feature, period and hour, and one per :meth:`report` event) are kept, default
            400 days (13 months: a year of invoices plus a month); ``None`` keeps them
            forever. The per-period totals that limits are checked against are kept either
            way. At least 2 days.

    Raises:
        ConfigurationError: a numeric argument is out of range.
        PricingError: ``pricing`` does not validate.
    """

    name = "local"

    def __init__(
        self,
        path: str | os.PathLike[str] = "usage.db",
        *,
        pricing: str | os.PathLike[str] | Mapping[str, Any] | Pricing | None = None,
        lease_size: int = 64,
        lease_ttl: float = 30.0,
        flush_interval: float = 0.005,
        reservation_timeout: float | None = None,
        now: Callable[[], datetime] | None = None,
        max_slots: int = MAX_SLOTS,
        charges_retention: timedelta | None = CHARGES_RETENTION,
    ) -> None:
        super().__init__(
            lease_size=lease_size,
            lease_ttl=lease_ttl,
            flush_interval=flush_interval,
            reservation_timeout=reservation_timeout,
            now=now,
            max_slots=max_slots,
        )
        self.path = os.fspath(path)
        if charges_retention is not None and (
            not isinstance(charges_retention, timedelta) or charges_retention < _MIN_RETENTION
        ):
            raise ConfigurationError(
                f"LocalLedger(charges_retention={charges_retention!r}): give a timedelta of "
                "at least 2 days (report()'s idempotency keys live in those rows), or None to "
                "keep every charges row"
            )
        self._charges_retention = (
            None if charges_retention is None else charges_retention.total_seconds()
        )
        self._label = self.path
        if pricing is not None and not isinstance(pricing, Pricing):
            pricing = load_pricing(pricing)
        self._pricing = pricing
        # Short transactions inline on the loop, the rest on one worker thread.
        self._sqlite = InlineRunner("usage-middleware-ledger", lambda: self._store)
        self._store: LedgerStore | None = None

    @property
    def pricing(self) -> Pricing | None:
        """The pricing model in use: the one stored in the file once open, else the one given.

        ``None`` when neither exists (then :meth:`subscribe` refuses). A pricing replaced by
        another process is picked up here at this ledger's next transaction.
        """
        if self._store is not None:
            return self._store.pricing
        return self._pricing

    # -- lifecycle -----------------------------------------------------------------------

    async def open(self) -> None:
        """Open the file (WAL), store the pricing if given, start the flusher and renewer.

        Idempotent while open; opens again after :meth:`aclose`. Raises
        ``ConfigurationError`` when the pricing given drops a plan that customers in the
        file are still on (the message names the plans and counts), and ``sqlite3.Error``
        when the file cannot be opened.
        """
        await self._open_once(self._start)

    async def _start(self) -> None:
        owner = f"{os.getpid()}-{uuid.uuid4().hex[:12]}"
        store = LedgerStore(
            self.path,
            owner,
            lease_ttl=self._lease_ttl,
            charges_retention=self._charges_retention,
        )
        self._sqlite.start()
        pricing_json = None if self._pricing is None else self._pricing.to_json()
        try:
            generation = await self._sqlite.background(store.open, pricing_json)
        except BaseException:
            self._sqlite.shutdown()
            raise
        self._store = store
        self._start_engine(_SQLiteLeases(store, self._sqlite), generation)
        await super().open()

    async def aclose(self) -> None:
        """Write every pending charge, give back unused leases, close the file. Idempotent.

        A reservation committed after this is written on a short-lived connection.
        """
        await super().aclose()

    def _loop_gone(self) -> None:
        # Writes the gone loop had in flight ran on the worker thread regardless.
        self._sqlite.forget_thread()

    def _engine_closed(self) -> None:
        self._sqlite.shutdown()
        self._store = None

    async def _write_late(self, charge: StoredCharge) -> None:
        """Write a charge committed after close, on a short-lived connection (a thread)."""
        await asyncio.to_thread(self._write_late_sync, charge)

    def _write_late_sync(self, charge: StoredCharge) -> None:
        store = LedgerStore(self.path, f"{os.getpid()}-late", lease_ttl=1.0)
        store.open(None)
        try:
            store.flush([charge])
        finally:
            store.close()

    # -- admin ---------------------------------------------------------------------------

    async def report(self, events: Sequence[UsageEvent]) -> None:
        """Record usage events; they are written when this returns.

        An event whose ``idempotency_key`` was recorded before is ignored; ``clobber`` sets
        the period's ``used`` to ``units``. This bypasses leases and may go beyond the limit
        (the overage consumes credits).

        Raises:
            PermanentProviderError: an event's customer is unknown (nothing is recorded).
        """
        if not events:
            return
        store = await self._opened()
        await self._submit(store.report, list(events))
        self._changed({event.customer for event in events})

    async def subscribe(self, customer: str, plan: str) -> None:
        """Put ``customer`` on ``plan``, replacing any earlier plan.

        Raises:
            LedgerError: the plan is not in the pricing (the message lists the known plans),
                or no pricing was ever given.
            ValueError: malformed customer id.
        """
        check_customer(customer)
        store = await self._opened()
        await self._submit(store.subscribe, customer, plan, self._clock())
        self._changed({customer})

    async def subscribe_many(self, customers: Sequence[str], plan: str) -> None:
        """Put every customer of ``customers`` on ``plan`` in one transaction (bulk imports).

        The same as :meth:`subscribe` for each, all or nothing.

        Raises:
            LedgerError: as :meth:`subscribe`.
            ValueError: a malformed customer id (nothing is written).
        """
        customers = list(customers)
        for customer in customers:
            check_customer(customer)
        store = await self._opened()
        await self._submit(store.subscribe_many, customers, plan, self._clock())
        self._changed(set(customers))

    async def grant(self, customer: str, feature: str, units: int) -> int:
        """Credit ``units`` (> 0) of ``feature`` to ``customer``; return the new balance.

        Raises:
            ValueError: units is not a whole number > 0, or a malformed customer id.
            ConfigurationError: malformed feature name.
        """
        check_customer(customer)
        check_feature(feature)
        check_units(units)
        store = await self._opened()
        balance = await self._submit(store.grant, customer, feature, units)
        self._changed({customer})
        return balance

    async def usage(self, customer: str) -> list[FeatureUsage]:
        """The customer's standing per feature, sorted, after writing pending charges.

        Raises:
            LedgerError: the customer is unknown (no subscription and no credits).
        """
        check_customer(customer)
        store = await self._opened()
        await self._flush_all()
        return await self._submit(store.usage, customer, self._clock())

    async def claim_key(
        self, customer: str, route: str, key: str, *, fingerprint: str = ""
    ) -> KeyClaim:
        """Claim an ``Idempotency-Key`` in the ledger file (shared by its processes), on
        the ledger's clock (``now=``; the testing kit's ``ledger_clock`` moves it)."""
        store = await self._opened()
        now = self._clock().timestamp()
        return await self._run(store.claim_key, customer, route, key, now, fingerprint)

    async def finish_key(
        self, customer: str, route: str, key: str, *, charged: bool, fingerprint: str = ""
    ) -> None:
        """Keep the key 24 hours when ``charged``, else drop the claim (ledger file)."""
        store = await self._opened()
        now = self._clock().timestamp()
        await self._run(store.finish_key, customer, route, key, charged, now, fingerprint)

    # -- internals -------------------------------------------------------------------------

    async def _opened(self) -> LedgerStore:
        if self._state is ProviderState.NEW:
            await self.open()
        if self._state is ProviderState.CLOSED:
            raise ConfigurationError(f"{type(self).__name__} is closed; create a new one")
        return self._ready_store()

    def _ready_store(self) -> LedgerStore:
        if self._store is None:
            raise ConfigurationError(f"{type(self).__name__} is not open")
        return self._store

    def _submit(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run a store call on the ledger's worker thread; callbacks run in submission order."""
        return self._sqlite.submit(fn, *args)

    def _run(self, fn: Callable[..., T], *args: Any) -> asyncio.Future[T]:
        """Run a short store transaction (group commit, lease, upkeep), inline when it can
        (see :class:`~usage_middleware._sqlite.InlineRunner`)."""
        return self._sqlite.run(fn, *args)
