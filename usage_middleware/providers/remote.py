"""RemoteProvider: the base class of providers that ask a billing API (Tier, Spaire, ARES).

A remote entitlement check costs tens of milliseconds and the provider is sometimes down.
:class:`RemoteProvider` turns one hook, :meth:`RemoteProvider.fetch` (ONE remote check
returning an :class:`Entitlement`), into a fast and safe ``can``/``reserve``:

Entitlement cache
    A ``cachetools.TLRUCache`` (TTLCache with a TTL per entry) keyed by
    ``(customer, feature)``, at most ``cache_size`` entries. An entry lives ``cache_ttl``
    seconds, or ``feature_ttl[feature]`` (``0`` = never cached: always ask,
    though concurrent checks still share one call). An entry the
    provider says has nothing left lives only ``deny_ttl`` seconds, and a cached entry that
    denies because of local spending is re-fetched once it is older than ``deny_ttl``.

Local accounting (why a cached answer never lets one process overspend)
    The rule: the balance a check uses is the provider's last answer minus exactly the
    units the provider had not yet counted when it answered. Per account (``(customer,
    feature)``, see :meth:`RemoteProvider.account_key`) the process keeps units *in flight*
    (reserved, not yet settled), units *pending* (committed, not yet delivered) and a
    running total of units *delivered*. A fetch notes a *mark* when it starts: the
    delivered total the provider's answer includes. An answer allows ``units`` when::

        provider remaining - pending - (delivered - mark) - in flight >= units

    So after a fresh read only charges still queued, or delivered after (or during) that
    read, are subtracted; used/remaining in a 402 follow. When the mark is taken is a
    per-provider fact, a class attribute:

    * ``balance_lag = 0`` (Tier, ARES): the provider counts a charge as its report
      returns, so the mark is the total delivered when the fetch starts (a delivery in
      flight during the fetch is subtracted too: conservative).
    * ``balance_lag > 0``: deliveries completed less than ``balance_lag`` seconds before
      the fetch started are not in the mark.
    * ``fetch_subtracts_delivered`` (Spaire, whose balance lags 15 s to hours and says how
      fresh it is with ``modified_at``): :meth:`fetch` subtracts the delivered units its
      numbers lack; the mark is taken when ``fetch()`` returns.

    A pending charge whose delivery this process never sees (delivered by another worker)
    stops counting ``delivery_allowance`` seconds after its commit. Delivery is observed by
    wrapping every subclass's :meth:`report` (``__init_subclass__``): after a successful
    call, the delivered events leave *pending* (oldest first) and join *delivered*; units
    beyond what was pending (``Answer.report``, an outbox replay after a restart) simply
    join *delivered*. A provider that learns which events were duplicates of an earlier
    delivery (Spaire) leaves those out of *delivered*. Clobber events are not counted
    (they set usage rather than add to it).

Single-flight
    Concurrent checks that miss the cache for the same ``(customer, feature)`` share ONE
    ``fetch``. The fetch runs in its own task, so cancelling the caller that started it does
    not cancel it for the others; its result or error is handed to every waiter.

Failure policy, timeout, circuit breaker
    Every fetch runs under ``timeout`` seconds. A failed check (``ProviderError``, timeout,
    any exception from ``fetch``) follows ``feature_policy.get(feature, failure_policy)``:
    ``"open"`` answers ``ok=True`` with ``err`` set (logged at most once per
    :attr:`RemoteProvider.failure_log_interval` seconds per provider) and still charges the
    reservation on commit; ``"closed"`` answers ``ok=False`` with ``err`` and
    ``retry_after`` (the middleware's 503). After ``breaker_failures`` consecutive retryable
    failures the :class:`CircuitBreaker` opens: no call for ``breaker_cooldown`` seconds
    (answers come from the policy at once), then ONE probe; its success closes the breaker.
    A :class:`~usage_middleware.errors.PermanentProviderError` (a 4xx: the provider is up)
    counts as an answer for the breaker.

Delivery
    ``outbox`` (a SQLite path, default ``"usage-outbox.db"``) routes commits through the
    durable :class:`usage_middleware.delivery.Reporter`: ``prepare`` writes the charge to
    the outbox (held), ``commit`` confirms it, ``release`` cancels it. ``outbox=None``
    runs the same Reporter over an outbox in memory: nothing is durable, and charges still
    queued when :meth:`RemoteProvider.aclose` gives up after ``drain_timeout`` seconds (or
    when the process dies) are lost and logged. Use it for tests and development only. A
    charge that retryable failures keep undelivered longer than ``max_retry_age`` (default
    3 days) is dead-lettered with the last error and logged (with ``outbox=None`` the dead
    letters live in memory: counted in ``stats()``, lost at exit): nothing waits in the
    queue forever unnoticed.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import logging
import os
import time
from collections import deque
from collections.abc import Awaitable, Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

import cachetools
import httpx
from asgiref.typing import HTTPScope

from ..delivery import Reporter
from ..errors import (
    ConfigurationError,
    PermanentProviderError,
    ProviderError,
    RetryableProviderError,
)
from ..models import (
    UNLIMITED,
    Answer,
    Reservation,
    UsageEvent,
    check_customer,
    check_feature,
    check_units,
)
from ..provider import FailurePolicy, Provider, ProviderState, ReporterLike, on_another_loop
from ._http import (
    DEFAULT_MAX_BODY,
    DEFAULT_MAX_RETRY_AFTER,
    check_max_body,
    check_max_retry_after,
)

__all__ = ["CircuitBreaker", "Entitlement", "RemoteProvider", "ReporterLike"]

logger = logging.getLogger("usage_middleware.providers.remote")

_POLICIES = ("open", "closed")
_Key = tuple[str, str]


@dataclass(frozen=True, slots=True)
class Entitlement:
    """What the provider said about one customer and feature, in units of usage.

    Attributes:
        limit: the plan's limit this period (``UNLIMITED`` for none), or ``None`` if unknown.
        used: units used this period, or ``None`` if unknown.
        remaining: units available now per the provider (``UNLIMITED`` = no limit); may be
            ``<= 0``. Includes credits where the provider has them.
        reason: why nothing is available (``"feature not in plan"``), or ``None``.

    Raises:
        ValueError: at creation, when ``remaining`` is not an ``int``.
    """

    limit: int | None
    used: int | None
    remaining: int
    reason: str | None = None

    def __post_init__(self) -> None:
        if isinstance(self.remaining, bool) or not isinstance(self.remaining, int):
            raise ValueError(
                f"Entitlement.remaining must be whole units (int), got {self.remaining!r}"
            )

    @property
    def unlimited(self) -> bool:
        """Whether the provider sets no limit (``remaining >= UNLIMITED``)."""
        return self.remaining >= UNLIMITED


class CircuitBreaker:
    """A consecutive-failure circuit breaker: closed -> open -> half-open (one probe).

    Args:
        failures: consecutive failures that open it (>= 1).
        cooldown: seconds it stays open before letting one probe through.
        clock: monotonic seconds.
    """

    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float]) -> None:
        self.failures = failures
        self.cooldown = cooldown
        self._clock = clock
        self._count = 0
        self._opened_at: float | None = None
        self._probing = False

    @property
    def state(self) -> str:
        """``"closed"``, ``"open"`` (cooling down) or ``"half-open"`` (probe allowed/running)."""
        if self._opened_at is None:
            return "closed"
        if self._probing or self._clock() - self._opened_at >= self.cooldown:
            return "half-open"
        return "open"

    def allow(self) -> float | None:
        """``None`` if a call may go out now (the probe, when half-open), else seconds to wait."""
        if self._opened_at is None:
            return None
        wait = self._opened_at + self.cooldown - self._clock()
        if wait > 0:
            return wait
        if self._probing:  # the probe is out; its result decides
            return 0.0
        self._probing = True
        return None

    def success(self) -> None:
        """A call got an answer: close."""
        self._count = 0
        self._opened_at = None
        self._probing = False

    def failure(self) -> None:
        """A call failed: count it; open at the threshold; a failed probe re-opens."""
        self._count += 1
        if self._probing or self._count >= self.failures:
            self._opened_at = self._clock()
            self._probing = False


class _Account:
    """Local accounting for one (customer, feature), in units.

    ``inflight``: held by reservations not yet settled. ``pending``: charged here and not
    yet delivered (each charge also kept with its time in ``queue``, so a charge whose
    delivery this process never sees stops counting after ``delivery_allowance``).
    ``delivered``: a running total of units delivered to the provider (by this process's
    delivery, or reported from elsewhere) that the provider counted as new; ``log`` keeps
    ``(when, total)`` for the last ``balance_lag`` seconds, so a fetch can tell which
    deliveries its answer may not include (see :meth:`mark`).
    """

    __slots__ = ("delivered", "inflight", "log", "log_base", "pending", "queue", "touched")

    def __init__(self, now: float) -> None:
        self.touched = now  # last time a fetch, delivery or failed-open check used it
        self.inflight = 0
        self.pending = 0
        self.queue: deque[list[float]] = deque()  # [committed_at, units not yet delivered]
        self.delivered = 0
        self.log: deque[tuple[float, int]] = deque()  # (delivered_at, total after it)
        self.log_base = 0  # ``delivered`` before the oldest ``log`` record

    def charge(self, now: float, units: int) -> None:
        """``units`` were committed here and queued for delivery."""
        if units <= 0:  # a clobber sets usage: nothing to subtract
            return
        self.pending += units
        queue = self.queue
        if queue and queue[-1][0] == now:
            queue[-1][1] += units
        else:
            queue.append([now, units])

    def arrived(self, now: float, units: int, counted: bool, lag: float) -> None:
        """``units`` reached the provider; ``counted``: it took them as new usage."""
        left = units
        queue = self.queue
        while left and queue:
            head = queue[0]
            take = min(left, int(head[1]))
            head[1] -= take
            self.pending -= take
            left -= take
            if not head[1]:
                queue.popleft()
        if counted:
            self.delivered += units
            if lag > 0:
                self.log.append((now, self.delivered))
                self._trim(now, lag)

    def expire(self, now: float, allowance: float) -> None:
        """Stop counting charges whose delivery was not seen within ``allowance`` seconds."""
        queue = self.queue
        while queue and queue[0][0] + allowance <= now:
            self.pending -= int(queue.popleft()[1])

    def mark(self, now: float, lag: float) -> int:
        """The delivered total the provider's numbers include for a read starting ``now``.

        Deliveries completed at least ``lag`` seconds ago are in it; later ones (and
        those in flight) are not, and an answer subtracts them.
        """
        if lag <= 0:
            return self.delivered
        self._trim(now, lag)
        cutoff = now - lag
        total = self.log_base
        for at, after in self.log:
            if at > cutoff:
                break
            total = after
        return total

    def _trim(self, now: float, lag: float) -> None:
        log = self.log
        cutoff = now - lag
        while len(log) > 1 and log[1][0] <= cutoff:
            self.log_base = log.popleft()[1]

    def idle(self, now: float, lag: float) -> bool:
        log = self.log
        return self.inflight == 0 and self.pending == 0 and (not log or log[-1][0] <= now - lag)


class _Entry:
    """A fetched entitlement plus the mark that tells which later charges it lacks."""

    __slots__ = ("account", "ent", "fetched_at", "mark", "ttl")

    def __init__(
        self, ent: Entitlement, fetched_at: float, mark: int, account: _Account, ttl: float
    ) -> None:
        self.ent = ent
        self.fetched_at = fetched_at  # when the answer arrived (for Answer.age and TTLs)
        self.mark = mark  # account.delivered total the provider's answer includes
        self.account = account
        self.ttl = ttl

    def unseen(self) -> int:
        """Units charged here that the provider's answer does not include: pending, plus
        delivered after the answer's mark."""
        account = self.account
        return account.pending + account.delivered - self.mark


