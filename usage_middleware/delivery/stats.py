"""The Reporter's counters."""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["ReporterStats"]


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
        dead_letters: rows in the outbox's dead-letter table, every process included,
            waiting for ``outbox retry`` or ``purge`` (same refresh as ``outbox_depth``).
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
    dead_letters: int = 0
