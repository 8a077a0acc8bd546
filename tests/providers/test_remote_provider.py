"""RemoteProvider: cache, local accounting, single-flight, failure policy, breaker, delivery."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Sequence
from typing import Any

import httpx
import pytest

from tests.support.contract_fake_remote import FakeRemote
from usage_middleware.delivery import Reporter
from usage_middleware.errors import (
    ConfigurationError,
    PermanentProviderError,
    RetryableProviderError,
)
from usage_middleware.models import UNLIMITED, Reservation, UsageEvent
from usage_middleware.provider import ProviderState
from usage_middleware.providers.remote import CircuitBreaker, Entitlement, RemoteProvider
from usage_middleware.providers.remote.accounting import Account

C, F = "org:acme", "feature:convert"


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
async def make(clock: Clock) -> AsyncIterator[Any]:
    """Build opened FakeRemote providers (with the fake clock); close them afterwards."""
    made: list[RemoteProvider] = []

    async def build(cls: type[FakeRemote] = FakeRemote, **kwargs: Any) -> FakeRemote:
        kwargs.setdefault("clock", clock)
        provider = cls(**kwargs)
        await provider.open()
        made.append(provider)
        return provider

    yield build
    for provider in made:
        await provider.aclose()


async def _charge(provider: RemoteProvider, customer: str = C, units: int = 1) -> Reservation:
    reservation = await provider.reserve(customer, F, units)
    assert reservation.answer.ok
    await provider.prepare(reservation)
    await provider.commit(reservation)
    return reservation


# -- cache ---------------------------------------------------------------------------------


async def test_second_check_is_served_from_cache_with_its_age(make: Any, clock: Clock) -> None:
    """A repeated check within the TTL makes no provider call and reports cached + age."""
    provider = await make(cache_ttl=5.0)
    provider.balances[(C, F)] = 10
    first = await provider.can(C, F)
    clock.advance(2.5)
    second = await provider.can(C, F)
    assert provider.fetches == 1
    assert (first.cached, first.age) == (False, None)
    assert second.cached is True and second.age == pytest.approx(2.5)
    assert second.ok and second.remaining == 10 and second.provider is provider


async def test_entry_expires_after_its_ttl(make: Any, clock: Clock) -> None:
    """After cache_ttl seconds the provider is asked again and its new numbers are used."""
    provider = await make(cache_ttl=5.0)
    provider.balances[(C, F)] = 10
    await provider.can(C, F)
    provider.balances[(C, F)] = 7
    clock.advance(4.9)
    assert (await provider.can(C, F)).remaining == 10
    clock.advance(0.2)
    fresh = await provider.can(C, F)
    assert provider.fetches == 2
    assert fresh.remaining == 7 and fresh.cached is False


async def test_denial_is_cached_only_for_deny_ttl(make: Any, clock: Clock) -> None:
    """An empty balance is cached deny_ttl seconds (not cache_ttl): a top-up shows up soon."""
    provider = await make(cache_ttl=60.0, deny_ttl=1.0)
    provider.reasons[(C, F)] = "feature not in plan"
    denied = await provider.can(C, F)
    assert not denied.ok and denied.err is None and denied.reason == "feature not in plan"
    clock.advance(0.5)
    again = await provider.can(C, F)
    assert not again.ok and again.cached and provider.fetches == 1
    provider.balances[(C, F)] = 3
    clock.advance(0.6)
    allowed = await provider.can(C, F)
    assert allowed.ok and provider.fetches == 2


async def test_local_denial_of_a_cached_allowance_is_refreshed_after_deny_ttl(
    make: Any, clock: Clock
) -> None:
    """A cached allowance spent locally denies, and is re-fetched once older than deny_ttl."""
    provider = await make(cache_ttl=60.0, deny_ttl=1.0)
    provider.balances[(C, F)] = 1
    provider.reflect = False  # the provider's number stays stale
    await _charge(provider)
    assert not (await provider.can(C, F)).ok
    assert provider.fetches == 1
    clock.advance(1.5)
    provider.balances[(C, F)] = 5  # a top-up (the earlier charge is already in it)
    refreshed = await provider.can(C, F)
    assert provider.fetches == 2
    assert refreshed.ok


async def test_feature_ttl_zero_always_asks(make: Any) -> None:
    """A feature with TTL 0 is never cached: every check asks the provider."""
    provider = await make(cache_ttl=60.0, feature_ttl={F: 0})
    provider.balances[(C, F)] = 10
    provider.balances[(C, "feature:other")] = 10
    for _ in range(3):
        assert (await provider.can(C, F)).cached is False
        await provider.can(C, "feature:other")
    assert provider.fetches == 3 + 1


async def test_cache_is_bounded(make: Any) -> None:
    """The cache keeps at most cache_size entitlements (least recently used go first)."""
    provider = await make(cache_size=2)
    for name in ("org:a", "org:b", "org:c", "org:a"):
        provider.balances[(name, F)] = 1
        await provider.can(name, F)
    assert provider.fetches == 4


# -- local accounting ----------------------------------------------------------------------


async def test_cached_balance_never_lets_the_process_overspend(make: Any) -> None:
    """With a stale cached balance of 3, only 3 units can be committed; the 4th is denied."""
    provider = await make(cache_ttl=60.0)
    provider.balances[(C, F)] = 3
    provider.reflect = False
    for _ in range(3):
        await _charge(provider)
    over = await provider.reserve(C, F)
    assert not over.answer.ok and over.answer.err is None
    assert over.answer.remaining == 0 and over.answer.cached
    assert provider.fetches == 1


async def test_units_in_flight_are_held(make: Any) -> None:
    """Units reserved but not settled count against the balance; release gives them back."""
    provider = await make()
    provider.balances[(C, F)] = 3
    held = await provider.reserve(C, F, 2)
    assert held.answer.ok
    assert not (await provider.reserve(C, F, 2)).answer.ok
    assert (await provider.can(C, F, 1)).ok
    await provider.release(held)
    again = await provider.reserve(C, F, 3)
    assert again.answer.ok
    await provider.release(again)
    assert await provider.flush() and provider.recorded == []


async def test_undelivered_charges_still_count_after_a_refetch(make: Any, clock: Clock) -> None:
    """Charges the provider has not received yet are subtracted from a freshly fetched balance."""
    provider = await make(cache_ttl=1.0, drain_timeout=0.01)
    provider.balances[(C, F)] = 5
    provider.report_failures = [RetryableProviderError("down", retry_after=30.0)]
    await _charge(provider, units=2)
    clock.advance(2.0)
    fresh = await provider.can(C, F)
    assert provider.fetches == 2 and fresh.cached is False
    assert fresh.remaining == 3 and fresh.used is None


async def test_delivered_charges_are_not_counted_twice_without_lag(make: Any, clock: Clock) -> None:
    """With balance_lag 0, a delivered charge is trusted to be in the next fetched balance."""
    provider = await make(cache_ttl=1.0)
    provider.balances[(C, F)] = 5
    await _charge(provider, units=2)
    assert await provider.flush()
    assert provider.balances[(C, F)] == 3
    clock.advance(2.0)
    assert (await provider.can(C, F)).remaining == 3


class LaggingRemote(FakeRemote):
    """A provider whose balance shows delivered usage only after 60 s (like Spaire)."""

    balance_lag = 60.0


async def test_balance_lag_keeps_counting_delivered_charges(make: Any, clock: Clock) -> None:
    """Within balance_lag after delivery, a stale fetched balance is still reduced locally."""
    provider = await make(LaggingRemote, cache_ttl=1.0)
    provider.balances[(C, F)] = 5
    provider.reflect = False
    await _charge(provider, units=2)
    assert await provider.flush() and provider.charged(C, F) == 2
    clock.advance(30.0)
    assert (await provider.can(C, F)).remaining == 3
    clock.advance(31.0)
    provider.balances[(C, F)] = 3  # the provider caught up
    assert (await provider.can(C, F)).remaining == 3
    assert provider.fetches == 3


async def test_usage_reported_directly_counts_against_the_cache(make: Any) -> None:
    """Answer.report() goes through the provider, and the cached balance drops by it."""
    provider = await make(cache_ttl=60.0)
    provider.balances[(C, F)] = 5
    provider.reflect = False
    answer = await provider.can(C, F)
    await answer.report(4)
    assert provider.charged(C, F) == 4
    assert (await provider.can(C, F)).remaining == 1


class ChainedRemote(FakeRemote):
    """A subclass whose report() calls super().report()."""

    async def report(self, events: Sequence[UsageEvent]) -> None:
        await super().report(events)


async def test_report_chain_is_counted_once(make: Any) -> None:
    """A report() that calls super().report() is counted once by local accounting."""
    provider = await make(ChainedRemote, cache_ttl=60.0)
    provider.balances[(C, F)] = 5
    provider.reflect = False
    answer = await provider.can(C, F)
    await answer.report(2)
    assert (await provider.can(C, F)).remaining == 3


async def test_unlimited_feature_allows_any_units(make: Any) -> None:
    """A provider remaining of UNLIMITED allows any units and reports UNLIMITED remaining."""
    provider = await make()
    provider.balances[(C, F)] = UNLIMITED
    await _charge(provider, units=10**6)
    answer = await provider.can(C, F, 10**9)
    assert answer.ok and answer.remaining == UNLIMITED


async def test_commit_is_settled_once(make: Any) -> None:
    """Committing a reservation twice delivers one charge; releasing it afterwards does nothing."""
    provider = await make()
    provider.balances[(C, F)] = 5
    reservation = await _charge(provider, units=2)
    await provider.commit(reservation)
    await provider.release(reservation)
    assert await provider.flush()
    assert provider.charged(C, F) == 2
    assert (await provider.can(C, F)).remaining == 3


# -- single-flight -------------------------------------------------------------------------


async def test_100_concurrent_first_checks_make_one_fetch(make: Any) -> None:
    """100 concurrent cold checks for one customer+feature share one provider call."""
    provider = await make()
    provider.balances[(C, F)] = 50
    provider.gate = asyncio.Event()
    tasks = [asyncio.create_task(provider.reserve(C, F)) for _ in range(100)]
    await provider.started.wait()
    await asyncio.sleep(0)
    provider.gate.set()
    reservations = await asyncio.gather(*tasks)
    assert provider.fetches == 1
    assert sum(r.answer.ok for r in reservations) == 50
    for r in reservations:
        await provider.release(r)


async def test_a_failed_fetch_is_shared_by_all_waiters(make: Any) -> None:
    """When the shared fetch fails, every waiter gets the same error (one call)."""
    provider = await make(failure_policy="closed")
    provider.gate = asyncio.Event()
    provider.fail = RetryableProviderError("boom", status=503)
    tasks = [asyncio.create_task(provider.can(C, F)) for _ in range(10)]
    await provider.started.wait()
    provider.gate.set()
    answers = await asyncio.gather(*tasks)
    assert provider.fetches == 1
    assert all(a.err is provider.fail and a.ok is False for a in answers)


async def test_cancelling_the_first_caller_does_not_wedge_the_others(make: Any) -> None:
    """The caller that started a fetch can be cancelled; the followers still get the answer."""
    provider = await make()
    provider.balances[(C, F)] = 2
    provider.gate = asyncio.Event()
    leader = asyncio.create_task(provider.can(C, F))
    await provider.started.wait()
    followers = [asyncio.create_task(provider.can(C, F)) for _ in range(5)]
    await asyncio.sleep(0)
    leader.cancel()
    with pytest.raises(asyncio.CancelledError):
        await leader
    provider.gate.set()
    answers = await asyncio.gather(*followers)
    assert all(a.ok and a.remaining == 2 for a in answers)
    assert provider.fetches == 1
    assert (await provider.can(C, F)).cached


# -- failure policy, timeout, breaker --------------------------------------------------------


async def test_fail_open_serves_and_still_charges(make: Any) -> None:
    """Policy open: a failed check allows with err set, and the commit is still delivered."""
    provider = await make()
    provider.fail = RetryableProviderError("unreachable")
    reservation = await provider.reserve(C, F, 3)
    assert reservation.answer.ok and reservation.answer.err is provider.fail
    assert reservation.answer.retry_after is None
    await provider.prepare(reservation)
    await provider.commit(reservation)
    assert await provider.flush()
    assert provider.charged(C, F) == 3


async def test_fail_open_charges_count_once_the_provider_is_back(make: Any) -> None:
    """Units charged while failing open are subtracted from the balance fetched afterwards."""
    provider = await make(LaggingRemote)
    provider.reflect = False
    provider.fail = RetryableProviderError("unreachable")
    await _charge(provider, units=3)
    provider.fail = None
    provider.balances[(C, F)] = 5
    assert (await provider.can(C, F)).remaining == 2


async def test_fail_closed_refuses_with_retry_after(make: Any) -> None:
    """Policy closed: a failed check denies with err set (503) and a Retry-After of >= 1 s."""
    provider = await make(failure_policy="closed")
    provider.fail = RetryableProviderError("slow down", status=429, retry_after=7.0)
    reservation = await provider.reserve(C, F)
    assert not reservation.answer.ok and reservation.answer.err is provider.fail
    assert reservation.answer.retry_after == 7.0
    provider.fail = RetryableProviderError("unreachable")
    assert (await provider.can(C, F)).retry_after == 1.0


async def test_failure_policy_is_per_feature(make: Any) -> None:
    """feature_policy overrides failure_policy for the features it names."""
    provider = await make(failure_policy="open", feature_policy={"feature:paid": "closed"})
    provider.fail = RetryableProviderError("down")
    assert (await provider.can(C, F)).ok is True
    assert (await provider.can(C, "feature:paid")).ok is False


async def test_a_provider_that_hangs_times_out(make: Any) -> None:
    """A fetch that never returns becomes a retryable error after `timeout` seconds."""
    provider = await make(timeout=0.05, failure_policy="closed")
    provider.hang = True
    answer = await provider.can(C, F)
    assert not answer.ok
    assert isinstance(answer.err, RetryableProviderError)
    assert isinstance(answer.err.original_error, TimeoutError)


async def test_unexpected_exceptions_are_failures_not_crashes(make: Any) -> None:
    """An exception that is not a ProviderError (bug, stray httpx error) follows the policy."""
    provider = await make()
    provider.fail = httpx.ConnectError("refused")
    answer = await provider.can(C, F)
    assert answer.ok and isinstance(answer.err, RetryableProviderError)
    assert isinstance(answer.err.original_error, httpx.ConnectError)


async def test_failures_are_logged_once_per_interval(
    make: Any, clock: Clock, caplog: pytest.LogCaptureFixture
) -> None:
    """Many failed checks make one warning per interval, with the count of the others."""
    provider = await make(breaker_failures=1000)
    provider.fail = RetryableProviderError("down")
    with caplog.at_level(logging.WARNING, logger="usage_middleware"):
        for _ in range(20):
            await provider.can(C, F)
        clock.advance(provider.failure_log_interval)
        await provider.can(C, F)
    lines = [r.getMessage() for r in caplog.records]
    assert len(lines) == 2
    assert "19 more" in lines[1]


async def test_breaker_opens_then_probes_then_closes(make: Any, clock: Clock) -> None:
    """After N failures no calls for the cool-down; then one probe; its success closes it."""
    provider = await make(breaker_failures=3, breaker_cooldown=10.0, failure_policy="closed")
    provider.fail = RetryableProviderError("down")
    for _ in range(3):
        await provider.can(C, F)
    assert provider.fetches == 3 and provider.breaker.state == "open"
    fast = await provider.can(C, F)
    assert provider.fetches == 3
    assert not fast.ok and "circuit breaker" in str(fast.err)
    assert fast.retry_after == pytest.approx(10.0)
    clock.advance(10.0)
    await provider.can(C, F)  # the probe fails: open again
    assert provider.fetches == 4 and provider.breaker.state == "open"
    await provider.can(C, F)
    assert provider.fetches == 4
    clock.advance(10.0)
    provider.fail = None
    provider.balances[(C, F)] = 1
    assert (await provider.can(C, F)).ok
    assert provider.fetches == 5 and provider.breaker.state == "closed"


async def test_half_open_lets_exactly_one_probe_through(make: Any, clock: Clock) -> None:
    """While the probe is in flight, checks for other customers fail fast instead of calling."""
    provider = await make(breaker_failures=1, breaker_cooldown=5.0)
    provider.fail = RetryableProviderError("down")
    await provider.can(C, F)
    clock.advance(5.0)
    provider.fail = None
    provider.gate = asyncio.Event()
    provider.started.clear()
    probe = asyncio.create_task(provider.can("org:a", F))
    await provider.started.wait()
    other = await provider.can("org:b", F)
    assert other.ok and other.err is not None  # failed open, no call
    assert provider.fetches == 2
    provider.gate.set()
    assert (await probe).err is None
    assert provider.breaker.state == "closed"


async def test_permanent_errors_do_not_open_the_breaker(make: Any) -> None:
    """A 4xx from the provider shows it is up: it fails the check but not the breaker."""
    provider = await make(breaker_failures=2)
    provider.fail = PermanentProviderError("bad org", status=400)
    for _ in range(5):
        assert (await provider.can(C, F)).err is provider.fail
    assert provider.fetches == 5 and provider.breaker.state == "closed"


def test_breaker_alone(clock: Clock) -> None:
    """CircuitBreaker: success resets the count; a failed probe re-opens for a full cool-down."""
    breaker = CircuitBreaker(2, 1.0, clock)
    breaker.failure()
    breaker.success()
    breaker.failure()
    assert breaker.allow() is None and breaker.state == "closed"
    breaker.failure()
    assert breaker.allow() == pytest.approx(1.0)
    clock.advance(1.0)
    assert breaker.allow() is None and breaker.state == "half-open"
    assert breaker.allow() == 0.0  # the probe is out
    breaker.failure()
    assert breaker.allow() == pytest.approx(1.0)


async def test_failed_refresh_of_a_cached_denial_keeps_denying(make: Any, clock: Clock) -> None:
    """If refreshing a locally spent cached entry fails, the cached denial stands (no fail-open)."""
    provider = await make(cache_ttl=60.0, deny_ttl=1.0)
    provider.balances[(C, F)] = 1
    provider.reflect = False
    await _charge(provider)
    clock.advance(2.0)
    provider.fail = RetryableProviderError("down")
    answer = await provider.can(C, F)
    assert not answer.ok and answer.err is None and answer.cached


# -- delivery ------------------------------------------------------------------------------


async def test_in_memory_delivery_retries_then_delivers(make: Any) -> None:
    """outbox=None: a retryable report error is retried until the charge is delivered."""
    provider = await make()
    provider.balances[(C, F)] = 5
    provider.report_failures = [RetryableProviderError("503", retry_after=0.0)] * 2
    await _charge(provider, units=2)
    assert await provider.flush()
    assert provider.charged(C, F) == 2


async def test_in_memory_delivery_drops_only_the_rejected_event(make: Any) -> None:
    """A permanent error on a batch re-sends one by one: only the bad event is dropped."""
    provider = await make()
    provider.balances[(C, F)] = 5
    provider.report_failures = [PermanentProviderError("one bad event", status=422)] * 2
    assert provider.reporter is None
    for _ in range(3):
        await _charge(provider)
    assert await provider.flush()
    assert provider.charged(C, F) == 2


async def test_in_memory_delivery_is_the_reporter_and_bisects_a_rejected_batch(
    make: Any,
) -> None:
    """outbox=None runs the one Reporter engine over an in-memory outbox: a rejected batch
    is bisected and only the bad event is dead-lettered (counted in its stats)."""
    provider = await make(outbox=None)
    provider.balances[(C, F)] = 10
    assert isinstance(provider._delivery, Reporter) and provider._delivery.in_memory
    sizes: list[int] = []
    real = provider.report

    async def report(events: Sequence[UsageEvent]) -> None:
        sizes.append(len(events))
        if any(e.units == 3 for e in events):
            raise PermanentProviderError("bad event", status=422)
        await real(events)

    provider.report = report
    for units in (1, 1, 3, 1):
        await provider.commit(await provider.reserve(C, F, units))
    assert await provider.flush()
    assert provider.charged(C, F) == 3
    assert provider._delivery.stats().dead_lettered == 1
    assert sizes == [4, 2, 2, 1, 1]


async def test_in_memory_delivery_logs_what_close_leaves_undelivered(
    make: Any, caplog: pytest.LogCaptureFixture
) -> None:
    """outbox=None: charges still undelivered when aclose gives up are logged as lost."""
    provider = await make(outbox=None, drain_timeout=0.05)
    provider.balances[(C, F)] = 5
    provider.report_failures = [RetryableProviderError("down")] * 1000
    await provider.commit(await provider.reserve(C, F, 2))
    await provider.aclose()
    assert "1 charge(s) not delivered before close are lost" in caplog.text


class FakeReporter:
    """The Reporter's shape, recording calls."""

    def __init__(self, provider: RemoteProvider) -> None:
        self.calls: list[tuple[str, str]] = []
        self.opened = self.closed = False

    async def open(self) -> None:
        self.opened = True

    async def aclose(self) -> None:
        self.closed = True

    def enqueue(self, event: UsageEvent) -> None:
        self.calls.append(("enqueue", event.idempotency_key))

    async def prepare(self, event: UsageEvent) -> None:
        self.calls.append(("prepare", event.idempotency_key))

    async def prepare_alone(self, event: UsageEvent) -> None:
        self.calls.append(("prepare", event.idempotency_key))

    def confirm(self, event: UsageEvent) -> None:
        self.calls.append(("confirm", event.idempotency_key))

    async def cancel(self, event: UsageEvent) -> None:
        self.calls.append(("cancel", event.idempotency_key))

    def stats(self) -> object:
        return {}


