"""LocalLedger specifics: the SQLite file, several processes on it, crashes, close, pricing.

Two LocalLedger instances on one file behave like two processes (each has its own lease
owner), so cross-process rules are tested in-process too; a few tests use real processes.
Waits are bounded polls, never timed assertions.
"""

from __future__ import annotations

import asyncio
import json
import pathlib
import sqlite3
import sys
import threading
import time
from typing import Any

import pytest

from tests.support.waiting import eventually
from usage_middleware.errors import ConfigurationError, LedgerError, PricingError
from usage_middleware.ledger import LocalLedger
from usage_middleware.ledger.store import LedgerStore
from usage_middleware.models import UNLIMITED, UsageEvent

PRICING = {
    "plans": {
        "plan:free@1": {
            "features": {
                "feature:convert": {"tiers": [{"upto": 100}]},
                "feature:small": {"tiers": [{"upto": 10}]},
                "feature:big": {"tiers": [{"upto": 1_000_000}]},
            }
        },
        "plan:pro@1": {"features": {"feature:small": {"tiers": [{"upto": 1000}]}}},
    }
}
ACME = "org:acme"
CONVERT = "feature:convert"
SMALL = "feature:small"
BIG = "feature:big"


async def prepared(path: pathlib.Path) -> None:
    """Store PRICING in a fresh file and put org:acme on plan:free@1."""
    async with LocalLedger(path, pricing=PRICING) as ledger:
        assert isinstance(ledger, LocalLedger)
        await ledger.subscribe(ACME, "plan:free@1")


def query(path: pathlib.Path, sql: str) -> list[tuple[Any, ...]]:
    with sqlite3.connect(path) as conn:
        return conn.execute(sql).fetchall()


async def use(ledger: LocalLedger, feature: str, units: int = 1) -> bool:
    reservation = await ledger.reserve(ACME, feature, units)
    if reservation.answer.ok:
        await ledger.commit(reservation)
    return reservation.answer.ok


async def used(ledger: LocalLedger, feature: str) -> int:
    return next(r.used for r in await ledger.usage(ACME) if r.feature == feature)


def count_calls(store: LedgerStore, name: str) -> list[str]:
    """Wrap a store method; the returned list gets the worker thread's name per call."""
    calls: list[str] = []
    original = getattr(store, name)

    def wrapper(*args: Any) -> Any:
        calls.append(threading.current_thread().name)
        return original(*args)

    setattr(store, name, wrapper)
    return calls


def store_of(ledger: LocalLedger) -> LedgerStore:
    store = ledger._store
    assert store is not None
    return store


# -- the file ------------------------------------------------------------------------------


async def test_the_file_is_in_wal_mode(tmp_path: pathlib.Path) -> None:
    """The ledger file uses SQLite's WAL journal (readers never block the writer)."""
    path = tmp_path / "usage.db"
    await prepared(path)
    assert query(path, "PRAGMA journal_mode") == [("wal",)]


async def test_short_transactions_run_inline_when_the_file_is_free(tmp_path: pathlib.Path) -> None:
    """With no lock held elsewhere, lease and group commit run on the loop thread (no hop)."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path) as ledger:
        assert isinstance(ledger, LocalLedger)
        leases = count_calls(store_of(ledger), "lease")
        flushes = count_calls(store_of(ledger), "flush")
        assert await use(ledger, CONVERT)

        async def flushed() -> bool:
            return bool(flushes)

        await eventually(flushed)
    assert leases and flushes
    loop_thread = threading.current_thread().name
    assert set(leases + flushes) == {loop_thread}


async def test_a_locked_file_never_blocks_the_event_loop(tmp_path: pathlib.Path) -> None:
    """While another process holds the write lock, the lease waits on the worker thread and
    the event loop keeps serving; the reservation succeeds once the lock is released."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path) as ledger:
        assert isinstance(ledger, LocalLedger)
        leases = count_calls(store_of(ledger), "lease")
        other = sqlite3.connect(path, isolation_level=None)
        other.execute("BEGIN IMMEDIATE")  # the write lock, as another process would hold it
        ticks = 0

        async def ticker() -> None:
            nonlocal ticks
            while True:
                await asyncio.sleep(0.01)
                ticks += 1

        ticking = asyncio.create_task(ticker())
        reserving = asyncio.create_task(ledger.reserve(ACME, CONVERT, 1))
        await asyncio.sleep(0.3)
        assert not reserving.done()
        assert ticks >= 10  # the loop was not blocked while the lease waited
        other.execute("COMMIT")
        other.close()
        reservation = await asyncio.wait_for(reserving, 10)
        ticking.cancel()
        assert reservation.ok
        await ledger.release(reservation)
    # Tried inline first (refused at once: locked), then done on the worker thread.
    assert leases[0] == threading.current_thread().name
    assert leases[-1].startswith("usage-middleware-ledger")


