"""RedisLedger against a real redis-server that each test starts on a free loopback port.

The shared semantics run in ``tests/ledgers/test_ledger_contract.py`` (entry ``redis`` in
``tests/support/backends.py``) and ``tests/providers/test_provider_contract.py``
(``tests/support/contract_redis.py``).
Here: the key layout (prefix, hash tag), TTL expiry and renewal of leases, idempotent
group commits, atomicity across ledgers and across 4 processes, and Redis going away and
coming back (failure policies, the spool, no double charge) under the middleware.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import random
import subprocess
import sys
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from redis.crc import key_slot
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.support.redis_server import RedisServer
from tests.support.waiting import eventually
from usage_middleware.customers import customer_from_header
from usage_middleware.decorator import metered
from usage_middleware.errors import ConfigurationError, RetryableProviderError
from usage_middleware.ledger.redis import RedisLedger
from usage_middleware.middleware import UsageMiddleware
from usage_middleware.models import UsageEvent
from usage_middleware.provider import FailurePolicy

pytestmark = pytest.mark.redis

ACME = "org:acme"
COLD = "org:cold"  # a customer no request touched yet: its first request needs a lease
CONVERT = "feature:convert"
PRICING = {
    "plans": {
        "plan:free@1": {"features": {CONVERT: {"tiers": [{"upto": 10}]}}},
        "plan:load@1": {"features": {"feature:load": {"tiers": [{"upto": 100}]}}},
        "plan:big@1": {"features": {CONVERT: {"tiers": [{"upto": 1_000_000}]}}},
    }
}
#: The spool retries fast in tests (defaults wait seconds between rounds).
FAST_SPOOL = {
    "retry_attempts": 2,
    "wait_initial": 0.01,
    "wait_max": 0.05,
    "wait_jitter": 0.01,
    "retry_cooldown": 0.1,
    "poll_interval": 0.1,
    "call_timeout": 5.0,
    "drain_timeout": 2.0,
}


@pytest.fixture
def server(tmp_path: Path) -> Iterator[RedisServer]:
    """A fresh redis-server without persistence."""
    made = RedisServer(tmp_path / "redis")
    made.start()
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture
def durable_server(tmp_path: Path) -> Iterator[RedisServer]:
    """A redis-server with appendonly yes + appendfsync always: data survives a restart."""
    made = RedisServer(tmp_path / "redis-aof", appendonly=True, appendfsync="always")
    made.start()
    try:
        yield made
    finally:
        made.stop()


@contextlib.asynccontextmanager
async def opened(server: RedisServer, tmp_path: Path, **kwargs: Any) -> AsyncIterator[RedisLedger]:
    kwargs.setdefault("pricing", PRICING)
    kwargs.setdefault("spool", tmp_path / f"spool-{uuid.uuid4().hex[:6]}.db")
    kwargs.setdefault("spool_options", FAST_SPOOL)
    ledger = RedisLedger(server.url, **kwargs)
    await ledger.open()
    try:
        yield ledger
    finally:
        await ledger.aclose()


async def used(ledger: RedisLedger, customer: str = ACME, feature: str = CONVERT) -> int:
    return next((r.used for r in await ledger.usage(customer) if r.feature == feature), 0)


def raw_client(server: RedisServer) -> Any:
    import redis.asyncio

    return redis.asyncio.Redis.from_url(server.url, decode_responses=True)


# -- keys -------------------------------------------------------------------------------


async def test_every_key_is_prefixed_and_hash_tagged_by_customer(
    server: RedisServer, tmp_path: Path
) -> None:
    """All keys start with the prefix; each customer's keys share one Cluster slot."""
    async with opened(server, tmp_path, prefix="billing:") as ledger:
        await ledger.subscribe(ACME, "plan:free@1")
        await ledger.grant("org:b}odd", CONVERT, 5)  # a '}' in the id keeps one slot too
        held = await ledger.reserve(ACME, CONVERT, 2)
        await ledger.commit(await ledger.reserve(ACME, CONVERT, 1))
        await ledger.commit(await ledger.reserve("org:b}odd", CONVERT, 1))
        await ledger.report(
            [
                UsageEvent(ACME, CONVERT, 1, idempotency_key="a{weird}key"),
                UsageEvent(ACME, CONVERT, 1, idempotency_key="plain-key"),
            ]
        )
        await ledger.flush()  # the group commit's marker
        client = raw_client(server)
        keys = sorted(await client.keys("*"))
        await client.aclose()
        await ledger.release(held)
    assert keys and all(k.startswith("billing:") for k in keys)
    assert "billing:pricing" in keys
    # The change log other processes poll: one hash tag of its own, not a customer's.
    assert {"billing:{~}:generation", "billing:{~}:changes"} <= set(keys)
    by_customer: dict[str, set[int]] = {}
    for key in keys:
        if key == "billing:pricing" or key.startswith("billing:{~}:"):
            continue
        customer = ACME if key.startswith("billing:{org:acme}:") else "org:b}odd"
        assert key.startswith(f"billing:{{{customer}}}:")
        by_customer.setdefault(customer, set()).add(key_slot(key.encode()))
    assert by_customer[ACME] == {key_slot(ACME.encode())}
    assert len(by_customer["org:b}odd"]) == 1
    roles = {k.split("}:", 1)[1].split(":", 1)[0] for k in keys if k.startswith("billing:{org:a")}
    assert {"sub", "usage", "lease", "gc", "ik", "ih"} <= roles


