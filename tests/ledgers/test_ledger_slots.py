"""LocalLedger's slots in memory: a cap with eviction, and first touches leased in batches.

Eviction never loses a charge or leaks a leased unit: checked against the file's ``usage``
and ``leases`` tables, not against the ledger's own view.
"""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
import sys
from types import FrameType
from typing import Any

from usage_middleware.ledger import LocalLedger
from usage_middleware.ledger import engine as engine_module
from usage_middleware.models import Reservation

PLAN = "plan:free@1"
FEW = "feature:few"  # 3 units a month
MANY = "feature:many"
PRICING = {
    "plans": {
        PLAN: {
            "features": {
                FEW: {"tiers": [{"upto": 3}]},
                MANY: {"tiers": [{"upto": 1_000_000}]},
            }
        }
    }
}


def query(path: pathlib.Path, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql, args).fetchall()


async def eventually(check: Any, within: float = 10.0) -> None:
    deadline = asyncio.get_running_loop().time() + within
    while not check():
        assert asyncio.get_running_loop().time() < deadline, "condition not met in time"
        await asyncio.sleep(0.01)


async def use(ledger: LocalLedger, customer: str, feature: str) -> bool:
    reservation = await ledger.reserve(customer, feature)
    if reservation.answer.ok:
        await ledger.commit(reservation)
    return reservation.answer.ok


def leased_in_file(path: pathlib.Path) -> dict[tuple[str, str, str], int]:
    return {
        (customer, feature, period): units
        for customer, feature, period, units in query(
            path, "SELECT customer, feature, period, SUM(units) FROM leases GROUP BY 1, 2, 3"
        )
    }


def leased_in_memory(ledger: LocalLedger) -> dict[tuple[str, str, str], int]:
    return {
        key: slot.available + slot.held
        for key, slot in ledger._slots.items()
        if slot.available + slot.held
    }


async def test_the_cap_on_slots_holds_and_eviction_loses_no_charge_and_leaks_no_unit(
    tmp_path: pathlib.Path,
) -> None:
    """300 customers through a ledger capped at 40 slots: memory stays near the cap, every
    customer gets exactly its 3 units over 5 attempts across evictions, and the file's lease
    rows are exactly the units the slots still in memory hold (none left by evicted ones)."""
    path = tmp_path / "usage.db"
    customers = [f"org:c{i}" for i in range(300)]
    async with LocalLedger(path, pricing=PRICING, max_slots=40) as ledger:
        assert isinstance(ledger, LocalLedger)
        await ledger.subscribe_many(customers, PLAN)
        most = 0
        allowed: dict[str, int] = dict.fromkeys(customers, 0)
        for _ in range(5):
            for start in range(0, len(customers), 20):
                chunk = customers[start : start + 20]
                results = await asyncio.gather(*(use(ledger, c, FEW) for c in chunk))
                for customer, ok in zip(chunk, results, strict=True):
                    allowed[customer] += ok
                most = max(most, len(ledger._slots))
        await eventually(lambda: len(ledger._slots) <= 40)
        assert most <= 40 + 2 * 20, most  # the cap, plus the chunks in flight at most
        await ledger.flush()
        assert allowed == dict.fromkeys(customers, 3)
        assert query(path, "SELECT customer, used FROM usage WHERE feature = ?", FEW) == [
            (customer, 3) for customer in sorted(customers)
        ]
        await eventually(lambda: not ledger._evicting)
        assert leased_in_file(path) == leased_in_memory(ledger)
    assert query(path, "SELECT COUNT(*) FROM leases") == [(0,)]


async def test_eviction_keeps_slots_with_a_request_in_flight_or_a_charge_unwritten(
    tmp_path: pathlib.Path,
) -> None:
    """A slot whose request is still running, or whose charge is not yet written, is not
    evicted however many customers come after it; both are charged exactly once."""
    path = tmp_path / "usage.db"
    customers = [f"org:c{i}" for i in range(200)]
    async with LocalLedger(path, pricing=PRICING, max_slots=10, flush_interval=0.3) as ledger:
        assert isinstance(ledger, LocalLedger)
        await ledger.subscribe_many(customers, PLAN)
        running: Reservation = await ledger.reserve(customers[0], MANY)
        assert running.answer.ok
        committed = await ledger.reserve(customers[1], MANY)
        assert committed.answer.ok
        await ledger.commit(committed)  # written only after flush_interval
        for customer in customers[2:]:
            reservation = await ledger.reserve(customer, MANY)
            assert reservation.answer.ok
            await ledger.release(reservation)
        await asyncio.sleep(0)
        kept = {key[0] for key in ledger._slots}
        assert {customers[0], customers[1]} <= kept
        await ledger.commit(running)
        await ledger.flush()
        await eventually(lambda: len(ledger._slots) <= 10)
        assert query(
            path, "SELECT customer, used FROM usage WHERE feature = ? ORDER BY customer", MANY
        ) == [(customers[0], 1), (customers[1], 1)]
        await eventually(lambda: not ledger._evicting)
        assert leased_in_file(path) == leased_in_memory(ledger)


