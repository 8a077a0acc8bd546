"""Contract entry for :class:`RemoteProvider` over an in-process fake backend.

``FakeRemote`` is also the controllable subclass ``tests/providers/test_remote_provider.py`` uses:
its ``fetch`` can be gated (latency), made to fail or hang, and counts its calls; its
``send`` records events and, like a provider without lag, takes delivered units off the
balance.
"""

from __future__ import annotations

import asyncio
import contextlib
import pathlib
from collections.abc import AsyncIterator, Sequence
from typing import Any

from asgiref.typing import HTTPScope

from tests.support.contract_subject import Subject
from usage_middleware.models import UsageEvent
from usage_middleware.providers.remote import Entitlement, RemoteProvider


class FakeRemote(RemoteProvider):
    """A RemoteProvider whose backend is two dicts; every knob is an attribute."""

    name = "fake"
    max_batch = 10
    balance_lag = 0.0

    def __init__(self, **kwargs: Any) -> None:
        kwargs.setdefault("outbox", None)
        super().__init__(**kwargs)
        self.balances: dict[tuple[str, str], int] = {}
        self.limits: dict[tuple[str, str], int] = {}
        self.reasons: dict[tuple[str, str], str] = {}
        self.recorded: list[UsageEvent] = []
        self.fetches = 0
        self.scopes: list[HTTPScope | None] = []
        self.started = asyncio.Event()  # set when a fetch begins
        self.gate: asyncio.Event | None = None  # fetch waits for it when set
        self.fail: BaseException | None = None  # fetch raises it
        self.hang = False  # fetch never returns
        self.report_failures: list[BaseException] = []  # report raises these first
        self.reflect = True  # delivered units come off the balance at once

    async def fetch(
        self, customer: str, feature: str, *, scope: HTTPScope | None = None
    ) -> Entitlement:
        self.fetches += 1
        self.scopes.append(scope)
        self.started.set()
        if self.gate is not None:
            await self.gate.wait()
        if self.hang:
            await asyncio.Event().wait()
        if self.fail is not None:
            raise self.fail
        key = (customer, feature)
        remaining = self.balances.get(key, 0)
        limit = self.limits.get(key)
        used = None if limit is None else limit - remaining
        return Entitlement(
            limit=limit, used=used, remaining=remaining, reason=self.reasons.get(key)
        )

    async def send(self, events: Sequence[UsageEvent]) -> None:
        if self.report_failures:
            raise self.report_failures.pop(0)
        seen = {e.idempotency_key for e in self.recorded}
        for event in events:
            if event.idempotency_key in seen:
                continue
            self.recorded.append(event)
            if self.reflect:
                key = (event.customer, event.feature)
                self.balances[key] = self.balances.get(key, 0) - event.units

    def charged(self, customer: str, feature: str) -> int:
        return sum(
            e.units for e in self.recorded if e.customer == customer and e.feature == feature
        )


@contextlib.asynccontextmanager
async def make_subject(tmp_path: pathlib.Path) -> AsyncIterator[Subject]:
    """A FakeRemote (in-memory delivery) whose backend reflects delivered usage at once."""
    provider = FakeRemote()
    await provider.open()

    async def give(customer: str, feature: str, units: int) -> None:
        provider.balances[(customer, feature)] = units

    async def charged(customer: str, feature: str) -> int:
        await provider.flush(5.0)
        return provider.charged(customer, feature)

    try:
        yield Subject(provider=provider, give=give, charged=charged)
    finally:
        await provider.aclose()
