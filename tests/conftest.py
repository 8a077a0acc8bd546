"""Shared fixtures. The test doubles live in :mod:`tests.support.metering_helpers`.

* ``provider``: a :class:`~tests.support.metering_helpers.RecordingProvider` (settable balances,
  real holds, every reserve/prepare/commit/release recorded with its units).
"""

from __future__ import annotations

import pytest

from tests.support.metering_helpers import RecordingProvider


@pytest.fixture
def provider() -> RecordingProvider:
    """A RecordingProvider where org:acme has 100 units of feature:a and feature:b."""
    return RecordingProvider({("org:acme", "feature:a"): 100, ("org:acme", "feature:b"): 100})
