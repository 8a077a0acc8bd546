"""Entitlement cache, single-flight and failure policy of RemoteProvider, in one process.

The provider is an in-process fake :class:`RemoteProvider` whose ``fetch`` (one remote
``can()``) answers after 50 ms and whose ``report`` is instant. Three measurements:

1. **Throughput once warm.** Two apps serve the same JSON route: ``bare`` and
   ``metered`` (``UsageMiddleware`` + ``@metered("feature:bench")`` on the fake provider;
   every request reserves, prepares and commits one unit). Driven in-process by calling
   ``app(scope, receive, send)``, one request at a time, after a warm-up that fills the
   cache; the driver yields to the event loop once per request (as a server does), so
   background work (group commits, senders) is inside the measurement; rounds alternate
   the order; the report is the median requests/s and the median of each round's ratio
   to bare, by wall-clock and by this process's CPU time (less sensitive to other load),
   with their ranges (issue 14's target: >= 0.60 with the durable outbox).
   Run with in-memory delivery (``outbox=None``) and with the durable SQLite outbox (the
   Reporter), since ``prepare`` waits for the outbox; once with Starlette apps and once
   with FastAPI apps (the same route as a path operation; what most users run).
2. **Cold start.** 100 concurrent first requests of one customer: provider calls (target 1).
3. **Provider down.** ``fetch`` hangs (worst case: every call runs into the timeout) or
   fails at once; ``timeout`` 0.1 s, failure policy open, breaker defaults (5 failures,
   10 s cool-down). Open loop, 300 requests/s over 20 customers for 15 s (hang) or 2 s
   (refuse): latency p50/p99/max (target: p99 under the timeout) and provider calls made.
   Requests that arrive before the breaker opens wait up to the timeout (the first
   ``timeout`` seconds of the outage, and the half-open probe's customer): the run is
   long enough that they are under 1 % of requests.

Run from the repository root::

    python bench/bench_cache.py                 # 5 rounds of 1 s per app
    python bench/bench_cache.py --rounds 3 --seconds 0.5
    python bench/bench_cache.py --concurrency 50  # throughput with 50 requests in flight
    python bench/bench_cache.py --only throughput

Exits 1 when a request got an unexpected status or the charges do not add up.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from asgi_driver import Driver
from fastapi import FastAPI
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from usage_middleware.customers import customer_from_header
from usage_middleware.decorator import metered
from usage_middleware.errors import RetryableProviderError
from usage_middleware.middleware import UsageMiddleware
from usage_middleware.models import UsageEvent
from usage_middleware.providers.remote import Entitlement, RemoteProvider

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
ASGIApp = Callable[
    [Scope, Callable[[], Awaitable[Message]], Callable[[Message], Awaitable[None]]],
    Awaitable[None],
]

FEATURE = "feature:bench"
LATENCY = 0.050  # seconds per fetch


class SlowRemote(RemoteProvider):
    """A remote provider whose check takes 50 ms; its backend is a dict."""

    name = "slow-fake"
    max_batch = 100
    balance_lag = 0.0

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.balance = 10**12
        self.fetches = 0
        self.charged = 0
        self.mode = "up"  # "up", "hang" or "refuse"

    async def fetch(self, customer: str, feature: str, *, scope: Any = None) -> Entitlement:
        self.fetches += 1
        if self.mode == "refuse":
            raise RetryableProviderError("connection refused")
        await asyncio.sleep(LATENCY)
        if self.mode == "hang":
            await asyncio.Event().wait()
        return Entitlement(limit=None, used=None, remaining=self.balance)

    async def send(self, events: Sequence[UsageEvent]) -> None:
        units = sum(e.units for e in events)
        self.balance -= units
        self.charged += units


async def item(request: Request) -> JSONResponse:
    return JSONResponse({"id": 1, "name": "widget"})


def bare_app() -> ASGIApp:
    return Starlette(routes=[Route("/item", item)])


def metered_app(provider: RemoteProvider) -> ASGIApp:
    # A function of its own: @metered traps the function it wraps (called without the
    # wrapper it answers 500), so the bare app's item must never be wrapped.
    async def metered_item(request: Request) -> JSONResponse:
        return JSONResponse({"id": 1, "name": "widget"})

    return Starlette(
        routes=[Route("/item", metered(FEATURE)(metered_item))],
        middleware=[
            Middleware(
                UsageMiddleware, provider=provider, customer=customer_from_header("x-customer")
            )
        ],
    )


async def fastapi_item() -> dict[str, Any]:
    return {"id": 1, "name": "widget"}


def fastapi_bare_app() -> ASGIApp:
    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.get("/item")(fastapi_item)
    return app


def fastapi_metered_app(provider: RemoteProvider) -> ASGIApp:
    # A function of its own: @metered traps the function it wraps (called without the
    # wrapper it answers 500), so the bare app's fastapi_item must never be wrapped.
    async def fastapi_metered_item() -> dict[str, Any]:
        return {"id": 1, "name": "widget"}

    app = FastAPI(openapi_url=None, docs_url=None, redoc_url=None)
    app.get("/item")(metered(FEATURE)(fastapi_metered_item))
    app.add_middleware(
        UsageMiddleware, provider=provider, customer=customer_from_header("x-customer")
    )
    return app


APPS = {"starlette": (bare_app, metered_app), "fastapi": (fastapi_bare_app, fastapi_metered_app)}


async def cycle_cost(provider: RemoteProvider, n: int = 5000) -> float:
    """Microseconds of one warm reserve + prepare + commit + one loop turn (best of 3)."""
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        for _ in range(n):
            reservation = await provider.reserve("org:bench", FEATURE)
            await provider.prepare(reservation)
            await provider.commit(reservation)
            await asyncio.sleep(0)  # let delivery run, as between requests
        best = min(best, (time.perf_counter() - start) / n * 1e6)
    return best


def _ratios(rates: dict[str, list[float]]) -> str:
    """The median of each round's metered/bare ratio, with its range."""
    ratios = sorted(m / b for m, b in zip(rates["metered"], rates["bare"], strict=True))
    return f"{statistics.median(ratios):.2f} ({ratios[0]:.2f}-{ratios[-1]:.2f})"


