"""The semantics every ledger shares (ledger/base.py), run over each ledger of support/backends."""

from __future__ import annotations

import asyncio
import pathlib
import sqlite3
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta

import pytest

from tests.support.backends import LEDGERS, LedgerFactory
from usage_middleware.errors import ConfigurationError, LedgerError, PermanentProviderError
from usage_middleware.ledger import FeatureUsage, Ledger, LocalLedger
from usage_middleware.ledger.store import period_key
from usage_middleware.models import UNLIMITED, UsageEvent

PRICING = {
    "plans": {
        "plan:free@1": {
            "title": "Free",
            "interval": "@monthly",
            "features": {
                "feature:convert": {"tiers": [{"upto": 10}]},
                "feature:search": {"tiers": [{"upto": 100, "price": 0}]},
                "feature:open": {"tiers": [{"price": 0}]},
            },
        },
        "plan:pro@1": {
            "interval": "@monthly",
            "features": {"feature:convert": {"tiers": [{"upto": 10}, {"upto": 1000}]}},
        },
        "plan:daily@1": {
            "interval": "@daily",
            "features": {"feature:convert": {"tiers": [{"upto": 5}]}},
        },
    }
}

ACME = "org:acme"
CONVERT = "feature:convert"


class Clock:
    """A settable clock for period tests."""

    def __init__(self, at: datetime) -> None:
        self.at = at

    def __call__(self) -> datetime:
        return self.at


@pytest.fixture(params=LEDGERS)
def factory(request: pytest.FixtureRequest) -> LedgerFactory:
    return request.param  # type: ignore[no-any-return]


@pytest.fixture
async def ledger(factory: LedgerFactory, tmp_path: pathlib.Path) -> AsyncIterator[Ledger]:
    async with factory(tmp_path, PRICING) as made:
        yield made


async def use(ledger: Ledger, customer: str, feature: str, units: int = 1) -> bool:
    """Reserve and, when allowed, commit; return whether it was allowed."""
    reservation = await ledger.reserve(customer, feature, units)
    if reservation.answer.ok:
        await ledger.commit(reservation)
    return reservation.answer.ok


async def row(ledger: Ledger, customer: str, feature: str) -> FeatureUsage:
    return next(r for r in await ledger.usage(customer) if r.feature == feature)


async def test_plan_limit_allows_exactly_the_limit(ledger: Ledger) -> None:
    """A plan's limit (largest upto) allows exactly that many units, then refuses."""
    await ledger.subscribe(ACME, "plan:free@1")
    assert [await use(ledger, ACME, CONVERT) for _ in range(10)] == [True] * 10
    refused = await ledger.reserve(ACME, CONVERT)
    assert not refused.answer.ok and refused.answer.err is None
    assert refused.answer.reason == "limit reached"
    assert (refused.answer.limit, refused.answer.used, refused.answer.remaining) == (10, 10, 0)
    assert (await row(ledger, ACME, CONVERT)).used == 10


async def test_units_above_one_count_against_the_limit(ledger: Ledger) -> None:
    """A reservation of n units needs n units left and charges n."""
    await ledger.subscribe(ACME, "plan:free@1")
    assert await use(ledger, ACME, CONVERT, 7)
    assert not await use(ledger, ACME, CONVERT, 4)
    assert await use(ledger, ACME, CONVERT, 3)
    assert (await row(ledger, ACME, CONVERT)).used == 10


async def test_unlimited_feature_is_always_allowed_and_counted(ledger: Ledger) -> None:
    """A feature without upto is unlimited: always allowed, usage still recorded."""
    await ledger.subscribe(ACME, "plan:free@1")
    for _ in range(50):
        reservation = await ledger.reserve(ACME, "feature:open", 3)
        assert reservation.answer.ok
        assert reservation.answer.limit == UNLIMITED
        assert reservation.answer.remaining == UNLIMITED
        await ledger.commit(reservation)
    usage = await row(ledger, ACME, "feature:open")
    assert (usage.used, usage.limit, usage.remaining) == (150, UNLIMITED, UNLIMITED)


