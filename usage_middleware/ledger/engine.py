"""The lease engine: serve requests from units leased in blocks, charge in group commits.

:class:`LeaseEngine` is what :class:`~usage_middleware.ledger.LocalLedger` (SQLite) and
``RedisLedger`` share: per (customer, feature, period) a *slot* in memory holding the
units this process leased, the in-memory reserve/release fast path, commit bookkeeping,
the group-commit flush loop, the tick's upkeep (return idle units, renew leases, notice
changes), eviction and close. It talks to where the numbers live only through a
:class:`LeaseStore` (one round of I/O per call, many customers per call); a ledger
subclasses the engine, supplies its store at start-up, and adds the admin calls.

The design and its trade-offs (parked units, crash window, staleness) are in
``docs/architecture.md``, "The embedded ledger".
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import functools
import logging
import math
import time
import weakref
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any, Protocol, cast

from asgiref.typing import HTTPScope

from ..errors import ConfigurationError
from ..models import (
    UNLIMITED,
    Answer,
    Reservation,
    check_customer,
    check_feature,
    check_units,
    trusted_event,
)
from ..provider import Overage, ProviderState, clobber_refused, on_another_loop, settle_units
from .base import (
    REASON_CLOSED,
    REASON_FAILED,
    REASON_LIMIT,
    REASON_NOT_IN_PLAN,
    REASON_UNKNOWN,
    Ledger,
)
from .store import LeaseGrant, LeaseRequest, StoredCharge

__all__ = [
    "MAX_SLOTS",
    "Gives",
    "LeaseEngine",
    "LeaseStore",
    "Leased",
    "Settled",
    "Upkept",
    "lease_each",
]

logger = logging.getLogger("usage_middleware.ledger")

_EVICT_AFTER = 60.0  # seconds an empty, idle slot stays in memory
_CLOSE_ATTEMPTS = 3  # tries to write pending charges on close
_MAX_BLOCK = 64  # a hot key's lease block grows to at most this many times lease_size
_MAX_FLUSH = 1000  # charges per group-commit transaction, so a lease never waits long
_FAR_FUTURE = datetime.max.replace(tzinfo=UTC)
_UPKEEP_BATCH = 256  # idle leases returned per upkeep transaction (the loop runs between)
_SWEEP = 4096  # slots the tick looks at (round-robin), so upkeep never walks every customer
_KEEP_IDLE = 30.0  # seconds an idle lease leased far from the limit stays (for its next use)
MAX_SLOTS = 40_000  # default cap on the slots in memory (about 770 bytes each)
_MAX_LEASES = 256  # leases per lease_many transaction

#: Units given back: (customer, feature, period key, units).
Gives = Sequence[tuple[str, str, str, int]]
#: A group commit's result: (customer, feature, period) -> (used, credit balance) after it.
Settled = dict[tuple[str, str, str], tuple[int, int]]
#: An upkeep's result: the generation, the customers changed since the one seen (``None``:
#: everything, the pricing changed), and this owner's leases that expired unrenewed.
Upkept = tuple[int, set[str] | None, set[tuple[str, str, str]]]


class LeaseStore(Protocol):
    """Where a :class:`LeaseEngine`'s numbers live: leases, usage, credits, changes.

    Each call is one atomic step (a transaction, a pipeline of scripts) for many customers
    at once, and returns a future the engine adds callbacks to before awaiting it (they run
    even when the awaiting request is cancelled). A failed future means nothing was done
    (retry), except for :meth:`flush`, where see the ledger's own docstring. Calls are made
    from the event loop, one lease per (customer, feature) at a time.
    """

    def lease(
        self,
        customer: str,
        feature: str,
        at: datetime,
        need: int,
        want: int,
        gives: Sequence[tuple[str, int]],
    ) -> asyncio.Future[LeaseGrant]:
        """Return ``gives`` (period, units) of this lease; lease ``need`` units or more if
        they are free (see :meth:`LedgerStore.lease <.store.LedgerStore.lease>`)."""
        ...

    def lease_many(self, requests: Sequence[LeaseRequest]) -> asyncio.Future[Leased]:
        """:meth:`lease` for many customers in one atomic step; one grant per request, in
        order (the engine batches concurrent first touches into one call). An item may be
        the exception its request failed with, as :meth:`lease` would have failed (a
        failed future fails them all); :func:`lease_each` makes one from :meth:`lease`."""
        ...

    def flush(self, batch: Sequence[StoredCharge]) -> asyncio.Future[Settled]:
        """Apply group-committed charges (usage, credits, the lease shrunk by the
        lease-funded units); the (used, balance) of every key written."""
        ...

    def give_back(self, gives: Gives) -> asyncio.Future[None]:
        """Return idle leased units."""
        ...

    def maintain(self, gives: Gives, seen: int) -> asyncio.Future[Upkept]:
        """Return idle units, renew this owner's leases near expiry, read what changed
        since generation ``seen``."""
        ...

    async def upkeep(self) -> None:
        """The store's own periodic work, once a tick before :meth:`maintain`."""
        ...

    async def close(self) -> None:
        """Give back every lease of this owner and release the store (after the engine
        wrote everything it could)."""
        ...


#: What :meth:`LeaseStore.lease_many` gives per request: its grant, or what it failed with.
Leased = Sequence[LeaseGrant | BaseException]


def lease_each(
    lease: Callable[..., asyncio.Future[LeaseGrant]], requests: Sequence[LeaseRequest]
) -> asyncio.Future[Leased]:
    """A :meth:`LeaseStore.lease_many` for a store that leases one key per call: ``lease``
    once per request, concurrently, each request with its own outcome."""
    gathered = asyncio.gather(*(lease(*request) for request in requests), return_exceptions=True)
    return cast("asyncio.Future[Leased]", gathered)


def _utc(clock: Callable[[], datetime], owner: str) -> datetime:
    """Read an injected clock, in UTC."""
    at = clock()
    if at.utcoffset() is None:
        raise ConfigurationError(f"{owner}(now=...) must return aware datetimes, got {at!r}")
    return at.astimezone(UTC)


