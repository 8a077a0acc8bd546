"""Delivery throughput of the Reporter and what a slow provider costs a metered request.

1. **Throughput** (commit to delivery, target >= 50,000 events/s): events go into a
   Reporter whose in-process fake provider takes up to ``--max-batch`` events per call
   and answers at once (it records every key, so the run checks each event arrived once).
   The clock runs from the first event handed over until the provider has the last one.
   Three paths:

   * ``enqueue``: ``reporter.enqueue(event)`` in chunks of 1,000, yielding to the loop
     between chunks, as a busy app does;
   * ``prepare+confirm``: 1,000 concurrent "requests", each ``await prepare(e)`` (durable
     in the outbox, group commit) then ``confirm(e)``: what the middleware does per charge;
   * ``backlog``: the events are already in the outbox file (a restart after an outage);
     the reporter claims and delivers them.

2. **Memory** (target: under +100 MB RSS): with the provider down, ``--backlog`` events
   (default 1,000,000) are enqueued in chunks of 1,000; RSS (psutil) before and after.

3. **Latency** (target: p50 and p99 within 5 % of the instant provider's): a Starlette app
   with ``UsageMiddleware`` and ``@metered`` on a provider whose charges go through the
   Reporter (``prepare`` before the final body, ``confirm`` after). Its provider answers
   ``report()`` at once, or after 500 ms. ``--concurrency`` clients drive it in-process
   (``app(scope, receive, send)``) back to back for ``--seconds``; rounds alternate
   instant/slow with a fresh outbox each; the report is the median p50/p99 over rounds
   and the ratio slow/instant.

Run from the repository root::

    python bench/bench_reporter.py                       # both parts
    python bench/bench_reporter.py --part throughput --events 1000000
    python bench/bench_reporter.py --part memory --backlog 1000000

Exits 1 when an event was lost or duplicated, or a request was not answered 200.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Iterator, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests" / "support"))

from asgi_driver import http_scope
from reporter_fakes import OutboxedProvider

from usage_middleware import Provider, RetryableProviderError, UsageEvent
from usage_middleware.customers import customer_from_header
from usage_middleware.decorator import metered
from usage_middleware.delivery import Reporter
from usage_middleware.middleware import UsageMiddleware
from usage_middleware.outbox import Outbox

Message = MutableMapping[str, Any]


class Sink(Provider):
    """Takes every batch at once (or after ``latency`` s) and records the keys."""

    name = "sink"

    def __init__(self, max_batch: int, latency: float = 0.0) -> None:
        super().__init__()
        self.max_batch = max_batch
        self.latency = latency
        self.keys: set[str] = set()
        self.arrivals = 0
        self.done = asyncio.Event()
        self.expect = 0

    async def report(self, events: Sequence[UsageEvent]) -> None:
        if self.latency:
            await asyncio.sleep(self.latency)
        self.arrivals += len(events)
        self.keys.update(e.idempotency_key for e in events)
        if self.expect and len(self.keys) >= self.expect:
            self.done.set()


def _events(n: int) -> list[UsageEvent]:
    return [UsageEvent("org:acme", "feature:x", 1) for _ in range(n)]


async def _prepare_confirm(reporter: Reporter, evs: Iterator[UsageEvent]) -> None:
    """One "request" after another: prepare (durable), then confirm, as the middleware."""
    for e in evs:
        await reporter.prepare(e)
        reporter.confirm(e)


async def _through(path: str, n: int, max_batch: int) -> tuple[float, float, float]:
    """events/s of the three paths (enqueue, prepare+confirm, backlog), checked."""
    rates = []
    for name in ("enqueue", "prepare+confirm", "backlog"):
        outbox = f"{path}-{name}.db"
        sink = Sink(max_batch)
        evs = _events(n)
        sink.expect = n
        if name == "backlog":
            ob = Outbox(outbox)
            for i in range(0, n, 50_000):
                ob.apply(0, [(e, False, False) for e in evs[i : i + 50_000]])
            ob.close()
        reporter = Reporter(sink, path=outbox)
        start = time.perf_counter()
        await reporter.open()
        if name == "enqueue":
            for i in range(0, n, 1000):
                for e in evs[i : i + 1000]:
                    reporter.enqueue(e)
                await asyncio.sleep(0)
        elif name == "prepare+confirm":
            it = iter(evs)
            await asyncio.gather(*(_prepare_confirm(reporter, it) for _ in range(1000)))
        await asyncio.wait_for(sink.done.wait(), 600)
        elapsed = time.perf_counter() - start
        await reporter.aclose()
        if len(sink.keys) != n or sink.arrivals != n:
            print(f"  {name}: {len(sink.keys)} keys, {sink.arrivals} arrivals of {n}: BROKEN")
            sys.exit(1)
        rates.append(n / elapsed)
        print(f"  {name:16s} {n / elapsed:>10,.0f} events/s  ({n:,} events in {elapsed:.2f} s)")
    return rates[0], rates[1], rates[2]


async def _memory(path: str, n: int) -> None:
    import gc

    import psutil

    sink = Sink(max_batch=100)
    down = RetryableProviderError("down", status=503)

    async def refuse(events: Sequence[UsageEvent]) -> None:
        raise down

    sink.report = refuse  # type: ignore[method-assign]
    reporter = Reporter(sink, path=f"{path}-memory.db", retry_cooldown=60, drain_timeout=0.2)
    await reporter.open()
    reporter.enqueue(UsageEvent("org:acme", "feature:x", 1))
    await reporter.flush()
    gc.collect()
    proc = psutil.Process()
    before = proc.memory_info().rss
    start = time.perf_counter()
    for _ in range(n // 1000):
        for _ in range(1000):
            reporter.enqueue(UsageEvent("org:acme", "feature:x", 1))
        await reporter.flush()
    elapsed = time.perf_counter() - start
    gc.collect()
    grown = proc.memory_info().rss - before
    stats = reporter.stats()
    await reporter.aclose()
    print(
        f"  {n:,} events queued in {elapsed:.1f} s while the provider is down:"
        f" RSS +{grown / 2**20:.1f} MB (in memory: {stats.in_memory:,} events)"
    )


def _app(provider: OutboxedProvider) -> Callable[..., Awaitable[None]]:
    @metered("feature:bench")
    async def item(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[Route("/item", item)],
        middleware=[
            Middleware(
                UsageMiddleware, provider=provider, customer=customer_from_header("X-Customer")
            )
        ],
    )


async def _request(app: Callable[..., Awaitable[None]]) -> int:
    status = 0

    async def receive() -> Message:
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message: Message) -> None:
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]

    await app(http_scope("org:acme"), receive, send)
    return status


async def _latency_round(
    outbox: str, latency: float, concurrency: int, seconds: float
) -> tuple[float, float, int, int]:
    """(p50 ms, p99 ms, requests served, charges delivered) for one app run."""
    sink = Sink(max_batch=100, latency=latency)
    provider = OutboxedProvider(sink, path=outbox, drain_timeout=0.5)
    app = _app(provider)
    await provider.open()
    for _ in range(200):  # warm-up
        await _request(app)
    times: list[float] = []
    bad = 0
    stop = time.perf_counter() + seconds

    async def client() -> None:
        nonlocal bad
        while time.perf_counter() < stop:
            t = time.perf_counter()
            status = await _request(app)
            times.append(time.perf_counter() - t)
            bad += status != 200

    await asyncio.gather(*(client() for _ in range(concurrency)))
    await provider.aclose()
    if bad:
        print(f"  {bad} requests not answered 200: BROKEN")
        sys.exit(1)
    times.sort()
    p50 = times[len(times) // 2] * 1000
    p99 = times[int(len(times) * 0.99)] * 1000
    return p50, p99, len(times), sink.arrivals


async def _latency(path: str, rounds: int, concurrency: int, seconds: float) -> None:
    results: dict[str, list[tuple[float, float, int, int]]] = {"instant": [], "500 ms": []}
    for r in range(rounds):
        order = [("instant", 0.0), ("500 ms", 0.5)]
        if r % 2:
            order.reverse()
        for name, latency in order:
            res = await _latency_round(
                f"{path}-lat-{r}-{latency}.db", latency, concurrency, seconds
            )
            results[name].append(res)
            print(
                f"  round {r + 1} {name:8s} p50 {res[0]:6.2f} ms  p99 {res[1]:6.2f} ms"
                f"  {res[2] / seconds:>7,.0f} req/s  delivered during run {res[3]:,}"
            )
    med = {
        name: (statistics.median(x[0] for x in rs), statistics.median(x[1] for x in rs))
        for name, rs in results.items()
    }
    (i50, i99), (s50, s99) = med["instant"], med["500 ms"]
    print(f"  median instant: p50 {i50:.2f} ms  p99 {i99:.2f} ms")
    print(f"  median 500 ms : p50 {s50:.2f} ms  p99 {s99:.2f} ms")
    print(f"  ratio 500 ms / instant: p50 {s50 / i50:.3f}  p99 {s99 / i99:.3f}  (target <= 1.05)")


def main(argv: Sequence[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--part", choices=["throughput", "memory", "latency", "all"], default="all")
    parser.add_argument("--events", type=int, default=300_000)
    parser.add_argument("--max-batch", type=int, default=1000)
    parser.add_argument("--backlog", type=int, default=1_000_000)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--seconds", type=float, default=2.0)
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        path = str(Path(tmp) / "outbox")
        if args.part in ("throughput", "all"):
            print(f"throughput, max_batch {args.max_batch} (target >= 50,000 events/s):")
            asyncio.run(_through(path, args.events, args.max_batch))
        if args.part in ("memory", "all"):
            print("memory with a backlog (target: under +100 MB RSS):")
            asyncio.run(_memory(path, args.backlog))
        if args.part in ("latency", "all"):
            print(
                f"latency of a metered request, {args.concurrency} concurrent clients,"
                f" {args.rounds} rounds of {args.seconds} s per provider:"
            )
            asyncio.run(_latency(path, args.rounds, args.concurrency, args.seconds))


if __name__ == "__main__":
    main()
