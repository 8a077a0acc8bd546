"""The Provider base's lifecycle: open once, concurrently; open again after a close."""

from __future__ import annotations

import asyncio

from usage_middleware import Provider
from usage_middleware.provider import ProviderState


class SlowStart(Provider):
    def __init__(self) -> None:
        super().__init__()
        self.starts = 0

    async def open(self) -> None:
        await self._open_once(self._start)

    async def _start(self) -> None:
        self.starts += 1
        await asyncio.sleep(0.01)  # concurrent callers arrive while this runs
        await super().open()


async def test_concurrent_opens_start_once() -> None:
    """Ten concurrent open() calls run the start-up once and all return open."""
    provider = SlowStart()
    await asyncio.gather(*(provider.open() for _ in range(10)))
    assert provider.starts == 1
    assert provider.state is ProviderState.OPEN
    await provider.open()  # idempotent while open
    assert provider.starts == 1


async def test_a_closed_provider_opens_again() -> None:
    """open() after aclose() starts the provider again, once (issue 11)."""
    provider = SlowStart()
    await provider.open()
    await provider.aclose()
    await asyncio.gather(*(provider.open() for _ in range(3)))
    assert provider.starts == 2 and provider.state is ProviderState.OPEN
