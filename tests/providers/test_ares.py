"""AresProvider against in-process fakes of ARES and Clerk (support/ares_fake.py, per ares.md)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import pytest
from asgiref.typing import HTTPScope

from tests.support.ares_fake import (
    ARES_URL,
    CLERK_SECRET,
    CLIENT_ID,
    INSUFFICIENT_STATUS,
    FakeAres,
    FakeClerk,
    transport,
)
from usage_middleware import UsageEvent
from usage_middleware.errors import (
    ConfigurationError,
    PermanentProviderError,
    RetryableProviderError,
)
from usage_middleware.outbox import Outbox
from usage_middleware.providers.ares import (
    AresProvider,
    AresTokenError,
    InsufficientCreditsError,
)
from usage_middleware.providers.tokens import CallableTokenSource, ClerkTokenSource


@dataclass
class World:
    ares: FakeAres
    clerk: FakeClerk

    def client(self) -> httpx.AsyncClient:
        return httpx.AsyncClient(transport=transport(self.ares, self.clerk))

    def provider(self, **kwargs: Any) -> AresProvider:
        kwargs.setdefault("outbox", None)
        kwargs.setdefault("client_id", CLIENT_ID)
        return AresProvider(client=self.client(), **kwargs)

    def clerk_source(self, **kwargs: Any) -> ClerkTokenSource:
        return ClerkTokenSource(secret_key=CLERK_SECRET, client=self.client(), **kwargs)

    def user(self, credits: float) -> tuple[str, str]:
        """A new ARES user with ``credits``: (user id, a valid token)."""
        uid = self.ares.add_user(credits=credits)
        return uid, self.ares.issue_token(uid)

    def gets(self) -> list[httpx.Request]:
        return [r for r in self.ares.requests if r.url.path == "/v1/user"]


@pytest.fixture
def world() -> World:
    ares = FakeAres()
    return World(ares, FakeClerk(ares))


def bearer(token: str | None) -> HTTPScope:
    headers = [] if token is None else [(b"authorization", f"Bearer {token}".encode())]
    scope: dict[str, Any] = {"type": "http", "method": "GET", "path": "/", "headers": headers}
    return scope  # type: ignore[return-value]


@pytest.fixture
async def opened(world: World) -> AsyncIterator[list[AresProvider]]:
    """Providers appended here are closed after the test."""
    providers: list[AresProvider] = []
    yield providers
    for provider in providers:
        await provider.aclose()


async def start(opened: list[AresProvider], provider: AresProvider) -> AresProvider:
    await provider.open()
    opened.append(provider)
    return provider


# -- configuration -------------------------------------------------------------------------


def test_configuration_errors(monkeypatch: pytest.MonkeyPatch) -> None:
    """No client id, a bad price, a bad charge mode or feature_ttl are ConfigurationErrors."""
    monkeypatch.delenv("ARES_CLIENT_ID", raising=False)
    with pytest.raises(ConfigurationError, match="ARES_CLIENT_ID"):
        AresProvider(outbox=None)
    monkeypatch.setenv("ARES_CLIENT_ID", "from-env")
    assert AresProvider(outbox=None).client_id == "from-env"
    for bad in (0, -1, "x", 0.0001, True):
        with pytest.raises(ConfigurationError):
            AresProvider(outbox=None, prices={"feature:a": bad})
    with pytest.raises(ConfigurationError):
        AresProvider(outbox=None, charge="during")  # type: ignore[arg-type]
    with pytest.raises(ConfigurationError, match="cache_ttl"):
        AresProvider(outbox=None, feature_ttl={"feature:a": 0})


def test_credits_and_descriptions() -> None:
    """credits = units * price (an int when whole); usage defaults to the feature name."""
    provider = AresProvider(
        outbox=None,
        client_id="c",
        prices={"feature:video": 5, "feature:token": "0.5"},
        descriptions={"feature:video": "video generation"},
    )
    assert provider.credits_for("feature:video", 3) == 15
    assert isinstance(provider.credits_for("feature:video", 3), int)
    assert provider.credits_for("feature:token", 3) == 1.5
    assert provider.credits_for("feature:other", 2) == 2
    assert provider.description("feature:video") == "video generation"
    assert provider.description("feature:other") == "feature:other"


# -- can(): GET /v1/user ------------------------------------------------------------------


@pytest.mark.parametrize("shape", ["nested", "top"])
async def test_can_reads_nested_or_top_level_credits(
    world: World, opened: list[AresProvider], shape: str
) -> None:
    """Credits under "user" and at the top level both give remaining = credits / price."""
    world.ares.shape = shape  # type: ignore[assignment]
    provider = await start(opened, world.provider(prices={"feature:img": 3}))
    _, token = world.user(credits=10)
    answer = await provider.can("u1", "feature:img", 3, scope=bearer(token))
    assert answer.ok and answer.err is None
    assert answer.remaining == 3  # floor(10 / 3)
    assert (answer.customer, answer.feature, answer.units) == ("u1", "feature:img", 3)
    request = world.gets()[-1]
    assert str(request.url) == f"{ARES_URL}/v1/user"
    assert request.headers["authorization"] == f"Bearer {token}"


async def test_too_few_credits_is_a_402_answer(world: World, opened: list[AresProvider]) -> None:
    """A user whose credits do not cover units * price gets ok False, err None, a reason."""
    provider = await start(opened, world.provider(prices={"feature:video": 5}))
    _, token = world.user(credits=12)
    reservation = await provider.reserve("u1", "feature:video", 3, scope=bearer(token))
    answer = reservation.answer
    assert answer.ok is False and answer.err is None
    assert answer.remaining == 2
    assert answer.reason is not None and "15 credit" in answer.reason
    await provider.release(reservation)


async def test_price_per_feature_shares_one_wallet(
    world: World, opened: list[AresProvider]
) -> None:
    """Holds on one feature reduce what another feature may use: one balance per user."""
    provider = await start(opened, world.provider(prices={"feature:a": 1, "feature:b": 4}))
    _, token = world.user(credits=10)
    scope = bearer(token)
    a = await provider.reserve("u1", "feature:a", 6, scope=scope)
    assert a.answer.ok
    b = await provider.reserve("u1", "feature:b", 2, scope=scope)  # 8 credits > 4 left
    assert not b.answer.ok and b.answer.err is None
    assert b.answer.remaining == 1
    b1 = await provider.reserve("u1", "feature:b", 1, scope=scope)
    assert b1.answer.ok
    await provider.release(a)
    await provider.release(b1)


@pytest.mark.parametrize("malformed", ["not-json", "no-credits", "credits-string"])
async def test_malformed_user_body_follows_the_failure_policy(
    world: World, opened: list[AresProvider], malformed: str
) -> None:
    """Non-JSON, or missing/non-numeric credits, is a provider error: open serves, closed 503."""
    world.ares.malformed = malformed  # type: ignore[assignment]
    _, token = world.user(credits=10)
    open_ = await start(opened, world.provider())
    answer = (await open_.reserve("u1", "feature:a", 1, scope=bearer(token))).answer
    assert answer.ok is True and isinstance(answer.err, RetryableProviderError)
    assert answer.err.code == "malformed_response"
    closed = await start(
        opened, world.provider(failure_policy="open", feature_policy={"feature:a": "closed"})
    )
    answer = (await closed.reserve("u2", "feature:a", 1, scope=bearer(token))).answer
    assert answer.ok is False and answer.err is not None
    assert answer.retry_after is not None and answer.retry_after >= 1


async def test_ares_down_fails_open_and_still_charges_later(
    world: World, opened: list[AresProvider]
) -> None:
    """With ARES unreachable the check fails open (err set) and the charge is delivered later."""
    provider = await start(opened, world.provider(breaker_failures=100))
    uid, token = world.user(credits=10)
    world.ares.fail_next("/v1/user", httpx.ConnectError, httpx.ConnectError)
    reservation = await provider.reserve("u1", "feature:a", 2, scope=bearer(token))
    assert reservation.answer.ok and reservation.answer.err is not None
    await provider.prepare(reservation)
    await provider.commit(reservation)
    assert await provider.flush()
    assert world.ares.charged(uid) == 2


# -- tokens: bearer, refresh, expiry -----------------------------------------------------


async def test_request_without_token_is_refused_without_calling_ares(
    world: World, opened: list[AresProvider]
) -> None:
    """No Authorization header: ok False, err None, a reason; ARES is not asked."""
    provider = await start(opened, world.provider())
    reservation = await provider.reserve("u1", "feature:a", 1, scope=bearer(None))
    assert not reservation.answer.ok and reservation.answer.err is None
    assert "sign in with ARES" in (reservation.answer.reason or "")
    assert world.ares.requests == []


@pytest.mark.parametrize("how", ["expire", "revoke"])
async def test_expired_or_invalid_bearer_is_refused(
    world: World, opened: list[AresProvider], how: str
) -> None:
    """An expired (403) or invalid (401) request token is a 402 answer with its reason."""
    provider = await start(opened, world.provider())
    _, token = world.user(credits=10)
    getattr(world.ares, how)(token)
    answer = (await provider.reserve("u1", "feature:a", 1, scope=bearer(token))).answer
    assert answer.ok is False and answer.err is None
    code = "token_expired" if how == "expire" else "invalid_token"
    assert answer.reason is not None and code in answer.reason


async def test_a_new_bearer_token_is_checked_once(world: World, opened: list[AresProvider]) -> None:
    """The first request with a token costs one GET; later ones use the cache."""
    provider = await start(opened, world.provider(cache_ttl=60))
    _, token = world.user(credits=10)
    for _ in range(5):
        reservation = await provider.reserve("u1", "feature:a", 1, scope=bearer(token))
        assert reservation.answer.ok
        await provider.release(reservation)
    assert len(world.gets()) == 1


async def test_unchecked_token_cannot_ride_on_a_cached_answer(
    world: World, opened: list[AresProvider]
) -> None:
    """A garbage token is refused even while the customer's balance is cached."""
    provider = await start(opened, world.provider(cache_ttl=60))
    _, token = world.user(credits=10)
    ok = await provider.reserve("u1", "feature:a", 1, scope=bearer(token))
    assert ok.answer.ok
    await provider.release(ok)
    bad = await provider.reserve("u1", "feature:a", 1, scope=bearer("garbage"))
    assert not bad.answer.ok and bad.answer.err is None
    assert "invalid_token" in (bad.answer.reason or "")


