"""The provider contract's fixtures: every backend of tests.support.backends as a subject."""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from types import ModuleType

import pytest

from tests.support.backends import PROVIDERS
from tests.support.contract_subject import Subject


@pytest.fixture(params=PROVIDERS)
async def subject(request: pytest.FixtureRequest, tmp_path: pathlib.Path) -> AsyncIterator[Subject]:
    """One opened provider per backend (LocalLedger, RedisLedger, Tier, Spaire, ARES...)."""
    module: ModuleType = request.param
    async with module.make_subject(tmp_path) as made:
        yield made


@pytest.fixture
def feature(request: pytest.FixtureRequest, subject: Subject) -> str:
    """The feature the subject's backend meters units of."""
    module: ModuleType = request.node.callspec.params["subject"]
    return str(getattr(module, "UNITS_FEATURE", "feature:contract"))