async def test_credits_fund_the_excess_and_are_consumed_only_beyond_the_limit(
    ledger: Ledger,
) -> None:
    """Credits allow units beyond the limit; the plan allowance is used first."""
    await ledger.subscribe(ACME, "plan:free@1")
    assert await ledger.grant(ACME, CONVERT, 3) == 3
    for _ in range(10):
        assert await use(ledger, ACME, CONVERT)
    usage = await row(ledger, ACME, CONVERT)
    assert (usage.used, usage.credits, usage.remaining) == (10, 3, 3)
    for _ in range(3):
        assert await use(ledger, ACME, CONVERT)
    assert not await use(ledger, ACME, CONVERT)
    usage = await row(ledger, ACME, CONVERT)
    assert (usage.used, usage.credits, usage.remaining) == (13, 0, 0)


async def test_grant_after_limit_reached_allows_again(ledger: Ledger) -> None:
    """A customer refused at the limit is allowed again once credits are granted."""
    await ledger.subscribe(ACME, "plan:free@1")
    for _ in range(10):
        await use(ledger, ACME, CONVERT)
    assert not await use(ledger, ACME, CONVERT)
    assert await ledger.grant(ACME, CONVERT, 2) == 2
    assert await use(ledger, ACME, CONVERT, 2)
    assert not await use(ledger, ACME, CONVERT)


async def test_feature_outside_the_plan_is_refused_without_credits(ledger: Ledger) -> None:
    """A feature not in the customer's plan has limit 0 (Tier's 0 < 0): refused."""
    await ledger.subscribe(ACME, "plan:free@1")
    refused = await ledger.reserve(ACME, "feature:other")
    assert not refused.answer.ok and refused.answer.err is None
    assert refused.answer.reason == "feature not in plan"
    assert (refused.answer.limit, refused.answer.remaining) == (0, 0)


async def test_feature_outside_the_plan_is_funded_by_credits(ledger: Ledger) -> None:
    """Credits alone fund a feature outside the plan, and are consumed unit for unit."""
    await ledger.subscribe(ACME, "plan:free@1")
    await ledger.grant(ACME, "feature:other", 2)
    assert await use(ledger, ACME, "feature:other")
    assert await use(ledger, ACME, "feature:other")
    assert not await use(ledger, ACME, "feature:other")
    usage = await row(ledger, ACME, "feature:other")
    assert (usage.plan, usage.limit, usage.used, usage.credits) == (None, 0, 2, 0)


async def test_credit_only_customer_is_known(ledger: Ledger) -> None:
    """A customer with credits and no subscription may use exactly its credits."""
    await ledger.grant("org:credits", CONVERT, 3)
    assert await use(ledger, "org:credits", CONVERT, 3)
    assert not await use(ledger, "org:credits", CONVERT)
    assert [r.feature for r in await ledger.usage("org:credits")] == [CONVERT]


async def test_unknown_customer_is_refused_with_a_reason(ledger: Ledger) -> None:
    """No subscription and no credits: refused with reason 'unknown customer'."""
    refused = await ledger.reserve("org:nobody", CONVERT)
    assert not refused.answer.ok and refused.answer.err is None
    assert refused.answer.reason == "unknown customer"
    assert not (await ledger.can("org:nobody", CONVERT)).ok
    with pytest.raises(LedgerError, match="org:nobody"):
        await ledger.usage("org:nobody")


async def test_held_units_are_refused_to_others_until_released(ledger: Ledger) -> None:
    """A reservation holds its units; release gives them back without charging."""
    await ledger.subscribe(ACME, "plan:free@1")
    first = await ledger.reserve(ACME, CONVERT, 7)
    assert first.answer.ok
    assert not (await ledger.reserve(ACME, CONVERT, 4)).answer.ok
    assert not (await ledger.can(ACME, CONVERT, 4)).ok
    await ledger.release(first)
    second = await ledger.reserve(ACME, CONVERT, 10)
    assert second.answer.ok
    await ledger.release(second)
    assert (await row(ledger, ACME, CONVERT)).used == 0


async def test_commit_charges_exactly_once(ledger: Ledger) -> None:
    """Settling a reservation again (commit twice, release after commit) charges nothing more."""
    await ledger.subscribe(ACME, "plan:free@1")
    reservation = await ledger.reserve(ACME, CONVERT, 3)
    await ledger.commit(reservation)
    await ledger.commit(reservation)
    await ledger.release(reservation)
    assert reservation.settled
    assert (await row(ledger, ACME, CONVERT)).used == 3
    assert (await ledger.reserve(ACME, CONVERT, 7)).answer.ok