class _Slot:
    """This process's state for one (customer, feature, period); event-loop thread only.

    Units: ``available`` leased and free for new reservations; ``held`` reserved by
    in-flight requests; ``pending`` committed, not yet written. This process's lease row
    holds ``available + held`` plus the lease-funded part of ``pending``. ``used``,
    ``credits``, ``others`` and ``spare`` (units free for any process) are the store's numbers
    at the last transaction that read them; a refusal is repeated without I/O until
    ``denied_until`` for requests above ``available + spare``.
    ``block`` is the lease block this key asks for (units): ``lease_size``, doubled after
    requests ran dry while a refill was in flight (``starved``) or after a block lasted
    less than a tick (``leased_at``). ``low_water``: refill
    below this.
    Times (``fresh_until``, ``denied_until``, ``touched``) are ``time.monotonic()`` seconds.
    """

    __slots__ = (
        "available",
        "block",
        "credits",
        "customer",
        "denied_until",
        "dirty",
        "end",
        "end_mono",
        "feature",
        "fresh_until",
        "held",
        "known",
        "leased_at",
        "limit",
        "low_water",
        "others",
        "pending",
        "period",
        "reason",
        "refilling",
        "retired",
        "spare",
        "starved",
        "touched",
        "unflushed",
        "unflushed_at",
        "unflushed_leased",
        "unflushed_requests",
        "unlimited",
        "used",
    )

    def __init__(self, customer: str, feature: str, period: str, end: datetime) -> None:
        self.customer = customer
        self.feature = feature
        self.period = period
        self.end = end
        self.known = True
        self.limit = 0
        self.unlimited = False
        self.reason = REASON_LIMIT
        self.available = 0
        self.held = 0
        self.pending = 0
        self.used = 0
        self.credits = 0
        self.others = 0
        self.spare = 0
        self.block = 0
        self.low_water = 0
        self.refilling = False
        self.starved = False
        self.fresh_until = 0.0
        self.end_mono = math.inf  # time.monotonic() at the period's end (set when leased)
        self.leased_at = 0.0  # monotonic time of the last lease granted to this slot
        self.denied_until = 0.0
        self.touched = 0.0
        self.retired = False
        # Committed here, not yet handed to a group commit (see LeaseEngine.commit).
        self.dirty = False
        self.unflushed = 0
        self.unflushed_leased = 0
        self.unflushed_requests = 0
        self.unflushed_at = 0.0

    def remaining(self) -> int:
        """Units still usable as this process sees them (after its own holds)."""
        if self.unlimited:
            return UNLIMITED
        free = max(0, self.limit - self.used) + self.credits - self.others
        return max(0, free - self.held - self.pending)


# A group commit's share of one slot: slot, units, units from the lease, requests, at.
_Taken = tuple[_Slot, int, int, int, float]


