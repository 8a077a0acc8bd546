"""Reliable delivery of usage events to a remote provider through a durable outbox.

The :class:`Reporter` sits between the middleware and a remote provider's
:meth:`~usage_middleware.provider.Provider.report`. A request never waits for the
provider: a charge is written to the SQLite outbox (:mod:`usage_middleware.outbox`) in a
group commit (one transaction, on the reporter's own thread, for every event waiting),
then delivered in batches by background tasks, retried with exponential backoff and
jitter (``stamina``), and deleted once delivered::

    request ──enqueue()/prepare()──▶ pending ──group commit──▶ outbox.db (WAL)
                                                  │ (owned rows, bounded)  │ (spilled rows)
                                                  ▼                        ▼
                                           ready queue ◀──────────── claim (any worker)
                                                  │
                                     batches of ≤ provider.max_batch, ≤ max_delay old
                                                  ▼
                                provider.report(events) ──▶ delete │ retry │ dead-letter

Guarantees:

* A charge is durable before it counts as accepted: ``prepare()`` returns after the
  event's row committed; ``enqueue()`` is durable within one group commit.
* Nothing is dropped: a retryable failure (network, timeout, 429, 5xx) is retried; after
  ``retry_attempts`` attempts the batch goes back to the outbox and is tried again after
  ``retry_cooldown`` seconds (or the provider's ``Retry-After``). A permanent failure
  splits the batch in halves until the bad event is alone; it goes to the dead-letter
  table with the provider's status/code/message; the rest is delivered. An event that
  retryable failures kept undelivered longer than ``max_retry_age`` (default 3 days since
  it entered the outbox) is dead-lettered on its next failure (code
  ``retry_age_exceeded``, the last error as message), so nothing stays queued forever
  unnoticed; ``usage-middleware outbox retry`` replays it.
* Every attempt at an event sends the same idempotency key, so a provider that
  deduplicates (Spaire's ``external_id``) charges once. Delivery is at-least-once: an event
  can be sent again when the process dies after the provider took it and before its row
  was deleted (deletes are batched: at most ``delete_delay`` seconds), or when a worker
  stalled longer than ``lease`` seconds.
* An *ambiguous* failure (``ProviderError.ambiguous``: a read timeout or a reset after the
  request left, from a provider that cannot deduplicate, such as Tier and ARES; or this
  reporter's own ``call_timeout`` on such a provider) is never retried at once: the event
  goes back to the outbox for ``retry_cooldown`` seconds and is sent at most once more.
  A second ambiguous failure dead-letters it with code ``"ambiguous"`` (a human checks the
  provider and replays it with ``outbox retry``, or purges it). So such a provider counts
  an event at most twice from ambiguous failures (plus the crash window above).
* A provider's ``Retry-After`` pauses delivery for at most ``max_retry_after`` seconds
  (default the provider's own ``max_retry_after``, else 300): a 429 asking for decades
  does not stall the outbox, and rows held back longer than the outbox's
  ``MAX_NOT_BEFORE`` (written by older versions) are due again.
* Several processes share one outbox file; a row is sent by the one live reporter that
  owns it (see :mod:`usage_middleware.outbox` for the lease protocol).
* Memory is bounded: at most ``max_queue`` events wait in memory; a backlog beyond that
  (a provider down for hours) lives in SQLite.

Lifecycle: nothing starts in ``__init__``. :meth:`Reporter.open` (inside the running
loop, from the provider's ``open()`` in the ASGI lifespan) opens the outbox, registers
this process, and starts the writer, heartbeat and sender tasks; :meth:`Reporter.aclose`
delivers until ``drain_timeout`` and leaves the rest in the outbox. A remote provider
closes its reporter *before* its own HTTP client, so the drain can still send.

Logging goes to ``usage_middleware.reporter``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import math
import os
import random
import sqlite3
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Final, TypeVar

import stamina

from ._utils import is_sqlite_busy
from .errors import (
    ConfigurationError,
    PermanentProviderError,
    ProviderError,
    RetryableProviderError,
)
from .models import UsageEvent
from .outbox import DEFAULT_MAX_RETRY_AGE, MAX_NOT_BEFORE, Outbox, OutboxStatus, Synchronous
from .provider import Provider, ProviderState, on_another_loop

__all__ = ["Reporter", "ReporterStats"]

log = logging.getLogger("usage_middleware.reporter")

_T = TypeVar("_T")

#: Group commits between two WAL checkpoints (besides the housekeeper's, every
#: ``stats_interval``).
_CHECKPOINT_EVERY: Final = 1000

# Entry states.
_READY: Final = 0  # enqueued or confirmed: to be delivered
_HELD: Final = 1  # prepared: durable, not deliverable until confirmed
_CANCELLED: Final = 2  # prepared, then cancelled: never delivered


#: Most seconds a provider's Retry-After pauses delivery, unless it says otherwise.
_DEFAULT_MAX_RETRY_AFTER: Final = 300.0

#: Prefix of an outbox row's ``last_error`` once a send of it failed ambiguously.
_AMBIGUOUS: Final = "ambiguous: "


class _Entry:
    """One event on its way: its state, when it became ready, its outbox row id, and when
    it entered the outbox."""

    __slots__ = ("ambiguous", "created", "event", "owned", "rowid", "state", "t")

    def __init__(
        self,
        event: UsageEvent,
        state: int,
        t: float,
        rowid: int | None = None,
        created: float | None = None,
    ):
        self.event = event
        self.state = state
        self.t = t  # monotonic seconds when it became ready (for max_delay)
        self.rowid = rowid
        self.owned = True  # whether its row is owned by this reporter (set by the writer)
        self.created = time.time() if created is None else created  # epoch (max_retry_age)
        self.ambiguous = False  # a send may have reached a provider that cannot dedupe


@dataclass(frozen=True, slots=True)
class ReporterStats:
    """Counters of one reporter (this process), as of the call.

    Attributes:
        queued: events accepted for delivery (enqueued, or prepared and confirmed).
        sent: events the provider accepted.
        retried: events sent again after a retryable failure (one per event per retry).
        dead_lettered: events the provider rejected permanently (moved to dead letters).
        outbox_depth: undelivered rows in the outbox file, every process included, as of
            the last refresh (every ``stats_interval`` seconds).
        oldest_undelivered_age: seconds since the oldest undelivered row entered the
            outbox, or ``None`` when it is empty (same refresh).
        held: prepared events whose response is still being sent.
        in_memory: events waiting in memory or in flight to the provider.
        unwritten: accepted events not yet committed to the outbox.
    """

    queued: int
    sent: int
    retried: int
    dead_lettered: int
    outbox_depth: int
    oldest_undelivered_age: float | None
    held: int = 0
    in_memory: int = 0
    unwritten: int = 0


class Reporter:
    """Deliver usage events to ``provider`` through a durable SQLite outbox.

    Args:
        provider: the remote provider whose :meth:`~Provider.report` delivers events; its
            ``max_batch`` caps every call. The reporter does not open or close it.
        path: the outbox file, shared by every worker process of the app.
        max_batch: events per ``report()`` call; default and upper bound
            ``provider.max_batch``.
        max_delay: seconds an event may wait for a batch to fill before it is sent.
        drain_timeout: seconds :meth:`aclose` spends delivering what is left.
        concurrency: batches in flight to the provider at once.
        max_queue: events held in memory, waiting or in flight; beyond it they wait in
            the outbox file only (bounded memory for any backlog).
        call_timeout: seconds one ``report()`` call may take before it counts as a
            retryable failure.
        retry_attempts: attempts per batch before it goes back to the outbox.
        retry_timeout: seconds of retrying per batch before it goes back to the outbox.
        wait_initial, wait_max, wait_jitter: exponential backoff between attempts, in
            seconds (``stamina``): ``min(wait_max, wait_initial * 2**n + U(0, wait_jitter))``.
        retry_cooldown: seconds a batch waits in the outbox after ``retry_attempts``
            failed, and every sender of this process pauses (the provider looks down).
        lease: seconds this process's claims outlive its last heartbeat; after that other
            workers may deliver its rows (a prepared row included).
        poll_interval: seconds between looks at the outbox for rows other processes left.
        stats_interval: seconds between refreshes of ``outbox_depth`` and the oldest age.
        synchronous: ``"NORMAL"`` (survives kill -9) or ``"FULL"`` (also power loss).
        delete_delay: seconds a delivered event's row may wait to be deleted (it goes with
            the next group commit, or alone after this delay). A process killed within
            that window sends those events again (same idempotency keys).
        max_retry_age: seconds a retryable failure may keep an event undelivered (counted
            from when it entered the outbox; default 3 days). An event older than that
            whose delivery fails again is dead-lettered (code ``retry_age_exceeded``, the
            last error as message) and logged, so ``usage-middleware outbox retry`` can
            replay it; ``outbox status`` counts the undelivered ones past the bound.
        max_retry_after: most seconds a provider's ``Retry-After`` pauses delivery; default
            ``provider.max_retry_after`` when it has one, else 300.

    Raises:
        ConfigurationError: a setting out of range (``max_batch`` above the provider's cap).
    """

    def __init__(
        self,
        provider: Provider,
        *,
        path: str | os.PathLike[str] = "usage-outbox.db",
        max_batch: int | None = None,
        max_delay: float = 0.05,
        drain_timeout: float = 5.0,
        concurrency: int = 8,
        max_queue: int = 10_000,
        call_timeout: float = 30.0,
        retry_attempts: int = 5,
        retry_timeout: float = 60.0,
        wait_initial: float = 0.1,
        wait_max: float = 5.0,
        wait_jitter: float = 1.0,
        retry_cooldown: float = 10.0,
        lease: float = 30.0,
        poll_interval: float = 1.0,
        stats_interval: float = 5.0,
        synchronous: Synchronous = "NORMAL",
        delete_delay: float = 0.1,
        max_retry_age: float = DEFAULT_MAX_RETRY_AGE,
        max_retry_after: float | None = None,
    ) -> None:
        cap = provider.max_batch
        if not isinstance(cap, int) or cap < 1:
            raise ConfigurationError(f"{type(provider).__name__}.max_batch must be an int >= 1")
        if max_batch is None:
            max_batch = cap
        if not 1 <= max_batch <= cap:
            raise ConfigurationError(
                f"max_batch must be between 1 and {type(provider).__name__}.max_batch={cap},"
                f" got {max_batch}"
            )
        for name, value in (
            ("concurrency", concurrency),
            ("retry_attempts", retry_attempts),
        ):
            if value < 1:
                raise ConfigurationError(f"{name} must be >= 1, got {value}")
        if max_queue < max_batch:
            raise ConfigurationError(f"max_queue ({max_queue}) must be >= max_batch ({max_batch})")
        for name, seconds in (
            ("max_delay", max_delay),
            ("drain_timeout", drain_timeout),
            ("wait_initial", wait_initial),
            ("wait_max", wait_max),
            ("wait_jitter", wait_jitter),
            ("retry_cooldown", retry_cooldown),
            ("delete_delay", delete_delay),
        ):
            if seconds < 0:
                raise ConfigurationError(f"{name} must be >= 0 seconds, got {seconds}")
        for name, seconds in (
            ("call_timeout", call_timeout),
            ("retry_timeout", retry_timeout),
            ("lease", lease),
            ("poll_interval", poll_interval),
            ("stats_interval", stats_interval),
            ("max_retry_age", max_retry_age),
        ):
            if seconds <= 0:
                raise ConfigurationError(f"{name} must be > 0 seconds, got {seconds}")
        if synchronous not in ("NORMAL", "FULL"):
            raise ConfigurationError(f"synchronous must be 'NORMAL' or 'FULL', got {synchronous!r}")

        self.provider = provider
        self.path = os.fspath(path)
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.drain_timeout = drain_timeout
        self._concurrency = concurrency
        self._max_queue = max_queue
        self._claim_size = max(max_batch, min(max_queue, 1000))
        self._call_timeout = call_timeout
        self._retry_kw: dict[str, Any] = {
            "attempts": retry_attempts,
            "timeout": retry_timeout,
            "wait_initial": wait_initial,
            "wait_max": wait_max,
            "wait_jitter": wait_jitter,
        }
        self._retry_timeout = retry_timeout
        self._retry_cooldown = retry_cooldown
        if max_retry_after is None:
            max_retry_after = getattr(provider, "max_retry_after", _DEFAULT_MAX_RETRY_AFTER)
        if not (isinstance(max_retry_after, int | float) and 1 <= max_retry_after < math.inf):
            raise ConfigurationError(f"max_retry_after must be >= 1 second, got {max_retry_after}")
        self._max_retry_after = float(max_retry_after)
        # Rows further ahead than any wait written here are due (an older version's
        # unbounded Retry-After): see Outbox.claim.
        self._max_wait = max(MAX_NOT_BEFORE, 2 * max(retry_cooldown, self._max_retry_after))
        #: Whether the provider deduplicates resent events (Spaire's external_id); when
        #: not, a call cut off by call_timeout may have been counted: ambiguous.
        self._deduplicates = bool(getattr(provider, "deduplicates", True))
        self._lease = lease
        self._poll_interval = poll_interval
        self._stats_interval = stats_interval
        self._synchronous: Synchronous = synchronous
        self.max_retry_age = float(max_retry_age)

        self._state = ProviderState.NEW
        self._closing = False
        self._owner = 0
        self._outbox: Outbox | None = None
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        self._on_thread = 0  # outbox calls queued on or running on the reporter's thread
        self._tasks: list[asyncio.Task[None]] = []
        self._senders: list[asyncio.Task[None]] = []
        self._closed: asyncio.Event | None = None
        self._stop_housekeeper = asyncio.Event()
        self._checkpoint_wake = asyncio.Event()
        self._commits = 0  # group commits since the last checkpoint was asked for

        # Event plumbing (touched only on the loop thread).
        self._pending: list[_Entry] = []  # accepted, not yet handed to the writer
        self._writing = 0  # entries in the transaction being committed now
        self._held: dict[str, _Entry] = {}  # prepared, by idempotency key
        self._ready: collections.deque[_Entry] = collections.deque()
        self._inflight = 0
        self._deletes: list[int] = []
        self._delete_delay = delete_delay
        self._delete_timer: asyncio.TimerHandle | None = None
        self._frees: list[int] = []
        self._dead: list[tuple[int, int | None, str | None, str | None]] = []
        self._releases: list[tuple[int, float, str]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._writer_wake = asyncio.Event()
        self._sender_wake = asyncio.Event()
        self._db_dirty = True  # the outbox may hold rows we could claim
        self._dirty_gen = 0
        self._claiming = False
        self._paused_until = 0.0  # monotonic; senders wait until then

        # Counters.
        self._queued = 0
        self._sent = 0
        self._retried = 0
        self._dead_lettered = 0
        self._depth = 0
        self._oldest: float | None = None  # epoch seconds

    # -- lifecycle --------------------------------------------------------------------------

    @property
    def state(self) -> ProviderState:
        return self._state

    async def open(self) -> None:
        """Open the outbox and start delivering, inside the running event loop.

        Rows left by a process that died (or shut down) are delivered too. Idempotent while
        open; a closed reporter opens again (new tasks, thread and events on the running
        loop, under a new owner id).

        Raises:
            ConfigurationError: the outbox file cannot be opened (the message names the
                path), or the reporter is still closing.
        """
        if self._state is ProviderState.OPEN:
            return
        if self._closing:
            raise ConfigurationError("Reporter is closing; open it again once aclose() returned")
        if self._state is ProviderState.CLOSED:  # reopen: loop-bound parts are made anew
            self._outbox = None
            self._stop_housekeeper = asyncio.Event()
            self._checkpoint_wake = asyncio.Event()
            self._writer_wake = asyncio.Event()
            self._sender_wake = asyncio.Event()
            self._waiters = []
            self._paused_until = 0.0
        self._executor = concurrent.futures.ThreadPoolExecutor(
            max_workers=1, thread_name_prefix="usage-outbox"
        )
        try:
            self._outbox = await self._run(Outbox, self.path, synchronous=self._synchronous)
            await self._run(self._outbox.no_autocheckpoint)
            self._owner = await self._run(self._outbox.register, self._lease)
            await self._run(self._outbox.reap)
            self._depth, self._oldest = await self._run(self._outbox.depth)
        except Exception as exc:
            if self._outbox is not None:
                await self._run(self._outbox.close)
            self._executor.shutdown(wait=False)
            self._state = ProviderState.CLOSED
            self._closed = None
            raise ConfigurationError(f"cannot open the outbox at {self.path}: {exc}") from exc
        self._closed = asyncio.Event()
        self._state = ProviderState.OPEN
        self._tasks = [
            asyncio.create_task(self._writer(), name="usage-outbox-writer"),
            asyncio.create_task(self._housekeeper(), name="usage-outbox-heartbeat"),
            asyncio.create_task(self._checkpointer(), name="usage-outbox-checkpoint"),
        ]
        self._senders = [
            asyncio.create_task(self._sender(), name=f"usage-outbox-sender-{i}")
            for i in range(self._concurrency)
        ]
        if self._pending:
            self._writer_wake.set()
        log.info(
            "outbox %s open (owner %d): %d undelivered events",
            self.path,
            self._owner,
            self._depth,
        )

    async def aclose(self) -> None:
        """Deliver what is left for up to ``drain_timeout`` seconds, then stop.

        What was not delivered by then stays in the outbox (nothing is dropped) and any
        worker, or the next process, delivers it without waiting for a lease to expire.
        Idempotent; :meth:`open` opens it again.
        """
        if self._state is ProviderState.CLOSED or self._closing:
            if self._closed is not None:
                await self._closed.wait()
            return
        if self._state is ProviderState.NEW:
            self._state = ProviderState.CLOSED
            if self._pending:  # enqueued before open(): keep them
                entries, self._pending = self._pending, []
                await asyncio.to_thread(self._write_direct, entries)
            return
        if any(on_another_loop(task) for task in (*self._tasks, *self._senders)):
            await self._close_after_lost_loop()
            return
        assert self._closed is not None and self._outbox is not None
        self._closing = True
        self._sender_wake.set()
        try:
            done, _ = await asyncio.wait(self._senders, timeout=self.drain_timeout)
            if len(done) < len(self._senders):
                log.info(
                    "drain deadline (%.1fs) reached; undelivered events stay in the outbox",
                    self.drain_timeout,
                )
            await _cancel(self._senders)
            self._stop_housekeeper.set()
            await self._tasks[1]  # the housekeeper finishes its round and returns
            self._checkpoint_wake.set()
            await self._tasks[2]
            self._writer_wake.set()
            await self._tasks[0]  # the writer flushes what is pending, then returns
            # From here on enqueue()/confirm() write to the file directly and cancel()
            # deletes directly: nothing is left waiting on a writer that is gone.
            self._state = ProviderState.CLOSED
            if self._pending:  # the outbox failed to take these: one last try
                entries, self._pending = self._pending, []
                try:
                    await asyncio.to_thread(self._write_direct, entries)
                except Exception:
                    log.exception(
                        "%d events could not be written to the outbox %s and are lost",
                        len(entries),
                        self.path,
                    )
            counters = self._counters()
            try:
                await self._run(self._outbox.retire, self._owner, counters)
            except Exception:
                log.exception("could not end this reporter's lease in %s", self.path)
            await self._run(self._outbox.close)
        finally:
            self._state = ProviderState.CLOSED
            self._closing = False
            if self._delete_timer is not None:
                self._delete_timer.cancel()
                self._delete_timer = None
            if self._executor is not None:
                self._executor.shutdown(wait=False)
            self._closed.set()
        log.info(
            "outbox %s closed: queued=%d sent=%d retried=%d dead_lettered=%d",
            self.path,
            *self._counters(),
        )

    async def __aenter__(self) -> Reporter:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    # -- the request-side API ---------------------------------------------------------------

    def enqueue(self, event: UsageEvent) -> None:
        """Accept ``event`` for delivery. O(1); never blocks; never raises into a request.

        The event is durable within one group commit (:meth:`flush` waits for it). After
        :meth:`aclose` the event is written to the outbox directly (a warning is logged),
        so a late charge is not lost.
        """
        if self._state is ProviderState.CLOSED:
            self._late(event)
            return
        self._queued += 1
        self._pending.append(_Entry(event, _READY, time.monotonic()))
        self._writer_wake.set()

    async def prepare(self, event: UsageEvent) -> None:
        """Make ``event`` durable in the outbox, held back from delivery.

        Returns once its row committed (group commit: concurrent prepares share one
        transaction). The event is delivered after :meth:`confirm`, never after
        :meth:`cancel`; if the process dies in between, it is delivered after the restart
        (the response was about to be sent). Never raises into the request: when the
        outbox cannot be written it logs, keeps the event in memory, and returns.
        """
        key = event.idempotency_key
        if key in self._held:
            return
        if self._state is ProviderState.CLOSED:
            return  # confirm() writes it directly; cancel() forgets it
        entry = _Entry(event, _HELD, 0.0)
        self._held[key] = entry
        self._pending.append(entry)
        await self._flushed()

    async def prepare_alone(self, event: UsageEvent) -> None:
        """:meth:`prepare` for a caller that knows no other prepare can join this group
        commit (one request in flight): commit at once, inline, without waiting a turn of
        the event loop for the writer task. Falls back to :meth:`prepare`'s group commit
        when the file is busy. Same guarantees as :meth:`prepare`.
        """
        key = event.idempotency_key
        if key in self._held:
            return
        if self._state is not ProviderState.OPEN or self._closing:
            await self.prepare(event)
            return
        entry = _Entry(event, _HELD, 0.0)
        self._held[key] = entry
        self._pending.append(entry)
        if not self._commit_inline():
            await self._flushed()

    def confirm(self, event: UsageEvent) -> None:
        """Let a prepared ``event`` be delivered. O(1); never raises.

        An event that was not prepared is enqueued instead.
        """
        entry = self._held.pop(event.idempotency_key, None)
        if entry is None:
            self.enqueue(event)
            return
        self._queued += 1
        entry.state = _READY
        entry.t = time.monotonic()
        if entry.rowid is None:
            return  # still being written; the writer routes it once it is durable
        if self._room() > 0:
            self._push_ready(entry)
        else:  # no room in memory: hand the row to whichever sender claims it
            self._frees.append(entry.rowid)
            self._writer_wake.set()

    async def cancel(self, event: UsageEvent) -> None:
        """Make sure a prepared ``event`` is never delivered (its request failed).

        Returns once its row is deleted from the outbox. Unknown events are ignored.
        Never raises.
        """
        entry = self._held.pop(event.idempotency_key, None)
        if entry is None:
            return
        entry.state = _CANCELLED
        if entry.rowid is not None and not self._writer_running():
            try:  # the reporter closed after this prepare: delete the row directly
                await asyncio.to_thread(self._delete_direct, entry.rowid, event.idempotency_key)
            except Exception:
                log.exception("could not cancel event %s in %s", event.idempotency_key, self.path)
            return
        if entry.rowid is not None:
            self._deletes.append(entry.rowid)
        await self._flushed()

    async def flush(self) -> None:
        """Wait until everything accepted so far is committed to the outbox (or failed)."""
        await self._flushed()

    def stats(self) -> ReporterStats:
        """Return this reporter's counters (see :class:`ReporterStats`)."""
        return ReporterStats(
            queued=self._queued,
            sent=self._sent,
            retried=self._retried,
            dead_lettered=self._dead_lettered,
            outbox_depth=self._depth,
            oldest_undelivered_age=(
                None if self._oldest is None else max(0.0, time.time() - self._oldest)
            ),
            held=len(self._held),
            in_memory=len(self._ready) + self._inflight,
            unwritten=len(self._pending) + self._writing,
        )

    async def outbox_status(self) -> OutboxStatus:
        """Read the outbox file's exact status now (all processes); see ``OutboxStatus``
        (``overdue`` counts rows older than this reporter's ``max_retry_age``)."""
        if self._state is not ProviderState.OPEN or self._outbox is None:
            raise ConfigurationError("the reporter is not open")
        return await self._run(self._outbox.status, self.max_retry_age)

    # -- internals: threads -----------------------------------------------------------------

    def _run(self, fn: Callable[..., _T], *args: Any, **kwargs: Any) -> asyncio.Future[_T]:
        """Run a blocking outbox call on the reporter's thread (waiting for locks)."""
        assert self._executor is not None
        loop = asyncio.get_running_loop()
        self._on_thread += 1
        future = loop.run_in_executor(self._executor, self._threaded, fn, args, kwargs)
        future.add_done_callback(self._thread_done)
        return future

    def _threaded(self, fn: Callable[..., _T], args: tuple[Any, ...], kwargs: Any) -> _T:
        if self._outbox is not None:
            self._outbox.wait_when_busy(True)
        return fn(*args, **kwargs)

    def _thread_done(self, _: asyncio.Future[Any]) -> None:
        self._on_thread -= 1

    async def _apply(self, *args: Any, **kwargs: Any) -> int:
        """The writer's group commit: inline on the loop thread when it can, else threaded.

        Inline (busy timeout 0, no call queued on the thread) it takes tens of
        microseconds, or fails at once with "database is locked" having done nothing (another
        process is writing) and goes to the thread, which waits. A thread hop per group
        commit cost a request ~300 us of latency at one request in flight, and the GIL
        hand-offs slowed every other request (measured with bench/bench_cache.py).
        """
        outbox = self._outbox
        assert outbox is not None
        if not self._on_thread:
            outbox.wait_when_busy(False)
            try:
                return outbox.apply(*args, **kwargs)
            except sqlite3.OperationalError as exc:
                if not is_sqlite_busy(exc):
                    raise
        return await self._run(outbox.apply, *args, **kwargs)

    def _counters(self) -> tuple[int, int, int, int]:
        return (self._queued, self._sent, self._retried, self._dead_lettered)

    def _writer_running(self) -> bool:
        return bool(self._tasks) and not self._tasks[0].done()

    def _flushed(self) -> asyncio.Future[None]:
        """A future resolved after the next group commit (at once if no writer runs)."""
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        if self._writer_running():
            self._waiters.append(fut)
            self._writer_wake.set()
        else:
            fut.set_result(None)
        return fut

    def _mark_dirty(self) -> None:
        self._db_dirty = True
        self._dirty_gen += 1
        self._sender_wake.set()

    def _push_ready(self, entry: _Entry) -> None:
        """Queue ``entry`` for a sender; wake the senders only when that changes their plan.

        Senders sleep without a deadline on an empty queue and until the oldest event is
        ``max_delay`` old otherwise, so they need waking when the queue stops being empty or
        a batch is full. (Waking all of them per event cost every request ~15 us.)
        """
        ready = self._ready
        ready.append(entry)
        n = len(ready)
        if n == 1 or n >= self.max_batch:
            self._sender_wake.set()

    def _delete_soon(self) -> None:
        """Delete delivered rows with the next group commit, at the latest in
        ``delete_delay`` seconds: not one transaction per delivered batch."""
        if self._closing or self._delete_delay == 0:
            self._writer_wake.set()
        elif self._delete_timer is None:
            self._delete_timer = asyncio.get_running_loop().call_later(
                self._delete_delay, self._delete_due
            )

    def _delete_due(self) -> None:
        self._delete_timer = None
        if self._deletes:
            self._writer_wake.set()

    # -- internals: the writer (group commit) -------------------------------------------------

    async def _close_after_lost_loop(self) -> None:
        """Close a reporter whose tasks ran on an event loop that is gone (no lifespan).

        Those tasks will never run again; what they had in memory (accepted events,
        pending frees, deletes, dead letters) is written now, from the running loop, and
        the rows stay in the outbox for the next :meth:`open` (or another worker) to send.
        """
        assert self._outbox is not None
        self._closing = True
        try:
            inserts, written = self._plan(self._pending)
            try:
                first = await self._apply(
                    self._owner,
                    inserts,
                    deletes=self._deletes,
                    frees=self._frees,
                    dead=self._dead,
                    releases=self._releases,
                )
                for i, entry in enumerate(written):
                    entry.rowid = first + i
            except Exception:
                log.exception("outbox %s: writing on close failed", self.path)
                await asyncio.to_thread(self._write_direct, written)
            self._pending, self._deletes, self._frees = [], [], []
            self._dead, self._releases, self._waiters = [], [], []
            self._tasks, self._senders = [], []
            try:
                await self._run(self._outbox.retire, self._owner, self._counters())
            except Exception:
                log.exception("could not end this reporter's lease in %s", self.path)
            await self._run(self._outbox.close)
        finally:
            self._state = ProviderState.CLOSED
            self._closing = False
            if self._delete_timer is not None:
                self._delete_timer.cancel()
                self._delete_timer = None
            if self._executor is not None:
                self._executor.shutdown(wait=False)
            self._closed = asyncio.Event()
            self._closed.set()

    async def _writer(self) -> None:
        assert self._outbox is not None
        failures = 0
        while True:
            if not (
                self._pending
                or self._deletes
                or self._frees
                or self._dead
                or self._releases
                or self._waiters
            ):
                if self._closing and not self._senders_alive():
                    return
                self._writer_wake.clear()
                await self._writer_wake.wait()
                continue
            if not (self._pending or self._deletes or self._frees or self._dead or self._releases):
                waiters, self._waiters = self._waiters, []
                _resolve(waiters)  # nothing to write since they asked
                continue
            entries, self._pending = self._pending, []
            deletes, self._deletes = self._deletes, []
            frees, self._frees = self._frees, []
            dead, self._dead = self._dead, []
            releases, self._releases = self._releases, []
            waiters, self._waiters = self._waiters, []

            inserts, written = self._plan(entries)
            self._writing = len(written)
            try:
                first = await self._apply(
                    self._owner,
                    inserts,
                    deletes=deletes,
                    frees=frees,
                    dead=dead,
                    releases=releases,
                )
            except Exception:
                failures += 1
                self._writing = 0
                if failures == 1 or failures % 100 == 0:
                    log.exception(
                        "cannot write the outbox %s (attempt %d); %d events kept in memory",
                        self.path,
                        failures,
                        len(written),
                    )
                self._pending[:0] = written
                self._deletes[:0] = deletes
                self._frees[:0] = frees
                self._dead[:0] = dead
                self._releases[:0] = releases
                _resolve(waiters)  # a request never waits on a broken disk
                if self._closing and not self._senders_alive():
                    return
                await asyncio.sleep(min(0.05 * 2**failures, 2.0))
                continue
            failures = 0
            self._writing = 0
            self._route(written, first, freed=bool(frees or releases))
            _resolve(waiters)

    def _plan(
        self, entries: list[_Entry]
    ) -> tuple[list[tuple[UsageEvent, bool, bool]], list[_Entry]]:
        """The rows a group commit inserts for ``entries`` (cancelled ones skipped), and
        which entries they are. A ready row is owned (kept in memory) while there is room."""
        room = self._room()
        inserts: list[tuple[UsageEvent, bool, bool]] = []
        written: list[_Entry] = []
        for e in entries:
            if e.state == _CANCELLED:
                continue
            held = e.state == _HELD
            owned = held or room > 0
            if not held and owned:
                room -= 1
            e.owned = owned
            inserts.append((e.event, owned, held))
            written.append(e)
        return inserts, written

    def _route(self, written: list[_Entry], first: int, *, freed: bool) -> None:
        """After a group commit: give entries their row ids and send on the ready ones.

        ``freed``: the commit handed rows back to the outbox; a sender should claim them
        (a draining reporter stops once it thinks the outbox holds nothing for it).
        """
        spilled = freed
        for i, e in enumerate(written):
            e.rowid = first + i
            if e.state == _READY:
                if not e.owned:
                    spilled = True
                elif self._room() > 0:
                    self._push_ready(e)
                else:  # prepared, then confirmed while being written; no room
                    self._frees.append(e.rowid)
            elif e.state == _CANCELLED:  # cancelled while being written
                self._deletes.append(e.rowid)
        if spilled:
            self._mark_dirty()
        elif self._closing:  # a closing sender waits for held/pending to empty
            self._sender_wake.set()
        self._commits += 1
        if self._commits >= _CHECKPOINT_EVERY:
            self._commits = 0
            self._checkpoint_wake.set()

    def _commit_inline(self) -> bool:
        """Run the group commit now, in the caller's step, when nothing else is writing.

        Whether it committed. False (nothing changed) when the writer or the reporter's
        thread is busy, the reporter is not open, or the file is locked by another process
        or failing; the writer task then does it (waiting for the lock, logging errors).
        """
        outbox = self._outbox
        if (
            self._state is not ProviderState.OPEN
            or self._closing
            or self._writing
            or self._on_thread
            or outbox is None
        ):
            return False
        inserts, written = self._plan(self._pending)
        freed = bool(self._frees or self._releases)
        outbox.wait_when_busy(False)
        try:
            first = outbox.apply(
                self._owner,
                inserts,
                deletes=self._deletes,
                frees=self._frees,
                dead=self._dead,
                releases=self._releases,
            )
        except Exception:
            self._writer_wake.set()
            return False
        self._pending = []
        self._deletes = []
        self._frees = []
        self._dead = []
        self._releases = []
        waiters, self._waiters = self._waiters, []
        self._route(written, first, freed=freed)
        _resolve(waiters)
        return True

    def _senders_alive(self) -> bool:
        return any(not t.done() for t in self._senders)

    def _write_direct(self, entries: Sequence[_Entry]) -> None:
        """Write entries as free rows from outside the running reporter (before open /
        after close); any worker, or the next process, delivers them."""
        todo = [e for e in entries if e.state != _CANCELLED]
        if not todo:
            return
        outbox = Outbox(self.path, synchronous=self._synchronous)
        try:
            first = outbox.apply(0, [(e.event, False, False) for e in todo])
        finally:
            outbox.close()
        for i, e in enumerate(todo):
            e.rowid = first + i  # a later cancel() deletes it directly

    def _delete_direct(self, rowid: int, key: str) -> None:
        outbox = Outbox(self.path, synchronous=self._synchronous)
        try:
            outbox.delete(rowid, key)
        finally:
            outbox.close()

    def _late(self, event: UsageEvent) -> None:
        log.warning(
            "event %s for %s arrived after the reporter closed; writing it to the outbox",
            event.idempotency_key,
            event.feature,
        )
        try:
            self._write_direct([_Entry(event, _READY, 0.0)])
        except Exception:
            log.exception("could not write a late event to %s; it is lost", self.path)

    # -- internals: heartbeat, reaping, stats -----------------------------------------------

    async def _housekeeper(self) -> None:
        assert self._outbox is not None
        outbox = self._outbox
        beat_every = self._lease / 3
        loop = asyncio.get_running_loop()
        next_beat = next_stats = loop.time()
        reader: Outbox | None = None
        try:
            while not self._stop_housekeeper.is_set():
                try:
                    async with asyncio.timeout(self._poll_interval):
                        await self._stop_housekeeper.wait()
                    return
                except TimeoutError:
                    pass
                now = loop.time()
                self._mark_dirty()  # look for rows other processes left or that became due
                try:
                    if now >= next_beat:
                        next_beat = now + beat_every
                        if not await self._run(
                            outbox.heartbeat, self._owner, self._lease, self._counters()
                        ):
                            await self._reregister()
                        if await self._run(outbox.reap):
                            self._mark_dirty()
                    if now >= next_stats:
                        next_stats = now + self._stats_interval
                        if reader is None:
                            reader = await asyncio.to_thread(
                                Outbox, self.path, synchronous=self._synchronous, create=False
                            )
                        self._depth, self._oldest = await asyncio.to_thread(reader.depth)
                        # The writer commits inline with autocheckpoint off: copy the WAL
                        # here, on a connection of its own, off the event loop.
                        await asyncio.to_thread(reader.checkpoint)
                except Exception:
                    log.exception("outbox %s housekeeping failed", self.path)
        finally:
            if reader is not None:
                reader.close()

    async def _checkpointer(self) -> None:
        """Copy the WAL into the database every ``_CHECKPOINT_EVERY`` group commits, on a
        connection of its own, off the event loop. A WAL left to grow between the
        housekeeper's rounds made every commit slower (15 -> 40 us at a few hundred MB)."""
        conn: Outbox | None = None
        try:
            while True:
                await self._checkpoint_wake.wait()
                self._checkpoint_wake.clear()
                if self._stop_housekeeper.is_set():
                    return
                try:
                    if conn is None:
                        conn = await asyncio.to_thread(
                            Outbox, self.path, synchronous=self._synchronous, create=False
                        )
                    await asyncio.to_thread(conn.checkpoint)
                except Exception:
                    log.exception("outbox %s checkpoint failed", self.path)
        finally:
            if conn is not None:
                conn.close()

    async def _reregister(self) -> None:
        """Our lease expired (the loop stalled) and our rows were freed: start afresh."""
        assert self._outbox is not None
        log.error(
            "reporter %d stalled longer than its lease (%.0fs); its rows were handed to"
            " other workers and may be delivered twice",
            self._owner,
            self._lease,
        )
        self._owner = await self._run(self._outbox.register, self._lease)
        self._ready.clear()
        self._mark_dirty()

    # -- internals: senders -----------------------------------------------------------------

    async def _sender(self) -> None:
        while True:
            try:
                batch = await self._take()
            except Exception:  # a bug here must not cost a sender for the process's life
                log.exception("outbox sender failed; continuing")
                await asyncio.sleep(self._poll_interval)
                continue
            if batch is None:
                return
            self._inflight += len(batch)
            try:
                await self._deliver(batch)
            finally:
                self._inflight -= len(batch)
                if self._closing:
                    self._sender_wake.set()

    async def _take(self) -> list[_Entry] | None:
        """Wait for the next batch: full, or its oldest event ``max_delay`` old."""
        ready = self._ready
        while True:
            await self._pause()
            n = len(ready)
            now = time.monotonic()
            if n >= self.max_batch or (n and (self._closing or now >= ready[0].t + self.max_delay)):
                return [ready.popleft() for _ in range(min(n, self.max_batch))]
            if n < self.max_batch and self._db_dirty and not self._claiming and self._room() > 0:
                await self._claim()
                continue  # the queue changed while we were away: look again
            if n:
                timeout: float | None = ready[0].t + self.max_delay - now
            elif self._closing:
                if not (
                    self._pending
                    or self._writing
                    or self._held
                    or self._inflight
                    or self._db_dirty
                    or self._claiming
                ):
                    return None
                timeout = None
            else:
                timeout = None
            self._sender_wake.clear()
            try:
                async with asyncio.timeout(timeout):
                    await self._sender_wake.wait()
            except TimeoutError:
                pass

    def _room(self) -> int:
        """Events that may still enter memory (``max_queue`` minus waiting and in flight)."""
        return self._max_queue - len(self._ready) - self._inflight

    async def _claim(self) -> int:
        """Move free, due rows from the outbox into memory; return how many."""
        assert self._outbox is not None
        limit = min(self._room(), self._claim_size)
        gen = self._dirty_gen
        self._claiming = True
        try:
            rows = await self._run(self._outbox.claim, self._owner, limit, max_wait=self._max_wait)
        except Exception:
            log.exception("cannot claim rows from the outbox %s", self.path)
            self._db_dirty = False  # the housekeeper asks again after poll_interval
            return 0
        finally:
            self._claiming = False
        if len(rows) < limit and gen == self._dirty_gen:
            self._db_dirty = False
        self._retried += sum(1 for r in rows if r.attempts)  # back after failed rounds
        if rows:
            for r in rows:
                entry = _Entry(r.event, _READY, 0.0, r.rowid, r.created or None)
                entry.ambiguous = bool(r.last_error and r.last_error.startswith(_AMBIGUOUS))
                self._ready.append(entry)
            self._sender_wake.set()
        return len(rows)

    async def _pause(self) -> None:
        """Sleep out a pause (a Retry-After, or a cool-down after failed retries)."""
        wait = self._paused_until - time.monotonic()
        if wait > 0:
            await asyncio.sleep(wait)

    def _pause_all(self, seconds: float) -> None:
        self._paused_until = max(self._paused_until, time.monotonic() + seconds)

    def _retry_on(self, exc: Exception) -> bool | float:
        """stamina's hook: retry retryable errors, waiting ``retry_after`` (capped) when
        given; never an ambiguous failure (the outbox backs it off and resends it once)."""
        if self._is_ambiguous(exc):
            return False
        if isinstance(exc, RetryableProviderError):
            after = self._cap(exc.retry_after)
            if after is not None and after > 0:
                self._pause_all(after)  # a 429/503 speaks for the whole provider
                return after if after <= self._retry_timeout else False
            return True
        return isinstance(exc, TimeoutError)

    def _is_ambiguous(self, exc: BaseException) -> bool:
        """Whether the failed call may have been counted by a provider that cannot dedupe."""
        if isinstance(exc, ProviderError):
            return exc.ambiguous
        return isinstance(exc, TimeoutError) and not self._deduplicates

    def _cap(self, after: object) -> float | None:
        """A provider's Retry-After as seconds within ``[0, max_retry_after]``, or None."""
        if isinstance(after, bool) or not isinstance(after, int | float):
            return None
        if math.isnan(after) or after < 0:
            return None
        return min(float(after), self._max_retry_after)

    async def _send(self, events: list[UsageEvent]) -> None:
        """One batch, retried in process (stamina) on retryable errors."""
        async for attempt in stamina.retry_context(on=self._retry_on, **self._retry_kw):
            with attempt:
                if attempt.num > 1:
                    self._retried += len(events)
                await self._pause()
                async with asyncio.timeout(self._call_timeout):
                    await self.provider.report(events)

    async def _deliver(self, batch: list[_Entry]) -> None:
        events = [e.event for e in batch]
        try:
            await self._send(events)
        except PermanentProviderError as exc:
            if len(batch) > 1:  # one bad event rejects a whole batch: find it
                mid = len(batch) // 2
                await self._deliver(batch[:mid])
                await self._deliver(batch[mid:])
            else:
                self._dead_letter(batch[0], exc.status, exc.code, exc.message)
            return
        except Exception as exc:  # retries exhausted, or a provider bug: keep, try later
            if self._is_ambiguous(exc):
                again = [e for e in batch if e.ambiguous]
                for e in again:  # sent twice, each time perhaps counted: a human decides
                    self._dead_letter(
                        e,
                        None,
                        "ambiguous",
                        "sent twice, and both times the provider may have counted it"
                        f" without answering ({str(exc)[:300]}); check the provider's usage,"
                        " then replay with `outbox retry` or purge it",
                    )
                batch = [e for e in batch if not e.ambiguous]
                for e in batch:
                    e.ambiguous = True
                if not batch:
                    return
            self._release(batch, exc)
            return
        self._sent += len(batch)
        self._deletes.extend(e.rowid for e in batch if e.rowid is not None)
        self._delete_soon()

    def _dead_letter(
        self, entry: _Entry, status: int | None, code: str | None, message: str
    ) -> None:
        ev = entry.event
        self._dead_lettered += 1
        log.warning(
            "%s: event %s (%s, %s, %d units) moved to dead letters: status=%s code=%s %s",
            self.provider.name,
            ev.idempotency_key,
            ev.customer,
            ev.feature,
            ev.units,
            status,
            code,
            message,
        )
        assert entry.rowid is not None
        self._dead.append((entry.rowid, status, code, message))
        self._writer_wake.set()

    def _release(self, batch: list[_Entry], exc: Exception) -> None:
        batch = self._past_retry_age(batch, exc)
        if not batch:
            return
        after = self._cap(getattr(exc, "retry_after", None))
        cooldown = max(self._retry_cooldown, after or 0.0)
        cooldown *= 1 + random.random() / 2  # jitter: workers do not return in step
        self._pause_all(cooldown)
        if isinstance(exc, RetryableProviderError | TimeoutError):
            log.warning(
                "%s unavailable (%s); %d events back to the outbox for %.1fs",
                self.provider.name,
                str(exc) or type(exc).__name__,
                len(batch),
                cooldown,
            )
        else:
            log.error(
                "%s.report raised %r; %d events back to the outbox for %.1fs",
                self.provider.name,
                exc,
                len(batch),
                cooldown,
                exc_info=exc,
            )
        not_before = time.time() + cooldown
        error = f"{type(exc).__name__}: {exc}"[:480]
        marked = _AMBIGUOUS + error  # sticky: a later failure of another kind keeps it
        self._releases.extend(
            (e.rowid, not_before, marked if e.ambiguous else error)
            for e in batch
            if e.rowid is not None
        )
        self._writer_wake.set()

    def _past_retry_age(self, batch: list[_Entry], exc: Exception) -> list[_Entry]:
        """Dead-letter the events of a failed batch that are older than ``max_retry_age``
        (a retryable failure may not keep an event forever); return the others."""
        now = time.time()
        keep: list[_Entry] = []
        for entry in batch:
            age = now - entry.created
            if age <= self.max_retry_age or entry.rowid is None:
                keep.append(entry)
                continue
            error = f"{type(exc).__name__}: {exc}"
            message = (
                f"undelivered for {age:.0f}s (max_retry_age {self.max_retry_age:.0f}s);"
                f" last error: {error}"
            )[:500]
            self._dead_letter(entry, getattr(exc, "status", None), "retry_age_exceeded", message)
        return keep


def _resolve(waiters: list[asyncio.Future[None]]) -> None:
    for w in waiters:
        if not w.done():
            w.set_result(None)


async def _cancel(tasks: Sequence[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for r in results:
        if isinstance(r, Exception):
            log.error("reporter task failed", exc_info=r)
