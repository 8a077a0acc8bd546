"""The entitlement cache and the single-flight of a remote provider's checks.

:func:`new_cache` makes the bounded cache of fetched entries (a ``cachetools.TLRUCache``:
each entry lives its own TTL). :class:`SingleFlight` makes concurrent misses of one key
share ONE fetch: the fetch runs in its own task, so cancelling the caller that started it
does not cancel it for the others, and its result or error is handed to every waiter.
"""

from __future__ import annotations

import asyncio
import functools
from collections.abc import Callable, Coroutine
from typing import Any

import cachetools

from ...errors import ProviderError, RetryableProviderError
from .accounting import Entry

__all__ = ["Key", "SingleFlight", "new_cache"]

#: A cache key: ``(customer, feature)``.
Key = tuple[str, str]

#: What one fetch ends with: an entry, or the error the check answers with.
Outcome = Entry | ProviderError


def _ttu(_key: Key, entry: Entry, now: float) -> float:
    return now + entry.ttl


def new_cache(size: int, clock: Callable[[], float]) -> cachetools.TLRUCache[Key, Entry]:
    """A cache of at most ``size`` entries, each expiring ``entry.ttl`` seconds after it
    was stored (``clock``: monotonic seconds)."""
    return cachetools.TLRUCache(size, _ttu, timer=clock)


class SingleFlight:
    """One fetch at a time per key, shared by everyone who asks while it runs.

    ``tasks`` maps each key to its running fetch (the provider cancels them on close).
    """

    __slots__ = ("tasks",)

    def __init__(self) -> None:
        self.tasks: dict[Key, asyncio.Task[Outcome]] = {}

    async def join(
        self, key: Key, start: Callable[[], Coroutine[Any, Any, Outcome]], name: str
    ) -> Outcome:
        """The outcome of the fetch running for ``key``, started with ``start()`` if none is.

        A caller cancelled while waiting is cancelled (the fetch goes on for the others);
        a fetch cancelled by the provider's close answers a retryable error naming ``name``.
        """
        task = self.tasks.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(start())
            self.tasks[key] = task
            task.add_done_callback(functools.partial(self._done, key))
        try:
            return await asyncio.shield(task)
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if task.cancelled() and (current is None or current.cancelling() == 0):
                return RetryableProviderError(f"{name} closed during the check")
            raise

    def _done(self, key: Key, task: asyncio.Task[Outcome]) -> None:
        if self.tasks.get(key) is task:
            del self.tasks[key]
