"""The ledger contract: a provider that keeps plans, subscriptions, credits and usage itself.

Ledgers (:class:`~usage_middleware.ledger.LocalLedger`, ``RedisLedger``) are the source of
truth for usage; they implement real reservations (``reserve`` holds units so concurrent
requests cannot overspend, ``commit`` charges, ``release`` gives back) plus the admin
methods below.

Semantics every ledger shares (the contract suite in ``tests/test_ledger_contract.py``
pins them):

* Plans come from a Tier pricing.json (:mod:`usage_middleware.pricing`). A feature's limit
  is the largest ``upto`` across its tiers; no ``upto`` means unlimited
  (:data:`~usage_middleware.models.UNLIMITED`). The plan's ``interval`` is the usage period
  (calendar periods in UTC: day, ISO week from Monday, month, year).
* ``used`` counts every unit charged this period. Credits (Spaire's model) are per
  customer and feature and do not reset: ``balance = credited - consumed``, positive means
  available. A charge is taken from the plan's allowance first; the units beyond the limit
  consume credits.
* ``can``/``reserve`` allow when ``used + held + units <= limit + balance``. A feature
  outside the customer's plan has limit 0 (Tier's ``0 < 0``): only credits can fund it.
  A customer with neither a subscription nor credits is denied with reason
  ``"unknown customer"``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from ..models import UNLIMITED
from ..pricing import Plan
from ..provider import Provider

__all__ = [
    "REASON_CLOSED",
    "REASON_FAILED",
    "REASON_LIMIT",
    "REASON_NOT_IN_PLAN",
    "REASON_UNKNOWN",
    "FeatureUsage",
    "Ledger",
    "usage_rows",
]

#: ``Answer.reason`` of a ledger's refusals, the same in every ledger.
REASON_UNKNOWN = "unknown customer"
REASON_NOT_IN_PLAN = "feature not in plan"
REASON_LIMIT = "limit reached"
REASON_CLOSED = "ledger closed"
REASON_FAILED = "ledger unavailable"


@dataclass(frozen=True, slots=True)
class FeatureUsage:
    """One row of :meth:`Ledger.usage`: a customer's standing on one feature.

    A ledger's report row (plan, period, credits), not a check's answer: checks answer
    with :class:`~usage_middleware.models.Answer`.

    Attributes:
        feature: the feature name.
        plan: the plan the feature comes from, or ``None`` for a credit-only feature.
        limit: units allowed this period (``UNLIMITED`` for no limit; 0 outside the plan).
        used: units charged this period.
        credits: credit balance in units (credited - consumed; positive = available).
        remaining: units that may still be used: ``max(0, limit - used) + credits``
            (``UNLIMITED`` when the limit is unlimited).
        period_start: start of the current usage period (aware UTC), or ``None`` for a
            credit-only feature.
        period_end: end of the current usage period (exclusive), or ``None``.
    """

    feature: str
    plan: str | None
    limit: int
    used: int
    credits: int
    remaining: int
    period_start: datetime | None
    period_end: datetime | None


def usage_rows(
    plan: Plan | None,
    credits: Mapping[str, int],
    used: Mapping[str, int],
    start: datetime,
    end: datetime,
) -> list[FeatureUsage]:
    """The rows of :meth:`Ledger.usage`, the same for every ledger.

    Args:
        plan: the customer's plan, or ``None`` for a credit-only customer.
        credits: credit balance in units per feature.
        used: units charged this period per feature.
        start, end: the current period of the plan (aware UTC).

    Returns one row per feature of the plan, with credits, or with usage, sorted by name.
    """
    features = set(credits) | set(used) | set(() if plan is None else plan.features)
    rows = []
    for feature in sorted(features):
        plan_feature = None if plan is None else plan.features.get(feature)
        limit = 0 if plan_feature is None else plan_feature.limit
        balance = credits.get(feature, 0)
        units = used.get(feature, 0)
        remaining = (
            UNLIMITED
            if limit >= UNLIMITED
            else min(UNLIMITED, max(0, max(0, limit - units) + balance))
        )
        in_plan = plan is not None and plan_feature is not None
        rows.append(
            FeatureUsage(
                feature=feature,
                plan=plan.name if plan is not None and plan_feature is not None else None,
                limit=limit,
                used=units,
                credits=balance,
                remaining=remaining,
                period_start=start if in_plan else None,
                period_end=end if in_plan else None,
            )
        )
    return rows


class Ledger(Provider):
    """A provider that is its own source of truth (see the module docstring)."""

    max_batch = 1000

    async def subscribe(self, customer: str, plan: str) -> None:
        """Put ``customer`` on ``plan`` (e.g. ``"plan:free@1"``), replacing any earlier plan.

        Raises:
            LedgerError: the plan is not in the pricing file.
            ValueError: the customer id is malformed.
        """
        raise NotImplementedError

    async def grant(self, customer: str, feature: str, units: int) -> int:
        """Credit ``units`` (> 0) of ``feature`` to ``customer``; return the new balance in units.

        Raises:
            ValueError: units is not a whole number > 0, or the customer id is malformed.
            ConfigurationError: the feature name is malformed.
        """
        raise NotImplementedError

    async def usage(self, customer: str) -> Sequence[FeatureUsage]:
        """The customer's standing per feature, sorted by feature name.

        Raises:
            LedgerError: the customer is unknown (no subscription and no credits).
        """
        raise NotImplementedError