class _Hold:
    """Reservation.token of a RemoteProvider reservation that holds units.

    A reservation served from the cache (the warm path) also keeps what its answer needs
    (``entry``, ``unseen``, ``remaining``, ``at``): the :class:`Answer` is built only if
    someone reads ``reservation.answer``.
    """

    __slots__ = ("account", "at", "entry", "prepared", "remaining", "units", "unseen")

    def __init__(self, account: _Account, units: int) -> None:
        self.account = account
        self.units = units
        self.prepared = False
        self.entry: _Entry | None = None
        self.unseen = 0
        self.remaining = 0
        self.at = 0.0


def _ttu(_key: _Key, entry: _Entry, now: float) -> float:
    return now + entry.ttl


def _track_delivery(report: Callable[..., Any]) -> Callable[..., Any]:
    """Wrap a subclass's ``report`` so a successful call updates local accounting."""

    @functools.wraps(report)
    async def tracked(self: RemoteProvider, events: Sequence[UsageEvent]) -> None:
        await report(self, events)
        # Only the most derived report records, so super().report() chains count once.
        if getattr(type(self), "report", None) is tracked and not self._notes_own_deliveries:
            self._note_delivered(events)

    tracked.__usage_tracked__ = True  # type: ignore[attr-defined]
    return tracked


