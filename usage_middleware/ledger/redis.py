"""The Redis ledger: one ledger shared by every replica of an app, on Redis.

:class:`RedisLedger` keeps plans, subscriptions, credits, usage periods and leases in Redis
(``redis.asyncio``; install ``usage-middleware[redis]``), with the semantics of the
embedded :class:`~usage_middleware.ledger.LocalLedger` (see :mod:`.base`): a charge is taken
from the plan's allowance first, then from credits; a request is allowed when
``max(0, limit - used) + max(0, credits) - leased elsewhere >= units``.

How a request is metered
------------------------

The same lease engine as :class:`~usage_middleware.ledger.LocalLedger`
(:mod:`.engine`; ``docs/architecture.md``, "The embedded ledger"), with Redis as its
store. Each store call is ONE atomic Lua script per customer (pipelined across customers;
the scripts and the key layout are in :mod:`._redis_scripts`):

* **Leases.** A process takes units for a (customer, feature, period) in blocks: the lease
  script grants ``n`` only if every live lease of every process on every machine plus
  ``n`` fits in ``max(0, limit - used) + credits``; the block is ``min(block, free // 4)``,
  at least what the request needs (near the limit, a quarter of what is left). Each
  process's lease is a record (its owner id, units, expiry on the Redis server's clock)
  that lives ``reservation_ttl`` seconds unless renewed: a live process renews its
  records once a tick (one pipeline), a dead process's units come back after the TTL.
* ``reserve``/``release`` are served from the lease in memory: **no Redis round trip on a
  warm request**. A request that needs a lease waits for one script call (single-flight
  per customer feature); a refusal is remembered a quarter of a second.
* ``commit`` queues the charge in memory. Every ``flush_interval`` (5 ms) one pipeline
  carries all pending charges, one script call per customer: it adds the units to the
  period's usage (the overage beyond the limit consumes credits), takes them off this
  process's lease, and is idempotent per group commit: a marker ``<batch>`` in the
  customer's ``gc`` hash (kept ``idempotency_ttl``; each group commit deletes this
  process's earlier markers whose reply arrived), so memory grows per group commit at
  most, never per request.
* Another replica's admin writes (``subscribe``, ``grant``, ``report``) and pricing
  changes reach this process's leases at its next tick.

Every key of a script carries the customer as a hash tag (``um:{org:acme}:usage``), so
the scripts work on Redis Cluster (pass a ``RedisCluster`` as ``client``).

When Redis cannot be reached
----------------------------

A connection error or a timeout (``timeout`` seconds per command) opens a short breaker:
for ``retry_after`` seconds calls do not try Redis. Meanwhile:

* Requests served from a lease in memory go on being served (for up to
  ``reservation_ttl / 2`` after the last renewal, while no other process can take those
  units).
* A request that needs a lease gets an answer with ``err`` set (a
  ``RetryableProviderError``) and, per ``failure_policy``, ``ok=True`` (``"open"``: serve;
  the charge goes to the spool) or ``ok=False`` with ``retry_after`` (``"closed"``: the
  middleware answers 503).
* A group commit that fails goes to an **outbox** (the ``spool`` file: the same durable
  SQLite outbox as a remote provider's, :mod:`usage_middleware.outbox`), one event per
  customer feature with its group commit's key, which its
  :class:`~usage_middleware.delivery.Reporter` delivers to Redis (the same script) once
  Redis answers: a charge is never lost and never applied twice. An event served while
  Redis was down (failing open) is spooled with a key of its own (marker ``ik:<key>``).

Trade-offs, stated plainly:

* **Parked units.** Units leased by one process are unavailable to the others while it
  holds them: near the limit for up to two ticks (1 s each) after their last use, or 30 s
  when leased far from it (then at least four blocks stay free for the others); a killed
  process's for ``reservation_ttl``. Units a lost reply left in this process's record (a
  lease that ran, a give-back that may not have) go back to the pool at its next lease
  call of that key, or at the next tick's (each lease call reconciles the record with
  what the process holds; ``docs/architecture.md``, "The Redis store"). So a customer
  near the limit may be refused while another replica holds the last units; never
  overspent.
* **Crash window.** A charge committed in memory but not yet flushed is lost if the
  process is killed: at most ``flush_interval`` of them (:meth:`RedisLedger.aclose`
  flushes everything). Redis's own durability applies on top (``appendonly yes``;
  ``appendfsync everysec`` can lose a second of charges on a Redis crash). A failover to
  an asynchronous replica can lose acknowledged writes.
* **Idempotency window.** A spool replay later than ``idempotency_ttl`` after a group
  commit that did run (its reply lost) would charge again.
* **Staleness.** Answers' ``used``/``remaining`` are this process's view as of its last
  script call plus its own charges since; another replica's admin writes arrive at the
  next tick.
* **Failing open** serves without a check: a customer may overspend by what is served
  while Redis is down; the replay records it (beyond the limit, the balance may go
  negative), as ``report`` does.
* **Clocks.** Periods follow this process's clock (``now``); lease expiry follows Redis's.

Pricing: the ``pricing`` given here is stored in Redis (``<prefix>pricing``) by
:meth:`RedisLedger.open`; a ledger built without ``pricing`` (another replica, the CLI)
uses the stored one and picks up a newer one within a tick.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import hashlib
import logging
import os
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Mapping, Sequence
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, Final, TypeVar

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
from ..provider import FailurePolicy, Overage, ProviderState, on_another_loop, settle_units
from . import _redis_scripts as scripts
from .base import REASON_FAILED, FeatureUsage, usage_rows
from .engine import Gives, Leased, LeaseEngine, Settled, Upkept, lease_each
from .store import LeaseGrant, LeaseRequest, StoredCharge, period_key

if TYPE_CHECKING:
    from redis.asyncio import Redis, RedisCluster
    from redis.commands.core import AsyncScript

    from ..delivery import Reporter

__all__ = ["RedisLedger", "customer_keys"]

logger = logging.getLogger("usage_middleware.ledger")

_T = TypeVar("_T")

DEFAULT_URL: Final = "redis://127.0.0.1:6379/0"
INSTALL_HINT: Final = "RedisLedger needs redis-py: install usage-middleware[redis]"

_INTERVAL_INDEX: Final = {interval: index for index, interval in enumerate(INTERVALS, 1)}
_LOG_EVERY = 5.0  # seconds between repeated log lines about one kind of failure
_RECANCEL_EVERY = 0.5  # seconds between cancels of a task that swallowed one (see _stop)
#: The idempotency key of a spooled group-commit entry starts with this:
#: ``~gc|<batch>|<period>|<limit>|<leased>`` (``<batch>`` = ``<owner>.<n>``).
_GC_KEY: Final = "~gc|"
_MAX_ACKED = 8  # markers of one customer's earlier group commits deleted by the next one
_MAX_ACK_CUSTOMERS = 100_000  # customers with markers to delete remembered at most
#: A call of a pipeline: the script's name (``None``: a ``GET`` of the key), keys, args.
_Call = tuple[str | None, list[str], list[Any]]
_SCRIPTS: Final = ("CHANGED", "CHARGE", "FLUSH", "GIVE", "GRANT", "LEASE", "RENEW", "USAGE")


class _NotSent(RetryableProviderError):
    """A store call refused before anything was sent (the breaker is open): it did nothing."""


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

    ``lease`` is the prefix of the per-feature lease hashes (``lease:<feature>``), ``gc``
    the hash of group-commit markers, ``ik`` the prefix of the idempotency markers of
    reported events (``ik:<key>``). See :mod:`._redis_scripts`.
    """
    base = f"{prefix}{{{customer}}}:"
    return {
        "sub": base + "sub",
        "credits": base + "credits",
        "usage": base + "usage",
        "lease": base + "lease:",
        "gc": base + "gc",
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


def _gc_key(batch: str, period: str, limit: int, leased: int) -> str:
    """The spool key of one customer feature's share of group commit ``batch``."""
    return f"{_GC_KEY}{batch}|{period}|{limit}|{leased}"


def _parse_gc_key(key: str) -> tuple[str, str, int, int] | None:
    """``(batch, period, limit, leased)`` of a spooled group-commit key, else ``None``."""
    if not key.startswith(_GC_KEY):
        return None
    parts = key[len(_GC_KEY) :].split("|")
    if len(parts) != 4 or "." not in parts[0]:
        return None
    try:
        return parts[0], parts[1], int(parts[2]), int(parts[3])
    except ValueError:
        return None


class _SeqGives(list[tuple[str, str, str, int]]):
    """Units given back, with this owner's lease seq when they left its memory."""

    def __init__(self, gives: Gives, seq: int) -> None:
        super().__init__(gives)
        self.seq = seq


class _RedisLeases:
    """The lease engine's store on Redis (see :class:`~.engine.LeaseStore`).

    Every call is a task on the ledger's loop running one script call, or one pipeline of
    script calls (one per customer). Which lease records this owner holds, and when each
    is due for renewal, is tracked here (``_due``, oldest first), so a tick renews only
    the records near expiry. A failed call may have run (a lost reply): the engine then
    counts the units it was giving back, or a lost lease granted, as gone; they stay in
    the record until the next LEASE of its key reconciles it with what this process holds
    (``seq``, :meth:`LeaseEngine._lease_units`, ``_shares``; see :data:`.scripts.LEASE`).
    """

    def __init__(self, ledger: RedisLedger, owner: str) -> None:
        self._ledger = ledger
        self._owner = owner
        self._batches = 0
        # (customer, feature, period) -> monotonic time its record is due for renewal;
        # _order holds (due, key) in the order made (due times only grow).
        self._records: dict[tuple[str, str, str], float] = {}
        self._order: collections.deque[tuple[float, tuple[str, str, str]]] = collections.deque()
        # customer -> markers of this owner's group commits whose reply arrived.
        self._acked: dict[str, list[str]] = {}
        # The seq of this owner's last reconciling LEASE call (see scripts.LEASE); a GIVE
        # carries the seq current when its units left memory.
        self._seq = 0
        # (customer, feature) -> [batch, period, leased] of this owner's group commits whose
        # reply did not arrive (in flight, or spooled): their lease-funded units count as
        # held by the record until its marker shows the group commit applied.
        self._shares: dict[tuple[str, str], list[list[Any]]] = {}
        self._running: set[asyncio.Task[Any]] = set()

    def _task(self, coroutine: Coroutine[Any, Any, _T]) -> asyncio.Future[_T]:
        task = asyncio.get_running_loop().create_task(coroutine)
        self._running.add(task)
        task.add_done_callback(self._running.discard)
        return task

    def _hold(self, key: tuple[str, str, str], t: float) -> None:
        """Note a record of this owner renewed (or made) at ``t``."""
        due = t + self._ledger._lease_ttl / 2
        self._records[key] = due
        self._order.append((due, key))

    # -- LeaseStore ------------------------------------------------------------------------

    def lease(
        self,
        customer: str,
        feature: str,
        at: datetime,
        need: int,
        want: int,
        gives: Sequence[tuple[str, int]],
    ) -> asyncio.Future[LeaseGrant]:
        return self._task(self._lease(customer, feature, at, need, want, gives))

    def lease_many(self, requests: Sequence[LeaseRequest]) -> asyncio.Future[Leased]:
        """One script call per request, concurrently (each customer's keys live in its own
        hash slot, so one script cannot lease for several customers on Redis Cluster)."""
        return lease_each(self.lease, requests)

    def flush(self, batch: Sequence[StoredCharge]) -> asyncio.Future[Settled]:
        # Named and noted now, in the step that took the charges out of the engine's
        # memory, so a lease call never misses their lease-funded units.
        self._batches += 1
        name = f"{self._owner}.{self._batches}"
        shares: list[tuple[tuple[str, str], list[Any]]] = []
        for customer, feature, period, _, _, leased, _, _ in batch:
            if leased > 0:
                share = [name, period, leased]
                self._shares.setdefault((customer, feature), []).append(share)
                shares.append(((customer, feature), share))
        return self._task(self._flush(batch, name, shares))

    def _forget(self, shares: Sequence[tuple[tuple[str, str], list[Any]]]) -> None:
        for key, share in shares:
            listed = self._shares.get(key)
            if listed is not None:
                if any(item is share for item in listed):
                    listed.remove(share)
                if not listed:
                    del self._shares[key]

    def give_back(self, gives: Gives) -> asyncio.Future[None]:
        return self._task(self._give_back(_SeqGives(gives, self._seq)))

    def maintain(self, gives: Gives, seen: int) -> asyncio.Future[Upkept]:
        return self._task(self._maintain(_SeqGives(gives, self._seq), seen))

    async def upkeep(self) -> None:
        """Nothing: the pricing is synced and the records renewed by :meth:`maintain`."""

    async def close(self) -> None:
        """Wait (briefly) for the calls still running, then give back every record."""
        ledger = self._ledger
        running = {task for task in self._running if not on_another_loop(task)}
        if running:
            await asyncio.wait(running, timeout=ledger._timeout + 1)
            for task in running:
                await _stop(task)
        self._running.clear()
        records, self._records = self._records, {}
        self._order.clear()
        if not records or time.monotonic() < ledger._down_until:
            return  # (Redis away: they expire after reservation_ttl)
        client = ledger._client
        assert client is not None
        try:
            pipeline: Any = client.pipeline(transaction=False)
            async with pipeline as pipe:
                for customer, feature, period in records:
                    base = f"{ledger._prefix}{{{customer}}}:"
                    pipe.hdel(f"{base}lease:{feature}", f"{self._owner}|{period}")
                await pipe.execute()
        except Exception as exc:
            if not ledger._redis_failed(exc, "giving back leases"):
                raise

    # -- the calls -------------------------------------------------------------------------

    async def _lease(
        self,
        customer: str,
        feature: str,
        at: datetime,
        need: int,
        want: int,
        gives: Sequence[tuple[str, int]],
    ) -> LeaseGrant:
        ledger = self._ledger
        ledger._check_up()
        await ledger._ready_pricing()
        terms = ledger._terms(feature, at)
        base = f"{ledger._prefix}{{{customer}}}:"
        # From here to the call, no await: the seq and what this process holds are read
        # in one step (see scripts.LEASE).
        self._seq += 1
        args: list[Any] = [feature, self._owner, need, want, ledger._ttl_ms, terms, self._seq]
        for interval_name in INTERVALS:
            period_of = period_key(*period_bounds(interval_name, at))
            args.append(ledger._lease_units(customer, feature, period_of))
        shares = list(self._shares.get((customer, feature), ()))
        args.append(len(shares))
        for share in shares:
            args += share
        for period, units in gives:
            args += (period, units)
        t = time.monotonic()
        reply = await ledger._call(
            ledger._scripts["LEASE"](
                keys=[
                    base + "sub", base + "credits", base + "usage", f"{base}lease:{feature}",
                    base + "gc",
                ],
                args=args,
            ),
            "leasing",
        )  # fmt: skip
        fields = _script_reply(reply, 12, "the lease script")
        applied = fields.pop()
        if not isinstance(applied, list):
            raise _BadReply(f"unexpected applied list in a Redis reply: {applied!r:.50}")
        self._forget(
            [
                ((customer, feature), shares[_int(i, "share")])
                for i in applied
                if 0 <= _int(i, "share") < len(shares)
            ]
        )
        status, limit, used, balance, others, take, spare, roomy, interval, in_plan, mine = (
            _int(value, "lease field") for value in fields
        )
        if status < 0:
            return LeaseGrant(known=False)
        if not 1 <= interval <= len(INTERVALS):
            raise _BadReply(f"unexpected interval in a Redis reply: {interval!r}")
        start, end = period_bounds(INTERVALS[interval - 1], at)
        period = period_key(start, end)
        if mine > 0:
            self._hold((customer, feature, period), t)
        return LeaseGrant(
            known=True,
            in_plan=bool(in_plan),
            end=end,
            period=period,
            limit=UNLIMITED if limit < 0 else limit,
            used=used,
            credits=max(0, balance),
            others=others,
            take=take,
            spare=spare,
            roomy=bool(roomy),
        )

    async def _flush(
        self,
        batch: Sequence[StoredCharge],
        name: str,
        shares: Sequence[tuple[tuple[str, str], list[Any]]],
    ) -> Settled:
        """One pipeline of the group commit's script calls, one per customer. On a Redis
        failure (or a cancel) the charges go to the spool with the batch's key, and the
        engine counts them as written (the spool delivers them exactly once); their
        ``shares`` stay noted until a lease call finds them applied."""
        ledger = self._ledger
        by_customer: dict[str, list[StoredCharge]] = {}
        for entry in batch:
            by_customer.setdefault(entry[0], []).append(entry)
        acked: dict[str, list[str]] = {}
        result: Settled = {}
        try:
            ledger._check_up()
            calls: list[_Call] = []
            for customer, entries in by_customer.items():
                done = acked[customer] = self._acked.pop(customer, [])
                base = f"{ledger._prefix}{{{customer}}}:"
                keys = [base + "credits", base + "usage", base + "gc"]
                args: list[Any] = [self._owner, name, ledger._idem_ms, "0", len(done), *done]
                for _, feature, period, limit, units, leased, _, _ in entries:
                    keys.append(f"{base}lease:{feature}")
                    shown = -1 if limit >= UNLIMITED else limit
                    args += (feature, period, shown, units, leased)
                calls.append(("FLUSH", keys, args))
            replies = await ledger._call(ledger._pipeline(calls), "a group commit")
            if not isinstance(replies, list) or len(replies) != len(by_customer):
                raise _BadReply(f"unexpected reply to a group commit: {replies!r:.100}")
            for entries, reply in zip(by_customer.values(), replies, strict=True):
                if not isinstance(reply, list) or reply[:1] != [1]:
                    continue  # {0}: applied before (nothing to read back)
                numbers = _script_reply(reply, 1 + 2 * len(entries), "a group commit")
                for i, entry in enumerate(entries):
                    result[entry[:3]] = (
                        _int(numbers[1 + 2 * i], "used"),
                        _int(numbers[2 + 2 * i], "balance"),
                    )
        except BaseException as exc:
            # It may have run (a lost reply): the spool replays it under the same markers,
            # so it is applied exactly once either way. Never retried here under a new one.
            for customer, done in acked.items():  # not deleted: they expire instead
                self._acked.setdefault(customer, done)
            for customer, feature, period, limit, units, leased, _, at in batch:
                event = UsageEvent(
                    customer,
                    feature,
                    units,
                    datetime.fromtimestamp(at, UTC),
                    idempotency_key=_gc_key(name, period, limit, leased),
                )
                ledger._to_outbox(event, "a group commit failed")
            if ledger._reporter is None:
                self._forget(shares)  # lost (logged): never applied, nothing to wait for
            if not isinstance(exc, Exception | asyncio.CancelledError):
                raise
            if isinstance(exc, Exception) and not isinstance(exc, ProviderError):
                logger.error("redis ledger: a group commit failed", exc_info=exc)
            return {}
        self._forget(shares)  # applied (or found applied before)
        if len(self._acked) >= _MAX_ACK_CUSTOMERS:
            self._acked.clear()  # their markers expire after idempotency_ttl instead
        for customer in by_customer:
            done = self._acked.setdefault(customer, [])
            done.append(name)
            del done[:-_MAX_ACKED]
        return result

    async def _give_back(self, gives: Gives) -> None:
        ledger = self._ledger
        ledger._check_up()
        await ledger._call(ledger._pipeline(self._gives(gives)), "giving back leases")

    def _gives(self, gives: Gives) -> list[_Call]:
        """The GIVE calls of ``gives`` (their units left memory at ``gives.seq``), one
        per customer."""
        by_customer: dict[str, tuple[list[str], list[Any]]] = {}
        ledger = self._ledger
        seq = gives.seq if isinstance(gives, _SeqGives) else self._seq
        for customer, feature, period, units in gives:
            keys, args = by_customer.setdefault(customer, ([], [self._owner, seq]))
            keys.append(f"{ledger._prefix}{{{customer}}}:lease:{feature}")
            args += (period, units)
        return [("GIVE", keys, args) for keys, args in by_customer.values()]

    async def _maintain(self, gives: Gives, seen: int) -> Upkept:
        """Give back idle units, renew the records due, read what changed: one pipeline
        (a second round trip only when something changed)."""
        ledger = self._ledger
        ledger._check_up()
        client = ledger._client
        assert client is not None
        t = time.monotonic()
        due: dict[str, list[tuple[str, str]]] = {}
        taken: list[tuple[str, str, str]] = []
        while self._order and self._order[0][0] <= t:
            when, key = self._order.popleft()
            if self._records.get(key) != when:
                continue  # renewed since (a newer entry follows)
            del self._records[key]
            taken.append(key)
            due.setdefault(key[0], []).append(key[1:])
        try:
            calls = self._gives(gives)
            n_gives = len(calls)
            for customer, records in due.items():
                base = f"{ledger._prefix}{{{customer}}}:"
                calls.append(
                    (
                        "RENEW",
                        [f"{base}lease:{feature}" for feature, _ in records],
                        [self._owner, ledger._ttl_ms, *(period for _, period in records)],
                    )
                )
            calls.append((None, [ledger._generation_key], []))
            replies = await ledger._call(ledger._pipeline(calls), "lease upkeep")
        except BaseException:
            for key in taken:  # still due
                if key not in self._records:
                    self._hold(key, t - ledger._lease_ttl / 2)
            raise
        if not isinstance(replies, list) or len(replies) != n_gives + len(due) + 1:
            raise _BadReply(f"unexpected reply to lease upkeep: {replies!r:.100}")
        lost: set[tuple[str, str, str]] = set()
        renewed = replies[n_gives : n_gives + len(due)]
        for (customer, records), alive in zip(due.items(), renewed, strict=True):
            if not isinstance(alive, list) or len(alive) != len(records):
                raise _BadReply(f"unexpected reply to RENEW: {alive!r:.100}")
            for (feature, period), ok in zip(records, alive, strict=True):
                key = (customer, feature, period)
                if ok == 1:
                    if key not in self._records:  # (a lease meanwhile renewed it too)
                        self._hold(key, t)
                else:
                    lost.add(key)
        raw = replies[-1]
        generation = 0 if raw is None else _int(raw, "generation")
        changed: set[str] | None = set()
        if generation != seen:
            members = await ledger._call(
                client.zrangebyscore(ledger._changes_key, f"({seen}", "+inf"), "lease upkeep"
            )
            changed = {m if isinstance(m, str) else m.decode() for m in members}
        if await ledger._pricing_changed():
            changed = None
        return generation, changed, lost


class RedisLedger(LeaseEngine):
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
        reservation_ttl: seconds a process's lease lives unless the process renews it (a
            killed process's units come back after this).
        failure_policy: ``"closed"`` (refuse with 503 while Redis is unreachable) or
            ``"open"`` (serve; charge later from the spool).
        client: a ``redis.asyncio.Redis`` or ``RedisCluster`` to use (not closed by the
            ledger; best without retries of its own: a retried lease call may park its
            units twice); default one built from ``url``.
        now: the clock for usage periods, returning an aware datetime; default UTC now.
        timeout: seconds to connect, to wait for a free pooled connection, and per
            command, for the client built from ``url``.
        max_connections: connections of that client's pool; more concurrent calls wait
            for one (up to ``timeout``).
        retry_after: seconds calls skip Redis after it was found unreachable (also the
            ``Retry-After`` of a failed-closed answer).
        idempotency_ttl: seconds a group commit's (or a reported event's) idempotency
            marker is kept.
        reservation_timeout: ``None`` (default), or seconds after which a reservation
            still unsettled is logged (WARNING, once): a request that never ends, or a
            caller that never settles. Its hold is kept either way.
        spool: the outbox file where charges wait while Redis is unreachable (shared by the
            processes of one machine; ``usage-middleware outbox --outbox FILE`` reads it);
            ``None`` loses such charges (logged).
        spool_options: keyword arguments for the outbox's
            :class:`~usage_middleware.delivery.Reporter` (e.g. ``retry_cooldown``).
        lease_size: the lease block in units (>= 1); a hot key's block grows up to 64 times
            this, never beyond a quarter of the units still free.
        flush_interval: seconds the flusher waits to group commits into one pipeline;
            bounds the crash window for committed charges.

    Raises:
        ConfigurationError: redis-py is not installed ("install usage-middleware[redis]"),
            the URL or prefix is malformed, ``failure_policy`` is unknown, or a number
            (of seconds, of connections, of units) is out of range.
        PricingError: ``pricing`` does not validate.
    """

    name = "redis"
    _reconciles = True

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
        lease_size: int = 64,
        flush_interval: float = 0.005,
    ) -> None:
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
        ttl = _seconds("reservation_ttl", reservation_ttl)
        self._timeout = _seconds("timeout", timeout)
        self._max_connections = check_units(max_connections, what="max_connections", setting=True)
        self._retry_after = _seconds("retry_after", retry_after)
        self._idem_ms = int(_seconds("idempotency_ttl", idempotency_ttl) * 1000) or 1
        if reservation_timeout is not None:
            _seconds("reservation_timeout", reservation_timeout)
        super().__init__(
            lease_size=lease_size,
            lease_ttl=ttl,
            flush_interval=flush_interval,
            reservation_timeout=reservation_timeout,
            now=now,
        )
        self._label = "redis"
        self._url = url
        self._client_arg = client
        self._pricing = (
            pricing if pricing is None or isinstance(pricing, Pricing) else load_pricing(pricing)
        )
        self._pricing_given = pricing is not None
        self._prefix = prefix
        self._generation_key = f"{prefix}{{~}}:generation"
        self._changes_key = f"{prefix}{{~}}:changes"
        self._ttl_ms = int(ttl * 1000) or 1
        self.failure_policy: FailurePolicy = failure_policy
        self._outbox_path = None if spool is None else os.fspath(spool)
        self._spool_options = dict(spool_options or {})
        # Set by open(), inside the running loop.
        self._client: Redis | RedisCluster | None = None
        self._scripts: dict[str, AsyncScript] = {}
        self._reporter: Reporter | None = None
        self._unreachable: tuple[type[BaseException], ...] = ()
        self._lost_loop = False
        # Event-loop state.
        self._pricing_json: str | None = None  # what Redis held when last read
        self._synced = False  # the pricing was stored in (or read from) Redis
        self._terms_cache: dict[tuple[str, int], bytes] = {}
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

    @property
    def pricing(self) -> Pricing | None:
        """The pricing model in use: the one given, else the one stored in Redis (once read)."""
        return self._pricing

    async def open(self) -> None:
        """Build the client, register the scripts, open the spool, sync the pricing, start
        the flusher and the lease upkeep.

        Idempotent while open. Redis being unreachable is not an error here (the failure
        policy applies to requests; the pricing is synced once Redis answers).

        Raises:
            ConfigurationError: the spool file cannot be opened, or the pricing given
                drops a plan customers are still on. A closed ledger opens again (a new
                client and spool on the running loop).
        """
        await self._open_once(self._start)

    async def _start(self) -> None:
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import TimeoutError as RedisTimeoutError

        from ..delivery import Reporter

        self._unreachable = (RedisConnectionError, RedisTimeoutError, OSError)
        client = self._client_arg or self._make_client()
        self._scripts = {name: client.register_script(getattr(scripts, name)) for name in _SCRIPTS}
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
        self._lost_loop = False
        self._down_until = 0.0
        generation = 0
        try:
            await self._sync_pricing()
            raw = await client.get(self._generation_key)
            generation = 0 if raw is None else _int(raw, "generation")
        except ConfigurationError:  # the pricing would cut customers off: refuse to start
            await self._close_client()
            raise
        except Exception as exc:  # retried by the upkeep and on first use
            if isinstance(exc, self._unreachable):
                self._trip(exc)
            else:
                logger.exception("redis ledger: reading or storing the pricing failed")
        owner = f"{os.getpid()}-{os.urandom(6).hex()}"
        self._start_engine(_RedisLeases(self, owner), generation)
        await super().open()

    def _make_client(self) -> Redis:
        """A client of ``url`` for the running loop."""
        import redis.asyncio as aioredis
        from redis.asyncio.retry import Retry
        from redis.backoff import NoBackoff

        assert self._url is not None
        pool = aioredis.BlockingConnectionPool.from_url(
            self._url,
            max_connections=self._max_connections,
            timeout=self._timeout,  # waiting for a free connection
            socket_timeout=self._timeout,
            socket_connect_timeout=self._timeout,
            # No retry: a lease call that ran but whose reply was lost would run twice.
            # A broken pooled connection (a Redis restart) fails one call instead.
            retry=Retry(NoBackoff(), 0),
        )
        return aioredis.Redis.from_pool(pool)

    async def aclose(self) -> None:
        """Write every pending charge (to Redis, else to the spool), give back this
        process's leases, drain the spool (up to its ``drain_timeout``), close the client
        it built. Idempotent."""
        was_open = self._state is ProviderState.OPEN
        await super().aclose()
        if was_open:
            await self._close_client()

    async def _close_client(self) -> None:
        try:
            if self._reporter is not None:
                await self._reporter.aclose()  # (kept: a late charge is written to its file)
        finally:
            if self._client_arg is None and self._client is not None:
                try:
                    await self._client.aclose()
                except Exception:  # its connections belong to a loop that is gone
                    if not self._lost_loop:
                        raise
                    logger.debug("redis ledger: closing the old loop's client", exc_info=True)
            if self._client_arg is None:
                self._client = None

    def _loop_gone(self) -> None:
        # Opened on a loop that is gone: its connections cannot be used (nor closed) here.
        # Charges still pending are written with a client of this loop.
        self._lost_loop = True
        if self._client_arg is None and self._client is not None:
            self._client = client = self._make_client()
            self._scripts = {
                name: client.register_script(getattr(scripts, name)) for name in _SCRIPTS
            }

    # -- the hot path (the rest is the engine's) ------------------------------------------

    async def commit(
        self, reservation: Reservation, *, units: int | None = None, overage: Overage = "cap"
    ) -> int:
        """Charge a reservation its actual ``units`` (see :meth:`LeaseEngine.commit`):
        queued in memory, written by the next group commit (to the spool when Redis is
        unreachable). A reservation served while Redis was unreachable (failing open) goes
        to the spool: its actual units, at most the units reserved under ``"cap"`` (no
        budget was read). Once per reservation; never raises for Redis. Returns the units
        charged."""
        if reservation.token is None and reservation.ok and not reservation.settled:
            actual = settle_units(reservation, units)
            if overage == "cap":
                actual = min(actual, reservation.units)
            reservation.settled = True
            if actual:
                event = reservation.event
                if actual != event.units:
                    event = dataclasses.replace(event, units=actual)
                self._to_outbox(event, "a request was served without Redis")
            return actual
        return await super().commit(reservation, units=units, overage=overage)

    async def release(self, reservation: Reservation) -> None:
        """Give a reservation's units back to this process's lease (no I/O). Once only."""
        if reservation.token is None:
            reservation.settled = True
            return
        await super().release(reservation)

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
        await self._note_changes({event.customer for event in events})

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
        await self._note_changes({customer})

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
        await self._note_changes({customer})
        return int(credited) - int(consumed)

    async def usage(self, customer: str) -> list[FeatureUsage]:
        """The customer's standing per feature this period, sorted by feature name, after
        writing this process's pending charges.

        Raises:
            LedgerError: the customer is unknown (no subscription and no credits).
            RetryableProviderError: Redis is unreachable or failed.
        """
        check_customer(customer)
        await self._opened()
        await self._flush_all()
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
    # -- internals -------------------------------------------------------------------------

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

    def _charge_event(self, event: UsageEvent, client: Any = None) -> Any:
        """Run the charge script for ``event`` (on ``client``, e.g. a pipeline)."""
        base = f"{self._prefix}{{{event.customer}}}:"
        return self._scripts["CHARGE"](
            keys=[
                base + "sub", base + "credits", base + "usage",
                _marker(base, event.idempotency_key),
            ],
            args=[
                event.feature, event.units, "1" if event.clobber else "0", self._idem_ms,
                self._terms(event.feature, event.at),
            ],
            client=client,
        )  # fmt: skip

    async def _record(self, events: Sequence[UsageEvent]) -> None:
        """Charge ``events`` (pipelined scripts); the raw path of report and of the spool.

        A spooled group-commit entry (its key starts with ``~gc|``) is replayed with the
        group commit's script under its batch's markers; any other event is charged once
        per idempotency key (:data:`~._redis_scripts.CHARGE`).
        """
        if not events:
            return
        client = self._client
        if client is None:
            raise RetryableProviderError("the Redis ledger is not open")
        plain: list[UsageEvent] = []
        replays: dict[tuple[str, str], list[tuple[UsageEvent, str, int, int]]] = {}
        for event in events:
            parsed = _parse_gc_key(event.idempotency_key)
            if parsed is None:
                plain.append(event)
            else:
                batch, period, limit, leased = parsed
                replays.setdefault((event.customer, batch), []).append(
                    (event, period, limit, leased)
                )
        statuses: list[int] = []
        try:
            if not self._synced and not self._pricing_given:
                await self._sync_pricing()
            if plain:
                statuses = await self._charge_all(client, plain)
            if replays:
                await self._replay(client, replays)
            self._down_until = 0.0  # Redis answers again
        except self._unreachable as exc:
            self._trip(exc)
            raise RetryableProviderError(
                f"the Redis ledger could not be reached: {exc}", original_error=exc
            ) from exc
        except ProviderError:
            raise
        except Exception as exc:  # RedisError, or a reply of the wrong shape (see _redis_failed)
            self._log_once("record", logging.ERROR, "redis ledger: charging failed: %r", exc)
            raise RetryableProviderError(
                f"the Redis ledger failed: {exc}", original_error=exc
            ) from exc
        for event, status in zip(plain, statuses, strict=True):
            if status < 0:
                raise PermanentProviderError(
                    f"unknown customer {event.customer!r}", code="unknown_customer"
                )

    async def _charge_all(self, client: Any, events: Sequence[UsageEvent]) -> list[int]:
        """Check the customers are known, then charge ``events``; their statuses."""
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
                await self._charge_event(event, pipe)
            replies = await pipe.execute()
        if not isinstance(replies, list) or len(replies) != len(events):
            raise _BadReply(f"unexpected reply to the charge pipeline: {replies!r:.100}")
        return [_int(_script_reply(r, 3, "charge")[0], "status") for r in replies]

    async def _replay(
        self,
        client: Any,
        replays: Mapping[tuple[str, str], Sequence[tuple[UsageEvent, str, int, int]]],
    ) -> None:
        """Apply spooled group-commit entries, each once (markers per batch and entry)."""
        async with client.pipeline(transaction=False) as pipe:
            for (customer, batch), group in replays.items():
                base = f"{self._prefix}{{{customer}}}:"
                keys = [base + "credits", base + "usage", base + "gc"]
                args: list[Any] = [batch.rpartition(".")[0], batch, self._idem_ms, "1", 0]
                for event, period, limit, leased in group:
                    keys.append(f"{base}lease:{event.feature}")
                    shown = -1 if limit < 0 or limit >= UNLIMITED else limit
                    args += (event.feature, period, shown, event.units, leased)
                await self._scripts["FLUSH"](keys=keys, args=args, client=pipe)
            replies = await pipe.execute()
        if not isinstance(replies, list) or len(replies) != len(replays):
            raise _BadReply(f"unexpected reply to a group commit replay: {replies!r:.100}")
        for reply in replies:
            if not isinstance(reply, list) or reply[:1] not in ([0], [1]):
                raise _BadReply(f"unexpected reply to a group commit replay: {reply!r:.100}")

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

    def _redis_failed(self, exc: BaseException, what: str) -> bool:
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
        except Exception as exc:  # RedisError, or a reply of the wrong shape (see _redis_failed)
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

    async def claim_key(
        self, customer: str, route: str, key: str, *, fingerprint: str = ""
    ) -> KeyClaim:
        """Claim an ``Idempotency-Key`` with ``SET NX`` (in flight: ``IN_FLIGHT_TTL``).

        The value is ``0:<fingerprint>`` in flight, ``1:<fingerprint>`` once charged (a
        bare ``0``/``1`` written by an older version matches no fingerprint: 422).

        Raises:
            RetryableProviderError: Redis could not be reached.
        """
        client = await self._opened()
        name = self._claim_name(customer, route, key)
        mine = f"0:{fingerprint}".encode()
        for _ in range(3):  # a claim that expires between SET NX and GET: claim again
            if await self._admin(client.set(name, mine, nx=True, px=int(IN_FLIGHT_TTL * 1000))):
                return "new"
            value = await self._admin(client.get(name))
            if value is not None:
                if isinstance(value, str):
                    value = value.encode()
                state, sep, held = value.partition(b":")
                if not sep or held.decode(errors="replace") != fingerprint:
                    return "mismatch"
                return "charged" if state == b"1" else "busy"
        return "busy"

    async def finish_key(
        self, customer: str, route: str, key: str, *, charged: bool, fingerprint: str = ""
    ) -> None:
        """Keep the key ``KEY_TTL`` (24 h) when ``charged``, else delete the claim."""
        client = await self._opened()
        name = self._claim_name(customer, route, key)
        if charged:
            await self._admin(client.set(name, f"1:{fingerprint}".encode(), px=int(KEY_TTL * 1000)))
        else:
            await self._admin(client.delete(name))

    # -- internals: pricing and upkeep -----------------------------------------------------

    async def _ready_pricing(self) -> None:
        if not self._synced and not self._pricing_given:
            await self._admin(self._sync_pricing())

    async def _sync_pricing(self) -> bool:
        """Store the given pricing in Redis, or read (a newer) one stored there; whether
        the pricing in use changed."""
        client = self._client
        assert client is not None
        key = f"{self._prefix}pricing"
        if self._pricing_given:
            if not self._synced:
                assert self._pricing is not None
                await self._refuse_dropped_plans(key, self._pricing)
                await client.set(key, self._pricing.to_json())
                self._synced = True
            return False
        raw = await client.get(key)
        text = raw if raw is None or isinstance(raw, str) else raw.decode()
        changed = text != self._pricing_json
        if changed or not self._synced:
            self._pricing = None if text is None else loads_pricing(text, origin="stored pricing")
            self._pricing_json = text
            self._terms_cache.clear()
        self._synced = True
        return changed

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

    async def _pricing_changed(self) -> bool:
        """Once a tick: sync the pricing; whether another replica replaced it."""
        if self._pricing_given and self._synced:
            return False
        return await self._call(self._sync_pricing(), "reading the pricing")  # type: ignore[no-any-return]

    async def _note_changes(self, customers: set[str]) -> None:
        """After an admin write: this process's slots of ``customers`` re-validate at
        once, the other processes' at their next tick."""
        self._changed(customers)
        generation = await self._admin(
            self._scripts["CHANGED"](
                keys=[self._generation_key, self._changes_key], args=sorted(customers)
            )
        )
        if _int(generation, "generation") == self._generation + 1:
            self._generation += 1  # only this write since: nothing to re-read at the tick

    # -- internals: the engine's hooks -----------------------------------------------------

    async def _pipeline(self, calls: Sequence[_Call]) -> list[Any]:
        """Run ``calls`` (script name, keys, args; no name: ``GET`` of the key) in one
        pipeline by ``EVALSHA``, without redis-py's ``SCRIPT EXISTS`` round trip before
        each pipeline: calls Redis did not run for want of their script (``NOSCRIPT``, after
        a restart) are run again once it is loaded. Raises the first other error reply."""
        from redis.exceptions import NoScriptError

        client = self._client
        assert client is not None
        replies: list[Any] = [None] * len(calls)
        todo = list(range(len(calls)))
        for attempt in range(2):
            pipeline: Any = client.pipeline(transaction=False)
            async with pipeline as pipe:
                for i in todo:
                    name, keys, args = calls[i]
                    if name is None:
                        pipe.get(keys[0])
                    else:
                        pipe.evalsha(self._scripts[name].sha, len(keys), *keys, *args)
                got = await pipe.execute(raise_on_error=False)
            if not isinstance(got, list) or len(got) != len(todo):
                raise _BadReply(f"unexpected reply to a pipeline: {got!r:.100}")
            missing = []
            for i, reply in zip(todo, got, strict=True):
                if isinstance(reply, NoScriptError) and attempt == 0:
                    missing.append(i)
                elif isinstance(reply, Exception):
                    raise reply
                else:
                    replies[i] = reply
            if not missing:
                break
            for name in {calls[i][0] for i in missing}:
                assert name is not None
                await client.script_load(self._scripts[name].script)
            todo = missing
        return replies

    def _check_up(self) -> None:
        """Raise ``_NotSent`` while the breaker is open (Redis unreachable)."""
        if time.monotonic() < self._down_until:
            raise _NotSent(
                str(self._down_error or "the Redis ledger could not be reached"),
                retry_after=self._retry_after,
                original_error=self._down_error,
            )

    def _rolled_back(self, future: asyncio.Future[Any]) -> bool:
        # A call that failed may have run in Redis (its reply lost): only one refused by
        # the breaker before sending anything surely did nothing.
        return not future.cancelled() and isinstance(future.exception(), _NotSent)

    async def _call(self, call: Awaitable[Any], what: str) -> Any:
        """Await a store call; Redis failures become ``RetryableProviderError`` (logged
        at most every few seconds) and trip the breaker when Redis is unreachable."""
        try:
            result = await call
        except self._unreachable as exc:
            self._trip(exc)
            raise RetryableProviderError(
                f"the Redis ledger could not be reached: {exc}",
                retry_after=self._retry_after,
                original_error=exc,
            ) from exc
        except UsageMiddlewareError:
            raise
        except Exception as exc:  # RedisError, or a reply of the wrong shape (see _redis_failed)
            self._log_once(what, logging.ERROR, "redis ledger: %s failed: %r", what, exc)
            raise RetryableProviderError(
                f"the Redis ledger failed: {exc!r}",
                retry_after=self._retry_after,
                original_error=exc,
            ) from exc
        self._down_until = 0.0  # Redis answers again
        return result

    def _lease_failed(
        self, customer: str, feature: str, units: int, error: Exception
    ) -> Reservation:
        """A lease could not be taken: the answer of ``failure_policy`` (nothing held)."""
        if not isinstance(error, RetryableProviderError):
            error = RetryableProviderError(
                f"the Redis ledger failed: {error!r}",
                retry_after=self._retry_after,
                original_error=error,
            )
        wait = self._down_until - time.monotonic()
        event = trusted_event(customer, feature, units, self._clock())
        return self._unavailable(event, error, wait if wait > 0 else None)

    def _log_failure(self, exc: Exception, message: str, *args: object) -> None:
        if isinstance(exc, ProviderError):  # Redis away: logged when the breaker opened
            self._log_once(
                message, logging.WARNING, "redis ledger: " + message + ": %s", *args, exc
            )
        else:
            logger.error("redis ledger: " + message, *args, exc_info=exc)

    async def _write_late(self, charge: StoredCharge) -> None:
        """A charge committed after close goes to the spool (delivered at its next open)."""
        customer, feature, _, _, units, _, _, at = charge
        self._to_outbox(
            trusted_event(customer, feature, units, datetime.fromtimestamp(at, UTC)),
            "the ledger is closed",
        )
