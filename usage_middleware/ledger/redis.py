"""The Redis ledger: one ledger shared by every replica of an app, on Redis.

:class:`RedisLedger` keeps plans, subscriptions, credits, usage periods and reservations in
Redis (``redis.asyncio``; install ``usage-middleware[redis]``), with the semantics of the
embedded :class:`~usage_middleware.ledger.LocalLedger` (see :mod:`.base`): a charge is taken
from the plan's allowance first, then from credits; ``reserve`` allows when
``max(0, limit - used) + max(0, credits) - held >= units``.

How a request is metered
------------------------

Each step is ONE atomic Lua script (``EVALSHA``, one round trip; the scripts and the key
layout are in :mod:`._redis_scripts`). Python never reads a number and writes it back:

* ``reserve`` drops the customer-feature's expired holds, reads the plan, usage and credits
  and, if the units are free, adds a hold: a member ``<units>:<id>`` of a sorted set scored
  by its expiry, ``reservation_ttl`` seconds ahead on the Redis server's clock. A replica
  that dies holding units leaks nothing: its holds expire. A live replica renews the holds
  of requests still running (a ten-minute stream) for as long as they run: each hold is
  renewed every ``reservation_ttl / 3`` seconds, all of them due at a tick in one
  pipeline (one script call per customer-feature). A hold is renewed until its
  reservation is settled, or garbage-collected unsettled (a caller that dropped it: the
  hold then expires). ``reservation_timeout``, if set, only logs holds unsettled longer.
* ``commit`` drops the hold and adds the units to the period's usage (the overage beyond
  the limit consumes credits), unless the event's idempotency key was charged before: the
  script sets a marker ``ik:<key>`` that lives ``idempotency_ttl`` seconds (default one day,
  as Stripe keeps idempotency keys). So a commit retried after a lost reply, or replayed
  from the spool, is charged once. ``report`` runs the same script per event.
* ``release`` drops the hold.
* A hold can still vanish under a running request: Redis lost it (a restart without
  persistence, a failover) or this replica could not renew it for ``reservation_ttl``
  (Redis unreachable from here, or the event loop stalled). Renewal notices this and logs
  it (WARNING); the request is still charged when it ends, since its response was served,
  and its commit is logged too. Meanwhile its units were free for other requests, so the
  customer may end beyond the limit by that request's units.

Every key of a script belongs to one customer and carries it as a hash tag
(``um:{org:acme}:usage``), so the scripts work on Redis Cluster (pass a ``RedisCluster``
as ``client``).

When Redis cannot be reached
----------------------------

A connection error or a timeout (``timeout`` seconds per command) opens a short breaker:
for ``retry_after`` seconds calls do not try Redis. Meanwhile:

* ``reserve``/``can`` answer with ``err`` set (a ``RetryableProviderError``) and, per
  ``failure_policy``, ``ok=True`` (``"open"``: serve; the charge is recorded later) or
  ``ok=False`` with ``retry_after`` (``"closed"``: the middleware answers 503).
* ``commit`` writes the event to an **outbox** (the ``spool`` file: the same durable
  SQLite outbox as a remote provider's, :mod:`usage_middleware.outbox`), whose
  :class:`~usage_middleware.delivery.Reporter` delivers it to Redis (the charge scripts)
  once Redis answers, with the same idempotency key: a charge is never lost
  and never applied twice. This holds for both policies: a request reserved before Redis
  went away and served is still charged. A served-open request of a customer Redis does
  not know ends in the spool's dead letters (``usage-middleware outbox ...``).
* ``release`` does nothing: the hold expires.

Trade-offs, stated plainly:

* **Crash window.** A process killed between sending a response and the commit's reply
  loses that charge (one round trip); its hold expires. Redis's own durability applies on
  top (``appendonly yes``; ``appendfsync everysec`` can lose a second of charges on a
  Redis crash, ``always`` loses none). A failover to an asynchronous replica can lose
  acknowledged writes.
* **Idempotency window.** A replay later than ``idempotency_ttl`` after a commit that did
  run (its reply lost) would charge again. Markers cost memory: about 100 bytes per charge
  kept for ``idempotency_ttl``.
* **Failing open** serves without a check: a customer may overspend by what is served
  while Redis is down; the replay records it (beyond the limit, the balance may go
  negative), as ``report`` does.
* **Clocks.** Periods follow this process's clock (``now``); hold expiry follows Redis's.
* **Round trips.** Every reserve and every commit is one round trip (~0.1 ms on loopback);
  there is no local lease, so there is no staleness and no parked units between replicas.

Pricing: the ``pricing`` given here is stored in Redis (``<prefix>pricing``) by
:meth:`RedisLedger.open`; a ledger built without ``pricing`` (another replica, the CLI)
uses the stored one and picks up a newer one within a second.
"""

from __future__ import annotations

import asyncio
import dataclasses
import functools
import hashlib
import logging
import os
import time
import urllib.parse
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final

from asgiref.typing import HTTPScope

from ..errors import (
    ConfigurationError,
    LedgerError,
    PermanentProviderError,
    ProviderError,
    RetryableProviderError,
    UsageMiddlewareError,
)
from ..idempotency import IN_FLIGHT_TTL, KEY_TTL, KeyClaim
from ..models import (
    UNLIMITED,
    Answer,
    Reservation,
    UsageEvent,
    check_customer,
    check_feature,
    check_units,
    trusted_event,
)
from ..pricing import (
    DEFAULT_INTERVAL,
    INTERVALS,
    Pricing,
    load_pricing,
    loads_pricing,
    period_bounds,
)
from ..provider import (
    FailurePolicy,
    Overage,
    ProviderState,
    clobber_refused,
    on_another_loop,
    settle_units,
)
from . import _redis_scripts as scripts
from .base import (
    REASON_CLOSED,
    REASON_FAILED,
    REASON_LIMIT,
    REASON_NOT_IN_PLAN,
    REASON_UNKNOWN,
    FeatureUsage,
    Ledger,
    usage_rows,
)
from .store import period_key

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster
    from redis.commands.core import AsyncScript

    from ..delivery import Reporter

