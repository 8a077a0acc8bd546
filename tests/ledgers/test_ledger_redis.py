"""RedisLedger against a real redis-server that each test starts on a free loopback port.

The shared semantics run in ``tests/ledgers/test_ledger_contract.py`` (entry ``redis`` in
``tests/support/backends.py``) and ``tests/providers/test_provider_contract.py``
(``tests/support/contract_redis.py``).
Here: the key layout (prefix, hash tag), TTL expiry and renewal of holds, idempotent
commits, atomicity across ledgers and across 4 processes, and Redis going away and coming
back (failure policies, the spool, no double charge) under the middleware.
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
        await ledger.report([UsageEvent(ACME, CONVERT, 1, idempotency_key="a{weird}key")])
        client = raw_client(server)
        keys = sorted(await client.keys("*"))
        await client.aclose()
        await ledger.release(held)
    assert keys and all(k.startswith("billing:") for k in keys)
    assert "billing:pricing" in keys
    by_customer: dict[str, set[int]] = {}
    for key in keys:
        if key == "billing:pricing":
            continue
        customer = ACME if key.startswith("billing:{org:acme}:") else "org:b}odd"
        assert key.startswith(f"billing:{{{customer}}}:")
        by_customer.setdefault(customer, set()).add(key_slot(key.encode()))
    assert by_customer[ACME] == {key_slot(ACME.encode())}
    assert len(by_customer["org:b}odd"]) == 1
    roles = {k.split("}:", 1)[1].split(":", 1)[0] for k in keys if k.startswith("billing:{org:a")}
    assert {"sub", "usage", "holds", "ik", "ih"} <= roles


# -- holds --------------------------------------------------------------------------------


async def test_an_unsettled_hold_expires_after_the_ttl(server: RedisServer, tmp_path: Path) -> None:
    """A hold never settled (its process died) frees its units after reservation_ttl."""
    async with (
        opened(server, tmp_path, reservation_ttl=0.5) as dead,
        opened(server, tmp_path, reservation_ttl=0.5) as alive,
    ):
        await alive.subscribe(ACME, "plan:free@1")
        held = await dead.reserve(ACME, CONVERT, 10)
        assert held.answer.ok
        await dead.aclose()  # gone without settling: nothing renews or releases its hold
        assert not (await alive.reserve(ACME, CONVERT)).answer.ok

        async def freed() -> bool:
            reservation = await alive.reserve(ACME, CONVERT, 10)
            if reservation.answer.ok:
                await alive.commit(reservation)
            return reservation.answer.ok

        await eventually(freed, 10)
        assert await used(alive) == 10
        await alive.commit(held)  # a late commit is still charged (once), beyond the limit
        await alive.report([held.event])
        assert await used(alive) == 20


async def test_a_live_process_renews_the_holds_of_running_requests(
    server: RedisServer, tmp_path: Path
) -> None:
    """Holds of a request still running outlive reservation_ttl while their process lives."""
    async with (
        opened(server, tmp_path, reservation_ttl=1.5) as running,
        opened(server, tmp_path, reservation_ttl=1.5) as other,
    ):
        await other.subscribe(ACME, "plan:free@1")
        held = await running.reserve(ACME, CONVERT, 10)
        assert held.answer.ok
        await asyncio.sleep(4.0)  # > 2 TTLs: renewed every tick
        assert not (await other.reserve(ACME, CONVERT)).answer.ok
        await running.commit(held)
        assert await used(other) == 10


async def test_aclose_returns_when_a_renewal_swallows_the_cancellation(
    server: RedisServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """aclose() stops the renewal task even when a renewal swallows its cancellation, as
    Python 3.11's asyncio.wait_for (under every redis-py command) does when the command
    completes as the cancel arrives: before, aclose() waited for that task forever."""
    async with opened(server, tmp_path, reservation_ttl=0.3) as ledger:
        await ledger.subscribe(ACME, "plan:free@1")
        held = await ledger.reserve(ACME, CONVERT)
        assert held.answer.ok
        renew = ledger._renew
        renewing = asyncio.Event()
        swallowed: list[bool] = []

        async def swallowing_renew() -> None:
            if not swallowed:
                renewing.set()
                try:
                    await asyncio.sleep(30)
                except asyncio.CancelledError:  # once, as wait_for does
                    swallowed.append(True)
            await renew()

        monkeypatch.setattr(ledger, "_renew", swallowing_renew)
        await asyncio.wait_for(renewing.wait(), 10)
        upkeep = ledger._upkeep
        assert upkeep is not None
        await asyncio.wait_for(ledger.aclose(), 10)
        assert swallowed == [True]
        assert upkeep.done()
        await asyncio.sleep(0.5)  # nothing renews the hold of the closed ledger any more
        assert upkeep.done()


async def test_aclose_returns_however_it_meets_the_renewals(
    server: RedisServer, tmp_path: Path
) -> None:
    """aclose() returns, whenever it comes, while holds are renewed every millisecond over
    real redis-py: 20 closes at random moments. Before, about 4 closes in 10 hung forever
    (the cancel landed as a command completed; see the test above)."""
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
        upkeep = ledger._upkeep
        assert upkeep is not None
        try:
            await asyncio.wait_for(ledger.aclose(), 5)
        except TimeoutError:
            while not upkeep.done():  # so that the failing test ends
                upkeep.cancel()
                await asyncio.wait((upkeep,), timeout=0.1)
            pytest.fail(f"aclose() #{i} did not return within 5 s")
        assert upkeep.done()
        del held


def _awaiting(task: asyncio.Task[None], name: str) -> bool:
    """Whether ``task`` is suspended inside a coroutine function called ``name``."""
    coro: Any = task.get_coro()
    while coro is not None:
        if getattr(coro, "cr_code", None) is not None and coro.cr_code.co_name == name:
            return True
        coro = getattr(coro, "cr_await", None)
    return False


async def test_a_renewal_cancelled_mid_command_gives_its_connection_back(
    server: RedisServer, tmp_path: Path
) -> None:
    """aclose() while a renewal waits on Redis (paused) returns its pipeline's connection
    to the pool: before, the pipeline kept it and was dropped ("Unclosed client session"
    ResourceWarning), a pool slot gone until collected."""
    import gc
    import signal

    assert server.process is not None
    async with opened(server, tmp_path, reservation_ttl=0.3) as ledger:
        await ledger.subscribe(ACME, "plan:free@1")
        held = await ledger.reserve(ACME, CONVERT)
        assert held.answer.ok
        upkeep = [ledger._upkeep]
        assert upkeep[0] is not None
        server.process.send_signal(signal.SIGSTOP)
        try:

            async def blocked() -> bool:  # its renewal waits for Redis's reply
                return _awaiting(upkeep[0], "execute")  # type: ignore[arg-type]

            await eventually(blocked, 10)
            await asyncio.wait_for(ledger.aclose(), 10)
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert upkeep[0].done()
        upkeep.clear()  # the task's traceback references the renewal's frames
    for _ in range(3):
        gc.collect()  # a pipeline dropped holding its connection warns here


async def test_settling_empties_the_holds_key(server: RedisServer, tmp_path: Path) -> None:
    """Committed and released holds leave no holds key behind."""
    async with opened(server, tmp_path) as ledger:
        await ledger.subscribe(ACME, "plan:free@1")
        first = await ledger.reserve(ACME, CONVERT, 3)
        second = await ledger.reserve(ACME, CONVERT, 4)
        await ledger.commit(first)
        await ledger.release(second)
        client = raw_client(server)
        assert not await client.exists(f"um:{{{ACME}}}:holds:{CONVERT}")
        await client.aclose()


# -- idempotency ---------------------------------------------------------------------------


async def test_a_commit_replayed_anywhere_is_charged_once(
    server: RedisServer, tmp_path: Path
) -> None:
    """Committing again (another replica, a spool replay via report) charges nothing more."""
    async with opened(server, tmp_path) as one, opened(server, tmp_path) as two:
        await one.subscribe(ACME, "plan:free@1")
        reservation = await one.reserve(ACME, CONVERT, 3)
        await one.commit(reservation)
        await one.report([reservation.event])  # what the spool would replay
        reservation.settled = False  # as if another process had the same reservation
        await two.commit(reservation)
        assert await used(one) == 3
        assert (await one.reserve(ACME, CONVERT, 7)).answer.ok


async def test_a_retried_reserve_script_holds_once(server: RedisServer, tmp_path: Path) -> None:
    """The reserve script run twice for one reservation (a retry after a lost reply) holds once."""
    async with opened(server, tmp_path) as ledger:
        await ledger.subscribe(ACME, "plan:free@1")
        reservation = await ledger.reserve(ACME, CONVERT, 6)
        event = reservation.event
        base = f"um:{{{ACME}}}:"
        again = await ledger._scripts["RESERVE"](
            keys=[base + "sub", base + "credits", base + "usage", base + "holds:" + CONVERT],
            args=[
                CONVERT, 6, event.idempotency_key, 30_000, ledger._terms(CONVERT, event.at),
            ],
        )  # fmt: skip
        assert again[0] == 1
        assert (await ledger.reserve(ACME, CONVERT, 4)).answer.ok
        assert not (await ledger.reserve(ACME, CONVERT, 1)).answer.ok


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
    """failure_policy='closed': Redis down -> 503 problem+json with Retry-After, never 500."""
    async with opened(durable_server, tmp_path, failure_policy="closed") as ledger:
        await ledger.subscribe(ACME, "plan:free@1")
        app = metered_app(ledger)
        assert (await call(app)).status_code == 200
        durable_server.stop()
        for _ in range(3):
            response = await call(app)
            assert response.status_code == 503
            assert response.headers["content-type"].startswith("application/problem+json")
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["status"] == 503
        answer = await ledger.can(ACME, CONVERT)
        assert not answer.ok and isinstance(answer.err, RetryableProviderError)
        await asyncio.to_thread(durable_server.start)

        async def serving() -> bool:
            return (await call(app)).status_code == 200

        await eventually(serving)
        assert await used(ledger) == 2


async def test_open_policy_serves_while_down_and_charges_once_redis_is_back(
    durable_server: RedisServer, tmp_path: Path
) -> None:
    """failure_policy='open': served with err set while down; the spool charges them later."""
    async with opened(durable_server, tmp_path, failure_policy="open") as ledger:
        await ledger.subscribe(ACME, "plan:free@1")
        app = metered_app(ledger)
        assert (await call(app)).status_code == 200
        durable_server.stop()
        assert [(await call(app)).status_code for _ in range(3)] == [200] * 3
        answer = await ledger.can(ACME, CONVERT)
        assert answer.ok and isinstance(answer.err, RetryableProviderError)
        await asyncio.to_thread(durable_server.start)

        async def reconciled() -> bool:
            try:
                return await used(ledger) == 4
            except RetryableProviderError:
                return False

        await eventually(reconciled)
        assert ledger.spool is not None and ledger.spool.stats().sent == 3


async def test_a_commit_while_redis_is_down_is_spooled_and_charged_once(
    durable_server: RedisServer, tmp_path: Path
) -> None:
    """A reservation held before Redis went down and committed during: charged once, later."""
    async with opened(durable_server, tmp_path, failure_policy="closed") as ledger:
        await ledger.subscribe(ACME, "plan:free@1")
        reservation = await ledger.reserve(ACME, CONVERT, 4)
        durable_server.stop()
        await ledger.commit(reservation)  # never raises; goes to the spool
        assert ledger.spool is not None
        await ledger.spool.flush()
        assert (await ledger.spool.outbox_status()).depth == 1
        await asyncio.to_thread(durable_server.start)

        async def charged() -> bool:
            try:
                return await used(ledger) == 4
            except RetryableProviderError:
                return False

        await eventually(charged)
        await ledger.report([reservation.event])  # a second replay changes nothing
        assert await used(ledger) == 4
        assert (await ledger.reserve(ACME, CONVERT, 6)).answer.ok


@pytest.mark.slow
@pytest.mark.parametrize("policy", ["open", "closed"])
async def test_redis_killed_and_restarted_mid_load(
    durable_server: RedisServer, tmp_path: Path, policy: FailurePolicy
) -> None:
    """kill -9 of Redis mid-load, restart on the same port: the policy holds (open: all
    served; closed: 503s, no 500) and every served request is charged exactly once."""
    async with opened(
        durable_server, tmp_path, failure_policy=policy, retry_after=0.2, timeout=1.0
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
        await client.aclose()
        assert markers == served  # one idempotency marker per served request


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


async def test_reserves_lost_in_a_redis_stall_leave_no_orphan_holds(
    server: RedisServer, tmp_path: Path
) -> None:
    """Reserves that time out while Redis is stopped (SIGSTOP) and that Redis runs once it
    resumes leave no hold behind: the next request is allowed, not a 402 with used 0."""
    import signal

    assert server.process is not None
    async with opened(
        server, tmp_path, timeout=0.5, retry_after=0.2, failure_policy="closed"
    ) as ledger:
        await ledger.subscribe(ACME, "plan:free@1")  # 10 units
        warm = await asyncio.gather(*(ledger.reserve(ACME, CONVERT) for _ in range(10)))
        assert all(r.answer.ok for r in warm)  # ten pooled connections, ready to send
        for r in warm[1:]:
            await ledger.release(r)
        server.process.send_signal(signal.SIGSTOP)
        try:
            stalled = await asyncio.gather(*(ledger.reserve(ACME, CONVERT) for _ in range(10)))
        finally:
            server.process.send_signal(signal.SIGCONT)
        assert [r.answer.ok for r in stalled] == [False] * 10  # 503s while stopped
        client = raw_client(server)
        try:
            holds = f"um:{{{ACME}}}:holds:{CONVERT}"

            assert await client.ping()  # Redis runs what it had queued before answering

            async def allowed() -> bool:
                r = await ledger.reserve(ACME, CONVERT)
                if r.answer.ok:
                    await ledger.release(r)
                    return True
                assert r.answer.err is not None, r.answer  # 503 until retry_after; never 402
                return False

            await eventually(allowed, 5)  # well before reservation_ttl (30 s)
            members = [m for m in await client.zrange(holds, 0, -1) if not m.startswith("=")]
            assert len(members) == 1  # only the first, still unsettled, reservation
        finally:
            await client.aclose()


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
