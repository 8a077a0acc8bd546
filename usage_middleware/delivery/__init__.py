"""Delivery of usage events: the :class:`Reporter` engine over a durable outbox.

The Reporter writes each charge to the outbox (:mod:`usage_middleware.outbox`, a SQLite
file; or an in-memory database with ``path=None``, for tests) and delivers it to its sink
(a remote provider, or RedisLedger's charge scripts) in batches, with retries. Parts:
:mod:`.group_commit` (the writer), :mod:`.senders` (batches, retries, dead letters),
:mod:`.stats`.
"""

from .reporter import Reporter
from .stats import ReporterStats

__all__ = ["Reporter", "ReporterStats"]