async def test_warm_requests_run_no_transaction_each(tmp_path: pathlib.Path) -> None:
    """1000 reserve+commit on a warm customer take a handful of lease and flush transactions."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path, lease_size=64) as ledger:
        assert isinstance(ledger, LocalLedger)
        leases = count_calls(store_of(ledger), "lease")
        flushes = count_calls(store_of(ledger), "flush")
        for _ in range(1000):
            assert await use(ledger, BIG)
        assert await used(ledger, BIG) == 1000
    assert len(leases) <= 1000 // 64 + 3
    assert len(flushes) <= 20


async def test_concurrent_cold_reserves_make_one_lease_transaction(
    tmp_path: pathlib.Path,
) -> None:
    """Single-flight: 100 concurrent first reservations of one customer share one lease."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path, lease_size=1000) as ledger:
        assert isinstance(ledger, LocalLedger)
        leases = count_calls(store_of(ledger), "lease")
        reservations = await asyncio.gather(*(ledger.reserve(ACME, BIG) for _ in range(100)))
        assert all(r.answer.ok for r in reservations)
        assert len(leases) == 1


async def test_a_refusal_is_remembered_briefly(tmp_path: pathlib.Path) -> None:
    """An exhausted or unknown customer hammering the API costs no transaction per request."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path) as ledger:
        assert isinstance(ledger, LocalLedger)
        for _ in range(10):
            assert await use(ledger, SMALL)
        leases = count_calls(store_of(ledger), "lease")
        for _ in range(100):
            assert not (await ledger.reserve(ACME, SMALL)).answer.ok
            assert not (await ledger.reserve("org:nobody", SMALL)).answer.ok
        assert len(leases) <= 4


# -- several owners on one file ------------------------------------------------------------


async def test_leases_shrink_near_the_limit(tmp_path: pathlib.Path) -> None:
    """Far from the limit a lease is lease_size units; near it, a quarter of what is left."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path, lease_size=64) as ledger:
        assert isinstance(ledger, LocalLedger)
        assert (await ledger.reserve(ACME, BIG)).answer.ok
        assert (await ledger.reserve(ACME, SMALL)).answer.ok
        rows = dict(query(path, "SELECT feature, units FROM leases"))
        assert rows == {BIG: 64, SMALL: 2}


async def test_units_leased_by_one_owner_are_not_granted_to_another(
    tmp_path: pathlib.Path,
) -> None:
    """Two ledgers on one file never together hand out more than the limit."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path) as first, LocalLedger(path) as second:
        assert isinstance(first, LocalLedger) and isinstance(second, LocalLedger)
        allowed = 0
        for _ in range(30):
            for ledger in (first, second):
                allowed += await use(ledger, SMALL)
        assert allowed == 10
        await first.usage(ACME)  # write both owners' charges: their leases shrink
        await second.usage(ACME)
        assert query(path, "SELECT COALESCE(SUM(units), 0) FROM leases") == [(0,)]
    assert query(path, "SELECT used FROM usage WHERE feature = 'feature:small'") == [(allowed,)]


async def test_an_idle_lease_is_returned_for_others(tmp_path: pathlib.Path) -> None:
    """Units parked in one owner's idle lease become usable by another within a few ticks."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path, lease_ttl=0.8) as first, LocalLedger(path) as second:
        assert isinstance(first, LocalLedger) and isinstance(second, LocalLedger)
        assert await use(first, SMALL)  # leases 2, uses 1, parks 1
        while await use(second, SMALL):
            pass

        async def second_gets_the_parked_unit() -> bool:
            return await use(second, SMALL)

        await eventually(second_gets_the_parked_unit)
        assert await used(second, SMALL) == 10


