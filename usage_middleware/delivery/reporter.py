"""The Reporter: the delivery engine between a request's charge and a sink's ``report``.

A charge is written to the outbox (:mod:`usage_middleware.outbox`) in a group commit
(:mod:`.group_commit`) before it counts as accepted, then delivered in batches by the
senders (:mod:`.senders`), retried, and deleted once delivered. The guarantees (durability,
crash windows, several processes, dead letters, ``max_retry_age``, ambiguous resends) are
in docs/architecture.md, "Storage and delivery".

Lifecycle: nothing starts in ``__init__``. :meth:`Reporter.open` (inside the running loop)
opens the outbox and starts the writer, heartbeat and sender tasks; :meth:`Reporter.aclose`
delivers until ``drain_timeout`` and leaves the rest in the outbox. Logging goes to
``usage_middleware.reporter``.
"""

from __future__ import annotations

import asyncio
import collections
import math
import os
import time
from collections.abc import Sequence
from typing import Final

from .. import telemetry
from .._sqlite import InlineRunner, Synchronous
from ..errors import ConfigurationError
from ..idempotency import KeyClaim
from ..models import UsageEvent
from ..outbox import DEFAULT_MAX_RETRY_AGE, MAX_NOT_BEFORE, Outbox, OutboxStatus
from ..provider import DeliverySink, ProviderState, on_another_loop
from ._state import CANCELLED, HELD, READY, Entry, log
from .aggregate import DEFAULT_AGGREGATE_WINDOW, DEFAULT_MAX_MEMBERS
from .group_commit import GroupCommit
from .senders import Senders
from .stats import ReporterStats

__all__ = ["Reporter"]

#: Most seconds a provider's Retry-After pauses delivery, unless it says otherwise.
_DEFAULT_MAX_RETRY_AFTER: Final = 300.0


