"""Remote providers count exactly what the provider had not counted (issue 12.1-12.3, 11.3).

Each provider runs behind a real app (UsageMiddleware + @metered) against its fake, which
answers as ``/work/shared/reference/`` says: Tier and ARES count a report as it returns,
Spaire's balance lags (``delay`` on the fake's clock) and answers duplicates by count.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import subprocess
import sys
import time
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

from tests.support.ares_fake import CLIENT_ID, FakeAres, transport
from tests.support.contract_fake_remote import FakeRemote
from tests.support.spaire_fake import BASE_URL, TOKEN, FakeSpaire
from tests.support.tier_fake import FAKE_URL, FakeTier
from tests.support.uvicorn_server import serve
from usage_middleware import UsageEvent
from usage_middleware.customers import customer_from_header
from usage_middleware.decorator import metered
from usage_middleware.delivery import Reporter
from usage_middleware.middleware import UsageMiddleware
from usage_middleware.outbox import Outbox
from usage_middleware.provider import Provider
from usage_middleware.providers.ares import AresProvider
from usage_middleware.providers.remote import RemoteProvider
from usage_middleware.providers.spaire import SpaireProvider
from usage_middleware.providers.tier import TierProvider

ORG = "org:acme"
FEATURE = "feature:x"
DOMAIN = "mail.acme-billing.io"


def make_app(provider: Provider, gate: asyncio.Event | None = None) -> Starlette:
    """Routes /one (1 unit), /six (6 units) and /stream (1 unit; after its first line it
    waits for ``gate`` when given)."""

    @metered(FEATURE)
    async def one(request: Request) -> Response:
        return JSONResponse({"ok": True})

    @metered(FEATURE, units=6)
    async def six(request: Request) -> Response:
        return JSONResponse({"ok": True})

    @metered(FEATURE)
    async def stream(request: Request) -> Response:
        async def lines() -> AsyncIterator[bytes]:
            for i in range(12):
                yield b"line %d\n" % i
                if i == 0 and gate is not None:
                    await gate.wait()  # the test decides when the stream may end
                await asyncio.sleep(0.01)

        return StreamingResponse(lines(), media_type="text/plain")

    return Starlette(
        routes=[Route("/one", one), Route("/six", six), Route("/stream", stream)],
        middleware=[
            Middleware(UsageMiddleware, provider=provider, customer=customer_from_header("X-C"))
        ],
    )


@contextlib.asynccontextmanager
async def client_for(provider: RemoteProvider) -> AsyncIterator[httpx.AsyncClient]:
    await provider.open()
    try:
        async with httpx.AsyncClient(
            transport=httpx.ASGITransport(app=make_app(provider)), base_url="http://app"
        ) as http:
            yield http
    finally:
        await provider.aclose()


async def until(predicate: Callable[[], bool], within: float = 10.0) -> None:
    """Wait (bounded) until ``predicate()`` is true."""
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached in time"
        await asyncio.sleep(0.01)


# -- 12.1: a fresh read is not reduced by charges the provider already counts -------------


async def test_tier_refresh_does_not_subtract_delivered_charges_again() -> None:
    """Tier, 12 allowed, every check a fresh read: all 12 are served, the 13th gets a 402
    saying used 12, remaining 0 (not used 18 at 9 delivered)."""
    fake = FakeTier()
    fake.set_line(ORG, FEATURE, limit=12)
    provider = TierProvider(FAKE_URL, client=fake.client(), outbox=None, cache_ttl=0, deny_ttl=0)
    statuses = []
    async with client_for(provider) as http:
        for _ in range(12):
            statuses.append((await http.get("/one", headers={"X-C": ORG})).status_code)
            assert await provider.flush()
        refused = await http.get("/one", headers={"X-C": ORG})
    assert statuses == [200] * 12
    assert refused.status_code == 402
    body = refused.json()
    assert (body["limit"], body["used"], body["remaining"]) == (12, 12, 0)
    assert fake.used(ORG, FEATURE) == 12


async def test_tier_cache_expiry_after_nine_of_twelve_leaves_three() -> None:
    """The issue's case: 9 of 12 used, the cached answer expires, /v1/limits is read again:
    3 more are served (no false 402), then 402 with used 12."""
    fake = FakeTier()
    fake.set_line(ORG, FEATURE, limit=12)
    provider = TierProvider(
        FAKE_URL, client=fake.client(), outbox=None, cache_ttl=0.2, deny_ttl=0.2
    )
    async with client_for(provider) as http:
        first = [(await http.get("/one", headers={"X-C": ORG})).status_code for _ in range(9)]
        assert await provider.flush()
        await asyncio.sleep(0.25)  # the cached answer expires
        rest = [(await http.get("/one", headers={"X-C": ORG})).status_code for _ in range(3)]
        assert await provider.flush()
        await asyncio.sleep(0.25)
        refused = await http.get("/one", headers={"X-C": ORG})
    assert first == [200] * 9 and rest == [200] * 3
    assert refused.status_code == 402 and refused.json()["used"] == 12
    assert fake.used(ORG, FEATURE) == 12


async def test_ares_refresh_does_not_subtract_delivered_charges_again() -> None:
    """ARES deducts on the POST: with 12 credits and fresh reads, 12 requests are served."""
    ares = FakeAres()
    uid = ares.add_user(credits=12)
    token = ares.issue_token(uid)
    provider = AresProvider(
        client=httpx.AsyncClient(transport=transport(ares)),
        client_id=CLIENT_ID,
        outbox=None,
        cache_ttl=0,
        deny_ttl=0,
    )
    headers = {"X-C": "user-1", "Authorization": f"Bearer {token}"}
    statuses = []
    async with client_for(provider) as http:
        for _ in range(13):
            statuses.append((await http.get("/one", headers=headers)).status_code)
            assert await provider.flush()
    assert statuses == [200] * 12 + [402]
    assert ares.credits(uid) == 0


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class LaggingRemote(FakeRemote):
    """A provider whose numbers include a delivered charge 60 s after its delivery."""

    balance_lag = 60.0


async def test_lagging_provider_stops_subtracting_each_charge_once_it_is_reflected() -> None:
    """balance_lag 60: at t=61 the charge delivered at t=0 is in the provider's numbers and
    no longer subtracted, while the one delivered at t=5 still is (charges are not lumped)."""
    clock = Clock()
    provider = LaggingRemote(clock=clock, cache_ttl=0, deny_ttl=0)
    provider.balances[ORG, FEATURE] = 10
    provider.reflect = False
    await provider.open()
    try:
        for units, at in ((2, 1000.0), (3, 1005.0)):
            clock.now = at
            held = await provider.reserve(ORG, FEATURE, units)
            await provider.commit(held)
            assert await provider.flush()
        clock.now = 1061.0
        provider.balances[ORG, FEATURE] = 8  # the provider shows the first charge
        assert (await provider.can(ORG, FEATURE)).remaining == 5
        clock.now = 1066.0
        provider.balances[ORG, FEATURE] = 5
        assert (await provider.can(ORG, FEATURE)).remaining == 5
    finally:
        await provider.aclose()


# -- 12.2: Spaire duplicates are not new usage ---------------------------------------------


def spaire(fake: FakeSpaire, **kwargs: Any) -> SpaireProvider:
    options: dict[str, Any] = {
        "meter_id": fake.meter_id,  # type: ignore[attr-defined]
        "client": fake.client(BASE_URL),
        "outbox": None,
        "email_domain": DOMAIN,
        "cache_ttl": 0,
        "deny_ttl": 0,
        "clock": fake.clock,
    }
    options.update(kwargs)
    return SpaireProvider(TOKEN, **options)


@pytest.fixture
def fake() -> Any:
    f = FakeSpaire()
    f.meter_id = f.add_meter("API units")  # type: ignore[attr-defined]
    yield f
    assert f.violations == [], f.violations


async def test_spaire_replayed_grant_is_granted_once(fake: FakeSpaire) -> None:
    """grant(customer, 10, key) twice (a replayed webhook): Spaire holds 10 credits and the
    app serves exactly 10 before its balance updates, not 20."""
    provider = spaire(fake)
    async with client_for(provider) as http:
        assert await provider.grant(ORG, 10, idempotency_key="grant-k") == "grant-k"
        await provider.grant(ORG, 10, idempotency_key="grant-k")
        statuses = []
        for _ in range(12):
            statuses.append((await http.get("/one", headers={"X-C": ORG})).status_code)
            assert await provider.flush()
    assert statuses == [200] * 10 + [402] * 2
    assert fake.charged(ORG, fake.meter_id) == 10  # type: ignore[attr-defined]


async def test_spaire_charge_replayed_after_restart_is_not_subtracted_again(
    fake: FakeSpaire, tmp_path: Path
) -> None:
    """A charge delivered (its answer lost), reflected in the balance, then replayed from
    the outbox by the next process and answered as a duplicate: not subtracted again."""
    meter = fake.meter_id  # type: ignore[attr-defined]
    fake.add_customer(ORG, f"acme@{DOMAIN}")
    fake.credit(ORG, meter, 10)
    charge = UsageEvent(ORG, FEATURE, 4)
    first = spaire(fake)
    await first.open()
    await first.report([charge])  # Spaire stored it; say the process died before deleting
    await first.aclose()
    fake.clock.advance(fake.delay + 1)
    assert fake.balance(ORG, meter) == 6
    outbox = Outbox(tmp_path / "outbox.db")
    outbox.apply(0, [(charge, False, False)])  # the row the dead process left
    outbox.close()
    provider = spaire(fake, outbox=tmp_path / "outbox.db")
    async with client_for(provider) as http:
        await until(lambda: len(fake.ingest_bodies) == 2)
        reporter: Any = provider.reporter
        await until(lambda: reporter.stats().sent == 1)
        served = await http.get("/six", headers={"X-C": ORG})
    assert served.status_code == 200, served.text
    assert fake.charged(ORG, meter) == 10


async def test_spaire_mixed_answer_assumes_the_smallest_events_were_duplicates(
    fake: FakeSpaire,
) -> None:
    """A batch answered '1 inserted, 1 duplicate' keeps the larger event as unreflected
    usage (never less than Spaire inserted): here exactly the new 5 units."""
    meter = fake.meter_id  # type: ignore[attr-defined]
    fake.add_customer(ORG, f"acme@{DOMAIN}")
    fake.credit(ORG, meter, 20)
    old = UsageEvent(ORG, FEATURE, 1)
    first = spaire(fake)
    await first.open()
    await first.report([old])
    await first.aclose()
    fake.clock.advance(fake.delay + 1)
    assert fake.balance(ORG, meter) == 19
    provider = spaire(fake)
    await provider.open()
    try:
        await provider.report([UsageEvent(ORG, FEATURE, 5), old])
        assert fake.ingest_bodies[-1]["events"][1]["external_id"] == old.idempotency_key
        assert (await provider.can(ORG, FEATURE)).remaining == 14
    finally:
        await provider.aclose()


async def test_spaire_duplicate_of_a_lost_attempt_still_counts(fake: FakeSpaire) -> None:
    """A charge whose ingest answer was lost, resent and answered as a duplicate, is still
    subtracted until the balance shows it (the lost attempt stored it)."""
    meter = fake.meter_id  # type: ignore[attr-defined]
    fake.add_customer(ORG, f"acme@{DOMAIN}")
    fake.credit(ORG, meter, 10)
    fake.lose_response(path="/v1/events/ingest")
    provider = spaire(fake)
    await provider.open()
    try:
        charge = UsageEvent(ORG, FEATURE, 4)
        with pytest.raises(Exception):  # noqa: B017 - the lost answer, as the client sees it
            await provider.report([charge])
        await provider.report([charge])
        assert fake.ingest_bodies[0] == fake.ingest_bodies[1]
        assert (await provider.can(ORG, FEATURE)).remaining == 6
    finally:
        await provider.aclose()


# -- 12.3: an id Spaire cannot route; events that cannot be delivered ---------------------


async def test_spaire_customer_id_with_slash_is_refused_not_served_free(
    fake: FakeSpaire, tmp_path: Path
) -> None:
    """A customer id with '/' gets a 402 naming the reason (never served uncharged), and a
    charge for it is dead-lettered at once with that reason, not retried forever."""
    provider = spaire(fake, outbox=tmp_path / "outbox.db")
    async with client_for(provider) as http:
        refused = await http.get("/one", headers={"X-C": "team/a"})
        reporter: Any = provider.reporter
        reporter.enqueue(UsageEvent("team/a", FEATURE, 1))
        await until(lambda: reporter.stats().dead_lettered == 1)
    assert refused.status_code == 402
    assert "'/'" in refused.json()["reason"]
    outbox = Outbox(tmp_path / "outbox.db", create=False)
    try:
        (dead,) = outbox.dead_letters()
        assert outbox.status().depth == 0
    finally:
        outbox.close()
    assert dead.code == "customer_id_unsupported"
    assert not [r for r in fake.requests if b"%2F" in r.url.raw_path]


async def test_a_charge_failing_retryably_past_max_retry_age_is_dead_lettered(
    fake: FakeSpaire, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """Retryable failures (a wrong base URL: route 404) keep a charge at most max_retry_age:
    then it is dead-lettered with the last error, logged, and `outbox retry` replays it."""
    path = tmp_path / "outbox.db"
    provider = spaire(fake, client=fake.client(BASE_URL + "/api"))
    await provider.open()
    reporter = Reporter(
        provider,
        path=path,
        max_retry_age=0.5,
        retry_attempts=1,
        retry_cooldown=0.05,
        wait_initial=0.01,
        wait_max=0.01,
        wait_jitter=0,
        poll_interval=0.05,
        drain_timeout=0.1,
    )
    caplog.set_level(logging.WARNING, logger="usage_middleware.reporter")
    await reporter.open()
    try:
        charge = UsageEvent(ORG, FEATURE, 3)
        reporter.enqueue(charge)
        await until(lambda: reporter.stats().dead_lettered == 1)
    finally:
        await reporter.aclose()
        await provider.aclose()
    outbox = Outbox(path, create=False)
    try:
        (dead,) = outbox.dead_letters()
        assert outbox.status().depth == 0
        assert dead.event.idempotency_key == charge.idempotency_key
        assert dead.code == "retry_age_exceeded" and dead.status == 404
        assert "check base_url" in (dead.message or "")
        assert outbox.retry_dead() == 1  # replayable; the bound starts again
        assert outbox.status(max_age=0.5).overdue == 0
    finally:
        outbox.close()
    assert "retry_age_exceeded" in caplog.text


def test_outbox_status_shows_events_past_the_retry_bound(tmp_path: Path) -> None:
    """`outbox status` counts undelivered events older than --max-retry-age (default 3 d)."""
    path = tmp_path / "outbox.db"
    outbox = Outbox(path)
    outbox.apply(0, [(UsageEvent(ORG, FEATURE, 1), False, False)])
    outbox.close()
    time.sleep(0.05)

    def status(*extra: str) -> str:
        argv = [sys.executable, "-m", "usage_middleware.cli.outbox", "outbox", "status"]
        done = subprocess.run(
            [*argv, "--outbox", str(path), *extra],
            capture_output=True,
            text=True,
            timeout=60,
            env={**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])},
            check=True,
        )
        return done.stdout

    assert "past max_retry_age (0.01s) 1" in status("--max-retry-age", "0.01")
    assert "past max_retry_age (259200s) 0" in status()


async def test_in_memory_delivery_drops_a_charge_past_max_retry_age(
    fake: FakeSpaire, caplog: pytest.LogCaptureFixture
) -> None:
    """outbox=None: a charge failing retryably longer than max_retry_age is dead-lettered
    (in memory) and logged, so the queue does not keep it (and retry it) forever."""
    provider = spaire(fake, client=fake.client(BASE_URL + "/api"), max_retry_age=0.3)
    await provider.open()
    try:
        delivery: Any = provider._delivery
        delivery.enqueue(UsageEvent(ORG, FEATURE, 2))
        assert await provider.flush(5.0)
        assert delivery.stats().dead_lettered == 1
    finally:
        await provider.aclose()
    assert "max_retry_age" in caplog.text


# -- 11.3: a hold lives as long as its request ---------------------------------------------


@pytest.mark.slow
async def test_a_stream_longer_than_every_ttl_keeps_its_hold_over_uvicorn() -> None:
    """Tier, limit 1, short TTLs: while a stream holds the unit, a concurrent request (after
    every cached answer expired) gets 402; the stream is charged once."""
    fake = FakeTier()
    fake.set_line(ORG, FEATURE, limit=1)
    provider = TierProvider(
        FAKE_URL, client=fake.client(), outbox=None, cache_ttl=0.05, deny_ttl=0.05
    )
    gate = asyncio.Event()
    async with (
        serve(make_app(provider, gate)) as url,
        httpx.AsyncClient(base_url=url, timeout=10) as http,
    ):
        async with http.stream("GET", "/stream", headers={"X-C": ORG}) as streaming:
            assert streaming.status_code == 200
            lines = streaming.aiter_lines()
            assert await anext(lines) == "line 0"
            try:
                await asyncio.sleep(0.2)  # past cache_ttl and deny_ttl
                during = await http.get("/one", headers={"X-C": ORG})
            finally:
                gate.set()
            rest = [line async for line in lines]
        assert len(rest) == 11
        assert await provider.flush()
        after = await http.get("/one", headers={"X-C": ORG})
    assert during.status_code == 402
    assert after.status_code == 402
    assert fake.used(ORG, FEATURE) == 1
