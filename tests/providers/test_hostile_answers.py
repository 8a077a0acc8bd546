"""Providers (and Redis) that answer badly: issue 12 part 4.

Each test drives a real app (UsageMiddleware + @metered) where the fault is on a check or
charge path, against the fakes that answer as /work/shared/reference/*.md says, with the
one fault injected: a Retry-After of decades, a lost answer after the provider counted a
report, a 50 MB answer, NaN and out-of-range numbers, redirects, and a server answering
``+OK`` to every Redis command.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Callable, Iterator
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import httpx
import pytest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route

from tests.support.ares_fake import CLIENT_ID as ARES_CLIENT_ID
from tests.support.ares_fake import FakeAres, FakeClerk
from tests.support.ares_fake import transport as ares_transport
from tests.support.spaire_fake import BASE_URL as SPAIRE_URL
from tests.support.spaire_fake import TOKEN as SPAIRE_TOKEN
from tests.support.spaire_fake import FakeSpaire
from tests.support.tier_fake import FAKE_URL, FakeTier, error_response
from usage_middleware import UsageEvent
from usage_middleware.customers import customer_from_header
from usage_middleware.decorator import metered
from usage_middleware.delivery import Reporter
from usage_middleware.errors import PermanentProviderError, RetryableProviderError
from usage_middleware.middleware import UsageMiddleware
from usage_middleware.outbox import Outbox
from usage_middleware.providers.ares import AresProvider
from usage_middleware.providers.spaire import SpaireProvider
from usage_middleware.providers.tier import TierProvider
from usage_middleware.providers.tokens import ClerkTokenSource

ORG = "org:acme"
FEATURE = "feature:convert"
#: Reporter settings that retry within a test's time (defaults wait seconds).
FAST = {
    "retry_attempts": 3,
    "wait_initial": 0.01,
    "wait_max": 0.05,
    "wait_jitter": 0.01,
    "retry_cooldown": 0.05,
    "poll_interval": 0.05,
    "drain_timeout": 2.0,
}


class FastTier(TierProvider):
    """TierProvider whose outbox Reporter retries fast (test timings)."""

    def make_reporter(self) -> Any:
        assert self.outbox is not None
        return Reporter(self, path=self.outbox, call_timeout=5.0, **FAST)


class FastAres(AresProvider):
    """AresProvider whose outbox Reporter retries fast (test timings)."""

    def make_reporter(self) -> Any:
        assert self.outbox is not None
        return Reporter(self, path=self.outbox, call_timeout=5.0, **FAST)


def app_for(provider: Any, header: str = "x-org", units: int = 1) -> Any:
    @metered(FEATURE, units=units)
    async def convert(request: Request) -> JSONResponse:
        return JSONResponse({"ok": True})

    return UsageMiddleware(
        Starlette(routes=[Route("/convert", convert)]),
        provider=provider,
        customer=customer_from_header(header),
    )


async def get(app: Any, headers: dict[str, str]) -> httpx.Response:
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://app") as http:
        return await http.get("/convert", headers=headers)


async def until(check: Callable[[], Any], seconds: float = 10.0) -> None:
    """Wait (bounded) until ``check()`` (sync or async) is true."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        result = check()
        if asyncio.iscoroutine(result):
            result = await result
        if result:
            return
        await asyncio.sleep(0.02)
    raise AssertionError(f"condition not reached within {seconds}s")


def dead_letters(path: Path) -> list[Any]:
    outbox = Outbox(path, create=False)
    try:
        return outbox.dead_letters()
    finally:
        outbox.close()


def reports(fake: FakeTier) -> int:
    return sum(1 for r in fake.requests if r.path == "/v1/report")


@pytest.fixture
def fake() -> FakeTier:
    tier = FakeTier()
    tier.add_org(ORG, {FEATURE: 100})
    return tier


@pytest.fixture
async def tier(fake: FakeTier, tmp_path: Path) -> AsyncIterator[FastTier]:
    provider = FastTier(FAKE_URL, client=fake.client(), outbox=tmp_path / "outbox.db")
    try:
        yield provider
    finally:
        await provider.aclose()


def too_long(status: int = 429) -> httpx.Response:
    response = error_response(status, "rate_limited", "slow down")
    response.headers["retry-after"] = "999999999"
    return response


# -- a: Retry-After is capped per provider, never passed on raw ----------------------------