async def test_aclose_returns_unused_leases(tmp_path: pathlib.Path) -> None:
    """Closing a ledger deletes its lease rows, so their units are free again."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path) as ledger:
        assert isinstance(ledger, LocalLedger)
        assert await use(ledger, BIG)
        assert query(path, "SELECT COUNT(*) FROM leases") == [(1,)]
    assert query(path, "SELECT COUNT(*) FROM leases") == [(0,)]


async def test_a_plan_change_elsewhere_reaches_a_running_ledger(tmp_path: pathlib.Path) -> None:
    """A subscribe made through another ledger on the file applies here within a few ticks."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path, lease_ttl=0.8) as serving, LocalLedger(path) as admin:
        assert isinstance(serving, LocalLedger) and isinstance(admin, LocalLedger)
        while await use(serving, SMALL):
            pass
        await admin.subscribe(ACME, "plan:pro@1")

        async def allowed_again() -> bool:
            return await use(serving, SMALL)

        await eventually(allowed_again)


async def test_usage_reported_elsewhere_stops_a_running_ledger(tmp_path: pathlib.Path) -> None:
    """Usage reported through another ledger revokes this one's lease within a few ticks."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path, lease_ttl=0.8) as serving, LocalLedger(path) as admin:
        assert isinstance(serving, LocalLedger) and isinstance(admin, LocalLedger)
        assert await use(serving, CONVERT)  # holds a lease of 25
        await admin.report([UsageEvent(ACME, CONVERT, 99)])

        async def refused() -> bool:
            return not (await serving.reserve(ACME, CONVERT)).answer.ok

        await eventually(refused)
        assert await used(serving, CONVERT) == 100


# -- real processes --------------------------------------------------------------------------

WORKER = r"""
import asyncio, json, sys
from usage_middleware.ledger import LocalLedger

ACME, CONVERT = "org:acme", "feature:convert"

async def hold(path):
    ledger = LocalLedger(path, lease_ttl=2.0)
    reservation = await ledger.reserve(ACME, CONVERT)
    print(json.dumps({"ok": reservation.answer.ok}), flush=True)
    await asyncio.sleep(120)

async def share(path):
    ledger = LocalLedger(path, lease_ttl=2.0)
    await ledger.open()
    print("ready", flush=True)
    sys.stdin.readline()
    loop = asyncio.get_running_loop()
    allowed = 0

    async def task(n):
        nonlocal allowed
        denied_since = None
        for i in range(5000):
            reservation = await ledger.reserve(ACME, CONVERT)
            if reservation.answer.ok:
                denied_since = None
                await asyncio.sleep(0.001)
                if (n + i) % 7 == 0:
                    await ledger.release(reservation)
                else:
                    allowed += 1
                    await ledger.commit(reservation)
                continue
            denied_since = denied_since or loop.time()
            if loop.time() - denied_since > 3.0:
                return
            await asyncio.sleep(0.05)

    await asyncio.gather(*(task(n) for n in range(10)))
    await ledger.aclose()
    print(json.dumps({"allowed": allowed}), flush=True)

