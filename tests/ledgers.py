"""The ledgers the ledger contract suite (``tests/test_ledger_contract.py``) runs over.

Each entry of :data:`LEDGERS` is a ``pytest.param`` wrapping a factory::

    factory(tmp_path, pricing, *, now=None) -> AsyncContextManager[Ledger]

It yields an opened ledger that uses ``pricing`` (a decoded Tier pricing.json) and the
clock ``now`` (a callable returning an aware UTC datetime; ``None`` = real time), and
closes it on exit. A ledger needing a server adds its entry with a mark, e.g.
``pytest.param(redis_ledger, id="redis", marks=pytest.mark.redis)``.
"""

from __future__ import annotations

import contextlib
import pathlib
import uuid
from collections.abc import AsyncIterator, Callable, Mapping
from datetime import datetime
from typing import Any, Protocol

import pytest

from usage_middleware.ledger import Ledger, LocalLedger

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


@contextlib.asynccontextmanager
async def redis_ledger(
    tmp_path: pathlib.Path, pricing: Mapping[str, Any], *, now: Clock | None = None
) -> AsyncIterator[Ledger]:
    """A RedisLedger on this process's test redis-server, under a fresh key prefix."""
    from tests.redis_server import shared_server
    from usage_middleware.ledger.redis import RedisLedger

    ledger = RedisLedger(
        shared_server().url,
        pricing=pricing,
        now=now,
        prefix=f"t{uuid.uuid4().hex[:12]}:",
        spool=tmp_path / "redis-spool.db",
    )
    await ledger.open()
    try:
        yield ledger
    finally:
        await ledger.aclose()


LEDGERS: list[Any] = [
    pytest.param(local_ledger, id="local"),
    pytest.param(redis_ledger, id="redis", marks=pytest.mark.redis),
]
