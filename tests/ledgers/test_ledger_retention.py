"""LocalLedger's charges retention: the audit detail goes after ``charges_retention``, the
per-period totals that limits are checked against stay."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
from datetime import timedelta
from typing import Any

import pytest

from usage_middleware.errors import ConfigurationError
from usage_middleware.ledger import LocalLedger
from usage_middleware.ledger import store as store_module

PLAN = "plan:free@1"
FEATURE = "feature:convert"
PRICING = {"plans": {PLAN: {"features": {FEATURE: {"tiers": [{"upto": 1000}]}}}}}


def query(path: pathlib.Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, args).fetchall()


async def charge(ledger: LocalLedger, customer: str, units: int) -> None:
    reservation = await ledger.reserve(customer, FEATURE, units)
    assert reservation.answer.ok
    await ledger.commit(reservation)


async def test_rows_older_than_the_retention_are_pruned_and_totals_kept(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A tick deletes charges rows older than charges_retention; usage totals stay."""
    monkeypatch.setattr(store_module, "_PRUNE_EVERY", 0.0)  # every tick, not once a minute
    path = tmp_path / "usage.db"
    ledger = LocalLedger(path, pricing=PRICING, charges_retention=timedelta(days=30))
    async with ledger:
        await ledger.subscribe_many(["org:old", "org:new"], PLAN)
        await charge(ledger, "org:old", 5)
        await charge(ledger, "org:new", 7)
        await ledger.flush()
        with sqlite3.connect(path) as conn:  # org:old's row was written 31 days ago
            conn.execute(
                "UPDATE charges SET at = ? WHERE customer = 'org:old'",
                ("2000-01-01T00:00:00+00:00",),
            )
        deadline = asyncio.get_running_loop().time() + 10
        while query(path, "SELECT 1 FROM charges WHERE customer = 'org:old'"):
            assert asyncio.get_running_loop().time() < deadline, "never pruned"
            await asyncio.sleep(0.05)
        assert query(path, "SELECT customer, units FROM charges") == [("org:new", 7)]
        assert [u.used for u in await ledger.usage("org:old")] == [5]
        assert [u.used for u in await ledger.usage("org:new")] == [7]


async def test_no_retention_keeps_every_row(
    tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """charges_retention=None never deletes a charges row."""
    monkeypatch.setattr(store_module, "_PRUNE_EVERY", 0.0)
    path = tmp_path / "usage.db"
    async with LocalLedger(path, pricing=PRICING, charges_retention=None) as ledger:
        await ledger.subscribe("org:old", PLAN)
        await charge(ledger, "org:old", 5)
        await ledger.flush()
        with sqlite3.connect(path) as conn:
            conn.execute("UPDATE charges SET at = '2000-01-01T00:00:00+00:00'")
        await asyncio.sleep(2.5)  # two ticks at least
        assert query(path, "SELECT customer, units FROM charges") == [("org:old", 5)]


@pytest.mark.parametrize("bad", [timedelta(hours=1), 86400 * 30, "30d"])
def test_a_bad_retention_fails_at_construction_naming_the_fix(bad: Any) -> None:
    """A retention under 2 days, or not a timedelta, is refused with the fix named."""
    with pytest.raises(ConfigurationError, match="timedelta of at least 2 days"):
        LocalLedger(":memory:", charges_retention=bad)
