"""The lease engine settles actual units across processes: an excess is leased atomically
from what no other process holds, so two ledgers on one file never charge beyond the
budget under overage="cap", and charge exactly the actuals under "charge"."""

from __future__ import annotations

import asyncio
import pathlib

import pytest

from usage_middleware.ledger import LocalLedger

FEATURE = "feature:tokens"


async def used(path: pathlib.Path, customer: str) -> int:
    async with LocalLedger(path) as reader:
        rows = await reader.usage(customer)
    return next((row.used for row in rows if row.feature == FEATURE), 0)


@pytest.mark.parametrize(("overage", "expected"), [("cap", 100), ("charge", 140)])
async def test_two_ledgers_on_one_file_settle_an_excess_within_the_policy(
    tmp_path: pathlib.Path, overage: str, expected: int
) -> None:
    """Two ledgers (two owners of leases) on one file each hold 40 of 100 credits and use
    70: under "cap" together they are charged exactly the 100 there were (the first gets
    the 20 still free, the second none); under "charge" 140, the overage recorded."""
    path = tmp_path / "usage.db"
    async with LocalLedger(path, lease_size=1) as one, LocalLedger(path, lease_size=1) as two:
        await one.grant("org:acme", FEATURE, 100)
        first = await one.reserve("org:acme", FEATURE, 40)
        second = await two.reserve("org:acme", FEATURE, 40)
        assert first.ok and second.ok
        charged = await asyncio.gather(
            one.commit(first, units=70, overage=overage),  # type: ignore[arg-type]
            two.commit(second, units=70, overage=overage),  # type: ignore[arg-type]
        )
        await one.flush()
        await two.flush()
        assert sum(charged) == expected
        if overage == "cap":
            assert sorted(charged) == [40, 60]
        blocked = await one.reserve("org:acme", FEATURE, 1)
        assert not blocked.ok
    assert await used(path, "org:acme") == expected


async def test_fewer_units_go_back_to_the_lease_without_io(tmp_path: pathlib.Path) -> None:
    """Committing 3 of a 10-unit hold gives the other 7 back at once: a reservation of 7
    more is allowed, one more unit is not, and the ledger records 3 + 7."""
    path = tmp_path / "usage.db"
    async with LocalLedger(path, lease_size=10) as ledger:
        await ledger.grant("org:acme", FEATURE, 10)
        held = await ledger.reserve("org:acme", FEATURE, 10)
        assert await ledger.commit(held, units=3) == 3
        again = await ledger.reserve("org:acme", FEATURE, 7)
        assert again.ok
        assert await ledger.commit(again) == 7
        assert not (await ledger.reserve("org:acme", FEATURE, 1)).ok
    assert await used(path, "org:acme") == 10
