"""Reserve+commit throughput: LocalLedger's hot path against a per-request-transaction ledger.

Run: ``python bench/bench_ledger.py [--ops 20000] [--rounds 5] [--concurrency 1]``

Each operation is ``reserve(customer, feature, 1)`` then ``commit`` (what the middleware
does per metered request), followed by ``await asyncio.sleep(0)`` (a request yields to the
event loop at least once; this lets background tasks such as the flusher run, as in a
server). Variants, interleaved round by round on one file each, median reported:

* ``local``: LocalLedger, limited feature (leases + group commit).
* ``local-unlimited``: LocalLedger, unlimited feature (no lease; group commit only).
* ``naive-thread``: the straightforward design: ``reserve`` = one ``BEGIN IMMEDIATE``
  transaction (read used + reserved, check, hold), ``commit`` = one transaction (add to
  used, drop the hold, insert the charge row), each on a worker thread via
  ``run_in_executor`` so the event loop never blocks on SQLite.
* ``naive-inline``: the same two transactions run on the event-loop thread (blocks every
  other request while SQLite works; shown for reference).

All use stdlib sqlite3 with WAL and synchronous=NORMAL. The script checks that every
variant recorded exactly the operations it ran, then prints ops/s and the ratio of each
variant to ``naive-thread``. The machine is shared and noisy: read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import pathlib
import sqlite3
import statistics
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor

from usage_middleware.ledger import LocalLedger

PRICING = {
    "plans": {
        "plan:bench@1": {
            "features": {
                "feature:metered": {"tiers": [{"upto": 1_000_000_000}]},
                "feature:free": {"tiers": [{"price": 0}]},
            }
        }
    }
}

Op = Callable[[], Awaitable[None]]


class NaiveLedger:
    """Two SQLite write transactions per request (the baseline)."""

    def __init__(self, path: pathlib.Path, *, inline: bool) -> None:
        self.inline = inline
        self.executor = ThreadPoolExecutor(1)
        self.conn = sqlite3.connect(
            path, isolation_level=None, check_same_thread=False, timeout=30.0
        )
        self.conn.execute("PRAGMA journal_mode=WAL")
        self.conn.execute("PRAGMA synchronous=NORMAL")
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS usage (customer TEXT, feature TEXT, used INTEGER,"
            " reserved INTEGER, lim INTEGER, PRIMARY KEY (customer, feature))"
        )
        self.conn.execute(
            "CREATE TABLE IF NOT EXISTS charges (id INTEGER PRIMARY KEY, customer TEXT,"
            " feature TEXT, units INTEGER, idempotency_key TEXT UNIQUE)"
        )

    def add_customer(self, customer: str, feature: str, limit: int) -> None:
        self.conn.execute("INSERT INTO usage VALUES (?, ?, 0, 0, ?)", (customer, feature, limit))

    def _reserve(self, customer: str, feature: str, units: int) -> bool:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            used, reserved, limit = conn.execute(
                "SELECT used, reserved, lim FROM usage WHERE customer = ? AND feature = ?",
                (customer, feature),
            ).fetchone()
            ok = used + reserved + units <= limit
            if ok:
                conn.execute(
                    "UPDATE usage SET reserved = reserved + ? WHERE customer = ? AND feature = ?",
                    (units, customer, feature),
                )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise
        return bool(ok)

    def _commit(self, customer: str, feature: str, units: int) -> None:
        conn = self.conn
        conn.execute("BEGIN IMMEDIATE")
        try:
            conn.execute(
                "UPDATE usage SET used = used + ?, reserved = reserved - ?"
                " WHERE customer = ? AND feature = ?",
                (units, units, customer, feature),
            )
            conn.execute(
                "INSERT INTO charges (customer, feature, units, idempotency_key)"
                " VALUES (?, ?, ?, ?)",
                (customer, feature, units, uuid.uuid4().hex),
            )
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    async def reserve(self, customer: str, feature: str, units: int) -> bool:
        if self.inline:
            return self._reserve(customer, feature, units)
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self.executor, self._reserve, customer, feature, units)

    async def commit(self, customer: str, feature: str, units: int) -> None:
        if self.inline:
            self._commit(customer, feature, units)
            return
        loop = asyncio.get_running_loop()
        await loop.run_in_executor(self.executor, self._commit, customer, feature, units)

    def used(self, customer: str, feature: str) -> int:
        row = self.conn.execute(
            "SELECT used FROM usage WHERE customer = ? AND feature = ?", (customer, feature)
        ).fetchone()
        return int(row[0])

    def close(self) -> None:
        self.executor.shutdown()
        self.conn.close()


async def drive(op: Op, ops: int, concurrency: int) -> float:
    """Run ``ops`` operations over ``concurrency`` tasks; return seconds."""
    per_task = ops // concurrency

    async def task() -> None:
        for _ in range(per_task):
            await op()
            await asyncio.sleep(0)

    started = time.perf_counter()
    await asyncio.gather(*(task() for _ in range(concurrency)))
    return time.perf_counter() - started


async def run_local(ledger: LocalLedger, feature: str, ops: int, concurrency: int) -> float:
    customer = f"org:{uuid.uuid4().hex[:12]}"
    await ledger.subscribe(customer, "plan:bench@1")

    async def op() -> None:
        reservation = await ledger.reserve(customer, feature)
        assert reservation.answer.ok, reservation.answer
        await ledger.commit(reservation)

    started = time.perf_counter()
    await drive(op, ops, concurrency)
    rows = {r.feature: r.used for r in await ledger.usage(customer)}  # writes what is pending
    elapsed = time.perf_counter() - started
    assert rows[feature] == ops // concurrency * concurrency, (rows, ops)
    return elapsed


async def run_naive(ledger: NaiveLedger, ops: int, concurrency: int) -> float:
    customer, feature = f"org:{uuid.uuid4().hex[:12]}", "feature:metered"
    ledger.add_customer(customer, feature, 1_000_000_000)

    async def op() -> None:
        assert await ledger.reserve(customer, feature, 1)
        await ledger.commit(customer, feature, 1)

    elapsed = await drive(op, ops, concurrency)
    assert ledger.used(customer, feature) == ops // concurrency * concurrency
    return elapsed


async def main(ops: int, rounds: int, concurrency: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = pathlib.Path(tmp)
        local = LocalLedger(root / "local.db", pricing=PRICING)
        await local.open()
        naive_thread = NaiveLedger(root / "naive-thread.db", inline=False)
        naive_inline = NaiveLedger(root / "naive-inline.db", inline=True)
        # The naive variants are ~20x slower: run them for fewer ops (same per-op figure).
        naive_ops = max(concurrency, ops // 10)
        variants: dict[str, tuple[int, Callable[[], Awaitable[float]]]] = {
            "local": (ops, lambda: run_local(local, "feature:metered", ops, concurrency)),
            "local-unlimited": (
                ops,
                lambda: run_local(local, "feature:free", ops, concurrency),
            ),
            "naive-thread": (naive_ops, lambda: run_naive(naive_thread, naive_ops, concurrency)),
            "naive-inline": (naive_ops, lambda: run_naive(naive_inline, naive_ops, concurrency)),
        }
        rates: dict[str, list[float]] = {name: [] for name in variants}
        await run_local(local, "feature:metered", 1000, concurrency)  # warm up
        for _ in range(rounds):
            for name, (count, run) in variants.items():
                seconds = await run()
                rates[name].append(count / seconds)
        await local.aclose()
        naive_thread.close()
        naive_inline.close()

    median = {name: statistics.median(values) for name, values in rates.items()}
    base = median["naive-thread"]
    print(f"reserve+commit, {rounds} interleaved rounds, concurrency {concurrency}, median:")
    print(f"{'variant':<18}{'ops/s':>12}{'us/op':>10}{'vs naive-thread':>18}")
    for name, rate in median.items():
        print(f"{name:<18}{rate:>12,.0f}{1e6 / rate:>10.1f}{rate / base:>17.1f}x")
    print(f"local / naive-thread = {median['local'] / base:.1f}x")
    print(f"local / naive-inline = {median['local'] / median['naive-inline']:.1f}x")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=20_000, help="operations per round (local)")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--concurrency", type=int, default=1, help="concurrent tasks")
    args = parser.parse_args()
    asyncio.run(main(args.ops, args.rounds, args.concurrency))