__all__ = ["RedisLedger", "customer_keys"]

logger = logging.getLogger("usage_middleware.ledger")

DEFAULT_URL: Final = "redis://127.0.0.1:6379/0"
INSTALL_HINT: Final = "RedisLedger needs redis-py: install usage-middleware[redis]"

#: Reserves with a lost reply remembered at most (beyond: the oldest are left to expire).
_MAX_ORPHANS: Final = 100_000
_INTERVAL_INDEX: Final = {interval: index for index, interval in enumerate(INTERVALS, 1)}
_LOG_EVERY = 5.0  # seconds between repeated log lines about one kind of failure
_RECANCEL_EVERY = 0.5  # seconds between cancels of a task that swallowed one (see _stop)


class _BadReply(Exception):
    """Redis (or what answers in its place: a proxy, another server) replied with a shape
    the scripts never return. Treated as a Redis failure: spool, failure policy."""


def _script_reply(reply: object, size: int, what: str) -> list[Any]:
    """``reply`` as the list of ``size`` items a script returns; :class:`_BadReply` if not
    (a proxy answering ``+OK`` to everything, a wrong server)."""
    if not isinstance(reply, list) or len(reply) != size:
        raise _BadReply(f"unexpected reply to {what}: {reply!r:.100}")
    return reply


def _int(value: object, what: str) -> int:
    """A script's integer field (an int, or digits as text when clamped); else _BadReply."""
    if isinstance(value, bool):
        raise _BadReply(f"unexpected {what} in a Redis reply: {value!r:.50}")
    if isinstance(value, int):
        return value
    if isinstance(value, bytes | str):
        try:
            return int(value)
        except ValueError:
            pass
    raise _BadReply(f"unexpected {what} in a Redis reply: {value!r:.50}")


def customer_keys(prefix: str, customer: str) -> dict[str, str]:
    """The Redis keys of ``customer`` (one hash tag, so one Cluster slot), by role.

    ``holds`` is the prefix of the per-feature holds keys (``holds:<feature>``), ``ik``
    the prefix of the idempotency markers (``ik:<key>``). See :mod:`._redis_scripts`.
    """
    base = f"{prefix}{{{customer}}}:"
    return {
        "sub": base + "sub",
        "credits": base + "credits",
        "usage": base + "usage",
        "holds": base + "holds:",
        "ik": base + "ik:",
    }


def _marker(base: str, key: str) -> str:
    """The idempotency marker key of event key ``key`` under a customer's ``base``."""
    if "{" in key or "}" in key:  # keep the customer's hash tag and keys unambiguous
        return f"{base}ih:{hashlib.sha256(key.encode()).hexdigest()}"
    return f"{base}ik:{key}"


def _seconds(what: str, value: object, *, zero: bool = False) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, int | float)
        or value < 0
        or (value == 0 and not zero)
        or value != value  # NaN
    ):
        raise ConfigurationError(f"{what} must be a number of seconds > 0, got {value!r}")
    return float(value)


async def _stop(task: asyncio.Task[None]) -> None:
    """Cancel ``task`` and wait until it is done, cancelling again while it runs on.

    One ``cancel()`` is not enough: on Python 3.11, ``asyncio.wait_for`` (redis-py sends
    every command through it) swallows a cancellation that arrives as its call completes,
    and the task goes on as if never cancelled. Awaiting it then never returns.
    """
    while not task.done():
        task.cancel()
        await asyncio.wait((task,), timeout=_RECANCEL_EVERY)
    await asyncio.gather(task, return_exceptions=True)  # retrieve its outcome


class _RedisSink:
    """The sink of the ledger's outbox Reporter: the ledger's charge scripts."""

    name = "redis-spool"
    max_batch = 100

    def __init__(self, ledger: RedisLedger) -> None:
        self._ledger = ledger

    async def report(self, events: Sequence[UsageEvent]) -> None:
        await self._ledger._record(events)