async def test_a_decades_long_retry_after_does_not_stop_delivery(
    fake: FakeTier, tmp_path: Path
) -> None:
    """A 429 asking for 999999999 s pauses delivery for at most max_retry_after: the
    served charge reaches Tier within seconds, not decades."""
    fake.inject("/v1/report", too_long())
    provider = FastTier(
        FAKE_URL, client=fake.client(), outbox=tmp_path / "outbox.db", max_retry_after=1.0
    )
    try:
        assert (await get(app_for(provider), {"x-org": ORG})).status_code == 200
        await until(lambda: fake.used(ORG, FEATURE) == 1)
    finally:
        await provider.aclose()
    assert reports(fake) == 2
    assert dead_letters(tmp_path / "outbox.db") == []


@pytest.mark.parametrize(
    "header",
    ["999999999", format_datetime(datetime(2100, 1, 1, tzinfo=UTC), usegmt=True)],
)
async def test_a_503_never_passes_a_providers_retry_after_on_raw(
    fake: FakeTier, tmp_path: Path, header: str
) -> None:
    """A check failing closed on a 429 with a Retry-After of decades (seconds or an HTTP
    date) answers 503 with a Retry-After capped at the provider's max_retry_after."""
    response = error_response(429, "rate_limited", "slow down")
    response.headers["retry-after"] = header
    fake.inject("/v1/limits", response)
    provider = FastTier(
        FAKE_URL,
        client=fake.client(),
        outbox=tmp_path / "outbox.db",
        failure_policy="closed",
        max_retry_after=60.0,
    )
    try:
        answer = await get(app_for(provider), {"x-org": ORG})
    finally:
        await provider.aclose()
    assert answer.status_code == 503
    assert 1 <= int(answer.headers["retry-after"]) <= 60


async def test_rows_an_older_version_held_back_for_decades_are_delivered(
    fake: FakeTier, tmp_path: Path
) -> None:
    """An outbox row whose not_before lies decades ahead (an older version honoured any
    Retry-After) is clamped when read: the upgraded process delivers it."""
    path = tmp_path / "outbox.db"
    store = Outbox(path)
    try:
        event = UsageEvent(ORG, FEATURE, 3)
        owner = store.register(30.0)
        (rowid,) = [store.apply(owner, [(event, True, False)])]
        store.apply(owner, releases=[(rowid, time.time() + 999999999, "429 rate_limited")])
        store.retire(owner, (0, 0, 0, 0))
    finally:
        store.close()
    provider = FastTier(FAKE_URL, client=fake.client(), outbox=path)
    await provider.open()
    try:
        await until(lambda: fake.used(ORG, FEATURE) == 3)
    finally:
        await provider.aclose()


# -- b: an ambiguous failure is resent at most once, then dead-lettered ----------------------


@pytest.mark.parametrize(
    "lost",
    [
        httpx.ReadTimeout("timed out after the report was applied"),
        httpx.RemoteProtocolError("peer closed connection without sending complete message"),
        httpx.ReadError("connection reset by peer"),
    ],
    ids=["read-timeout", "protocol-error", "reset"],
)
async def test_tier_counts_a_charge_whose_answers_are_lost_at_most_twice(
    fake: FakeTier, tier: FastTier, tmp_path: Path, lost: Exception
) -> None:
    """Tier takes the report, then the answer is lost, every time: Tier counts the charge
    at most twice (one resend after a back-off), and it is dead-lettered as "ambiguous"."""
    fake.inject("/v1/report", *[lost] * 8, after=True)
    assert (await get(app_for(tier, units=2), {"x-org": ORG})).status_code == 200

    await until(lambda: dead_letters(tmp_path / "outbox.db"))
    assert fake.used(ORG, FEATURE) == 4  # 2 units, counted twice: never 3-6 times
    assert reports(fake) == 2
    (dead,) = dead_letters(tmp_path / "outbox.db")
    assert (dead.code, dead.event.units) == ("ambiguous", 2)