class OutboxRemote(FakeRemote):
    def make_reporter(self) -> FakeReporter:
        return FakeReporter(self)


async def test_reservations_go_through_the_reporter(make: Any, tmp_path: Any) -> None:
    """prepare -> reporter.prepare, commit -> confirm, release -> cancel; unprepared -> enqueue."""
    provider = await make(OutboxRemote, outbox=tmp_path / "outbox.db")
    reporter = provider.reporter
    assert isinstance(reporter, FakeReporter) and reporter.opened
    provider.balances[(C, F)] = 10
    a = await _charge(provider)
    b = await provider.reserve(C, F)
    await provider.prepare(b)
    await provider.release(b)
    c = await provider.reserve(C, F)
    await provider.commit(c)
    d = await provider.reserve(C, F)
    await provider.release(d)
    ka, kb, kc = a.event.idempotency_key, b.event.idempotency_key, c.event.idempotency_key
    assert reporter.calls == [
        ("prepare", ka),
        ("confirm", ka),
        ("prepare", kb),
        ("cancel", kb),
        ("enqueue", kc),
    ]
    await provider.aclose()
    assert reporter.closed


async def test_denied_reservations_charge_nothing(make: Any, tmp_path: Any) -> None:
    """A denied or failed-closed reservation holds nothing and its commit records nothing."""
    provider = await make(OutboxRemote, outbox=tmp_path / "o.db", failure_policy="closed")
    denied = await provider.reserve(C, F)
    assert not denied.answer.ok and denied.answer.err is None
    await provider.prepare(denied)
    await provider.commit(denied)
    provider.fail = RetryableProviderError("down")
    refused = await provider.reserve("org:b", F)
    await provider.commit(refused)
    reporter = provider.reporter
    assert isinstance(reporter, FakeReporter) and reporter.calls == []