async def test_bearer_token_is_remembered_for_delivery(
    world: World, opened: list[AresProvider]
) -> None:
    """A charge committed after the request is POSTed with the token that request carried."""
    provider = await start(opened, world.provider())
    uid, token = world.user(credits=10)
    reservation = await provider.reserve("u1", "feature:a", 2, scope=bearer(token))
    await provider.prepare(reservation)
    await provider.commit(reservation)
    assert await provider.flush()
    assert world.ares.charged(uid) == 2
    post = [r for r in world.ares.requests if r.method == "POST"][-1]
    assert post.headers["authorization"] == f"Bearer {token}"


async def _wait_outbox(provider: AresProvider, done: Any) -> Any:
    reporter: Any = provider.reporter
    async with asyncio.timeout(10):
        while True:
            await reporter.flush()
            status = await reporter.outbox_status()
            if done(status):
                return status
            await asyncio.sleep(0.02)


async def test_bearer_event_left_by_a_dead_process_waits_for_the_user(
    world: World, tmp_path: Path
) -> None:
    """After a restart a bearer-only event is dead-lettered (no_token); replayed, delivered."""
    uid, token = world.user(credits=10)
    path = tmp_path / "outbox.db"
    store = Outbox(path)
    try:
        store.apply(0, [(UsageEvent("u1", "feature:a", 2), False, False)])  # a previous process
        provider = world.provider(outbox=path)
        await provider.open()
        try:
            await _wait_outbox(provider, lambda s: s.dead_letters == 1)
            (dead,) = store.dead_letters()
            assert dead.code == "no_token" and "outbox retry" in (dead.message or "")
            assert world.ares.charged(uid) == 0
            # The user comes back; the operator replays the dead letter.
            again = await provider.reserve("u1", "feature:a", 1, scope=bearer(token))
            await provider.release(again)
            assert store.retry_dead() == 1
            await _wait_outbox(provider, lambda s: s.depth == 0 and s.dead_letters == 0)
        finally:
            await provider.aclose()
    finally:
        store.close()
    assert world.ares.charged(uid) == 2