async def test_committing_a_refused_reservation_charges_nothing(ledger: Ledger) -> None:
    """A refused reservation holds nothing, and committing it charges nothing."""
    await ledger.subscribe(ACME, "plan:free@1")
    refused = await ledger.reserve(ACME, CONVERT, 11)
    assert not refused.answer.ok
    await ledger.commit(refused)
    assert (await row(ledger, ACME, CONVERT)).used == 0


async def test_can_holds_nothing(ledger: Ledger) -> None:
    """can() answers without holding: asking twice for all units says yes twice."""
    await ledger.subscribe(ACME, "plan:free@1")
    assert (await ledger.can(ACME, CONVERT, 10)).ok
    assert (await ledger.can(ACME, CONVERT, 10)).ok
    assert not (await ledger.can(ACME, CONVERT, 11)).ok
    assert (await ledger.reserve(ACME, CONVERT, 10)).answer.ok


async def test_answer_numbers_after_a_reservation(ledger: Ledger) -> None:
    """Answer: limit from the plan, used = charged so far, remaining after this hold."""
    await ledger.subscribe(ACME, "plan:free@1")
    for _ in range(3):
        await use(ledger, ACME, CONVERT)
    await ledger.usage(ACME)  # everything written
    reservation = await ledger.reserve(ACME, CONVERT, 2)
    answer = reservation.answer
    assert (answer.ok, answer.limit, answer.used, answer.remaining) == (True, 10, 3, 5)
    assert (answer.customer, answer.feature, answer.units) == (ACME, CONVERT, 2)
    assert answer.provider is ledger


async def test_answer_report_records_usage(ledger: Ledger) -> None:
    """Answer.report(n), as in Tier's SDK, records n units with the ledger."""
    await ledger.subscribe(ACME, "plan:free@1")
    answer = await ledger.can(ACME, CONVERT)
    await answer.report(4)
    assert (await row(ledger, ACME, CONVERT)).used == 4


async def test_report_ignores_a_repeated_idempotency_key(ledger: Ledger) -> None:
    """report(): an event whose idempotency key was recorded before is not counted again."""
    await ledger.subscribe(ACME, "plan:free@1")
    event = UsageEvent(ACME, CONVERT, 2)
    await ledger.report([event, event])
    await ledger.report([event])
    assert (await row(ledger, ACME, CONVERT)).used == 2
    await ledger.report([UsageEvent(ACME, CONVERT, 1)])
    assert (await row(ledger, ACME, CONVERT)).used == 3


async def test_report_clobber_sets_the_period_usage(ledger: Ledger) -> None:
    """report() with clobber replaces the period's used instead of adding to it."""
    await ledger.subscribe(ACME, "plan:free@1")
    await ledger.report([UsageEvent(ACME, CONVERT, 4)])
    await ledger.report([UsageEvent(ACME, CONVERT, 7, clobber=True)])
    assert (await row(ledger, ACME, CONVERT)).used == 7
    await ledger.report([UsageEvent(ACME, CONVERT, 0, clobber=True)])
    assert (await row(ledger, ACME, CONVERT)).used == 0
    assert await use(ledger, ACME, CONVERT, 10)


async def test_reported_usage_counts_against_the_limit(ledger: Ledger) -> None:
    """Usage recorded with report() is seen by later reservations."""
    await ledger.subscribe(ACME, "plan:free@1")
    assert (await ledger.reserve(ACME, CONVERT)).answer.ok  # warm
    await ledger.report([UsageEvent(ACME, CONVERT, 8)])
    assert not (await ledger.reserve(ACME, CONVERT, 2)).answer.ok
    assert (await ledger.reserve(ACME, CONVERT, 1)).answer.ok


async def test_report_for_an_unknown_customer_is_permanent(ledger: Ledger) -> None:
    """report() refuses an unknown customer with a permanent error and records nothing."""
    await ledger.subscribe(ACME, "plan:free@1")
    with pytest.raises(PermanentProviderError, match="org:nobody"):
        await ledger.report([UsageEvent(ACME, CONVERT, 1), UsageEvent("org:nobody", CONVERT, 1)])
    assert (await row(ledger, ACME, CONVERT)).used == 0


