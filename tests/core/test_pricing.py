"""Loading and validating a Tier pricing.json, and the calendar usage periods."""

from __future__ import annotations

import json
import pathlib
from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest

from usage_middleware.errors import ConfigurationError, PricingError
from usage_middleware.models import UNLIMITED
from usage_middleware.pricing import Pricing, load_pricing, loads_pricing, period_bounds

GOOD: dict[str, Any] = {
    "plans": {
        "plan:free@1": {
            "title": "Free",
            "currency": "usd",
            "interval": "@daily",
            "features": {
                "feature:convert": {"tiers": [{"upto": 10, "price": 0}]},
                "feature:graduated": {
                    "mode": "graduated",
                    "aggregate": "sum",
                    "tiers": [{"upto": 5, "price": 0}, {"upto": 50, "price": 0.1, "base": 1}],
                },
                "feature:open": {"tiers": [{"upto": 10}, {"price": 1}]},
                "feature:seat": {"base": 100},
                "feature:divided": {"divide": {"by": 100, "rounding": "up"}, "tiers": [{}]},
            },
        },
        "plan:pro:team@v2": {"features": {"feature:convert": {"tiers": [{"upto": 0}]}}},
    }
}


def plan_with(feature: dict[str, Any]) -> dict[str, Any]:
    return {"plans": {"plan:free@1": {"features": {"feature:x": feature}}}}


def test_limits_are_the_largest_upto_and_no_upto_is_unlimited() -> None:
    """limit = largest upto across tiers; a tier without upto, or no tiers, = UNLIMITED."""
    pricing = load_pricing(GOOD)
    features = pricing.plans["plan:free@1"].features
    assert {name: f.limit for name, f in features.items()} == {
        "feature:convert": 10,
        "feature:graduated": 50,
        "feature:open": UNLIMITED,
        "feature:seat": UNLIMITED,
        "feature:divided": UNLIMITED,
    }
    assert pricing.plans["plan:pro:team@v2"].features["feature:convert"].limit == 0


def test_plan_fields_and_defaults() -> None:
    """A plan keeps its title and interval; without them: its name and @monthly (Tier's)."""
    pricing = load_pricing(GOOD)
    free = pricing.plans["plan:free@1"]
    assert (free.name, free.title, free.interval) == ("plan:free@1", "Free", "@daily")
    pro = pricing.plans["plan:pro:team@v2"]
    assert (pro.title, pro.interval) == ("plan:pro:team@v2", "@monthly")


def test_loaded_pricing_is_read_only() -> None:
    """Pricing.plans and Plan.features cannot be changed by the caller."""
    pricing = load_pricing(GOOD)
    with pytest.raises(TypeError):
        pricing.plans["plan:x@1"] = pricing.plans["plan:free@1"]  # type: ignore[index]


def test_load_from_a_file(tmp_path: pathlib.Path) -> None:
    """A path (str or PathLike) to a pricing.json loads the same model as the dict."""
    path = tmp_path / "pricing.json"
    path.write_text(json.dumps(GOOD))
    assert load_pricing(path) == load_pricing(str(path)) == load_pricing(GOOD)


def test_empty_pricing_has_no_plans() -> None:
    """{} and {"plans": {}} are valid and define no plans."""
    assert dict(load_pricing({}).plans) == {}
    assert dict(load_pricing({"plans": {}}).plans) == {}


def test_to_json_round_trips() -> None:
    """Pricing.to_json() reads back to an equal model (what the ledger stores)."""
    pricing = load_pricing(GOOD)
    assert loads_pricing(pricing.to_json()) == pricing
    assert isinstance(loads_pricing(pricing.to_json()), Pricing)