async def test_expired_token_at_delivery_uses_a_newer_remembered_one(
    world: World, opened: list[AresProvider]
) -> None:
    """Delivery with an expired remembered token falls back to a newer accepted one."""
    provider = await start(opened, world.provider())
    uid, old = world.user(credits=10)
    await provider.user("u1", scope=bearer(old))  # old is remembered
    world.ares.expire(old)
    with pytest.raises(AresTokenError) as info:
        await provider.report([UsageEvent("u1", "feature:a", 1)])
    assert info.value.code == "token_expired"
    new = world.ares.issue_token(uid)
    await provider.user("u1", scope=bearer(new))
    await provider.report([UsageEvent("u1", "feature:a", 1)])
    assert world.ares.charged(uid) == 1


async def test_clerk_refresh_after_expiry_in_check_and_delivery(
    world: World, opened: list[AresProvider]
) -> None:
    """With Clerk, a token ARES calls expired is refreshed once and the call succeeds."""
    provider = await start(opened, world.provider(tokens=world.clerk_source(), cache_ttl=0))
    ares_id = world.clerk.connect("user_2abc", credits=10)
    first = await provider.can("user_2abc", "feature:a", 1)
    assert first.ok and first.remaining == 10
    world.ares.expire(world.clerk.token("user_2abc"))
    second = await provider.can("user_2abc", "feature:a", 1)
    assert second.ok and second.err is None
    statuses = [r.headers["authorization"] for r in world.gets()]
    assert len(statuses) == 3 and statuses[1] != statuses[2]  # rejected, then refreshed
    world.ares.expire(world.clerk.token("user_2abc"))
    await provider.report([UsageEvent("user_2abc", "feature:a", 4)])
    assert world.ares.charged(ares_id) == 4
    assert world.clerk.violations == [] and world.ares.violations == []


