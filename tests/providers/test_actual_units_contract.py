"""Units settled after the response, over every provider (the contract suite's subjects):
commit charges the actual units, gives the rest back, covers an excess from what is left,
and caps or charges what is beyond it per the overage policy."""

from __future__ import annotations

import itertools

import pytest

from tests.support.contract_subject import Subject
from usage_middleware.errors import ConfigurationError
from usage_middleware.ledger.engine import LeaseEngine
from usage_middleware.models import Reservation
from usage_middleware.provider import Provider
from usage_middleware.providers.ares import AresProvider
from usage_middleware.providers.remote import RemoteProvider

_ids = itertools.count()


def _customer() -> str:
    return f"org:actual{next(_ids)}"


def _leases_excess(provider: Provider) -> bool:
    """Whether the provider covers an excess from the rest of the budget (the lease engine:
    LocalLedger and RedisLedger; the remote providers)."""
    return isinstance(provider, LeaseEngine | RemoteProvider)


async def _reserve(subject: Subject, customer: str, feature: str, units: int) -> Reservation:
    reservation = await subject.provider.reserve(
        customer, feature, units, scope=subject.scope_for(customer)
    )
    assert reservation.ok
    return reservation


async def _settle(subject: Subject, reservation: Reservation, units: int, overage: str) -> int:
    await subject.provider.prepare(reservation, units=units, overage=overage)  # type: ignore[arg-type]
    return await subject.provider.commit(reservation, units=units, overage=overage)  # type: ignore[arg-type]


async def test_fewer_units_than_reserved_charge_the_actual_and_free_the_rest(
    subject: Subject, feature: str
) -> None:
    """Reserve 6 of 10, use 4: 4 are charged and the other 6 can be reserved at once."""
    customer = _customer()
    await subject.give(customer, feature, 10)
    reservation = await _reserve(subject, customer, feature, 6)
    assert await _settle(subject, reservation, 4, "cap") == 4
    again = await _reserve(subject, customer, feature, 6)
    await subject.provider.release(again)
    assert await subject.charged(customer, feature) == 4


async def test_zero_units_charge_nothing(subject: Subject, feature: str) -> None:
    """A request that reports 0 units is charged nothing and holds nothing after."""
    customer = _customer()
    await subject.give(customer, feature, 5)
    reservation = await _reserve(subject, customer, feature, 5)
    assert await _settle(subject, reservation, 0, "cap") == 0
    again = await _reserve(subject, customer, feature, 5)
    await subject.provider.release(again)
    assert await subject.charged(customer, feature) == 0


@pytest.mark.parametrize("overage", ["cap", "charge"])
async def test_an_excess_within_the_budget_is_charged(
    subject: Subject, feature: str, overage: str
) -> None:
    """Reserve 3 of 10, use 7: all 7 are charged (the excess comes from what is left)."""
    customer = _customer()
    await subject.give(customer, feature, 10)
    reservation = await _reserve(subject, customer, feature, 3)
    charged = await _settle(subject, reservation, 7, overage)
    expected = 7 if overage == "charge" or _leases_excess(subject.provider) else 3
    assert charged == expected
    assert await subject.charged(customer, feature) == expected


async def test_an_excess_beyond_the_budget_is_capped_under_cap(
    subject: Subject, feature: str
) -> None:
    """Reserve 6 of 10, use 15 with overage="cap": 10 are charged, never more than given."""
    customer = _customer()
    await subject.give(customer, feature, 10)
    reservation = await _reserve(subject, customer, feature, 6)
    charged = await _settle(subject, reservation, 15, "cap")
    expected = 10 if _leases_excess(subject.provider) else 6
    assert charged == expected
    assert await subject.charged(customer, feature) == expected


async def test_an_excess_beyond_the_budget_is_charged_under_charge(
    subject: Subject, feature: str
) -> None:
    """Reserve 6 of 10, use 15 with overage="charge": the provider is told all 15 (ARES,
    whose wallet cannot go below zero, takes the 10 it covers and refuses the overage
    event, which waits in the dead letters)."""
    customer = _customer()
    await subject.give(customer, feature, 10)
    reservation = await _reserve(subject, customer, feature, 6)
    assert await _settle(subject, reservation, 15, "charge") == 15
    expected = 10 if isinstance(subject.provider, AresProvider) else 15
    assert await subject.charged(customer, feature) == expected


async def test_bad_actual_units_raise_and_leave_the_hold_to_release(
    subject: Subject, feature: str
) -> None:
    """commit(units=-1 or 1.5) raises ValueError and settles nothing; release still works."""
    customer = _customer()
    await subject.give(customer, feature, 5)
    reservation = await _reserve(subject, customer, feature, 5)
    for bad in (-1, 1.5, True):
        with pytest.raises(ValueError):
            await subject.provider.commit(reservation, units=bad)  # type: ignore[arg-type]
    assert not reservation.settled
    await subject.provider.release(reservation)
    assert await subject.charged(customer, feature) == 0


def test_a_provider_whose_commit_ignores_the_actual_units_is_refused_at_definition() -> None:
    """A Provider subclass overriding commit/prepare without units= and overage= fails when
    the class is defined, naming the fix."""
    with pytest.raises(ConfigurationError, match=r"units, overage"):

        class Old(Provider):
            async def commit(self, reservation: Reservation) -> None:  # type: ignore[override]
                pass

    with pytest.raises(ConfigurationError, match=r"overage"):

        class Half(Provider):
            async def prepare(self, reservation: Reservation, *, units: int | None = None) -> None:  # type: ignore[override]
                pass
