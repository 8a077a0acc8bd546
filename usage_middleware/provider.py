"""The provider contract every billing backend implements.

A provider answers ``can(customer, feature, units)`` and records usage with
``report(events)``. The middleware never calls those two directly on a request: it asks for
a :class:`~usage_middleware.models.Reservation` before the route runs and settles it exactly
once afterwards::

    reservation = await provider.reserve(customer, feature, units)   # before the route
    if not reservation.ok: ...                                        # 402 (or 503)
    await provider.prepare(reservation, units=n, overage="cap")  # the final 2xx body is next
    await provider.commit(reservation, units=n, overage="cap")   # ...and it was sent: charge
    await provider.release(reservation)   # ...or it was not (error, 4xx/5xx, disconnect)

``units`` is what the request actually used (``None``: the units reserved). Fewer than
reserved: the rest is given back. More: the excess is taken from what is left (limit, then
credits); when even that is not enough, ``overage`` decides: ``"cap"`` charges only what
was available, ``"charge"`` charges the actual anyway (the provider records the overage).
Every subclass that overrides ``prepare`` or ``commit`` must take both keywords: a class
that does not is refused when it is defined (so no provider can ignore the actual).

The defaults here build those on ``can``/``report``: ``reserve`` asks ``can`` and holds
nothing, ``commit`` reports the reservation's event, ``release`` does nothing. Ledgers
override all three with real holds so concurrent requests cannot overspend; remote
providers route ``commit`` through the durable outbox.

``FailurePolicy`` is ``Literal["open", "closed"]``: what a route does when the entitlement
check itself fails (provider down, timeout). ``"open"`` serves the request, records the
charge for later delivery and sets ``Answer.err``; ``"closed"`` refuses it with 503
problem+json and ``Retry-After``.

Lifecycle: a provider is an async context manager. ``open()`` runs inside the running event
loop (the ASGI lifespan, or lazily on the first request when the server sends no lifespan);
``aclose()`` drains and closes and is idempotent; a closed provider opens again with
``open()`` (test suites enter one app's lifespan many times, on different event loops), and
everything loop-bound (clients, tasks, locks) is made anew by the loop that opens it.
Nothing is started at import time or in ``__init__``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import enum
import inspect
from collections.abc import Awaitable, Callable, Sequence
from types import TracebackType
from typing import Literal, Protocol, Self

from asgiref.typing import HTTPScope

from .errors import ConfigurationError, PermanentProviderError
from .idempotency import KeyClaim, KeyClaims
from .models import Answer, Reservation, UsageEvent, check_units

__all__ = [
    "DeliverySink",
    "FailurePolicy",
    "Overage",
    "Provider",
    "ProviderState",
    "ReporterLike",
    "clobber_refused",
    "clobber_unsupported",
    "on_another_loop",
    "settle_units",
]


def on_another_loop(future: asyncio.Future[object] | asyncio.Task[object]) -> bool:
    """Whether ``future`` belongs to an event loop other than the running one.

    ``aclose()`` uses it to leave alone what a previous loop (now gone, e.g. one test's)
    left behind instead of awaiting it from this one.
    """
    return future.get_loop() is not asyncio.get_running_loop()


def clobber_refused(provider: object) -> ConfigurationError:
    """The error ``reserve(..., clobber=True)`` raises on a provider without
    :attr:`Provider.supports_clobber` (every provider says it the same way)."""
    return ConfigurationError(
        f"{type(provider).__name__} cannot set usage (clobber) on a request, only add to "
        "it: drop clobber=True or use a provider that sets usage (TierProvider); a ledger "
        "sets it outside a request with report([UsageEvent(..., clobber=True)])"
    )


def clobber_unsupported(name: str) -> PermanentProviderError:
    """The error a provider whose API only adds usage raises for a clobber event it is
    asked to deliver (permanent: no retry can set usage there)."""
    return PermanentProviderError(
        f"{name} cannot set usage (clobber): it only adds usage; report the difference "
        "as units instead",
        code="clobber_unsupported",
    )


#: A provider's ``failure_policy``: what a route does when the entitlement check itself
#: fails (provider down, timeout): ``"open"`` serves the request and records the charge for
#: later delivery, setting ``Answer.err``; ``"closed"`` refuses it with 503 problem+json and
#: ``Retry-After``. (``UsageMiddleware(on_provider_error=...)`` covers a provider that
#: raises instead of answering.)
FailurePolicy = Literal["open", "closed"]

#: What ``commit`` does with units used beyond the reservation that even the rest of the
#: budget (limit, then credits) cannot cover: ``"cap"`` charges only what was available
#: (the customer never goes past the budget; the seller absorbs the rest), ``"charge"``
#: charges the actual anyway (the provider records the overage). Per feature:
#: ``@metered(..., overage=...)``.
Overage = Literal["cap", "charge"]

#: The keyword arguments every ``prepare``/``commit`` must take (see the module docstring).
SETTLE_KEYWORDS: tuple[str, ...] = ("units", "overage")


def settle_units(reservation: Reservation, units: int | None) -> int:
    """The units a settlement is about: ``units`` checked (0 to MAX_UNITS), or the units
    reserved when ``None``.

    Raises:
        ValueError: ``units`` is not an int from 0 to ``MAX_UNITS``.
    """
    if units is None:
        return reservation.units
    return check_units(units, what="actual units", allow_zero=True)


def _check_settle_signature(cls: type, name: str) -> None:
    method = cls.__dict__.get(name)
    if method is None:
        return
    try:
        params = inspect.signature(method).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    missing = [k for k in SETTLE_KEYWORDS if k not in params]
    if missing:
        raise ConfigurationError(
            f"{cls.__qualname__}.{name}(reservation) must also take the keyword arguments "
            f"{', '.join(missing)} (the units the request actually used and the overage "
            f"policy): define {name}(self, reservation, *, units=None, overage='cap') and "
            "settle the actual units (see usage_middleware.provider)"
        )


class ProviderState(enum.Enum):
    """Where a provider is in its life: NEW, then OPEN, then CLOSED (``open()`` again: OPEN)."""

    NEW = "new"
    OPEN = "open"
    CLOSED = "closed"


class Provider:
    """Base class of billing providers (ledgers and remote APIs).

    Subclasses override :meth:`can` and :meth:`report`, and may override the reservation
    methods, :meth:`open` and :meth:`aclose` (calling ``super()``).

    Class attributes:
        max_batch: the most events one :meth:`report` call accepts; the reporter never sends
            more (Tier: 1; Spaire: many).
        name: a short name for logs and problem bodies (``"tier"``, ``"local"``).
    """

    max_batch: int = 1
    name: str = "provider"
    #: Whether :meth:`reserve` takes ``clobber=True`` (a charge that *sets* the period's
    #: usage, Tier's ``clobber``); ``@metered(..., clobber=True)`` is refused at start-up
    #: for a provider without it.
    supports_clobber: bool = False

    def __init_subclass__(cls, **kwargs: object) -> None:
        super().__init_subclass__(**kwargs)
        for name in ("prepare", "commit"):
            _check_settle_signature(cls, name)

    def __init__(self) -> None:
        self._state = ProviderState.NEW
        self._open_lock: asyncio.Lock | None = None
        self._open_lock_loop: asyncio.AbstractEventLoop | None = None
        #: The event loop the provider was last opened on (``None`` before).
        self.loop: asyncio.AbstractEventLoop | None = None

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def state(self) -> ProviderState:
        return self._state

    async def open(self) -> None:
        """Start what the provider needs inside the running event loop.

        Idempotent while open; a closed provider opens again.
        """
        self._state = ProviderState.OPEN
        self.loop = asyncio.get_running_loop()

    async def _open_once(self, start: Callable[[], Awaitable[None]]) -> None:
        """Run ``start`` (which ends by calling :meth:`Provider.open`) once per opening.

        For subclasses whose start-up awaits: concurrent callers wait for the first one,
        a call while open returns at once, and a closed provider starts again. Open on
        another event loop (one that ran before without closing it, e.g. a previous
        test's), it is closed and started again on the running loop.
        """
        loop = asyncio.get_running_loop()
        if self._state is ProviderState.OPEN and self.loop is loop:
            return
        if self._open_lock is None or self._open_lock_loop is not loop:
            self._open_lock, self._open_lock_loop = asyncio.Lock(), loop
        async with self._open_lock:
            if self.state is ProviderState.OPEN:
                if self.loop is loop:  # opened while we waited
                    return
                await self.aclose()  # open on a loop that is gone: move here
            await start()

    async def aclose(self) -> None:
        """Drain pending work and release resources. Idempotent."""
        self._state = ProviderState.CLOSED

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    # -- the two basic operations --------------------------------------------------------

    async def can(self, customer: str, feature: str, units: int = 1) -> Answer:
        """Whether ``customer`` may use ``units`` of ``feature`` now (holds nothing).

        Args:
            customer: customer id, e.g. ``"org:acme"``.
            feature: feature name, e.g. ``"feature:convert"``.
            units: whole units the request would use (> 0).

        Returns:
            an :class:`Answer`. A failed check is an Answer with ``err`` set, never an
            exception: ``ok`` then follows the provider's failure policy.
        """
        raise NotImplementedError

    async def report(self, events: Sequence[UsageEvent]) -> None:
        """Record usage events with the provider, at most :attr:`max_batch` per call.

        Raises:
            RetryableProviderError: the provider could not be reached or asked us to retry.
            PermanentProviderError: the provider rejected the events.
        """
        raise NotImplementedError

    # -- reservations (overridden by ledgers) ----------------------------------------------

    async def reserve(
        self,
        customer: str,
        feature: str,
        units: int = 1,
        *,
        scope: HTTPScope | None = None,
        clobber: bool = False,
    ) -> Reservation:
        """Check and hold ``units`` for one request.

        Args:
            customer, feature, units: as :meth:`can`.
            scope: the request's ASGI scope, for providers that act for the signed-in user
                (ARES reads the user's bearer token from it); ``None`` outside a request.
            clobber: the charge sets the period's usage to ``units`` instead of adding to
                it; only for providers with :attr:`supports_clobber`.

        Returns a :class:`Reservation` whose ``answer.ok`` says whether anything is held.
        The default asks :meth:`can` and holds nothing.
        """
        answer = await self.can(customer, feature, units)
        return Reservation(
            answer=answer, event=UsageEvent(customer, feature, units, clobber=clobber)
        )

    async def prepare(
        self, reservation: Reservation, *, units: int | None = None, overage: Overage = "cap"
    ) -> None:
        """Called just before the final 2xx body is sent; the charge is likely.

        ``units``/``overage``: as :meth:`commit`, which follows with the same values. A
        provider that must make the charge durable before the client can see the response
        does it here (and undoes it in :meth:`release`). Default: nothing.
        """

    async def commit(
        self, reservation: Reservation, *, units: int | None = None, overage: Overage = "cap"
    ) -> int:
        """Charge a reservation whose response succeeded. Called once per reservation.

        Args:
            units: the units the request actually used, 0 to ``MAX_UNITS`` (``None``: the
                units reserved). Fewer: the rest is given back; 0 charges nothing.
            overage: for units beyond the reservation that the rest of the budget cannot
                cover: ``"cap"`` charges what was available, ``"charge"`` the actual.

        Returns the units charged. The default reports an event of the actual units, asking
        :meth:`can` for an excess first under ``"cap"`` (the reserved units when refused).

        Raises:
            ValueError: ``units`` is not an int from 0 to ``MAX_UNITS``.
        """
        actual = settle_units(reservation, units)
        reservation.settled = True
        if actual > reservation.units and overage == "cap":
            answer = await self.can(
                reservation.customer, reservation.feature, actual - reservation.units
            )
            if not answer.ok:
                actual = reservation.units
        if actual == 0:
            return 0
        event = reservation.event
        if actual != event.units:
            event = dataclasses.replace(event, units=actual)
        await self.report([event])
        return actual

    async def release(self, reservation: Reservation) -> None:
        """Give back a reservation whose request did not succeed. Called once. Default: nothing."""
        reservation.settled = True

    # -- Idempotency-Key claims (see usage_middleware.idempotency) --------------------------

    async def claim_key(
        self, customer: str, route: str, key: str, *, fingerprint: str = ""
    ) -> KeyClaim:
        """Claim a request's ``Idempotency-Key`` for ``customer`` on ``route``, recording
        ``fingerprint`` (:func:`~usage_middleware.idempotency.body_fingerprint`).

        Returns ``"new"`` (meter the request; :meth:`finish_key` follows), ``"charged"``
        (a request with this key and fingerprint was charged within 24 hours: serve, do not
        charge), ``"busy"`` (one with this fingerprint is in flight: 409) or ``"mismatch"``
        (the key is charged or in flight for another fingerprint: 422). The default keeps
        claims in this process's memory; ledgers keep them in their own storage, shared by
        every process.
        """
        claims: KeyClaims | None = self.__dict__.get("_key_claims")
        if claims is None:
            claims = self.__dict__["_key_claims"] = KeyClaims()
        return claims.claim(customer, route, key, fingerprint)

    async def finish_key(
        self, customer: str, route: str, key: str, *, charged: bool, fingerprint: str = ""
    ) -> None:
        """End the claim of :meth:`claim_key`: keep the key (with ``fingerprint``) 24 hours
        if the request was ``charged``, else drop it (a retry is metered again)."""
        claims: KeyClaims | None = self.__dict__.get("_key_claims")
        if claims is not None:
            claims.finish(customer, route, key, charged=charged, fingerprint=fingerprint)


class DeliverySink(Protocol):
    """Where a :class:`~usage_middleware.delivery.Reporter` delivers usage events: a remote
    provider, or RedisLedger's own charge scripts (the outbox it keeps while Redis is down).

    ``report`` delivers at most ``max_batch`` events, raising ``RetryableProviderError``
    (try again), ``PermanentProviderError`` (rejected) or anything else (retried later).
    Optional attributes the Reporter reads: ``deduplicates`` (bool, default True: a resent
    event is counted once) and ``max_retry_after`` (seconds).
    """

    name: str
    max_batch: int

    async def report(self, events: Sequence[UsageEvent]) -> None: ...


class ReporterLike(Protocol):
    """What a remote provider needs of its delivery: the
    :class:`~usage_middleware.delivery.Reporter`'s request-side API (tests pass look-alikes)."""

    async def open(self) -> None: ...

    async def aclose(self) -> None: ...

    def enqueue(self, event: UsageEvent) -> None: ...

    async def prepare(self, event: UsageEvent) -> None: ...

    async def prepare_alone(self, event: UsageEvent) -> None:
        """:meth:`prepare` when no other prepare can join its group commit (one hold)."""

    def confirm(self, event: UsageEvent) -> None: ...

    async def cancel(self, event: UsageEvent) -> None: ...

    def stats(self) -> object: ...
