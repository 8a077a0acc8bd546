"""The ``Subject`` every ``contract_*.py`` module here hands to the provider contract suite.

A contract module defines::

    @contextlib.asynccontextmanager
    async def make_subject(tmp_path: pathlib.Path) -> AsyncIterator[Subject]:
        ...  # start the backend (or its in-process fake), open the provider
        yield Subject(provider=provider, give=give, charged=charged)
        ...  # close everything

and may set ``MARKS = [pytest.mark.redis]`` (marks applied to its cases) and
``UNITS_FEATURE = "feature:..."`` (the feature the suite uses; default ``feature:contract``).
It is listed in ``PROVIDER_MODULES`` of ``tests/support/backends.py`` (the one registry).
The suite (``tests/providers/test_provider_contract.py``) uses a fresh customer id per test.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from asgiref.typing import HTTPScope

from usage_middleware.provider import Provider


def _no_scope(customer: str) -> HTTPScope | None:
    return None


@dataclass(frozen=True, slots=True)
class Subject:
    """A provider under test plus the two backend operations the suite needs.

    Attributes:
        provider: the provider, already opened (closed by the module's context manager).
        give: ``await give(customer, feature, units)`` makes the backend say ``customer``
            has exactly ``units`` of ``feature`` available from now on (a plan limit,
            credits, a balance: whatever the backend has).
        charged: ``await charged(customer, feature)`` returns the units the backend has
            recorded for ``customer``/``feature``, after any pending delivery drained.
        scope_for: the ASGI scope to pass to ``reserve`` for ``customer`` (providers that
            act for the signed-in user read a token from it); default ``None``.
    """

    provider: Provider
    give: Callable[[str, str, int], Awaitable[None]]
    charged: Callable[[str, str], Awaitable[int]]
    scope_for: Callable[[str], HTTPScope | None] = field(default=_no_scope)