@pytest.mark.parametrize(
    ("document", "expected"),
    [
        ({"plan": {}}, r"unknown key 'plan'; allowed keys are plans"),
        ({"plans": []}, r"'plans' must be an object"),
        ({"plans": {"free": {}}}, r"plan 'free': plan name must start with 'plan:'"),
        ({"plans": {"plan:free": {}}}, r"plan 'plan:free': plan must have a version"),
        ({"plans": {"plan:fr_ee@1": {}}}, r"plan 'plan:fr_ee@1': plan name must match"),
        ({"plans": {"plan:free@1": {"intervals": "@daily"}}}, r"plan 'plan:free@1': unknown key"),
        (
            {"plans": {"plan:free@1": {"interval": "@hourly"}}},
            r"plan 'plan:free@1': interval '@hourly' is not one of @daily, @weekly",
        ),
        ({"plans": {"plan:free@1": {"title": 3}}}, r"plan 'plan:free@1': 'title' must be a str"),
        ({"plans": {"plan:free@1": []}}, r"plan 'plan:free@1' must be an object"),
        (
            {"plans": {"plan:free@1": {"features": {"feature:a-b": {}}}}},
            r"plan 'plan:free@1': feature name 'feature:a-b' must match feature:\[a-zA-Z0-9:\]\+",
        ),
        (
            {"plans": {"plan:free@1": {"features": {"convert": {}}}}},
            r"feature name 'convert' must match",
        ),
        (plan_with({"limit": 10}), r"plan 'plan:free@1' feature 'feature:x': unknown key 'limit'"),
        (plan_with({"tiers": {"upto": 1}}), r"feature 'feature:x': 'tiers' must be a list"),
        (plan_with({"tiers": [{"upto": "10"}]}), r"tiers\[0\]: 'upto' must be a whole number"),
        (plan_with({"tiers": [{}, {"upto": 1.5}]}), r"tiers\[1\]: 'upto' must be a whole number"),
        (plan_with({"tiers": [{"upto": -1}]}), r"'upto' must be a whole number of units >= 0"),
        (plan_with({"tiers": [{"upto": True}]}), r"'upto' must be a whole number"),
        (plan_with({"tiers": [{"upto": 1, "max": 2}]}), r"tiers\[0\]: unknown key 'max'"),
        (plan_with({"tiers": [{"price": "free"}]}), r"tiers\[0\]: 'price' must be a number"),
        (plan_with({"mode": "stairs"}), r"mode 'stairs' is not one of graduated, volume"),
        (plan_with({"aggregate": "avg"}), r"aggregate 'avg' is not one of sum, max"),
        (plan_with({"divide": {"by": 2, "round": "up"}}), r"'divide': unknown key 'round'"),
        (plan_with({"divide": {"rounding": "down"}}), r"divide.rounding must be 'up'"),
        (plan_with({"tiers": [{"upto": 10**23}]}), r"tiers\[0\]: 'upto' 1000.* is above 9223"),
        (plan_with({"tiers": [{"upto": 2**63}]}), r"'upto' 9223372036854775808 is above"),
        (plan_with({"tiers": [{"upto": 1e23}]}), r"tiers\[0\]: 'upto' must be a whole number"),
        (
            plan_with({"tiers": [{"upto": 50}, {"upto": 10}]}),
            r"feature 'feature:x' tiers\[1\]: 'upto' 10 is not above the previous tier's 50; "
            r"list tiers in ascending 'upto' order",
        ),
        (plan_with({"tiers": [{"upto": 5}, {"upto": 5}]}), r"tiers\[1\]: 'upto' 5 is not above"),
        (
            plan_with({"tiers": [{"price": 1}, {"upto": 100}]}),
            r"tiers\[0\]: only the last tier may leave out 'upto'",
        ),
        (plan_with({"tiers": [{}, {}]}), r"tiers\[0\]: only the last tier may leave out"),
        (plan_with({"tiers": [{"price": -0.01}]}), r"tiers\[0\]: 'price' must be >= 0"),
        (plan_with({"tiers": [{"base": -1}]}), r"tiers\[0\]: 'base' must be >= 0"),
        (plan_with({"base": -100}), r"feature 'feature:x': 'base' must be >= 0"),
        (plan_with({"tiers": [{"price": float("nan")}]}), r"'price' must be a finite number"),
    ],
)
def test_bad_pricing_names_the_plan_feature_and_fix(document: object, expected: str) -> None:
    """Each kind of invalid pricing raises PricingError naming where it is and what to do."""
    with pytest.raises(PricingError, match=expected):
        load_pricing(document)  # type: ignore[arg-type]


def test_pricing_error_is_a_configuration_error() -> None:
    """PricingError is caught by code that handles ConfigurationError."""
    with pytest.raises(ConfigurationError):
        load_pricing({"plans": {"free": {}}})


def test_missing_file(tmp_path: pathlib.Path) -> None:
    """A missing file names the path and says a pricing.json is expected."""
    with pytest.raises(PricingError, match=r"pricing file '.*nope.json' not found"):
        load_pricing(tmp_path / "nope.json")


def test_invalid_json_gives_line_and_column(tmp_path: pathlib.Path) -> None:
    """Invalid JSON names the file and the line/column of the error."""
    path = tmp_path / "pricing.json"
    path.write_text('{\n  "plans": {\n    "plan:free@1": {,}\n  }\n}\n')
    with pytest.raises(PricingError, match=r"pricing.json is not valid JSON: .* at line 3 column"):
        load_pricing(path)


def test_wrong_source_type() -> None:
    """A source that is neither a path nor a mapping is a PricingError."""
    with pytest.raises(PricingError, match=r"path to a pricing\.json or its decoded JSON"):
        load_pricing(42)  # type: ignore[arg-type]


def test_json_that_is_not_an_object(tmp_path: pathlib.Path) -> None:
    """A pricing.json whose top level is not an object names the expected shape."""
    path = tmp_path / "pricing.json"
    path.write_text("[]")
    with pytest.raises(PricingError, match=r"pricing\.json: the top level must be an object"):
        load_pricing(path)


