"""RedisLedger against LocalLedger: check+commit operations per second, and a metered app's
throughput as a ratio to a bare one, on each, measured in one run with interleaved rounds.

Two measurements:

1. **Ledger operations.** ``reserve`` + ``commit`` of one unit (a check-and-hold plus the
   charge: two Lua round trips on Redis, in-memory lease + group commit on SQLite), called
   directly, one at a time and with ``--concurrency`` in flight on one event loop.
2. **Metered app.** Three Starlette apps serve the same JSON route, driven in-process by
   calling ``app(scope, receive, send)`` (no sockets): ``bare``; ``UsageMiddleware`` +
   ``@metered`` on a LocalLedger; the same on a RedisLedger. One request at a time.

Every round runs each subject for ``--seconds`` in a rotating order (drift on a noisy
machine hits all alike); reported: medians over rounds, and the median of each round's
ratio to bare. Afterwards it checks each ledger charged exactly what was served.

Redis: a ``redis-server`` started here on a free loopback port (``--save "" --appendonly
no``), or the one at ``--url`` (a fresh random key prefix; nothing else is touched).

Run from the repository root::

    python bench/bench_redis.py                 # 5 rounds of 1 s per subject
    python bench/bench_redis.py --url redis://127.0.0.1:6379/0 --concurrency 64
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

from asgi_driver import http_scope
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from usage_middleware.customers import customer_from_header
from usage_middleware.decorator import metered
from usage_middleware.ledger import Ledger, LocalLedger
from usage_middleware.ledger.redis import RedisLedger
from usage_middleware.middleware import UsageMiddleware

Message = MutableMapping[str, Any]
ASGIApp = Callable[..., Awaitable[None]]

CUSTOMER = "org:bench"
FEATURE = "feature:bench"
PRICING = {"plans": {"plan:bench@1": {"features": {FEATURE: {"tiers": [{"upto": 10**12}]}}}}}


@contextlib.contextmanager
def redis_url(url: str | None, directory: Path) -> Iterator[str]:
    """``url``, or a redis-server started for this run (stopped afterwards)."""
    if url:
        yield url
        return
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # for tests/
    from tests.support.redis_server import RedisServer

    server = RedisServer(directory / "redis")
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@contextlib.asynccontextmanager
async def ledgers(url: str, directory: Path) -> AsyncIterator[dict[str, Ledger]]:
    made: dict[str, Ledger] = {
        "local": LocalLedger(directory / "bench.db", pricing=PRICING),
        "redis": RedisLedger(
            url,
            pricing=PRICING,
            prefix=f"bench{uuid.uuid4().hex[:8]}:",
            spool=directory / "spool.db",
        ),
    }
    async with contextlib.AsyncExitStack() as stack:
        for ledger in made.values():
            await stack.enter_async_context(ledger)
            await ledger.subscribe(CUSTOMER, "plan:bench@1")
        yield made


# -- 1. ledger operations ---------------------------------------------------------------


async def check_commit(ledger: Ledger, n: int) -> int:
    """``n`` reserve+commit pairs in a row; the units charged."""
    for _ in range(n):
        reservation = await ledger.reserve(CUSTOMER, FEATURE, 1)
        if not reservation.answer.ok:
            raise RuntimeError(f"refused: {reservation.answer}")
        await ledger.commit(reservation)
    return n


async def two_pings(ledger: RedisLedger, n: int) -> int:
    """``n`` pairs of PINGs through the ledger's client: the floor of two round trips."""
    client: Any = ledger.client
    for _ in range(n):
        await client.ping()
        await client.ping()
    return 0  # charges nothing


async def ops_for(
    op: Callable[[Any, int], Awaitable[int]], ledger: Ledger, seconds: float, concurrency: int
) -> tuple[float, int]:
    """``op`` pairs per second over ``seconds`` with ``concurrency`` in flight; units charged."""
    done = units = 0
    start = time.perf_counter()
    while True:
        units += sum(await asyncio.gather(*(op(ledger, 50) for _ in range(concurrency))))
        done += 50 * concurrency
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            return done / elapsed, units


# -- 2. metered app -----------------------------------------------------------------------


async def item(request: Request) -> JSONResponse:
    return JSONResponse({"id": 1, "name": "widget"})


def bare_app() -> ASGIApp:
    return Starlette(routes=[Route("/item", item)])


def metered_app(ledger: Ledger) -> ASGIApp:
    async def metered_item(request: Request) -> JSONResponse:
        return JSONResponse({"id": 1, "name": "widget"})

    return Starlette(
        routes=[Route("/item", metered(FEATURE)(metered_item))],
        middleware=[
            Middleware(
                UsageMiddleware, provider=ledger, customer=customer_from_header("x-customer")
            )
        ],
    )


async def request(app: ASGIApp) -> int:
    status = 0

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(http_scope(CUSTOMER), receive, send)
    return status


async def requests_for(app: ASGIApp, seconds: float) -> tuple[float, int]:
    """Requests per second over ``seconds``, one at a time; the 200s served."""
    done = ok = 0
    start = time.perf_counter()
    while True:
        for _ in range(100):
            ok += await request(app) == 200
        done += 100
        elapsed = time.perf_counter() - start
        if elapsed >= seconds:
            if ok != done:
                raise RuntimeError(f"{done - ok} of {done} requests were not 200")
            return done / elapsed, ok


