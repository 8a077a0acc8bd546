"""RemoteProvider: the base class of providers that ask a billing API (Tier, Spaire, ARES).

A subclass implements two hooks: :meth:`RemoteProvider.fetch` (ONE remote entitlement
check, returning an :class:`~.entitlement.Entitlement`) and :meth:`RemoteProvider.send`
(ONE delivery of usage events, returning which of them the provider counted as new). The
base turns them into a fast and safe ``can``/``reserve``/``commit``/``report``: an
entitlement cache with single-flight (``cache_ttl``, ``deny_ttl``, ``feature_ttl``),
local accounting so a cached answer never lets one process overspend, a failure policy
(``"open"``: serve and still charge; ``"closed"``: 503) with a circuit breaker, and
delivery through the durable outbox (``outbox=None``: the same Reporter over an outbox
in memory, tests only). How and why:
docs/architecture.md, "Remote providers".
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Collection, Hashable, Mapping, Sequence
from typing import cast

import httpx
from asgiref.typing import HTTPScope

from ... import telemetry
from ...delivery import Reporter
from ...delivery.aggregate import default_aggregate_key, merge_events
from ...errors import (
    ConfigurationError,
    PermanentProviderError,
    ProviderError,
    RetryableProviderError,
)
from ...idempotency import KeyClaim
from ...models import (
    UNLIMITED,
    Answer,
    Reservation,
    UsageEvent,
    check_customer,
    check_feature,
    check_units,
)
from ...provider import (
    FailurePolicy,
    Overage,
    Provider,
    ProviderState,
    ReporterLike,
    clobber_refused,
    on_another_loop,
    settle_units,
)
from .._http import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_RETRY_AFTER,
    check_max_body,
    check_max_retry_after,
)
from .accounting import Account, Accounts, Charge, Entry, Hold, available
from .breaker import CircuitBreaker
from .cache import Key, SingleFlight, new_cache
from .entitlement import Entitlement

__all__ = ["RemoteProvider", "ReporterLike"]

logger = logging.getLogger("usage_middleware.providers.remote")

_POLICIES = ("open", "closed")


class RemoteProvider(Provider):
    """Base class of providers that ask a remote billing API (design: docs/architecture.md).

    Subclasses implement :meth:`fetch` and :meth:`send`, set :attr:`name`,
    :attr:`max_batch` and :attr:`balance_lag` (or :attr:`fetch_subtracts_delivered`), and
    may override :meth:`account_key`, :meth:`charge_of` (how a delivered event is
    counted locally), :meth:`make_client` (base URL, auth, headers) and
    :meth:`make_reporter`. :meth:`report` is the base's: it calls :meth:`send`, then
    records what the provider counted.

    Args:
        client: an ``httpx.AsyncClient`` to use (not closed by :meth:`aclose`); by default
            :meth:`make_client` creates one in :meth:`open` and :meth:`aclose` closes it.
        outbox: path of the durable SQLite outbox, or ``None`` for in-memory delivery
            (tests and development only: charges can be lost).
        cache_ttl: seconds an entitlement is reused (>= 0; 0 = always ask).
        deny_ttl: seconds a denial is reused (>= 0; capped by the feature's TTL).
        feature_ttl: per-feature ``cache_ttl`` (``{"feature:x": 0}`` = always ask).
        cache_size: most (customer, feature) entitlements cached (>= 1).
        failure_policy: ``"open"`` or ``"closed"`` when a check fails.
        feature_policy: per-feature failure policy.
        timeout: seconds every provider call may take (> 0).
        breaker_failures: consecutive failed checks that open the circuit breaker (>= 1).
        breaker_cooldown: seconds the breaker stays open before one probe (>= 0).
        drain_timeout: seconds :meth:`aclose` spends delivering what is queued (the
            outbox's Reporter, or the in-memory queue with outbox=None); what is left stays
            in the outbox for the next start.
        max_retry_age: seconds a retryable delivery failure may keep a charge queued
            (default 3 days); then it is dead-lettered (outbox) or dropped (outbox=None),
            with the last error, and logged.
        max_retry_after: most seconds a ``Retry-After`` from the provider is honoured
            (default 300): a longer one (or an HTTP date further away) counts as this,
            for delivery pauses, the outbox's not-before and the 503's ``Retry-After``.
        max_body: most bytes of one answer read (default 1 MiB); a longer answer is
            abandoned and the call fails (the failure policy applies).
        clock: monotonic seconds; tests inject a fake one.

    Raises:
        ConfigurationError: a bad argument (negative TTL, unknown policy, bad feature name).
    """

    #: Seconds after a delivery completed until the provider's numbers include it: ``0``
    #: (Tier, ARES) = a read that starts after the delivery completed counts it.
    balance_lag: float = 0.0
    #: Whether :meth:`fetch` itself subtracts the delivered charges the provider's numbers
    #: do not show yet (Spaire, from the meter row's ``modified_at``): then the base counts
    #: only charges still queued and those delivered after ``fetch()`` returned.
    fetch_subtracts_delivered: bool = False
    #: Seconds a charge whose delivery this process did not see is assumed to take to arrive.
    delivery_allowance: float = 600.0
    #: Seconds between two log lines about failed checks (the rest are counted).
    failure_log_interval: float = 60.0

    def __init__(
        self,
        *,
        client: httpx.AsyncClient | None = None,
        outbox: str | os.PathLike[str] | None = "usage-outbox.db",
        cache_ttl: float = 5.0,
        deny_ttl: float = 1.0,
        feature_ttl: Mapping[str, float] | None = None,
        cache_size: int = 10_000,
        failure_policy: FailurePolicy = "open",
        feature_policy: Mapping[str, FailurePolicy] | None = None,
        timeout: float = 2.0,
        breaker_failures: int = 5,
        breaker_cooldown: float = 10.0,
        drain_timeout: float = 5.0,
        max_retry_age: float = 3 * 86400.0,
        max_retry_after: float = DEFAULT_MAX_RETRY_AFTER,
        max_body: int = DEFAULT_MAX_BODY,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        super().__init__()
        #: Most seconds this provider's ``Retry-After`` may pause delivery or a client.
        self.max_retry_after = check_max_retry_after(max_retry_after)
        #: Most bytes of one answer read before the call counts as failed.
        self.max_body = check_max_body(max_body)
        _seconds("cache_ttl", cache_ttl)
        _seconds("deny_ttl", deny_ttl)
        _seconds("breaker_cooldown", breaker_cooldown)
        _seconds("drain_timeout", drain_timeout)
        if _seconds("max_retry_age", max_retry_age) == 0:
            raise ConfigurationError("max_retry_age must be > 0 seconds")
        if _seconds("timeout", timeout) == 0:
            raise ConfigurationError("timeout must be > 0 seconds")
        for what, value in (("cache_size", cache_size), ("breaker_failures", breaker_failures)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigurationError(f"{what} must be an int >= 1, got {value!r}")
        _policy("failure_policy", failure_policy)
        self._feature_ttl = {
            check_feature(f): _seconds(f"feature_ttl[{f!r}]", t)
            for f, t in (feature_ttl or {}).items()
        }
        self._feature_policy = {
            check_feature(f): _policy(f"feature_policy[{f!r}]", p)
            for f, p in (feature_policy or {}).items()
        }
        self.cache_ttl = float(cache_ttl)
        self.deny_ttl = float(deny_ttl)
        self.failure_policy: FailurePolicy = failure_policy
        self.timeout = float(timeout)
        self.drain_timeout = float(drain_timeout)
        self.max_retry_age = float(max_retry_age)
        self._clock = clock
        self._client = client
        self._owns_client = client is None
        self._outbox = outbox
        self._delivery: ReporterLike | None = None
        self._cache = new_cache(cache_size, clock)
        self._accounts = Accounts(sweep_at=2 * cache_size + 1024)
        self._flights = SingleFlight()
        self.breaker = CircuitBreaker(breaker_failures, float(breaker_cooldown), clock)
        self._logged_at = float("-inf")
        self._suppressed = 0
        self._closing = False
        self._holding = 0  # reservations holding units, not yet settled (all keys)
        cls = type(self)
        if cls.send is RemoteProvider.send and cls.report is not RemoteProvider.report:
            raise ConfigurationError(
                f"{cls.__name__} overrides report(); implement send(events) instead: the "
                "base's report() calls send() and records what the provider counted"
            )

    # -- hooks for subclasses ------------------------------------------------------------

    async def fetch(
        self, customer: str, feature: str, *, scope: HTTPScope | None = None
    ) -> Entitlement:
        """Ask the provider ONCE what ``customer`` has of ``feature``.

        Called by the cache on a miss, under ``timeout``; never call it per request.

        Args:
            customer: customer id; feature: feature name.
            scope: the ASGI scope of the request that missed the cache (ARES reads the
                user's token from it), or ``None``.

        Raises:
            ProviderError: the provider could not answer (retryable) or refused
                (permanent). Anything else raised is treated as a retryable failure.
        """
        raise NotImplementedError

    async def send(self, events: Sequence[UsageEvent]) -> Collection[str] | None:
        """Deliver ``events`` (at most :attr:`max_batch`) to the provider: ONE call.

        Called by :meth:`report`, which records the delivery in local accounting.

        Returns:
            the idempotency keys of the events the provider counted as new usage (the
            others were duplicates of an earlier delivery, Spaire's ``duplicates``), or
            ``None`` when it counted them all (a provider that cannot tell).

        Raises:
            RetryableProviderError: network error, timeout, 429, 5xx.
            PermanentProviderError: the provider rejected the events (4xx).
        """
        raise NotImplementedError

    def charge_of(self, event: UsageEvent) -> Charge | None:
        """How a delivered ``event`` is counted against the balance :meth:`fetch` reads, or
        ``None`` when it takes nothing from it (a clobber sets usage; no units).

        Default: its own customer, feature and units. A provider whose checks count
        something else overrides it (ARES: thousandths of a credit of the user's wallet).
        """
        if event.clobber or event.units <= 0:
            return None
        return (event.customer, event.feature), event.units

    #: Whether the outbox's Reporter may send queued charges of one :meth:`aggregate_key`
    #: as one summed event (:meth:`merge`), one report per ``aggregate_window``: for a
    #: provider that takes a sum but cannot deduplicate (Tier's ``n``, ARES's ``credits``).
    #: Local accounting sees the sum arrive, which is every member's units at once.
    aggregates: bool = False

    def aggregate_key(self, event: UsageEvent) -> Hashable | None:
        """The aggregate ``event`` may be summed in: ``(customer, feature, minute of at)``;
        ``None`` (sent alone) for a clobber, which sets usage."""
        return default_aggregate_key(event)

    def merge(self, events: Sequence[UsageEvent]) -> UsageEvent:
        """One event for ``events`` of one aggregate key: units summed, the latest ``at``,
        an idempotency key derived from theirs (``delivery.aggregate.aggregate_id``)."""
        return merge_events(events)

    def make_client(self) -> httpx.AsyncClient:
        """The ``httpx.AsyncClient`` :meth:`open` creates when none was injected.

        Override to add ``base_url``, auth and headers; keep ``timeout=self.timeout``.
        Called inside the running event loop.
        """
        return httpx.AsyncClient(
            timeout=self.timeout,
            limits=httpx.Limits(max_connections=100, max_keepalive_connections=20),
        )

    def make_reporter(self) -> ReporterLike:
        """The durable delivery for ``outbox``: a :class:`~usage_middleware.delivery.Reporter`.

        Called in :meth:`open` when ``outbox`` is not ``None`` (``outbox=None`` runs a
        Reporter over an outbox in memory). Override to tune it, e.g.
        ``Reporter(self, path=self.outbox, max_delay=0.2)``.
        """
        if self._outbox is None:
            raise ConfigurationError("make_reporter() needs an outbox path (outbox=None given)")
        return Reporter(
            self,
            path=self._outbox,
            drain_timeout=self.drain_timeout,
            max_retry_age=self.max_retry_age,
        )

    def _memory_reporter(self) -> Reporter:
        """The Reporter for ``outbox=None``: an outbox in memory, each call cut off after
        ``timeout``, a short cool-down after failed retries, no in-process retrying past
        ``max_retry_age``, and delivered rows deleted at once (so :meth:`flush` sees them go)."""
        return Reporter(
            self,
            path=None,
            drain_timeout=self.drain_timeout,
            max_retry_age=self.max_retry_age,
            call_timeout=self.timeout,
            retry_timeout=min(60.0, self.max_retry_age),
            retry_cooldown=min(1.0, self.max_retry_age),
            delete_delay=0.0,
        )

    # -- delivery ------------------------------------------------------------------------

    async def report(self, events: Sequence[UsageEvent]) -> None:
        """Deliver ``events`` with :meth:`send`, then record them in local accounting.

        Called by the outbox's Reporter (and ``Answer.report``): a successful delivery
        leaves *pending* and joins *delivered* for the events the provider counted.

        Raises:
            ProviderError: as :meth:`send` (nothing is recorded).
        """
        with telemetry.provider_call(self.name, "send", events=len(events)):
            counted = await self.send(events)
        self.note_delivered(events, counted)

    def note_delivered(
        self, events: Sequence[UsageEvent], counted: Collection[str] | None = None
    ) -> None:
        """Record that ``events`` reached the provider (:meth:`report` does, after
        :meth:`send`; a subclass that delivers by another path calls it too).

        ``counted``: idempotency keys of the events the provider took as new usage (the
        others were duplicates of an earlier delivery); ``None``: all of them.
        """
        now = self._clock()
        charge_of = self.charge_of
        for event in events:
            charge = charge_of(event)
            if charge is not None:
                key, units = charge
                new = counted is None or event.idempotency_key in counted
                self._account(key).arrived(now, units, new, self.balance_lag)

    @property
    def outbox(self) -> str | os.PathLike[str] | None:
        """The outbox path given at construction, or ``None`` (in-memory delivery)."""
        return self._outbox

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def http(self) -> httpx.AsyncClient:
        """The shared HTTP client. Raises ``ConfigurationError`` before :meth:`open`."""
        client = self._client
        if client is None or self._state is not ProviderState.OPEN:
            raise ConfigurationError(
                f"{type(self).__name__} is not open; call 'await provider.open()' first "
                "(the middleware does it in the ASGI lifespan)"
            )
        return client

    @property
    def reporter(self) -> Reporter | None:
        """The durable outbox's Reporter after :meth:`open`, or ``None`` (outbox=None).

        (Whatever :meth:`make_reporter` returned; tests may return a look-alike.)
        """
        return cast(Reporter, self._delivery) if self._outbox is not None else None

    async def open(self) -> None:
        """Create the HTTP client and start delivery, inside the running loop. Idempotent.

        A closed provider opens again: a new owned client and delivery on the running loop.

        Raises:
            ConfigurationError: the outbox is unusable, or the provider is still closing.
        """
        if self._state is ProviderState.OPEN:
            if self.loop is asyncio.get_running_loop():
                return
            await self.aclose()  # open on a loop that is gone: move to this one
        if self._closing:
            raise ConfigurationError(
                f"{type(self).__name__} is closing; open it again once aclose() returned"
            )
        created = None
        if self._client is None:
            created = self._client = self.make_client()
        delivery: ReporterLike
        if self._outbox is not None:
            delivery = self.make_reporter()
        elif isinstance(self._delivery, Reporter):  # reopened: keep what it queued
            delivery = self._delivery
        else:
            delivery = self._memory_reporter()
        try:
            await delivery.open()
        except BaseException:
            if created is not None:
                self._client = None
                await created.aclose()
            raise
        if self.state is ProviderState.OPEN:  # a concurrent open() won
            await delivery.aclose()
            return
        self._delivery = delivery
        await super().open()

    async def aclose(self) -> None:
        """Stop checks, drain delivery, close the owned client. Idempotent; open() reopens."""
        if self._state is ProviderState.CLOSED or self._closing:
            return
        self._closing = True
        try:
            flights = [t for t in self._flights.tasks.values() if not on_another_loop(t)]
            for task in flights:
                task.cancel()
            if flights:
                await asyncio.gather(*flights, return_exceptions=True)
            if self._delivery is not None:
                await self._delivery.aclose()
            if self._owns_client and self._client is not None:
                client, self._client = self._client, None
                moved = self.loop is not None and self.loop is not asyncio.get_running_loop()
                try:
                    await client.aclose()
                except Exception:
                    if not moved:
                        raise
                    # Its connections belong to a loop that is gone; nothing to flush.
                    logger.debug("%s: closing the old loop's client", self.name, exc_info=True)
        finally:
            self._flights.tasks.clear()
            self._closing = False
            await super().aclose()

    # -- checks --------------------------------------------------------------------------

    async def can(
        self, customer: str, feature: str, units: int = 1, *, scope: HTTPScope | None = None
    ) -> Answer:
        """Whether ``customer`` may use ``units`` of ``feature`` now (holds nothing).

        Served from the cache when possible, adjusted by this process's spending. A failed
        check follows the feature's failure policy (``err`` set); never raises for one.

        Raises:
            ValueError / ConfigurationError: a malformed customer, feature or units.
            ConfigurationError: the provider is not open.
        """
        check_customer(customer)
        check_feature(feature)
        check_units(units)
        answer, _ = await self._decide(customer, feature, units, scope, hold=False)
        return answer

    async def reserve(
        self,
        customer: str,
        feature: str,
        units: int = 1,
        *,
        scope: HTTPScope | None = None,
        clobber: bool = False,
    ) -> Reservation:
        """Check as :meth:`can` and hold ``units`` in flight when allowed (or failed open).

        With ``clobber`` (providers with ``supports_clobber``) the charge sets the period's
        usage to ``units``: it is allowed when ``units`` is within the limit, whatever was
        used before, and holds nothing against the balance.

        Returns a :class:`Reservation`; ``answer.ok`` False means nothing is held.
        """
        if clobber:
            return await self._reserve_clobber(customer, feature, units, scope)
        # The warm path: a cached answer that allows it. Only a checked customer and
        # feature can be in the cache, so nothing needs validating but the units; the
        # Answer and the event are built when first read (the middleware reads neither).
        try:
            entry: Entry | None = self._cache[customer, feature]  # (.get() looks twice)
        except KeyError:
            entry = None
        if (
            entry is not None
            and type(units) is int
            and units > 0
            and self._state is ProviderState.OPEN
        ):
            ent = entry.ent
            account = entry.account
            unseen = account.pending + account.delivered - entry.mark
            if ent.remaining >= UNLIMITED:
                remaining = UNLIMITED
            else:
                remaining = ent.remaining - unseen - account.inflight
            if remaining >= units:
                account.inflight += units
                hold = Hold(account, units)
                hold.entry = entry
                hold.unseen = unseen
                hold.remaining = remaining
                hold.at = self._clock()
                self._holding += 1
                return Reservation.lazy(customer, feature, units, True, self._held_answer, hold)
        event = UsageEvent(customer, feature, units)  # validates all three
        answer, held = await self._decide(customer, feature, units, scope, hold=True)
        if held is not None:
            self._holding += 1
        return Reservation(answer=answer, event=event, token=held)

    async def _reserve_clobber(
        self, customer: str, feature: str, units: int, scope: HTTPScope | None
    ) -> Reservation:
        if not self.supports_clobber:
            raise clobber_refused(self)
        event = UsageEvent(customer, feature, units, clobber=True)  # validates all three
        answer = await self.can(customer, feature, 1, scope=scope)
        if answer.err is None and answer.limit is not None:
            ok = answer.limit >= UNLIMITED or units <= answer.limit
            answer = dataclasses.replace(
                answer,
                ok=ok,
                units=units,
                remaining=None,
                reason=None if ok else f"{units} unit(s) exceed the limit of {answer.limit}",
            )
        else:
            answer = dataclasses.replace(answer, units=units)
        if not answer.ok:
            return Reservation(answer=answer, event=event)
        self._holding += 1
        return Reservation(
            answer=answer, event=event, token=Hold(self._account((customer, feature)), 0)
        )

    def _held_answer(self, reservation: Reservation) -> Answer:
        """The answer of a warm reservation (numbers as of :meth:`reserve`), built lazily."""
        hold: Hold = reservation.token
        entry = hold.entry
        assert entry is not None
        ent = entry.ent
        return Answer(
            ok=True,
            customer=reservation.customer,
            feature=reservation.feature,
            units=reservation.units,
            limit=ent.limit,
            used=None if ent.used is None else ent.used + hold.unseen,
            remaining=hold.remaining,
            reason=None,
            cached=True,
            age=max(0.0, hold.at - entry.fetched_at),
            provider=self,
        )

    def hold_units(self, feature: str, units: int) -> int:
        """What ``units`` of ``feature`` hold in local accounting (linear in ``units``).

        Default: the units themselves; ARES: thousandths of a credit.
        """
        return units

    def _sized(
        self, reservation: Reservation, hold: Hold, units: int | None, overage: Overage
    ) -> UsageEvent | None:
        """Size ``hold`` to the request's actual ``units`` (once) and return the event
        that charges them (``None``: 0 units, nothing to charge).

        Fewer than reserved: the hold shrinks (the rest is free for other requests at
        once). More: the hold grows by what this process's view of the balance still
        allows (the cached answer less what is unseen and in flight); beyond it,
        ``overage="charge"`` grows it anyway and ``"cap"`` stops there. A reservation
        without a cached answer (failed open) caps at the reserved units.
        """
        if hold.sized:
            return hold.final
        actual = settle_units(reservation, units)
        hold.sized = True
        event = reservation.event
        if event.clobber:  # fixed units only (refused at decoration otherwise)
            hold.final = event
            return event
        reserved = reservation.units
        feature = reservation.feature
        target = self.hold_units(feature, actual)
        if actual > reserved and overage == "cap":
            per_unit = self.hold_units(feature, 1)
            entry = hold.entry
            free = available(entry) if entry is not None else 0
            if per_unit > 0 and free < UNLIMITED and target - hold.units > free:
                actual = reserved + max(0, free) // per_unit
                target = self.hold_units(feature, actual)
        hold.account.inflight += target - hold.units
        hold.units = target
        if actual == 0:
            hold.final = None
        elif actual == event.units:
            hold.final = event
        else:
            hold.final = dataclasses.replace(event, units=actual)
        return hold.final

    async def prepare(
        self, reservation: Reservation, *, units: int | None = None, overage: Overage = "cap"
    ) -> None:
        """Write the charge of the actual ``units`` to the outbox before the final 2xx body
        is sent (the hold sized to them first, see :meth:`commit`).

        A failure to write is logged and the charge is queued on commit instead.

        Raises:
            ValueError: ``units`` is not an int from 0 to ``MAX_UNITS``.
        """
        hold = reservation.token
        if not isinstance(hold, Hold) or hold.prepared or reservation.settled:
            return
        final = self._sized(reservation, hold, units, overage)
        delivery = self._delivery
        if delivery is None or final is None:
            return
        hold.prepared = True  # a cancelled prepare may have written: settle it either way
        # The only reservation held in this process: no other prepare can share a group
        # commit, so commit at once instead of waiting a loop turn for the writer.
        prepare = delivery.prepare_alone if self._holding == 1 else delivery.prepare
        try:
            await prepare(final)
        except Exception:
            hold.prepared = False
            logger.exception(
                "%s: could not write a charge to the outbox; it is queued on commit", self.name
            )

    async def commit(
        self, reservation: Reservation, *, units: int | None = None, overage: Overage = "cap"
    ) -> int:
        """Charge a held reservation its actual ``units``: count them locally and hand
        the event to delivery. Once. Returns the units charged.

        ``units`` (``None``: reserved) fewer than reserved charges the actual (0: nothing).
        More: the excess is allowed as far as this process's view of the balance goes
        (the provider's last answer less what it has not seen and what is in flight);
        beyond it ``overage="charge"`` reports the actual anyway (the provider records
        the overage: Tier's and Spaire's usage, ARES's credits) and ``"cap"`` reports
        what was available. After :meth:`prepare` the units it sized are used.

        Raises:
            ValueError: ``units`` is not an int from 0 to ``MAX_UNITS``.
        """
        if reservation.settled:
            return 0
        hold = reservation.token
        if not isinstance(hold, Hold):
            reservation.settled = True
            return 0  # denied or failed closed: nothing was held, nothing to charge
        final = self._sized(reservation, hold, units, overage)
        reservation.settled = True
        self._holding -= 1
        account = hold.account
        account.inflight -= hold.units
        if final is None:
            return 0
        account.charge(self._clock(), hold.units)
        delivery = self._delivery
        if delivery is None:
            logger.error(
                "%s: provider not open; charge of %d unit(s) of %s for %s not recorded",
                self.name,
                final.units,
                reservation.feature,
                reservation.customer,
            )
        elif hold.prepared:
            delivery.confirm(final)
        else:
            delivery.enqueue(final)
        return final.units

    async def release(self, reservation: Reservation) -> None:
        """Give back a held reservation; cancel its outbox entry if prepared. Once."""
        if reservation.settled:
            return
        reservation.settled = True
        hold = reservation.token
        if not isinstance(hold, Hold):
            return
        self._holding -= 1
        hold.account.inflight -= hold.units
        if hold.prepared and self._delivery is not None:
            await self._delivery.cancel(hold.final or reservation.event)

    async def claim_key(
        self, customer: str, route: str, key: str, *, fingerprint: str = ""
    ) -> KeyClaim:
        """Claim an ``Idempotency-Key`` in the durable outbox (shared by every worker using
        the file); in this process's memory with ``outbox=None``."""
        reporter = self.reporter
        if isinstance(reporter, Reporter):
            return await reporter.claim_key(customer, route, key, fingerprint=fingerprint)
        return await super().claim_key(customer, route, key, fingerprint=fingerprint)

    async def finish_key(
        self, customer: str, route: str, key: str, *, charged: bool, fingerprint: str = ""
    ) -> None:
        """End the claim of :meth:`claim_key` (the key is kept 24 hours when charged)."""
        reporter = self.reporter
        if isinstance(reporter, Reporter):
            await reporter.finish_key(
                customer, route, key, charged=charged, fingerprint=fingerprint
            )
        else:
            await super().finish_key(customer, route, key, charged=charged, fingerprint=fingerprint)

    async def flush(self, within: float = 5.0) -> bool:
        """Wait up to ``within`` seconds until the in-memory queue (outbox=None) is delivered.

        Returns whether it is empty. With an outbox, delivery is the Reporter's: True.
        """
        if self._outbox is None and isinstance(self._delivery, Reporter):
            return await self._delivery.drain(within)
        return True

    # -- internals -----------------------------------------------------------------------

    async def _decide(
        self, customer: str, feature: str, units: int, scope: HTTPScope | None, *, hold: bool
    ) -> tuple[Answer, Hold | None]:
        if self._state is not ProviderState.OPEN:
            raise ConfigurationError(
                f"{type(self).__name__} is not open; call 'await provider.open()' first"
            )
        key = (customer, feature)
        try:
            entry: Entry | None = self._cache[key]
        except KeyError:
            entry = None
        if entry is not None:
            now = self._clock()
            if available(entry) >= units or now - entry.fetched_at < self._deny_ttl(feature):
                return self._answer(entry, customer, feature, units, now, hold=hold)
        outcome = await self._flight(key, scope)
        if isinstance(outcome, Entry) and outcome.ambiguous and available(outcome) < units:
            # A refusal that may only come from deliveries completed during the fetch
            # (subtracted, though the provider may have counted them): one more fetch,
            # started after they completed, tells. Bounded to this one extra call.
            again = await self._flight(key, scope)
            if isinstance(again, Entry):
                outcome = again
        if isinstance(outcome, Entry):
            return self._answer(outcome, customer, feature, units, None, hold=hold)
        if entry is not None:  # a refresh of a cached denial failed: keep denying
            return self._answer(entry, customer, feature, units, self._clock(), hold=hold)
        return self._failed(key, units, outcome, hold=hold)

    def _answer(
        self,
        entry: Entry,
        customer: str,
        feature: str,
        units: int,
        now: float | None,
        *,
        hold: bool,
    ) -> tuple[Answer, Hold | None]:
        ent = entry.ent
        account = entry.account
        unseen = entry.unseen()
        if ent.remaining >= UNLIMITED:
            ok, remaining = True, UNLIMITED
        else:
            available = ent.remaining - unseen - account.inflight
            ok, remaining = available >= units, max(available, 0)
        held = None
        if ok and hold:
            account.inflight += units
            held = Hold(account, units)
            held.entry = entry
        answer = Answer(
            ok=ok,
            customer=customer,
            feature=feature,
            units=units,
            limit=ent.limit,
            used=None if ent.used is None else ent.used + unseen,
            remaining=remaining,
            reason=None if ok else (ent.reason or "not enough units left"),
            cached=now is not None,
            age=None if now is None else max(0.0, now - entry.fetched_at),
            provider=self,
        )
        return answer, held

    def _failed(
        self, key: Key, units: int, err: ProviderError, *, hold: bool
    ) -> tuple[Answer, Hold | None]:
        customer, feature = key
        policy = self._feature_policy.get(feature, self.failure_policy)
        self._log_failure(err, policy)
        if policy == "open":
            held = None
            if hold:
                account = self._account(key)
                account.inflight += units
                held = Hold(account, units)
            answer = Answer(True, customer, feature, units, err=err, provider=self)
            return answer, held
        retry_after = err.retry_after if err.retry_after is not None else 1.0
        if not retry_after <= self.max_retry_after:  # NaN and decades alike
            retry_after = self.max_retry_after
        answer = Answer(
            False,
            customer,
            feature,
            units,
            err=err,
            retry_after=max(1.0, retry_after),
            provider=self,
        )
        return answer, None

    async def _flight(self, key: Key, scope: HTTPScope | None) -> Entry | ProviderError:
        """The fetch for ``key``: joined if one runs, else started (unless closing or the
        circuit breaker says wait: then that, as a retryable error)."""
        if key not in self._flights.tasks:
            if self._closing:
                return RetryableProviderError(f"{self.name} is closing")
            wait = self.breaker.allow()
            if wait is not None:
                return RetryableProviderError(
                    f"{self.name} is failing; circuit breaker open, next probe in {wait:.1f} s",
                    retry_after=wait,
                )
        return await self._flights.join(key, lambda: self._fetch_entry(key, scope), self.name)

    async def _fetch_entry(self, key: Key, scope: HTTPScope | None) -> Entry | ProviderError:
        customer, feature = key
        account = self._account(key)
        started = self._clock()
        account.expire(started, self.delivery_allowance)
        # What the answer includes: deliveries completed balance_lag before the read started
        # (in flight during it: not included). A provider whose fetch() itself subtracts
        # the deliveries its numbers lack is marked when fetch() returns instead.
        mark = None if self.fetch_subtracts_delivered else account.mark(started, self.balance_lag)
        delivered = account.delivered
        try:
            with telemetry.provider_call(self.name, "fetch", feature=feature):
                async with asyncio.timeout(self.timeout):
                    ent = await self.fetch(customer, feature, scope=scope)
            if not isinstance(ent, Entitlement):
                raise TypeError(f"fetch() returned {type(ent).__name__}, not Entitlement")
        except TimeoutError as exc:
            self.breaker.failure()
            return RetryableProviderError(
                f"{self.name} entitlement check timed out after {self.timeout:g} s",
                original_error=exc,
            )
        except PermanentProviderError as exc:
            self.breaker.success()  # the provider is up; it refused this one
            return exc
        except ProviderError as exc:
            self.breaker.failure()
            return exc
        except Exception as exc:
            self.breaker.failure()
            logger.debug("%s: fetch raised", self.name, exc_info=True)
            return RetryableProviderError(
                f"{self.name} entitlement check failed: {type(exc).__name__}",
                original_error=exc,
            )
        self.breaker.success()
        ttl = self._feature_ttl.get(feature, self.cache_ttl)
        if not ent.unlimited and ent.remaining <= 0:
            ttl = min(ttl, self.deny_ttl)
        now = self._clock()
        ambiguous = mark is not None and account.delivered != delivered
        if mark is None:
            mark = account.delivered
        entry = Entry(ent, now, mark, account, ttl, ambiguous)
        if ttl > 0 and self._state is ProviderState.OPEN:
            self._cache[key] = entry
        return entry

    def _deny_ttl(self, feature: str) -> float:
        return min(self.deny_ttl, self._feature_ttl.get(feature, self.cache_ttl))

    def account_key(self, customer: str, feature: str) -> tuple[str, str]:
        """The key under which units held and charged here are accounted.

        ``(customer, feature)`` by default. A provider whose features draw on one balance
        (Spaire's meter credits) returns one key for all of a customer's features, so a
        hold on one feature is seen by a check on another.
        """
        return (customer, feature)

    def _account(self, key: Key) -> Account:
        """The account ``key`` (a ``(customer, feature)``) is counted in, made if new."""
        key = self.account_key(*key)
        now = self._clock()
        accounts = self._accounts
        account = accounts.get(key)
        if account is None:
            if accounts.crowded():
                self._sweep(now)
            account = accounts[key] = Account(now)
        account.touched = now
        return account

    def _sweep(self, now: float) -> None:
        """Forget idle accounts no cache entry or fetch uses (see :meth:`Accounts.sweep`)."""
        in_use = {self.account_key(*k) for k in (*self._cache.keys(), *self._flights.tasks)}
        self._accounts.sweep(
            now,
            in_use,
            allowance=self.delivery_allowance,
            lag=self.balance_lag,
            quiet=self.timeout + 60.0,
        )

    def _log_failure(self, err: ProviderError, policy: str) -> None:
        now = self._clock()
        if now - self._logged_at < self.failure_log_interval:
            self._suppressed += 1
            return
        logger.warning(
            "%s: entitlement check failed (%s); failing %s; %d more since the last report",
            self.name,
            err,
            policy,
            self._suppressed,
        )
        self._logged_at = now
        self._suppressed = 0


def _seconds(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigurationError(f"{what} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _policy(what: str, value: object) -> FailurePolicy:
    if value not in _POLICIES:
        raise ConfigurationError(f"{what} must be 'open' or 'closed', got {value!r}")
    return cast(FailurePolicy, value)
