"""The Reporter's shared state: the entries on their way and the queues between the request
side, the group commit (:mod:`.group_commit`) and the senders (:mod:`.senders`)."""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from typing import Any, Final

from .._sqlite import InlineRunner, Synchronous
from ..models import UsageEvent
from ..outbox import Outbox
from ..provider import DeliverySink, ProviderState

log = logging.getLogger("usage_middleware.reporter")

# Entry states.
READY: Final = 0  # enqueued or confirmed: to be delivered
HELD: Final = 1  # prepared: durable, not deliverable until confirmed
CANCELLED: Final = 2  # prepared, then cancelled: never delivered

#: Prefix of an outbox row's ``last_error`` once a send of it failed ambiguously.
AMBIGUOUS: Final = "ambiguous: "

#: An entry's aggregate key before a sender computed it.
NO_KEY: Final = object()

#: Group commits between two WAL checkpoints (besides the housekeeper's, every
#: ``stats_interval``).
CHECKPOINT_EVERY: Final = 1000

#: End-of-turn group commits in a row with a single prepare each after which prepares
#: commit inline again (the load that grouped them is gone).
LONELY_TURNS: Final = 4


class Entry:
    """One event on its way: its state, when it became ready, its outbox row id, and when
    it entered the outbox."""

    __slots__ = ("akey", "ambiguous", "created", "event", "owned", "rowid", "state", "t")

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
        self.akey: object = NO_KEY  # its aggregate key, once a sender computed it


def resolve(waiters: list[asyncio.Future[None]]) -> None:
    for w in waiters:
        if not w.done():
            w.set_result(None)


class Shared:
    """The state the Reporter's parts share (set by ``Reporter.__init__``), and the small
    moves between its queues. Touched only on the event loop thread."""

    # Settings.
    provider: DeliverySink
    path: str  # the outbox file, or ":memory:"
    in_memory: bool
    max_batch: int
    max_delay: float
    max_retry_age: float
    _max_queue: int
    _claim_size: int
    _call_timeout: float
    _retry_kw: dict[str, Any]
    _retry_timeout: float
    _retry_cooldown: float
    _max_retry_after: float
    _max_wait: float
    _deduplicates: bool
    _poll_interval: float
    _synchronous: Synchronous
    _delete_delay: float
    _aggregates: bool  # the sink sums events of one aggregate key (delivery/aggregate.py)
    _window: float  # seconds the oldest ready event waits for its batch (or aggregate)
    _full_at: int  # ready events that make a batch full: send without waiting
    _max_members: int  # most events summed into one aggregate

    # Lifecycle.
    _state: ProviderState
    _closing: bool
    _owner: int
    _outbox: Outbox | None
    _memory: Outbox | None  # the in-memory database (path None), kept across reopens
    _sqlite: InlineRunner
    _tasks: list[asyncio.Task[None]]
    _senders: list[asyncio.Task[None]]
    _checkpoint_wake: asyncio.Event
    _commits: int

    # Queues.
    _pending: list[Entry]  # accepted, not yet handed to the writer
    _writing: int  # entries in the transaction being committed now
    _held: dict[str, Entry]  # prepared, by idempotency key
    _ready: collections.deque[Entry]
    _inflight: int
    _deletes: list[int]
    _delete_timer: asyncio.TimerHandle | None
    _frees: list[int]
    _dead: list[tuple[int, int | None, str | None, str | None]]
    _releases: list[tuple[int, float, str]]
    _waiters: list[asyncio.Future[None]]
    _turn: asyncio.Handle | None  # the end-of-turn group commit, once scheduled
    _turn_members: int  # prepares of this loop turn
    _grouping: bool  # prepares were seen sharing loop turns lately: group them
    _lonely: int  # end-of-turn commits in a row with a single prepare
    _writer_wake: asyncio.Event
    _sender_wake: asyncio.Event
    _db_dirty: bool  # the outbox may hold rows we could claim
    _dirty_gen: int
    _claiming: bool
    _paused_until: float  # monotonic; senders wait until then

    # Counters.
    _queued: int
    _sent: int
    _retried: int
    _dead_lettered: int

    def _counters(self) -> tuple[int, int, int, int]:
        return (self._queued, self._sent, self._retried, self._dead_lettered)

    def _memory_outbox(self) -> Outbox:
        """The in-memory outbox (``path=None``): one database for the Reporter's life, so
        what a close left undelivered is sent after a reopen."""
        if self._memory is None:
            self._memory = Outbox(":memory:")
        return self._memory

    def _room(self) -> int:
        """Events that may still enter memory (``max_queue`` minus waiting and in flight)."""
        return self._max_queue - len(self._ready) - self._inflight

    def _writer_running(self) -> bool:
        return bool(self._tasks) and not self._tasks[0].done()

    def _senders_alive(self) -> bool:
        return any(not t.done() for t in self._senders)

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

    def _push_ready(self, entry: Entry) -> None:
        """Queue ``entry`` for a sender; wake the senders only when that changes their plan.

        Senders sleep without a deadline on an empty queue and until the oldest event is
        ``max_delay`` old otherwise, so they need waking when the queue stops being empty or
        a batch is full. (Waking all of them per event cost every request ~15 us.)
        """
        ready = self._ready
        ready.append(entry)
        n = len(ready)
        if n == 1 or n >= self._full_at:
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
