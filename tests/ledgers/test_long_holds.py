"""A hold lives as long as its request: long streams and slow routes over real uvicorn.

Every test runs with short timeouts (a hold's TTL around a second) against LocalLedger and
RedisLedger (a real redis-server, ``tests/support/redis_server.py``): a request that outlives the
hold's timeout keeps its units (a concurrent request is refused 402) and is charged once;
a process that dies, or a reservation dropped unsettled, still frees its units.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import json
import logging
import sqlite3
import sys
import time
import uuid
from collections.abc import AsyncIterator, Callable
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route

from tests.support.redis_server import RedisServer
from tests.support.uvicorn_server import serve
from tests.support.waiting import eventually
from usage_middleware.customers import customer_from_header
from usage_middleware.decorator import metered
from usage_middleware.ledger import LocalLedger
from usage_middleware.ledger.base import Ledger
from usage_middleware.middleware import UsageMiddleware

pytestmark = pytest.mark.slow

ACME = "org:acme"
LONG = "feature:long"
PRICING = {"plans": {"plan:one@1": {"features": {LONG: {"tiers": [{"upto": 1}]}}}}}
HEADERS = {"X-Customer": ACME}

#: Short timeouts: LocalLedger ticks every 0.2 s (lease_ttl / 4); RedisLedger holds live
#: 1.5 s unrenewed. reservation_timeout 0.3 s is what the old code released holds after.
LEASE_TTL = 0.8
RESERVATION_TTL = 1.5
RESERVATION_TIMEOUT = 0.3
#: How long the long requests run at least: well past every timeout above.
DURATION = 2.5
#: The most a long request runs while its test has not let it end (a bound, not a wait).
LONGEST = 25.0


# -- ledgers ---------------------------------------------------------------------------------


class Ledgers:
    """Makes ledgers of one kind on one store (a SQLite file, or one redis-server)."""

    def __init__(self, kind: str, tmp_path: Path) -> None:
        self.kind = kind
        self.tmp_path = tmp_path
        self.path = tmp_path / "usage.db"
        self.server: RedisServer | None = None
        self.prefix = f"t{uuid.uuid4().hex[:8]}:"

    def make(self, **kwargs: Any) -> Ledger:
        if self.kind == "local":
            kwargs.setdefault("lease_ttl", LEASE_TTL)
            return LocalLedger(self.path, pricing=PRICING, **kwargs)
        from usage_middleware.ledger.redis import RedisLedger

        assert self.server is not None
        kwargs.setdefault("reservation_ttl", RESERVATION_TTL)
        spool = self.tmp_path / f"spool-{uuid.uuid4().hex[:6]}.db"
        return RedisLedger(
            self.server.url, pricing=PRICING, prefix=self.prefix, spool=spool, **kwargs
        )

    @contextlib.asynccontextmanager
    async def opened(self, **kwargs: Any) -> AsyncIterator[Ledger]:
        ledger = self.make(**kwargs)
        await ledger.open()
        try:
            yield ledger
        finally:
            await ledger.aclose()

    async def used(self) -> int:
        """Units of LONG charged this period, read by a fresh ledger."""
        async with self.opened() as ledger:
            return next((row.used for row in await ledger.usage(ACME) if row.feature == LONG), 0)


@pytest.fixture(params=["local", pytest.param("redis", marks=pytest.mark.redis)])
def ledgers(request: pytest.FixtureRequest, tmp_path: Path) -> Any:
    """Ledgers of each kind; for Redis, a fresh redis-server for the test."""
    made = Ledgers(request.param, tmp_path)
    if made.kind == "redis":
        made.server = RedisServer(tmp_path / "redis")
        made.server.start()
    try:
        yield made
    finally:
        if made.server is not None:
            made.server.stop()


async def subscribed(ledgers: Ledgers) -> None:
    async with ledgers.opened() as ledger:
        await ledger.subscribe(ACME, "plan:one@1")


# -- the app over real uvicorn ---------------------------------------------------------------


def _ending(request: Request) -> Callable[[], bool]:
    """Whether a long request may end: ``s`` seconds have passed and, with ``hold=1``, its
    test set ``app.state.finish`` (it saw enough meanwhile), or LONGEST have passed."""
    start = time.monotonic()
    seconds = float(request.query_params["s"])
    finish: asyncio.Event | None = (
        request.app.state.finish if request.query_params.get("hold") else None
    )

    def ending() -> bool:
        elapsed = time.monotonic() - start
        return elapsed >= LONGEST or (elapsed >= seconds and (finish is None or finish.is_set()))

    return ending


async def _lines(ending: Callable[[], bool]) -> AsyncIterator[bytes]:
    i = 0
    while not ending():
        yield f"line {i}\n".encode()
        i += 1
        await asyncio.sleep(0.05)
    yield b"done\n"


@metered(LONG)
async def stream(request: Request) -> Response:
    return StreamingResponse(_lines(_ending(request)), media_type="text/plain")


@metered(LONG)
async def slow(request: Request) -> Response:
    await asyncio.sleep(float(request.query_params["s"]))
    if request.query_params.get("hold"):  # and until its test saw enough (see _ending)
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LONGEST):
                await request.app.state.finish.wait()
    return JSONResponse({"done": True})


def make_app(ledger: Ledger) -> Starlette:
    app = Starlette(
        routes=[Route("/stream", stream), Route("/slow", slow)],
        middleware=[
            Middleware(
                UsageMiddleware, provider=ledger, customer=customer_from_header("X-Customer")
            )
        ],
    )
    app.state.finish = asyncio.Event()  # lets the long requests end (see _ending)
    return app


# -- long requests ---------------------------------------------------------------------------


@pytest.mark.parametrize("route", ["/stream", "/slow"])
async def test_a_request_longer_than_the_hold_timeout_keeps_its_hold(
    ledgers: Ledgers, route: str
) -> None:
    """With limit 1, a stream (or slow route) outliving every hold timeout keeps its unit:
    concurrent requests meanwhile get 402, the long one completes and is charged once."""
    await subscribed(ledgers)
    ledger = ledgers.make(reservation_timeout=RESERVATION_TIMEOUT)
    app = make_app(ledger)
    async with serve(app) as url, httpx.AsyncClient(base_url=url) as client:
        statuses: list[int] = []

        async def long_request() -> tuple[int, bytes]:
            async with client.stream(
                "GET", route, params={"s": DURATION, "hold": 1}, headers=HEADERS, timeout=30
            ) as response:
                return response.status_code, await response.aread()

        task = asyncio.create_task(long_request())
        started = time.monotonic()
        while not task.done():  # others ask all along, past every timeout
            await asyncio.sleep(0.1)
            if time.monotonic() - started > 0.2 and not task.done():
                other = await client.get(route, params={"s": 0}, headers=HEADERS, timeout=30)
                statuses.append(other.status_code)
            if len(statuses) >= 10 and time.monotonic() - started > DURATION:
                app.state.finish.set()  # seen enough, under any load: the long one may end
        status, body = await task
    assert status == 200
    assert body.endswith(b"done\n") or json.loads(body) == {"done": True}
    assert len(statuses) >= 10
    assert set(statuses) == {402}, statuses
    assert await ledgers.used() == 1


async def test_a_dead_process_frees_its_hold_within_the_ttl(ledgers: Ledgers) -> None:
    """A process holding the last unit keeps it while alive (past the TTL, renewed); killed,
    its unit comes back within the TTL."""
    await subscribed(ledgers)
    target = str(ledgers.path) if ledgers.kind == "local" else ledgers.server.url  # type: ignore[union-attr]
    worker = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        HOLDER,
        ledgers.kind,
        target,
        ledgers.prefix,
        str(ledgers.tmp_path / "worker-spool.db"),
        str(LEASE_TTL if ledgers.kind == "local" else RESERVATION_TTL),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    ttl = LEASE_TTL if ledgers.kind == "local" else RESERVATION_TTL
    try:
        assert worker.stdout is not None
        line = await asyncio.wait_for(worker.stdout.readline(), 60)
        assert json.loads(line) == {"ok": True}
        async with ledgers.opened() as ledger:
            await asyncio.sleep(2 * ttl)  # the live worker renews its hold
            assert not (await ledger.reserve(ACME, LONG)).answer.ok
            worker.kill()
            await worker.wait()
            killed = time.monotonic()

            async def freed() -> bool:
                reservation = await ledger.reserve(ACME, LONG)
                if reservation.answer.ok:
                    await ledger.commit(reservation)
                return reservation.answer.ok

            await eventually(freed)
            assert time.monotonic() - killed < ttl + 1.5
    finally:
        if worker.returncode is None:
            worker.kill()
            await worker.wait()
    assert await ledgers.used() == 1  # the dead process's request was never charged


HOLDER = r"""
import asyncio, json, sys
from usage_middleware.ledger import LocalLedger