asyncio.run({"hold": hold, "share": share}[sys.argv[2]](sys.argv[1]))
"""


async def start_worker(path: pathlib.Path, mode: str) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        WORKER,
        str(path),
        mode,
        stdin=asyncio.subprocess.PIPE,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


@pytest.mark.slow
async def test_two_processes_together_charge_exactly_the_limit(tmp_path: pathlib.Path) -> None:
    """Two processes reserving/committing/releasing concurrently charge exactly 100 of 100."""
    path = tmp_path / "usage.db"
    await prepared(path)
    workers = [await start_worker(path, "share") for _ in range(2)]
    try:
        for worker in workers:
            assert worker.stdout is not None
            assert await asyncio.wait_for(worker.stdout.readline(), 60) == b"ready\n"
        for worker in workers:
            assert worker.stdin is not None
            worker.stdin.write(b"go\n")
            await worker.stdin.drain()
        outputs = [await asyncio.wait_for(worker.communicate(), 120) for worker in workers]
    finally:
        for worker in workers:
            if worker.returncode is None:
                worker.kill()
                await worker.wait()
    assert [worker.returncode for worker in workers] == [0, 0], outputs
    allowed = [json.loads(out.splitlines()[-1])["allowed"] for out, _ in outputs]
    assert sum(allowed) == 100, allowed
    assert query(path, "SELECT used FROM usage WHERE feature = 'feature:convert'") == [(100,)]
    assert query(path, "SELECT SUM(requests), SUM(units) FROM charges") == [(100, 100)]
    assert query(path, "SELECT COUNT(*) FROM leases") == [(0,)]


@pytest.mark.slow
async def test_a_killed_process_lease_comes_back_after_the_ttl(tmp_path: pathlib.Path) -> None:
    """SIGKILL while holding a lease: its units are refused until the TTL, then usable again."""
    path = tmp_path / "usage.db"
    await prepared(path)
    worker = await start_worker(path, "hold")
    try:
        assert worker.stdout is not None
        line = await asyncio.wait_for(worker.stdout.readline(), 60)
        assert json.loads(line) == {"ok": True}
    finally:
        worker.kill()
        await worker.wait()
    [(units, expires_at)] = query(path, "SELECT units, expires_at FROM leases")
    assert units == 25  # a quarter of the 100 free units
    async with LocalLedger(path) as ledger:
        assert isinstance(ledger, LocalLedger)
        if time.time() < expires_at - 0.5:
            assert not (await ledger.reserve(ACME, CONVERT, 100)).answer.ok
        await asyncio.sleep(max(0.0, expires_at - time.time()) + 0.3)
        reservation = await ledger.reserve(ACME, CONVERT, 100)
        assert reservation.answer.ok
        await ledger.commit(reservation)
        assert await used(ledger, CONVERT) == 100  # the killed request was never charged


# -- writing, closing ------------------------------------------------------------------------


async def test_aclose_writes_pending_charges(tmp_path: pathlib.Path) -> None:
    """Charges committed in memory are written by aclose() (they are not yet before it)."""
    path = tmp_path / "usage.db"
    await prepared(path)
    ledger = LocalLedger(path, flush_interval=3600)
    for _ in range(5):
        assert await use(ledger, CONVERT)
    assert query(path, "SELECT COUNT(*) FROM charges") == [(0,)]
    await ledger.aclose()
    assert query(path, "SELECT COUNT(*), SUM(requests), SUM(units) FROM charges") == [(1, 5, 5)]
    assert query(path, "SELECT used FROM usage") == [(5,)]


async def test_a_group_commit_writes_one_row_per_customer_feature(tmp_path: pathlib.Path) -> None:
    """2500 pending charges of one customer feature are one transaction and one summed row."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path, flush_interval=3600) as ledger:
        assert isinstance(ledger, LocalLedger)
        store = store_of(ledger)
        original = store.flush
        sizes: list[int] = []

        def flush(batch: Any) -> Any:
            sizes.append(len(batch))
            return original(batch)

        store.flush = flush  # type: ignore[method-assign]
        for _ in range(2500):
            assert await use(ledger, BIG)
        assert await used(ledger, BIG) == 2500
    assert sizes == [1]
    assert query(path, "SELECT COUNT(*), SUM(requests), SUM(units) FROM charges") == [
        (1, 2500, 2500)
    ]