# -- the run --------------------------------------------------------------------------------


async def rounds(
    subjects: dict[str, Callable[[], Awaitable[tuple[float, int]]]], n: int
) -> tuple[dict[str, list[float]], dict[str, int]]:
    """Run every subject once per round in a rotating order: (rates, units per subject)."""
    rates: dict[str, list[float]] = {name: [] for name in subjects}
    units = dict.fromkeys(subjects, 0)
    names = list(subjects)
    for r in range(n):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            rate, count = await subjects[name]()
            rates[name].append(rate)
            units[name] += count
        line = "  ".join(f"{name} {rates[name][-1]:7.0f}/s" for name in names)
        print(f"round {r + 1}: {line}", file=sys.stderr)
    return rates, units


def ratio(rates: dict[str, list[float]], name: str, base: str) -> float:
    return statistics.median(a / b for a, b in zip(rates[name], rates[base], strict=True))


async def used(ledger: Ledger) -> int:
    return next(row.used for row in await ledger.usage(CUSTOMER) if row.feature == FEATURE)


async def bench(args: argparse.Namespace) -> int:
    seconds, c = args.seconds, args.concurrency
    with tempfile.TemporaryDirectory(prefix="usage-bench-redis-") as tmp:
        with redis_url(args.url, Path(tmp)) as url:
            async with ledgers(url, Path(tmp)) as made:
                local, redis = made["local"], made["redis"]
                assert isinstance(redis, RedisLedger)
                ops = {
                    "local, 1 in flight": lambda: ops_for(check_commit, local, seconds, 1),
                    "redis, 1 in flight": lambda: ops_for(check_commit, redis, seconds, 1),
                    "redis PING+PING, 1 in flight": lambda: ops_for(two_pings, redis, seconds, 1),
                    f"local, {c} in flight": lambda: ops_for(check_commit, local, seconds, c),
                    f"redis, {c} in flight": lambda: ops_for(check_commit, redis, seconds, c),
                    f"redis PING+PING, {c} in flight": lambda: ops_for(
                        two_pings, redis, seconds, c
                    ),
                }
                apps = {
                    "bare": bare_app(),
                    "local": metered_app(local),
                    "redis": metered_app(redis),
                }
                serve = {
                    name: (lambda a=app: requests_for(a, seconds)) for name, app in apps.items()
                }
                for warm in (*ops.values(), *serve.values()):  # imports, leases, scripts
                    await warm()
                before = {name: await used(ledger) for name, ledger in made.items()}
                print("ledger operations (reserve + commit of 1 unit):", file=sys.stderr)
                op_rates, op_units = await rounds(ops, args.rounds)
                print("metered app, one request at a time:", file=sys.stderr)
                app_rates, app_units = await rounds(serve, args.rounds)
                charged = {name: await used(ledger) - before[name] for name, ledger in made.items()}
    print(
        f"\n{args.rounds} interleaved rounds of {seconds:g} s per subject, "
        f"Python {sys.version.split()[0]}, "
        f"Redis: {'--url' if args.url else 'a redis-server started on loopback'}"
    )
    print(
        "\n| reserve + commit of 1 unit | pairs/s | µs/pair | ratio to local | ratio to PING+PING |"
    )
    print("|---|---|---|---|---|")
    for name, values in op_rates.items():
        rate = statistics.median(values)
        to_local = to_ping = ""
        if name.startswith("redis,"):
            to_local = f"{ratio(op_rates, name, name.replace('redis', 'local')):.2f}"
            to_ping = f"{ratio(op_rates, name, name.replace('redis', 'redis PING+PING')):.2f}"
        print(f"| {name} | {rate:,.0f} | {1e6 / rate:.1f} | {to_local} | {to_ping} |")
    print("\n| app (in-process ASGI, 1 in flight) | requests/s | µs/request | ratio to bare |")
    print("|---|---|---|---|")
    for name, values in app_rates.items():
        rate = statistics.median(values)
        label = "bare Starlette" if name == "bare" else f"UsageMiddleware + @metered, {name} ledger"
        print(
            f"| {label} | {rate:,.0f} | {1e6 / rate:.1f} | {ratio(app_rates, name, 'bare'):.2f} |"
        )
    status = 0
    for name in ("local", "redis"):
        expected = sum(n for label, n in op_units.items() if label.startswith(name + ","))
        expected += app_units[name]
        verdict = "ok" if charged[name] == expected else "MISMATCH"
        status |= charged[name] != expected
        print(f"{name}: {expected} units used, {charged[name]} charged ({verdict})")
    return status


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds per subject per round")
    parser.add_argument(
        "--concurrency", type=int, default=32, help="operations in flight (default 32)"
    )
    parser.add_argument("--url", default=None, help="use this Redis instead of starting one")
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds <= 0 or args.concurrency < 1:
        parser.error("--rounds, --seconds and --concurrency must be positive")
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