async def test_usage_lists_plan_and_credit_features(ledger: Ledger) -> None:
    """usage(): one row per plan feature and credited feature, sorted, with the numbers."""
    await ledger.subscribe(ACME, "plan:free@1")
    await ledger.grant(ACME, "feature:other", 5)
    await use(ledger, ACME, CONVERT, 4)
    rows = await ledger.usage(ACME)
    assert [r.feature for r in rows] == [
        CONVERT,
        "feature:open",
        "feature:other",
        "feature:search",
    ]
    convert, unlimited, other, search = rows
    assert (convert.plan, convert.limit, convert.used, convert.credits, convert.remaining) == (
        "plan:free@1",
        10,
        4,
        0,
        6,
    )
    assert convert.period_start is not None and convert.period_end is not None
    assert convert.period_start.tzinfo is not None
    assert convert.period_start <= datetime.now(UTC) < convert.period_end
    assert (unlimited.limit, unlimited.remaining) == (UNLIMITED, UNLIMITED)
    assert (other.plan, other.limit, other.credits, other.remaining) == (None, 0, 5, 5)
    assert (other.period_start, other.period_end) == (None, None)
    assert (search.limit, search.used, search.remaining) == (100, 0, 100)


async def test_subscribe_to_an_unknown_plan_names_the_known_plans(ledger: Ledger) -> None:
    """subscribe() with a plan not in the pricing raises LedgerError listing the plans."""
    with pytest.raises(LedgerError, match=r"plan:nope@1.*plan:daily@1, plan:free@1, plan:pro@1"):
        await ledger.subscribe(ACME, "plan:nope@1")


async def test_resubscribing_changes_the_limit_and_keeps_the_usage(ledger: Ledger) -> None:
    """Moving to another plan mid-period applies its limit to the usage so far."""
    await ledger.subscribe(ACME, "plan:free@1")
    for _ in range(10):
        await use(ledger, ACME, CONVERT)
    assert not await use(ledger, ACME, CONVERT)
    await ledger.subscribe(ACME, "plan:pro@1")
    assert await use(ledger, ACME, CONVERT, 990)
    assert not await use(ledger, ACME, CONVERT)
    assert (await row(ledger, ACME, CONVERT)).used == 1000


@pytest.mark.parametrize("units", [0, -1, 1.5, True, "1"])
async def test_bad_units_raise_value_error(ledger: Ledger, units: object) -> None:
    """grant()/reserve() with units that are not a whole number > 0 raise ValueError."""
    await ledger.subscribe(ACME, "plan:free@1")
    with pytest.raises(ValueError, match="units"):
        await ledger.grant(ACME, CONVERT, units)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="units"):
        await ledger.reserve(ACME, CONVERT, units)  # type: ignore[arg-type]


async def test_bad_names_raise(ledger: Ledger) -> None:
    """A malformed feature is a ConfigurationError; a malformed customer a ValueError."""
    with pytest.raises(ConfigurationError, match="feature"):
        await ledger.grant(ACME, "feature:bad_name", 1)
    with pytest.raises(ConfigurationError, match="feature"):
        await ledger.reserve(ACME, "convert")
    with pytest.raises(ValueError, match="customer"):
        await ledger.subscribe("org acme", "plan:free@1")


async def test_a_new_period_starts_from_zero(
    factory: LedgerFactory, tmp_path: pathlib.Path
) -> None:
    """Usage resets at the plan's period boundary (UTC calendar day for @daily)."""
    clock = Clock(datetime(2026, 3, 1, 23, 59, tzinfo=UTC))
    async with factory(tmp_path, PRICING, now=clock) as ledger:
        await ledger.subscribe(ACME, "plan:daily@1")
        for _ in range(5):
            assert await use(ledger, ACME, CONVERT)
        assert not await use(ledger, ACME, CONVERT)
        held = await ledger.reserve(ACME, CONVERT)
        assert not held.answer.ok
        clock.at += timedelta(minutes=2)  # 2026-03-02 00:01
        for _ in range(5):
            assert await use(ledger, ACME, CONVERT)
        assert not await use(ledger, ACME, CONVERT)
        usage = await row(ledger, ACME, CONVERT)
        assert usage.used == 5
        assert usage.period_start == datetime(2026, 3, 2, tzinfo=UTC)
        assert usage.period_end == datetime(2026, 3, 3, tzinfo=UTC)