async def throughput(
    args: argparse.Namespace, outbox: Path | None, framework: str = "starlette"
) -> tuple[float, bool]:
    """Median metered/bare ratio; and whether every served request was charged once."""
    provider = SlowRemote(outbox=outbox, cache_ttl=args.ttl)
    await provider.open()
    make_bare, make_metered = APPS[framework]
    try:
        drivers = {"bare": Driver(make_bare()), "metered": Driver(make_metered(provider))}
        for driver in drivers.values():
            await driver.run_for(0.3, args.concurrency)
        rates: dict[str, list[float]] = {name: [] for name in drivers}
        cpu: dict[str, list[float]] = {name: [] for name in drivers}
        names = list(drivers)
        for r in range(args.rounds):
            for name in names if r % 2 == 0 else names[::-1]:
                by_wall, by_cpu = await drivers[name].run_for(args.seconds, args.concurrency)
                rates[name].append(by_wall)
                cpu[name].append(by_cpu)
        bare = statistics.median(rates["bare"])
        met = statistics.median(rates["metered"])
        cost = await cycle_cost(provider)
        served = drivers["metered"].statuses.get(200, 0) + 15000
        label = "memory" if outbox is None else "sqlite outbox"
        print(
            f"[throughput, {framework}, delivery={label}, {args.concurrency} in flight] "
            f"bare {bare:,.0f}/s  metered {met:,.0f}/s  "
            f"ratio {_ratios(rates)} (target >= 0.60), by CPU time {_ratios(cpu)}; "
            f"provider calls {provider.fetches} for {served:,} requests"
        )
        print(
            f"  the provider's share: reserve+prepare+commit {cost:.1f} us/request warm; bare "
            f"{1e6 / bare:.1f} us/request; bare/(bare+provider) = "
            f"{(1e6 / bare) / (1e6 / bare + cost):.2f}"
        )
        if outbox is None:
            await provider.flush(10.0)
    finally:
        await provider.aclose()
    ok = (
        set(drivers["metered"].statuses) == {200}
        and set(drivers["bare"].statuses) == {200}
        and provider.charged == served
    )
    if not ok:
        print(
            f"  statuses {drivers['metered'].statuses} (bare {drivers['bare'].statuses}), "
            f"charged {provider.charged}"
        )
    return met / bare, ok