async def test_clerk_token_refused_after_refresh_is_dead_lettered(
    world: World, opened: list[AresProvider]
) -> None:
    """A revoked token Clerk keeps handing out: refreshed once, then a permanent error."""
    provider = await start(opened, world.provider(tokens=world.clerk_source()))
    world.clerk.connect("user_x", credits=10)
    world.ares.revoke(world.clerk.token("user_x"))
    with pytest.raises(AresTokenError) as info:
        await provider.report([UsageEvent("user_x", "feature:a", 1)])
    assert info.value.status == 401 and info.value.code == "invalid_token"
    assert not info.value.retryable
    answer = await provider.can("user_x", "feature:a", 1)
    assert answer.ok is False and answer.err is None


async def test_clerk_without_refresh_token_refuses_the_user(
    world: World, opened: list[AresProvider]
) -> None:
    """Clerk's 422 oauth_token_retrieval_error means no token: a 402 answer, not an error."""
    provider = await start(opened, world.provider(tokens=world.clerk_source()))
    world.clerk.connect("user_y", credits=10)
    world.clerk.lose_refresh_token("user_y")
    world.ares.expire(world.clerk.token("user_y"))
    answer = await provider.can("user_y", "feature:a", 1)
    assert answer.ok is False and answer.err is None
    assert "sign in with ARES" in (answer.reason or "")


async def test_callable_source_refresh(world: World, opened: list[AresProvider]) -> None:
    """A callable source's refresh= gives the replacement token after a 403."""
    uid, old = world.user(credits=10)
    new = world.ares.issue_token(uid)
    world.ares.expire(old)

    async def get(customer: str) -> str:
        return old

    async def refresh(customer: str) -> str:
        return new

    provider = await start(opened, world.provider(tokens=CallableTokenSource(get, refresh=refresh)))
    await provider.report([UsageEvent("u1", "feature:a", 3)])
    assert world.ares.charged(uid) == 3