# -- lifecycle and configuration -------------------------------------------------------------


async def test_lifecycle_owns_its_client_and_reopens_with_a_new_one() -> None:
    """open() creates the client, aclose() closes it (idempotent); reopen makes a new one."""
    provider = FakeRemote()
    with pytest.raises(ConfigurationError):
        _ = provider.http
    with pytest.raises(ConfigurationError):
        await provider.can(C, F)
    await provider.open()
    await provider.open()
    client = provider.http
    assert isinstance(client, httpx.AsyncClient) and not client.is_closed
    await provider.aclose()
    await provider.aclose()
    assert client.is_closed and provider.state is ProviderState.CLOSED
    await provider.open()
    assert provider.http is not client and not provider.http.is_closed
    await provider.aclose()


async def test_an_injected_client_is_used_and_left_open() -> None:
    """A client passed in is the one `http` returns, and aclose() does not close it."""
    async with httpx.AsyncClient() as client:
        provider = FakeRemote(client=client)
        async with provider:
            assert provider.http is client
        assert not client.is_closed


async def test_scope_reaches_fetch(make: Any) -> None:
    """The ASGI scope given to reserve() is handed to fetch() (ARES reads the user token)."""
    provider = await make()
    scope: Any = {"type": "http", "headers": []}
    await provider.reserve(C, F, scope=scope)
    assert provider.scopes == [scope]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"cache_ttl": -1},
        {"deny_ttl": "1"},
        {"timeout": 0},
        {"cache_size": 0},
        {"breaker_failures": 0},
        {"failure_policy": "maybe"},
        {"feature_policy": {F: "sometimes"}},
        {"feature_ttl": {"convert": 1.0}},
    ],
)
def test_bad_configuration_is_refused(kwargs: dict[str, Any]) -> None:
    """Invalid settings raise ConfigurationError at construction."""
    with pytest.raises(ConfigurationError):
        FakeRemote(**kwargs)


