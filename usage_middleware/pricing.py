"""Plans and limits from a Tier pricing.json, and the calendar usage periods.

A pricing.json (schema: Tier's ``pricing.schema.json``) maps plans to features::

    {"plans": {"plan:free@1": {"title": "Free", "interval": "@monthly",
                               "features": {"feature:convert": {"tiers": [{"upto": 100}]}}}}}

What the ledgers take from it (Tier's own rules, reference ``tier.md`` §2 "limit" and §3):

* plan names are ``plan:<name>@<version>`` (``[a-zA-Z0-9:]+`` then ``@[a-zA-Z0-9]+``);
  feature names are ``feature:[a-zA-Z0-9:]+``.
* Tiers are listed in ascending ``upto`` order; only the last may leave ``upto`` out
  (open-ended). ``upto`` is a whole number from 0 to 2**63-1.
* A feature's limit is the largest (last) ``upto``, in units per period. A last tier
  without ``upto``, or a feature with no or empty ``tiers``, means unlimited
  (:data:`~usage_middleware.models.UNLIMITED`) -- as Tier, where a licensed feature without
  tiers has limit Inf.
* ``interval`` (``@daily``, ``@weekly``, ``@monthly``, ``@yearly``) is the usage period; a
  plan without one gets ``@monthly``, Tier's default.

Validation is hand-written and as strict as Tier's decoder (unknown keys are errors, also
inside ``divide``, which the published schema leaves open by mistake; so is a key given
twice in one object of a pricing read from text). ``price`` and ``base`` must be finite
numbers >= 0. ``price``, ``base``,
``mode``, ``aggregate``, ``currency`` and ``divide`` are checked for shape but not used by
the ledgers: a ledger always sums units per period.
"""

from __future__ import annotations

import json
import math
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from types import MappingProxyType
from typing import Any, Literal, cast, get_args

from .errors import PricingError
from .models import FEATURE_RE, UNLIMITED

__all__ = [
    "DEFAULT_INTERVAL",
    "Interval",
    "Plan",
    "PlanFeature",
    "Pricing",
    "load_pricing",
    "loads_pricing",
    "period_bounds",
]

#: A plan's usage period (Tier's ``interval``).
Interval = Literal["@daily", "@weekly", "@monthly", "@yearly"]
INTERVALS: tuple[Interval, ...] = get_args(Interval)
#: The interval of a plan that names none (Tier's default).
DEFAULT_INTERVAL: Interval = "@monthly"

PLAN_RE = re.compile(r"plan:[a-zA-Z0-9:]+@[a-zA-Z0-9]+")

_TOP_KEYS = ("plans",)
_PLAN_KEYS = ("currency", "features", "interval", "title")
_FEATURE_KEYS = ("aggregate", "base", "divide", "mode", "tiers", "title")
_TIER_KEYS = ("base", "price", "upto")
_DIVIDE_KEYS = ("by", "rounding")
_ENUMS: dict[str, tuple[str, ...]] = {
    "aggregate": ("sum", "max", "last", "perpetual"),
    "mode": ("graduated", "volume"),
    "rounding": ("up",),
}


@dataclass(frozen=True, slots=True)
class PlanFeature:
    """A feature of a plan.

    Attributes:
        name: the feature name, ``feature:[a-zA-Z0-9:]+``.
        limit: units allowed per period; ``UNLIMITED`` when no tier has an ``upto`` bound.
    """

    name: str
    limit: int

    @property
    def unlimited(self) -> bool:
        return self.limit >= UNLIMITED


@dataclass(frozen=True, slots=True)
class Plan:
    """A plan: its features and the usage period they reset on.

    Attributes:
        name: ``plan:<name>@<version>``, e.g. ``plan:free@1``.
        title: the plan's ``title``, or its name when the file gives none.
        interval: the usage period (``@monthly`` when the file gives none).
        features: feature name -> :class:`PlanFeature` (read-only).
    """

    name: str
    title: str
    interval: Interval
    features: Mapping[str, PlanFeature]


@dataclass(frozen=True, slots=True)
class Pricing:
    """A validated pricing model: plan name -> :class:`Plan` (read-only mapping)."""

    plans: Mapping[str, Plan]

    def to_json(self) -> str:
        """This model as a minimal pricing.json that :func:`loads_pricing` reads back equal.

        Only what the ledgers use is kept (titles, intervals, limits), not prices.
        """
        plans: dict[str, Any] = {}
        for plan in self.plans.values():
            features: dict[str, Any] = {}
            for feature in plan.features.values():
                tier = {} if feature.unlimited else {"upto": feature.limit}
                features[feature.name] = {"tiers": [tier]}
            plans[plan.name] = {
                "title": plan.title,
                "interval": plan.interval,
                "features": features,
            }
        return json.dumps({"plans": plans}, sort_keys=True, separators=(",", ":"))


