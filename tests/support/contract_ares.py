"""Contract entry for :class:`AresProvider` (``charge="after"``) over the in-process ARES fake.

Each customer is one ARES user whose token travels as the request's
``Authorization: Bearer`` header (``scope_for``). ``give`` sets the user's credits to
``units * price``; ``charged`` drains the durable outbox and converts the credits ARES
deducted for the feature's ``usage`` label back into units.

``charge="before"`` is deliberately not run through the contract: it charges at
``reserve`` and never refunds a released reservation (ARES has no refund endpoint).
"""

from __future__ import annotations

import contextlib
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
from asgiref.typing import HTTPScope

from tests.support.ares_fake import ARES_URL, CLIENT_ID, FakeAres, transport
from tests.support.contract_subject import Subject
from tests.support.waiting import drain_outbox
from usage_middleware.providers.ares import AresProvider

UNITS_FEATURE = "feature:contract"
PRICE = 2  # credits per unit: the conversion is part of what is tested


@contextlib.asynccontextmanager
async def make_subject(tmp_path: pathlib.Path) -> AsyncIterator[Subject]:
    """An AresProvider with a durable outbox in ``tmp_path``, talking to a fresh ARES fake."""
    ares = FakeAres()
    users: dict[str, tuple[str, str]] = {}  # customer -> (ARES user id, token)
    provider = AresProvider(
        client=httpx.AsyncClient(transport=transport(ares)),
        client_id=CLIENT_ID,
        base_url=ARES_URL,
        prices={UNITS_FEATURE: PRICE},
        outbox=tmp_path / "ares-outbox.db",
    )
    await provider.open()

    def user(customer: str) -> tuple[str, str]:
        if customer not in users:
            uid = ares.add_user()
            users[customer] = (uid, ares.issue_token(uid))
        return users[customer]

    async def give(customer: str, feature: str, units: int) -> None:
        uid, _ = user(customer)
        ares.users[uid].credits = units * float(provider.price(feature))

    async def charged(customer: str, feature: str) -> int:
        await drain_outbox(provider.reporter)
        uid, _ = user(customer)
        credits = ares.charged(uid, usage=provider.description(feature))
        return round(credits / float(provider.price(feature)))

    def scope_for(customer: str) -> HTTPScope:
        _, token = user(customer)
        scope: dict[str, Any] = {
            "type": "http",
            "method": "POST",
            "path": "/",
            "headers": [(b"authorization", f"Bearer {token}".encode())],
        }
        return scope  # type: ignore[return-value]

    try:
        yield Subject(provider=provider, give=give, charged=charged, scope_for=scope_for)
    finally:
        await provider.aclose()
        assert ares.violations == [], ares.violations