class LeaseEngine(Ledger):
    #: Whether the store's lease calls reconcile this process's lease row with
    #: :meth:`_lease_units` (RedisLedger): then units a failed call may or may not have
    #: given back are dropped, never put back in memory, and the key's row is reconciled
    #: by a lease call at the next tick.
    _reconciles = False

    """A ledger served from leased units held in memory, charged by group commits.

    Subclasses pass their settings to ``__init__``, call :meth:`_start_engine` with their
    :class:`LeaseStore` when opening (inside the running loop), implement
    :meth:`_write_late`, and may override the hooks :meth:`_lease_failed`,
    :meth:`_flush_failed`, :meth:`_log_failure`, :meth:`_loop_gone` and
    :meth:`_engine_closed` and :meth:`_rolled_back`. Use it from one event loop.

    Args:
        lease_size: the lease block in units (>= 1); a hot key's block grows up to 64 times
            this, never beyond a quarter of the units still free.
        lease_ttl: seconds a lease lives unrenewed.
        flush_interval: seconds the flusher waits to group commits (>= 0).
        reservation_timeout: ``None``, or seconds after which an unsettled reservation is
            logged (once).
        now: the clock for usage periods (aware datetimes); default UTC now.
        max_slots: the most (customer, feature, period) slots kept in memory (>= 1);
            beyond it the least recently used idle ones are evicted, their leased units
            given back first (a slot with a request in flight or a charge not yet written
            is never evicted).

    Raises:
        ConfigurationError: a number is out of range.
    """

    def __init__(
        self,
        *,
        lease_size: int,
        lease_ttl: float,
        flush_interval: float,
        reservation_timeout: float | None,
        now: Callable[[], datetime] | None,
        max_slots: int = MAX_SLOTS,
    ) -> None:
        super().__init__()
        check_units(lease_size, what="lease_size", setting=True)
        check_units(max_slots, what="max_slots", setting=True)
        self._max_slots = max_slots
        for what, value in (("lease_ttl", lease_ttl), ("reservation_timeout", reservation_timeout)):
            if what == "reservation_timeout" and value is None:
                continue
            if (
                isinstance(value, bool)
                or not isinstance(value, int | float)
                or not 0 < value < math.inf
            ):
                raise ConfigurationError(
                    f"{what} must be a finite number of seconds > 0, got {value!r}"
                )
        if (
            isinstance(flush_interval, bool)
            or not isinstance(flush_interval, int | float)
            or not 0 <= flush_interval < math.inf
        ):
            raise ConfigurationError(
                "flush_interval must be a finite number of seconds >= 0 (it bounds the crash "
                f"window), got {flush_interval!r}"
            )
        self._lease_size = lease_size
        self._lease_ttl = float(lease_ttl)
        self._flush_interval = float(flush_interval)
        self._reservation_timeout = (
            None if reservation_timeout is None else float(reservation_timeout)
        )
        # With the real clock the hot path checks the period's end on time.monotonic()
        # (fresh_until never passes it); an injected clock may jump, so it is asked.
        self._clock_injected = now is not None
        self._clock: Callable[[], datetime] = (
            functools.partial(datetime.now, UTC)
            if now is None
            else functools.partial(_utc, now, type(self).__name__)
        )
        self._tick = min(1.0, self._lease_ttl / 4)
        self._fresh_for = self._lease_ttl / 2
        self._deny_for = min(0.25, self._tick)
        # Names the ledger in log lines (LocalLedger: its file).
        self._label = type(self).__name__
        # Set by _start_engine(), inside the running loop.
        self._loop: asyncio.AbstractEventLoop | None = None
        self._backend: LeaseStore | None = None
        self._wake: asyncio.Event | None = None
        self._tasks: set[asyncio.Task[None]] = set()
        # Event-loop state.
        self._current: dict[tuple[str, str], _Slot] = {}
        self._slots: dict[tuple[str, str, str], _Slot] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        self._leasing: dict[tuple[str, str], asyncio.Future[LeaseGrant]] = {}
        # Unsettled lease-funded holds, keyed by a weak reference to their reservation (so
        # a reservation dropped unsettled can be noticed): slot, units, monotonic time held.
        self._outstanding: dict[weakref.ref[Reservation], tuple[_Slot, int, float]] = {}
        # Weak references of reservations that died unsettled; appended from any thread
        # (the garbage collector), drained by the tick.
        self._dropped: collections.deque[weakref.ref[Reservation]] = collections.deque()
        self._on_drop = self._dropped.append
        self._warned_until = 0.0  # holds made up to this monotonic time were logged as old
        self._batch: list[_Slot] = []  # slots with unflushed charges, in commit order
        self._sweep: list[tuple[str, str, str]] = []  # slots the next ticks look at
        self._unknown: set[tuple[str, str]] = set()  # keys remembered as unknown customers
        self._inflight: set[asyncio.Future[Any]] = set()
        self._generation = 0
        # Monotonic time until which every lease row of this process is known alive (set by
        # each upkeep that renewed them): the hot path serves from a lease only before it.
        self._valid_until = 0.0
        # Leases asked for and not yet sent: one lease_many per loop iteration (or per
        # transaction in flight), like the group commit (see _lease_call).
        self._lease_queue: list[tuple[LeaseRequest, asyncio.Future[LeaseGrant]]] = []
        self._lease_sending = False
        # The cap on slots: an eviction task runs while there are more (see _evict).
        self._features: set[str] = set()  # every feature a slot was made for (a few)
        self._evicting = False
        # Units of evicted slots whose give-back failed (rolled back): retried each tick.
        self._orphans: list[tuple[str, str, str, int]] = []
        # Keys whose lease row may keep units this process dropped (a store call that
        # failed and may have run): a reconciling lease call is made at the next tick.
        self._unsynced: set[tuple[str, str]] = set()

    # -- lifecycle -----------------------------------------------------------------------

    def _start_engine(self, backend: LeaseStore, generation: int) -> None:
        """Serve from ``backend`` (opened; ``generation`` as it read it): start the flusher
        and the tick. Call it on the running loop, before :meth:`Provider.open`."""
        self._loop, self._backend = asyncio.get_running_loop(), backend
        self._generation = generation
        self._valid_until = time.monotonic() + self._fresh_for
        self._wake = asyncio.Event()
        self._spawn(self._flush_loop())
        self._spawn(self._tick_loop())

    async def aclose(self) -> None:
        """Write every pending charge, give back unused leases, close the store. Idempotent.

        A reservation committed after this is written by :meth:`_write_late`.
        """
        was_open = self._state is ProviderState.OPEN
        await super().aclose()
        if not was_open:
            return
        tasks = [task for task in self._tasks if not on_another_loop(task)]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        loop = asyncio.get_running_loop()
        if self._loop is not loop:
            # Opened on a loop that is gone (no lifespan closed it): its futures will never
            # call back. Writes it had in flight ran on the worker thread regardless.
            self._loop = loop
            self._inflight.clear()
            self._leasing.clear()
            self._locks.clear()
            self._loop_gone()
        for attempt in range(1, _CLOSE_ATTEMPTS + 1):
            try:
                await self._flush_all()
                break
            except Exception:
                logger.exception(
                    "ledger %s: writing charges on close failed (%d)", self._label, attempt
                )
                await asyncio.sleep(0.1 * attempt)
        if self._batch:
            logger.error(
                "ledger %s: the charges of %d customer features could not be written on close",
                self._label,
                len(self._batch),
            )
        try:
            await self._ready_backend().close()  # after every queued write
        finally:
            self._engine_closed()
            self._current.clear()
            self._slots.clear()
            # Loop-bound state goes with the loop that made it (a reopen may use another).
            self._locks.clear()
            self._leasing.clear()
            self._tasks.clear()
            self._drop_lease_queue()
            self._orphans.clear()  # close gave back every lease of this owner
            self._loop = self._wake = self._backend = None

    async def flush(self) -> None:
        """Write every charge committed so far to the store now (the group commit, early).

        For tests and admin code that read the file right after a request. Call it on the
        ledger's event loop. Does nothing unless the ledger is open.
        """
        if self._state is ProviderState.OPEN:
            await self._flush_all()

    # -- the hot path --------------------------------------------------------------------

    async def reserve(
        self,
        customer: str,
        feature: str,
        units: int = 1,
        *,
        scope: HTTPScope | None = None,
        clobber: bool = False,
    ) -> Reservation:
        """Check and hold ``units`` of ``feature`` for one request of ``customer``.

        Served from this process's lease without I/O when it can; otherwise leases (one
        store call: a SQLite transaction, a Redis script). The answer's numbers are this
        process's view: ``limit`` the plan's (``UNLIMITED``; 0 outside the plan); ``used``
        the units charged this period as of this process's last store call plus the charges
        it committed since; ``remaining`` what is left after this reservation and this
        process's other holds, less what other processes held at the last store call.

        A failed store call gives ``ok=False`` with ``err`` set and ``retry_after`` (a
        ledger may answer per its failure policy instead, see ``RedisLedger``).

        Raises:
            ValueError: malformed customer id or units.
            ConfigurationError: malformed feature name.
        """
        if clobber:
            raise clobber_refused(self)
        slot = self._current.get((customer, feature))
        if slot is not None and type(units) is int and units > 0:
            t = time.monotonic()
            if (
                t < slot.fresh_until
                and t < self._valid_until
                and (not self._clock_injected or self._clock() < slot.end)
            ):
                if slot.unlimited or slot.available >= units:
                    return self._hold(slot, units, t)
                if t < slot.denied_until and units > slot.available + slot.spare:
                    return self._refuse(slot, units)
        return await self._reserve_slow(customer, feature, units, hold=True)

    async def can(self, customer: str, feature: str, units: int = 1) -> Answer:
        """Whether ``customer`` may use ``units`` of ``feature`` now. Holds nothing.

        Numbers and errors as :meth:`reserve`.
        """
        slot = self._current.get((customer, feature))
        if slot is not None and type(units) is int and units > 0:
            t = time.monotonic()
            if t < slot.fresh_until and t < self._valid_until and self._clock() < slot.end:
                if slot.unlimited or slot.available >= units:
                    return self._answer(slot, True, units)
                if t < slot.denied_until and units > slot.available + slot.spare:
                    return self._answer(slot, False, units)
        return (await self._reserve_slow(customer, feature, units, hold=False)).answer

    async def prepare(
        self, reservation: Reservation, *, units: int | None = None, overage: Overage = "cap"
    ) -> None:
        """Nothing: the charge is written by the group commit after :meth:`commit`."""

    async def commit(
        self, reservation: Reservation, *, units: int | None = None, overage: Overage = "cap"
    ) -> int:
        """Charge a reservation its actual ``units``: queued in memory, written by the next
        group commit. Returns the units charged.

        ``units`` (``None``: the units reserved) below the hold gives the rest back to this
        process's lease. Above it, the excess is taken from the lease's free units, then
        leased from the store (one transaction, atomic with every other process's leases:
        only units free under the limit plus credits); what even that cannot cover is
        charged anyway under ``overage="charge"`` (written as usage beyond the limit, which
        consumes credits and shows as overage) and dropped under ``"cap"``.

        Settling a reservation a second time, or a refused one, does nothing (0). The hold
        is there however long the request ran (holds do not expire in a live process). A
        reservation whose hold this ledger does not know (made by another instance) is
        still charged, and logged.

        Raises:
            ValueError: ``units`` is not an int from 0 to ``MAX_UNITS``.
        """
        if reservation.settled:
            return 0
        reserved = reservation.units
        if units is None or (type(units) is int and units == reserved):
            # the hot path: exactly the units held
            reservation.settled = True
            if not reservation.ok:
                return 0
            slot, from_lease = reservation.token
            if from_lease:
                if self._outstanding.pop(weakref.ref(reservation), None) is None:
                    logger.warning(
                        "ledger %s: charging %s %s x%d whose hold was already given back",
                        self._label,
                        slot.customer,
                        slot.feature,
                        reserved,
                    )
                    from_lease = False
                else:
                    slot.held -= reserved
            slot.pending += reserved
            if self._wake is not None and self._state is ProviderState.OPEN:
                slot.unflushed += reserved
                slot.unflushed_requests += 1
                slot.unflushed_at = time.time()
                if from_lease:
                    slot.unflushed_leased += reserved
                if not slot.dirty:
                    slot.dirty = True
                    self._batch.append(slot)
                self._wake.set()
            else:
                limit = UNLIMITED if slot.unlimited else slot.limit
                await self._write_late(
                    (slot.customer, slot.feature, slot.period, limit, reserved, 0, 1, time.time())
                )
            return reserved
        actual = settle_units(reservation, units)
        reservation.settled = True
        if not reservation.ok:
            return 0
        slot, from_lease = reservation.token
        if from_lease:
            if self._outstanding.pop(weakref.ref(reservation), None) is None:
                logger.warning(
                    "ledger %s: charging %s %s x%d whose hold was already given back",
                    self._label,
                    slot.customer,
                    slot.feature,
                    actual,
                )
                from_lease = False
                if overage == "cap":
                    actual = min(actual, reserved)
            elif actual <= reserved:
                slot.held -= reserved
        if from_lease and actual > reserved:
            extra = actual - reserved
            # The hold, and the units taken for the excess, stay in ``held`` until charged
            # (a store reconciling the lease row counts them: see _lease_units).
            got = [0]
            try:
                await self._take_more(slot, extra, got)
            finally:  # also when cancelled: what was taken is charged
                slot.held -= reserved + got[0]
                if got[0] < extra and overage == "cap":
                    actual = reserved + got[0]
                self._charge(slot, actual, reserved + got[0])
        elif from_lease:
            slot.available += reserved - actual
            self._charge(slot, actual, actual)
        else:
            self._charge(slot, actual, 0)
        if self._wake is None or self._state is not ProviderState.OPEN:
            if actual:
                limit = UNLIMITED if slot.unlimited else slot.limit
                await self._write_late(
                    (slot.customer, slot.feature, slot.period, limit, actual, 0, 1, time.time())
                )
        return actual

    def _charge(self, slot: _Slot, units: int, leased: int) -> None:
        """Queue ``units`` (``leased`` of them from this process's lease) for the group
        commit; nothing when closed (:meth:`commit` writes it late)."""
        if not units:
            return
        slot.pending += units
        if self._wake is not None and self._state is ProviderState.OPEN:
            slot.unflushed += units
            slot.unflushed_requests += 1
            slot.unflushed_at = time.time()
            slot.unflushed_leased += leased
            if not slot.dirty:
                slot.dirty = True
                self._batch.append(slot)
            self._wake.set()

    async def _take_more(self, slot: _Slot, need: int, taken: list[int]) -> int:
        """Take up to ``need`` more units for a commit beyond its hold: from the lease's
        free units, then by leasing (``need``, or what is still free under the limit plus
        credits). Returns the units taken off the lease (``<= need``), also counted in
        ``taken[0]`` as they are taken (and moved to ``slot.held``)."""
        got = min(need, slot.available)
        slot.available -= got
        slot.held += got
        taken[0] = got
        if got == need:
            return got
        key = (slot.customer, slot.feature)
        if self._state is not ProviderState.OPEN or self._backend is None:
            return got
        lock = self._lock_of(key)
        try:
            async with lock:
                for attempt in range(2):
                    await self._settle_lease(key)
                    more = min(need - got, slot.available)
                    slot.available -= more
                    slot.held += more
                    got += more
                    taken[0] = got
                    now = self._clock()
                    if (
                        got == need
                        or self._closing()
                        or self._current.get(key) is not slot
                        or now >= slot.end
                    ):
                        return got
                    ask = need - got
                    if attempt:  # the whole excess was not free: lease what still is
                        ask = min(ask, slot.spare)
                        if ask <= 0:
                            return got
                    try:
                        await self._lease(key, slot, ask, now, time.monotonic(), give_back=False)
                    except Exception:
                        logger.exception(
                            "ledger %s: leasing the excess of %s %s failed", self._label, *key
                        )
                        return got
                    if self._current.get(key) is not slot:
                        return got
                    more = min(need - got, slot.available)
                    slot.available -= more
                    slot.held += more
                    got += more
                    taken[0] = got
                    if got == need:
                        return got
                return got
        finally:
            self._drop_lock(key, lock)

    async def release(self, reservation: Reservation) -> None:
        """Give a reservation's units back to this process's lease (no I/O). Once only."""
        if reservation.settled:
            return
        reservation.settled = True
        if not reservation.ok:
            return
        slot, from_lease = reservation.token
        if from_lease and self._outstanding.pop(weakref.ref(reservation), None) is not None:
            slot.held -= reservation.units
            slot.available += reservation.units

    # -- internals: serving ----------------------------------------------------------------

    def _hold(self, slot: _Slot, units: int, t: float) -> Reservation:
        from_lease = not slot.unlimited
        if from_lease:
            slot.available -= units
            slot.held += units
            if slot.available < slot.low_water and not slot.refilling:
                slot.refilling = True
                self._spawn(self._refill(slot))
        slot.touched = t
        reservation = Reservation.lazy(
            slot.customer, slot.feature, units, True, self._held_answer, (slot, from_lease)
        )
        if from_lease:
            # Held until settled, however long the request runs; the weak reference's
            # callback notices a reservation dropped unsettled (see _release_dropped).
            self._outstanding[weakref.ref(reservation, self._on_drop)] = (slot, units, t)
        return reservation

    def _held_answer(self, reservation: Reservation) -> Answer:
        """The answer of an allowed reservation, made when first read (numbers as of then)."""
        slot: _Slot = reservation.token[0]
        return self._answer(slot, True, reservation.units)

    def _answer(self, slot: _Slot, ok: bool, units: int) -> Answer:
        if not slot.known:
            return Answer(
                False,
                slot.customer,
                slot.feature,
                units,
                0,
                0,
                0,
                reason=REASON_UNKNOWN,
                provider=self,
            )
        return Answer(
            ok,
            slot.customer,
            slot.feature,
            units,
            UNLIMITED if slot.unlimited else slot.limit,
            slot.used + slot.pending,
            slot.remaining(),
            reason=None if ok else slot.reason,
            provider=self,
        )

    def _refuse(self, slot: _Slot, units: int) -> Reservation:
        return Reservation(
            self._answer(slot, False, units), trusted_event(slot.customer, slot.feature, units)
        )

    async def _reserve_slow(
        self, customer: str, feature: str, units: int, *, hold: bool
    ) -> Reservation:
        check_customer(customer)
        check_feature(feature)
        check_units(units)
        if self._state is ProviderState.NEW:
            await self.open()
        if self._state is ProviderState.CLOSED:
            return self._closed(customer, feature, units)
        key = (customer, feature)
        slot = self._current.get(key)
        if slot is not None and slot.refilling:
            slot.starved = True  # ran dry before the refill came back: lease more next time
        lock = self._lock_of(key)
        try:
            async with lock:
                for _ in range(3):
                    await self._settle_lease(key)
                    if self._closing():  # closed while we waited
                        return self._closed(customer, feature, units)
                    now = self._clock()
                    t = time.monotonic()
                    slot = self._current.get(key)
                    if (
                        slot is not None
                        and t < slot.fresh_until
                        and t < self._valid_until
                        and now < slot.end
                    ):
                        if slot.unlimited or slot.available >= units:
                            return self._serve(slot, units, now, t, hold=hold)
                        if t < slot.denied_until and units > slot.available + slot.spare:
                            return self._refuse(slot, units)
                    try:
                        grant = await self._lease(key, slot, units, now, t, give_back=True)
                    except Exception as exc:
                        self._log_failure(exc, "leasing %s %s failed", *key)
                        return self._lease_failed(customer, feature, units, exc)
                    if self._closing():
                        return self._closed(customer, feature, units)
                    slot = self._current[key]
                    if slot.unlimited or slot.available >= units:
                        return self._serve(slot, units, now, t, hold=hold)
                    if not grant.take:
                        slot.denied_until = t + self._deny_for
                        return self._refuse(slot, units)
                    # Other tasks used the block this transaction brought before we woke up.
                return self._refuse(self._current[key], units)
        finally:
            self._drop_lock(key, lock)

    def _serve(
        self, slot: _Slot, units: int, now: datetime, t: float, *, hold: bool
    ) -> Reservation:
        if hold:
            return self._hold(slot, units, t)
        return Reservation(
            self._answer(slot, True, units), trusted_event(slot.customer, slot.feature, units)
        )

    def _lock_of(self, key: tuple[str, str]) -> asyncio.Lock:
        """The lock that serialises a key's lease calls (made on first use)."""
        lock = self._locks.get(key)
        if lock is None:
            lock = self._locks[key] = asyncio.Lock()
        return lock

    def _drop_lock(self, key: tuple[str, str], lock: asyncio.Lock) -> None:
        """Forget a key's lock once nobody holds or awaits it (memory per customer)."""
        if not lock.locked() and not getattr(lock, "_waiters", None):
            if self._locks.get(key) is lock:
                del self._locks[key]

    def _closing(self) -> bool:
        """Whether aclose() has begun (a method, so checks after an await are not narrowed)."""
        return self._state is ProviderState.CLOSED

    def _closed(self, customer: str, feature: str, units: int) -> Reservation:
        error = ConfigurationError(f"{type(self).__name__} is closed")
        return self._failed(customer, feature, units, error, REASON_CLOSED)

    def _failed(
        self, customer: str, feature: str, units: int, error: Exception, reason: str
    ) -> Reservation:
        answer = Answer(
            False,
            customer,
            feature,
            units,
            err=error,
            reason=reason,
            retry_after=1.0,
            provider=self,
        )
        return Reservation(answer, trusted_event(customer, feature, units))

    async def _settle_lease(self, key: tuple[str, str]) -> None:
        """Wait for a lease transaction whose requester was cancelled (its result applies)."""
        running = self._leasing.get(key)
        if running is not None:
            with contextlib.suppress(Exception):
                await asyncio.shield(running)
            # Done, but its result (_leased, a callback) may still be queued: let it run.
            for _ in range(3):
                if self._leasing.get(key) is not running:
                    break
                await asyncio.sleep(0)

    async def _lease(
        self,
        key: tuple[str, str],
        slot: _Slot | None,
        need: int,
        now: datetime,
        t: float,
        *,
        give_back: bool,
        want: int | None = None,
    ) -> LeaseGrant:
        """One lease transaction for ``key``; caller holds the key's lock.

        With ``give_back`` the slot's free units are returned in the same transaction (so
        the grant re-checks everything: limit, credits, period, other processes).
        """
        gives: list[tuple[str, int]] = []
        if give_back and slot is not None and slot.available:
            gives.append((slot.period, slot.available))
            slot.available = 0
        self._ready_backend()  # (fails here when not open)
        if want is None:
            want = self._lease_size if slot is None else max(slot.block, self._lease_size)
        future = self._lease_call((key[0], key[1], now, need, want, gives))
        future.add_done_callback(functools.partial(self._leased, key, t, slot, gives))
        self._leasing[key] = future
        return await asyncio.shield(future)

    def _leased(
        self,
        key: tuple[str, str],
        t: float,
        giver: _Slot | None,
        gives: list[tuple[str, int]],
        future: asyncio.Future[LeaseGrant],
    ) -> None:
        """Apply a lease transaction's result (runs even if the requester was cancelled)."""
        if self._leasing.get(key) is future:
            del self._leasing[key]
        if self._state is ProviderState.CLOSED:
            return  # close() gives every lease back
        if future.cancelled() or future.exception() is not None:
            if self._rolled_back(future):
                if giver is not None:  # the units are still ours
                    giver.available += sum(units for _, units in gives)
            elif self._reconciles:  # it may have run: reconcile the row at the next tick
                self._unsynced.add(key)
            return
        if self._reconciles:
            self._unsynced.discard(key)
        grant = future.result()
        customer, feature = key
        old = self._current.get(key)
        self._features.add(feature)
        if not grant.known or grant.end is None:
            slot = _Slot(customer, feature, "", _FAR_FUTURE)
            slot.known = False
            slot.reason = REASON_UNKNOWN
            self._unknown.add(key)
            slot.fresh_until = slot.denied_until = t + self._deny_for
        else:
            found = self._slots.get((customer, feature, grant.period))
            if found is None:
                slot = _Slot(customer, feature, grant.period, grant.end)
                self._slots[customer, feature, grant.period] = slot
                self._over_cap()
            else:
                slot = found
            slot.retired = False
            slot.limit = grant.limit
            slot.unlimited = grant.limit >= UNLIMITED
            slot.reason = REASON_LIMIT if grant.in_plan else REASON_NOT_IN_PLAN
            slot.used = grant.used
            slot.credits = grant.credits
            slot.others = grant.others
            slot.spare = grant.spare
            slot.available += grant.take
            slot.block = max(slot.block, self._lease_size)
            # A key that ran dry before its refill came back, or that needs a new block
            # within a tick, is hot: double its block so leases stay rare (each one is a
            # transaction). Near the limit the grant itself stays small (free // 4).
            if slot.starved or (slot.leased_at and t - slot.leased_at < self._tick):
                slot.block = min(2 * slot.block, _MAX_BLOCK * self._lease_size)
                slot.starved = False
            slot.leased_at = t
            slot.low_water = slot.block // 2 if grant.roomy else 0
            slot.end_mono = time.monotonic() + (slot.end - self._clock()).total_seconds()
            # Valid until the period ends or a change re-validates it, as long as the tick
            # keeps renewing this process's rows (see LeaseEngine._valid_until).
            slot.fresh_until = slot.end_mono
            slot.denied_until = 0.0
            slot.touched = max(slot.touched, t)
        if old is not None and old is not slot:
            old.retired = True
        self._current[key] = slot

    async def _refill(self, slot: _Slot) -> None:
        """Top up a roomy lease in the background before requests run out of it."""
        key = (slot.customer, slot.feature)
        try:
            lock = self._lock_of(key)
            try:
                async with lock:
                    await self._settle_lease(key)
                    now = self._clock()
                    t = time.monotonic()
                    if (
                        self.state is ProviderState.OPEN
                        and self._current.get(key) is slot
                        and slot.available < slot.low_water
                        and t < slot.fresh_until
                        and t < self._valid_until
                        and now < slot.end
                    ):
                        await self._lease(key, slot, 1, now, t, give_back=False)
            finally:
                self._drop_lock(key, lock)
        except Exception as exc:
            self._log_failure(exc, "refilling the lease of %s %s failed", *key)
        finally:
            slot.refilling = False

    # -- internals: writing ----------------------------------------------------------------

    async def _flush_loop(self) -> None:
        assert self._wake is not None
        backoff = 0.05
        while True:
            await self._wake.wait()
            if self._flush_interval:
                await asyncio.sleep(self._flush_interval)
            self._wake.clear()
            try:
                # One transaction per wake-up: charges that arrive while it runs wait for
                # the next cycle (after flush_interval), so batches grow with the load
                # instead of the flusher chasing each new charge with a tiny transaction.
                await self._flush_once()
                while len(self._batch) >= _MAX_FLUSH:
                    await self._flush_once()
                if self._batch:
                    self._wake.set()
                backoff = 0.05
            except Exception as exc:
                self._log_failure(exc, "writing charges failed; will retry")
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 2.0)
                self._wake.set()

    async def _flush_once(self) -> None:
        """Write the charges of up to ``_MAX_FLUSH`` slots in one transaction."""
        slots = self._batch[:_MAX_FLUSH]
        if not slots:
            return
        del self._batch[:_MAX_FLUSH]
        taken: list[_Taken] = []
        stored: list[StoredCharge] = []
        for slot in slots:
            share = (
                slot,
                slot.unflushed,
                slot.unflushed_leased,
                slot.unflushed_requests,
                slot.unflushed_at,
            )
            slot.dirty = False
            slot.unflushed = slot.unflushed_leased = slot.unflushed_requests = 0
            slot.unflushed_at = 0.0  # (a float object less per idle slot)
            taken.append(share)
            stored.append(
                (
                    slot.customer,
                    slot.feature,
                    slot.period,
                    UNLIMITED if slot.unlimited else slot.limit,
                    share[1],
                    share[2],
                    share[3],
                    share[4],
                )
            )
        future = self._ready_backend().flush(stored)
        future.add_done_callback(functools.partial(self._flushed, taken))
        self._inflight.add(future)
        future.add_done_callback(self._inflight.discard)
        await asyncio.shield(future)

    async def _flush_all(self) -> None:
        """Write every charge committed so far (after any write already running)."""
        if self._inflight:
            await asyncio.gather(*self._inflight, return_exceptions=True)
        while self._batch:
            await self._flush_once()

    def _flushed(self, taken: list[_Taken], future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            error = None if future.cancelled() else future.exception()
            if self._flush_failed(taken, error):
                self._retake(taken)
            return
        result: dict[tuple[str, str, str], tuple[int, int]] = future.result()
        for slot, units, _, _, _ in taken:
            slot.pending -= units
            numbers = result.get((slot.customer, slot.feature, slot.period))
            if numbers is not None:
                slot.used, balance = numbers
                slot.credits = max(0, balance)

    def _retake(self, taken: list[_Taken]) -> None:
        """Put a failed group commit's shares back for the next attempt (nothing written)."""
        for slot, units, leased, requests, at in taken:
            slot.unflushed += units
            slot.unflushed_leased += leased
            slot.unflushed_requests += requests
            slot.unflushed_at = max(slot.unflushed_at, at)
            if not slot.dirty:
                slot.dirty = True
                self._batch.append(slot)

    async def _write_late(self, charge: StoredCharge) -> None:
        """Write a charge committed after close (with no backend to batch it)."""
        raise NotImplementedError

    # -- internals: upkeep -----------------------------------------------------------------

    async def _tick_loop(self) -> None:
        while True:
            await asyncio.sleep(self._tick)
            try:
                await self._ready_backend().upkeep()
                await self._maintain()
            except Exception as exc:
                self._log_failure(exc, "lease upkeep failed")

    async def _maintain(self) -> None:
        """Once a tick: free dropped holds, return idle units, renew, poll for changes.

        Bounded work per tick: it looks at up to ``_SWEEP`` slots (round-robin over all of
        them), and returns idle leases ``_UPKEEP_BATCH`` per transaction, yielding to the
        event loop between transactions.
        """
        t = time.monotonic()
        self._release_dropped()
        self._log_old_reservations(t)
        try:
            await self._give_back_orphans()
        except Exception:  # (kept for the next tick; renewing comes first)
            logger.exception("ledger %s: giving back evicted leases failed", self._label)
        idle_slots: list[_Slot] = []
        if not self._sweep:
            self._sweep = list(self._slots)
        batch, self._sweep = self._sweep[-_SWEEP:], self._sweep[:-_SWEEP]
        for pk in batch:
            slot = self._slots.get(pk)
            if slot is None:
                continue
            idle = t - slot.touched
            # An idle lease leased far from the limit (low_water set) stays _KEEP_IDLE
            # seconds for its customer's next request; near the limit it goes back at once.
            keep = _KEEP_IDLE if slot.low_water else self._tick
            if slot.available and (slot.retired or idle >= keep):
                # Taken out of memory right before its store call (below), not now: a
                # store that reconciles must see them until then.
                idle_slots.append(slot)
                continue
            if not (slot.available or slot.held or slot.pending) and (
                slot.retired or idle >= _EVICT_AFTER
            ):
                del self._slots[pk]
                if self._current.get(pk[:2]) is slot:
                    del self._current[pk[:2]]
                lock = self._locks.get(pk[:2])
                if lock is not None and not lock.locked() and pk[:2] not in self._current:
                    del self._locks[pk[:2]]
        for key in list(self._unknown):
            slot = self._current.get(key)
            if slot is None or slot.known:
                self._unknown.discard(key)
            elif t >= slot.denied_until:
                del self._current[key]
                self._unknown.discard(key)
        self._resync()
        if not (self._slots or self._current or idle_slots):
            return
        backend = self._ready_backend()
        while len(idle_slots) > _UPKEEP_BATCH:
            chunk, idle_slots = idle_slots[:_UPKEEP_BATCH], idle_slots[_UPKEEP_BATCH:]
            chunk_gives, chunk_givers = self._take_idle(chunk)
            given = backend.give_back(chunk_gives)
            given.add_done_callback(functools.partial(self._given_back, chunk_givers))
            await asyncio.shield(given)
            await asyncio.sleep(0)
        gives, givers = self._take_idle(idle_slots)
        future = backend.maintain(gives, self._generation)
        future.add_done_callback(functools.partial(self._maintained, t, givers))
        await asyncio.shield(future)

    @staticmethod
    def _take_idle(
        slots: list[_Slot],
    ) -> tuple[list[tuple[str, str, str, int]], list[tuple[_Slot, int]]]:
        """Take idle slots' free units out of memory, to give back now."""
        gives: list[tuple[str, str, str, int]] = []
        givers: list[tuple[_Slot, int]] = []
        for slot in slots:
            if slot.available:
                gives.append((slot.customer, slot.feature, slot.period, slot.available))
                givers.append((slot, slot.available))
                slot.available = 0
        return gives, givers

    def _lease_units(self, customer: str, feature: str, period: str) -> int:
        """The units this process holds of its lease row of (customer, feature, period):
        free, held by requests, charged and not yet handed to a group commit."""
        slot = self._slots.get((customer, feature, period))
        if slot is None:
            return 0
        return slot.available + slot.held + slot.unflushed_leased

    def _resync(self) -> None:
        """Start a reconciling lease call (no units asked) for keys whose row may keep
        units this process dropped, unless one of theirs is running anyway."""
        if not self._unsynced or self.state is not ProviderState.OPEN:
            return
        for key in list(self._unsynced)[:_UPKEEP_BATCH]:
            if key not in self._locks and key not in self._leasing:
                self._spawn(self._reconcile(key))

    async def _reconcile(self, key: tuple[str, str]) -> None:
        lock = self._lock_of(key)
        try:
            async with lock:
                await self._settle_lease(key)
                if key not in self._unsynced or self.state is not ProviderState.OPEN:
                    return
                slot = self._current.get(key)
                await self._lease(
                    key, slot, 0, self._clock(), time.monotonic(), give_back=False, want=0
                )
        except Exception as exc:
            self._log_failure(exc, "reconciling the lease of %s %s failed", *key)
        finally:
            self._drop_lock(key, lock)

    def _given_back(self, givers: list[tuple[_Slot, int]], future: asyncio.Future[Any]) -> None:
        if future.cancelled() or future.exception() is not None:
            self._give_failed(givers, future)

    def _give_failed(self, givers: list[tuple[_Slot, int]], future: asyncio.Future[Any]) -> None:
        """A give-back failed: rolled back, the units are still ours; else (a store that
        reconciles) they are dropped and the key's row reconciled at the next tick."""
        if self._reconciles:
            self._unsynced.update((slot.customer, slot.feature) for slot, _ in givers)
        elif self._rolled_back(future):
            for slot, units in givers:
                slot.available += units

    def _maintained(
        self, t: float, givers: list[tuple[_Slot, int]], future: asyncio.Future[Any]
    ) -> None:
        if future.cancelled() or future.exception() is not None:
            self._give_failed(givers, future)
            return
        generation, changed, lost = future.result()
        self._generation = generation
        # Every row of this process was renewed (or is younger than lease_ttl / 2).
        self._valid_until = t + self._fresh_for
        # No per-tick walk over every customer: only changed customers' slots are touched.
        if changed is None or changed:
            for slot in self._slots_of(changed):
                if slot.known:
                    slot.fresh_until = 0.0  # re-validate on next use
                    slot.denied_until = 0.0
        for key in lost:
            current = self._current.get(key[:2])
            if current is not None and current.period == key[2]:
                current.fresh_until = 0.0
                current.denied_until = 0.0
        for key in lost:
            held = self._slots.get(key)
            if held is not None and held.held:
                logger.warning(
                    "ledger %s: the lease under %d held units of %s %s expired before this "
                    "process renewed it (its event loop stalled longer than lease_ttl); their "
                    "requests are still charged when they end, possibly beyond the limit",
                    self._label,
                    held.held,
                    held.customer,
                    held.feature,
                )

    def _release_dropped(self) -> None:
        """Give back the holds of reservations garbage-collected before being settled."""
        released = 0
        while self._dropped:
            entry = self._outstanding.pop(self._dropped.popleft(), None)
            if entry is not None:
                slot, units, _ = entry
                slot.held -= units
                slot.available += units
                released += 1
        if released:
            logger.warning(
                "ledger %s: gave back the holds of %d reservations dropped unsettled "
                "(commit or release every reservation)",
                self._label,
                released,
            )

    def _log_old_reservations(self, t: float) -> None:
        """Log (once each) the holds unsettled for longer than ``reservation_timeout``."""
        if self._reservation_timeout is None:
            return
        cutoff = t - self._reservation_timeout
        old = []
        for slot, units, since in self._outstanding.values():
            if since > cutoff:
                break  # roughly in the order they were made: the rest are younger
            if since > self._warned_until:
                old.append((slot.customer, slot.feature, units))
        self._warned_until = max(self._warned_until, cutoff)
        if old:
            logger.warning(
                "ledger %s: %d reservations unsettled after %ss (first: %s %s x%d); "
                "their units stay held until they are settled",
                self._label,
                len(old),
                self._reservation_timeout,
                *old[0],
            )

    def _changed(self, customers: set[str]) -> None:
        """After an admin write here: re-validate these customers' slots on next use."""
        for slot in self._slots_of(customers):
            slot.fresh_until = 0.0
            slot.denied_until = 0.0

    def _slots_of(self, customers: set[str] | None) -> list[_Slot]:
        """The current slots of ``customers`` (``None``: all): looked up per customer and
        feature seen, so a few changed customers cost no walk over every slot."""
        current = self._current
        if customers is None or len(customers) * len(self._features) >= len(current):
            return [s for s in current.values() if customers is None or s.customer in customers]
        found = []
        for customer in customers:
            for feature in self._features:
                slot = current.get((customer, feature))
                if slot is not None:
                    found.append(slot)
        return found

    # -- internals: batched leases -------------------------------------------------------

    def _lease_call(self, request: LeaseRequest) -> asyncio.Future[LeaseGrant]:
        """Queue one lease for the next ``lease_many``; its grant's future.

        Like the group commit: the leases asked for in one loop iteration, or while a
        ``lease_many`` is in flight, go together in the next one (up to ``_MAX_LEASES``), so
        many customers' first touches cost one transaction, and a lone lease waits no more
        than a loop iteration.
        """
        assert self._loop is not None
        future: asyncio.Future[LeaseGrant] = self._loop.create_future()
        self._lease_queue.append((request, future))
        if not self._lease_sending:
            self._lease_sending = True
            self._loop.call_soon(self._send_leases)
        return future

    def _send_leases(self) -> None:
        queue = self._lease_queue[:_MAX_LEASES]
        del self._lease_queue[:_MAX_LEASES]
        if not queue:
            self._lease_sending = False
            return
        try:
            sent = self._ready_backend().lease_many([request for request, _ in queue])
        except Exception as exc:  # (a store raising instead of failing its future)
            failed: asyncio.Future[Leased] = asyncio.get_running_loop().create_future()
            failed.set_exception(exc)
            sent = failed
        sent.add_done_callback(functools.partial(self._leases_sent, queue))

    def _leases_sent(
        self,
        queue: list[tuple[LeaseRequest, asyncio.Future[LeaseGrant]]],
        sent: asyncio.Future[Leased],
    ) -> None:
        """Hand each request its grant (or the batch's failure), then send what queued."""
        error: BaseException | None = None
        if sent.cancelled():
            error = asyncio.CancelledError()
        else:
            error = sent.exception()
        if error is None:
            for (_, future), grant in zip(queue, sent.result(), strict=True):
                if future.done():
                    continue
                if isinstance(grant, BaseException):
                    future.set_exception(grant)
                else:
                    future.set_result(grant)
        else:
            for _, future in queue:
                if not future.done():
                    future.set_exception(error)
        if self._lease_queue and self._loop is not None:
            self._loop.call_soon(self._send_leases)
        else:
            self._lease_sending = False

    def _drop_lease_queue(self) -> None:
        """On close: fail the leases not sent (their requests answer "closed")."""
        queue, self._lease_queue = self._lease_queue, []
        self._lease_sending = False
        for _, future in queue:
            if not future.done():
                future.set_exception(ConfigurationError(f"{type(self).__name__} is closed"))

    # -- internals: the cap on slots -------------------------------------------------------

    def _over_cap(self) -> None:
        """After a slot was added: start evicting if there are more than ``max_slots``."""
        if len(self._slots) > self._max_slots and not self._evicting and self._loop is not None:
            self._evicting = True
            self._spawn(self._evict())

    async def _evict(self) -> None:
        """Evict least recently used idle slots until ``max_slots`` hold, giving back their
        leased units (``_UPKEEP_BATCH`` per transaction, yielding between transactions)."""
        try:
            while len(self._slots) > self._max_slots and self.state is ProviderState.OPEN:
                # Some headroom, so the next new customers do not each start an eviction.
                excess = len(self._slots) - self._max_slots + self._max_slots // 64
                evicted, gives = self._pick_victims(min(excess, _UPKEEP_BATCH))
                if gives:
                    given = self._ready_backend().give_back(gives)
                    given.add_done_callback(functools.partial(self._orphaned, gives))
                    with contextlib.suppress(Exception):
                        await asyncio.shield(given)
                if evicted:
                    await asyncio.sleep(0)
                elif self._batch or self._inflight:
                    # The slots looked at have charges not yet written: write them now (the
                    # group commit, early), so they can go.
                    try:
                        await self._flush_all()
                    except Exception:
                        await asyncio.sleep(self._tick)  # the flusher logs and retries
                else:
                    await asyncio.sleep(0.01)  # every slot looked at has a request in flight
        finally:
            self._evicting = False

    def _pick_victims(self, count: int) -> tuple[int, list[tuple[str, str, str, int]]]:
        """Take up to ``count`` idle slots out of memory, least recently used first (among
        the oldest ``4 * count`` slots); return how many, and their leased units to give
        back.

        A slot is idle when no request holds units of it, no charge of it is unwritten and
        no lease of its key is being taken. Slots looked at and kept move to the back, so
        the next pass looks at others (a clock over the slots, no walk over all of them).
        """
        looked: list[tuple[tuple[str, str, str], _Slot]] = []
        for item in self._slots.items():
            looked.append(item)
            if len(looked) >= 4 * count:
                break
        idle = [
            (slot.touched, pk)
            for pk, slot in looked
            if not (slot.held or slot.pending or slot.dirty or slot.refilling)
            and pk[:2] not in self._locks
            and pk[:2] not in self._leasing
        ]
        idle.sort()
        victims = {pk for _, pk in idle[:count]}
        gives: list[tuple[str, str, str, int]] = []
        for pk, slot in looked:
            del self._slots[pk]
            if pk not in victims:
                self._slots[pk] = slot  # to the back
                continue
            slot.retired = True
            if self._current.get(pk[:2]) is slot:
                del self._current[pk[:2]]
            if slot.available:
                gives.append((slot.customer, slot.feature, slot.period, slot.available))
                slot.available = 0
        return len(victims), gives

    def _orphaned(self, gives: Gives, future: asyncio.Future[Any]) -> None:
        """A give-back of evicted slots' units failed: retry it at the next tick (when
        failures roll back; else the units stay parked in the store until they expire)."""
        if future.cancelled() or future.exception() is not None:
            if self._reconciles:  # (a retry could give them back twice)
                self._unsynced.update((customer, feature) for customer, feature, _, _ in gives)
            else:
                self._orphans.extend(gives)

    async def _give_back_orphans(self) -> None:
        """Give back the units of evicted slots whose first give-back failed."""
        while self._orphans:
            gives = self._orphans[:_UPKEEP_BATCH]
            del self._orphans[:_UPKEEP_BATCH]
            given = self._ready_backend().give_back(gives)
            given.add_done_callback(functools.partial(self._orphaned, gives))
            await asyncio.shield(given)

    # -- hooks -----------------------------------------------------------------------------

    def _lease_failed(
        self, customer: str, feature: str, units: int, error: Exception
    ) -> Reservation:
        """The answer when a lease could not be taken (the store failed): refused."""
        return self._failed(customer, feature, units, error, REASON_FAILED)

    def _flush_failed(self, taken: list[_Taken], error: BaseException | None) -> bool:
        """A group commit failed (``error``; ``None``: cancelled): whether the engine
        retries its charges (True), or the subclass took them over (False)."""
        return True

    def _rolled_back(self, future: asyncio.Future[Any]) -> bool:
        """Whether a failed store call did nothing (a rolled-back transaction), so units it
        was giving back are still this process's. A store whose failure may be a lost reply
        (the call ran) answers False unless sure: such units are then dropped from memory,
        never counted twice (the store may keep them leased to this process: parked, never
        overspent, until a store that reconciles (``_reconciles``) does so)."""
        return True

    def _log_failure(self, exc: Exception, message: str, *args: object) -> None:
        """Log a failed store call (with its traceback); the engine retries or answers."""
        logger.error("ledger %s: " + message, self._label, *args, exc_info=exc)

    def _loop_gone(self) -> None:
        """Closing on another loop than the one opened on: forget loop-bound work."""

    def _engine_closed(self) -> None:
        """After close (in a ``finally``): release what the subclass started."""

    # -- internals: plumbing ---------------------------------------------------------------

    def _ready_backend(self) -> LeaseStore:
        if self._backend is None:
            raise ConfigurationError(f"{type(self).__name__} is not open")
        return self._backend

    def _spawn(self, coroutine: Any) -> None:
        assert self._loop is not None
        task = self._loop.create_task(coroutine)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