async def test_a_failed_write_is_retried_not_dropped(tmp_path: pathlib.Path) -> None:
    """When the group commit fails, its charges are written by a later attempt."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path) as ledger:
        assert isinstance(ledger, LocalLedger)
        store = store_of(ledger)
        original = store.flush
        failures = [sqlite3.OperationalError("disk I/O error")]

        def flaky(batch: Any) -> Any:
            if failures:
                raise failures.pop()
            return original(batch)

        store.flush = flaky  # type: ignore[method-assign]
        for _ in range(3):
            assert await use(ledger, CONVERT)

        async def written() -> bool:
            return query(path, "SELECT SUM(requests) FROM charges") == [(3,)]

        await eventually(written)
        assert not failures
        assert await used(ledger, CONVERT) == 3


async def test_one_unwritable_charge_never_blocks_the_others(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A charge failing on its own data is logged and left out; other customers' get written."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path) as ledger:
        assert isinstance(ledger, LocalLedger)
        await ledger.subscribe("org:b", "plan:free@1")
        store = store_of(ledger)
        original = store._add_usage

        def poisoned(customer: str, *args: Any, **kwargs: Any) -> Any:
            if customer == ACME:
                raise OverflowError("Python int too large to convert to SQLite INTEGER")
            return original(customer, *args, **kwargs)

        store._add_usage = poisoned  # type: ignore[method-assign]
        first = await ledger.reserve(ACME, CONVERT)
        second = await ledger.reserve("org:b", CONVERT)
        await ledger.commit(first)
        await ledger.commit(second)

        async def written() -> bool:
            return query(path, "SELECT customer, used FROM usage") == [("org:b", 1)]

        await eventually(written, within=5.0)
    assert query(path, "SELECT customer, units FROM charges") == [("org:b", 1)]
    assert "dropped a charge that cannot be written: 1 units of feature:convert for org:acme" in (
        caplog.text
    )


async def test_a_usage_total_past_2_63_is_clamped_not_an_endless_retry(
    tmp_path: pathlib.Path,
) -> None:
    """A charge taking a period's used past 2**63-1 stores UNLIMITED (an integer), not a failure."""
    path = tmp_path / "usage.db"
    await prepared(path)
    big = {"plans": {"plan:free@1": {"features": {"feature:open": {}}}}}
    async with LocalLedger(path, pricing=big) as ledger:
        assert isinstance(ledger, LocalLedger)
        assert await use(ledger, "feature:open", 1)
    with sqlite3.connect(path) as conn:
        conn.execute(f"UPDATE usage SET used = {UNLIMITED - 5}")
    async with LocalLedger(path) as ledger:
        assert isinstance(ledger, LocalLedger)
        assert await use(ledger, "feature:open", 10)
    assert query(path, "SELECT used, typeof(used) FROM usage") == [(UNLIMITED, "integer")]
    assert query(path, "SELECT SUM(units) FROM charges") == [(11,)]