def load_pricing(source: str | os.PathLike[str] | Mapping[str, Any]) -> Pricing:
    """Load and validate a Tier pricing.json.

    Args:
        source: the path of a pricing.json file, or its already-decoded JSON object.

    Returns:
        the validated :class:`Pricing`.

    Raises:
        PricingError: the file is missing or unreadable, is not JSON (the message gives the
            line and column), or does not validate (the message names the plan and feature
            and says what to change).
    """
    if isinstance(source, Mapping):
        return _validate(source, origin="pricing")
    if not isinstance(source, str | os.PathLike):
        raise PricingError(
            f"pricing must be a path to a pricing.json or its decoded JSON object, "
            f"got {type(source).__name__}"
        )
    path = os.fspath(source)
    try:
        with open(path, encoding="utf-8") as file:
            text = file.read()
    except FileNotFoundError:
        raise PricingError(
            f"pricing file {path!r} not found; pass the path of a Tier pricing.json"
        ) from None
    except (OSError, UnicodeDecodeError) as exc:
        raise PricingError(f"cannot read pricing file {path!r}: {exc}") from exc
    return loads_pricing(text, origin=path)


def loads_pricing(text: str, *, origin: str = "pricing") -> Pricing:
    """Validate a pricing.json given as text; ``origin`` names it in error messages.

    Raises:
        PricingError: as :func:`load_pricing`.
    """
    try:
        document = json.loads(text, object_pairs_hook=_Decoded.from_pairs)
    except json.JSONDecodeError as exc:
        raise PricingError(
            f"{origin} is not valid JSON: {exc.msg} at line {exc.lineno} column {exc.colno}"
        ) from None
    except RecursionError:
        raise PricingError(f"{origin} is nested too deeply to be a pricing.json") from None
    return _validate(document, origin=origin)


def period_bounds(interval: Interval, at: datetime) -> tuple[datetime, datetime]:
    """The calendar period of ``interval`` that contains ``at``, as ``(start, end)`` in UTC.

    Periods are UTC calendar units: a day from midnight; an ISO week from Monday midnight;
    a month from the 1st; a year from January 1st. ``end`` is exclusive (the next start).

    Raises:
        ValueError: ``at`` is naive, or ``interval`` is not one of ``INTERVALS``.
    """
    if at.utcoffset() is None:
        raise ValueError(f"period_bounds needs an aware datetime, got {at!r}")
    at = at.astimezone(UTC)
    day = at.replace(hour=0, minute=0, second=0, microsecond=0)
    if interval == "@daily":
        return day, day + timedelta(days=1)
    if interval == "@weekly":
        start = day - timedelta(days=day.weekday())
        return start, start + timedelta(days=7)
    if interval == "@monthly":
        start = day.replace(day=1)
        if start.month == 12:
            return start, start.replace(year=start.year + 1, month=1)
        return start, start.replace(month=start.month + 1)
    if interval == "@yearly":
        start = day.replace(month=1, day=1)
        return start, start.replace(year=start.year + 1)
    raise ValueError(f"interval must be one of {', '.join(INTERVALS)}, got {interval!r}")


# -- validation ------------------------------------------------------------------------------


def _validate(document: object, *, origin: str) -> Pricing:
    top = _object(document, f"{origin}: the top level", 'an object like {"plans": {...}}')
    _keys(top, _TOP_KEYS, f"{origin}: the top level")
    plans_doc = _object(
        top.get("plans", {}), f"{origin}: 'plans'", "an object of plan name -> plan"
    )
    plans: dict[str, Plan] = {}
    for name, plan_doc in plans_doc.items():
        _check_plan_name(name, origin)
        plans[name] = _plan(name, plan_doc, f"{origin}: plan {name!r}")
    return Pricing(plans=MappingProxyType(plans))


def _plan(name: str, document: object, where: str) -> Plan:
    plan = _object(document, where, "an object with title, interval and features")
    _keys(plan, _PLAN_KEYS, where)
    title = plan.get("title", name)
    _string(title, f"{where}: 'title'")
    _string(plan.get("currency", ""), f"{where}: 'currency'")
    interval = plan.get("interval", DEFAULT_INTERVAL)
    if interval not in INTERVALS:
        raise PricingError(
            f"{where}: interval {interval!r} is not one of {', '.join(INTERVALS)}; "
            f"fix it or leave it out for {DEFAULT_INTERVAL}"
        )
    features_doc = _object(
        plan.get("features", {}), f"{where}: 'features'", "an object of feature name -> feature"
    )
    features: dict[str, PlanFeature] = {}
    for feature_name, feature_doc in features_doc.items():
        if not isinstance(feature_name, str) or FEATURE_RE.fullmatch(feature_name) is None:
            raise PricingError(
                f"{where}: feature name {feature_name!r} must match feature:[a-zA-Z0-9:]+ "
                "(no '_', '-', '.' or '@'), e.g. 'feature:convert'"
            )
        feature_where = f"{where} feature {feature_name!r}"
        features[feature_name] = PlanFeature(feature_name, _limit(feature_doc, feature_where))
    return Plan(
        name=name,
        title=cast(str, title),
        interval=cast(Interval, interval),
        features=MappingProxyType(features),
    )