@pytest.mark.parametrize(
    ("interval", "at", "start", "end"),
    [
        ("@daily", datetime(2026, 3, 1, 23, 59, 59), datetime(2026, 3, 1), datetime(2026, 3, 2)),
        ("@daily", datetime(2026, 12, 31, 5), datetime(2026, 12, 31), datetime(2027, 1, 1)),
        # 2026-11-29 is a Sunday: its ISO week began on Monday 2026-11-23.
        ("@weekly", datetime(2026, 11, 29, 12), datetime(2026, 11, 23), datetime(2026, 11, 30)),
        ("@weekly", datetime(2026, 11, 30, 0), datetime(2026, 11, 30), datetime(2026, 12, 7)),
        ("@monthly", datetime(2026, 2, 28, 23), datetime(2026, 2, 1), datetime(2026, 3, 1)),
        ("@monthly", datetime(2026, 12, 15), datetime(2026, 12, 1), datetime(2027, 1, 1)),
        ("@yearly", datetime(2026, 7, 4), datetime(2026, 1, 1), datetime(2027, 1, 1)),
    ],
)
def test_period_bounds_are_utc_calendar_periods(
    interval: str, at: datetime, start: datetime, end: datetime
) -> None:
    """Periods: UTC day, ISO week from Monday, month, year; end is the next start."""
    bounds = period_bounds(interval, at.replace(tzinfo=UTC))  # type: ignore[arg-type]
    assert bounds == (start.replace(tzinfo=UTC), end.replace(tzinfo=UTC))


def test_period_bounds_convert_to_utc_first() -> None:
    """A time in another zone falls in the UTC period that contains it."""
    at = datetime(2026, 3, 1, 20, tzinfo=timezone(timedelta(hours=-5)))  # 01:00 UTC on the 2nd
    assert period_bounds("@daily", at) == (
        datetime(2026, 3, 2, tzinfo=UTC),
        datetime(2026, 3, 3, tzinfo=UTC),
    )


def test_period_bounds_reject_naive_times_and_bad_intervals() -> None:
    """A naive datetime or an unknown interval is a ValueError."""
    with pytest.raises(ValueError, match="aware"):
        period_bounds("@daily", datetime(2026, 3, 1))
    with pytest.raises(ValueError, match="interval"):
        period_bounds("@hourly", datetime(2026, 3, 1, tzinfo=UTC))  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            '{"plans": {"plan:free@1": {}, "plan:free@1": {"features": {}}}}',
            r"pricing: 'plans': key 'plan:free@1' appears more than once",
        ),
        (
            '{"plans": {"plan:free@1": {"features": {"feature:x": {"tiers": [{"upto": 5}]},'
            ' "feature:x": {}}}}}',
            r"plan 'plan:free@1': 'features': key 'feature:x' appears more than once",
        ),
        (
            '{"plans": {"plan:free@1": {"features": {"feature:x": {"tiers": [{"upto": 5,'
            ' "upto": 500}]}}}}}',
            r"tiers\[0\]: key 'upto' appears more than once",
        ),
    ],
)
def test_duplicate_keys_in_json_text_are_errors(
    tmp_path: pathlib.Path, text: str, expected: str
) -> None:
    """A plan, feature or any key given twice in the JSON text is refused (not last-wins)."""
    with pytest.raises(PricingError, match=expected):
        loads_pricing(text)
    path = tmp_path / "pricing.json"
    path.write_text(text)
    with pytest.raises(PricingError, match=expected.replace("pricing: ", "")):
        load_pricing(path)


def test_empty_or_missing_tiers_and_an_open_last_tier_are_unlimited() -> None:
    """No tiers, empty tiers, or an open-ended last tier: limit UNLIMITED (Tier: limit Inf)."""
    pricing = load_pricing(
        {
            "plans": {
                "plan:free@1": {
                    "features": {
                        "feature:a": {},
                        "feature:b": {"tiers": []},
                        "feature:c": {"tiers": [{"upto": 1}, {"upto": 9}, {"price": 2}]},
                        "feature:d": {"tiers": [{"upto": 1}, {"upto": UNLIMITED}]},
                        "feature:e": {"tiers": [{"upto": 0}, {"upto": 7, "price": 0}]},
                    }
                }
            }
        }
    )
    limits = {n: f.limit for n, f in pricing.plans["plan:free@1"].features.items()}
    assert limits == {
        "feature:a": UNLIMITED,
        "feature:b": UNLIMITED,
        "feature:c": UNLIMITED,
        "feature:d": UNLIMITED,
        "feature:e": 7,
    }


def test_a_deeply_nested_document_is_a_pricing_error() -> None:
    """JSON nested thousands deep is a PricingError, not a RecursionError traceback."""
    with pytest.raises(PricingError, match="nested too deeply"):
        loads_pricing('{"plans":' * 5000 + "1" + "}" * 5000)