async def test_tier_one_lost_answer_is_resent_once_after_a_back_off(
    fake: FakeTier, tmp_path: Path
) -> None:
    """One lost answer: the charge is resent once, after the outbox's retry_cooldown
    (not at once), and then delivered: counted twice at worst, never dead-lettered."""
    fake.inject("/v1/report", httpx.ReadTimeout("lost"), after=True)
    sent_at: list[float] = []

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/report":
            sent_at.append(time.monotonic())
        return fake.handle(request)

    class SlowCooldown(TierProvider):
        def make_reporter(self) -> Any:
            assert self.outbox is not None
            options = {**FAST, "retry_cooldown": 0.5}
            return Reporter(self, path=self.outbox, call_timeout=5.0, **options)

    provider = SlowCooldown(
        FAKE_URL,
        client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        outbox=tmp_path / "outbox.db",
    )
    try:
        assert (await get(app_for(provider), {"x-org": ORG})).status_code == 200
        await until(lambda: len(sent_at) >= 2)
        await asyncio.sleep(0.2)  # no third send follows
    finally:
        await provider.aclose()
    assert len(sent_at) == 2
    assert sent_at[1] - sent_at[0] >= 0.5
    assert fake.used(ORG, FEATURE) == 2
    assert dead_letters(tmp_path / "outbox.db") == []


async def test_ares_counts_a_charge_whose_answers_are_lost_at_most_twice(tmp_path: Path) -> None:
    """ARES deducts, then the answer times out, every time: the user pays at most twice and
    the charge is dead-lettered as "ambiguous" for a human to decide."""
    ares = FakeAres()
    uid = ares.add_user(credits=100)
    token = ares.issue_token(uid)
    ares.fail_next("/v1/partner/usage", *["timeout_after_charge"] * 8)
    provider = FastAres(
        client=httpx.AsyncClient(transport=ares_transport(ares, FakeClerk(ares))),
        client_id=ARES_CLIENT_ID,
        outbox=tmp_path / "outbox.db",
    )
    try:
        served = await get(
            app_for(provider, header="x-user", units=3),
            {"x-user": "u1", "authorization": f"Bearer {token}"},
        )
        assert served.status_code == 200
        await until(lambda: dead_letters(tmp_path / "outbox.db"))
    finally:
        await provider.aclose()
    assert ares.charged(uid) == 6  # 3 credits, at most twice
    (dead,) = dead_letters(tmp_path / "outbox.db")
    assert dead.code == "ambiguous"


# -- c: every answer is read as a stream and capped ----------------------------------------


def huge_limits() -> httpx.Response:
    body = {"usage": [{"feature": FEATURE, "used": 0, "limit": 100}], "pad": "x" * (50 << 20)}
    return httpx.Response(200, content=json.dumps(body).encode())


async def test_a_50_mb_check_answer_is_abandoned_as_a_failed_check(
    fake: FakeTier, tmp_path: Path
) -> None:
    """A 50 MB /v1/limits answer is cut off at max_body: a failed check (503 under the
    closed policy), not a balance parsed out of it."""
    fake.inject("/v1/limits", huge_limits())
    provider = FastTier(
        FAKE_URL, client=fake.client(), outbox=tmp_path / "outbox.db", failure_policy="closed"
    )
    try:
        answer = await get(app_for(provider), {"x-org": ORG})
    finally:
        await provider.aclose()
    assert answer.status_code == 503


async def test_an_endless_check_answer_fails_within_the_timeout(
    fake: FakeTier, tmp_path: Path
) -> None:
    """An answer that never ends is abandoned at max_body, well within the check timeout."""

    async def endless() -> AsyncIterator[bytes]:
        yield b'{"usage": [], "pad": "'
        while True:
            yield b"x" * 65536
            await asyncio.sleep(0)

    def handler(request: httpx.Request) -> httpx.Response:
        if request.url.path == "/v1/limits":
            return httpx.Response(200, content=endless())
        return fake.handle(request)

    provider = FastTier(
        FAKE_URL,
        client=httpx.AsyncClient(transport=httpx.MockTransport(handler)),
        outbox=tmp_path / "outbox.db",
        failure_policy="closed",
        timeout=30.0,
    )
    started = time.monotonic()
    try:
        answer = await get(app_for(provider), {"x-org": ORG})
    finally:
        await provider.aclose()
    assert answer.status_code == 503
    assert time.monotonic() - started < 10.0


async def test_a_huge_clerk_answer_fails_the_token_look_up() -> None:
    """Clerk's token look-up reads at most max_body bytes; a longer answer is a retryable
    failure, not a token."""
    body = [{"token": "t0k3n", "expires_at": 4102444800, "pad": "x" * (4 << 20)}]

    def handler(request: httpx.Request) -> httpx.Response:
        return httpx.Response(200, content=json.dumps(body).encode())

    source = ClerkTokenSource(
        secret_key="sk_test", client=httpx.AsyncClient(transport=httpx.MockTransport(handler))
    )
    with pytest.raises(RetryableProviderError) as info:
        await source.get("user_1")
    assert info.value.code == "response_too_large"