async def test_a_reservation_from_the_old_period_is_charged_there(
    factory: LedgerFactory, tmp_path: pathlib.Path
) -> None:
    """A reservation made before the boundary and committed after counts in its own period."""
    clock = Clock(datetime(2026, 3, 1, 23, 59, tzinfo=UTC))
    async with factory(tmp_path, PRICING, now=clock) as ledger:
        await ledger.subscribe(ACME, "plan:daily@1")
        late = await ledger.reserve(ACME, CONVERT, 5)
        assert late.answer.ok
        clock.at += timedelta(minutes=2)
        assert await use(ledger, ACME, CONVERT, 5)
        await ledger.commit(late)
        assert (await row(ledger, ACME, CONVERT)).used == 5


async def test_100_concurrent_reserves_race_for_the_last_10_units(ledger: Ledger) -> None:
    """100 concurrent reservations with 10 units left: exactly 10 succeed, 100 charged."""
    await ledger.subscribe(ACME, "plan:free@1")
    await ledger.report([UsageEvent(ACME, "feature:search", 90)])
    reservations = await asyncio.gather(
        *(ledger.reserve(ACME, "feature:search") for _ in range(100))
    )
    allowed = [r for r in reservations if r.answer.ok]
    assert len(allowed) == 10
    await asyncio.gather(*(ledger.commit(r) for r in allowed))
    usage = await row(ledger, ACME, "feature:search")
    assert (usage.used, usage.remaining) == (100, 0)


async def test_concurrent_reserve_commit_release_never_overspends(ledger: Ledger) -> None:
    """Many tasks reserving, committing and releasing charge at most the limit, and all of it."""
    await ledger.subscribe(ACME, "plan:free@1")
    allowed = 0

    async def worker(n: int) -> None:
        nonlocal allowed
        for i in range(30):
            reservation = await ledger.reserve(ACME, "feature:search")
            if not reservation.answer.ok:
                continue
            await asyncio.sleep(0)
            if (n + i) % 3 == 0:
                await ledger.release(reservation)
            else:
                allowed += 1
                await ledger.commit(reservation)

    await asyncio.gather(*(worker(n) for n in range(20)))
    usage = await row(ledger, ACME, "feature:search")
    assert usage.used == allowed == 100


async def seed_totals(
    ledger: Ledger, customer: str, feature: str, *, used: int, credited: int, consumed: int
) -> None:
    """Write raw totals into a ledger's storage (2**63-1 is out of reach of 10**15-unit calls)."""
    current = await row(ledger, customer, feature)
    assert current.period_start is not None and current.period_end is not None
    period = period_key(current.period_start, current.period_end)
    if isinstance(ledger, LocalLedger):
        with sqlite3.connect(ledger.path) as conn:
            conn.execute(
                "INSERT INTO usage (customer, feature, period, used) VALUES (?, ?, ?, ?)",
                (customer, feature, period, used),
            )
            conn.execute(
                "INSERT INTO credits (customer, feature, credited, consumed) VALUES (?, ?, ?, ?)",
                (customer, feature, credited, consumed),
            )
        return
    from usage_middleware.ledger.redis import RedisLedger, customer_keys

    assert isinstance(ledger, RedisLedger) and ledger.client is not None
    keys = customer_keys(ledger._prefix, customer)
    await ledger.client.hset(keys["usage"], f"{feature}@{period}", used)
    await ledger.client.hset(
        keys["credits"], mapping={f"+{feature}": credited, f"-{feature}": consumed}
    )


async def test_totals_stop_at_2_63_minus_1_instead_of_failing(ledger: Ledger) -> None:
    """Credit and usage sums past 2**63-1 clamp at UNLIMITED; the ledger keeps charging."""
    await ledger.subscribe(ACME, "plan:free@1")
    await ledger.subscribe("org:other", "plan:free@1")
    await seed_totals(ledger, ACME, CONVERT, used=UNLIMITED - 5, credited=UNLIMITED - 1, consumed=0)
    assert await ledger.grant(ACME, CONVERT, 10) == UNLIMITED  # credited clamped, an int
    assert await use(ledger, ACME, CONVERT, 10)
    assert await use(ledger, "org:other", CONVERT, 3)
    assert (await row(ledger, ACME, CONVERT)).used == UNLIMITED
    assert (await row(ledger, "org:other", CONVERT)).used == 3
    assert await use(ledger, "org:other", CONVERT, 2)
    assert (await row(ledger, "org:other", CONVERT)).used == 5
