"""Throughput of a metered app as requests spread over N customers (the N-sweep), in process.

For each N (1, 1,000, 10,000, 100,000) a fresh ledger subscribes N customers to a plan whose
limit is out of reach (in bulk: ``LocalLedger.subscribe_many``; ``RedisLedger.subscribe``
concurrently), then the metered app (``UsageMiddleware`` + ``@metered`` on the ledger,
driven by ``bench/asgi_driver.py``: one request at a time, yielding once per request) is
called with the customers in turn, evenly:

* a first pass touches every customer once (the first-touch cost: each customer's first
  lease), reported as its own rate;
* then the measured phase, for a fixed time, keeps cycling over the customers.

Printed per N: requests/s of the measured phase and its ratio to N = 1, the p99 latency of
one request, the RSS growth from before the first request to the end (the active
customers' memory), and how much the ledger file grew per 100,000 measured requests
(LocalLedger: the SQLite file and its WAL). Targets (issue 14): 10,000 customers >= 0.8 of
the one-customer figure, 100,000 >= 0.6, RSS growth for 100,000 <= 50 MB. At the end each
N's ledger is checked: units charged == 200 responses.

    python bench/bench_customers.py                  # LocalLedger, about 2-3 minutes
    python bench/bench_customers.py --quick          # shorter phases, under a minute or so
    python bench/bench_customers.py --max-slots 200000  # no eviction at N = 100,000
    python bench/bench_customers.py --ledger redis   # RedisLedger on a redis-server started
                                                     # on a free loopback port

Measure on a quiet machine if you can; on a shared one read the ratios.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import gc
import os
import sqlite3
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from asgi_driver import Driver
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from usage_middleware import LocalLedger, UsageMiddleware, metered
from usage_middleware.customers import customer_from_header

FEATURE = "feature:bench"
PLAN = "plan:bench@1"
PRICING = {
    "plans": {PLAN: {"interval": "@monthly", "features": {FEATURE: {"tiers": [{"upto": 10**12}]}}}}
}
SIZES = (1, 1_000, 10_000, 100_000)


def rss_bytes() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def app_for(ledger: Any) -> Any:
    async def item(request: Request) -> JSONResponse:
        return JSONResponse({"id": 1, "name": "widget"})

    return Starlette(
        routes=[Route("/item", metered(FEATURE)(item))],
        middleware=[
            Middleware(
                UsageMiddleware, provider=ledger, customer=customer_from_header("x-customer")
            )
        ],
    )


@contextlib.contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    from tests.support.redis_server import RedisServer

    server = RedisServer(directory / "redis")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


def file_size(path: Path) -> int:
    """The ledger file's size once its WAL is copied in (the WAL's size is a high-water mark)."""
    with contextlib.closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return os.path.getsize(path)


async def subscribe(ledger: Any, customers: list[str]) -> None:
    if hasattr(ledger, "subscribe_many"):
        await ledger.subscribe_many(customers, PLAN)
        return
    for start in range(0, len(customers), 200):
        await asyncio.gather(*(ledger.subscribe(c, PLAN) for c in customers[start : start + 200]))


async def charged(ledger: Any, customers: list[str]) -> int:
    if isinstance(ledger, LocalLedger):
        await ledger.flush()
        with contextlib.closing(sqlite3.connect(ledger.path)) as conn:
            (total,) = conn.execute(
                "SELECT COALESCE(SUM(used), 0) FROM usage WHERE feature = ?", (FEATURE,)
            ).fetchone()
        return int(total)
    total = 0
    for start in range(0, len(customers), 50):  # no more at once than pooled connections
        rows = await asyncio.gather(*(ledger.usage(c) for c in customers[start : start + 50]))
        total += sum(row.used for rows_ in rows for row in rows_ if row.feature == FEATURE)
    return total


async def one_size(n: int, args: argparse.Namespace, directory: Path, url: str | None) -> dict:
    gc.collect()
    path = directory / f"customers-{n}.db"
    if args.ledger == "local":
        slots = {} if args.max_slots is None else {"max_slots": args.max_slots}
        ledger: Any = LocalLedger(path, pricing=PRICING, **slots)
    else:
        from usage_middleware.ledger.redis import RedisLedger

        ledger = RedisLedger(
            url, pricing=PRICING, prefix=f"b{uuid.uuid4().hex[:6]}:", spool=directory / f"s{n}.db"
        )
    customers = [f"org:c{i}" for i in range(n)]
    async with ledger:
        started = time.perf_counter()
        await subscribe(ledger, customers)
        subscribed = time.perf_counter() - started
        driver = Driver(app_for(ledger))
        rss0 = rss_bytes()
        # First touch: every customer once (at N = 1, as many requests as a small N's pass).
        first = customers if n > 1 else customers * 1000
        started = time.perf_counter()
        for customer in first:
            await driver.one(customer)
        first_rate = len(first) / (time.perf_counter() - started)
        size0 = file_size(path) if args.ledger == "local" else 0
        # Measured: keep cycling over the customers for a fixed time.
        done, i = 0, 0
        started = time.perf_counter()
        deadline = started + args.seconds
        while time.perf_counter() < deadline:
            for _ in range(200):
                await driver.one(customers[i], timed=True)
                i = i + 1 if i + 1 < n else 0
            done += 200
        rate = done / (time.perf_counter() - started)
        await asyncio.sleep(0.05)
        if args.ledger == "local":
            await ledger.flush()
        grew = file_size(path) - size0 if args.ledger == "local" else 0
        rss = rss_bytes() - rss0
        units = await charged(ledger, customers)
    lat = sorted(driver.latencies)
    p99 = lat[int(0.99 * (len(lat) - 1))] if lat else 0.0
    return {
        "n": n,
        "rate": rate,
        "first": first_rate,
        "p99_us": p99 * 1e6,
        "p50_us": statistics.median(lat) * 1e6 if lat else 0.0,
        "rss_mb": rss / 2**20,
        "file_per_100k": grew * 100_000 / max(1, done),
        "subscribed_s": subscribed,
        "ok": driver.ok,
        "other": driver.other,
        "units": units,
    }


async def bench(args: argparse.Namespace) -> int:
    sizes = [int(s) for s in args.sizes.split(",")] if args.sizes else list(SIZES)
    failed = False
    with tempfile.TemporaryDirectory() as tmp, contextlib.ExitStack() as stack:
        url = stack.enter_context(redis_server(Path(tmp))) if args.ledger == "redis" else None
        results = []
        for n in sizes:
            result = await one_size(n, args, Path(tmp), url)
            results.append(result)
            print(
                f"  N={n:>7,}: {result['rate']:8,.0f} req/s (first touch {result['first']:,.0f}"
                f"/s; subscribed in {result['subscribed_s']:.1f} s)",
                flush=True,
            )
    base = results[0]["rate"] if results and results[0]["n"] == 1 else None
    print(f"\n{args.ledger} ledger, {args.seconds:g} s measured per N, one request at a time")
    print(
        f"{'customers':>10} {'req/s':>9} {'ratio':>6} {'p50 us':>8} {'p99 us':>8} "
        f"{'RSS +MB':>8} {'file/100k req':>14}"
    )
    for r in results:
        ratio = f"{r['rate'] / base:.2f}" if base else "-"
        file_text = f"{r['file_per_100k'] / 2**20:.2f} MB" if args.ledger == "local" else "-"
        print(
            f"{r['n']:>10,} {r['rate']:>9,.0f} {ratio:>6} {r['p50_us']:>8.0f} "
            f"{r['p99_us']:>8.0f} {r['rss_mb']:>8.1f} {file_text:>14}"
        )
        if r["units"] != r["ok"] or r["other"]:
            failed = True
            print(
                f"  N={r['n']}: units charged {r['units']} != 200 responses {r['ok']}"
                f" (others: {r['other']})"
            )
    if base:
        by_n = {r["n"]: r for r in results}
        for n, target in ((10_000, 0.8), (100_000, 0.6)):
            if n in by_n:
                ratio = by_n[n]["rate"] / base
                print(
                    f"N={n:,}: {ratio:.2f} of N=1 (target >= {target}: "
                    f"{'met' if ratio >= target else 'NOT met'})"
                )
        if 100_000 in by_n:
            mb = by_n[100_000]["rss_mb"]
            print(
                f"RSS growth at N=100,000: {mb:.1f} MB (target <= 50: "
                f"{'met' if mb <= 50 else 'NOT met'})"
            )
    return 1 if failed else 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--ledger", choices=("local", "redis"), default="local")
    parser.add_argument("--quick", action="store_true", help="shorter measured phases")
    parser.add_argument("--seconds", type=float, default=None, help="measured seconds per N")
    parser.add_argument(
        "--sizes", default="", help="comma-separated N (default 1,1000,10000,100000)"
    )
    parser.add_argument(
        "--max-slots", type=int, default=None, help="LocalLedger(max_slots=...), default its own"
    )
    args = parser.parse_args()
    if args.seconds is None:
        args.seconds = 3.0 if args.quick else 8.0
    return asyncio.run(bench(args))


if __name__ == "__main__":
    raise SystemExit(main())