async def test_a_failed_lease_is_an_answer_with_err(tmp_path: pathlib.Path) -> None:
    """A SQLite error while leasing gives ok=False with err and retry_after, never raises."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path) as ledger:
        assert isinstance(ledger, LocalLedger)
        store = store_of(ledger)
        original = store.lease
        error = sqlite3.OperationalError("database is locked")

        def broken(*args: Any) -> Any:
            raise error

        store.lease = broken  # type: ignore[method-assign]
        answer = (await ledger.reserve(ACME, CONVERT)).answer
        assert (answer.ok, answer.err, answer.reason) == (False, error, "ledger unavailable")
        assert answer.retry_after is not None
        store.lease = original  # type: ignore[method-assign]
        assert await use(ledger, CONVERT, 100)


async def test_a_closed_ledger_refuses_until_reopened(tmp_path: pathlib.Path) -> None:
    """Closed: admin calls raise, reserve answers with err; open() again serves (issue 11)."""
    ledger = LocalLedger(tmp_path / "usage.db", pricing=PRICING)
    await ledger.open()
    await ledger.aclose()
    await ledger.aclose()  # idempotent
    with pytest.raises(ConfigurationError, match="closed"):
        await ledger.subscribe(ACME, "plan:free@1")
    answer = (await ledger.reserve(ACME, CONVERT)).answer
    assert not answer.ok and isinstance(answer.err, ConfigurationError)
    await ledger.open()
    await ledger.subscribe(ACME, "plan:free@1")
    assert (await ledger.reserve(ACME, CONVERT)).answer.ok
    await ledger.aclose()


async def test_a_commit_after_close_is_still_written(tmp_path: pathlib.Path) -> None:
    """A request that finishes after shutdown began is still charged."""
    path = tmp_path / "usage.db"
    await prepared(path)
    ledger = LocalLedger(path)
    reservation = await ledger.reserve(ACME, CONVERT, 2)
    assert reservation.answer.ok
    await ledger.aclose()
    await ledger.commit(reservation)
    assert query(path, "SELECT used FROM usage") == [(2,)]


async def test_an_unsettled_reservation_keeps_its_hold_past_the_timeout(
    tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A reservation unsettled past reservation_timeout is logged but keeps its hold (a
    long request), so its commit stays within the limit."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path, reservation_timeout=0.2, lease_ttl=0.8) as ledger:
        assert isinstance(ledger, LocalLedger)
        running = await ledger.reserve(ACME, SMALL, 10)
        assert running.answer.ok

        async def logged() -> bool:
            return "unsettled after 0.2s" in caplog.text

        await eventually(logged)
        await asyncio.sleep(1.0)  # past lease_ttl too: the lease row is renewed
        assert not await use(ledger, SMALL, 1)
        await ledger.commit(running)
        assert await used(ledger, SMALL) == 10


async def test_closing_while_reservations_are_in_flight(tmp_path: pathlib.Path) -> None:
    """aclose() during cold reservations: each gets an answer, no lease row is left behind."""
    path = tmp_path / "usage.db"
    await prepared(path)
    ledger = LocalLedger(path)
    await ledger.open()
    tasks = [asyncio.create_task(ledger.reserve(ACME, CONVERT)) for _ in range(20)]
    await asyncio.sleep(0)
    await ledger.aclose()
    reservations = await asyncio.gather(*tasks)
    for reservation in reservations:
        if reservation.answer.ok:
            await ledger.commit(reservation)  # written on a short-lived connection
        else:
            assert reservation.answer.reason == "ledger closed"
    assert query(path, "SELECT COUNT(*) FROM leases") == [(0,)]
    charged = sum(r.answer.ok for r in reservations)
    assert query(path, "SELECT COALESCE(SUM(used), 0) FROM usage") == [(charged,)]


async def test_cancelled_reservations_leak_nothing(tmp_path: pathlib.Path) -> None:
    """Reservations cancelled while the lease transaction runs leave every unit usable."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path) as ledger:
        assert isinstance(ledger, LocalLedger)
        tasks = [asyncio.create_task(ledger.reserve(ACME, SMALL)) for _ in range(5)]
        await asyncio.sleep(0)
        for task in tasks:
            task.cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
        assert all(isinstance(result, asyncio.CancelledError) for result in results)
        assert await use(ledger, SMALL, 10)


# -- pricing -----------------------------------------------------------------------------------


def test_bad_pricing_is_refused_at_construction(tmp_path: pathlib.Path) -> None:
    """An invalid pricing (dict or file) raises PricingError when the ledger is made."""
    with pytest.raises(PricingError, match="plan 'free'"):
        LocalLedger(tmp_path / "usage.db", pricing={"plans": {"free": {}}})
    with pytest.raises(PricingError, match="not found"):
        LocalLedger(tmp_path / "usage.db", pricing=tmp_path / "missing.json")


@pytest.mark.parametrize(
    ("argument", "value"),
    [("lease_size", 0), ("lease_ttl", 0), ("flush_interval", -1), ("reservation_timeout", 0)],
)
def test_bad_tuning_arguments(tmp_path: pathlib.Path, argument: str, value: int) -> None:
    """Out-of-range tuning arguments raise ValueError naming the argument."""
    with pytest.raises(ValueError, match=argument):
        LocalLedger(tmp_path / "usage.db", **{argument: value})


