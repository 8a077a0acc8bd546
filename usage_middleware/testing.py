"""A pytest kit for apps metered with usage_middleware: a ledger on a temporary file, a
clock the test moves, and assertions on what the test charged.

The fixtures come from the ``pytest_usage_middleware`` plugin, which pytest loads through
the ``pytest11`` entry point of this distribution (no import in the test; loading it imports
nothing but pytest, this module is imported when a test asks for a fixture):

* ``usage_ledger``: a :class:`LedgerKit` on a fresh file under ``tmp_path``, configured by
  ``@pytest.mark.usage_ledger(pricing=..., customers={"org:a": "plan:free@1"},
  credits={"org:a": {"feature:x": 5}}, **LocalLedger options)``.
* ``make_usage_ledger(pricing=None, *, customers=None, credits=None, **options)``: makes
  such kits (each on its own file); all are closed after the test.
* ``ledger_clock``: the :class:`LedgerClock` the test's ledgers read their usage periods
  from; it stands still until the test moves it (``advance(hours=1)``, ``next_period()``).

Hand ``kit.ledger`` (a :class:`~usage_middleware.LocalLedger`) to ``UsageMiddleware``, send
requests, then ``kit.assert_charged("org:a", "feature:x", 3)``.

Event loops. The ledger lives on the event loop that opened it: the app's lifespan loop under
Starlette's ``TestClient`` (a thread of its own), the test's loop under
``httpx.ASGITransport``. Committed charges reach the file within ``flush_interval``; every
assertion first writes them (:meth:`~usage_middleware.LocalLedger.flush`) on the ledger's
loop, then reads the file on a fresh read-only connection. So:

* a sync test (``TestClient``) calls ``assert_charged``/``assert_not_charged``/``charged``;
  after ``with TestClient(app)`` has exited, the ledger is closed and they read the file;
* an async test (pytest-asyncio or anyio) awaits ``assert_charged_async``/
  ``assert_not_charged_async``/``charged_async``: they work whichever loop the ledger is on.
  The sync forms raise :class:`RuntimeError` there when charges are still unwritten on the
  test's own loop (they cannot wait for it without blocking it), never a wrong answer.

"Charged" is what the ledger recorded for the customer and feature over every period since
the kit was made (units; credits-funded units included), as ``usage-middleware show`` counts
``used``. A ledger whose loop ended while it was still open (``TestClient(app)`` used without
``with``, so each request runs on a loop of its own) cannot be flushed: the assertions raise
``RuntimeError`` naming the fix instead.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import os
from collections.abc import Callable, Coroutine, Iterator, Mapping
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, TypeVar

from .ledger.local import LocalLedger
from .ledger.store import LedgerStore
from .pricing import INTERVALS, Pricing, load_pricing, period_bounds
from .provider import ProviderState

__all__ = ["LedgerClock", "LedgerKit", "kit_factory"]

T = TypeVar("T")

#: Seconds a sync assertion waits for the ledger's loop (in another thread) to write.
FLUSH_TIMEOUT = 10.0

_DEAD_LOOP = (
    "the event loop that opened the ledger has ended with the ledger still open, so charges "
    "it had not written are lost: run the app's lifespan (`with TestClient(app) as client:`; "
    "without `with`, TestClient runs each request on a new event loop)"
)
_ORDER = {interval: i for i, interval in enumerate(("@daily", "@weekly", "@monthly", "@yearly"))}


class LedgerClock:
    """A clock for ``LocalLedger(now=...)`` that stands still until the test moves it.

    Args:
        start: the first reading, an aware datetime; default the real time now.

    Calling it returns the current reading (aware, UTC). Thread-safe enough for a test:
    the test thread moves it, the app's loop reads it.
    """

    def __init__(self, start: datetime | None = None) -> None:
        self._now = _aware(datetime.now(UTC) if start is None else start)

    def __call__(self) -> datetime:
        return self._now

    @property
    def now(self) -> datetime:
        """The current reading."""
        return self._now

    def set(self, moment: datetime) -> datetime:
        """Move to ``moment`` (aware; backwards too); return it."""
        self._now = _aware(moment)
        return self._now

    def advance(self, delta: timedelta | float = 0.0, /, **units: float) -> datetime:
        """Move forward by ``delta`` (a timedelta or seconds) plus ``timedelta(**units)``.

        ``clock.advance(hours=2)``, ``clock.advance(90)``. Returns the new reading.

        Raises:
            ValueError: the total is negative (use :meth:`set` to go back).
        """
        step = delta if isinstance(delta, timedelta) else timedelta(seconds=delta)
        step += timedelta(**units)
        if step < timedelta(0):
            raise ValueError(f"advance() moves forward only, got {step}; use set() to go back")
        self._now += step
        return self._now

    def next_period(self, interval: str = "@monthly") -> datetime:
        """Move to the first instant of the next ``interval`` period (UTC calendar); return it.

        Raises:
            ValueError: ``interval`` is not one of ``@daily``, ``@weekly``, ``@monthly``,
                ``@yearly``.
        """
        if interval not in INTERVALS:
            raise ValueError(f"interval must be one of {', '.join(INTERVALS)}, got {interval!r}")
        _, end = period_bounds(interval, self._now)
        self._now = end
        return end


def _aware(moment: datetime) -> datetime:
    if not isinstance(moment, datetime) or moment.utcoffset() is None:
        raise ValueError(f"the clock needs an aware datetime, got {moment!r}")
    return moment.astimezone(UTC)


class LedgerKit:
    """A :class:`~usage_middleware.LocalLedger` on a test's file, and what it charged.

    Args:
        path: the ledger file (created when needed).
        pricing: a Tier pricing.json (path, decoded JSON or ``Pricing``), or ``None``.
        clock: the ledger's clock (``now=``); default a new :class:`LedgerClock`.
        customers: customer id -> plan, subscribed before the ledger opens.
        credits: customer id -> {feature: units}, granted before the ledger opens.
        **options: more ``LocalLedger`` keyword arguments (``lease_size``, ...).

    Attributes:
        ledger: the ``LocalLedger`` to give ``UsageMiddleware(provider=...)``.
        path: the file. clock: the clock.

    Raises:
        PricingError: ``pricing`` does not validate.
        LedgerError: a plan in ``customers`` is unknown (or there is no pricing).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        pricing: str | os.PathLike[str] | Mapping[str, Any] | Pricing | None = None,
        *,
        clock: LedgerClock | None = None,
        customers: Mapping[str, str] | None = None,
        credits: Mapping[str, Mapping[str, int]] | None = None,
        **options: Any,
    ) -> None:
        self.path = Path(path)
        self.clock = LedgerClock() if clock is None else clock
        if pricing is not None and not isinstance(pricing, Pricing):
            pricing = load_pricing(pricing)
        self._pricing = pricing
        self.ledger = LocalLedger(self.path, pricing=pricing, now=self.clock, **options)
        if customers:
            self.subscribe(customers)
        for customer, features in (credits or {}).items():
            for feature, units in features.items():
                self.grant(customer, feature, units)

    # -- set-up ------------------------------------------------------------------------------

    def subscribe(self, customers: Mapping[str, str]) -> None:
        """Put each customer on its plan (``{"org:a": "plan:free@1"}``), at the clock's time.

        Before the ledger opens (or after it closed) this writes the file directly; while it
        is open on another thread's loop, it runs ``ledger.subscribe`` there. From a
        coroutine on the ledger's own loop, ``await kit.ledger.subscribe(...)`` instead.
        """
        for customer, plan in customers.items():
            self._subscribe(customer, plan)

    def _subscribe(self, customer: str, plan: str) -> None:
        self._admin(
            lambda: self.ledger.subscribe(customer, plan),
            lambda store: store.subscribe(customer, plan, self.clock()),
        )

    def grant(self, customer: str, feature: str, units: int) -> int:
        """Credit ``units`` of ``feature`` to ``customer``; return the balance (as subscribe)."""
        return self._admin(
            lambda: self.ledger.grant(customer, feature, units),
            lambda store: store.grant(customer, feature, units),
        )

    def next_period(self) -> datetime:
        """Move the clock to the next period of the longest interval the plans use."""
        intervals = [p.interval for p in self._pricing.plans.values()] if self._pricing else []
        return self.clock.next_period(max(intervals, key=_ORDER.__getitem__, default="@monthly"))

    # -- what was charged ------------------------------------------------------------------

    def flush(self) -> None:
        """Write the ledger's committed charges to the file now (see the module docstring).

        Raises:
            RuntimeError: called on the ledger's own running loop with charges unwritten
                (use the ``*_async`` forms), or the ledger's loop ended while it was open.
        """
        self._on_loop(self.ledger.flush, admin=False)

    async def flush_async(self) -> None:
        """Write the ledger's committed charges to the file now, from any event loop."""
        await self._on_loop_async(self.ledger.flush)

    def charges(self, customer: str) -> dict[str, int]:
        """Units charged to ``customer`` per feature, over every period (after a flush)."""
        self.flush()
        return self._read(customer)

    async def charges_async(self, customer: str) -> dict[str, int]:
        """As :meth:`charges`, from a coroutine."""
        await self.flush_async()
        return self._read(customer)

    def charged(self, customer: str, feature: str | None = None) -> int:
        """Units of ``feature`` (every feature when ``None``) charged to ``customer``."""
        return _total(self.charges(customer), feature)

    async def charged_async(self, customer: str, feature: str | None = None) -> int:
        """As :meth:`charged`, from a coroutine."""
        return _total(await self.charges_async(customer), feature)

    def assert_charged(self, customer: str, feature: str, units: int) -> None:
        """Assert exactly ``units`` of ``feature`` were charged to ``customer`` in this test."""
        _check_charged(self.charges(customer), customer, feature, units)

    async def assert_charged_async(self, customer: str, feature: str, units: int) -> None:
        """As :meth:`assert_charged`, from a coroutine."""
        _check_charged(await self.charges_async(customer), customer, feature, units)

    def assert_not_charged(self, customer: str, feature: str | None = None) -> None:
        """Assert nothing of ``feature`` (of any feature when ``None``) was charged."""
        _check_charged(self.charges(customer), customer, feature, 0)

    async def assert_not_charged_async(self, customer: str, feature: str | None = None) -> None:
        """As :meth:`assert_not_charged`, from a coroutine."""
        _check_charged(await self.charges_async(customer), customer, feature, 0)

    # -- teardown --------------------------------------------------------------------------

    def close(self) -> None:
        """Close the ledger if a test left it open and its loop can still run it."""
        ledger = self.ledger
        loop = ledger._loop
        if ledger.state is not ProviderState.OPEN or loop is None or loop.is_closed():
            return
        if loop.is_running():
            if _running_loop() is not loop:
                asyncio.run_coroutine_threadsafe(ledger.aclose(), loop).result(FLUSH_TIMEOUT)
            return
        if _running_loop() is None:
            loop.run_until_complete(ledger.aclose())

    # -- internals -------------------------------------------------------------------------

    def _admin(
        self,
        online: Callable[[], Coroutine[Any, Any, T]],
        offline: Callable[[LedgerStore], T],
    ) -> T:
        if self.ledger.state is ProviderState.OPEN:
            return self._on_loop(online, admin=True)
        store = LedgerStore(str(self.path), f"test-{os.getpid()}", lease_ttl=1.0)
        store.open(None if self._pricing is None else self._pricing.to_json())
        try:
            return offline(store)
        finally:
            store.close()

    def _on_loop(self, make: Callable[[], Coroutine[Any, Any, T]], *, admin: bool) -> T:
        """Run ``make()`` on the ledger's loop and wait for it (sync callers).

        Returns ``None`` (typed ``T`` for the callers that ignore it) when there is nothing
        to run it on: the ledger is not open.
        """
        ledger = self.ledger
        loop = ledger._loop
        if ledger.state is not ProviderState.OPEN or loop is None:
            return None  # type: ignore[return-value]
        if loop.is_closed():
            raise RuntimeError(_DEAD_LOOP)
        running = _running_loop()
        if running is loop:
            if admin:
                raise RuntimeError(
                    "the ledger is open on this test's event loop: await kit.ledger.subscribe"
                    "(...)/grant(...) there instead"
                )
            if ledger._batch or ledger._inflight:
                raise RuntimeError(
                    "charges are still being written on this test's event loop: in an async "
                    "test, await kit.assert_charged_async(...)/assert_not_charged_async(...)/"
                    "charged_async(...) (or await kit.flush_async() first)"
                )
            return None  # type: ignore[return-value]
        if loop.is_running():
            return asyncio.run_coroutine_threadsafe(make(), loop).result(FLUSH_TIMEOUT)
        if running is not None:
            raise RuntimeError(
                "the ledger's event loop is not running and another loop runs here: use the "
                "*_async forms from the ledger's loop"
            )
        return loop.run_until_complete(make())

    async def _on_loop_async(self, make: Callable[[], Coroutine[Any, Any, T]]) -> T | None:
        ledger = self.ledger
        loop = ledger._loop
        if ledger.state is not ProviderState.OPEN or loop is None:
            return None
        if loop.is_closed():
            raise RuntimeError(_DEAD_LOOP)
        if loop is asyncio.get_running_loop():
            return await make()
        if loop.is_running():
            future = asyncio.run_coroutine_threadsafe(make(), loop)
            return await asyncio.wait_for(asyncio.wrap_future(future), FLUSH_TIMEOUT)
        raise RuntimeError(
            "the ledger's event loop is not running (it was opened on another test's loop?)"
        )

    def _read(self, customer: str) -> dict[str, int]:
        """Units per feature from the file, on a fresh read-only connection."""
        if not self.path.exists():
            return {}
        store = LedgerStore(str(self.path), f"test-{os.getpid()}", lease_ttl=1.0)
        store.open_read_only()
        try:
            rows = store.conn.execute(
                "SELECT feature, SUM(used) FROM usage WHERE customer = ? GROUP BY feature",
                (customer,),
            ).fetchall()
        finally:
            store.close()
        return {str(feature): int(units) for feature, units in rows if units}


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _total(charges: Mapping[str, int], feature: str | None) -> int:
    return sum(charges.values()) if feature is None else charges.get(feature, 0)


def _check_charged(
    charges: Mapping[str, int], customer: str, feature: str | None, units: int
) -> None:
    got = _total(charges, feature)
    if got != units:
        what = "any feature" if feature is None else feature
        raise AssertionError(
            f"{customer} was charged {got} units of {what}, expected {units} "
            f"(charges by feature: {dict(sorted(charges.items())) or 'none'})"
        )


@contextlib.contextmanager
def kit_factory(directory: Path, clock: LedgerClock) -> Iterator[Callable[..., LedgerKit]]:
    """``make(pricing=None, *, customers=None, credits=None, **options)`` -> a new kit on a
    new file in ``directory`` reading ``clock``; every kit made is closed at exit.
    (The ``make_usage_ledger`` fixture.)"""
    kits: list[LedgerKit] = []
    counter = itertools.count(1)

    def make(
        pricing: str | os.PathLike[str] | Mapping[str, Any] | Pricing | None = None,
        **kwargs: Any,
    ) -> LedgerKit:
        kit = LedgerKit(directory / f"usage-{next(counter)}.db", pricing, clock=clock, **kwargs)
        kits.append(kit)
        return kit

    try:
        yield make
    finally:
        for kit in kits:
            kit.close()