class RemoteProvider(Provider):
    """Base class of providers that ask a remote billing API (see the module docstring).

    Subclasses implement :meth:`fetch` and :meth:`report`, set :attr:`name`,
    :attr:`max_batch` and :attr:`balance_lag` (or :attr:`fetch_subtracts_delivered`), and
    may override :meth:`make_client` (base URL, auth, headers) and :meth:`make_reporter`.

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
    #: Whether :meth:`report` calls ``_note_delivered`` itself (with the events the provider
    #: counted as new); otherwise every successfully reported event counts.
    _notes_own_deliveries: bool = False
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
        self._cache: cachetools.TLRUCache[_Key, _Entry] = cachetools.TLRUCache(
            cache_size, _ttu, timer=clock
        )
        self._accounts: dict[_Key, _Account] = {}
        self._sweep_at = 2 * cache_size + 1024
        self._flights: dict[_Key, asyncio.Task[_Entry | ProviderError]] = {}
        self.breaker = CircuitBreaker(breaker_failures, float(breaker_cooldown), clock)
        self._logged_at = float("-inf")
        self._suppressed = 0
        self._closing = False
        self._holding = 0  # reservations holding units, not yet settled (all keys)
        self._prepare_alone: Callable[[UsageEvent], Awaitable[None]] | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        report = cls.__dict__.get("report")
        if report is not None and not getattr(report, "__usage_tracked__", False):
            cls.report = _track_delivery(report)  # type: ignore[method-assign]

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

    async def report(self, events: Sequence[UsageEvent]) -> None:
        """Deliver ``events`` (at most :attr:`max_batch`) to the provider; called by the reporter.

        Raises:
            RetryableProviderError: network error, timeout, 429, 5xx.
            PermanentProviderError: the provider rejected the events (4xx).
        """
        raise NotImplementedError

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
        self._prepare_alone = getattr(delivery, "prepare_alone", None)
        await super().open()

    async def aclose(self) -> None:
        """Stop checks, drain delivery, close the owned client. Idempotent; open() reopens."""
        if self._state is ProviderState.CLOSED or self._closing:
            return
        self._closing = True
        try:
            flights = [t for t in self._flights.values() if not on_another_loop(t)]
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
            self._flights.clear()
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
            entry: _Entry | None = self._cache[customer, feature]  # (.get() looks twice)
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
                hold = _Hold(account, units)
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
            raise ConfigurationError(
                f"{type(self).__name__} cannot set usage (clobber); report increments instead"
            )
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
            answer=answer, event=event, token=_Hold(self._account((customer, feature)), 0)
        )

    def _held_answer(self, reservation: Reservation) -> Answer:
        """The answer of a warm reservation (numbers as of :meth:`reserve`), built lazily."""
        hold: _Hold = reservation.token
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

    async def prepare(self, reservation: Reservation) -> None:
        """Write the held charge to the outbox before the final 2xx body is sent.

        A failure to write is logged and the charge is queued on commit instead.
        """
        hold = reservation.token
        if not isinstance(hold, _Hold) or hold.prepared or reservation.settled:
            return
        delivery = self._delivery
        if delivery is None:
            return
        hold.prepared = True  # a cancelled prepare may have written: settle it either way
        # The only reservation held in this process: no other prepare can share a group
        # commit, so commit at once instead of waiting a loop turn for the writer.
        prepare = self._prepare_alone if self._holding == 1 else None
        try:
            await (prepare or delivery.prepare)(reservation.event)
        except Exception:
            hold.prepared = False
            logger.exception(
                "%s: could not write a charge to the outbox; it is queued on commit", self.name
            )

    async def commit(self, reservation: Reservation) -> None:
        """Charge a held reservation: count it locally and hand it to delivery. Once."""
        if reservation.settled:
            return
        reservation.settled = True
        hold = reservation.token
        if not isinstance(hold, _Hold):
            return  # denied or failed closed: nothing was held, nothing to charge
        self._holding -= 1
        account = hold.account
        account.inflight -= hold.units
        account.charge(self._clock(), hold.units)
        delivery = self._delivery
        if delivery is None:
            logger.error(
                "%s: provider not open; charge of %d unit(s) of %s for %s not recorded",
                self.name,
                hold.units,
                reservation.feature,
                reservation.customer,
            )
        elif hold.prepared:
            delivery.confirm(reservation.event)
        else:
            delivery.enqueue(reservation.event)

    async def release(self, reservation: Reservation) -> None:
        """Give back a held reservation; cancel its outbox entry if prepared. Once."""
        if reservation.settled:
            return
        reservation.settled = True
        hold = reservation.token
        if not isinstance(hold, _Hold):
            return
        self._holding -= 1
        hold.account.inflight -= hold.units
        if hold.prepared and self._delivery is not None:
            await self._delivery.cancel(reservation.event)

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
    ) -> tuple[Answer, _Hold | None]:
        if self._state is not ProviderState.OPEN:
            raise ConfigurationError(
                f"{type(self).__name__} is not open; call 'await provider.open()' first"
            )
        key = (customer, feature)
        try:
            entry: _Entry | None = self._cache[key]
        except KeyError:
            entry = None
        if entry is not None:
            now = self._clock()
            if _available(entry) >= units or now - entry.fetched_at < self._deny_ttl(feature):
                return self._answer(entry, customer, feature, units, now, hold=hold)
        outcome = await self._flight(key, scope)
        if isinstance(outcome, _Entry):
            return self._answer(outcome, customer, feature, units, None, hold=hold)
        if entry is not None:  # a refresh of a cached denial failed: keep denying
            return self._answer(entry, customer, feature, units, self._clock(), hold=hold)
        return self._failed(key, units, outcome, hold=hold)

    def _answer(
        self,
        entry: _Entry,
        customer: str,
        feature: str,
        units: int,
        now: float | None,
        *,
        hold: bool,
    ) -> tuple[Answer, _Hold | None]:
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
            held = _Hold(account, units)
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
        self, key: _Key, units: int, err: ProviderError, *, hold: bool
    ) -> tuple[Answer, _Hold | None]:
        customer, feature = key
        policy = self._feature_policy.get(feature, self.failure_policy)
        self._log_failure(err, policy)
        if policy == "open":
            held = None
            if hold:
                account = self._account(key)
                account.inflight += units
                held = _Hold(account, units)
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

    async def _flight(self, key: _Key, scope: HTTPScope | None) -> _Entry | ProviderError:
        task = self._flights.get(key)
        if task is None:
            if self._closing:
                return RetryableProviderError(f"{self.name} is closing")
            wait = self.breaker.allow()
            if wait is not None:
                return RetryableProviderError(
                    f"{self.name} is failing; circuit breaker open, next probe in {wait:.1f} s",
                    retry_after=wait,
                )
            task = asyncio.get_running_loop().create_task(self._fetch_entry(key, scope))
            self._flights[key] = task
            task.add_done_callback(functools.partial(self._flight_done, key))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or current.cancelling() == 0):
                return RetryableProviderError(f"{self.name} closed during the check")
            raise

    def _flight_done(self, key: _Key, task: asyncio.Task[_Entry | ProviderError]) -> None:
        if self._flights.get(key) is task:
            del self._flights[key]

    async def _fetch_entry(self, key: _Key, scope: HTTPScope | None) -> _Entry | ProviderError:
        customer, feature = key
        account = self._account(key)
        started = self._clock()
        account.expire(started, self.delivery_allowance)
        # What the answer includes: deliveries completed balance_lag before the read started
        # (in flight during it: not included). A provider whose fetch() itself subtracts
        # the deliveries its numbers lack is marked when fetch() returns instead.
        mark = None if self.fetch_subtracts_delivered else account.mark(started, self.balance_lag)
        try:
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
        if mark is None:
            mark = account.delivered
        entry = _Entry(ent, now, mark, account, ttl)
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

    def _account(self, key: _Key) -> _Account:
        key = self.account_key(*key)
        now = self._clock()
        account = self._accounts.get(key)
        if account is None:
            if len(self._accounts) >= self._sweep_at:
                self._sweep(now)
            account = self._accounts[key] = _Account(now)
        account.touched = now
        return account

    def _sweep(self, now: float) -> None:
        """Forget idle accounts nothing refers to any more (bounds memory).

        An account is kept while units are in flight or charges may be unseen, while a cache
        entry or fetch uses it, and for a quiet period after its last use (so a caller that
        just got a fetch's result still finds the same account).
        """
        quiet = self.timeout + 60.0
        in_use = {self.account_key(*key) for key in (*self._cache.keys(), *self._flights)}
        for key, account in list(self._accounts.items()):
            account.expire(now, self.delivery_allowance)
            idle = account.idle(now, self.balance_lag)
            if idle and now - account.touched > quiet and key not in in_use:
                del self._accounts[key]
        self._sweep_at = max(self._sweep_at, 2 * len(self._accounts))

    def _note_delivered(
        self, events: Sequence[UsageEvent], counted: Collection[str] | None = None
    ) -> None:
        """Record that ``events`` reached the provider (called after a successful report).

        ``counted``: idempotency keys of the events the provider took as new usage (the
        others were duplicates of an earlier delivery); ``None``: all of them.
        """
        now = self._clock()
        for event in events:
            if not event.clobber and event.units > 0:
                account = self._account((event.customer, event.feature))
                new = counted is None or event.idempotency_key in counted
                account.arrived(now, event.units, new, self.balance_lag)

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


def _available(entry: _Entry) -> int:
    ent = entry.ent
    if ent.remaining >= UNLIMITED:
        return UNLIMITED
    return ent.remaining - entry.unseen() - entry.account.inflight


def _seconds(what: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
        raise ConfigurationError(f"{what} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _policy(what: str, value: object) -> FailurePolicy:
    if value not in _POLICIES:
        raise ConfigurationError(f"{what} must be 'open' or 'closed', got {value!r}")
    return cast(FailurePolicy, value)
