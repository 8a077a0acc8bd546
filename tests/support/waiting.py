"""Waiting on a condition with a deadline (never on a fixed sleep): one helper for all tests."""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable
from typing import Any

__all__ = ["drain_outbox", "eventually"]


async def eventually(check: Callable[[], object | Awaitable[object]], within: float = 15.0) -> None:
    """Poll ``check()`` every 10 ms until it is true; ``AssertionError`` after ``within`` s.

    ``check`` may be a plain callable or return an awaitable (an ``async def``), which is
    awaited. It is always called at least once, and once more at the deadline.
    """
    deadline = time.monotonic() + within
    while True:
        result = check()
        if inspect.isawaitable(result):
            result = await result
        if result:
            return
        if time.monotonic() >= deadline:
            raise AssertionError(f"condition not reached within {within}s")
        await asyncio.sleep(0.01)


async def drain_outbox(reporter: Any, within: float = 5.0) -> None:
    """Flush ``reporter`` (a provider's :class:`Reporter`) until its outbox is empty
    (everything delivered or dead-lettered); ``TimeoutError`` after ``within`` s."""
    async with asyncio.timeout(within):
        while True:
            await reporter.flush()
            if (await reporter.outbox_status()).depth == 0:
                return
            await asyncio.sleep(0.01)
