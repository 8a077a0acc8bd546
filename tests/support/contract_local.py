"""Contract entry for :class:`~usage_middleware.ledger.LocalLedger` (the embedded ledger).

``give`` grants credits to a fresh customer (a credit-only customer has exactly its
credits available); ``charged`` reads the period's ``used`` after writing pending charges.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator

from tests.support.contract_subject import Subject
from usage_middleware.ledger import LocalLedger


@contextlib.asynccontextmanager
async def make_subject(tmp_path: pathlib.Path) -> AsyncIterator[Subject]:
    ledger = LocalLedger(tmp_path / "contract.db")
    await ledger.open()

    async def give(customer: str, feature: str, units: int) -> None:
        await ledger.grant(customer, feature, units)

    async def charged(customer: str, feature: str) -> int:
        rows = await ledger.usage(customer)
        return next((row.used for row in rows if row.feature == feature), 0)

    try:
        yield Subject(provider=ledger, give=give, charged=charged)
    finally:
        await ledger.aclose()
