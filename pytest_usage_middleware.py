"""The pytest plugin of usage-middleware: fixtures for testing apps metered with it.

pytest loads it through the ``pytest11`` entry point, for every test run where the
distribution is installed, so it imports nothing but pytest: ``usage_middleware.testing``
(and the package) is imported when a test asks for one of its fixtures. Fixtures (see
:mod:`usage_middleware.testing`):

* ``usage_ledger``: a ``LedgerKit`` on a fresh file, configured by
  ``@pytest.mark.usage_ledger(pricing=..., customers=..., credits=..., **options)``;
* ``make_usage_ledger``: a factory of such kits;
* ``ledger_clock``: the ``LedgerClock`` the test's ledgers read.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

if TYPE_CHECKING:
    from usage_middleware.testing import LedgerClock, LedgerKit


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line(
        "markers",
        "usage_ledger(pricing=None, customers=None, credits=None, **options): "
        "the usage_ledger fixture's pricing, subscribed customers, credits and LocalLedger "
        "options",
    )


@pytest.fixture
def ledger_clock() -> LedgerClock:
    """A clock for the test's ledgers: stands still at the real time until moved."""
    from usage_middleware.testing import LedgerClock

    return LedgerClock()


@pytest.fixture
def make_usage_ledger(
    tmp_path: Path, ledger_clock: LedgerClock
) -> Iterator[Callable[..., LedgerKit]]:
    """``make(pricing=None, *, customers=None, credits=None, **options)`` -> a LedgerKit."""
    from usage_middleware.testing import kit_factory

    with kit_factory(tmp_path, ledger_clock) as make:
        yield make


@pytest.fixture
def usage_ledger(
    request: pytest.FixtureRequest, make_usage_ledger: Callable[..., LedgerKit]
) -> LedgerKit:
    """A LedgerKit on a fresh file, configured by ``@pytest.mark.usage_ledger(...)``."""
    marker = request.node.get_closest_marker("usage_ledger")
    if marker is None:
        return make_usage_ledger()
    return make_usage_ledger(*marker.args, **marker.kwargs)