# -- report(): POST /v1/partner/usage ---------------------------------------------------


async def test_report_body_on_the_wire(world: World, opened: list[AresProvider]) -> None:
    """report() POSTs exactly {client_id, usage, credits} as JSON with the user's bearer."""
    provider = await start(
        opened,
        world.provider(
            tokens=world.clerk_source(),
            prices={"feature:video": "2.5"},
            descriptions={"feature:video": "video generation"},
        ),
    )
    ares_id = world.clerk.connect("user_v", credits=100)
    await provider.report([UsageEvent("user_v", "feature:video", 3)])
    await provider.report([UsageEvent("user_v", "feature:chat", 2)])
    post = next(r for r in world.ares.requests if r.method == "POST")
    assert str(post.url) == f"{ARES_URL}/v1/partner/usage"
    assert post.headers["content-type"] == "application/json"
    assert post.headers["authorization"] == f"Bearer {world.clerk.token('user_v')}"
    assert json.loads(post.content) == {
        "client_id": CLIENT_ID,
        "usage": "video generation",
        "credits": 7.5,
    }
    assert world.ares.posts()[1] == {"client_id": CLIENT_ID, "usage": "feature:chat", "credits": 2}
    assert world.ares.charged(ares_id) == 9.5
    assert world.ares.violations == []


async def test_report_errors_are_classified(world: World, opened: list[AresProvider]) -> None:
    """Insufficient credits and 4xx are permanent; 5xx, 429 and network errors retryable."""
    provider = await start(opened, world.provider(tokens=world.clerk_source()))
    world.clerk.connect("user_p", credits=1)
    event = UsageEvent("user_p", "feature:a", 5)
    with pytest.raises(InsufficientCreditsError) as poor:
        await provider.report([event])
    assert poor.value.status == INSUFFICIENT_STATUS and poor.value.code == "insufficient_credits"
    world.ares.fail_next("/v1/partner/usage", 503, 429, httpx.ReadTimeout)
    small = UsageEvent("user_p", "feature:a", 1)
    for _ in range(3):
        with pytest.raises(RetryableProviderError):
            await provider.report([small])
    world.ares.fail_next("/v1/partner/usage", 400)
    with pytest.raises(PermanentProviderError):
        await provider.report([small])
    with pytest.raises(PermanentProviderError, match="clobber"):
        await provider.report([UsageEvent("user_p", "feature:a", 0, clobber=True)])


async def test_insufficient_credits_at_delivery_is_dead_lettered(
    world: World, tmp_path: Path
) -> None:
    """Through the durable outbox, an unpayable charge lands in the dead letters with its reason."""
    provider = world.provider(tokens=world.clerk_source(), outbox=tmp_path / "o.db")
    await provider.open()
    try:
        world.clerk.connect("user_q", credits=10)
        reservation = await provider.reserve("user_q", "feature:a", 8)
        assert reservation.answer.ok
        world.ares.users[world.clerk.links["user_q"].ares_user_id].credits = 1  # spent elsewhere
        await provider.prepare(reservation)
        await provider.commit(reservation)
        await _wait_outbox(provider, lambda s: s.dead_letters == 1)
    finally:
        await provider.aclose()
    store = Outbox(str(tmp_path / "o.db"))
    try:
        (dead,) = store.dead_letters()
    finally:
        store.close()
    assert dead.code == "insufficient_credits" and dead.status == INSUFFICIENT_STATUS


# -- charge modes ---------------------------------------------------------------------


async def test_charge_after_charges_only_committed(
    world: World, opened: list[AresProvider]
) -> None:
    """charge="after": nothing is POSTed at reserve; commit charges, release does not."""
    provider = await start(opened, world.provider())
    uid, token = world.user(credits=10)
    kept = await provider.reserve("u1", "feature:a", 3, scope=bearer(token))
    dropped = await provider.reserve("u1", "feature:a", 2, scope=bearer(token))
    assert world.ares.posts() == []
    await provider.prepare(kept)
    await provider.commit(kept)
    await provider.prepare(dropped)
    await provider.release(dropped)
    assert await provider.flush()
    assert world.ares.charged(uid) == 3
    assert len(world.ares.posts()) == 1


