"""Aggregation: many queued charges of one customer and feature sent as one summed event.

A sink that cannot deduplicate but accepts a sum (Tier's ``n``, ARES's ``credits``)
declares ``aggregates = True`` and two hooks (:class:`AggregatingSink`). The senders
(:mod:`.senders`) then group the ready events by :meth:`AggregatingSink.aggregate_key`
and send each group as the one event :meth:`AggregatingSink.merge` makes of it. The outbox
keeps one row per member charge until the aggregate is confirmed: all rows are deleted on
success, all stay on a failure, all are marked ambiguous on an ambiguous one. See
docs/architecture.md, "Storage and delivery".
"""

from __future__ import annotations

import hashlib
from collections.abc import Hashable, Sequence
from datetime import UTC, datetime
from typing import Final, Protocol

from ..models import UsageEvent

__all__ = [
    "DEFAULT_AGGREGATE_WINDOW",
    "DEFAULT_MAX_MEMBERS",
    "AggregatingSink",
    "aggregate_id",
    "default_aggregate_key",
    "merge_events",
]

#: Seconds a charge may wait for others of its customer and feature (the flush window).
DEFAULT_AGGREGATE_WINDOW: Final = 0.25

#: Most member charges summed into one aggregate.
DEFAULT_MAX_MEMBERS: Final = 1000

#: Seconds of usage time one aggregate may span (its members' ``at`` fall in one bucket of
#: this many seconds since the epoch), so a backlog is never billed far from when it was used.
_AT_BUCKET: Final = 60


class AggregatingSink(Protocol):
    """What a sink with ``aggregates = True`` provides."""

    def aggregate_key(self, event: UsageEvent) -> Hashable | None:
        """The group ``event`` may be summed with, or ``None``: send it alone."""
        ...

    def merge(self, events: Sequence[UsageEvent]) -> UsageEvent:
        """One event standing for ``events`` (all of one aggregate key)."""
        ...


def default_aggregate_key(event: UsageEvent) -> Hashable | None:
    """``(customer, feature, minute of at)``; ``None`` for a clobber (it sets usage: never
    summed)."""
    if event.clobber:
        return None
    return (event.customer, event.feature, int(event.at.timestamp()) // _AT_BUCKET)


def aggregate_id(keys: Sequence[str]) -> str:
    """The idempotency key of an aggregate: 32 hex characters derived from its members'
    keys (order-free), so a resend of the same members carries the same key in logs."""
    if len(keys) == 1:
        return keys[0]
    digest = hashlib.sha256("\n".join(sorted(keys)).encode()).hexdigest()
    return digest[:32]


def merge_events(events: Sequence[UsageEvent]) -> UsageEvent:
    """The summed event of ``events`` (one customer and feature, none a clobber): their
    units added, the latest ``at``, the key :func:`aggregate_id` of theirs. One event is
    returned as it is."""
    if len(events) == 1:
        return events[0]
    first = events[0]
    at: datetime = max(e.at for e in events)
    return UsageEvent(
        first.customer,
        first.feature,
        sum(e.units for e in events),
        at=at.astimezone(UTC),
        idempotency_key=aggregate_id([e.idempotency_key for e in events]),
    )
