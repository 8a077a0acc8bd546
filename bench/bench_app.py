"""Throughput of a metered app against a bare one and against slowapi, in one process.

Three Starlette apps serve the same JSON route (``GET /item``):

* ``bare``: nothing else;
* ``metered``: ``UsageMiddleware`` + ``@metered("feature:bench")`` on a ``LocalLedger`` (a
  fresh file in a temporary directory; the customer's plan has no limit on the feature,
  so nothing is ever denied, and every request is charged);
* ``slowapi``: slowapi's ``@limiter.limit`` (memory storage, a limit never reached).

They are driven in-process by calling ``app(scope, receive, send)`` directly: one request
at a time (``--concurrency 1``, the default) or ``C`` requests in flight on one event loop.
After a warm-up, every round runs each app for ``--seconds`` (in a rotating order, so
drift on a noisy machine hits all three alike); the report is the median requests/s per
app over the rounds and its ratio to bare. The issue's target: metered >= 0.50 of bare.

Run from the repository root::

    python bench/bench_app.py                    # 5 rounds of 1 s per app
    python bench/bench_app.py --concurrency 20   # 20 requests in flight
    python bench/bench_app.py --profile          # cProfile of the metered app's hot path

After the rounds the script checks that the ledger charged exactly one unit per metered
request that was served (a benchmark of a broken meter would be meaningless).
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import io
import pstats
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping
from pathlib import Path
from typing import Any

from asgi_driver import Driver
from asgiref.typing import HTTPScope
from slowapi import Limiter, _rate_limit_exceeded_handler
from slowapi.errors import RateLimitExceeded
from slowapi.util import get_remote_address
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from usage_middleware import (
    UNLIMITED,
    Answer,
    LocalLedger,
    Provider,
    Reservation,
    UsageEvent,
    UsageMiddleware,
    metered,
)
from usage_middleware.customers import customer_from_header

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

CUSTOMER = "org:bench"
FEATURE = "feature:bench"  # a limit far out of reach: served from the ledger's leases
UNLIMITED_FEATURE = "feature:benchunlimited"  # no upto: unlimited, still recorded
PRICING = {
    "plans": {
        "plan:bench@1": {
            "interval": "@monthly",
            "features": {FEATURE: {"tiers": [{"upto": 10**12}]}, UNLIMITED_FEATURE: {}},
        }
    }
}
LABELS = {
    "bare": "bare Starlette, one JSON route",
    "metered": "UsageMiddleware + @metered, LocalLedger",
    "unlimited": "the same, on an unlimited feature",
    "null": "the same, on a provider that does nothing",
    "slowapi": "slowapi @limiter.limit (memory storage)",
}


class NullProvider(Provider):
    """Allows everything and records nothing: the middleware's and decorator's own cost."""

    name = "null"

    def __init__(self) -> None:
        super().__init__()
        self._answer = Answer(ok=True, customer=CUSTOMER, feature=FEATURE, limit=UNLIMITED)
        self._event = UsageEvent(CUSTOMER, FEATURE, 1)

    async def reserve(
        self, customer: str, feature: str, units: int = 1, *, scope: HTTPScope | None = None
    ) -> Reservation:
        return Reservation(answer=self._answer, event=self._event)

    async def commit(
        self, reservation: Reservation, *, units: int | None = None, overage: str = "cap"
    ) -> int:
        reservation.settled = True
        return reservation.units if units is None else units

    async def release(self, reservation: Reservation) -> None:
        reservation.settled = True


async def item(request: Request) -> JSONResponse:
    return JSONResponse({"id": 1, "name": "widget"})


def bare_app() -> ASGIApp:
    return Starlette(routes=[Route("/item", item)])


def metered_app(ledger: Provider, feature: str) -> ASGIApp:
    async def metered_item(request: Request) -> JSONResponse:
        return JSONResponse({"id": 1, "name": "widget"})

    return Starlette(
        routes=[Route("/item", metered(feature)(metered_item))],
        middleware=[
            Middleware(
                UsageMiddleware, provider=ledger, customer=customer_from_header("x-customer")
            )
        ],
    )


def slowapi_app() -> ASGIApp:
    limiter = Limiter(key_func=get_remote_address, storage_uri="memory://")

    @limiter.limit("100000000/minute")
    async def limited(request: Request) -> JSONResponse:
        return JSONResponse({"id": 1, "name": "widget"})

    app = Starlette(routes=[Route("/item", limited)])
    app.state.limiter = limiter
    app.add_exception_handler(RateLimitExceeded, _rate_limit_exceeded_handler)  # type: ignore[arg-type]
    return app


async def bench(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="usage-bench-") as tmp:
        options = {} if args.lease_size is None else {"lease_size": args.lease_size}
        ledger = LocalLedger(Path(tmp) / "bench.db", pricing=PRICING, **options)
        await ledger.open()
        try:
            await ledger.subscribe(CUSTOMER, "plan:bench@1")
            spec = args.spec_version
            drivers = {
                "bare": Driver(bare_app(), spec_version=spec),
                "metered": Driver(metered_app(ledger, FEATURE), spec_version=spec),
                "unlimited": Driver(metered_app(ledger, UNLIMITED_FEATURE), spec_version=spec),
                "null": Driver(metered_app(NullProvider(), FEATURE), spec_version=spec),
                "slowapi": Driver(slowapi_app(), spec_version=spec),
            }
            for driver in drivers.values():  # warm-up: imports, caches, the ledger's lease
                await driver.run_for(0.3, args.concurrency)
            if args.profile:
                return await profile(drivers["metered"], args)
            wall: dict[str, list[float]] = {name: [] for name in drivers}
            cpu: dict[str, list[float]] = {name: [] for name in drivers}
            names = list(drivers)
            for r in range(args.rounds):
                order = names[r % len(names) :] + names[: r % len(names)]
                for name in order:
                    by_wall, by_cpu = await drivers[name].run_for(args.seconds, args.concurrency)
                    wall[name].append(by_wall)
                    cpu[name].append(by_cpu)
                line = "  ".join(f"{n} {wall[n][-1]:6.0f}/s" for n in names)
                print(f"round {r + 1}: {line}", file=sys.stderr)
            failures = {n: d.other for n, d in drivers.items() if d.other}
            if failures:
                print(f"non-200 responses: {failures}", file=sys.stderr)
                return 1
            ledger_us, direct = await ledger_cost(ledger)
            charged = await ledger_used(ledger)
        finally:
            await ledger.aclose()
        report(wall, cpu, args)
        print(f"LocalLedger alone, reserve + commit on a warm lease: {ledger_us:.1f} µs/request")
        served = {
            FEATURE: drivers["metered"].ok + direct,
            UNLIMITED_FEATURE: drivers["unlimited"].ok,
        }
        for feature, n in served.items():
            units = charged.get(feature, 0)
            verdict = "ok" if units == n else "MISMATCH"
            print(f"{feature}: {n} units used, {units} units charged ({verdict})")
        return 0 if all(charged.get(f, 0) == n for f, n in served.items()) else 1


async def ledger_cost(ledger: LocalLedger, n: int = 20000) -> tuple[float, int]:
    """Best-of-3 microseconds per reserve + commit of one unit, called directly (no HTTP),
    and the units so charged."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            reservation = await ledger.reserve(CUSTOMER, FEATURE, 1)
            await ledger.commit(reservation)
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best, 3 * n


