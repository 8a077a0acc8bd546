"""One behaviour suite run over every provider: each ``tests/support/contract_*.py`` module.

A module plugs in by defining ``make_subject(tmp_path)`` (see
``tests/support/contract_subject.py``) and being listed in ``tests/support/backends.py``.
The suite is provider-agnostic: it only uses ``give`` (set what the backend says is
available), the provider's reservation cycle, and ``charged`` (what the backend recorded).
"""

from __future__ import annotations

import asyncio
import itertools

from tests.support.contract_subject import Subject
from usage_middleware.models import Reservation

_ids = itertools.count()


def _customer() -> str:
    return f"org:contract{next(_ids)}"


async def _reserve(subject: Subject, customer: str, feature: str, units: int) -> Reservation:
    return await subject.provider.reserve(
        customer, feature, units, scope=subject.scope_for(customer)
    )


async def _charge(subject: Subject, reservation: Reservation) -> None:
    await subject.provider.prepare(reservation)
    await subject.provider.commit(reservation)


async def test_reserve_exactly_what_was_given(subject: Subject, feature: str) -> None:
    """Given N units, reserving N is allowed and nothing more is while it is held."""
    customer = _customer()
    await subject.give(customer, feature, 5)
    held = await _reserve(subject, customer, feature, 5)
    assert held.answer.ok and held.answer.err is None
    more = await _reserve(subject, customer, feature, 1)
    assert not more.answer.ok and more.answer.err is None
    await subject.provider.release(more)
    await subject.provider.release(held)


async def test_reserve_more_than_given_is_denied_with_402_semantics(
    subject: Subject, feature: str
) -> None:
    """Given N units, reserving N+1 is denied with ok False and err None (a 402, not a 503)."""
    customer = _customer()
    await subject.give(customer, feature, 5)
    denied = await _reserve(subject, customer, feature, 6)
    assert denied.answer.ok is False
    assert denied.answer.err is None
    await subject.provider.release(denied)
    assert await subject.charged(customer, feature) == 0


async def test_commit_charges_the_units_exactly_once(subject: Subject, feature: str) -> None:
    """A committed reservation of 3 units is recorded as 3 units, once, even if committed twice."""
    customer = _customer()
    await subject.give(customer, feature, 10)
    reservation = await _reserve(subject, customer, feature, 3)
    assert reservation.answer.ok
    await _charge(subject, reservation)
    await subject.provider.commit(reservation)  # a second settle is a no-op
    assert reservation.settled
    assert await subject.charged(customer, feature) == 3


async def test_release_charges_nothing_and_gives_units_back(subject: Subject, feature: str) -> None:
    """A released reservation (even after prepare) records nothing and frees its units."""
    customer = _customer()
    await subject.give(customer, feature, 4)
    reservation = await _reserve(subject, customer, feature, 4)
    assert reservation.answer.ok
    await subject.provider.prepare(reservation)
    await subject.provider.release(reservation)
    assert reservation.settled
    again = await _reserve(subject, customer, feature, 4)
    assert again.answer.ok
    await subject.provider.release(again)
    assert await subject.charged(customer, feature) == 0


async def test_committed_units_are_gone(subject: Subject, feature: str) -> None:
    """After all given units are committed, one more unit is denied (no overspend)."""
    customer = _customer()
    await subject.give(customer, feature, 3)
    for _ in range(3):
        reservation = await _reserve(subject, customer, feature, 1)
        assert reservation.answer.ok
        await _charge(subject, reservation)
    over = await _reserve(subject, customer, feature, 1)
    assert not over.answer.ok and over.answer.err is None
    await subject.provider.release(over)
    assert await subject.charged(customer, feature) == 3


async def test_answer_names_the_request_and_the_provider(subject: Subject, feature: str) -> None:
    """An Answer carries the customer, feature and units asked about, and its provider."""
    customer = _customer()
    await subject.give(customer, feature, 2)
    for units in (2, 3):
        reservation = await _reserve(subject, customer, feature, units)
        answer = reservation.answer
        assert (answer.customer, answer.feature, answer.units) == (customer, feature, units)
        assert answer.provider is subject.provider
        assert (reservation.customer, reservation.feature, reservation.units) == (
            customer,
            feature,
            units,
        )
        await subject.provider.release(reservation)


async def test_concurrent_reserves_never_exceed_what_was_given(
    subject: Subject, feature: str
) -> None:
    """50 concurrent 1-unit reserves against 10 given units: exactly 10 allowed and charged."""
    customer = _customer()
    await subject.give(customer, feature, 10)
    reservations = await asyncio.gather(
        *(_reserve(subject, customer, feature, 1) for _ in range(50))
    )
    allowed = [r for r in reservations if r.answer.ok]
    assert len(allowed) == 10
    assert all(r.answer.err is None for r in reservations)
    await asyncio.gather(*(_charge(subject, r) for r in allowed))
    for r in reservations:
        if not r.answer.ok:
            await subject.provider.release(r)
    assert await subject.charged(customer, feature) == 10


async def test_closed_provider_opens_again_and_charges(subject: Subject, feature: str) -> None:
    """aclose() then open() gives a working provider: it holds, charges and records (issue 11)."""
    customer = _customer()
    await subject.give(customer, feature, 5)
    first = await _reserve(subject, customer, feature, 2)
    assert first.answer.ok
    await _charge(subject, first)
    await subject.provider.aclose()
    await subject.provider.open()
    again = await _reserve(subject, customer, feature, 3)
    assert again.answer.ok and again.answer.err is None
    await _charge(subject, again)
    assert await subject.charged(customer, feature) == 5
    over = await _reserve(subject, customer, feature, 1)
    assert not over.answer.ok