async def cold_start() -> bool:
    """100 concurrent first requests of one customer: count provider calls."""
    provider = SlowRemote(outbox=None)
    await provider.open()
    try:
        driver = Driver(metered_app(provider))
        await asyncio.gather(*(driver.one("org:cold") for _ in range(100)))
        await provider.flush(10.0)
    finally:
        await provider.aclose()
    print(
        f"[cold start] 100 concurrent first requests: {provider.fetches} provider call(s) "
        f"(target 1); statuses {driver.statuses}; charged {provider.charged}"
    )
    return provider.fetches == 1 and driver.statuses == {200: 100} and provider.charged == 100


async def provider_down(mode: str, limit: float, seconds: float, rate: float) -> bool:
    """Provider hanging or refusing: request latency with the failure policy 'open'.

    Open loop: one task per request, ``rate`` requests/s for ``seconds``, 20 customers,
    each request's latency from its own start. The app is warmed first (provider up).
    """
    provider = SlowRemote(outbox=None, timeout=limit, drain_timeout=0.1)
    await provider.open()
    try:
        driver = Driver(metered_app(provider))
        for _ in range(20):
            await driver.one("org:warm")
        driver.statuses.clear()
        provider.mode = mode
        calls = provider.fetches
        customers = [f"org:c{i}" for i in range(20)]
        tasks = []
        start = time.perf_counter()
        for n in range(int(seconds * rate)):
            delay = start + n / rate - time.perf_counter()
            await asyncio.sleep(max(0.0, delay))
            customer = customers[n % len(customers)]
            tasks.append(asyncio.create_task(driver.one(customer, timed=True)))
        await asyncio.gather(*tasks)
        wall = time.perf_counter() - start
        calls = provider.fetches - calls
    finally:
        await provider.aclose()
    lat = sorted(driver.latencies)
    p50 = lat[len(lat) // 2]
    p99 = lat[int(len(lat) * 0.99) - 1]
    slow = sum(1 for x in lat if x >= limit / 2)
    print(
        f"[provider down: {mode}] timeout {limit * 1000:.0f} ms: p50 {p50 * 1000:.2f} ms  "
        f"p99 {p99 * 1000:.2f} ms  max {lat[-1] * 1000:.1f} ms  (target p99 < timeout); "
        f"{len(lat)} requests over {wall:.1f} s, {slow} waited on a provider call; "
        f"provider calls {calls}, breaker {provider.breaker.state}; statuses {driver.statuses}"
    )
    return p99 < limit and driver.statuses == {200: len(lat)}


async def main(args: argparse.Namespace) -> int:
    ok = True
    for framework in ("starlette", "fastapi"):
        _, good = await throughput(args, None, framework)
        ok &= good
        with tempfile.TemporaryDirectory(prefix="usage-bench-") as tmp:
            _, good = await throughput(args, Path(tmp) / "outbox.db", framework)
            ok &= good
    if args.only == "throughput":
        return 0 if ok else 1
    ok &= await cold_start()
    ok &= await provider_down("hang", args.timeout, args.down_seconds, args.rate)
    ok &= await provider_down("refuse", args.timeout, 2.0, args.rate)
    return 0 if ok else 1


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seconds", type=float, default=1.0)
    parser.add_argument("--concurrency", type=int, default=1, help="requests in flight")
    parser.add_argument("--ttl", type=float, default=5.0, help="cache_ttl in seconds")
    parser.add_argument("--timeout", type=float, default=0.1, help="provider timeout (s)")
    parser.add_argument("--down-seconds", type=float, default=15.0, help="hang test length")
    parser.add_argument("--rate", type=float, default=300.0, help="requests/s when down")
    parser.add_argument(
        "--only", choices=("all", "throughput"), default="all", help="skip the other measurements"
    )
    sys.exit(asyncio.run(main(parser.parse_args())))