async def test_charge_before_charges_at_reserve_and_never_refunds(
    world: World, opened: list[AresProvider], caplog: pytest.LogCaptureFixture
) -> None:
    """charge="before": reserve POSTs; commit sends nothing more; release does not refund."""
    caplog.set_level(logging.INFO)
    provider = await start(opened, world.provider(charge="before"))
    uid, token = world.user(credits=10)
    served = await provider.reserve("u1", "feature:a", 3, scope=bearer(token))
    assert served.answer.ok and world.ares.charged(uid) == 3
    await provider.prepare(served)
    await provider.commit(served)
    failed = await provider.reserve("u1", "feature:a", 2, scope=bearer(token))
    assert failed.answer.ok and world.ares.charged(uid) == 5
    await provider.release(failed)
    assert await provider.flush()
    assert world.ares.charged(uid) == 5 and len(world.ares.posts()) == 2
    assert world.ares.credits(uid) == 5
    assert "not refunded" in caplog.text


@pytest.mark.parametrize(("overage", "expected"), [("cap", 3), ("charge", 7)])
async def test_charge_before_settles_actual_units(
    world: World,
    opened: list[AresProvider],
    caplog: pytest.LogCaptureFixture,
    overage: str,
    expected: int,
) -> None:
    """charge="before" paid the estimate of 3 at reserve: 2 used is not refunded (logged);
    7 used adds one usage of the 4 more under overage="charge" and nothing under "cap"."""
    caplog.set_level(logging.INFO)
    provider = await start(opened, world.provider(charge="before"))
    uid, token = world.user(credits=20)
    fewer = await provider.reserve("u1", "feature:a", 3, scope=bearer(token))
    assert await provider.commit(fewer, units=2, overage=overage) == 3  # type: ignore[arg-type]
    assert "not refunded" in caplog.text
    more = await provider.reserve("u1", "feature:a", 3, scope=bearer(token))
    assert await provider.commit(more, units=7, overage=overage) == expected  # type: ignore[arg-type]
    assert await provider.flush()
    assert world.ares.charged(uid) == 3 + expected


async def test_charge_before_insufficient_credits_is_402(
    world: World, opened: list[AresProvider]
) -> None:
    """charge="before": ARES refusing the POST for credits refuses the request (err None)."""
    provider = await start(opened, world.provider(charge="before"))
    uid, token = world.user(credits=2)
    reservation = await provider.reserve("u1", "feature:a", 3, scope=bearer(token))
    assert reservation.answer.ok is False and reservation.answer.err is None
    assert "credit" in (reservation.answer.reason or "")
    await provider.release(reservation)
    assert world.ares.charged(uid) == 0


async def test_charge_before_refused_token_is_402(world: World, opened: list[AresProvider]) -> None:
    """charge="before": an expired request token refuses the request (ok False, err None)."""
    provider = await start(opened, world.provider(charge="before"))
    _, token = world.user(credits=10)
    world.ares.expire(token)
    reservation = await provider.reserve("u1", "feature:a", 1, scope=bearer(token))
    assert reservation.answer.ok is False and reservation.answer.err is None
    assert "token_expired" in (reservation.answer.reason or "")


async def test_charge_before_falls_back_to_after_when_ares_fails(
    world: World, opened: list[AresProvider]
) -> None:
    """charge="before": a 5xx on the POST checks the balance and charges after success."""
    provider = await start(opened, world.provider(charge="before"))
    uid, token = world.user(credits=10)
    world.ares.fail_next("/v1/partner/usage", 503)
    reservation = await provider.reserve("u1", "feature:a", 2, scope=bearer(token))
    assert reservation.answer.ok and world.ares.charged(uid) == 0
    await provider.prepare(reservation)
    await provider.commit(reservation)
    assert await provider.flush()
    assert world.ares.charged(uid) == 2