def test_entitlement_requires_whole_units() -> None:
    """Entitlement.remaining must be an int; UNLIMITED marks no limit."""
    with pytest.raises(ValueError):
        Entitlement(limit=None, used=None, remaining=1.5)  # type: ignore[arg-type]
    assert Entitlement(limit=UNLIMITED, used=0, remaining=UNLIMITED).unlimited


async def test_the_durable_reporter_delivers_and_accounting_sees_it(
    make: Any, clock: Clock, tmp_path: Any
) -> None:
    """With a real outbox, prepared+committed charges reach report() once; released ones never."""
    provider = await make(outbox=tmp_path / "outbox.db", cache_ttl=1.0)
    assert provider.reporter is not None
    provider.balances[(C, F)] = 5
    await _charge(provider, units=2)
    dropped = await provider.reserve(C, F, 1)
    await provider.prepare(dropped)
    await provider.release(dropped)
    for _ in range(500):  # bounded: up to ~5 s
        if provider.charged(C, F):
            break
        await asyncio.sleep(0.01)
    await provider.aclose()
    assert [e.units for e in provider.recorded] == [2]
    assert provider.balances[(C, F)] == 3


async def test_closing_during_a_check_answers_the_waiters(make: Any) -> None:
    """aclose() while a fetch is in flight ends it; waiters get a failed check, not a hang."""
    provider = await make(failure_policy="closed")
    provider.gate = asyncio.Event()
    waiting = asyncio.create_task(provider.can(C, F))
    await provider.started.wait()
    await provider.aclose()
    answer = await waiting
    assert not answer.ok and isinstance(answer.err, RetryableProviderError)


