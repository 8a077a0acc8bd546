"""LocalLedger with many customers: upkeep work and the file stay bounded as customers grow.

Work is counted (traced lines, SQL statements, rows), never timed.
"""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
import sys
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from usage_middleware.ledger import LocalLedger
from usage_middleware.ledger import store as store_module
from usage_middleware.ledger.store import LedgerStore
from usage_middleware.pricing import load_pricing

PRICING = {
    "plans": {
        "plan:free@1": {
            "features": {
                "feature:convert": {"tiers": [{"upto": 100}]},
                "feature:big": {"tiers": [{"upto": 1_000_000}]},
            }
        }
    }
}
CONVERT = "feature:convert"
BIG = "feature:big"


def query(path: pathlib.Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


def upkeep_lines(path: pathlib.Path, n: int) -> int:
    """Python lines of store.py run by one upkeep transaction returning ``n`` leases."""
    store = LedgerStore(str(path), "owner-a", lease_ttl=30.0)
    generation = store.open(load_pricing(PRICING).to_json())
    at = datetime.now(UTC)
    customers = [f"org:c{i}" for i in range(n)]
    for customer in customers:
        store.subscribe(customer, "plan:free@1", at)
    grants = [store.lease(customer, BIG, at, 1, 64, []) for customer in customers]
    gives = [(c, BIG, g.period, g.take) for c, g in zip(customers, grants, strict=True)]
    lines = 0
    filename = store_module.__file__

    def tracer(frame: FrameType, event: str, arg: Any) -> Any:
        nonlocal lines
        if frame.f_code.co_filename != filename:
            return None
        if event == "line":
            lines += 1
        return tracer

    sys.settrace(tracer)
    try:
        store.maintain(gives, generation)
    finally:
        sys.settrace(None)
    store.close()
    assert query(path, "SELECT COUNT(*) FROM leases") == [(0,)]
    return lines


def test_upkeep_work_grows_linearly_with_the_leases_it_returns(tmp_path: pathlib.Path) -> None:
    """Returning 4x the leases in one upkeep runs about 4x the lines (it was quadratic: ~16x)."""
    small = upkeep_lines(tmp_path / "small.db", 100)
    large = upkeep_lines(tmp_path / "large.db", 400)
    assert large < 6 * small, (small, large)


async def test_upkeep_returns_idle_leases_in_bounded_transactions(tmp_path: pathlib.Path) -> None:
    """600 idle leases go back in transactions of at most 256 each, not one long transaction."""
    path = tmp_path / "usage.db"
    customers = [f"org:c{i}" for i in range(600)]
    async with LocalLedger(path, pricing=PRICING) as ledger:
        assert isinstance(ledger, LocalLedger)
        for start in range(0, len(customers), 100):
            await asyncio.gather(
                *(ledger.subscribe(c, "plan:free@1") for c in customers[start : start + 100])
            )
        for customer in customers:
            reservation = await ledger.reserve(customer, CONVERT)
            assert reservation.answer.ok
            await ledger.commit(reservation)
        await ledger.flush()
        assert query(path, "SELECT COUNT(*) FROM leases") == [(600,)]
        store = ledger._store
        assert store is not None
        statements: list[str] = []
        store.conn.set_trace_callback(statements.append)
        for slot in ledger._slots.values():
            slot.touched -= 1000.0  # idle for long: every lease is due back
        await ledger._maintain()
        store.conn.set_trace_callback(None)
        assert query(path, "SELECT COUNT(*) FROM leases") == [(0,)]
    per_transaction: list[int] = []
    for statement in statements:
        if statement.startswith("BEGIN"):
            per_transaction.append(0)
        elif statement.startswith("DELETE FROM leases WHERE customer") and per_transaction:
            per_transaction[-1] += 1
    assert sum(per_transaction) == 600
    assert max(per_transaction) <= 256, per_transaction


async def test_charges_table_stays_bounded_over_many_requests(tmp_path: pathlib.Path) -> None:
    """400 requests of 50 customers over 8 group commits leave one charges row per customer
    (per hour), with every request and unit counted; usage stays exact."""
    path = tmp_path / "usage.db"
    customers = [f"org:c{i}" for i in range(50)]
    async with LocalLedger(path, pricing=PRICING) as ledger:
        assert isinstance(ledger, LocalLedger)
        await asyncio.gather(*(ledger.subscribe(c, "plan:free@1") for c in customers))
        for _ in range(8):
            for customer in customers:
                reservation = await ledger.reserve(customer, BIG)
                assert reservation.answer.ok
                await ledger.commit(reservation)
            await ledger.flush()  # one group commit per round
    rows, requests, units = query(path, "SELECT COUNT(*), SUM(requests), SUM(units) FROM charges")[
        0
    ]
    assert (requests, units) == (400, 400)
    assert rows <= 2 * len(customers)  # one per customer, two if the test spans an hour
    assert query(path, "SELECT COUNT(*), SUM(used) FROM usage") == [(50, 400)]