# -- d: numbers outside their documented types and ranges fail the check --------------------


@pytest.fixture
def spaire_fake() -> FakeSpaire:
    fake = FakeSpaire()
    fake.meter_id = fake.add_meter("API units")  # type: ignore[attr-defined]
    fake.set_available(ORG, fake.meter_id, 50)  # type: ignore[attr-defined]
    return fake


@pytest.mark.parametrize("value", [float("nan"), float("inf"), True, "12"])
async def test_spaire_non_numeric_balance_is_a_failed_check_not_a_refusal(
    spaire_fake: FakeSpaire, tmp_path: Path, value: Any
) -> None:
    """A balance of NaN, Infinity, a bool or a string is a failed check under the failure
    policy (503 when closed, served when open), never a 402 the customer did not earn."""

    def handler(request: httpx.Request) -> httpx.Response:
        response = spaire_fake.handler(request)
        if request.url.path.endswith("/state"):
            data = json.loads(response.content)
            for meter in data["active_meters"]:
                meter["balance"] = value
            return httpx.Response(200, content=json.dumps(data).encode(), headers=response.headers)
        return response

    for policy, expected in (("closed", 503), ("open", 200)):
        provider = SpaireProvider(
            SPAIRE_TOKEN,
            client=httpx.AsyncClient(base_url=SPAIRE_URL, transport=httpx.MockTransport(handler)),
            meter_id=spaire_fake.meter_id,  # type: ignore[attr-defined]
            outbox=tmp_path / f"outbox-{policy}.db",
            email_domain="mail.acme-billing.io",
            failure_policy=policy,  # type: ignore[arg-type]
            drain_timeout=1.0,  # (a closed-policy Spaire provider idles out its drain)
        )
        try:
            answer = await get(app_for(provider), {"x-org": ORG})
        finally:
            await provider.aclose()
        assert answer.status_code == expected, (policy, answer.text)


@pytest.mark.parametrize(
    "line",
    [
        {"used": -5, "limit": 10},
        {"used": 0, "limit": 99999999999999999999999},
        {"used": 0, "limit": -1},
    ],
)
async def test_tier_numbers_out_of_range_are_a_failed_check(
    fake: FakeTier, tmp_path: Path, line: dict[str, int]
) -> None:
    """A Tier usage line with used or limit outside 0..2**63-1 is a failed check (503 when
    closed), never a balance (the customer served as unlimited or refused)."""
    body = {"usage": [{"feature": FEATURE + "@plan:test@1", **line}]}
    fake.inject("/v1/limits", httpx.Response(200, content=json.dumps(body).encode()))
    provider = FastTier(
        FAKE_URL, client=fake.client(), outbox=tmp_path / "outbox.db", failure_policy="closed"
    )
    try:
        answer = await get(app_for(provider), {"x-org": ORG})
    finally:
        await provider.aclose()
    assert answer.status_code == 503


# -- e: one classification: 3xx is retryable, ARES 404 too, one timeout per check -----------


