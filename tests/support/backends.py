"""The one registry of backends the contract suites run over.

:data:`PROVIDERS`: every provider the provider contract suite
(``tests/providers/test_provider_contract.py``) and the event-loop test in
``tests/edge/test_lifecycle.py`` run over: one ``pytest.param`` per module
``tests/support/contract_<id>.py`` (see ``contract_subject.py`` for what a module defines).

:data:`LEDGERS`: the ledgers the ledger contract suite
(``tests/ledgers/test_ledger_contract.py``) runs over. Each entry is a ``pytest.param``
wrapping a factory::

    factory(tmp_path, pricing, *, now=None) -> AsyncContextManager[Ledger]

It yields an opened ledger that uses ``pricing`` (a decoded Tier pricing.json) and the
clock ``now`` (a callable returning an aware UTC datetime; ``None`` = real time), and
closes it on exit. A ledger needing a server adds its entry with a mark, e.g.
``pytest.param(redis_ledger, id="redis", marks=pytest.mark.redis)``.
"""

from __future__ import annotations

import contextlib
import importlib
import pathlib
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import TYPE_CHECKING, Any, Protocol

import pytest

from usage_middleware.ledger import Ledger, LocalLedger

if TYPE_CHECKING:
    from usage_middleware.ledger.redis import RedisLedger

Clock = Callable[[], datetime]


class LedgerFactory(Protocol):
    def __call__(
        self, tmp_path: pathlib.Path, pricing: Mapping[str, Any], *, now: Clock | None = None
    ) -> contextlib.AbstractAsyncContextManager[Ledger]: ...


@contextlib.asynccontextmanager
async def local_ledger(
    tmp_path: pathlib.Path, pricing: Mapping[str, Any], *, now: Clock | None = None
) -> AsyncIterator[Ledger]:
    """A LocalLedger on a fresh file in ``tmp_path``."""
    ledger = LocalLedger(tmp_path / "ledger.db", pricing=pricing, now=now)
    await ledger.open()
    try:
        yield ledger
    finally:
        await ledger.aclose()


def new_redis_ledger(
    tmp_path: pathlib.Path, pricing: Mapping[str, Any], *, now: Clock | None = None, prefix: str
) -> RedisLedger:
    """A RedisLedger (not opened) on this process's test redis-server, under a fresh key
    prefix starting with ``prefix``, with its spool in ``tmp_path``."""
    from tests.support.redis_server import shared_server
    from usage_middleware.ledger.redis import RedisLedger

    return RedisLedger(
        shared_server().url,
        pricing=pricing,
        now=now,
        prefix=f"{prefix}{uuid.uuid4().hex[:12]}:",
        spool=tmp_path / "redis-spool.db",
    )


@contextlib.asynccontextmanager
async def redis_ledger(
    tmp_path: pathlib.Path, pricing: Mapping[str, Any], *, now: Clock | None = None
) -> AsyncIterator[Ledger]:
    """A RedisLedger on this process's test redis-server, under a fresh key prefix."""
    ledger = new_redis_ledger(tmp_path, pricing, now=now, prefix="t")
    await ledger.open()
    try:
        yield ledger
    finally:
        await ledger.aclose()


LEDGERS: list[Any] = [
    pytest.param(local_ledger, id="local"),
    pytest.param(redis_ledger, id="redis", marks=pytest.mark.redis),
]

#: The provider contract modules, ``tests/support/contract_<id>.py``.
PROVIDER_MODULES = ["ares", "fake_remote", "local", "redis", "spaire", "tier"]


def _provider_params() -> list[Any]:
    params: list[Any] = []
    for name in PROVIDER_MODULES:
        module = importlib.import_module(f"tests.support.contract_{name}")
        marks = list(getattr(module, "MARKS", []))
        params.append(pytest.param(module, id=name, marks=marks))
    return params


PROVIDERS: list[Any] = _provider_params()