async def test_concurrent_first_touches_share_lease_transactions(tmp_path: pathlib.Path) -> None:
    """200 customers' concurrent first requests take their leases in a handful of
    transactions (one lease_many per batch), not one transaction each; all are charged."""
    path = tmp_path / "usage.db"
    customers = [f"org:c{i}" for i in range(200)]
    async with LocalLedger(path, pricing=PRICING) as ledger:
        assert isinstance(ledger, LocalLedger)
        await ledger.subscribe_many(customers, PLAN)
        store = ledger._store
        assert store is not None
        statements: list[str] = []
        store.conn.set_trace_callback(statements.append)
        results = await asyncio.gather(*(use(ledger, c, MANY) for c in customers))
        store.conn.set_trace_callback(None)
        assert all(results)
        leases_per_transaction: list[int] = []
        for statement in statements:
            if statement.startswith("BEGIN"):
                leases_per_transaction.append(0)
            elif statement.startswith("INSERT INTO leases") and leases_per_transaction:
                leases_per_transaction[-1] += 1
        assert sum(leases_per_transaction) == 200
        assert len([n for n in leases_per_transaction if n]) <= 3, leases_per_transaction
        await ledger.flush()
    assert query(path, "SELECT COUNT(*), SUM(used) FROM usage WHERE feature = ?", MANY) == [
        (200, 200)
    ]


async def engine_lines_of_a_grant(path: pathlib.Path, n: int) -> int:
    """Lines of the engine's re-validation after one grant (an admin write), ``n`` slots."""
    customers = [f"org:c{i}" for i in range(n)]
    async with LocalLedger(path, pricing=PRICING) as ledger:
        assert isinstance(ledger, LocalLedger)
        await ledger.subscribe_many(customers, PLAN)
        await asyncio.gather(*(use(ledger, c, MANY) for c in customers))
        assert len(ledger._current) == n
        await ledger._maintain()  # the subscriptions' changes seen: later ticks have none
        lines = 0
        filename = engine_module.__file__
        # The grant's own re-validation (not a tick's, which may run meanwhile).
        counted = {"_changed", "_slots_of"}

        def tracer(frame: FrameType, event: str, arg: Any) -> Any:
            nonlocal lines
            if frame.f_code.co_filename != filename or frame.f_code.co_name not in counted:
                return None
            if event == "line":
                lines += 1
            return tracer

        sys.settrace(tracer)
        try:
            await ledger.grant(customers[0], MANY, 5)
        finally:
            sys.settrace(None)
        slot = ledger._current[customers[0], MANY]
        assert slot.fresh_until == 0.0  # re-validated on its next use
    return lines


async def test_a_changed_customer_costs_no_walk_over_every_slot(tmp_path: pathlib.Path) -> None:
    """Re-validating one changed customer's slots (after an admin write, or one another
    process made) looks that customer up: the same work with 1,000 slots as with 50."""
    small = await engine_lines_of_a_grant(tmp_path / "small.db", 50)
    large = await engine_lines_of_a_grant(tmp_path / "large.db", 1000)
    assert large < 2 * small, (small, large)


async def test_an_evicted_slots_units_come_back_when_the_first_give_back_fails(
    tmp_path: pathlib.Path,
) -> None:
    """If giving back evicted slots' units fails (rolled back), the next tick gives them
    back: the file's lease rows end up exactly what the slots in memory hold."""
    path = tmp_path / "usage.db"
    customers = [f"org:c{i}" for i in range(30)]
    async with LocalLedger(path, pricing=PRICING, max_slots=10) as ledger:
        assert isinstance(ledger, LocalLedger)
        await ledger.subscribe_many(customers, PLAN)
        store = ledger._store
        assert store is not None
        original = store.give_back
        failed: list[int] = []

        def failing(gives: Any) -> None:
            if not failed:
                failed.append(len(gives))
                raise sqlite3.OperationalError("disk I/O error")
            original(gives)

        store.give_back = failing  # type: ignore[method-assign]
        for customer in customers:
            assert await use(ledger, customer, MANY)
        await eventually(lambda: len(ledger._slots) <= 10 and not ledger._evicting)
        await ledger.flush()
        assert failed
        assert sum(leased_in_file(path).values()) > sum(leased_in_memory(ledger).values())
        await ledger._maintain()  # the tick retries the give-back
        assert leased_in_file(path) == leased_in_memory(ledger)
        assert query(path, "SELECT COUNT(*), SUM(used) FROM usage WHERE feature = ?", MANY) == [
            (30, 30)
        ]


async def test_a_failed_lease_in_a_batch_fails_only_its_own_request(
    tmp_path: pathlib.Path,
) -> None:
    """When the store answers one lease of a batch with an error, that request is refused
    with the error (503-style, ``err`` set) and the others of the batch are served."""
    path = tmp_path / "usage.db"
    customers = [f"org:c{i}" for i in range(3)]
    async with LocalLedger(path, pricing=PRICING) as ledger:
        assert isinstance(ledger, LocalLedger)
        await ledger.subscribe_many(customers, PLAN)
        store = ledger._store
        assert store is not None
        original = store.lease_many

        def one_fails(requests: Any) -> list[Any]:
            grants: list[Any] = original(requests)
            for i, request in enumerate(requests):
                if request[0] == customers[1]:
                    grants[i] = sqlite3.OperationalError("disk I/O error")
            return grants

        store.lease_many = one_fails  # type: ignore[method-assign]
        reservations = await asyncio.gather(*(ledger.reserve(c, MANY) for c in customers))
        answers = [r.answer for r in reservations]
        assert [a.ok for a in answers] == [True, False, True]
        assert isinstance(answers[1].err, sqlite3.OperationalError)
        for reservation in reservations:
            if reservation.answer.ok:
                await ledger.commit(reservation)
        await ledger.flush()
    assert query(path, "SELECT customer, used FROM usage ORDER BY customer") == [
        (customers[0], 1),
        (customers[2], 1),
    ]