@pytest.mark.parametrize(
    ("argument", "value"),
    [("lease_size", 0), ("lease_ttl", 0), ("flush_interval", -1), ("reservation_timeout", 0)],
)
def test_bad_tuning_arguments_are_configuration_errors(
    tmp_path: pathlib.Path, argument: str, value: int
) -> None:
    """A bad LocalLedger setting is a ConfigurationError, like every other bad setting."""
    with pytest.raises(ConfigurationError, match=argument):
        LocalLedger(tmp_path / "usage.db", **{argument: value})


async def test_pricing_is_stored_in_the_file_and_replaced(tmp_path: pathlib.Path) -> None:
    """The pricing given once is used by later ledgers without one; giving it again replaces it."""
    path = tmp_path / "usage.db"
    async with LocalLedger(path, pricing=PRICING):
        pass
    unopened = LocalLedger(path)
    assert unopened.pricing is None
    async with LocalLedger(path) as ledger:
        assert isinstance(ledger, LocalLedger)
        assert ledger.pricing == LocalLedger(path, pricing=PRICING).pricing
        await ledger.subscribe(ACME, "plan:free@1")
        assert await use(ledger, SMALL)
    other = {
        "plans": {
            "plan:free@1": {"features": {SMALL: {"tiers": [{"upto": 1}]}}},
            "plan:other@1": {"features": {SMALL: {"tiers": [{"upto": 1}]}}},
        }
    }
    async with LocalLedger(path, pricing=other) as ledger:
        with pytest.raises(LedgerError, match="known plans: plan:free@1, plan:other@1"):
            await ledger.subscribe(ACME, "plan:pro@1")
        await ledger.subscribe(ACME, "plan:other@1")
        assert not await use(ledger, CONVERT)  # the new plan:free@1 has no feature:convert


async def test_a_pricing_dropping_a_subscribed_plan_is_refused(tmp_path: pathlib.Path) -> None:
    """A new pricing without a plan customers are on is refused, naming plan, count and fix."""
    path = tmp_path / "usage.db"
    await prepared(path)
    async with LocalLedger(path) as ledger:
        await ledger.subscribe("org:b", "plan:free@1")
        await ledger.subscribe("org:c", "plan:pro@1")
    other = {"plans": {"plan:other@1": {"features": {SMALL: {"tiers": [{"upto": 1}]}}}}}
    with pytest.raises(ConfigurationError) as caught:
        async with LocalLedger(path, pricing=other):
            pass
    message = str(caught.value)
    assert "plan:free@1 (2 customers), plan:pro@1 (1 customer)" in message
    assert "usage-middleware subscribe" in message
    async with LocalLedger(path) as ledger:  # the stored pricing is unchanged
        assert isinstance(ledger, LocalLedger) and ledger.pricing is not None
        assert set(ledger.pricing.plans) == {"plan:free@1", "plan:pro@1"}
        assert await use(ledger, CONVERT)
    kept = {"plans": {**other["plans"], "plan:free@1": PRICING["plans"]["plan:free@1"]}}
    async with LocalLedger(path) as ledger:
        await ledger.subscribe("org:c", "plan:free@1")
    async with LocalLedger(path, pricing=kept) as ledger:  # plan:pro@1 has no one left
        assert isinstance(ledger, LocalLedger) and ledger.pricing is not None
        assert set(ledger.pricing.plans) == {"plan:free@1", "plan:other@1"}


async def test_subscribe_without_any_pricing_says_how_to_fix(tmp_path: pathlib.Path) -> None:
    """A ledger file that never got a pricing refuses subscribe with the fix in the message."""
    async with LocalLedger(tmp_path / "usage.db") as ledger:
        with pytest.raises(LedgerError, match="pass pricing="):
            await ledger.subscribe(ACME, "plan:free@1")


@pytest.mark.parametrize(
    "option", [{"flush_interval": float("inf")}, {"lease_ttl": float("nan")}, {"lease_ttl": 0}]
)
def test_unbounded_timings_are_refused(tmp_path: pathlib.Path, option: dict[str, float]) -> None:
    """flush_interval bounds the crash window and lease_ttl the leak: both must be finite."""
    with pytest.raises(ValueError, match=r"finite"):
        LocalLedger(tmp_path / "usage.db", **option)