async def test_charged_units_count_until_ares_shows_them(
    world: World, opened: list[AresProvider]
) -> None:
    """Committed units are subtracted from the cached balance: no overspend between checks."""
    provider = await start(opened, world.provider(cache_ttl=60))
    _, token = world.user(credits=3)
    for _ in range(3):
        reservation = await provider.reserve("u1", "feature:a", 1, scope=bearer(token))
        assert reservation.answer.ok
        await provider.prepare(reservation)
        await provider.commit(reservation)
    assert await provider.flush()
    over = await provider.reserve("u1", "feature:b", 1, scope=bearer(token))
    assert not over.answer.ok and over.answer.err is None


# -- secrets never leak ------------------------------------------------------------------


async def test_tokens_never_in_logs_errors_or_reprs(
    world: World, opened: list[AresProvider], caplog: pytest.LogCaptureFixture
) -> None:
    """Across failures, no token or key appears in logs, error strings, reasons or reprs."""
    caplog.set_level(logging.DEBUG)
    source = world.clerk_source()
    provider = await start(opened, world.provider(tokens=source, breaker_failures=100))
    world.clerk.connect("user_s", credits=1)
    secrets_seen = {CLERK_SECRET, world.clerk.token("user_s")}
    texts: list[str] = [repr(provider), repr(source)]
    world.ares.expire(world.clerk.token("user_s"))
    texts.append(str(await provider.can("user_s", "feature:a", 5)))
    secrets_seen.add(world.clerk.token("user_s"))
    for failure in (503, httpx.ConnectError, 400):
        world.ares.fail_next("/v1/partner/usage", failure)
        with pytest.raises(Exception) as info:
            await provider.report([UsageEvent("user_s", "feature:a", 1)])
        texts += [str(info.value), repr(info.value)]
    world.ares.revoke(world.clerk.token("user_s"))
    with pytest.raises(AresTokenError) as refused:
        await provider.report([UsageEvent("user_s", "feature:a", 1)])
    texts += [str(refused.value), repr(refused.value)]
    world.ares.fail_next("/v1/user", httpx.ConnectError)
    answer = await provider.can("user_s", "feature:b", 1)
    texts.append(str(answer))
    bearer_provider = await start(opened, world.provider(charge="before"))
    _, token = world.user(credits=0)
    secrets_seen.add(token)
    texts.append(str(await bearer_provider.reserve("u9", "feature:a", 1, scope=bearer(token))))
    joined = "\n".join([*texts, caplog.text])
    assert caplog.records  # something was logged
    for secret in secrets_seen:
        assert secret not in joined


async def test_answer_report_posts_usage(world: World, opened: list[AresProvider]) -> None:
    """Answer.report(n) POSTs n units for the answer's user (Tier-style)."""
    provider = await start(opened, world.provider(tokens=world.clerk_source()))
    ares_id = world.clerk.connect("user_r", credits=10)
    answer = await provider.can("user_r", "feature:a", 2)
    await answer.report(2, at=datetime.now(UTC) - timedelta(seconds=1))
    assert world.ares.charged(ares_id) == 2


# -- through the middleware ------------------------------------------------------------


def _app(provider: AresProvider) -> Any:
    from starlette.applications import Starlette
    from starlette.middleware import Middleware
    from starlette.requests import Request
    from starlette.responses import JSONResponse, Response
    from starlette.routing import Route

    from usage_middleware.customers import customer_from_header
    from usage_middleware.decorator import metered
    from usage_middleware.middleware import UsageMiddleware

    @metered("feature:video", units=2)
    async def video(request: Request) -> Response:
        return JSONResponse({"ok": True})

    @metered("feature:video", units=2)
    async def broken(request: Request) -> Response:
        return JSONResponse({"ok": False}, status_code=500)

    return Starlette(
        routes=[Route("/video", video), Route("/broken", broken)],
        middleware=[
            Middleware(UsageMiddleware, provider=provider, customer=customer_from_header("X-User"))
        ],
    )