# -- holds --------------------------------------------------------------------------------


async def test_an_unsettled_hold_expires_after_the_ttl(server: RedisServer, tmp_path: Path) -> None:
    """A lease never given back (its process died holding it) frees its units after
    reservation_ttl."""
    async with (
        opened(server, tmp_path, reservation_ttl=0.5) as dead,
        opened(server, tmp_path, reservation_ttl=0.5) as alive,
    ):
        await alive.subscribe(ACME, "plan:free@1")
        held = await dead.reserve(ACME, CONVERT, 10)
        assert held.answer.ok
        for task in list(dead._tasks):  # dies: nothing renews or gives back its lease
            task.cancel()
        assert not (await alive.reserve(ACME, CONVERT)).answer.ok

        async def freed() -> bool:
            reservation = await alive.reserve(ACME, CONVERT, 10)
            if reservation.answer.ok:
                await alive.commit(reservation)
            return reservation.answer.ok

        await eventually(freed, 10)
        assert await used(alive) == 10
        await alive.commit(held)  # a late commit is still charged, beyond the limit
        assert await used(alive) == 20


async def test_a_live_process_renews_the_holds_of_running_requests(
    server: RedisServer, tmp_path: Path
) -> None:
    """The lease under a request still running outlives reservation_ttl while its process
    lives (renewed every tick)."""
    async with (
        # A TTL of 3 s leaves a tick (1 s) up to 2 s late on a loaded machine before the
        # renewal comes too late; 1.5 s failed under CI-like load.
        opened(server, tmp_path, reservation_ttl=3.0) as running,
        opened(server, tmp_path, reservation_ttl=3.0) as other,
    ):
        await other.subscribe(ACME, "plan:free@1")
        held = await running.reserve(ACME, CONVERT, 10)
        assert held.answer.ok
        await asyncio.sleep(7.0)  # > 2 TTLs: renewed every tick
        assert not (await other.reserve(ACME, CONVERT)).answer.ok
        await running.commit(held)
        await running.flush()
        assert await used(other) == 10


