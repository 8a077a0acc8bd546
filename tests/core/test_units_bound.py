"""MAX_UNITS: the bound on units one request or event may use, enforced everywhere units enter."""

from __future__ import annotations

import pytest

from usage_middleware import ConfigurationError, UsageEvent
from usage_middleware.decorator import metered
from usage_middleware.models import MAX_UNITS, UNLIMITED, check_units


def test_max_units_is_far_below_64_bit_limits() -> None:
    """MAX_UNITS is 10**15, far below the signed 64-bit range SQLite and Redis count in."""
    assert MAX_UNITS == 10**15
    assert MAX_UNITS * 1000 < UNLIMITED


def test_check_units_accepts_the_bound_and_refuses_above_it() -> None:
    """check_units passes MAX_UNITS and refuses MAX_UNITS + 1 with a message naming the bound."""
    assert check_units(MAX_UNITS) == MAX_UNITS
    with pytest.raises(ValueError, match=str(MAX_UNITS)):
        check_units(MAX_UNITS + 1)
    with pytest.raises(ValueError, match="MAX_UNITS"):
        check_units(2**70, what="units")


def test_usage_event_refuses_units_above_the_bound() -> None:
    """A UsageEvent above MAX_UNITS (also with clobber) is refused at creation."""
    with pytest.raises(ValueError, match="MAX_UNITS"):
        UsageEvent("org:acme", "feature:a", MAX_UNITS + 1)
    with pytest.raises(ValueError, match="MAX_UNITS"):
        UsageEvent("org:acme", "feature:a", 2**63, clobber=True)


def test_fixed_units_above_the_bound_raise_at_decoration() -> None:
    """@metered(..., units=MAX_UNITS + 1) raises ConfigurationError naming the bound."""
    assert metered("feature:a", units=MAX_UNITS) is not None
    with pytest.raises(ConfigurationError, match="MAX_UNITS"):
        metered("feature:a", units=MAX_UNITS + 1)


def test_models_docstring_describes_the_constants() -> None:
    """help(usage_middleware.models) explains UNLIMITED and MAX_UNITS (ints carry no docstring)."""
    import usage_middleware.models as models

    doc = models.__doc__ or ""
    assert "``UNLIMITED``" in doc and "no limit" in doc
    assert "``MAX_UNITS``" in doc and "10**15" in doc