async def main(kind, target, prefix, spool, ttl):
    if kind == "local":
        ledger = LocalLedger(target, lease_ttl=float(ttl))
    else:
        from usage_middleware.ledger.redis import RedisLedger
        ledger = RedisLedger(target, prefix=prefix, reservation_ttl=float(ttl), spool=spool)
    await ledger.open()
    reservation = await ledger.reserve("org:acme", "feature:long")
    print(json.dumps({"ok": reservation.answer.ok}), flush=True)
    await asyncio.sleep(120)

asyncio.run(main(*sys.argv[1:]))
"""


async def test_a_reservation_dropped_unsettled_frees_its_hold(
    ledgers: Ledgers, caplog: pytest.LogCaptureFixture
) -> None:
    """A reservation garbage-collected without commit or release gives its unit back (a
    caller bug must not park units for good), while a referenced one keeps holding."""
    await subscribed(ledgers)
    async with ledgers.opened() as ledger:
        dropped = await ledger.reserve(ACME, LONG)
        assert dropped.answer.ok
        await asyncio.sleep(2 * (LEASE_TTL if ledgers.kind == "local" else RESERVATION_TTL))
        assert not (await ledger.reserve(ACME, LONG)).answer.ok  # still held: referenced
        del dropped
        gc.collect()
        kept = None

        async def freed() -> bool:
            nonlocal kept
            reservation = await ledger.reserve(ACME, LONG)
            if reservation.answer.ok:
                kept = reservation
            return reservation.answer.ok

        with caplog.at_level(logging.WARNING, "usage_middleware"):
            await eventually(freed)
        assert kept is not None
        await ledger.commit(kept)
    if ledgers.kind == "local":
        assert "dropped unsettled" in caplog.text
    assert await ledgers.used() == 1


@pytest.mark.redis
async def test_a_hold_redis_lost_is_logged_and_still_charged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A running request's lease that Redis lost is noticed by renewal (logged, with the
    units held under it); the request is still charged at its end (it was served): never a
    silent overspend. (Holds live in memory on the lease engine: what Redis can lose is
    the process's lease record.)"""
    import redis.asyncio

    ledgers = Ledgers("redis", tmp_path)
    ledgers.server = server = RedisServer(tmp_path / "redis")
    server.start()
    try:
        await subscribed(ledgers)
        with caplog.at_level(logging.WARNING, "usage_middleware"):
            async with ledgers.opened() as ledger:
                running = await ledger.reserve(ACME, LONG)
                assert running.answer.ok
                raw = redis.asyncio.Redis.from_url(server.url)
                try:
                    assert await raw.delete(f"{ledgers.prefix}{{{ACME}}}:lease:{LONG}") == 1
                finally:
                    await raw.aclose()

                async def noticed() -> bool:
                    return "expired before this process renewed it" in caplog.text

                await eventually(noticed)
                other = await ledger.reserve(ACME, LONG)  # the lost unit was free meanwhile
                assert other.answer.ok
                await ledger.commit(other)
                await ledger.commit(running)
        assert "1 held units of org:acme feature:long" in caplog.text
        assert await ledgers.used() == 2
    finally:
        server.stop()