class RedisLedger(Ledger):
    """A ledger in Redis, shared by every process and machine of an app.

    See the module docstring for the design, the failure policy and its trade-offs. Use
    one instance per event loop; it opens lazily on first use if :meth:`open` was not
    called.

    Args:
        url: ``redis://[[user]:[password]@]host:port/db`` (``rediss://`` for TLS,
            ``unix://`` for a socket); default the ``REDIS_URL`` environment variable, else
            ``redis://127.0.0.1:6379/0``. Ignored when ``client`` is given.
        pricing: a Tier pricing.json (path, decoded JSON or :class:`Pricing`); stored in
            Redis by :meth:`open` for ledgers created without one.
        prefix: prepended to every key (no ``{`` or ``}``), e.g. ``"um:"``.
        reservation_ttl: seconds a hold lives unless its process renews it.
        failure_policy: ``"closed"`` (refuse with 503 while Redis is unreachable) or
            ``"open"`` (serve; charge later from the spool).
        client: a ``redis.asyncio.Redis`` or ``RedisCluster`` to use (not closed by the
            ledger); default one built from ``url``.
        now: the clock for usage periods, returning an aware datetime; default UTC now.
        timeout: seconds to connect, to wait for a free pooled connection, and per
            command, for the client built from ``url``.
        max_connections: connections of that client's pool; more concurrent calls wait
            for one (up to ``timeout``).
        retry_after: seconds calls skip Redis after it was found unreachable (also the
            ``Retry-After`` of a failed-closed answer).
        idempotency_ttl: seconds an event's idempotency key is remembered.
        reservation_timeout: ``None`` (default), or seconds after which a hold still
            unsettled is logged (WARNING, once): a request that never ends, or a caller
            that never settles. The hold is renewed either way, as long as its
            reservation is unsettled and referenced.
        spool: the outbox file where charges wait while Redis is unreachable (shared by the
            processes of one machine; ``usage-middleware outbox --outbox FILE`` reads it);
            ``None`` loses such charges (logged).
        spool_options: keyword arguments for the outbox's
            :class:`~usage_middleware.delivery.Reporter` (e.g. ``retry_cooldown``).

    Raises:
        ConfigurationError: redis-py is not installed ("install usage-middleware[redis]"),
            the URL or prefix is malformed, ``failure_policy`` is unknown, or a number
            (of seconds, of connections) is out of range.
        PricingError: ``pricing`` does not validate.
    """

    name = "redis"

    def __init__(
        self,
        url: str | None = None,
        *,
        pricing: str | os.PathLike[str] | Mapping[str, Any] | Pricing | None = None,
        prefix: str = "um:",
        reservation_ttl: float = 30.0,
        failure_policy: FailurePolicy = "closed",
        client: Redis | RedisCluster | None = None,
        now: Callable[[], datetime] | None = None,
        timeout: float = 1.0,
        max_connections: int = 50,
        retry_after: float = 1.0,
        idempotency_ttl: float = 86400.0,
        reservation_timeout: float | None = None,
        spool: str | os.PathLike[str] | None = "usage-redis-spool.db",
        spool_options: Mapping[str, Any] | None = None,
    ) -> None:
        super().__init__()
        try:
            import redis.asyncio  # noqa: F401
        except ImportError as exc:
            raise ConfigurationError(INSTALL_HINT) from exc
        if failure_policy not in ("open", "closed"):
            raise ConfigurationError(
                "RedisLedger(failure_policy=...) must be 'open' or 'closed', "
                f"got {failure_policy!r}"
            )
        if not isinstance(prefix, str) or "{" in prefix or "}" in prefix:
            raise ConfigurationError(
                f"RedisLedger(prefix=...) must be a string without '{{' or '}}', got {prefix!r}"
            )
        if client is None:
            url = url or os.environ.get("REDIS_URL") or DEFAULT_URL
            scheme = urllib.parse.urlsplit(url).scheme
            if scheme not in ("redis", "rediss", "unix"):
                raise ConfigurationError(
                    "RedisLedger(url=...) must be a redis://, rediss:// or unix:// URL "
                    f"(scheme {scheme!r} given)"
                )
        self._url = url
        self._client_arg = client
        self._pricing = (
            pricing if pricing is None or isinstance(pricing, Pricing) else load_pricing(pricing)
        )
        self._pricing_given = pricing is not None
        self._prefix = prefix
        self._ttl_ms = int(_seconds("reservation_ttl", reservation_ttl) * 1000) or 1
        self._timeout = _seconds("timeout", timeout)
        self._max_connections = check_units(max_connections, what="max_connections", setting=True)
        self._retry_after = _seconds("retry_after", retry_after)
        self._idem_ms = int(_seconds("idempotency_ttl", idempotency_ttl) * 1000) or 1
        self._reservation_timeout = (
            None
            if reservation_timeout is None
            else _seconds("reservation_timeout", reservation_timeout)
        )
        self.failure_policy: FailurePolicy = failure_policy
        self._clock: Callable[[], datetime] = now or functools.partial(datetime.now, UTC)
        self._outbox_path = None if spool is None else os.fspath(spool)
        self._spool_options = dict(spool_options or {})
        self._tick = min(1.0, reservation_ttl / 3)
        # Set by open(), inside the running loop.
        self._client: Redis | RedisCluster | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._reporter: Reporter | None = None
        self._upkeep: asyncio.Task[None] | None = None
        self._unreachable: tuple[type[BaseException], ...] = ()
        self._redis_error: type[BaseException] = Exception
        # Event-loop state.
        self._pricing_json: str | None = None  # what Redis held when last read
        self._synced = False  # the pricing was stored in (or read from) Redis
        self._terms_cache: dict[tuple[str, int], bytes] = {}
        # Unsettled holds, weakly (a reservation dropped unsettled stops being renewed):
        # reservation -> (monotonic time held, time last renewed), oldest renewal first.
        self._outstanding: weakref.WeakKeyDictionary[Reservation, tuple[float, float]] = (
            weakref.WeakKeyDictionary()
        )
        self._lost: weakref.WeakSet[Reservation] = weakref.WeakSet()  # holds Redis lost
        # Reserves whose reply was lost (timeout, broken connection, cancel): Redis may
        # still run them when it resumes, leaving a hold nobody settles. (holds key, the
        # members it may have added: one per period the script could pick), released
        # once Redis answers again.
        self._orphans: list[tuple[str, tuple[str, ...]]] = []
        self._down_until = 0.0
        self._down_error: RetryableProviderError | None = None
        self._logged: dict[str, float] = {}

    # -- lifecycle -----------------------------------------------------------------------

    @property
    def spool(self) -> Reporter | None:
        """The :class:`~usage_middleware.delivery.Reporter` of the outbox (``spool`` file)
        that delivers charges Redis could not take, or ``None`` (after :meth:`open`)."""
        return self._reporter

    @property
    def client(self) -> Redis | RedisCluster | None:
        """The Redis client in use (after :meth:`open`)."""
        return self._client

    async def open(self) -> None:
        """Build the client, register the scripts, open the spool, sync the pricing.

        Idempotent while open. Redis being unreachable is not an error here (the failure
        policy applies to requests; the pricing is synced once Redis answers).

        Raises:
            ConfigurationError: the spool file cannot be opened. A closed ledger opens
                again (a new client and spool on the running loop).
        """
        await self._open_once(self._start)

    async def _start(self) -> None:
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        from ..delivery import Reporter

        self._unreachable = (RedisConnectionError, RedisTimeoutError, OSError)
        self._redis_error = RedisError
        client = self._client_arg
        if client is None:
            assert self._url is not None
            pool = aioredis.BlockingConnectionPool.from_url(
                self._url,
                max_connections=self._max_connections,
                timeout=self._timeout,  # waiting for a free connection
                socket_timeout=self._timeout,
                socket_connect_timeout=self._timeout,
                # One immediate retry on a broken connection (a pooled socket that
                # died with a Redis restart); none on a timeout. Every script is
                # idempotent, so a retry never holds or charges twice.
                retry=Retry(NoBackoff(), 1, (RedisConnectionError,)),
            )
            client = aioredis.Redis.from_pool(pool)
        self._scripts = {
            name: client.register_script(getattr(scripts, name))
            for name in ("RESERVE", "CHARGE", "RELEASE", "RENEW", "GRANT", "USAGE")
        }
        reporter = None
        if self._outbox_path is not None:
            reporter = Reporter(_RedisSink(self), path=self._outbox_path, **self._spool_options)
            try:
                await reporter.open()
            except BaseException:
                if self._client_arg is None:
                    await client.aclose()
                raise
        self._client, self._reporter = client, reporter
        await super().open()
        try:
            await self._sync_pricing()
        except ConfigurationError:  # the pricing would cut customers off: refuse to start
            await self.aclose()
            raise
        except Exception as exc:  # retried by the upkeep task and on first use
            if isinstance(exc, self._unreachable):
                self._trip(exc)
            else:
                logger.exception("redis ledger: reading or storing the pricing failed")
        self._upkeep = asyncio.get_running_loop().create_task(
            self._upkeep_loop(), name="usage-redis-ledger-upkeep"
        )

    async def aclose(self) -> None:
        """Stop renewing holds, drain the spool (up to its ``drain_timeout``), close the
        client it built. Idempotent. Unsettled holds expire by themselves."""
        was_open = self._state is ProviderState.OPEN
        await super().aclose()
        if not was_open:
            return
        upkeep, self._upkeep = self._upkeep, None  # the loop stops when it sees this
        lost_loop = upkeep is not None and on_another_loop(upkeep)
        if upkeep is not None and not lost_loop:
            await _stop(upkeep)
        try:
            if self._reporter is not None:
                await self._reporter.aclose()
        finally:
            if self._client_arg is None and self._client is not None:
                try:
                    await self._client.aclose()
                except Exception:  # its connections belong to a loop that is gone
                    if not lost_loop:
                        raise
                    logger.debug("redis ledger: closing the old loop's client", exc_info=True)
            if self._client_arg is None:
                self._client = None
            self._reporter = None

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
        """Check and hold ``units`` of ``feature`` for ``customer`` (one script call).

        The answer's numbers are Redis's at that moment: ``limit`` (``UNLIMITED``; 0 outside
        the plan), ``used`` (units charged this period), ``remaining`` (what is left after
        this hold and every other live hold). While Redis is unreachable the answer has
        ``err`` set and follows ``failure_policy``.

        Raises:
            ValueError: malformed customer id or units.
            ConfigurationError: malformed feature name.
        """
        if clobber:
            raise clobber_refused(self)
        return await self._check(customer, feature, units, hold=True)

    async def can(self, customer: str, feature: str, units: int = 1) -> Answer:
        """Whether ``customer`` may use ``units`` of ``feature`` now. Holds nothing.

        Numbers and errors as :meth:`reserve`.
        """
        return (await self._check(customer, feature, units, hold=False)).answer

    async def prepare(
        self, reservation: Reservation, *, units: int | None = None, overage: Overage = "cap"
    ) -> None:
        """Nothing: :meth:`commit` charges in one script call."""

    async def commit(
        self, reservation: Reservation, *, units: int | None = None, overage: Overage = "cap"
    ) -> int:
        """Charge a reservation its actual ``units`` (one script call); once per reservation
        and event key. Returns the units charged.

        ``units`` (``None``: the units reserved) below the hold charges the actual and
        drops the hold (the rest is free again); 0 releases it. Above the hold: this
        ledger does not lease, so ``overage="cap"`` charges the hold's units and
        ``"charge"`` the actual (written beyond the limit, consuming credits).
        When Redis is unreachable (or the call is cancelled) the event goes to the spool
        and is charged when Redis answers again. Settling twice, or a refused
        reservation, does nothing. Never raises for Redis errors.

        Raises:
            ValueError: ``units`` is not an int from 0 to ``MAX_UNITS``.
        """
        if reservation.settled:
            return 0
        actual = settle_units(reservation, units)
        if not reservation.ok:
            reservation.settled = True
            return 0
        if actual > reservation.units and overage == "cap":
            actual = reservation.units
        if actual == 0:
            await self.release(reservation)
            return 0
        reservation.settled = True
        await self._commit_units(reservation, actual)
        return actual

    async def _commit_units(self, reservation: Reservation, actual: int) -> None:
        self._forget(reservation, charged=True)
        event = reservation.event
        if actual != event.units:
            event = dataclasses.replace(event, units=actual)
        if time.monotonic() < self._down_until:
            self._to_outbox(event, "redis is unreachable")
            return
        try:
            reply = _script_reply(await self._charge(event, reservation.token), 3, "charge")
            status = _int(reply[0], "status")
        except asyncio.CancelledError:
            self._to_outbox(event, "the commit was cancelled")
            raise
        except Exception as exc:
            if not self._failed(exc, "commit"):
                raise
            self._to_outbox(event, "the commit failed")
            return
        if status < 0:
            self._to_outbox(event, "redis does not know the customer")

    async def release(self, reservation: Reservation) -> None:
        """Give a reservation's hold back (one script call). Once only.

        When Redis is unreachable the hold simply expires (``reservation_ttl``).
        """
        if reservation.settled:
            return
        reservation.settled = True
        token = reservation.token
        if not reservation.ok or token is None:
            return
        self._forget(reservation, charged=False)
        if time.monotonic() < self._down_until:
            return
        holds, member = token
        try:
            await self._scripts["RELEASE"](keys=[holds], args=[member])
        except Exception as exc:
            if not self._failed(exc, "release"):
                raise

    # -- admin ---------------------------------------------------------------------------

    async def report(self, events: Sequence[UsageEvent]) -> None:
        """Record usage events; they are in Redis when this returns.

        An event whose ``idempotency_key`` was charged within ``idempotency_ttl`` is
        ignored; ``clobber`` sets the period's ``used`` to ``units``. This bypasses holds
        and may go beyond the limit (the overage consumes credits).

        Raises:
            PermanentProviderError: an event's customer is unknown (checked before anything
                is recorded; ``code="unknown_customer"``).
            RetryableProviderError: Redis is unreachable or failed.
        """
        await self._opened()
        await self._record(events)

    async def subscribe(self, customer: str, plan: str) -> None:
        """Put ``customer`` on ``plan``, replacing any earlier plan.

        Raises:
            LedgerError: the plan is not in the pricing (the message lists the known plans),
                or no pricing was ever given.
            ValueError: malformed customer id.
            RetryableProviderError: Redis is unreachable or failed.
        """
        check_customer(customer)
        client = await self._opened()
        await self._ready_pricing()
        if self._pricing is None:
            raise LedgerError(
                f"cannot subscribe {customer!r} to {plan!r}: the ledger has no pricing; "
                "pass pricing='pricing.json' to RedisLedger once"
            )
        if plan not in self._pricing.plans:
            known = ", ".join(sorted(self._pricing.plans)) or "none"
            raise LedgerError(f"unknown plan {plan!r}; known plans: {known}")
        since = self._clock().astimezone(UTC).isoformat()
        key = customer_keys(self._prefix, customer)["sub"]
        await self._admin(client.hset(key, mapping={"plan": plan, "since": since}))

    async def grant(self, customer: str, feature: str, units: int) -> int:
        """Credit ``units`` (> 0) of ``feature`` to ``customer``; return the new balance.

        Raises:
            ValueError: units is not a whole number > 0, or a malformed customer id.
            ConfigurationError: malformed feature name.
            RetryableProviderError: Redis is unreachable or failed.
        """
        check_customer(customer)
        check_feature(feature)
        check_units(units)
        await self._opened()
        key = customer_keys(self._prefix, customer)["credits"]
        credited, consumed = await self._admin(
            self._scripts["GRANT"](keys=[key], args=[feature, units])
        )
        return int(credited) - int(consumed)

    async def usage(self, customer: str) -> list[FeatureUsage]:
        """The customer's standing per feature this period, sorted by feature name.

        Raises:
            LedgerError: the customer is unknown (no subscription and no credits).
            RetryableProviderError: Redis is unreachable or failed.
        """
        check_customer(customer)
        await self._opened()
        await self._ready_pricing()
        names = customer_keys(self._prefix, customer)
        plan_raw, credit_list, usage_list = await self._admin(
            self._scripts["USAGE"](keys=[names["sub"], names["credits"], names["usage"]])
        )
        if plan_raw is None and not credit_list:
            raise LedgerError(
                f"unknown customer {customer!r}: it has no subscription and no credits"
            )
        plan = None
        if plan_raw is not None:
            plan_name = plan_raw.decode()
            plan = None if self._pricing is None else self._pricing.plans.get(plan_name)
            if plan is None:
                logger.warning(
                    "customer %s is on plan %s, which the pricing lacks", customer, plan_name
                )
        start, end = period_bounds(
            DEFAULT_INTERVAL if plan is None else plan.interval, self._clock()
        )
        period = period_key(start, end)
        credits: dict[str, int] = {}
        for field, value in zip(credit_list[::2], credit_list[1::2], strict=True):
            name = field.decode()
            sign = 1 if name[0] == "+" else -1
            credits[name[1:]] = credits.get(name[1:], 0) + sign * int(value)
        used: dict[str, int] = {}
        suffix = "@" + period
        for field, value in zip(usage_list[::2], usage_list[1::2], strict=True):
            name = field.decode()
            if name.endswith(suffix):
                used[name[: -len(suffix)]] = int(value)
        return usage_rows(plan, credits, used, start, end)

    # -- internals: checking -------------------------------------------------------------

    async def _check(self, customer: str, feature: str, units: int, *, hold: bool) -> Reservation:
        check_customer(customer)
        check_feature(feature)
        check_units(units)
        at = self._clock()
        if at.tzinfo is not UTC:
            if at.utcoffset() is None:
                raise ConfigurationError(
                    f"RedisLedger(now=...) must return aware datetimes, got {at!r}"
                )
            at = at.astimezone(UTC)
        event = trusted_event(customer, feature, units, at)
        if self._state is not ProviderState.OPEN:
            if self._state is ProviderState.NEW:
                await self.open()
            if self._state is ProviderState.CLOSED:
                closed = ConfigurationError(f"{type(self).__name__} is closed")
                answer = Answer(
                    False, customer, feature, units, err=closed, reason=REASON_CLOSED,
                    retry_after=self._retry_after, provider=self,
                )  # fmt: skip
                return Reservation(answer, event)
        t = time.monotonic()
        if t < self._down_until:
            return self._unavailable(event, self._down_error, self._down_until - t)
        base = f"{self._prefix}{{{customer}}}:"
        holds = f"{base}holds:{feature}"
        terms = self._terms(feature, at)
        sent = False
        try:
            if not self._synced and not self._pricing_given:
                await self._sync_pricing()
            if self._orphans:
                await self._release_orphans()
            sent = hold
            result = await self._scripts["RESERVE"](
                keys=[base + "sub", base + "credits", base + "usage", holds],
                args=[feature, units, event.idempotency_key if hold else "", self._ttl_ms, terms],
            )  # fmt: skip
            sent = False
            status, limit, used, balance, held, period, in_plan = _script_reply(
                result, 7, "the reserve script"
            )
            status, limit, held = _int(status, "status"), _int(limit, "limit"), _int(held, "held")
            # used and balance come as text when clamped at 2**63-1 (see scripts)
            used, balance = _int(used, "used"), _int(balance, "balance")
            if not isinstance(period, bytes | str):
                raise _BadReply(f"unexpected period in a Redis reply: {period!r:.50}")
        except BaseException as exc:
            if sent:  # Redis may run it yet (or did, and the reply was lost)
                self._orphan(holds, units, terms, event.idempotency_key)
            if not isinstance(exc, Exception) or not self._failed(exc, "reserve"):
                raise
            if isinstance(exc, self._unreachable):
                return self._unavailable(event, self._down_error, None)
            error = RetryableProviderError(
                f"the Redis ledger failed: {exc!r}",
                retry_after=self._retry_after,
                original_error=exc,
            )
            return self._unavailable(event, error, None)
        if status < 0:
            answer = Answer(
                False, customer, feature, units, 0, 0, 0, reason=REASON_UNKNOWN, provider=self
            )
            return Reservation(answer, event)
        ok = status == 1
        if limit < 0:
            limit = remaining = UNLIMITED
        else:
            remaining = max(0, max(0, limit - used) + max(0, balance) - held)
        reason = None if ok else (REASON_LIMIT if in_plan else REASON_NOT_IN_PLAN)
        answer = Answer(
            ok, customer, feature, units, limit, used, remaining, reason=reason, provider=self
        )
        if not (ok and hold) or limit == UNLIMITED:
            return Reservation(answer, event)
        period = period.decode() if isinstance(period, bytes) else period
        member = f"{units}:{period}:{event.idempotency_key}"
        reservation = Reservation(answer, event, (holds, member))
        self._outstanding[reservation] = (t, t)
        return reservation

    def _orphan(self, holds: str, units: int, terms: bytes, key: str) -> None:
        """Remember a reserve whose reply was lost, to release its hold when Redis is back.

        The period in the hold's member is the script's choice (by the customer's plan):
        every period it could pick is listed (releasing an absent member does nothing).
        """
        if len(self._orphans) >= _MAX_ORPHANS:
            self._log_once(
                "orphans", logging.WARNING,
                "redis ledger: over %d reserves lost their reply; the oldest holds are "
                "left to expire after reservation_ttl", _MAX_ORPHANS,
            )  # fmt: skip
            del self._orphans[: _MAX_ORPHANS // 10]
        periods = terms.decode().split("\n")[: len(INTERVALS)]
        members = tuple(dict.fromkeys(f"{units}:{period}:{key}" for period in periods))
        self._orphans.append((holds, members))

    async def _release_orphans(self) -> None:
        """Release the holds reserves with a lost reply may have left (one pipeline)."""
        orphans, self._orphans = self._orphans, []
        if not orphans:
            return
        assert self._client is not None
        try:
            pipeline: Any = self._client.pipeline(transaction=False)
            async with pipeline as pipe:
                for holds, members in orphans:
                    for member in members:
                        await self._scripts["RELEASE"](keys=[holds], args=[member], client=pipe)
                results = await pipe.execute()
        except BaseException:
            self._orphans[:0] = orphans  # Redis is still away: next time
            raise
        freed = sum(1 for r in results if r == 1)
        logger.info(
            "redis ledger: released %d holds left by %d reserves whose reply was lost",
            freed,
            len(orphans),
        )

    def _unavailable(
        self, event: UsageEvent, error: RetryableProviderError | None, wait: float | None
    ) -> Reservation:
        """The answer while Redis cannot answer: per ``failure_policy``, nothing held."""
        if error is None:
            error = RetryableProviderError(
                "the Redis ledger could not be reached", retry_after=self._retry_after
            )
        answer = Answer(
            self.failure_policy == "open",
            event.customer,
            event.feature,
            event.units,
            err=error,
            reason=REASON_FAILED,
            retry_after=self._retry_after if wait is None else max(wait, 0.001),
            provider=self,
        )
        return Reservation(answer, event)

    def _terms(self, feature: str, at: datetime) -> bytes:
        """The script's terms argument for ``feature`` at ``at`` (see :mod:`._redis_scripts`):
        the period keys of ``at``, then ``plan, limit, interval`` of every plan. Cached per
        feature and UTC day."""
        day = at.toordinal() if at.tzinfo is UTC else at.astimezone(UTC).toordinal()
        cached = self._terms_cache.get((feature, day))
        if cached is not None:
            return cached
        lines = [period_key(*period_bounds(interval, at)) for interval in INTERVALS]
        if self._pricing is not None:
            for plan in self._pricing.plans.values():
                plan_feature = plan.features.get(feature)
                if plan_feature is None:
                    limit = ""
                else:
                    limit = "-1" if plan_feature.unlimited else str(plan_feature.limit)
                lines += (plan.name, limit, str(_INTERVAL_INDEX[plan.interval]))
        if len(self._terms_cache) >= 10_000:
            self._terms_cache.clear()
        terms = self._terms_cache[feature, day] = "\n".join(lines).encode()
        return terms

    # -- internals: charging ---------------------------------------------------------------

    def _charge(
        self, event: UsageEvent, token: tuple[str, str] | None = None, client: Any = None
    ) -> Any:
        """Run the charge script for ``event`` (on ``client``, e.g. a pipeline).

        ``token`` is the reservation's (holds key, member); without it the script drops
        the hold such an event's reservation would have made, if any.
        """
        base = f"{self._prefix}{{{event.customer}}}:"
        return self._scripts["CHARGE"](
            keys=[
                base + "sub", base + "credits", base + "usage",
                f"{base}holds:{event.feature}", _marker(base, event.idempotency_key),
            ],
            args=[
                event.feature, event.units, "1" if event.clobber else "0",
                "" if token is None else token[1], event.idempotency_key, self._idem_ms,
                self._terms(event.feature, event.at),
            ],
            client=client,
        )  # fmt: skip

    async def _record(self, events: Sequence[UsageEvent]) -> None:
        """Charge ``events`` (pipelined charge scripts); the raw path of report and spool."""
        if not events:
            return
        client = self._client
        if client is None:
            raise RetryableProviderError("the Redis ledger is not open")
        try:
            if not self._synced and not self._pricing_given:
                await self._sync_pricing()
            customers = sorted({event.customer for event in events})
            # Pipelines in ``async with``: one cancelled in execute() (its SCRIPT EXISTS
            # comes before redis-py's own cleanup) still gives its connection back.
            async with client.pipeline(transaction=False) as check:
                for customer in customers:
                    names = customer_keys(self._prefix, customer)
                    check.exists(names["sub"], names["credits"])
                exists = await check.execute()
            if not isinstance(exists, list) or len(exists) != len(customers):
                raise _BadReply(f"unexpected reply to EXISTS: {exists!r:.100}")
            unknown = [c for c, n in zip(customers, exists, strict=True) if not _int(n, "count")]
            if unknown:
                raise PermanentProviderError(
                    f"unknown customer {unknown[0]!r}: subscribe it to a plan or grant it "
                    "credits before reporting usage",
                    code="unknown_customer",
                )
            async with client.pipeline(transaction=False) as pipe:
                for event in events:
                    await self._charge(event, None, pipe)
                replies = await pipe.execute()
            if not isinstance(replies, list) or len(replies) != len(events):
                raise _BadReply(f"unexpected reply to the charge pipeline: {replies!r:.100}")
            statuses = [_int(_script_reply(r, 3, "charge")[0], "status") for r in replies]
            self._down_until = 0.0  # Redis answers again
        except self._unreachable as exc:
            self._trip(exc)
            raise RetryableProviderError(
                f"the Redis ledger could not be reached: {exc}", original_error=exc
            ) from exc
        except ProviderError:
            raise
        except Exception as exc:  # RedisError, or a reply of the wrong shape (see _failed)
            self._log_once("record", logging.ERROR, "redis ledger: charging failed: %r", exc)
            raise RetryableProviderError(
                f"the Redis ledger failed: {exc}", original_error=exc
            ) from exc
        for event, status in zip(events, statuses, strict=True):
            if status < 0:
                raise PermanentProviderError(
                    f"unknown customer {event.customer!r}", code="unknown_customer"
                )

    def _to_outbox(self, event: UsageEvent, why: str) -> None:
        reporter = self._reporter
        if reporter is None:
            logger.error(
                "redis ledger: %s and there is no spool; charge of %d units of %s for %s lost",
                why, event.units, event.feature, event.customer,
            )  # fmt: skip
            return
        self._log_once(
            "spool", logging.WARNING, "redis ledger: %s; charges go to %s", why, reporter.path
        )
        reporter.enqueue(event)

    # -- internals: failures ---------------------------------------------------------------

    def _failed(self, exc: BaseException, what: str) -> bool:
        """Note a failed Redis call; False if ``exc`` is not a Redis failure (re-raise it)."""
        if isinstance(exc, self._unreachable):
            self._trip(exc)
            return True
        if isinstance(exc, UsageMiddlewareError):
            return False  # ours, on purpose (a closed ledger, a bad pricing)
        # A RedisError, or what redis-py raises on a reply of the wrong shape (a proxy or
        # another server answering +OK: AttributeError, TypeError, ValueError...): either
        # way Redis did not do its part. Spool / failure policy, never a lost charge.
        self._log_once(what, logging.ERROR, "redis ledger: %s failed: %r", what, exc)
        return True

    def _trip(self, exc: BaseException) -> None:
        """Redis is unreachable: skip it for ``retry_after`` seconds."""
        t = time.monotonic()
        if t >= self._down_until:
            logger.warning(
                "redis ledger: Redis is unreachable (%s); %s for %.1fs",
                exc,
                "serving without checks" if self.failure_policy == "open" else "refusing (503)",
                self._retry_after,
            )
        self._down_until = t + self._retry_after
        self._down_error = RetryableProviderError(
            f"the Redis ledger could not be reached: {exc}",
            retry_after=self._retry_after,
            original_error=exc,
        )

    def _log_once(self, kind: str, level: int, message: str, *args: object) -> None:
        t = time.monotonic()
        if t - self._logged.get(kind, -_LOG_EVERY) >= _LOG_EVERY:
            self._logged[kind] = t
            logger.log(level, message, *args)

    async def _admin(self, call: Any) -> Any:
        """Await an admin call; Redis failures become ``RetryableProviderError``."""
        try:
            result = await call
        except self._unreachable as exc:
            self._trip(exc)
            raise RetryableProviderError(
                f"the Redis ledger could not be reached: {exc}", original_error=exc
            ) from exc
        except UsageMiddlewareError:
            raise
        except Exception as exc:  # RedisError, or a reply of the wrong shape (see _failed)
            raise RetryableProviderError(
                f"the Redis ledger failed: {exc!r}", original_error=exc
            ) from exc
        self._down_until = 0.0  # Redis answers again
        return result

    async def _opened(self) -> Redis | RedisCluster:
        if self._state is ProviderState.NEW:
            await self.open()
        if self._state is ProviderState.CLOSED or self._client is None:
            raise ConfigurationError(f"{type(self).__name__} is closed; create a new one")
        return self._client

    # -- Idempotency-Key claims (see usage_middleware.idempotency) --------------------------

    def _claim_name(self, customer: str, route: str, key: str) -> str:
        digest = hashlib.sha256(f"{route}\n{key}".encode()).hexdigest()
        return f"{self._prefix}{{{customer}}}:rk:{digest}"

    async def claim_key(self, customer: str, route: str, key: str) -> KeyClaim:
        """Claim an ``Idempotency-Key`` with ``SET NX`` (in flight: ``IN_FLIGHT_TTL``).

        Raises:
            RetryableProviderError: Redis could not be reached.
        """
        client = await self._opened()
        name = self._claim_name(customer, route, key)
        for _ in range(3):  # a claim that expires between SET NX and GET: claim again
            if await self._admin(client.set(name, b"0", nx=True, px=int(IN_FLIGHT_TTL * 1000))):
                return "new"
            value = await self._admin(client.get(name))
            if value is not None:
                return "charged" if value in (b"1", "1") else "busy"
        return "busy"

    async def finish_key(self, customer: str, route: str, key: str, *, charged: bool) -> None:
        """Keep the key ``KEY_TTL`` (24 h) when ``charged``, else delete the claim."""
        client = await self._opened()
        name = self._claim_name(customer, route, key)
        if charged:
            await self._admin(client.set(name, b"1", px=int(KEY_TTL * 1000)))
        else:
            await self._admin(client.delete(name))

    # -- internals: pricing and upkeep -----------------------------------------------------

    async def _ready_pricing(self) -> None:
        if not self._synced and not self._pricing_given:
            await self._admin(self._sync_pricing())

    async def _sync_pricing(self) -> None:
        """Store the given pricing in Redis, or read (a newer) one stored there."""
        client = self._client
        assert client is not None
        key = f"{self._prefix}pricing"
        if self._pricing_given:
            if not self._synced:
                assert self._pricing is not None
                await self._refuse_dropped_plans(key, self._pricing)
                await client.set(key, self._pricing.to_json())
                self._synced = True
            return
        raw = await client.get(key)
        text = raw if raw is None or isinstance(raw, str) else raw.decode()
        if text != self._pricing_json or not self._synced:
            self._pricing = None if text is None else loads_pricing(text, origin="stored pricing")
            self._pricing_json = text
            self._terms_cache.clear()
        self._synced = True

    async def _refuse_dropped_plans(self, key: str, pricing: Pricing) -> None:
        """Raise ``ConfigurationError`` if ``pricing`` drops a stored plan customers are on.

        Like the SQLite ledger: replacing the pricing must not silently cut off paying
        customers. Scans the subscription keys (``SCAN``, once, when the pricing changes).
        """
        client = self._client
        assert client is not None
        raw = await client.get(key)
        if raw is None:
            return
        stored = loads_pricing(raw if isinstance(raw, str) else raw.decode(), origin="stored")
        dropped = set(stored.plans) - set(pricing.plans)
        if not dropped:
            return
        counts: dict[str, int] = {}
        async for sub_key in client.scan_iter(match=f"{self._prefix}{{*}}:sub", count=1000):
            plan = await client.hget(sub_key, "plan")
            name = plan if plan is None or isinstance(plan, str) else plan.decode()
            if name in dropped:
                counts[name] = counts.get(name, 0) + 1
        if counts:
            listed = ", ".join(f"{plan} ({n} customers)" for plan, n in sorted(counts.items()))
            raise ConfigurationError(
                f"the new pricing drops plans customers are still on: {listed}. Keep those "
                "plans in the pricing, or move the customers first: load a pricing with both "
                "the old and the new plans, subscribe each customer to a new plan, then load "
                "the pricing without the old plan"
            )

    async def _upkeep_loop(self) -> None:
        """Every tick: renew the holds of running requests, sync the pricing. Returns once
        :meth:`aclose` (or a reopen) took the task off ``_upkeep``."""
        me = asyncio.current_task()
        while self._upkeep is me:
            await asyncio.sleep(self._tick)
            if self._upkeep is not me:
                return
            if time.monotonic() < self._down_until:
                continue
            try:
                if self._orphans:
                    await self._release_orphans()
                await self._renew()
                if not self._synced or not self._pricing_given:
                    await self._sync_pricing()
            except Exception as exc:
                if not self._failed(exc, "upkeep"):
                    logger.exception("redis ledger: upkeep failed")

    async def _renew(self) -> None:
        """Renew the holds due (last renewed ``reservation_ttl / 3`` ago): one pipeline."""
        t = time.monotonic()
        due = t - self._ttl_ms / 3000
        members: dict[str, list[str]] = {}
        renewing: dict[tuple[str, str], Reservation] = {}
        old = []
        timeout = self._reservation_timeout
        for reservation, (since, renewed) in self._outstanding.items():
            if renewed > due:
                break  # oldest renewal first: the rest are not due
            holds, member = reservation.token
            members.setdefault(holds, []).append(member)
            renewing[holds, member] = reservation
            if timeout is not None and renewed - since < timeout <= t - since:
                old.append(reservation)
        if old:
            logger.warning(
                "redis ledger: %d holds unsettled after %ss (first: %s %s x%d); they are "
                "renewed until settled",
                len(old), timeout, old[0].customer, old[0].feature, old[0].units,
            )  # fmt: skip
        if not members:
            return
        assert self._client is not None
        pipeline: Any = self._client.pipeline(transaction=False)
        async with pipeline as pipe:  # gives its connection back even if cancelled (_record)
            for holds, held in members.items():
                await self._scripts["RENEW"](keys=[holds], args=[self._ttl_ms, *held], client=pipe)
            results = await pipe.execute()
        if (
            not isinstance(results, list)
            or len(results) != len(members)
            or not all(isinstance(gone, list) for gone in results)
        ):
            raise _BadReply(f"unexpected reply to RENEW: {results!r:.100}")
        lost = []
        for holds, gone in zip(members, results, strict=True):
            for member in gone:
                name = member if isinstance(member, str) else member.decode()
                gone_one = renewing.pop((holds, name), None)
                if gone_one is not None:
                    lost.append(gone_one)
        for reservation in renewing.values():  # renewed: move to the end (newest renewal)
            entry = self._outstanding.pop(reservation, None)
            if entry is not None:
                self._outstanding[reservation] = (entry[0], t)
        # Settled while the pipeline ran (its commit dropped the hold): not lost.
        lost = [r for r in lost if self._outstanding.pop(r, None) is not None]
        for reservation in lost:
            self._lost.add(reservation)
        if lost:
            logger.warning(
                "redis ledger: %d holds of running requests were gone from Redis when "
                "renewed (first: %s %s x%d): Redis lost them, or they were not renewed "
                "for reservation_ttl; their units may have gone to other requests",
                len(lost), lost[0].customer, lost[0].feature, lost[0].units,
            )  # fmt: skip

    def _forget(self, reservation: Reservation, *, charged: bool) -> None:
        """Stop renewing a settled reservation's hold; log a charge whose hold was lost."""
        self._outstanding.pop(reservation, None)
        if reservation in self._lost:
            self._lost.discard(reservation)
            if charged:
                logger.warning(
                    "redis ledger: charging %s %s x%d although its hold was lost while the "
                    "request ran (the response was served); the usage may exceed the limit",
                    reservation.customer, reservation.feature, reservation.units,
                )  # fmt: skip
