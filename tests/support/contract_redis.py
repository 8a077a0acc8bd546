"""Contract entry for :class:`RedisLedger` on this process's test redis-server.

``give`` grants a fresh customer exactly ``units`` credits of the feature (a credit-only
customer); ``charged`` reads the period's ``used`` from :meth:`RedisLedger.usage`.
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator

import pytest

from tests.support.backends import new_redis_ledger
from tests.support.contract_subject import Subject

MARKS = [pytest.mark.redis]
UNITS_FEATURE = "feature:contract"


@contextlib.asynccontextmanager
async def make_subject(tmp_path: pathlib.Path) -> AsyncIterator[Subject]:
    """A RedisLedger under a fresh key prefix, with its spool in ``tmp_path``."""
    ledger = new_redis_ledger(tmp_path, {"plans": {}}, prefix="c")
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