async def test_a_local_hold_whose_lease_expired_is_logged_and_still_charged(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """If a LocalLedger's lease row expires under a running request (a stalled process),
    the next tick logs it; the request is still charged at its end: never silently."""
    ledgers = Ledgers("local", tmp_path)
    await subscribed(ledgers)
    with caplog.at_level(logging.WARNING, "usage_middleware"):
        async with ledgers.opened() as ledger, ledgers.opened() as other_process:
            running = await ledger.reserve(ACME, LONG)
            assert running.answer.ok
            with sqlite3.connect(ledgers.path) as conn:  # as if nothing renewed it in time
                assert conn.execute("UPDATE leases SET expires_at = 0").rowcount == 1

            async def noticed() -> bool:
                return "expired before this process renewed it" in caplog.text

            await eventually(noticed)
            other = await other_process.reserve(ACME, LONG)  # the unit was free meanwhile
            assert other.answer.ok
            await other_process.commit(other)
            await ledger.commit(running)
    assert await ledgers.used() == 2


@pytest.mark.redis
async def test_redis_renews_many_holds_with_one_call_per_customer_feature(
    tmp_path: Path,
) -> None:
    """Renewing the leases under 30 in-flight holds costs one script call per customer per
    reservation_ttl / 2 (batched in a pipeline), not one per hold per tick."""
    import redis.asyncio

    ledgers = Ledgers("redis", tmp_path)
    ledgers.server = server = RedisServer(tmp_path / "redis")
    server.start()
    ttl = 1.0
    customers = [f"org:c{i}" for i in range(3)]
    raw = redis.asyncio.Redis.from_url(server.url, decode_responses=True)
    try:
        async with ledgers.opened(reservation_ttl=ttl) as ledger:
            for customer in customers:
                await ledger.grant(customer, LONG, 10)
            held = [await ledger.reserve(c, LONG) for c in customers for _ in range(10)]
            assert all(reservation.answer.ok for reservation in held)
            before = (await raw.info("commandstats"))["cmdstat_evalsha"]["calls"]
            window = 3 * ttl
            await asyncio.sleep(window)
            after = (await raw.info("commandstats"))["cmdstat_evalsha"]["calls"]
            for customer in customers:  # every lease is still there, none expired
                key = f"{ledgers.prefix}{{{customer}}}:lease:{LONG}"
                records = await raw.hvals(key)
                assert sum(int(value.split("|")[0]) for value in records) == 10
            renewals = after - before
            rounds = window / (ttl / 2)
            assert 0 < renewals <= len(customers) * (rounds + 2), renewals
            for reservation in held:
                await ledger.release(reservation)
    finally:
        await raw.aclose()
        server.stop()