@pytest.mark.parametrize("charge", ["after", "before"])
async def test_middleware_serves_charges_and_refuses_with_402(world: World, charge: str) -> None:
    """Over HTTP: a rich user is served and charged, a poor one gets 402 problem+json."""
    provider = world.provider(charge=charge, prices={"feature:video": 3})
    rich, rich_token = world.user(credits=20)
    poor, poor_token = world.user(credits=5)
    app = _app(provider)
    async with httpx.AsyncClient(
        transport=httpx.ASGITransport(app=app), base_url="http://test"
    ) as http:
        served = await http.get(
            "/video", headers={"X-User": "rich", "Authorization": f"Bearer {rich_token}"}
        )
        refused = await http.get(
            "/video", headers={"X-User": "poor", "Authorization": f"Bearer {poor_token}"}
        )
        anonymous = await http.get("/video", headers={"X-User": "anon"})
        failed = await http.get(
            "/broken", headers={"X-User": "rich", "Authorization": f"Bearer {rich_token}"}
        )
        assert await provider.flush()
    await provider.aclose()
    assert served.status_code == 200
    assert refused.status_code == 402 and anonymous.status_code == 402
    assert refused.headers["content-type"] == "application/problem+json"
    assert poor_token not in refused.text and "credit" in refused.json()["reason"]
    assert "sign in with ARES" in anonymous.json()["reason"]
    assert failed.status_code == 500
    # "after": the failed request is not charged; "before": it was charged up front.
    assert world.ares.charged(rich) == (6 if charge == "after" else 12)
    assert world.ares.charged(poor) == 0


async def test_a_2xx_usage_answer_that_is_not_json_is_not_a_delivery(
    world: World, opened: list[AresProvider], caplog: pytest.LogCaptureFixture
) -> None:
    """A 200 HTML page (a wrong base URL, a portal) to the usage POST is a retryable failure
    logged naming the base URL, not a delivered charge; ARES's JSON answer is one."""
    provider = await start(opened, world.provider(tokens=world.clerk_source()))
    ares_id = world.clerk.connect("user_h", credits=100)
    html = httpx.Response(
        200, content=b"<html>welcome</html>", headers={"content-type": "text/html"}
    )
    world.ares.fail_next("/v1/partner/usage", html)
    with caplog.at_level(logging.WARNING, logger="usage_middleware"):
        with pytest.raises(RetryableProviderError):
            await provider.report([UsageEvent("user_h", "feature:a", 2)])
    assert any(ARES_URL in r.getMessage() for r in caplog.records)
    assert world.ares.charged(ares_id) == 0
    await provider.report([UsageEvent("user_h", "feature:a", 2)])  # the retry lands once
    assert world.ares.charged(ares_id) == 2


async def test_queued_charges_go_out_summed_per_user_and_feature_never_mixed(
    world: World, tmp_path: Path
) -> None:
    """Interleaved queued charges of two users x two features reach ARES as summed POSTs:
    each user pays exactly their own credits, each POST carries one user's token and one
    feature's label, in fewer POSTs than charges."""
    u1, t1 = world.user(credits=10_000)
    u2, t2 = world.user(credits=10_000)
    provider = world.provider(outbox=tmp_path / "o.db", prices={"feature:a": 2, "feature:b": 3})
    await provider.open()
    try:
        await provider.user("c1", scope=bearer(t1))  # the tokens delivery will use
        await provider.user("c2", scope=bearer(t2))
        reporter: Any = provider.reporter
        for i in range(120):
            reporter.enqueue(
                UsageEvent(("c1", "c2")[i % 2], ("feature:a", "feature:b")[i % 3 % 2], 1)
            )
        await _wait_outbox(provider, lambda s: s.depth == 0)
    finally:
        await provider.aclose()
    want = {"c1": 0, "c2": 0}
    for i in range(120):
        want[("c1", "c2")[i % 2]] += (2, 3)[i % 3 % 2]
    assert world.ares.charged(u1) == want["c1"]
    assert world.ares.charged(u2) == want["c2"]
    posts = [r for r in world.ares.requests if r.url.path == "/v1/partner/usage"]
    assert 4 <= len(posts) < 120
    tokens = {t1, t2}
    for r in posts:
        assert r.headers["authorization"].removeprefix("Bearer ") in tokens
        assert json.loads(r.content)["usage"] in {"feature:a", "feature:b"}