def _limit(document: object, where: str) -> int:
    feature = _object(document, where, 'an object such as {"tiers": [{"upto": 100}]}')
    _keys(feature, _FEATURE_KEYS, where)
    _string(feature.get("title", ""), f"{where}: 'title'")
    for key in ("aggregate", "mode"):
        if key in feature and feature[key] not in _ENUMS[key]:
            raise PricingError(
                f"{where}: {key} {feature[key]!r} is not one of {', '.join(_ENUMS[key])}"
            )
    _amount(feature.get("base", 0), f"{where}: 'base'")
    if "divide" in feature:
        divide = _object(feature["divide"], f"{where}: 'divide'", 'an object like {"by": 100}')
        _keys(divide, _DIVIDE_KEYS, f"{where}: 'divide'")
        _number(divide.get("by", 1), f"{where}: 'divide.by'")
        if divide.get("rounding", "up") not in _ENUMS["rounding"]:
            raise PricingError(f"{where}: divide.rounding must be 'up', got {divide['rounding']!r}")
    tiers = feature.get("tiers", [])
    if not isinstance(tiers, list):
        raise PricingError(f"{where}: 'tiers' must be a list of tiers, got {_kind(tiers)}")
    uptos: list[int | None] = []
    for index, tier_doc in enumerate(tiers):
        tier_where = f"{where} tiers[{index}]"
        tier = _object(tier_doc, tier_where, 'an object like {"upto": 100, "price": 0.01}')
        _keys(tier, _TIER_KEYS, tier_where)
        _amount(tier.get("price", 0), f"{tier_where}: 'price'")
        _amount(tier.get("base", 0), f"{tier_where}: 'base'")
        if "upto" not in tier:
            uptos.append(None)
            continue
        upto = tier["upto"]
        if isinstance(upto, bool) or not isinstance(upto, int) or upto < 0:
            raise PricingError(
                f"{tier_where}: 'upto' must be a whole number of units >= 0, got {upto!r}; "
                "leave 'upto' out for no limit"
            )
        if upto > UNLIMITED:
            raise PricingError(
                f"{tier_where}: 'upto' {upto} is above {UNLIMITED} (2**63-1), the most a ledger "
                "can count; lower it, or leave 'upto' out of the last tier for no limit"
            )
        uptos.append(upto)
    for index, upto in enumerate(uptos[:-1]):
        if upto is None:
            raise PricingError(
                f"{where} tiers[{index}]: only the last tier may leave out 'upto' (no limit); "
                "give this tier an 'upto', or move it to the end"
            )
        following = uptos[index + 1]
        if following is not None and following <= upto:
            raise PricingError(
                f"{where} tiers[{index + 1}]: 'upto' {following} is not above the previous "
                f"tier's {upto}; list tiers in ascending 'upto' order"
            )
    # No tiers, or a last tier without 'upto': unlimited. Else the last (largest) upto.
    if not uptos or uptos[-1] is None:
        return UNLIMITED
    return uptos[-1]


def _check_plan_name(name: object, origin: str) -> None:
    if isinstance(name, str) and PLAN_RE.fullmatch(name):
        return
    text = name if isinstance(name, str) else ""
    if not text.startswith("plan:"):
        why = "plan name must start with 'plan:'"
    elif "@" not in text:
        why = "plan must have a version, e.g. 'plan:free@1'"
    else:
        why = "plan name must match plan:[a-zA-Z0-9:]+@[a-zA-Z0-9]+"
    raise PricingError(f"{origin}: plan {name!r}: {why} (Tier's naming rule)")


class _Decoded(dict[str, Any]):
    """A JSON object as decoded from text, remembering the keys it had more than once."""

    __slots__ = ("duplicates",)

    duplicates: list[str]

    @classmethod
    def from_pairs(cls, pairs: list[tuple[str, Any]]) -> _Decoded:
        decoded = cls()
        decoded.duplicates = []
        for key, value in pairs:
            if key in decoded:
                decoded.duplicates.append(key)
            decoded[key] = value
        return decoded


def _object(value: object, where: str, expected: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise PricingError(f"{where} must be {expected}, got {_kind(value)}")
    if isinstance(value, _Decoded) and value.duplicates:
        raise PricingError(
            f"{where}: key {value.duplicates[0]!r} appears more than once (JSON would keep "
            "only the last); merge the two or rename one"
        )
    return value


def _keys(document: Mapping[str, Any], allowed: tuple[str, ...], where: str) -> None:
    for key in document:
        if key not in allowed:
            raise PricingError(
                f"{where}: unknown key {key!r}; allowed keys are {', '.join(allowed)}"
            )


def _string(value: object, where: str) -> None:
    if not isinstance(value, str):
        raise PricingError(f"{where} must be a string, got {_kind(value)}")


def _number(value: object, where: str) -> None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise PricingError(f"{where} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise PricingError(f"{where} must be a finite number, got {value!r}")


def _amount(value: object, where: str) -> None:
    """A price or base: a finite number >= 0."""
    _number(value, where)
    if cast(float, value) < 0:
        raise PricingError(f"{where} must be >= 0 (an amount charged), got {value!r}")


def _kind(value: object) -> str:
    names = {dict: "an object", list: "a list", str: "a string", bool: "a boolean"}
    return names.get(type(value), f"{value!r}")