async def test_idle_accounts_are_forgotten(make: Any, clock: Clock) -> None:
    """Local accounting for customers no longer seen is dropped, so memory stays bounded."""
    provider = await make(cache_size=1, cache_ttl=1.0)
    for i in range(3000):
        await provider.can(f"org:c{i}", F)
        if i % 500 == 499:
            clock.advance(100.0)
    assert len(provider._accounts) <= 2 * 1024 + 2


async def test_accounts_with_units_in_flight_are_kept(make: Any, clock: Clock) -> None:
    """An account holding units is never forgotten, however many customers come after."""
    provider = await make(cache_size=1, cache_ttl=1.0)
    provider.balances[(C, F)] = 1
    held = await provider.reserve(C, F)
    for i in range(3000):
        await provider.can(f"org:c{i}", F)
        clock.advance(1.0)
    assert not (await provider.reserve(C, F)).answer.ok
    await provider.release(held)
    assert (await provider.can(C, F)).ok


def test_a_subclass_overriding_report_without_send_is_refused() -> None:
    """A RemoteProvider subclass must implement send(): one overriding only report() (which
    would bypass local accounting) is refused at construction, naming the fix."""

    class OldStyle(RemoteProvider):
        async def report(self, events: Sequence[UsageEvent]) -> None:
            return None

    with pytest.raises(ConfigurationError, match=r"implement send\(events\)"):
        OldStyle(outbox=None)


def test_charges_close_in_time_share_a_pending_record_and_count_until_the_latest_expires() -> None:
    """1,000 charges 1 ms apart keep a few dozen pending records (not one each while their
    deliveries are on the way), count every unit, stop counting no earlier than each one's
    delivery_allowance, and leave pending exactly as deliveries arrive."""
    account = Account(0.0)
    for i in range(1000):
        account.charge(i * 0.001, 1)
    assert account.pending == 1000
    assert len(account.queue) <= 25
    account.expire(600.5, 600.0)  # charges made after 0.5 s must still count
    assert 499 <= account.pending < 1000
    account.arrived(1.0, 300, True, 0.0)
    assert 199 <= account.pending < 700
    account.expire(600.999, 600.0)
    assert account.pending == 0
