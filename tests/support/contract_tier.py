"""Contract entry for :class:`TierProvider` over the in-process fake sidecar (tier_fake.py).

``give`` sets the org's plan line for the feature to ``limit = units``, ``used = 0``;
``charged`` drains the durable outbox and reads what the fake sidecar recorded.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator

from tests.support.contract_subject import Subject
from tests.support.tier_fake import FAKE_URL, FakeTier
from tests.support.waiting import drain_outbox
from usage_middleware.providers.tier import TierProvider

UNITS_FEATURE = "feature:contract"


@contextlib.asynccontextmanager
async def make_subject(tmp_path: pathlib.Path) -> AsyncIterator[Subject]:
    """A TierProvider with a durable outbox in ``tmp_path``, talking to a fresh fake sidecar."""
    fake = FakeTier()
    provider = TierProvider(FAKE_URL, client=fake.client(), outbox=tmp_path / "tier-outbox.db")
    await provider.open()

    async def give(customer: str, feature: str, units: int) -> None:
        fake.set_line(customer, feature, limit=units, used=0)

    async def charged(customer: str, feature: str) -> int:
        await drain_outbox(provider.reporter)
        return fake.used(customer, feature)

    try:
        yield Subject(provider=provider, give=give, charged=charged)
    finally:
        await provider.aclose()