async def test_a_redirect_keeps_the_charge_for_later(
    fake: FakeTier, tier: FastTier, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A 302 to a report (a misconfigured base URL) is retryable, logged as an error
    naming the base URL; the charge is delivered once the URL answers, never dead-lettered."""
    redirect = httpx.Response(302, headers={"location": "https://elsewhere.example/v1/report"})
    fake.inject("/v1/report", redirect, redirect)
    assert (await get(app_for(tier), {"x-org": ORG})).status_code == 200
    await until(lambda: fake.used(ORG, FEATURE) == 1)
    assert dead_letters(tmp_path / "outbox.db") == []
    assert any(FAKE_URL in r.getMessage() and r.levelname == "ERROR" for r in caplog.records)


async def test_ares_routing_404_and_redirect_are_retried_not_dead_lettered(tmp_path: Path) -> None:
    """ARES answering a usage POST with a 404 or a 301 (wrong base URL) keeps the charge;
    it is delivered once ARES answers, never dead-lettered."""
    ares = FakeAres()
    uid = ares.add_user(credits=100)
    token = ares.issue_token(uid)
    ares.fail_next("/v1/partner/usage", 404, 301)
    provider = FastAres(
        client=httpx.AsyncClient(transport=ares_transport(ares, FakeClerk(ares))),
        client_id=ARES_CLIENT_ID,
        outbox=tmp_path / "outbox.db",
    )
    try:
        served = await get(
            app_for(provider, header="x-user", units=3),
            {"x-user": "u1", "authorization": f"Bearer {token}"},
        )
        assert served.status_code == 200
        await until(lambda: ares.charged(uid) == 3)
    finally:
        await provider.aclose()
    assert dead_letters(tmp_path / "outbox.db") == []


async def test_ares_check_of_a_new_token_takes_one_timeout(tmp_path: Path) -> None:
    """ARES hanging: a request with a new token fails its check after one timeout, not
    one for the token check and another for the balance read."""
    ares = FakeAres()
    uid = ares.add_user(credits=100)
    token = ares.issue_token(uid)
    inner = ares_transport(ares, FakeClerk(ares))

    class Hanging(httpx.AsyncBaseTransport):
        async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
            if request.url.path == "/v1/user":
                await asyncio.sleep(30)
            return await inner.handle_async_request(request)

    provider = FastAres(
        client=httpx.AsyncClient(transport=Hanging()),
        client_id=ARES_CLIENT_ID,
        outbox=tmp_path / "outbox.db",
        timeout=0.6,
        failure_policy="closed",
    )
    try:
        started = time.monotonic()
        answer = await get(
            app_for(provider, header="x-user"),
            {"x-user": "u1", "authorization": f"Bearer {token}"},
        )
        elapsed = time.monotonic() - started
    finally:
        await provider.aclose()
    assert answer.status_code == 503
    assert elapsed < 1.1  # one 0.6 s timeout (two made it 1.2 s and more)


# -- f: Redis answering with the wrong shape -----------------------------------------------


class OkServer:
    """A loopback TCP server speaking RESP that answers ``+OK`` to every command (a proxy
    or a wrong server in Redis's place)."""

    def __init__(self) -> None:
        self.commands = 0
        self._server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self._server is not None
        port = self._server.sockets[0].getsockname()[1]
        return f"redis://127.0.0.1:{port}/0"

    async def __aenter__(self) -> OkServer:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._server is not None
        self._server.close()
        await self._server.wait_closed()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                line = await reader.readline()
                if not line:
                    break
                if line.startswith(b"*"):  # an array of bulk strings: read its items
                    for _ in range(int(line[1:])):
                        size = int((await reader.readline())[1:])
                        await reader.readexactly(size + 2)
                self.commands += 1
                writer.write(b"+OK\r\n")
                await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()


@pytest.fixture
def redis_server(tmp_path: Path) -> Iterator[Any]:
    from tests.support.redis_server import RedisServer

    made = RedisServer(tmp_path / "redis")
    made.start()
    try:
        yield made
    finally:
        made.stop()


REDIS_PRICING = {"plans": {"plan:free@1": {"features": {FEATURE: {"tiers": [{"upto": 10}]}}}}}


@pytest.mark.redis
async def test_redis_answering_ok_to_everything_spools_the_charge(
    redis_server: Any, tmp_path: Path
) -> None:
    """A server answering +OK in Redis's place: under failure_policy="open" the request is
    served (not 503), its charge is spooled, and charged once a real Redis answers."""
    from usage_middleware.ledger.redis import RedisLedger

    spool = tmp_path / "spool.db"
    options = {"spool": spool, "spool_options": FAST, "pricing": REDIS_PRICING}
    async with OkServer() as ok:
        wrong = RedisLedger(ok.url, failure_policy="open", **options)  # type: ignore[arg-type]
        await wrong.open()
        try:
            served = await get(app_for(wrong), {"x-org": ORG})
            assert served.status_code == 200
            assert wrong.spool is not None
            await wrong.spool.flush()
            assert (await wrong.spool.outbox_status()).depth == 1  # kept, not lost
            # The reservation answered by +OK, committed directly: spooled, never raised.
            reservation = await wrong.reserve(ORG, FEATURE, 2)
            assert reservation.answer.ok and reservation.answer.err is not None
        finally:
            await wrong.aclose()
        assert ok.commands > 0

    admin = RedisLedger(redis_server.url, pricing=REDIS_PRICING, spool=None)
    await admin.open()
    try:
        await admin.subscribe(ORG, "plan:free@1")  # before the spool delivers
    finally:
        await admin.aclose()
    right = RedisLedger(redis_server.url, failure_policy="closed", **options)  # type: ignore[arg-type]
    await right.open()
    try:

        async def charged() -> bool:
            rows = await right.usage(ORG)
            return next((r.used for r in rows if r.feature == FEATURE), 0) == 1

        await until(charged, 15.0)
    finally:
        await right.aclose()


@pytest.mark.redis
async def test_redis_ok_reply_to_a_commit_is_spooled_not_raised(
    redis_server: Any, tmp_path: Path
) -> None:
    """A reservation held on a real Redis, committed while a wrong server answers +OK: the
    commit spools it (no exception, no lost charge); a real Redis later charges it once."""
    from usage_middleware.ledger.redis import RedisLedger

    spool = tmp_path / "spool.db"
    options = {"spool": spool, "spool_options": FAST, "pricing": REDIS_PRICING}
    right = RedisLedger(redis_server.url, failure_policy="closed", **options)  # type: ignore[arg-type]
    await right.open()
    try:
        await right.subscribe(ORG, "plan:free@1")
        reservation = await right.reserve(ORG, FEATURE, 4)
        assert reservation.answer.ok
        async with OkServer() as ok:
            wrong = RedisLedger(ok.url, failure_policy="closed", **options)  # type: ignore[arg-type]
            await wrong.open()
            try:
                await wrong.commit(reservation)  # must not raise
                await wrong.flush()  # its group commit (the lease engine's, after commit)
                assert wrong.spool is not None
                await wrong.spool.flush()
                assert (await wrong.spool.outbox_status()).depth == 1
            finally:
                await wrong.aclose()

        async def charged() -> bool:
            rows = await right.usage(ORG)
            return next((r.used for r in rows if r.feature == FEATURE), 0) == 4

        await until(charged, 15.0)
    finally:
        await right.aclose()


# -- the shared helper's rules, directly ---------------------------------------------------


@pytest.mark.parametrize(
    ("header", "expected"),
    [
        ("7", 7.0),
        ("999999999", 300.0),
        ("-5", None),
        ("nan", None),
        ("inf", None),
        ("soon", None),
        (format_datetime(datetime(2100, 1, 1, tzinfo=UTC), usegmt=True), 300.0),
        (format_datetime(datetime(2000, 1, 1, tzinfo=UTC), usegmt=True), 0.0),
    ],
)
def test_retry_after_is_capped_and_garbage_ignored(header: str, expected: float | None) -> None:
    """Retry-After: seconds or an HTTP date, capped (default 300 s); negative, NaN,
    infinite or unreadable values are ignored (None)."""
    from usage_middleware.providers._http import retry_after

    response = httpx.Response(429, headers={"retry-after": header})
    assert retry_after(response, 300.0) == expected


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (302, True),
        (400, False),
        (401, False),
        (403, False),
        (404, True),
        (408, True),
        (422, False),
        (425, True),
        (429, True),
        (500, True),
        (503, True),
    ],
)
def test_status_error_applies_the_one_classification(status: int, retryable: bool) -> None:
    """Every provider's non-2xx answer becomes a typed error by one rule: 3xx (a wrong base
    URL), routing 404, 408, 425, 429 and 5xx retry; 401/403 and other 4xx are permanent;
    Retry-After is read (capped), and a provider's own decision (retry=) wins."""
    from usage_middleware.providers._http import status_error

    request = httpx.Request("GET", "http://billing.test/x")
    response = httpx.Response(status, headers={"retry-after": "999"}, request=request)
    err = status_error(response, "X /x", "http://billing.test", message="m", cap=60.0)
    assert isinstance(err, RetryableProviderError) is retryable
    assert isinstance(err, PermanentProviderError) is not retryable
    assert (err.status, err.retry_after) == (status, 60.0)
    own = status_error(response, "X /x", "http://billing.test", message="m", retry=False)
    if status >= 400:
        assert isinstance(own, PermanentProviderError)


@pytest.mark.parametrize("text", ["NaN", "Infinity", "-Infinity", '{"balance": NaN}'])
def test_strict_json_refuses_nan_and_infinity(text: str) -> None:
    """The providers' JSON parser refuses NaN and Infinity (Python's json accepts them)."""
    from usage_middleware.providers._http import loads

    with pytest.raises(ValueError, match="not a JSON number"):
        loads(text)