async def ledger_used(ledger: LocalLedger) -> dict[str, int]:
    """Units charged per feature this period."""
    return {row.feature: row.used for row in await ledger.usage(CUSTOMER)}


def _ratio(rates: dict[str, list[float]], name: str) -> float:
    """Median over rounds of ``name``'s rate divided by bare's rate in the same round."""
    pairs = zip(rates[name], rates["bare"], strict=True)
    return statistics.median(value / base for value, base in pairs)


def report(
    wall: dict[str, list[float]], cpu: dict[str, list[float]], args: argparse.Namespace
) -> None:
    """The table: median requests/s per app and the median per-round ratios to bare."""
    print(
        f"\nIn-process ASGI driver, concurrency {args.concurrency}, "
        f"{args.rounds} interleaved rounds of {args.seconds:g} s per app, "
        f"ASGI spec {args.spec_version}, Python {sys.version.split()[0]}\n"
    )
    print(f"| {'app':<41} | requests/s | µs/request | ratio to bare | ratio (CPU time) |")
    print(f"|{'-' * 43}|{'-' * 12}|{'-' * 12}|{'-' * 15}|{'-' * 18}|")
    for name in wall:
        rate = statistics.median(wall[name])
        print(
            f"| {LABELS[name]:<41} | {rate:>10,.0f} | {1e6 / rate:>10.1f} | "
            f"{_ratio(wall, name):>13.2f} | {_ratio(cpu, name):>16.2f} |"
        )
    print(
        "\nrequests/s: median over rounds; ratio: median of each round's ratio to bare, by\n"
        "wall-clock time and by this process's CPU time (less sensitive to other load)."
    )
    target = _ratio(wall, "metered")
    verdict = "met" if target >= 0.5 else "NOT met"
    print(f"metered / bare = {target:.2f} (target >= 0.50: {verdict})")
    if args.lease_size is not None:
        print(f"(LocalLedger lease_size={args.lease_size})")


async def profile(driver: Driver, args: argparse.Namespace) -> int:
    """Profile the metered app's hot path with cProfile; print the top functions."""
    profiler = cProfile.Profile()
    profiler.enable()
    await driver.run_for(args.seconds * 3, args.concurrency)
    profiler.disable()
    for key in ("tottime", "cumulative"):
        buffer = io.StringIO()
        stats = pstats.Stats(profiler, stream=buffer)
        stats.strip_dirs().sort_stats(key).print_stats(30)
        print(f"==== sorted by {key} ====")
        print(buffer.getvalue())
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--rounds", type=int, default=5, help="interleaved rounds (default 5)")
    parser.add_argument("--seconds", type=float, default=1.0, help="seconds per app per round")
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight (default 1)")
    parser.add_argument(
        "--lease-size", type=int, default=None, help="LocalLedger lease_size (default: its own)"
    )
    parser.add_argument(
        "--profile", action="store_true", help="profile the metered app instead of comparing"
    )
    parser.add_argument(
        "--spec-version",
        default="2.4",
        help="the ASGI spec version the driver claims (default 2.4; uvicorn says 2.3, and "
        "then the middleware watches receive for a disconnect)",
    )
    args = parser.parse_args()
    if args.rounds < 1 or args.seconds <= 0 or args.concurrency < 1:
        parser.error("--rounds, --seconds and --concurrency must be positive")
    return asyncio.run(bench(args))


if __name__ == "__main__":
    sys.exit(main())