async def test_aclose_returns_when_an_upkeep_call_swallows_the_cancellation(
    server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aclose() stops a lease-upkeep call even when it swallows its cancellation, as
    Python 3.11's asyncio.wait_for (under every redis-py command) does when the command
    completes as the cancel arrives: aclose() must not wait for that call forever."""
    async with opened(server, tmp_path, reservation_ttl=0.3) as ledger:
        await ledger.subscribe(ACME, "plan:free@1")
        held = await ledger.reserve(ACME, CONVERT)
        assert held.answer.ok
        store: Any = ledger._backend
        maintain = store._maintain
        entered = asyncio.Event()
        swallowed: list[bool] = []

        async def swallowing_maintain(gives: Any, seen: int) -> Any:
            if not swallowed:
                entered.set()
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:  # once, as wait_for does
                    swallowed.append(True)
            return await maintain(gives, seen)

        monkeypatch.setattr(store, "_maintain", swallowing_maintain)
        await asyncio.wait_for(entered.wait(), 10)
        running = set(store._running) | set(ledger._tasks)
        await asyncio.wait_for(ledger.aclose(), 10)
        assert swallowed == [True]
        assert all(task.done() for task in running)
        await asyncio.sleep(0.5)  # nothing runs for the closed ledger any more
        assert not store._running and not ledger._tasks


async def test_aclose_returns_however_it_meets_the_renewals(
    server: RedisServer, tmp_path: Path
) -> None:
    """aclose() returns, whenever it comes, while leases are renewed every millisecond over
    real redis-py: 20 closes at random moments. (The old per-hold renewal hung about 4
    closes in 10: the cancel landed as a command completed; see the test above.)"""
    for i in range(20):
        ledger = RedisLedger(
            server.url,
            pricing=PRICING,
            prefix=f"r{i}:",
            reservation_ttl=0.003,
            spool=tmp_path / f"spool-{i}.db",
            spool_options=FAST_SPOOL,
        )
        await ledger.open()
        await ledger.subscribe(ACME, "plan:free@1")
        held = [await ledger.reserve(ACME, CONVERT) for _ in range(5)]
        await asyncio.sleep(random.uniform(0, 0.02))
        store: Any = ledger._backend
        running = set(ledger._tasks) | set(store._running)
        try:
            await asyncio.wait_for(ledger.aclose(), 5)
        except TimeoutError:
            for task in running:  # so that the failing test ends
                task.cancel()
            pytest.fail(f"aclose() #{i} did not return within 5 s")
        assert all(task.done() for task in running)
        del held


def _awaiting(task: asyncio.Task[None], name: str) -> bool:
    """Whether ``task`` is suspended inside a coroutine function called ``name``."""
    coro: Any = task.get_coro()
    while coro is not None:
        if getattr(coro, "cr_code", None) is not None and coro.cr_code.co_name == name:
            return True
        coro = getattr(coro, "cr_await", None)
    return False


async def test_an_upkeep_cancelled_mid_command_gives_its_connection_back(
    server: RedisServer, tmp_path: Path
) -> None:
    """aclose() while a lease upkeep waits on Redis (paused) returns its pipeline's
    connection to the pool: a pipeline dropped holding it would warn ("Unclosed client
    session" ResourceWarning), a pool slot gone until collected."""
    import gc
    import signal

    assert server.process is not None
    async with opened(server, tmp_path, reservation_ttl=0.3) as ledger:
        await ledger.subscribe(ACME, "plan:free@1")
        held = await ledger.reserve(ACME, CONVERT)
        assert held.answer.ok
        store: Any = ledger._backend
        running: list[asyncio.Task[Any]] = []
        server.process.send_signal(signal.SIGSTOP)
        try:

            async def blocked() -> bool:  # an upkeep call waits for Redis's reply
                running[:] = [t for t in store._running if _awaiting(t, "execute")]
                return bool(running)

            await eventually(blocked, 10)
            await asyncio.wait_for(ledger.aclose(), 10)
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert all(task.done() for task in running)
        running.clear()  # the tasks' tracebacks reference the upkeep's frames
    for _ in range(3):
        gc.collect()  # a pipeline dropped holding its connection warns here


async def test_closing_gives_back_every_lease(server: RedisServer, tmp_path: Path) -> None:
    """A ledger closed leaves no lease record behind: its units are free for the others at
    once, not after reservation_ttl."""
    async with opened(server, tmp_path) as other:
        async with opened(server, tmp_path) as ledger:
            await ledger.subscribe(ACME, "plan:free@1")
            first = await ledger.reserve(ACME, CONVERT, 3)
            second = await ledger.reserve(ACME, CONVERT, 4)
            await ledger.commit(first)
            await ledger.release(second)
            client = raw_client(server)
            assert await client.exists(f"um:{{{ACME}}}:lease:{CONVERT}")
        assert not await client.exists(f"um:{{{ACME}}}:lease:{CONVERT}")
        await client.aclose()
        assert (await other.reserve(ACME, CONVERT, 7)).answer.ok
        assert not (await other.reserve(ACME, CONVERT, 1)).answer.ok


# -- idempotency ---------------------------------------------------------------------------


async def test_a_group_commit_replayed_anywhere_is_charged_once(
    server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group commit that ran but whose reply was lost goes to the spool; the spool's
    replay, and the same events replayed again by another replica, charge nothing more."""
    async with opened(server, tmp_path) as one, opened(server, tmp_path) as two:
        await one.subscribe(ACME, "plan:free@1")
        reservation = await one.reserve(ACME, CONVERT, 3)
        spooled: list[UsageEvent] = []
        to_outbox = one._to_outbox
        call = one._call

        def capture(event: UsageEvent, why: str) -> None:
            spooled.append(event)
            to_outbox(event, why)

        async def lost_reply(awaitable: Any, what: str) -> Any:
            result = await call(awaitable, what)
            if what == "a group commit":
                raise RetryableProviderError("the reply was lost")
            return result

        monkeypatch.setattr(one, "_to_outbox", capture)
        monkeypatch.setattr(one, "_call", lost_reply)
        await one.commit(reservation)
        await one.flush()  # applied in Redis, reply "lost": spooled
        monkeypatch.undo()
        assert [event.units for event in spooled] == [3]
        assert one.spool is not None
        await eventually(lambda: _spool_empty(one))  # the spool replayed it
        assert await used(one) == 3
        await two.report(spooled)  # another replica replays it
        await two.report(spooled)
        assert await used(one) == 3
        assert (await one.reserve(ACME, CONVERT, 7)).answer.ok  # its lease shrank once


async def test_a_group_commit_script_run_twice_charges_once(
    server: RedisServer, tmp_path: Path
) -> None:
    """The group commit's script run again for the same batch (a retry after a lost reply)
    charges once; the batch leaves one marker in the customer's gc hash."""
    async with opened(server, tmp_path) as ledger:
        await ledger.subscribe(ACME, "plan:free@1")
        base = f"um:{{{ACME}}}:"
        month = ledger._terms(CONVERT, datetime.now(UTC)).decode().split("\n")[2]
        keys = [base + "credits", base + "usage", base + "gc", base + "lease:" + CONVERT]
        args = ["owner", "owner.1", 60_000, "0", 0, CONVERT, month, 10, 4, 0]
        first = await ledger._scripts["FLUSH"](keys=keys, args=args)
        again = await ledger._scripts["FLUSH"](keys=keys, args=args)
        assert first[:2] == [1, 4]
        assert again == [0]
        assert await used(ledger) == 4
        client = raw_client(server)
        assert await client.hkeys(base + "gc") == ["owner.1"]
        await client.aclose()


# -- atomicity --------------------------------------------------------------------------------


async def test_four_ledgers_racing_never_overspend(server: RedisServer, tmp_path: Path) -> None:
    """4 ledgers (own connection pools) x 50 concurrent reserves for 10 units: exactly 10."""
    async with contextlib.AsyncExitStack() as stack:
        ledgers = [await stack.enter_async_context(opened(server, tmp_path)) for _ in range(4)]
        await ledgers[0].subscribe(ACME, "plan:free@1")
        results = await asyncio.gather(
            *(ledger.reserve(ACME, CONVERT) for ledger in ledgers for _ in range(50))
        )
        allowed = [(i // 50, r) for i, r in enumerate(results) if r.answer.ok]
        assert len(allowed) == 10
        await asyncio.gather(*(ledgers[i].commit(r) for i, r in allowed))
        for ledger in ledgers:
            await ledger.flush()
        assert await used(ledgers[0]) == 10


@pytest.mark.slow
def test_four_processes_of_200_requests_charge_exactly_100(
    server: RedisServer, tmp_path: Path
) -> None:
    """4 processes x 200 concurrent metered requests, 100 units: 100 served and charged."""

    async def setup() -> None:
        async with opened(server, tmp_path, prefix="load:") as ledger:
            await ledger.subscribe("org:load", "plan:load@1")

    asyncio.run(setup())
    worker = Path(__file__).parents[1] / "support" / "redis_load_worker.py"
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    processes = [
        subprocess.Popen(
            [sys.executable, str(worker), server.url, "load:", str(tmp_path / f"s{i}.db"), "200"],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
            env=env,
        )
        for i in range(4)
    ]
    try:
        for process in processes:  # every process connected before any request
            assert process.stdout is not None and process.stdout.readline().strip() == "ready"
        for process in processes:
            assert process.stdin is not None
            process.stdin.write("go\n")
            process.stdin.flush()
        totals: Counter[str] = Counter()
        for process in processes:
            out, _ = process.communicate(timeout=120)
            assert process.returncode == 0
            totals.update(json.loads(out.strip().splitlines()[-1]))
    finally:
        for process in processes:
            if process.poll() is None:
                process.kill()
                process.wait(10)
    assert totals == {"200": 100, "402": 700}

    async def charged() -> int:
        async with opened(server, tmp_path, prefix="load:") as ledger:
            return await used(ledger, "org:load", "feature:load")

    assert asyncio.run(charged()) == 100


# -- Redis unreachable ----------------------------------------------------------------------


def metered_app(ledger: RedisLedger) -> Starlette:
    @metered(CONVERT)
    async def convert(request: Request) -> JSONResponse:
        await asyncio.sleep(0.001)
        return JSONResponse({"ok": True})

    return Starlette(
        routes=[Route("/convert", convert)],
        middleware=[
            Middleware(UsageMiddleware, provider=ledger, customer=customer_from_header("x-c"))
        ],
    )


async def call(app: Starlette, customer: str = ACME) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
        return await client.get("/convert", headers={"x-c": customer})


async def test_closed_policy_answers_503_problem_json_while_redis_is_down(
    durable_server: RedisServer, tmp_path: Path
) -> None:
    """failure_policy='closed': Redis down -> a request that needs a lease gets 503
    problem+json with Retry-After, never 500; a warm customer is served from its lease and
    charged once Redis is back."""
    async with opened(durable_server, tmp_path, failure_policy="closed") as ledger:
        await ledger.subscribe(ACME, "plan:free@1")
        await ledger.subscribe(COLD, "plan:free@1")
        app = metered_app(ledger)
        assert (await call(app)).status_code == 200
        await ledger.flush()
        durable_server.stop()
        for _ in range(3):
            response = await call(app, COLD)  # needs a lease: the failure policy answers
            assert response.status_code == 503
            assert response.headers["content-type"].startswith("application/problem+json")
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["status"] == 503
        answer = await ledger.can(COLD, CONVERT)
        assert not answer.ok and isinstance(answer.err, RetryableProviderError)
        assert (await call(app)).status_code == 200  # served from ACME's lease in memory
        await asyncio.to_thread(durable_server.start)

        async def serving() -> bool:
            return (await call(app, COLD)).status_code == 200

        await eventually(serving)
        assert await used(ledger, COLD) == 1
        await eventually(lambda: _used_is(ledger, ACME, 2))


async def test_open_policy_serves_while_down_and_charges_once_redis_is_back(
    durable_server: RedisServer, tmp_path: Path
) -> None:
    """failure_policy='open': a request that needs a lease is served with err set while
    Redis is down, a warm one from its lease; the spool charges them all once, later."""
    async with opened(durable_server, tmp_path, failure_policy="open") as ledger:
        await ledger.subscribe(ACME, "plan:free@1")
        await ledger.subscribe(COLD, "plan:free@1")
        app = metered_app(ledger)
        assert (await call(app)).status_code == 200
        await ledger.flush()
        durable_server.stop()
        assert [(await call(app, COLD)).status_code for _ in range(3)] == [200] * 3
        answer = await ledger.can(COLD, CONVERT)
        assert answer.ok and isinstance(answer.err, RetryableProviderError)
        assert (await call(app)).status_code == 200  # served from ACME's lease in memory
        await ledger.flush()  # its group commit fails: to the spool
        await asyncio.to_thread(durable_server.start)

        async def reconciled() -> bool:
            return await _used_is(ledger, COLD, 3) and await _used_is(ledger, ACME, 2)

        await eventually(reconciled)
        # Three events served without a lease, one group commit's entry.
        assert ledger.spool is not None and ledger.spool.stats().sent == 4


async def _used_is(ledger: RedisLedger, customer: str, units: int) -> bool:
    try:
        return await used(ledger, customer) == units
    except RetryableProviderError:
        return False


async def test_a_commit_while_redis_is_down_is_spooled_and_charged_once(
    durable_server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A reservation held before Redis went down and committed during: its group commit is
    spooled and charged once, later; replaying the spooled event again changes nothing."""
    async with opened(durable_server, tmp_path, failure_policy="closed") as ledger:
        await ledger.subscribe(ACME, "plan:free@1")
        reservation = await ledger.reserve(ACME, CONVERT, 4)
        spooled: list[UsageEvent] = []
        to_outbox = ledger._to_outbox

        def capture(event: UsageEvent, why: str) -> None:
            spooled.append(event)
            to_outbox(event, why)

        monkeypatch.setattr(ledger, "_to_outbox", capture)
        durable_server.stop()
        await ledger.commit(reservation)  # never raises
        await ledger.flush()  # its group commit fails: to the spool
        assert ledger.spool is not None
        await ledger.spool.flush()
        assert (await ledger.spool.outbox_status()).depth == 1
        await asyncio.to_thread(durable_server.start)
        await eventually(lambda: _used_is(ledger, ACME, 4))
        await ledger.report(spooled)  # a second replay changes nothing
        assert await used(ledger) == 4
        assert (await ledger.reserve(ACME, CONVERT, 6)).answer.ok


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_redis_killed_and_restarted_mid_load(
    durable_server: RedisServer, tmp_path: Path, policy: FailurePolicy
) -> None:
    """kill -9 of Redis mid-load, restart on the same port: the policy holds (open: all
    served; closed: 503s once the leases in memory may have expired, no 500), every served
    request is charged exactly once, and Redis keeps markers per group commit, not per
    request."""
    async with opened(
        durable_server,
        tmp_path,
        failure_policy=policy,
        retry_after=0.2,
        timeout=1.0,
        reservation_ttl=1.0,  # leases served from for 0.5 s after the last renewal
    ) as ledger:
        await ledger.subscribe(ACME, "plan:big@1")
        app = metered_app(ledger)
        transport = httpx.ASGITransport(app=app)
        statuses: Counter[int] = Counter()
        stop = asyncio.Event()

        async def load(client: httpx.AsyncClient) -> None:
            while not stop.is_set():
                response = await client.get("/convert", headers={"x-c": ACME})
                statuses[response.status_code] += 1
                await asyncio.sleep(0.001)

        async with httpx.AsyncClient(transport=transport, base_url="http://app") as client:
            workers = [asyncio.create_task(load(client)) for _ in range(16)]
            await asyncio.sleep(0.5)
            await asyncio.to_thread(durable_server.stop, kill=True)
            down_before = sum(statuses.values())
            await asyncio.sleep(0.8)
            down_after = sum(statuses.values())
            await asyncio.to_thread(durable_server.start)
            await asyncio.sleep(0.8)
            stop.set()
            await asyncio.gather(*workers)

        assert down_after > down_before  # requests were answered while Redis was down
        assert set(statuses) <= ({200} if policy == "open" else {200, 503})
        if policy == "closed":
            assert statuses[503] > 0
        served = statuses[200]

        async def reconciled() -> bool:
            try:
                return await used(ledger) >= served
            except RetryableProviderError:
                return False

        await eventually(reconciled, 30)
        assert ledger.spool is not None
        await eventually(
            lambda: _spool_empty(ledger), 30
        )  # everything replayed: nothing left to add
        assert await used(ledger) == served
        client = raw_client(durable_server)
        markers = len(await client.keys(f"um:{{{ACME}}}:ik:*"))
        group_markers = await client.hlen(f"um:{{{ACME}}}:gc")
        await client.aclose()
        # Per request only for requests served without a lease while Redis was down
        # (failing open); else per group commit, and acknowledged ones are deleted.
        if policy == "closed":
            assert markers == 0
        assert markers < served
        assert group_markers < served / 2, (group_markers, served)


async def _spool_empty(ledger: RedisLedger) -> bool:
    assert ledger.spool is not None
    await ledger.spool.flush()
    return (await ledger.spool.outbox_status()).depth == 0


# -- configuration --------------------------------------------------------------------------


async def test_a_ledger_without_pricing_uses_the_stored_one(
    server: RedisServer, tmp_path: Path
) -> None:
    """A replica built without pricing reads the pricing another one stored in Redis."""
    async with opened(server, tmp_path) as first:
        await first.subscribe(ACME, "plan:free@1")
    async with opened(server, tmp_path, pricing=None) as second:
        await second.subscribe("org:b", "plan:free@1")
        assert (await second.reserve(ACME, CONVERT, 10)).answer.ok
        assert not (await second.reserve(ACME, CONVERT, 1)).answer.ok


async def test_the_url_defaults_to_redis_url(
    server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without url=, the ledger connects to $REDIS_URL."""
    monkeypatch.setenv("REDIS_URL", server.url)
    ledger = RedisLedger(pricing=PRICING, spool=tmp_path / "spool.db")
    async with ledger:
        await ledger.subscribe(ACME, "plan:free@1")
        assert (await ledger.reserve(ACME, CONVERT)).answer.ok


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"prefix": "a{b"}, "prefix"),
        ({"url": "http://localhost"}, "redis://"),
        ({"failure_policy": "maybe"}, "failure_policy"),
    ],
)
def test_bad_configuration_is_refused_at_construction(kwargs: dict[str, Any], match: str) -> None:
    """A braced prefix, a non-Redis URL or an unknown policy raise ConfigurationError."""
    with pytest.raises(ConfigurationError, match=match):
        RedisLedger(**kwargs)


def test_without_redis_py_the_package_imports_and_the_ledger_names_the_extra() -> None:
    """`import usage_middleware` works without redis-py; RedisLedger() says what to install."""
    code = (
        "import sys; sys.modules['redis'] = None\n"
        "import usage_middleware, usage_middleware.ledger\n"
        "from usage_middleware.ledger.redis import RedisLedger\n"
        "try:\n    RedisLedger()\nexcept usage_middleware.ConfigurationError as e:\n    print(e)\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=True
    ).stdout
    assert "install usage-middleware[redis]" in out


async def test_a_pricing_that_drops_a_subscribed_plan_is_refused(
    server: RedisServer, tmp_path: Path
) -> None:
    """Opening with a pricing that lacks a plan customers are on fails, naming plan and
    count; the stored pricing is left as it was."""
    async with opened(server, tmp_path) as ledger:
        plan = next(iter(PRICING["plans"]))
        await ledger.subscribe(ACME, plan)
    other = {"plans": {"plan:other@1": {"features": {CONVERT: {"tiers": [{"upto": 3}]}}}}}
    ledger = RedisLedger(server.url, pricing=other, spool=tmp_path / "spool-x.db")
    with pytest.raises(ConfigurationError, match=rf"{plan} \(1 customers\)"):
        await ledger.open()
    async with opened(server, tmp_path) as again:  # the original pricing still works
        assert await again.usage(ACME)


@pytest.mark.parametrize(
    ("argument", "value"),
    [("reservation_ttl", 0), ("timeout", -1), ("max_connections", 0), ("retry_after", 0)],
)
def test_bad_settings_are_configuration_errors(argument: str, value: float) -> None:
    """A bad RedisLedger setting is a ConfigurationError at construction (no server needed)."""
    with pytest.raises(ConfigurationError, match=argument):
        RedisLedger(spool=None, **{argument: value})


async def test_a_lease_whose_reply_is_lost_never_lets_a_customer_overspend(
    server: RedisServer, tmp_path: Path
) -> None:
    """A lease call that times out while Redis is stopped (SIGSTOP), and that Redis runs
    once it resumes, is answered per the failure policy (503), and its units are never
    counted twice: two replicas then serve at most the limit, each charged once."""
    import signal

    assert server.process is not None
    async with (
        opened(server, tmp_path, timeout=0.5, retry_after=0.2) as stalled,
        opened(server, tmp_path) as other,
    ):
        await other.subscribe(ACME, "plan:free@1")  # 10 units
        await stalled.usage(ACME)  # a pooled connection, ready to send
        server.process.send_signal(signal.SIGSTOP)
        try:
            lost = await stalled.reserve(ACME, CONVERT)
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert not lost.answer.ok and lost.answer.err is not None  # 503, not 402
        served = 0
        refused: set[int] = set()
        loop = asyncio.get_running_loop()
        deadline = loop.time() + 10
        while len(refused) < 2 and loop.time() < deadline:
            for i, ledger in enumerate((stalled, other)):
                reservation = await ledger.reserve(ACME, CONVERT)
                if reservation.answer.ok:
                    await ledger.commit(reservation)
                    served += 1
                elif reservation.answer.err is None:
                    refused.add(i)  # 402: the limit, as this replica sees it
                else:
                    await asyncio.sleep(0.05)  # the breaker: Redis timed out a moment ago
        assert refused == {0, 1}
        await stalled.flush()
        await other.flush()
        assert await used(other) == served
        assert 1 <= served <= 10


async def test_a_group_commit_after_redis_forgot_its_scripts_is_charged_once(
    server: RedisServer, tmp_path: Path
) -> None:
    """A group commit sent by EVALSHA after Redis forgot the scripts (SCRIPT FLUSH, as a
    restart does) loads them and is applied once; the lease renewals go on too."""
    async with opened(server, tmp_path, reservation_ttl=0.6) as ledger:
        await ledger.subscribe(ACME, "plan:free@1")
        reservation = await ledger.reserve(ACME, CONVERT, 3)
        client = raw_client(server)
        await client.script_flush()
        await ledger.commit(reservation)
        await ledger.flush()
        assert await used(ledger) == 3
        await client.script_flush()
        held = await ledger.reserve(ACME, CONVERT, 7)
        assert held.answer.ok
        await asyncio.sleep(1.5)  # renewed past reservation_ttl, scripts loaded again
        await client.aclose()
        async with opened(server, tmp_path) as other:
            assert not (await other.reserve(ACME, CONVERT)).answer.ok
        await ledger.commit(held)
        assert await used(ledger) == 10


async def test_a_lease_refused_by_the_breaker_keeps_the_units_it_was_giving_back(
    server: RedisServer, tmp_path: Path
) -> None:
    """A lease call the open breaker refused before sending anything did nothing: the
    units it was giving back stay with the process (served later), not parked in Redis
    out of everyone's reach until the process closes."""
    async with opened(server, tmp_path) as ledger, opened(server, tmp_path) as other:
        await ledger.subscribe(ACME, "plan:free@1")  # 10 units
        first = await ledger.reserve(ACME, CONVERT)  # leases 2 (a quarter of what is free)
        await ledger.release(first)
        ledger._trip(ConnectionError("Redis went away"))  # the breaker opens
        refused = await ledger.reserve(ACME, CONVERT, 5)  # needs a lease: gives back 2
        assert not refused.answer.ok and refused.answer.err is not None
        ledger._down_until = 0.0  # Redis answers again
        kept = await ledger.reserve(ACME, CONVERT, 2)
        assert kept.answer.ok
        assert (await other.reserve(ACME, CONVERT, 8)).answer.ok


# -- Idempotency-Key claims ---------------------------------------------------------------


async def test_idempotency_claims_are_hash_tagged_keys_with_ttls(
    server: RedisServer, tmp_path: Path
) -> None:
    """A claim is one key in the customer's slot: in flight 5 min, charged 24 h, then gone."""
    async with opened(server, tmp_path, prefix="billing:") as ledger:
        assert await ledger.claim_key(ACME, "POST /x", "k" * 255) == "new"
        client = raw_client(server)
        (name,) = await client.keys("billing:{org:acme}:rk:*")
        in_flight = await client.pttl(name)
        await ledger.finish_key(ACME, "POST /x", "k" * 255, charged=True)
        charged = await client.pttl(name)
        assert await ledger.claim_key(ACME, "POST /x", "k" * 255) == "charged"
        await ledger.finish_key(ACME, "POST /y", "other", charged=False)
        await client.pexpire(name, 1)  # 24 hours later
        await asyncio.sleep(0.01)
        assert await ledger.claim_key(ACME, "POST /x", "k" * 255) == "new"
        await client.aclose()
    assert 290_000 < in_flight <= 300_000
    assert 86_390_000 < charged <= 86_400_000
    assert key_slot(name.encode()) == key_slot(ACME.encode())


async def test_idempotency_claim_stores_the_fingerprint(
    server: RedisServer, tmp_path: Path
) -> None:
    """The claim's value carries the request fingerprint; a bare value written by an older
    release matches no request (mismatch: 422, never a free pass)."""
    fp = "f" * 64
    async with opened(server, tmp_path, prefix="fp:") as ledger:
        assert await ledger.claim_key(ACME, "POST /x", "k", fingerprint=fp) == "new"
        client = raw_client(server)
        (name,) = await client.keys("fp:{org:acme}:rk:*")
        assert await client.get(name) == f"0:{fp}"
        await ledger.finish_key(ACME, "POST /x", "k", charged=True, fingerprint=fp)
        assert await client.get(name) == f"1:{fp}"
        await client.set(name, b"1")  # as the previous release wrote it
        assert await ledger.claim_key(ACME, "POST /x", "k", fingerprint=fp) == "mismatch"
        await client.aclose()


# -- lost replies: a lease row never keeps units its process dropped ---------------------------

LOAD = "feature:load"  # plan:load@1: 100 units


def lose_lease_replies(ledger: RedisLedger, monkeypatch: pytest.MonkeyPatch, times: int) -> None:
    """The next ``times`` lease calls of ``ledger`` run in Redis, then their reply is lost."""
    call = ledger._call
    left = [times]

    async def lost_reply(awaitable: Any, what: str) -> Any:
        result = await call(awaitable, what)
        if what == "leasing" and left[0] > 0:
            left[0] -= 1
            raise RetryableProviderError("Timeout reading from socket (the reply was lost)")
        return result

    monkeypatch.setattr(ledger, "_call", lost_reply)


async def serve_all(ledgers: list[RedisLedger], customer: str = ACME, quiet: float = 2.0) -> int:
    """Reserve and commit one unit at a time on every ledger in turn until none served
    anything for ``quiet`` seconds (each refusing with 402: the limit), or 20 s pass; the
    units served."""
    served = 0
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    last_served = loop.time()
    while loop.time() - last_served < quiet and loop.time() < deadline:
        for ledger in ledgers:
            reservation = await ledger.reserve(customer, LOAD)
            if reservation.answer.ok:
                await ledger.commit(reservation)
                served += 1
                last_served = loop.time()
            else:
                await asyncio.sleep(0.05)
    for ledger in ledgers:
        await ledger.flush()
    return served


async def lease_rows(server: RedisServer, feature: str = LOAD) -> dict[str, int]:
    client = raw_client(server)
    try:
        rows = await client.hgetall(f"um:{{{ACME}}}:lease:{feature}")
    finally:
        await client.aclose()
    return {field: int(value.split("|")[0]) for field, value in rows.items()}


async def test_leases_whose_replies_were_lost_do_not_lock_the_customer_out(
    server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Four replicas each lose the reply of a lease that ran (25, 18, 14, 10 units parked
    under their rows): the customer still gets exactly its 100 units, never more, and no
    row keeps units afterwards."""
    async with contextlib.AsyncExitStack() as stack:
        ledgers = [
            await stack.enter_async_context(opened(server, tmp_path, reservation_ttl=3))
            for _ in range(4)
        ]
        await ledgers[0].subscribe(ACME, "plan:load@1")
        for ledger in ledgers:
            lose_lease_replies(ledger, monkeypatch, 1)
            lost = await ledger.reserve(ACME, LOAD)
            assert not lost.answer.ok and lost.answer.err is not None
        assert sorted((await lease_rows(server)).values()) == [10, 14, 18, 25]
        served = await serve_all(ledgers)
        assert served == 100
        assert await used(ledgers[0], ACME, LOAD) == 100
        await eventually(lambda: _rows_empty(server), within=10)


async def _rows_empty(server: RedisServer) -> bool:
    return not any((await lease_rows(server)).values())


async def test_a_lost_lease_of_a_replica_that_never_leases_again_is_reclaimed(
    server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A replica that lost a lease reply (25 units under its row) and gets no more
    requests: the row is reconciled at its next tick, so another replica serves all 100."""
    async with (
        opened(server, tmp_path, reservation_ttl=2) as idle,
        opened(server, tmp_path, reservation_ttl=2) as busy,
    ):
        await busy.subscribe(ACME, "plan:load@1")
        lose_lease_replies(idle, monkeypatch, 1)
        assert not (await idle.reserve(ACME, LOAD)).answer.ok
        assert sorted((await lease_rows(server)).values()) == [25]
        assert await serve_all([busy]) == 100
        assert await used(busy, ACME, LOAD) == 100


async def test_a_lost_lease_reconciled_before_a_spooled_group_commit_never_overspends(
    server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A group commit that never reached Redis (spooled, replayed later) and a lost lease
    reply: the lease call that reconciles the row keeps the spooled charge's units, so
    after the replay the customer is charged exactly its 100 units across two replicas."""
    async with (
        opened(server, tmp_path, reservation_ttl=3) as one,
        opened(server, tmp_path, reservation_ttl=3) as two,
    ):
        await one.subscribe(ACME, "plan:load@1")
        held = [await one.reserve(ACME, LOAD, 5) for _ in range(2)]  # leases 25
        assert all(r.answer.ok for r in held)
        spooled: list[UsageEvent] = []
        call = one._call

        async def unsent(awaitable: Any, what: str) -> Any:
            if what == "a group commit":
                awaitable.close()  # never sent
                raise RetryableProviderError("Redis went away")
            return await call(awaitable, what)

        monkeypatch.setattr(one, "_call", unsent)
        monkeypatch.setattr(one, "_to_outbox", lambda event, why: spooled.append(event))
        await one.commit(held[0])
        await one.flush()
        assert [event.units for event in spooled] == [5]
        monkeypatch.undo()
        lose_lease_replies(one, monkeypatch, 1)
        assert not (await one.reserve(ACME, LOAD, 30)).answer.ok  # 30 leased, reply lost
        monkeypatch.undo()
        big = await one.reserve(ACME, LOAD, 16)  # its lease call reconciles the row
        assert big.answer.ok
        await two.report(spooled)  # the replay, late: the row shrinks by its 5 units
        await one.commit(held[1])
        await one.commit(big)
        served = 5 + 5 + 16 + await serve_all([one, two])
        assert served == 100
        assert await used(one, ACME, LOAD) == 100