class Reporter(GroupCommit, Senders):
    """Deliver usage events to ``provider`` through a durable SQLite outbox.

    Args:
        provider: the sink whose ``report`` delivers events (a remote provider, see
            :class:`~usage_middleware.provider.DeliverySink`); its ``max_batch`` caps every
            call. The reporter does not open or close it.
        path: the outbox file, shared by every worker process of the app; ``None`` keeps
            the outbox in memory (tests and development: nothing is durable, and events
            left undelivered by :meth:`aclose` are lost unless it opens again; logged).
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
        aggregate_window: for a sink with ``aggregates = True`` (see
            :mod:`.aggregate`), seconds a charge may wait for others of its aggregate key
            (the flush window; it replaces ``max_delay``): one report per key and window.
        max_members: most charges summed into one aggregate (a window with more sends
            at once).

    Raises:
        ConfigurationError: a setting out of range (``max_batch`` above the provider's cap).
    """

    def __init__(
        self,
        provider: DeliverySink,
        *,
        path: str | os.PathLike[str] | None = "usage-outbox.db",
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
        aggregate_window: float = DEFAULT_AGGREGATE_WINDOW,
        max_members: int = DEFAULT_MAX_MEMBERS,
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
            ("max_members", max_members),
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
            ("aggregate_window", aggregate_window),
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
        self.in_memory = path is None
        self.path = ":memory:" if path is None else os.fspath(path)
        self.max_batch = max_batch
        self.max_delay = max_delay
        self.drain_timeout = drain_timeout
        self._concurrency = concurrency
        self._max_queue = max_queue
        self._claim_size = max(max_batch, min(max_queue, 1000))
        self._call_timeout = call_timeout
        self._retry_kw = {
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
        #: Whether the sink sums queued events of one aggregate key into one (Tier, ARES).
        self._aggregates = bool(getattr(provider, "aggregates", False))
        self._window = aggregate_window if self._aggregates else max_delay
        self._max_members = max_members
        self._full_at = max_members if self._aggregates else max_batch
        self._lease = lease
        self._poll_interval = poll_interval
        self._stats_interval = stats_interval
        self._synchronous: Synchronous = synchronous
        self.max_retry_age = float(max_retry_age)

        self._state = ProviderState.NEW
        self._closing = False
        self._owner = 0
        self._outbox: Outbox | None = None
        self._memory: Outbox | None = None
        self._sqlite = InlineRunner("usage-outbox", lambda: self._outbox)
        self._tasks: list[asyncio.Task[None]] = []
        self._senders: list[asyncio.Task[None]] = []
        self._closed: asyncio.Event | None = None
        self._stop_housekeeper = asyncio.Event()
        self._checkpoint_wake = asyncio.Event()
        self._commits = 0  # group commits since the last checkpoint was asked for

        # Event plumbing (touched only on the loop thread).
        self._pending: list[Entry] = []  # accepted, not yet handed to the writer
        self._writing = 0  # entries in the transaction being committed now
        self._held: dict[str, Entry] = {}  # prepared, by idempotency key
        self._ready: collections.deque[Entry] = collections.deque()
        self._inflight = 0
        self._deletes: list[int] = []
        self._delete_delay = delete_delay
        self._delete_timer: asyncio.TimerHandle | None = None
        self._frees: list[int] = []
        self._dead: list[tuple[int, int | None, str | None, str | None]] = []
        self._releases: list[tuple[int, float, str]] = []
        self._waiters: list[asyncio.Future[None]] = []
        self._turn: asyncio.Handle | None = None  # this loop turn's end-of-turn commit
        self._turn_members = 0  # prepares of this loop turn
        self._grouping = False  # prepares were seen sharing loop turns lately
        self._lonely = 0  # group commits in a row with one prepare each
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
        self._dead_waiting = 0  # rows in the dead-letter table, as of the last refresh

    @property
    def state(self) -> ProviderState:
        return self._state

    def _connect(self) -> Outbox:
        if self.in_memory:
            return self._memory_outbox()
        return Outbox(self.path, synchronous=self._synchronous)

    def _disconnect(self, outbox: Outbox) -> None:
        if not self.in_memory:  # the in-memory database lives as long as the Reporter
            outbox.close()

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
            self._turn = None
            self._turn_members = 0
            self._grouping = False
            self._paused_until = 0.0
            self._mark_dirty()  # rows this instance left are free: claim them
        self._sqlite.start()
        try:
            self._outbox = await self._sqlite.submit(self._connect)
            await self._sqlite.submit(self._outbox.no_autocheckpoint)
            self._owner = await self._sqlite.submit(self._outbox.register, self._lease)
            await self._sqlite.submit(self._outbox.reap)
            self._depth, self._oldest = await self._sqlite.submit(self._outbox.depth)
            self._dead_waiting = await self._sqlite.submit(self._outbox.dead_count)
        except Exception as exc:
            if self._outbox is not None:
                await self._sqlite.submit(self._disconnect, self._outbox)
            self._sqlite.shutdown()
            self._state = ProviderState.CLOSED
            self._closed = None
            raise ConfigurationError(f"cannot open the outbox at {self.path}: {exc}") from exc
        self._closed = asyncio.Event()
        self._state = ProviderState.OPEN
        telemetry.watch_outbox(self, self.provider.name)
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
                await self._sqlite.submit(self._outbox.retire, self._owner, counters)
            except Exception:
                log.exception("could not end this reporter's lease in %s", self.path)
            if self.in_memory:
                self._log_lost(await self._sqlite.submit(self._outbox.depth))
            await self._sqlite.submit(self._disconnect, self._outbox)
        finally:
            self._state = ProviderState.CLOSED
            self._closing = False
            telemetry.unwatch_outbox(self)
            if self._delete_timer is not None:
                self._delete_timer.cancel()
                self._delete_timer = None
            self._sqlite.shutdown()
            self._closed.set()
        log.info(
            "outbox %s closed: queued=%d sent=%d retried=%d dead_lettered=%d",
            self.path,
            *self._counters(),
        )

    def _log_lost(self, depth: tuple[int, float | None]) -> None:
        if depth[0]:
            log.error(
                "%s: %d charge(s) not delivered before close are lost unless this reporter"
                " opens again (in-memory outbox: outbox=None)",
                self.provider.name,
                depth[0],
            )

    async def drain(self, within: float) -> bool:
        """Wait up to ``within`` seconds until every event accepted so far (enqueued or
        confirmed) was delivered or dead-lettered; return whether it came to that.

        Meant for the in-memory outbox (tests): it counts the outbox's rows, every process
        included, less this reporter's prepared ones (their requests still run).
        """
        loop = asyncio.get_running_loop()
        deadline = loop.time() + within
        while True:
            outbox = self._outbox
            if self._state is not ProviderState.OPEN or outbox is None:
                return not self._pending
            if not (
                self._pending
                or self._writing
                or self._ready
                or self._inflight
                or self._deletes
                or self._releases
                or self._dead
            ):
                depth, _ = await self._sqlite.call(outbox.depth)
                held = sum(1 for e in self._held.values() if e.rowid is not None)
                if depth <= held:
                    return True
            if loop.time() >= deadline:
                return False
            await asyncio.sleep(0.005)

    async def __aenter__(self) -> Reporter:
        await self.open()
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

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
        self._pending.append(Entry(event, READY, time.monotonic()))
        self._writer_wake.set()

    async def prepare(self, event: UsageEvent) -> None:
        """Make ``event`` durable in the outbox, held back from delivery.

        Returns once its row committed (group commit: the prepares of one event-loop turn
        share one transaction, run once the callbacks already ready have run). The event
        is delivered after :meth:`confirm`, never after :meth:`cancel`; if the process
        dies in between, it is delivered after the restart (the response was about to be
        sent). Never raises into the request: when the outbox cannot be written it logs,
        keeps the event in memory, and returns.
        """
        key = event.idempotency_key
        if key in self._held:
            return
        if self._state is ProviderState.CLOSED:
            return  # confirm() writes it directly; cancel() forgets it
        entry = Entry(event, HELD, 0.0)
        self._held[key] = entry
        self._pending.append(entry)
        await self._turn_commit()

    async def prepare_alone(self, event: UsageEvent) -> None:
        """:meth:`prepare` for a caller that holds no other reservation: commit at once,
        inline in the caller's step, without waiting for the end of the loop turn, unless
        other prepares were seen sharing loop turns lately (requests read together under
        load: then it joins this turn's group commit instead of paying a transaction of
        its own). Falls back to the group commit when the file is busy. Same guarantees
        as :meth:`prepare`.
        """
        key = event.idempotency_key
        if key in self._held:
            return
        if (
            self._state is not ProviderState.OPEN
            or self._closing
            or self._grouping
            or self._turn is not None  # another prepare ran in this loop turn
        ):
            await self.prepare(event)
            return
        entry = Entry(event, HELD, 0.0)
        self._held[key] = entry
        self._pending.append(entry)
        if not self._commit_inline():
            await self._flushed()
            return
        # Did other prepares run in this same loop turn? The end-of-turn callback counts
        # them (a prepare that finds it scheduled joins its group commit): if they did,
        # prepares are grouped from then on.
        self._turn_members = 1
        self._turn = asyncio.get_running_loop().call_soon(self._end_turn)

    def confirm(self, event: UsageEvent) -> None:
        """Let a prepared ``event`` be delivered. O(1); never raises.

        An event that was not prepared is enqueued instead.
        """
        entry = self._held.pop(event.idempotency_key, None)
        if entry is None:
            self.enqueue(event)
            return
        self._queued += 1
        entry.state = READY
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
        entry.state = CANCELLED
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
            dead_letters=self._dead_waiting,
        )

    async def claim_key(
        self, customer: str, route: str, key: str, *, fingerprint: str = ""
    ) -> KeyClaim:
        """Claim an ``Idempotency-Key`` in the outbox (shared by the processes using it).

        Raises:
            ConfigurationError: the Reporter is not open.
        """
        outbox = self._outbox
        if self._state is not ProviderState.OPEN or outbox is None:
            raise ConfigurationError("the Reporter is not open")
        return await self._sqlite.run(outbox.claim_key, customer, route, key, fingerprint)

    async def finish_key(
        self, customer: str, route: str, key: str, *, charged: bool, fingerprint: str = ""
    ) -> None:
        """Keep the key 24 hours when ``charged``, else drop the claim (outbox)."""
        outbox = self._outbox
        if self._state is not ProviderState.OPEN or outbox is None:
            raise ConfigurationError("the Reporter is not open")
        await self._sqlite.run(outbox.finish_key, customer, route, key, charged, fingerprint)

    async def outbox_status(self) -> OutboxStatus:
        """Read the outbox file's exact status now (all processes); see ``OutboxStatus``
        (``overdue`` counts rows older than this reporter's ``max_retry_age``)."""
        if self._state is not ProviderState.OPEN or self._outbox is None:
            raise ConfigurationError("the reporter is not open")
        return await self._sqlite.submit(self._outbox.status, self.max_retry_age)

    async def _close_after_lost_loop(self) -> None:
        """Close a reporter whose tasks ran on an event loop that is gone (no lifespan).

        Those tasks will never run again; what they had in memory (accepted events,
        pending frees, deletes, dead letters) is written now, from the running loop, and
        the rows stay in the outbox for the next :meth:`open` (or another worker) to send.
        """
        assert self._outbox is not None
        self._closing = True
        try:
            await self._commit_on_close()
            # What the gone loop's tasks held in memory or in flight: its rows are freed
            # below and claimed again after a reopen (or by another worker).
            self._waiters = []
            self._ready.clear()
            self._inflight = self._writing = 0
            self._claiming = False
            self._tasks, self._senders = [], []
            try:
                await self._sqlite.submit(self._outbox.retire, self._owner, self._counters())
            except Exception:
                log.exception("could not end this reporter's lease in %s", self.path)
            await self._sqlite.submit(self._disconnect, self._outbox)
        finally:
            self._state = ProviderState.CLOSED
            self._closing = False
            telemetry.unwatch_outbox(self)
            if self._delete_timer is not None:
                self._delete_timer.cancel()
                self._delete_timer = None
            self._sqlite.shutdown()
            self._closed = asyncio.Event()
            self._closed.set()

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
                        if not await self._sqlite.submit(
                            outbox.heartbeat, self._owner, self._lease, self._counters()
                        ):
                            await self._reregister()
                        if await self._sqlite.submit(outbox.reap):
                            self._mark_dirty()
                    if now >= next_stats and self.in_memory:
                        next_stats = now + self._stats_interval
                        self._depth, self._oldest = await self._sqlite.submit(outbox.depth)
                        self._dead_waiting = await self._sqlite.submit(outbox.dead_count)
                    elif now >= next_stats:
                        next_stats = now + self._stats_interval
                        if reader is None:
                            reader = await asyncio.to_thread(
                                Outbox, self.path, synchronous=self._synchronous, create=False
                            )
                        self._depth, self._oldest = await asyncio.to_thread(reader.depth)
                        self._dead_waiting = await asyncio.to_thread(reader.dead_count)
                        # The writer commits inline with autocheckpoint off: copy the WAL
                        # here, on a connection of its own, off the event loop.
                        await asyncio.to_thread(reader.checkpoint)
                except Exception:
                    log.exception("outbox %s housekeeping failed", self.path)
        finally:
            if reader is not None:
                reader.close()

    async def _checkpointer(self) -> None:
        """Copy the WAL into the database every ``CHECKPOINT_EVERY`` group commits, on a
        connection of its own, off the event loop. A WAL left to grow between the
        housekeeper's rounds made every commit slower (15 -> 40 us at a few hundred MB)."""
        conn: Outbox | None = None
        try:
            while True:
                await self._checkpoint_wake.wait()
                self._checkpoint_wake.clear()
                if self._stop_housekeeper.is_set():
                    return
                if self.in_memory:  # no WAL
                    continue
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
        self._owner = await self._sqlite.submit(self._outbox.register, self._lease)
        self._ready.clear()
        self._mark_dirty()


async def _cancel(tasks: Sequence[asyncio.Task[None]]) -> None:
    for t in tasks:
        t.cancel()
    results = await asyncio.gather(*tasks, return_exceptions=True)
    for r in results:
        if isinstance(r, Exception):
            log.error("reporter task failed", exc_info=r)
