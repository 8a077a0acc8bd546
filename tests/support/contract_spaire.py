"""Contract entry for :class:`SpaireProvider` over the in-process fake (spaire_fake.py).

``give`` makes the customer's balance on the meter exactly ``units`` with a meter-credit
grant (applied by Spaire at once); ``charged`` drains the durable outbox and sums the usage
events the fake stored for that feature. The fake's clock never moves here, so every
balance read during a test lags behind the delivered usage: the suite passes only because
the provider subtracts what it delivered but Spaire has not reflected yet.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator

from tests.support.contract_subject import Subject
from tests.support.spaire_fake import TOKEN, FakeSpaire
from tests.support.waiting import drain_outbox
from usage_middleware.providers.spaire import SpaireProvider

UNITS_FEATURE = "feature:contract"


@contextlib.asynccontextmanager
async def make_subject(tmp_path: pathlib.Path) -> AsyncIterator[Subject]:
    """A SpaireProvider with a durable outbox in ``tmp_path``, talking to a fresh fake."""
    fake = FakeSpaire()
    meter = fake.add_meter("API units")
    client = fake.client()
    provider = SpaireProvider(
        TOKEN,
        meter_id=meter,
        client=client,
        outbox=tmp_path / "spaire-outbox.db",
        email_domain="mail.acme-billing.io",
    )
    await provider.open()

    async def give(customer: str, feature: str, units: int) -> None:
        fake.set_available(customer, meter, units)

    async def charged(customer: str, feature: str) -> int:
        await drain_outbox(provider.reporter)
        return fake.charged(customer, meter, feature)

    try:
        yield Subject(provider=provider, give=give, charged=charged)
    finally:
        await provider.aclose()
        await client.aclose()
        assert fake.violations == [], fake.violations
